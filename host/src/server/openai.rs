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

use adapterlab_model::chat::Message;
use adapterlab_model::commands::{ChatCompletion, ChatOptions, TextLogprob, complete_chat};
use adapterlab_model::generate::Decoding;
use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
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
    param: Option<&'static str>,
    code: Option<&'static str>,
}

impl OpenAiError {
    pub fn invalid(param: Option<&'static str>, message: impl Into<String>) -> Self {
        OpenAiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param,
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
            param: Some("model"),
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
    let model = v
        .get("model")
        .and_then(Value::as_str)
        .filter(|m| !m.is_empty())
        .ok_or_else(|| OpenAiError::invalid(Some("model"), "you must provide a model parameter"))?
        .to_string();
    let messages = parse_messages(v.get("messages"))?;
    let number = |key: &'static str| -> Result<Option<f64>, OpenAiError> {
        match v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x.as_f64().map(Some).ok_or_else(|| {
                OpenAiError::invalid(Some(key), format!("`{key}` must be a number"))
            }),
        }
    };
    let integer = |key: &'static str| -> Result<Option<i64>, OpenAiError> {
        match v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x.as_i64().map(Some).ok_or_else(|| {
                OpenAiError::invalid(Some(key), format!("`{key}` must be an integer"))
            }),
        }
    };
    let flag = |key: &'static str| -> Result<bool, OpenAiError> {
        match v.get(key) {
            None | Some(Value::Null) => Ok(false),
            Some(x) => x.as_bool().ok_or_else(|| {
                OpenAiError::invalid(Some(key), format!("`{key}` must be a boolean"))
            }),
        }
    };
    let max_tokens = match (integer("max_completion_tokens")?, integer("max_tokens")?) {
        (Some(n), _) => Some(("max_completion_tokens", n)),
        (None, Some(n)) => Some(("max_tokens", n)),
        (None, None) => None,
    };
    let max_new_tokens = match max_tokens {
        None => DEFAULT_MAX_TOKENS,
        Some((key, n)) if n < 1 || n as usize > MAX_NEW_TOKENS => {
            let param = if key == "max_tokens" {
                "max_tokens"
            } else {
                "max_completion_tokens"
            };
            return Err(OpenAiError::invalid(
                Some(param),
                format!("`{key}` must be between 1 and {MAX_NEW_TOKENS}"),
            ));
        }
        Some((_, n)) => n as usize,
    };
    let temperature = number("temperature")?.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(OpenAiError::invalid(
            Some("temperature"),
            "`temperature` must be between 0 and 2",
        ));
    }
    let top_p = number("top_p")?;
    if let Some(p) = top_p
        && !(p > 0.0 && p <= 1.0)
    {
        return Err(OpenAiError::invalid(
            Some("top_p"),
            "`top_p` must be in (0, 1]",
        ));
    }
    let top_k = integer("top_k")?;
    if top_k.is_some_and(|k| k < 0) {
        return Err(OpenAiError::invalid(
            Some("top_k"),
            "`top_k` must be 0 or more",
        ));
    }
    let repetition_penalty = number("repetition_penalty")?.unwrap_or(1.0);
    if repetition_penalty.is_nan() || repetition_penalty <= 0.0 {
        return Err(OpenAiError::invalid(
            Some("repetition_penalty"),
            "`repetition_penalty` must be positive",
        ));
    }
    for key in ["frequency_penalty", "presence_penalty"] {
        if number(key)?.is_some_and(|p| p != 0.0) {
            return Err(OpenAiError::invalid(
                None,
                format!("`{key}` is not supported (use `repetition_penalty`)"),
            ));
        }
    }
    if integer("n")?.is_some_and(|n| n != 1) {
        return Err(OpenAiError::invalid(Some("n"), "only n = 1 is supported"));
    }
    for key in ["tools", "functions", "tool_choice", "function_call"] {
        if v.get(key).is_some_and(|t| !t.is_null()) {
            return Err(OpenAiError::invalid(
                None,
                format!("`{key}` is not supported"),
            ));
        }
    }
    if let Some(kind) = v
        .get("response_format")
        .and_then(|f| f.get("type"))
        .and_then(Value::as_str)
        && kind != "text"
    {
        return Err(OpenAiError::invalid(
            Some("response_format"),
            format!("response_format {kind:?} is not supported; only \"text\""),
        ));
    }
    let seed = integer("seed")?;
    let stop = match v.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if items.len() <= 4 => items
            .iter()
            .map(|s| {
                s.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| OpenAiError::invalid(Some("stop"), "`stop` must hold strings"))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(OpenAiError::invalid(
                Some("stop"),
                "`stop` must be a string or up to 4 strings",
            ));
        }
    };
    let logprobs = flag("logprobs")?;
    let top_logprobs = integer("top_logprobs")?;
    let logprobs = match (logprobs, top_logprobs) {
        (_, Some(n)) if !(0..=20).contains(&n) => {
            return Err(OpenAiError::invalid(
                Some("top_logprobs"),
                "`top_logprobs` must be between 0 and 20",
            ));
        }
        (false, Some(_)) => {
            return Err(OpenAiError::invalid(
                Some("top_logprobs"),
                "`top_logprobs` needs `logprobs` set to true",
            ));
        }
        (true, n) => Some(n.unwrap_or(0) as usize),
        (false, None) => None,
    };
    let decoding = if temperature == 0.0 {
        Decoding::Greedy
    } else {
        Decoding::Sample {
            temperature: temperature as f32,
            top_k: top_k.map(|k| k as usize),
            top_p: top_p.map(|p| p as f32),
            seed: seed.map_or_else(rand::random, |s| s as u64),
        }
    };
    let include_usage = v
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
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
        stream: flag("stream")?,
        include_usage,
    })
}

/// `messages`: each `{role, content}` where content is a string, a list of text parts, or null.
fn parse_messages(value: Option<&Value>) -> Result<Vec<Message>, OpenAiError> {
    let param = Some("messages");
    let items = value
        .and_then(Value::as_array)
        .filter(|m| !m.is_empty())
        .ok_or_else(|| OpenAiError::invalid(param, "`messages` must be a non-empty array"))?;
    items
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m.get("role").and_then(Value::as_str).ok_or_else(|| {
                OpenAiError::invalid(param, format!("messages[{i}]: `role` must be a string"))
            })?;
            let content = match m.get("content") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => parts
                    .iter()
                    .map(
                        |p| match (p.get("type").and_then(Value::as_str), p.get("text")) {
                            (Some("text"), Some(Value::String(t))) => Ok(t.as_str()),
                            _ => Err(OpenAiError::invalid(
                                param,
                                format!("messages[{i}]: only text content parts are supported"),
                            )),
                        },
                    )
                    .collect::<Result<Vec<_>, _>>()?
                    .concat(),
                Some(_) => {
                    return Err(OpenAiError::invalid(
                        param,
                        format!("messages[{i}]: `content` must be a string or a list of parts"),
                    ));
                }
            };
            Ok(Message::new(role, &content))
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
        assert_eq!(e.param, param, "{}", e.message);
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
