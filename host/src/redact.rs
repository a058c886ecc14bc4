//! Secrets out of text: what a plugin sees, what the store keeps and what is logged passes
//! through [`redact`] first. An upstream error can quote the URL it was sent to (with
//! `user:password@`), echo the `Authorization` header, or repeat the API key in its body.

use std::sync::{OnceLock, RwLock};

/// What replaces a secret.
pub const MASK: &str = "***";

/// Secret values known to this process: the API keys and tokens from the environment, and any
/// registered later (the server's token).
fn secrets() -> &'static RwLock<Vec<String>> {
    static SECRETS: OnceLock<RwLock<Vec<String>>> = OnceLock::new();
    SECRETS.get_or_init(|| {
        let values = [
            "OPENAI_API_KEY",
            "ADAPTERLAB_TOKEN",
            "HF_TOKEN",
            "HUGGING_FACE_HUB_TOKEN",
        ]
        .iter()
        .filter_map(|k| std::env::var(k).ok())
        .map(|v| v.trim().to_string())
        .filter(|v| is_worth_masking(v))
        .collect();
        RwLock::new(values)
    })
}

/// Too short a value would mask ordinary words.
fn is_worth_masking(value: &str) -> bool {
    value.len() >= 8
}

/// Mask `value` wherever it appears from now on.
pub fn register_secret(value: &str) {
    let value = value.trim();
    if !is_worth_masking(value) {
        return;
    }
    let mut known = secrets().write().unwrap_or_else(|e| e.into_inner());
    if !known.iter().any(|k| k == value) {
        known.push(value.to_string());
    }
}

/// `text` with URL credentials, bearer tokens, OpenAI-style keys and every registered secret
/// masked.
pub fn redact(text: &str) -> String {
    let mut out = text.to_string();
    for secret in secrets().read().unwrap_or_else(|e| e.into_inner()).iter() {
        if out.contains(secret.as_str()) {
            out = out.replace(secret.as_str(), MASK);
        }
    }
    let out = url_userinfo(&out);
    let out = after_marker(&out, "bearer ", |c| {
        !c.is_whitespace() && c != '"' && c != '\''
    });
    api_keys(&out)
}

/// `scheme://user:password@host` → `scheme://***@host`.
fn url_userinfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        out.push_str(head);
        let authority_end = tail
            .find(|c: char| {
                matches!(c, '/' | '?' | '#' | '"' | '\'' | '<' | '>') || c.is_whitespace()
            })
            .unwrap_or(tail.len());
        let authority = &tail[..authority_end];
        match authority.rfind('@') {
            Some(userinfo_end) => {
                out.push_str(MASK);
                out.push_str(&authority[userinfo_end..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[authority_end..];
    }
    out.push_str(rest);
    out
}

/// The run of token characters after each (case-insensitive) `marker` → [`MASK`].
fn after_marker(text: &str, marker: &str, is_token: impl Fn(char) -> bool) -> String {
    let lower = text.to_ascii_lowercase();
    let mut out = String::with_capacity(text.len());
    let mut from = 0;
    while let Some(found) = lower[from..].find(marker) {
        let start = from + found + marker.len();
        let end = text[start..]
            .find(|c: char| !is_token(c))
            .map_or(text.len(), |e| start + e);
        out.push_str(&text[from..start]);
        if end > start {
            out.push_str(MASK);
        }
        from = end;
    }
    out.push_str(&text[from..]);
    out
}

/// OpenAI-style keys (`sk-` and at least 16 key characters), wherever they appear.
fn api_keys(text: &str) -> String {
    let is_key_char = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    let mut out = String::with_capacity(text.len());
    let mut from = 0;
    while let Some(found) = text[from..].find("sk-") {
        let start = from + found;
        let body_start = start + 3;
        let end = text[body_start..]
            .find(|c: char| !is_key_char(c))
            .map_or(text.len(), |e| body_start + e);
        let preceded_by_word = text[..start].chars().next_back().is_some_and(is_key_char);
        out.push_str(&text[from..start]);
        if end - body_start >= 16 && !preceded_by_word {
            out.push_str("sk-");
            out.push_str(MASK);
        } else {
            out.push_str(&text[start..end]);
        }
        from = end;
    }
    out.push_str(&text[from..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_credentials_are_masked() {
        assert_eq!(
            redact("request to http://user:pw@127.0.0.1:9/v1/chat/completions failed"),
            "request to http://***@127.0.0.1:9/v1/chat/completions failed"
        );
        assert_eq!(
            redact("see https://example.com/a@b"),
            "see https://example.com/a@b"
        );
    }

    #[test]
    fn bearer_tokens_and_keys_are_masked() {
        assert_eq!(
            redact(r#"{"error": "bad header Authorization: Bearer abc.def-123"}"#),
            r#"{"error": "bad header Authorization: Bearer ***"}"#
        );
        assert_eq!(
            redact("Incorrect API key provided: sk-proj-abcdefghijklmnop1234."),
            "Incorrect API key provided: sk-***."
        );
        assert_eq!(redact("task-list and sk-short"), "task-list and sk-short");
    }

    #[test]
    fn registered_secrets_are_masked_anywhere() {
        register_secret("s3cr3t-token-value");
        assert_eq!(redact("echo: s3cr3t-token-value!"), "echo: ***!");
        register_secret("short");
        assert_eq!(redact("short"), "short");
    }
}
