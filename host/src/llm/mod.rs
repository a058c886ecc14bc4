//! The LLM client: OpenAI chat completions with bounded concurrency, retries with backoff
//! (honouring `Retry-After`), a response cache in the store, identical requests in flight
//! sent once, and usage accounting that counts every attempt. Its errors are redacted
//! (URL credentials, keys): they reach plugins and the store.
//!
//! **Architecture Invariant:** only this module speaks the OpenAI HTTP API as a client.
//! Plugins reach it through the `chat` capability; the key never enters a plugin.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt as _;
use futures::future::{BoxFuture, Shared};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::plugin::wit::types::{ChatRequest, ChatResponse, TokenLogprob, TopLogprob};
use crate::store::{Store, Usage};

#[derive(Debug, Clone)]
pub struct LlmConfig {
    /// e.g. `https://api.openai.com/v1` (from `OPENAI_BASE_URL`, as the OpenAI SDKs read it).
    pub base_url: String,
    pub api_key: Option<String>,
    pub default_model: String,
    pub concurrency: usize,
    pub max_retries: u32,
    pub timeout: Duration,
    /// First retry delay; doubles each attempt, capped at `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
}

impl LlmConfig {
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        LlmConfig {
            base_url: var("OPENAI_BASE_URL").unwrap_or_else(|| "https://api.openai.com/v1".into()),
            api_key: var("OPENAI_API_KEY"),
            default_model: "gpt-3.5-turbo".into(),
            concurrency: var("ADAPTERLAB_LLM_CONCURRENCY")
                .and_then(|v| v.parse().ok())
                .unwrap_or(8),
            max_retries: var("ADAPTERLAB_LLM_MAX_RETRIES")
                .and_then(|v| v.parse().ok())
                .unwrap_or(5),
            timeout: Duration::from_secs(
                var("ADAPTERLAB_LLM_TIMEOUT_SECS")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(60),
            ),
            backoff: Duration::from_millis(
                var("ADAPTERLAB_LLM_BACKOFF_MS")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(500),
            ),
            max_backoff: Duration::from_secs(60),
        }
    }
}

type Answer = Result<ChatResponse, String>;

impl LlmConfig {
    /// An http(s) URL a client can be pointed at.
    pub fn check_endpoint(url: &str) -> Result<(), String> {
        let parsed = reqwest::Url::parse(url).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            return Err(format!("{url:?} is not an http(s) URL"));
        }
        Ok(())
    }

    /// This config pointed at `base_url` for one run. The host's API key goes only to the
    /// endpoint it was configured for (same scheme, host and port as `OPENAI_BASE_URL`):
    /// a run must not be able to send the host's key to a server of its choosing.
    pub fn for_endpoint(mut self, base_url: &str) -> Self {
        let origin = |u: &str| {
            reqwest::Url::parse(u.trim()).ok().map(|u| {
                (
                    u.scheme().to_string(),
                    u.host_str().map(str::to_string),
                    u.port_or_known_default(),
                )
            })
        };
        if origin(base_url).is_none() || origin(base_url) != origin(&self.base_url) {
            self.api_key = None;
        }
        self.base_url = base_url.trim().to_string();
        self
    }
}

/// A chat-completions client shared by every plugin call of a run.
#[derive(Clone)]
pub struct LlmClient {
    http: reqwest::Client,
    config: Arc<LlmConfig>,
    limit: Arc<Semaphore>,
    cache: Option<Store>,
    usage: Arc<Mutex<Usage>>,
    /// Requests being sent, by cache key: an identical request joins the one in flight.
    in_flight: Arc<Mutex<HashMap<String, Shared<BoxFuture<'static, Answer>>>>>,
}

impl LlmClient {
    pub fn new(config: LlmConfig, cache: Option<Store>) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .user_agent(concat!("adapterlab/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(LlmClient {
            http,
            limit: Arc::new(Semaphore::new(config.concurrency.max(1))),
            config: Arc::new(config),
            cache,
            usage: Arc::new(Mutex::new(Usage::default())),
            in_flight: Arc::default(),
        })
    }

    /// `{base}/chat/completions`, keeping the base URL's query (Azure's `?api-version=`).
    fn endpoint(&self) -> Result<reqwest::Url, String> {
        let base = self.config.base_url.trim();
        let mut url = reqwest::Url::parse(base).map_err(|e| {
            crate::redact::redact(&format!("OPENAI_BASE_URL {base:?} is not a URL: {e}"))
        })?;
        url.path_segments_mut()
            .map_err(|()| {
                crate::redact::redact(&format!("OPENAI_BASE_URL {base:?} cannot have a path"))
            })?
            .pop_if_empty()
            .push("chat")
            .push("completions");
        Ok(url)
    }

    pub fn usage(&self) -> Usage {
        self.usage.lock().unwrap().clone()
    }

    /// The body sent for a request: also the cache key's content.
    fn body(&self, request: &ChatRequest) -> Value {
        let mut body = json!({
            "model": request.model.clone().unwrap_or_else(|| self.config.default_model.clone()),
            "messages": request.messages.iter().map(|m| json!({"role": m.role, "content": m.content})).collect::<Vec<_>>(),
        });
        let obj = body.as_object_mut().unwrap();
        if let Some(t) = request.temperature {
            obj.insert("temperature".into(), json!(t));
        }
        if let Some(m) = request.max_tokens {
            obj.insert("max_tokens".into(), json!(m));
        }
        if request.logprobs {
            obj.insert("logprobs".into(), json!(true));
            if let Some(k) = request.top_logprobs {
                obj.insert("top_logprobs".into(), json!(k));
            }
        }
        if let Some(s) = request.seed {
            obj.insert("seed".into(), json!(s));
        }
        body
    }

    fn cache_key(&self, body: &Value) -> String {
        // serde_json keeps insertion order; the body is built in a fixed order, so equal
        // requests serialise identically.
        let canonical = json!({"url": self.config.base_url, "body": body}).to_string();
        hex::encode(Sha256::digest(canonical.as_bytes()))
    }

    pub async fn complete(&self, request: &ChatRequest) -> Answer {
        let body = self.body(request);
        let key = self.cache_key(&body);
        let shared = {
            let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
            match in_flight.get(&key) {
                Some(running) => running.clone(),
                None => {
                    let this = self.clone();
                    let owned_key = key.clone();
                    let fetch = async move {
                        let answer = this.fetch(body, &owned_key).await;
                        this.in_flight
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&owned_key);
                        answer
                    }
                    .boxed()
                    .shared();
                    in_flight.insert(key, fetch.clone());
                    fetch
                }
            }
        };
        shared.await
    }

    /// The cache, else the server.
    async fn fetch(&self, body: Value, key: &str) -> Answer {
        if let Some(store) = &self.cache
            && let Ok(Some(hit)) = store.cached_response(key)
            && let Ok(mut response) = serde_json::from_value::<ChatResponse>(hit)
        {
            response.cached = true;
            self.usage.lock().unwrap().cached += 1;
            return Ok(response);
        }
        let _permit = self.limit.acquire().await.map_err(|e| e.to_string())?;
        let response = self.send_with_retries(&body).await?;
        {
            let mut usage = self.usage.lock().unwrap();
            usage.prompt_tokens += response.prompt_tokens as u64;
            usage.completion_tokens += response.completion_tokens as u64;
            usage.cost_usd += cost_usd(
                &response.model,
                response.prompt_tokens,
                response.completion_tokens,
            );
        }
        // Only successes are cached: a rerun retries what failed.
        if let Some(store) = &self.cache
            && let Ok(value) = serde_json::to_value(&response)
        {
            let _ = store.cache_response(key, &value);
        }
        Ok(response)
    }

    pub async fn complete_many(
        &self,
        requests: &[ChatRequest],
    ) -> Vec<Result<ChatResponse, String>> {
        futures::future::join_all(requests.iter().map(|r| self.complete(r))).await
    }

    async fn send_with_retries(&self, body: &Value) -> Answer {
        let url = self.endpoint()?;
        // What errors quote: the URL without credentials (they go as basic auth).
        let shown = crate::redact::redact(url.as_str());
        let mut attempt = 0u32;
        loop {
            // Every attempt is a request someone may pay for: count it before sending.
            self.usage.lock().unwrap().requests += 1;
            let mut req = self.http.post(url.clone()).json(body);
            if !url.username().is_empty() {
                req = req.basic_auth(url.username(), url.password());
            }
            if let Some(key) = &self.config.api_key {
                req = req.bearer_auth(key);
            }
            let (retryable, retry_after, error) = match req.send().await {
                Ok(resp) => {
                    let status = resp.status();
                    let retry_after = resp
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(parse_retry_after);
                    let text = resp.text().await.unwrap_or_default();
                    if status.is_success() {
                        return parse_response(&text).map_err(|e| crate::redact::redact(&e));
                    }
                    let retryable = status.as_u16() == 429 || status.is_server_error();
                    (
                        retryable,
                        retry_after,
                        format!("{shown} answered {status}: {}", truncate(&text, 300)),
                    )
                }
                Err(e) => {
                    let retryable = e.is_timeout() || e.is_connect() || e.is_request();
                    (retryable, None, format!("request to {shown} failed: {e}"))
                }
            };
            let error = crate::redact::redact(&error);
            if !retryable || attempt >= self.config.max_retries {
                let tries = attempt + 1;
                return Err(if tries > 1 {
                    format!("{error} (after {tries} attempts)")
                } else {
                    error
                });
            }
            let backoff = self
                .config
                .backoff
                .saturating_mul(1 << attempt.min(16))
                .min(self.config.max_backoff);
            let wait = retry_after
                .map(|r| r.min(self.config.max_backoff))
                .unwrap_or(backoff);
            tracing::debug!("{error}; retrying in {wait:?}");
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }
}

/// `Retry-After` is seconds or an HTTP date.
fn parse_retry_after(value: &str) -> Option<Duration> {
    if let Ok(secs) = value.trim().parse::<f64>() {
        return (secs >= 0.0 && secs.is_finite()).then(|| Duration::from_secs_f64(secs));
    }
    let when =
        time::OffsetDateTime::parse(value.trim(), &time::format_description::well_known::Rfc2822)
            .ok()?;
    let delta = when - time::OffsetDateTime::now_utc();
    Some(Duration::from_secs_f64(delta.as_seconds_f64().max(0.0)))
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Parse an OpenAI chat-completions response body.
pub fn parse_response(text: &str) -> Result<ChatResponse, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| {
        format!(
            "the server's answer is not JSON ({e}): {}",
            truncate(text, 200)
        )
    })?;
    let choice = v.get("choices").and_then(|c| c.get(0)).ok_or_else(|| {
        format!(
            "the server's answer has no choices: {}",
            truncate(text, 200)
        )
    })?;
    let content = choice
        .get("message")
        .and_then(|m| m.get("content"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let logprobs = choice
        .get("logprobs")
        .and_then(|l| l.get("content"))
        .and_then(Value::as_array)
        .map(|tokens| {
            tokens
                .iter()
                .map(|t| TokenLogprob {
                    token: t
                        .get("token")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                    logprob: t
                        .get("logprob")
                        .and_then(Value::as_f64)
                        .unwrap_or(f64::NEG_INFINITY),
                    top: t
                        .get("top_logprobs")
                        .and_then(Value::as_array)
                        .map(|tops| {
                            tops.iter()
                                .map(|o| TopLogprob {
                                    token: o
                                        .get("token")
                                        .and_then(Value::as_str)
                                        .unwrap_or_default()
                                        .to_string(),
                                    logprob: o
                                        .get("logprob")
                                        .and_then(Value::as_f64)
                                        .unwrap_or(f64::NEG_INFINITY),
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                })
                .collect()
        });
    let usage = v.get("usage");
    let count = |k: &str| {
        usage
            .and_then(|u| u.get(k))
            .and_then(Value::as_u64)
            .unwrap_or(0) as u32
    };
    Ok(ChatResponse {
        content,
        logprobs,
        model: v
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        prompt_tokens: count("prompt_tokens"),
        completion_tokens: count("completion_tokens"),
        cached: false,
    })
}

/// List prices in USD per million tokens (input, output); unknown models cost 0.
fn cost_usd(model: &str, prompt: u32, completion: u32) -> f64 {
    let (input, output) = match model {
        m if m.starts_with("gpt-3.5-turbo") => (0.5, 1.5),
        m if m.starts_with("gpt-4o-mini") => (0.15, 0.6),
        m if m.starts_with("gpt-4o") => (2.5, 10.0),
        m if m.starts_with("gpt-4.1-mini") => (0.4, 1.6),
        m if m.starts_with("gpt-4.1") => (2.0, 8.0),
        _ => (0.0, 0.0),
    };
    (prompt as f64 * input + completion as f64 * output) / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_openai_answers_with_logprobs() {
        let text = r#"{"model":"gpt-3.5-turbo-0125","choices":[{"message":{"role":"assistant","content":"4"},
            "logprobs":{"content":[{"token":"4","logprob":-0.1,"top_logprobs":[{"token":"4","logprob":-0.1},{"token":"5","logprob":-2.4}]}]}}],
            "usage":{"prompt_tokens":120,"completion_tokens":1}}"#;
        let r = parse_response(text).unwrap();
        assert_eq!(r.content, "4");
        let lp = r.logprobs.unwrap();
        assert_eq!(lp[0].top.len(), 2);
        assert_eq!(r.prompt_tokens, 120);
        assert!(parse_response("oops").is_err());
    }

    #[test]
    fn the_endpoint_keeps_the_base_query_and_hides_credentials() {
        let client = |base: &str| {
            LlmClient::new(
                LlmConfig {
                    base_url: base.into(),
                    ..LlmConfig::from_env()
                },
                None,
            )
            .unwrap()
        };
        let url = client("https://x.openai.azure.com/openai/deployments/d?api-version=2024-02-01")
            .endpoint()
            .unwrap();
        assert_eq!(
            url.as_str(),
            "https://x.openai.azure.com/openai/deployments/d/chat/completions?api-version=2024-02-01"
        );
        let url = client("http://127.0.0.1:8080/v1/").endpoint().unwrap();
        assert_eq!(url.as_str(), "http://127.0.0.1:8080/v1/chat/completions");
        assert!(client("not a url").endpoint().is_err());
    }

    /// A local OpenAI-shaped server that fails the first `fail_first` requests with 500,
    /// answers the rest after `delay`, and counts what it was sent.
    async fn counting_server(
        fail_first: usize,
        delay: Duration,
    ) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let count = Arc::new(AtomicUsize::new(0));
        let seen = count.clone();
        let app = axum::Router::new().route(
            "/v1/chat/completions",
            axum::routing::post(move || {
                let n = seen.fetch_add(1, Ordering::SeqCst);
                async move {
                    tokio::time::sleep(delay).await;
                    if n < fail_first {
                        return (
                            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                            "busy".to_string(),
                        );
                    }
                    (
                        axum::http::StatusCode::OK,
                        json!({"model": "gpt-3.5-turbo", "choices": [{"message": {"content": "4"}}],
                               "usage": {"prompt_tokens": 10, "completion_tokens": 1}})
                        .to_string(),
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (format!("http://{addr}/v1"), count)
    }

    fn client(base_url: String) -> LlmClient {
        LlmClient::new(
            LlmConfig {
                base_url,
                api_key: None,
                default_model: "gpt-3.5-turbo".into(),
                concurrency: 8,
                max_retries: 5,
                timeout: Duration::from_secs(10),
                backoff: Duration::from_millis(10),
                max_backoff: Duration::from_millis(50),
            },
            None,
        )
        .unwrap()
    }

    fn request(content: &str) -> ChatRequest {
        ChatRequest {
            model: None,
            messages: vec![crate::plugin::wit::types::ChatMessage {
                role: "user".into(),
                content: content.into(),
            }],
            temperature: Some(0.0),
            max_tokens: None,
            logprobs: false,
            top_logprobs: None,
            seed: None,
        }
    }

    #[tokio::test]
    async fn identical_requests_in_flight_are_sent_once() {
        let (base, count) = counting_server(0, Duration::from_millis(200)).await;
        let c = client(base);
        let same = request("2+2?");
        let answers = c
            .complete_many(&[same.clone(), same.clone(), request("3+3?")])
            .await;
        assert!(answers.iter().all(|a| a.is_ok()), "{answers:?}");
        assert_eq!(
            count.load(std::sync::atomic::Ordering::SeqCst),
            2,
            "one request per distinct body"
        );
        assert_eq!(c.usage().requests, 2);
    }

    #[tokio::test]
    async fn every_attempt_counts_in_usage() {
        let (base, count) = counting_server(2, Duration::ZERO).await;
        let c = client(base);
        c.complete(&request("hi")).await.unwrap();
        assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 3);
        let usage = c.usage();
        assert_eq!(usage.requests, 3, "two failed attempts and the answer");
        assert_eq!(usage.prompt_tokens, 10, "tokens only from the answer");
    }

    #[test]
    fn a_run_endpoint_gets_the_key_only_where_it_was_meant_to_go() {
        let host = LlmConfig {
            base_url: "https://api.openai.com/v1".into(),
            api_key: Some("sk-host".into()),
            ..LlmConfig::from_env()
        };
        let same = host.clone().for_endpoint("https://api.openai.com/v1?x=1");
        assert_eq!(same.api_key.as_deref(), Some("sk-host"));
        let other = host.clone().for_endpoint("http://127.0.0.1:8000/v1");
        assert_eq!(other.api_key, None);
        assert_eq!(other.base_url, "http://127.0.0.1:8000/v1");
        assert!(LlmConfig::check_endpoint("ftp://x/").is_err());
        assert!(LlmConfig::check_endpoint("nonsense").is_err());
    }

    #[test]
    fn retry_after_reads_seconds() {
        assert_eq!(parse_retry_after("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after("nonsense"), None);
    }
}
