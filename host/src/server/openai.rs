//! An OpenAI-compatible API under `/v1`: `GET /v1/models` (the served base model and every
//! stored adapter, each a model id) and `POST /v1/chat/completions` (the model's chat
//! template, sampling or greedy decoding, stop strings, log-probabilities, streaming as
//! Server-Sent Events ending in `data: [DONE]`). Errors have OpenAI's shape
//! (`{"error": {"message", "type", "param", "code"}}`).
//!
//! Like every mutating call, a completion needs the server's token, which OpenAI clients send
//! as their API key (`OPENAI_API_KEY`); the model list is open like other reads.

use std::convert::Infallible;
use std::path::PathBuf;

use adapterlab_model::engine::Message;
use adapterlab_model::engine::generate::Decoding;
use adapterlab_model::engine::{ChatCompletion, ChatOptions, TextLogprob, complete_chat};
use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::infer::predict::MAX_NEW_TOKENS;
use crate::server::AppState;

/// New tokens when a request sets no `max_tokens`/`max_completion_tokens`.
pub const DEFAULT_MAX_TOKENS: usize = 256;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route("/v1/chat/completions", post(chat_completions))
}

/// An error in OpenAI's shape.
#[derive(Debug)]
pub struct OpenAiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<String>,
    code: Option<&'static str>,
}

impl OpenAiError {
    pub fn invalid(param: Option<&str>, message: impl Into<String>) -> Self {
        OpenAiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
        }
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        OpenAiError {
            status: StatusCode::UNAUTHORIZED,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key"),
        }
    }

    fn model_not_found(model: &str) -> Self {
        OpenAiError {
            status: StatusCode::NOT_FOUND,
            message: format!(
                "The model `{model}` does not exist: GET /v1/models lists the served model and the stored adapters"
            ),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
        }
    }

    fn server(message: impl Into<String>) -> Self {
        OpenAiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

impl<E: Into<anyhow::Error>> From<E> for OpenAiError {
    fn from(e: E) -> Self {
        let e: anyhow::Error = e.into();
        tracing::error!("/v1: {e:#}");
        OpenAiError::server(format!("{e:#}"))
    }
}

fn unix_time(rfc3339: &str) -> i64 {
    time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
        .map(|t| t.unix_timestamp())
        .unwrap_or(0)
}

fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Every model id: the served base, then the stored adapters (each on the base it was
/// trained on, named as `root`/`parent`).
fn model_list(state: &AppState) -> Result<Vec<Value>, OpenAiError> {
    let served = state.jobs.models().served().to_string();
    let mut out =
        vec![json!({"id": served, "object": "model", "created": 0, "owned_by": "adapterlab"})];
    let adapters = state.store.list_adapters()?;
    for a in adapters {
        out.push(json!({
            "id": a.name, "object": "model", "created": unix_time(&a.created), "owned_by": "adapterlab",
            "root": a.base_model, "parent": a.base_model,
        }));
    }
    Ok(out)
}

async fn list_models(State(state): State<AppState>) -> Result<Json<Value>, OpenAiError> {
    Ok(Json(json!({"object": "list", "data": model_list(&state)?})))
}

async fn get_model(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, OpenAiError> {
    model_list(&state)?
        .into_iter()
        .find(|m| m["id"] == id.as_str())
        .map(Json)
        .ok_or_else(|| OpenAiError::model_not_found(&id))
}

/// A model id resolved: the base to load and the adapter folder on top, if any.
fn resolve(state: &AppState, model: &str) -> Result<(String, Option<PathBuf>), OpenAiError> {
    let served = state.jobs.models().served();
    if model == served {
        return Ok((served.to_string(), None));
    }
    match state.store.get_adapter(model)? {
        Some(a) => Ok((a.base_model, Some(PathBuf::from(a.path)))),
        None => Err(OpenAiError::model_not_found(model)),
    }
}

/// A chat request, checked.
#[derive(Debug)]
struct ChatRequest {
    model: String,
    messages: Vec<Message>,
    options: ChatOptions,
    stream: bool,
    include_usage: bool,
}

/// The body of `POST /v1/chat/completions`, as OpenAI defines the parameters served here.
/// Parameters OpenAI has and this server does not use (`user`, `logit_bias`, ...) are ignored,
/// as OpenAI-compatible servers do; those that would change the answer and are not
/// implemented are refused by [`parse_request`].
#[derive(Debug, Deserialize)]
struct ChatBody {
    model: Option<String>,
    messages: Option<Vec<MessageBody>>,
    max_completion_tokens: Option<i64>,
    max_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    repetition_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    presence_penalty: Option<f64>,
    n: Option<i64>,
    tools: Option<Value>,
    functions: Option<Value>,
    tool_choice: Option<Value>,
    function_call: Option<Value>,
    response_format: Option<ResponseFormat>,
    seed: Option<i64>,
    stop: Option<Stop>,
    logprobs: Option<bool>,
    top_logprobs: Option<i64>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
}

#[derive(Debug, Deserialize)]
struct MessageBody {
    role: String,
    content: Option<Content>,
}

/// A message's content: a string, or a list of parts of which only text is served.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ResponseFormat {
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

fn parse_request(body: &[u8]) -> Result<ChatRequest, OpenAiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        OpenAiError::invalid(
            None,
            format!("We could not parse the JSON body of your request: {e}"),
        )
    })?;
    if !v.is_object() {
        return Err(OpenAiError::invalid(None, "the body must be a JSON object"));
    }
    // Types once, at the edge: a wrong type names its parameter (the path's first key).
    let b: ChatBody = serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let param = path
            .split(['.', '['])
            .next()
            .filter(|p| !p.is_empty() && *p != "?")
            .map(str::to_string);
        let inner = e.into_inner();
        OpenAiError::invalid(param.as_deref(), format!("`{path}`: {inner}"))
    })?;
    let invalid = |param: &str, message: String| OpenAiError::invalid(Some(param), message);
    let model = b
        .model
        .filter(|m| !m.is_empty())
        .ok_or_else(|| invalid("model", "you must provide a model parameter".into()))?;
    let messages = messages(b.messages)?;
    let max_tokens = match (b.max_completion_tokens, b.max_tokens) {
        (Some(n), _) => Some(("max_completion_tokens", n)),
        (None, Some(n)) => Some(("max_tokens", n)),
        (None, None) => None,
    };
    let max_new_tokens = match max_tokens {
        None => DEFAULT_MAX_TOKENS,
        Some((key, n)) if n < 1 || n as usize > MAX_NEW_TOKENS => {
            return Err(invalid(
                key,
                format!("`{key}` must be between 1 and {MAX_NEW_TOKENS}"),
            ));
        }
        Some((_, n)) => n as usize,
    };
    let temperature = b.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(invalid(
            "temperature",
            "`temperature` must be between 0 and 2".into(),
        ));
    }
    if let Some(p) = b.top_p
        && !(p > 0.0 && p <= 1.0)
    {
        return Err(invalid("top_p", "`top_p` must be in (0, 1]".into()));
    }
    if b.top_k.is_some_and(|k| k < 0) {
        return Err(invalid("top_k", "`top_k` must be 0 or more".into()));
    }
    let repetition_penalty = b.repetition_penalty.unwrap_or(1.0);
    if repetition_penalty.is_nan() || repetition_penalty <= 0.0 {
        return Err(invalid(
            "repetition_penalty",
            "`repetition_penalty` must be positive".into(),
        ));
    }
    for (key, value) in [
        ("frequency_penalty", b.frequency_penalty),
        ("presence_penalty", b.presence_penalty),
    ] {
        if value.is_some_and(|p| p != 0.0) {
            return Err(OpenAiError::invalid(
                None,
                format!("`{key}` is not supported (use `repetition_penalty`)"),
            ));
        }
    }
    if b.n.is_some_and(|n| n != 1) {
        return Err(invalid("n", "only n = 1 is supported".into()));
    }
    for (key, value) in [
        ("tools", &b.tools),
        ("functions", &b.functions),
        ("tool_choice", &b.tool_choice),
        ("function_call", &b.function_call),
    ] {
        if value.as_ref().is_some_and(|t| !t.is_null()) {
            return Err(OpenAiError::invalid(
                None,
                format!("`{key}` is not supported"),
            ));
        }
    }
    if let Some(f) = &b.response_format
        && f.kind != "text"
    {
        return Err(invalid(
            "response_format",
            format!(
                "response_format {:?} is not supported; only \"text\"",
                f.kind
            ),
        ));
    }
    let stop = match b.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(items)) if items.len() <= 4 => items,
        Some(Stop::Many(_)) => {
            return Err(invalid(
                "stop",
                "`stop` must be a string or up to 4 strings".into(),
            ));
        }
    };
    let logprobs = match (b.logprobs.unwrap_or(false), b.top_logprobs) {
        (_, Some(n)) if !(0..=20).contains(&n) => {
            return Err(invalid(
                "top_logprobs",
                "`top_logprobs` must be between 0 and 20".into(),
            ));
        }
        (false, Some(_)) => {
            return Err(invalid(
                "top_logprobs",
                "`top_logprobs` needs `logprobs` set to true".into(),
            ));
        }
        (true, n) => Some(n.unwrap_or(0) as usize),
        (false, None) => None,
    };
    let decoding = Decoding::from_settings(
        temperature as f32,
        b.top_k.map(|k| k as usize),
        b.top_p.map(|p| p as f32),
        b.seed.map_or_else(rand::random, |s| s as u64),
    );
    Ok(ChatRequest {
        model,
        messages,
        options: ChatOptions {
            max_new_tokens,
            decoding,
            repetition_penalty: repetition_penalty as f32,
            stop,
            logprobs,
        },
        stream: b.stream.unwrap_or(false),
        include_usage: b
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
    })
}

/// `messages`: a non-empty list, each content a string, a list of text parts, or null.
fn messages(items: Option<Vec<MessageBody>>) -> Result<Vec<Message>, OpenAiError> {
    let invalid = |message: String| OpenAiError::invalid(Some("messages"), message);
    let items = items
        .filter(|m| !m.is_empty())
        .ok_or_else(|| invalid("`messages` must be a non-empty array".into()))?;
    items
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let content = match m.content {
                None => String::new(),
                Some(Content::Text(s)) => s,
                Some(Content::Parts(parts)) => parts
                    .into_iter()
                    .map(|p| match (p.kind.as_str(), p.text) {
                        ("text", Some(t)) => Ok(t),
                        _ => Err(invalid(format!(
                            "messages[{i}]: only text content parts are supported"
                        ))),
                    })
                    .collect::<Result<Vec<_>, _>>()?
                    .concat(),
            };
            Ok(Message::new(&m.role, &content))
        })
        .collect()
}

fn logprobs_json(tokens: &[TextLogprob]) -> Value {
    let entry = |token: &str, logprob: f32| json!({"token": token, "logprob": logprob, "bytes": token.as_bytes()});
    json!({"content": tokens.iter().map(|t| {
        let mut e = entry(&t.token, t.logprob);
        e["top_logprobs"] = t.top.iter().map(|(tok, lp)| entry(tok, *lp)).collect();
        e
    }).collect::<Vec<_>>()})
}

fn usage_json(done: &ChatCompletion) -> Value {
    json!({
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
    })
}

async fn chat_completions(State(state): State<AppState>, body: Bytes) -> Response {
    match chat(state, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn chat(state: AppState, body: Bytes) -> Result<Response, OpenAiError> {
    let request = parse_request(&body)?;
    let (base, adapter) = resolve(&state, &request.model)?;
    let models = state.jobs.models().clone();
    let id = format!("chatcmpl-{}", uuid::Uuid::now_v7().simple());
    let created = now_unix();
    let model = request.model.clone();
    let wants_logprobs = request.options.logprobs.is_some();
    if !request.stream {
        let done = tokio::task::spawn_blocking(move || {
            let loaded = models.get(&base, adapter.as_deref())?;
            let _device = models.lock_device();
            complete_chat(&loaded, &request.messages, &request.options, |_, _| {})
        })
        .await
        .map_err(|e| OpenAiError::server(e.to_string()))??;
        let logprobs = if wants_logprobs {
            logprobs_json(&done.logprobs)
        } else {
            Value::Null
        };
        return Ok(Json(json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "system_fingerprint": null,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": done.text, "refusal": null},
                "logprobs": logprobs,
                "finish_reason": done.finish_reason,
            }],
            "usage": usage_json(&done),
        }))
        .into_response());
    }

    // Streaming: chunks go through a channel from the generating thread to the response.
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Event>();
    let chunk = {
        let (id, model) = (id.clone(), model.clone());
        move |choices: Value, usage: Option<Value>| -> Event {
            let mut c = json!({"id": id, "object": "chat.completion.chunk", "created": created,
                "model": model, "system_fingerprint": null, "choices": choices});
            if let Some(u) = usage {
                c["usage"] = u;
            }
            Event::default().data(c.to_string())
        }
    };
    let _ = tx.send(chunk(
        json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]),
        None,
    ));
    let include_usage = request.include_usage;
    tokio::task::spawn_blocking(move || {
        let result = models.get(&base, adapter.as_deref()).and_then(|loaded| {
            let _device = models.lock_device();
            complete_chat(&loaded, &request.messages, &request.options, |text, lps| {
                let logprobs = if wants_logprobs {
                    logprobs_json(lps)
                } else {
                    Value::Null
                };
                let _ = tx.send(chunk(
                    json!([{"index": 0, "delta": {"content": text}, "logprobs": logprobs, "finish_reason": null}]),
                    None,
                ));
            })
        });
        match result {
            Ok(done) => {
                let _ = tx.send(chunk(
                    json!([{"index": 0, "delta": {}, "logprobs": null, "finish_reason": done.finish_reason}]),
                    None,
                ));
                if include_usage {
                    let _ = tx.send(chunk(json!([]), Some(usage_json(&done))));
                }
            }
            Err(e) => {
                tracing::error!("/v1/chat/completions: {e:#}");
                let _ = tx.send(
                    Event::default().data(OpenAiError::server(format!("{e:#}")).body().to_string()),
                );
            }
        }
        let _ = tx.send(Event::default().data("[DONE]"));
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx))
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_err(body: Value, param: Option<&str>, needle: &str) {
        let e = parse_request(body.to_string().as_bytes()).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.param.as_deref(), param, "{}", e.message);
        assert!(e.message.contains(needle), "{}", e.message);
        let shape = e.body();
        assert_eq!(shape["error"]["type"], "invalid_request_error");
    }

    #[test]
    fn requests_parse_as_openai_defines_them() {
        let r = parse_request(
            json!({"model": "m", "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}],
                "temperature": 0, "max_tokens": 5, "logprobs": true, "top_logprobs": 5,
                "stop": "\n", "stream": true, "stream_options": {"include_usage": true}})
            .to_string()
            .as_bytes(),
        )
        .unwrap();
        assert_eq!(r.messages[1].content, "Hi there");
        assert_eq!(r.options.max_new_tokens, 5);
        assert_eq!(r.options.decoding, Decoding::Greedy);
        assert_eq!(r.options.logprobs, Some(5));
        assert_eq!(r.options.stop, vec!["\n".to_string()]);
        assert!(r.stream && r.include_usage);
        let r = parse_request(
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
                "max_completion_tokens": 7, "max_tokens": 3, "temperature": 0.7, "seed": 3, "top_p": 0.9})
            .to_string()
            .as_bytes(),
        )
        .unwrap();
        assert_eq!(r.options.max_new_tokens, 7, "max_completion_tokens wins");
        assert_eq!(
            r.options.decoding,
            Decoding::Sample {
                temperature: 0.7,
                top_k: None,
                top_p: Some(0.9),
                seed: 3
            }
        );
        assert_eq!(r.options.logprobs, None);
    }

    #[test]
    fn bad_requests_name_their_parameter() {
        let user = json!([{"role": "user", "content": "x"}]);
        check_err(json!({"messages": user}), Some("model"), "model");
        check_err(
            json!({"model": "m", "messages": []}),
            Some("messages"),
            "non-empty",
        );
        check_err(
            json!({"model": "m", "messages": user, "temperature": 3}),
            Some("temperature"),
            "between 0 and 2",
        );
        check_err(
            json!({"model": "m", "messages": user, "n": 2}),
            Some("n"),
            "n = 1",
        );
        check_err(
            json!({"model": "m", "messages": user, "top_logprobs": 3}),
            Some("top_logprobs"),
            "logprobs",
        );
        check_err(
            json!({"model": "m", "messages": user, "max_tokens": 0}),
            Some("max_tokens"),
            "between 1",
        );
        check_err(
            json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
            Some("messages"),
            "text content",
        );
        let e = parse_request(b"{oops").unwrap_err();
        assert!(e.message.contains("could not parse the JSON body"));
    }
}
