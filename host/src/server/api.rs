//! The JSON API under `/api`. Shapes are a contract (documented in `openapi.rs`).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::Stream;
use serde_json::{Value, json};

use crate::eval::compare::compare;
use crate::eval::input::{PredictionRow, row_from_value};
use crate::eval::pipeline::EvalRequest;
use crate::plugin::{PluginMeta, registry};
use crate::server::{AppError, AppState, openapi};
use crate::store::RunEvent;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/health", get(health))
        .route(
            "/api/openapi.json",
            get(|| async { Json(openapi::document()) }),
        )
        .route("/api/plugins", get(list_plugins).post(upload_plugin))
        .route("/api/adapters", get(list_adapters))
        .route("/api/runs", get(list_runs).post(create_run))
        .route("/api/runs/{id}", get(get_run))
        .route("/api/runs/{id}/samples", get(get_samples))
        .route("/api/runs/{id}/events", get(events))
        .route("/api/runs/{id}/cancel", post(cancel_run))
        .route("/api/runs/{id}/resume", post(resume_run))
        .route("/api/compare", get(compare_runs))
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok", "version": env!("CARGO_PKG_VERSION")}))
}

async fn list_plugins(State(state): State<AppState>) -> Json<Vec<PluginMeta>> {
    let registry = state.registry.read().unwrap();
    Json(registry.all().iter().map(|p| (*p.meta).clone()).collect())
}

/// Upload a component: `multipart/form-data` with a `file` field, or the raw bytes.
async fn upload_plugin(
    State(state): State<AppState>,
    request: Request,
) -> Result<Response, AppError> {
    let is_multipart = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    let (bytes, file_name) = if is_multipart {
        let mut multipart = Multipart::from_request(request, &state)
            .await
            .map_err(|e| AppError::bad_request(format!("invalid multipart body: {e}")))?;
        let mut found = None;
        while let Some(field) = multipart
            .next_field()
            .await
            .map_err(|e| AppError::bad_request(e.to_string()))?
        {
            if field.name() == Some("file") {
                let name = field.file_name().unwrap_or("upload.wasm").to_string();
                let data = field
                    .bytes()
                    .await
                    .map_err(|e| AppError::bad_request(e.to_string()))?;
                found = Some((data, name));
            }
        }
        found.ok_or_else(|| AppError::bad_request("the multipart body has no `file` field"))?
    } else {
        let data = Bytes::from_request(request, &state)
            .await
            .map_err(|e| AppError::new(StatusCode::PAYLOAD_TOO_LARGE, e.to_string()))?;
        (data, "upload.wasm".to_string())
    };
    if bytes.is_empty() {
        return Err(AppError::bad_request("the uploaded file is empty"));
    }
    let runtime = state.runtime.clone();
    let plugins_dir = state.data_dir.plugins();
    let plugin = tokio::task::spawn_blocking(move || {
        registry::install(
            &runtime,
            &plugins_dir,
            &bytes,
            std::path::Path::new(&file_name),
        )
    })
    .await
    .map_err(anyhow::Error::from)?
    .map_err(|e| AppError::unprocessable(format!("{e:#}")))?;
    let meta = (*plugin.meta).clone();
    state.store.put_plugin(&registry::install_record(
        &meta,
        std::path::Path::new("upload"),
    ))?;
    state.registry.write().unwrap().add(plugin);
    Ok((StatusCode::CREATED, Json(meta)).into_response())
}

async fn list_adapters(State(state): State<AppState>) -> Result<Json<Value>, AppError> {
    Ok(Json(serde_json::to_value(state.store.list_adapters()?)?))
}

async fn list_runs(State(state): State<AppState>) -> Result<Json<Value>, AppError> {
    Ok(Json(serde_json::to_value(state.store.list_runs()?)?))
}

async fn get_run(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, AppError> {
    Ok(Json(serde_json::to_value(state.store.resolve_run(&id)?)?))
}

async fn get_samples(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, AppError> {
    let run = state.store.resolve_run(&id)?;
    Ok(Json(serde_json::to_value(state.store.samples(&run.id)?)?))
}

async fn cancel_run(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, AppError> {
    let run = state.jobs.cancel(&id)?;
    Ok(Json(json!({"id": run.id, "status": run.status.as_str()})))
}

async fn resume_run(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, AppError> {
    state.store.resolve_run(&id)?;
    let run = state
        .jobs
        .resume(&id)
        .map_err(|e| AppError::new(StatusCode::CONFLICT, format!("{e:#}")))?;
    Ok(Json(json!({"id": run.id, "status": run.status.as_str()})))
}

#[derive(serde::Deserialize)]
struct CompareQuery {
    runs: String,
}

async fn compare_runs(
    State(state): State<AppState>,
    Query(q): Query<CompareQuery>,
) -> Result<Json<Value>, AppError> {
    let ids: Vec<String> = q
        .runs
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    if ids.len() < 2 {
        return Err(AppError::bad_request(
            "`runs` must list at least two run ids, comma-separated",
        ));
    }
    for id in &ids {
        state.store.resolve_run(id)?;
    }
    Ok(Json(serde_json::to_value(compare(&state.store, &ids)?)?))
}

async fn create_run(State(state): State<AppState>, body: Bytes) -> Result<Response, AppError> {
    let value: Value = serde_json::from_slice(&body)
        .map_err(|e| AppError::bad_request(format!("the body is not valid JSON: {e}")))?;
    let kind = value.get("kind").and_then(Value::as_str).ok_or_else(|| {
        AppError::unprocessable("field `kind` is required: \"eval\", \"train\" or \"generate\"")
    })?;
    match kind {
        "eval" => {
            let request = eval_request(&value)?;
            let jobs = state.jobs.clone();
            let run = tokio::task::spawn_blocking(move || jobs.submit_eval(request))
                .await
                .map_err(anyhow::Error::from)?
                .map_err(|e| AppError::unprocessable(format!("{e:#}")))?;
            Ok((StatusCode::CREATED, Json(json!({"id": run.id}))).into_response())
        }
        "train" | "generate" => Err(AppError::unprocessable(format!(
            "`{kind}` runs are not available from this server yet; use `adapterlab {kind}` on the command line"
        ))),
        other => Err(AppError::unprocessable(format!(
            "unknown kind {other:?}: expected \"eval\", \"train\" or \"generate\""
        ))),
    }
}

/// Validate an eval request body, naming the field (and row) at fault.
fn eval_request(value: &Value) -> Result<EvalRequest, AppError> {
    let rows = value
        .get("predictions")
        .and_then(Value::as_array)
        .ok_or_else(|| {
            AppError::unprocessable(
                "field `predictions` must be an array of {id, prediction, reference, source}",
            )
        })?;
    let mut parsed: Vec<PredictionRow> = Vec::with_capacity(rows.len());
    let mut seen = std::collections::HashSet::new();
    for (i, row) in rows.iter().enumerate() {
        let row = row_from_value(row)
            .map_err(|e| AppError::unprocessable(format!("predictions[{i}]: {e}")))?;
        if !seen.insert(row.id.clone()) {
            return Err(AppError::unprocessable(format!(
                "predictions[{i}]: duplicate id {:?}",
                row.id
            )));
        }
        parsed.push(row);
    }
    if parsed.is_empty() {
        return Err(AppError::unprocessable("field `predictions` is empty"));
    }
    let metrics: Vec<String> = match value.get("metrics") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|m| {
                m.as_str()
                    .map(String::from)
                    .ok_or_else(|| AppError::unprocessable("field `metrics` must hold strings"))
            })
            .collect::<Result<_, _>>()?,
        Some(Value::String(s)) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect(),
        _ => {
            return Err(AppError::unprocessable(
                "field `metrics` must be an array of metric plugin names",
            ));
        }
    };
    let mut settings: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    if let Some(s) = value.get("settings") {
        let map = s.as_object().ok_or_else(|| {
            AppError::unprocessable("field `settings` must be an object {plugin: {key: value}}")
        })?;
        for (plugin, kv) in map {
            let kv = kv.as_object().ok_or_else(|| {
                AppError::unprocessable(format!(
                    "settings.{plugin} must be an object {{key: value}}"
                ))
            })?;
            let entry = settings.entry(plugin.clone()).or_default();
            for (k, v) in kv {
                let v = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                entry.insert(k.clone(), v);
            }
        }
    }
    let name = value
        .get("name")
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .unwrap_or("eval")
        .to_string();
    if name.len() > 200 {
        return Err(AppError::unprocessable(
            "field `name` is longer than 200 characters",
        ));
    }
    let mut metadata = BTreeMap::new();
    for key in ["model", "adapter", "dataset"] {
        if let Some(v) = value.get(key).and_then(Value::as_str) {
            metadata.insert(key.to_string(), v.to_string());
        }
    }
    Ok(EvalRequest {
        name,
        rows: parsed,
        metrics,
        settings,
        score_references: value
            .get("score_references")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        metadata,
    })
}

/// Server-Sent Events of a run: everything after `Last-Event-ID` (or from the start), then
/// new events as they are stored, until the run has finished.
async fn events(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, AppError> {
    let run = state.store.resolve_run(&id)?;
    let after = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let store = state.store.clone();
    let run_id = run.id.clone();
    struct Cursor {
        after: Option<u64>,
        pending: std::collections::VecDeque<(u64, RunEvent)>,
        finished_seen: bool,
    }
    let stream = futures::stream::unfold(
        Cursor {
            after,
            pending: Default::default(),
            finished_seen: false,
        },
        move |mut cursor| {
            let store = store.clone();
            let run_id = run_id.clone();
            async move {
                loop {
                    if let Some((seq, event)) = cursor.pending.pop_front() {
                        cursor.after = Some(seq);
                        let name = match &event {
                            RunEvent::Status { .. } => "status",
                            RunEvent::Progress { .. } => "progress",
                            RunEvent::Log { .. } => "log",
                            RunEvent::Loss { .. } => "loss",
                        };
                        let data = serde_json::to_string(&event).unwrap_or_default();
                        let sse = Event::default().id(seq.to_string()).event(name).data(data);
                        return Some((Ok(sse), cursor));
                    }
                    if cursor.finished_seen {
                        return None;
                    }
                    let finished = store
                        .get_run(&run_id)
                        .ok()
                        .flatten()
                        .is_none_or(|r| r.status.is_finished());
                    if let Ok(new) = store.events_after(&run_id, cursor.after) {
                        cursor.pending.extend(new);
                    }
                    if finished {
                        // One last read above caught the final events; end after them.
                        cursor.finished_seen = true;
                        continue;
                    }
                    if cursor.pending.is_empty() {
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                }
            }
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
