//! Who may call: every request must name this server in its `Host` header (a loopback name,
//! or one allowed with `serve --allowed-host`), which defeats DNS rebinding: a page on
//! another origin that resolves its own name to 127.0.0.1 still sends its own name. Then
//! every call but `GET /api/health` and the dashboard's static files needs
//! `Authorization: Bearer TOKEN`: reads too, since runs hold sources and predictions. That
//! includes `/v1/*`: OpenAI clients send their API key as this header, so they use the
//! server's token as their key.

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::server::openai::OpenAiError;
use crate::server::{AppError, AppState};

/// Refuses a request whose `Host` is not a loopback name nor one of `allowed` (421, with a
/// JSON error saying how to allow it).
pub async fn check_host(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| request.uri().authority().map(|a| a.to_string()));
    match host {
        Some(h) if host_allowed(&h, &state.allowed_hosts) => next.run(request).await,
        Some(h) => AppError::new(
            StatusCode::MISDIRECTED_REQUEST,
            format!(
                "Host {h:?} is not this server's; start it with `--allowed-host {}` to allow it",
                host_name(&h)
            ),
        )
        .into_response(),
        None => AppError::new(
            StatusCode::MISDIRECTED_REQUEST,
            "the request has no Host header",
        )
        .into_response(),
    }
}

/// The name of a `Host` value, without its port (`[::1]:80` → `[::1]`).
fn host_name(host: &str) -> &str {
    let host = host.trim();
    if host.starts_with('[') {
        return match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        };
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

pub fn host_allowed(host: &str, allowed: &[String]) -> bool {
    let name = host_name(host).to_ascii_lowercase();
    let name = name.trim_end_matches('.');
    matches!(name, "localhost" | "127.0.0.1" | "[::1]")
        || allowed.iter().any(|a| {
            host_name(a)
                .trim_end_matches('.')
                .eq_ignore_ascii_case(name)
        })
}

/// Calls that need no token: the health check and the dashboard's own files (they hold no
/// data; the dashboard then calls the API with the token).
fn is_public(method: &Method, path: &str) -> bool {
    if *method == Method::OPTIONS {
        return true;
    }
    if !matches!(*method, Method::GET | Method::HEAD) {
        return false;
    }
    path == "/api/health"
        || !(path.starts_with("/api/")
            || path.starts_with("/v1/")
            || path == "/api"
            || path == "/v1")
}

pub async fn require_token(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    if is_public(request.method(), request.uri().path()) {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    // The OpenAI-compatible API answers in OpenAI's error shape, which its clients parse.
    let openai = request.uri().path().starts_with("/v1/");
    let refuse = |message: &str| {
        if openai {
            OpenAiError::unauthorized(message).into_response()
        } else {
            AppError::new(StatusCode::UNAUTHORIZED, message).into_response()
        }
    };
    match presented {
        Some(t) if constant_time_eq(t.as_bytes(), state.token.as_bytes()) => {
            next.run(request).await
        }
        Some(_) => refuse("invalid token"),
        None if openai => refuse(
            "this call needs the server's token as the API key (`Authorization: Bearer TOKEN`, e.g. OPENAI_API_KEY=TOKEN); it is in the data directory's `token` file, or the one given with `serve --token`",
        ),
        None => refuse(
            "this call needs `Authorization: Bearer TOKEN` (the token is in the data directory's `token` file, or the one given with `serve --token`)",
        ),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_and_allowed_hosts_pass() {
        for ok in [
            "localhost",
            "localhost:7860",
            "127.0.0.1:1",
            "[::1]:80",
            "LOCALHOST.",
        ] {
            assert!(host_allowed(ok, &[]), "{ok}");
        }
        for bad in [
            "attacker.example",
            "attacker.example:7860",
            "127.0.0.1.nip.io",
            "[::2]:80",
            "localhost.evil",
        ] {
            assert!(!host_allowed(bad, &[]), "{bad}");
        }
        let allowed = vec!["box.lan".to_string()];
        assert!(host_allowed("box.lan:7860", &allowed));
        assert!(!host_allowed("other.lan", &allowed));
    }

    #[test]
    fn only_health_and_static_files_are_public() {
        assert!(is_public(&Method::GET, "/api/health"));
        assert!(is_public(&Method::GET, "/"));
        assert!(is_public(&Method::GET, "/views/run.js"));
        assert!(!is_public(&Method::GET, "/api/runs"));
        assert!(!is_public(&Method::GET, "/api/openapi.json"));
        assert!(!is_public(&Method::GET, "/v1/models"));
        assert!(!is_public(&Method::POST, "/"));
    }
}
