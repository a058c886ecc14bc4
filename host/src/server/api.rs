//! The JSON API under `/api`. Shapes are a contract (documented in `openapi.rs`).

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
use crate::eval::report;
use crate::plugin::{CallContext, PluginMeta, registry};
use crate::server::{AppError, AppState, openapi};
use crate::store::{RunEvent, RunKind, RunStatus};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/health", get(health))
        .route("/api/schema", get(schemas))
        .route(
            "/api/openapi.json",
            get(|| async { Json(openapi::document()) }),
        )
        .route("/api/plugins", get(list_plugins).post(upload_plugin))
        .route(
            "/api/plugins/{name}",
            axum::routing::delete(uninstall_plugin),
        )
        .route("/api/adapters", get(list_adapters))
        .route("/api/adapters/{name}/push", post(push_adapter))
        .route("/api/runs", get(list_runs).post(create_run))
        .route(
            "/api/runs/{id}",
            get(get_run).delete(delete_run).patch(patch_run),
        )
        .route("/api/runs/{id}/samples", get(get_samples))
        .route("/api/runs/{id}/events", get(events))
        .route("/api/runs/{id}/cancel", post(cancel_run))
        .route("/api/runs/{id}/resume", post(resume_run))
        .route("/api/compare", get(compare_runs))
        .route("/api/report", get(report_runs))
}

/// `ok`, or `degraded` with the reason while the data directory cannot be written.
async fn health(State(state): State<AppState>) -> Json<Value> {
    let jobs = state.jobs.clone();
    let health = tokio::task::spawn_blocking(move || jobs.health())
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
    Json(match health {
        Ok(()) => json!({"status": "ok", "version": env!("CARGO_PKG_VERSION")}),
        Err(reason) => json!({
            "status": "degraded",
            "reason": reason,
            "version": env!("CARGO_PKG_VERSION"),
        }),
    })
}

/// The settings' schemas, generated from the config types (one source for the forms'
/// defaults and checks, and for `/api/openapi.json`).
async fn schemas() -> Json<Value> {
    Json(json!({
        "train": crate::train::config::schema(),
        "generate": crate::infer::predict::sampling_schema(),
    }))
}

async fn list_plugins(State(state): State<AppState>) -> Json<Vec<PluginMeta>> {
    let registry = state.registry.read().unwrap();
    Json(registry.all().iter().map(|p| (*p.meta).clone()).collect())
}

#[derive(Debug, Default, serde::Deserialize)]
struct UploadQuery {
    /// Let a component named like a built-in replace it (see `plugins install --replace-builtin`).
    #[serde(default)]
    replace_builtin: bool,
}

/// Upload a component: `multipart/form-data` with a `file` field, or the raw bytes.
async fn upload_plugin(
    State(state): State<AppState>,
    Query(query): Query<UploadQuery>,
    request: Request,
) -> Result<Response, AppError> {
    let replace_builtin = query.replace_builtin;
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
    // What is not a binary component is refused by the runtime, in words that say so.
    let runtime = state.runtime.clone();
    let plugins_dir = state.data_dir.plugins();
    let registry = state.registry.read().unwrap().clone();
    let plugin = tokio::task::spawn_blocking(move || {
        registry::install(
            &runtime,
            &registry,
            &plugins_dir,
            &bytes,
            std::path::Path::new(&file_name),
            replace_builtin,
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
    state.store.flush()?;
    state.registry.write().unwrap().add(plugin);
    Ok((StatusCode::CREATED, Json(meta)).into_response())
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PushBody {
    repo: String,
    #[serde(default)]
    private: bool,
    #[serde(default)]
    revision: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

/// Uninstall a plugin the user installed; built-ins are refused (409). The registry is
/// reloaded, so a built-in a removed file had replaced is in use again.
async fn uninstall_plugin(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, AppError> {
    let registry = state.registry.read().unwrap().clone();
    let plugins_dir = state.data_dir.plugins();
    let store = state.store.clone();
    let runtime = state.runtime.clone();
    let (removed, reloaded) = tokio::task::spawn_blocking(move || {
        let removed = registry::uninstall(&registry, &plugins_dir, &store, &name)?;
        store.flush().map_err(anyhow::Error::from)?;
        let reloaded = crate::plugin::Registry::load(&runtime, &plugins_dir)?;
        Ok::<_, registry::UninstallError>((removed, reloaded))
    })
    .await
    .map_err(anyhow::Error::from)?
    .map_err(|e| match e {
        registry::UninstallError::Builtin { .. } => {
            AppError::new(StatusCode::CONFLICT, e.to_string())
        }
        registry::UninstallError::NotFound { .. } => AppError::not_found(e.to_string()),
        registry::UninstallError::Io(e) => AppError::from(e),
    })?;
    *state.registry.write().unwrap() = reloaded;
    Ok(Json(serde_json::to_value(removed)?))
}

/// Push a stored adapter to the Hub with the server's own HF_TOKEN (the browser never holds
/// it).
async fn push_adapter(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Json(body): Json<PushBody>,
) -> Result<Json<Value>, AppError> {
    let store = state.store.clone();
    let outcome =
        tokio::task::spawn_blocking(move || -> anyhow::Result<crate::hub::PushOutcome> {
            crate::hub::check_repo_id(&body.repo)?;
            let adapter = crate::infer::run::resolve_adapter(&store, &name)?;
            let args = crate::cli::PushArgs {
                adapter: name.clone(),
                repo: body.repo,
                private: body.private,
                revision: body.revision,
                message: body.message,
                json: true,
            };
            let request = crate::cli::push_request(Some(&store), &name, &adapter.dir, &args)?;
            crate::hub::Hub::new(crate::hub::HubConfig::from_env()?)?.push(&request)
        })
        .await
        .map_err(anyhow::Error::from)?
        .map_err(|e| AppError::unprocessable(format!("{e:#}")))?;
    Ok(Json(serde_json::to_value(outcome)?))
}

async fn list_adapters(State(state): State<AppState>) -> Result<Json<Value>, AppError> {
    Ok(Json(serde_json::to_value(state.store.list_adapters()?)?))
}

async fn list_runs(State(state): State<AppState>) -> Result<Json<Value>, AppError> {
    Ok(Json(serde_json::to_value(state.store.list_runs()?)?))
}

/// The run, with `request`: the settings it was launched with (a training config, a generate
/// request), so the dashboard can show every one and clone the run. An evaluation's request
/// holds all its rows, so it is left out; its metrics and settings are in `metadata`.
async fn get_run(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, AppError> {
    let run = state.store.resolve_run(&id)?;
    let mut value = serde_json::to_value(&run)?;
    if matches!(run.kind, RunKind::Train | RunKind::Generate)
        && let Some(mut request) = state.store.request::<Value>(&run.id)?
    {
        if let Some(map) = request.as_object_mut() {
            // Inline inputs can be large and are not settings.
            if let Some(Value::Array(inputs)) = map.remove("inputs")
                && !inputs.is_empty()
            {
                map.insert("inputs_count".into(), json!(inputs.len()));
            }
        }
        value["request"] = request;
    }
    Ok(Json(value))
}

/// Delete a finished run with its samples, events and request. Queued and running runs are
/// refused (409): cancel them first. A training run's adapter and files stay.
async fn delete_run(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, AppError> {
    let run = state.store.resolve_run(&id)?;
    if matches!(run.status, RunStatus::Queued | RunStatus::Running) {
        return Err(AppError::new(
            StatusCode::CONFLICT,
            format!(
                "run {} is {}: cancel it before deleting it",
                run.id,
                run.status.as_str()
            ),
        ));
    }
    state
        .store
        .delete_run(&run.id)
        .map_err(|e| anyhow::Error::from(e).context(format!("deleting run {}", run.id)))?;
    Ok(StatusCode::NO_CONTENT)
}

/// Change a run's `tags` and/or `notes` (`{"tags": [...], "notes": "..."}`); returns the run.
async fn patch_run(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, AppError> {
    let (tags, notes) = typed::<body::Patch>(json_object(&body)?)?.checked()?;
    let run = state.store.resolve_run(&id)?;
    let run = state.store.update_run(&run.id, |r| {
        if let Some(t) = &tags {
            r.tags = t.clone();
        }
        if let Some(n) = &notes {
            r.notes = n.clone();
        }
    })?;
    Ok(Json(serde_json::to_value(run)?))
}

/// `limit` and `offset` of a paginated read; without `limit`, the whole list.
#[derive(serde::Deserialize, Default)]
struct Page {
    limit: Option<usize>,
    offset: Option<usize>,
}

/// The most items one page may hold.
const MAX_PAGE: usize = 10_000;

impl Page {
    fn checked(&self) -> Result<Option<(usize, usize)>, AppError> {
        match self.limit {
            None if self.offset.is_some() => Err(AppError::bad_request("`offset` needs `limit`")),
            None => Ok(None),
            Some(l) if l == 0 || l > MAX_PAGE => Err(AppError::bad_request(format!(
                "`limit` must be between 1 and {MAX_PAGE}"
            ))),
            Some(l) => Ok(Some((self.offset.unwrap_or(0), l))),
        }
    }
}

/// A run's samples: all of them, or a page (`limit`, `offset`) with the total in
/// `X-Total-Count`. The answer of a finished run carries an ETag.
async fn get_samples(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(page): Query<Page>,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    let page = page.checked()?;
    let run = state.store.resolve_run(&id)?;
    let etag = etag_of(&[&run], &format!("samples {page:?}"));
    if let Some(tag) = &etag
        && not_modified(&headers, tag)
    {
        return Ok(not_modified_response(tag));
    }
    let store = state.store.clone();
    let (body, total) =
        tokio::task::spawn_blocking(move || -> anyhow::Result<(Vec<u8>, Option<usize>)> {
            Ok(match page {
                None => (serde_json::to_vec(&store.samples(&run.id)?)?, None),
                Some((offset, limit)) => (
                    serde_json::to_vec(&store.samples_page(&run.id, offset, limit)?)?,
                    Some(store.sample_count(&run.id)),
                ),
            })
        })
        .await
        .map_err(anyhow::Error::from)??;
    let mut response = json_response(&headers, body, etag.as_deref());
    if let Some(total) = total {
        response
            .headers_mut()
            .insert("x-total-count", total.to_string().parse().expect("digits"));
    }
    Ok(response)
}

/// An ETag for answers computed from `runs` alone, when all of them have finished (their
/// stored results no longer change; a resume changes the status and so the tag).
fn etag_of(runs: &[&crate::store::RunRecord], what: &str) -> Option<String> {
    if !runs.iter().all(|r| r.status.is_finished()) {
        return None;
    }
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    h.update(what.as_bytes());
    for r in runs {
        h.update(serde_json::to_vec(r).unwrap_or_default());
    }
    Some(format!("\"{}\"", hex::encode(&h.finalize()[..12])))
}

fn not_modified(headers: &HeaderMap, tag: &str) -> bool {
    headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == tag || t.trim() == "*"))
}

fn not_modified_response(tag: &str) -> Response {
    (StatusCode::NOT_MODIFIED, [(header::ETAG, tag.to_string())]).into_response()
}

/// A JSON body, gzip-compressed when the client accepts it and it is worth it, with its
/// ETag when it has one.
fn json_response(headers: &HeaderMap, body: Vec<u8>, etag: Option<&str>) -> Response {
    let gzip = body.len() > 1024
        && headers
            .get(header::ACCEPT_ENCODING)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(',').any(|e| e.trim().starts_with("gzip")));
    let mut response = if gzip {
        use std::io::Write as _;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        match enc.write_all(&body).and_then(|_| enc.finish()) {
            Ok(zipped) => {
                let mut r = zipped.into_response();
                r.headers_mut()
                    .insert(header::CONTENT_ENCODING, "gzip".parse().expect("ascii"));
                r
            }
            Err(_) => body.into_response(),
        }
    } else {
        body.into_response()
    };
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        "application/json".parse().expect("ascii"),
    );
    h.insert(header::VARY, "accept-encoding".parse().expect("ascii"));
    if let Some(tag) = etag
        && let Ok(v) = tag.parse()
    {
        h.insert(header::ETAG, v);
        h.insert(header::CACHE_CONTROL, "no-cache".parse().expect("ascii"));
    }
    response
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
    limit: Option<usize>,
    offset: Option<usize>,
}

/// A comparison; with `limit` (and `offset`), a page of its samples (most disagreement
/// first) and `total_samples`, `offset`, `limit` beside them. Finished runs' comparisons
/// carry an ETag.
async fn compare_runs(
    State(state): State<AppState>,
    Query(q): Query<CompareQuery>,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    let page = Page {
        limit: q.limit,
        offset: q.offset,
    }
    .checked()?;
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
    let mut runs = Vec::new();
    for id in &ids {
        runs.push(state.store.resolve_run(id)?);
    }
    let etag = etag_of(
        &runs.iter().collect::<Vec<_>>(),
        &format!("compare {ids:?} {page:?}"),
    );
    if let Some(tag) = &etag
        && not_modified(&headers, tag)
    {
        return Ok(not_modified_response(tag));
    }
    let store = state.store.clone();
    let body = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<u8>> {
        let mut comparison = serde_json::to_value(compare(&store, &ids)?)?;
        if let Some((offset, limit)) = page
            && let Some(samples) = comparison.get_mut("samples").and_then(Value::as_array_mut)
        {
            let total = samples.len();
            let kept: Vec<Value> = samples.drain(..).skip(offset).take(limit).collect();
            *samples = kept;
            comparison["total_samples"] = json!(total);
            comparison["offset"] = json!(offset);
            comparison["limit"] = json!(limit);
        }
        Ok(serde_json::to_vec(&comparison)?)
    })
    .await
    .map_err(anyhow::Error::from)??;
    Ok(json_response(&headers, body, etag.as_deref()))
}

#[derive(serde::Deserialize)]
struct ReportQuery {
    runs: String,
    #[serde(default = "default_report_format")]
    format: String,
}

fn default_report_format() -> String {
    "md".to_string()
}

/// A report of one run, or of a comparison (two or more runs, the first the baseline), rendered
/// by the reporter plugin for `format` (md, html, csv, or an installed one), as a download. The
/// dashboard's way to reports while the server holds the store.
async fn report_runs(
    State(state): State<AppState>,
    Query(q): Query<ReportQuery>,
) -> Result<Response, AppError> {
    let ids: Vec<String> = q
        .runs
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    if ids.is_empty() {
        return Err(AppError::bad_request(
            "`runs` must list one run id, or several to compare, comma-separated",
        ));
    }
    for id in &ids {
        state.store.resolve_run(id)?;
    }
    let reporter = state
        .registry
        .read()
        .unwrap()
        .reporter_for(&q.format)
        .map_err(|e| AppError::not_found(e.to_string()))?
        .clone();
    let store = state.store.clone();
    // Plugins run on blocking threads, as everywhere else in the server.
    let document = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let input = if ids.len() == 1 {
            let run = store.resolve_run(&ids[0])?;
            report::single(&run, &store.samples(&run.id)?)
        } else {
            report::comparison(&compare(&store, &ids)?)
        };
        let document = reporter.session(CallContext::default())?.render(&input)?;
        Ok(document)
    })
    .await
    .map_err(anyhow::Error::from)?
    .map_err(|e| AppError::unprocessable(format!("{e:#}")))?;
    let extension: String = q
        .format
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(16)
        .collect();
    let media_type = header::HeaderValue::from_str(&document.media_type)
        .unwrap_or_else(|_| header::HeaderValue::from_static("application/octet-stream"));
    let disposition = header::HeaderValue::from_str(&format!(
        "attachment; filename=\"adapterlab-report.{extension}\""
    ))
    .unwrap_or_else(|_| header::HeaderValue::from_static("attachment"));
    Ok((
        [
            (header::CONTENT_TYPE, media_type),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        document.content,
    )
        .into_response())
}

async fn create_run(State(state): State<AppState>, body: Bytes) -> Result<Response, AppError> {
    let value = json_object(&body)?;
    let kind = value.get("kind").and_then(Value::as_str).ok_or_else(|| {
        AppError::unprocessable("field `kind` is required: \"eval\", \"train\" or \"generate\"")
    })?;
    let jobs = state.jobs.clone();
    // Validation reads plugins and files: off the async threads.
    let submit = match kind {
        "eval" => {
            let request = typed::<body::Eval>(value)?.into_request()?;
            tokio::task::spawn_blocking(move || jobs.submit_eval(request))
        }
        "train" => {
            let submission = typed::<body::Train>(value)?.into_submission()?;
            tokio::task::spawn_blocking(move || jobs.submit_train(submission))
        }
        "generate" => {
            let request = typed::<body::Generate>(value)?.into_request()?;
            tokio::task::spawn_blocking(move || jobs.submit_generate(request))
        }
        other => {
            return Err(AppError::unprocessable(format!(
                "unknown kind {other:?}: expected \"eval\", \"train\" or \"generate\""
            )));
        }
    };
    let run = submit.await.map_err(anyhow::Error::from)?.map_err(|e| {
        // A full disk is the server's condition, not the request's fault.
        if let Some(full) = e.downcast_ref::<crate::server::jobs::DiskFull>() {
            AppError::new(StatusCode::INSUFFICIENT_STORAGE, full.to_string())
        } else if e.chain().any(|c| {
            c.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.raw_os_error() == Some(28))
        }) {
            AppError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                format!("the data directory's disk is full: {e:#}"),
            )
        } else {
            AppError::unprocessable(format!("{e:#}"))
        }
    })?;
    Ok((StatusCode::CREATED, Json(json!({"id": run.id}))).into_response())
}

/// The body as a JSON object (400 when it is not one).
fn json_object(body: &[u8]) -> Result<Value, AppError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| AppError::bad_request(format!("the body is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(AppError::bad_request("the body must be a JSON object"));
    }
    Ok(value)
}

/// A request body's types, checked once: a wrong type names the field (with its path, e.g.
/// `inputs[2].source`), an unknown field names the closest known one.
fn typed<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, AppError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        // serde speaks of Rust's shapes; the client wrote JSON.
        let inner = e
            .into_inner()
            .to_string()
            .replace("a sequence", "an array")
            .replace("a map", "an object");
        if let Some(unknown) = inner
            .strip_prefix("unknown field `")
            .and_then(|rest| rest.split('`').next())
        {
            // serde lists the known fields after "expected one of"; reuse them for the hint.
            let known: Vec<&str> = inner
                .split_once("expected")
                .map(|(_, list)| list.split('`').skip(1).step_by(2).collect())
                .unwrap_or_default();
            let hint = match crate::plugin::registry::closest(unknown, &known) {
                Some(c) => format!("; did you mean `{c}`?"),
                None => format!(" (expected: {})", known.join(", ")),
            };
            let at = match path.rsplit_once('.') {
                Some((parent, _)) if path != "." => format!("{parent}: "),
                _ => String::new(),
            };
            return AppError::unprocessable(format!("{at}unknown field `{unknown}`{hint}"));
        }
        if path == "." {
            AppError::unprocessable(inner)
        } else {
            AppError::unprocessable(format!("field `{path}`: {inner}"))
        }
    })
}

/// The bodies of `POST /api/runs` and `PATCH /api/runs/:id`, as serde types: every field the
/// API takes, with its type, in one place; what needs more than a type (ranges, non-empty
/// names, URLs) is checked by the `into_*` conversions, naming the field.
mod body {
    use std::collections::BTreeMap;

    use serde::Deserialize;
    use serde_json::Value;

    use super::AppError;
    use crate::eval::input::{PredictionRow, row_from_value};
    use crate::eval::pipeline::EvalRequest;
    use crate::infer::run::{GenerateRequest, InputRow};
    use crate::server::jobs::TrainSubmission;
    use crate::store::{MAX_NOTES_LEN, MAX_TAG_LEN, MAX_TAGS};

    /// `metrics`: an array of metric plugin names, or one comma-separated string.
    #[derive(Debug, Deserialize)]
    #[serde(untagged)]
    pub enum Metrics {
        List(Vec<String>),
        Joined(String),
    }

    impl Metrics {
        fn names(self) -> Vec<String> {
            match self {
                Metrics::List(names) => names,
                Metrics::Joined(s) => s
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect(),
            }
        }
    }

    /// `settings`: `{plugin: {key: value}}`, values taken as text.
    type Settings = BTreeMap<String, BTreeMap<String, Value>>;

    fn settings(s: Option<Settings>) -> BTreeMap<String, BTreeMap<String, String>> {
        s.unwrap_or_default()
            .into_iter()
            .map(|(plugin, kv)| {
                let kv = kv
                    .into_iter()
                    .map(|(k, v)| {
                        let v = match v {
                            Value::String(s) => s,
                            other => other.to_string(),
                        };
                        (k, v)
                    })
                    .collect();
                (plugin, kv)
            })
            .collect()
    }

    /// The optional run name: trimmed, at most 200 characters.
    fn run_name(name: Option<String>) -> Result<Option<String>, AppError> {
        let Some(name) = name else {
            return Ok(None);
        };
        let name = name.trim();
        if name.len() > 200 {
            return Err(AppError::unprocessable(
                "field `name` is longer than 200 characters",
            ));
        }
        Ok((!name.is_empty()).then(|| name.to_string()))
    }

    /// A trimmed string field that, when given, is not empty.
    fn non_empty(key: &str, value: Option<String>) -> Result<Option<String>, AppError> {
        match value {
            None => Ok(None),
            Some(s) if s.trim().is_empty() => Err(AppError::unprocessable(format!(
                "field `{key}` must be a non-empty string"
            ))),
            Some(s) => Ok(Some(s.trim().to_string())),
        }
    }

    /// `llm_base_url`: an http(s) URL of an OpenAI-compatible API, checked here, once.
    fn llm_base_url(url: Option<String>) -> Result<Option<String>, AppError> {
        let Some(url) = url else {
            return Ok(None);
        };
        let url = url.trim();
        if url.is_empty() {
            return Err(AppError::unprocessable(
                "field `llm_base_url` must be a URL string",
            ));
        }
        crate::llm::LlmConfig::check_endpoint(url)
            .map_err(|e| AppError::unprocessable(format!("field `llm_base_url`: {e}")))?;
        Ok(Some(url.to_string()))
    }

    /// `kind: "eval"`: score predictions given inline.
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Eval {
        #[allow(dead_code)]
        kind: String,
        name: Option<String>,
        /// Rows as the predictions file has them (read by the file reader's own row parser).
        predictions: Option<Vec<Value>>,
        metrics: Option<Metrics>,
        settings: Option<Settings>,
        #[serde(default)]
        score_references: bool,
        model: Option<String>,
        adapter: Option<String>,
        dataset: Option<String>,
        llm_base_url: Option<String>,
    }

    impl Eval {
        pub fn into_request(self) -> Result<EvalRequest, AppError> {
            let rows = self.predictions.ok_or_else(|| {
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
            let metrics = self.metrics.ok_or_else(|| {
                AppError::unprocessable("field `metrics` must be an array of metric plugin names")
            })?;
            let mut metadata = BTreeMap::new();
            for (key, value) in [
                ("model", self.model),
                ("adapter", self.adapter),
                ("dataset", self.dataset),
            ] {
                if let Some(v) = value {
                    metadata.insert(key.to_string(), v);
                }
            }
            Ok(EvalRequest {
                name: run_name(self.name)?.unwrap_or_else(|| "eval".to_string()),
                rows: parsed,
                metrics: metrics.names(),
                settings: settings(self.settings),
                score_references: self.score_references,
                metadata,
                llm_base_url: llm_base_url(self.llm_base_url)?,
            })
        }
    }

    /// `kind: "train"`: a training config of HF TrainingArguments / LoraConfig names, checked
    /// by the job queue against the config type.
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Train {
        #[allow(dead_code)]
        kind: String,
        name: Option<String>,
        config: Option<serde_json::Map<String, Value>>,
    }

    impl Train {
        pub fn into_submission(self) -> Result<TrainSubmission, AppError> {
            Ok(TrainSubmission {
                name: run_name(self.name)?,
                config: Value::Object(self.config.unwrap_or_default()),
            })
        }
    }

    /// One inline row of a generate run.
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Input {
        id: Id,
        source: String,
        reference: Option<String>,
    }

    /// A row id: a string, or a number kept as its text.
    #[derive(Debug, Deserialize)]
    #[serde(untagged)]
    enum Id {
        Text(String),
        Number(serde_json::Number),
    }

    /// `kind: "generate"`: predictions from a model (and adapter) on a dataset split or on
    /// inline rows, with every decoding setting, optionally scored.
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Generate {
        #[allow(dead_code)]
        kind: String,
        name: Option<String>,
        model: Option<String>,
        adapter: Option<String>,
        dataset: Option<String>,
        split: Option<String>,
        inputs: Option<Vec<Input>>,
        formatter: Option<String>,
        limit: Option<usize>,
        max_new_tokens: Option<usize>,
        temperature: Option<f32>,
        top_p: Option<f32>,
        top_k: Option<usize>,
        repetition_penalty: Option<f32>,
        seed: Option<u64>,
        batch_size: Option<usize>,
        metrics: Option<Metrics>,
        settings: Option<Settings>,
        #[serde(default)]
        score_references: bool,
        llm_base_url: Option<String>,
    }

    impl Generate {
        /// The request, naming the field at fault; what needs the plugins, the store or files
        /// is checked by the job queue.
        pub fn into_request(self) -> Result<GenerateRequest, AppError> {
            let mut request = GenerateRequest {
                name: run_name(self.name)?.unwrap_or_default(),
                llm_base_url: llm_base_url(self.llm_base_url)?,
                model: non_empty("model", self.model)?,
                adapter: non_empty("adapter", self.adapter)?,
                dataset: non_empty("dataset", self.dataset)?,
                split: non_empty("split", self.split)?,
                limit: self.limit,
                score_references: self.score_references,
                settings: settings(self.settings),
                ..Default::default()
            };
            if let Some(f) = non_empty("formatter", self.formatter)? {
                request.formatter = f;
            }
            let s = &mut request.sampling;
            if let Some(n) = self.max_new_tokens {
                s.max_new_tokens = n;
            }
            if let Some(t) = self.temperature {
                s.temperature = t;
            }
            s.top_p = self.top_p;
            s.top_k = self.top_k;
            if let Some(p) = self.repetition_penalty {
                s.repetition_penalty = p;
            }
            if let Some(seed) = self.seed {
                s.seed = seed;
            }
            if let Some(b) = self.batch_size {
                s.batch_size = b;
            }
            s.validate()
                .map_err(|e| AppError::unprocessable(e.to_string()))?;
            if let Some(inputs) = self.inputs {
                if inputs.is_empty() {
                    return Err(AppError::unprocessable("field `inputs` is empty"));
                }
                request.inputs = inputs
                    .into_iter()
                    .map(|i| InputRow {
                        id: match i.id {
                            Id::Text(s) => s,
                            Id::Number(n) => n.to_string(),
                        },
                        source: i.source,
                        reference: i.reference,
                    })
                    .collect();
            }
            if let Some(m) = self.metrics {
                request.metrics = m.names();
            }
            Ok(request)
        }
    }

    /// `PATCH /api/runs/:id`: new `tags` and/or `notes`.
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Patch {
        tags: Option<Vec<String>>,
        notes: Option<String>,
    }

    impl Patch {
        /// `(tags, notes)`, each `None` when not given; tags trimmed and deduplicated.
        pub fn checked(self) -> Result<(Option<Vec<String>>, Option<String>), AppError> {
            let tags = match self.tags {
                None => None,
                Some(items) => {
                    let mut tags: Vec<String> = Vec::new();
                    for (i, tag) in items.iter().enumerate() {
                        let tag = tag.trim();
                        if tag.is_empty() {
                            return Err(AppError::unprocessable(format!("tags[{i}] is empty")));
                        }
                        if tag.chars().count() > MAX_TAG_LEN {
                            return Err(AppError::unprocessable(format!(
                                "tags[{i}] is longer than {MAX_TAG_LEN} characters"
                            )));
                        }
                        if !tags.iter().any(|t| t == tag) {
                            tags.push(tag.to_string());
                        }
                    }
                    if tags.len() > MAX_TAGS {
                        return Err(AppError::unprocessable(format!(
                            "at most {MAX_TAGS} tags, not {}",
                            tags.len()
                        )));
                    }
                    Some(tags)
                }
            };
            if let Some(n) = &self.notes
                && n.chars().count() > MAX_NOTES_LEN
            {
                return Err(AppError::unprocessable(format!(
                    "field `notes` is longer than {MAX_NOTES_LEN} characters"
                )));
            }
            Ok((tags, self.notes))
        }
    }
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
                            RunEvent::Step { .. } => "step",
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
