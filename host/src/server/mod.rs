//! The server: a JSON API, Server-Sent Events for live runs, an OpenAI-compatible API under
//! `/v1` for the served model and the stored adapters, and the dashboard from `web/`, over the
//! store and a persisted job queue.
//!
//! **Architecture Invariant:** only this module knows HTTP as a server. Handlers translate
//! between HTTP and the library (store, eval, jobs); they hold no logic of their own.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use anyhow::Context as _;
use axum::Router;

use crate::paths::DataDir;
use crate::plugin::{Registry, Runtime};
use crate::store::Store;

mod api;
mod assets;
mod auth;
pub mod disk;
mod error;
pub mod jobs;
mod openai;
mod openapi;

pub use error::AppError;

/// Shared state of every handler. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub runtime: Runtime,
    pub registry: Arc<RwLock<Registry>>,
    pub data_dir: DataDir,
    pub token: Arc<String>,
    pub jobs: jobs::Jobs,
    /// `Host` names accepted besides the loopback ones (`serve --allowed-host`).
    pub allowed_hosts: Arc<Vec<String>>,
}

/// What `serve`'s flags allow beyond the safe defaults.
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    /// `--allowed-host NAME`: `Host` names accepted besides localhost, 127.0.0.1 and [::1].
    pub allowed_hosts: Vec<String>,
    /// `--allow-path DIR`: folders outside the data directory whose files may be datasets.
    pub allow_paths: Vec<std::path::PathBuf>,
    /// Watch the data directory's free space: stop writing before the disk is full.
    pub watch_disk: bool,
}

/// Largest request body: a Python plugin component is ~18 MB, a predictions upload can be
/// large too.
pub const BODY_LIMIT: usize = 64 << 20;

pub fn app(state: AppState) -> Router {
    Router::new()
        .merge(api::routes())
        .merge(openai::routes())
        .merge(assets::routes())
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ))
        // Outermost: a foreign Host is refused before anything else looks at the request.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::check_host,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

/// Build the state: open the store, load plugins, mark jobs a dead process left running as
/// interrupted, re-queue queued ones, start the workers. `model` is the base model served
/// under `/v1` and used by default (loaded on first use).
pub fn state(
    data_dir: DataDir,
    store: Store,
    runtime: Runtime,
    registry: Registry,
    token: String,
    model: String,
) -> anyhow::Result<AppState> {
    state_with(
        data_dir,
        store,
        runtime,
        registry,
        token,
        model,
        ServeOptions::default(),
    )
}

/// [`state`] with the operator's [`ServeOptions`].
pub fn state_with(
    data_dir: DataDir,
    store: Store,
    runtime: Runtime,
    registry: Registry,
    token: String,
    model: String,
    options: ServeOptions,
) -> anyhow::Result<AppState> {
    let registry = Arc::new(RwLock::new(registry));
    let models = Arc::new(crate::infer::Models::new(
        crate::infer::model_runtime(data_dir.assets())?,
        model,
    ));
    let jobs = jobs::Jobs::start_with(
        store.clone(),
        registry.clone(),
        data_dir.clone(),
        models,
        jobs::Policy {
            allow_paths: options.allow_paths,
            watch_disk: options.watch_disk,
        },
    )?;
    Ok(AppState {
        store,
        runtime,
        registry,
        data_dir,
        token: Arc::new(token),
        jobs,
        allowed_hosts: Arc::new(options.allowed_hosts),
    })
}

/// The token for mutating calls: `explicit` (flag or env), else the one stored in the data
/// directory, else a new one stored there.
pub fn resolve_token(
    data_dir: &DataDir,
    explicit: Option<String>,
) -> anyhow::Result<(String, bool)> {
    if let Some(t) = explicit.filter(|t| !t.trim().is_empty()) {
        return Ok((t.trim().to_string(), false));
    }
    let path = data_dir.root().join("token");
    if let Ok(t) = std::fs::read_to_string(&path) {
        if !t.trim().is_empty() {
            return Ok((t.trim().to_string(), false));
        }
    }
    let token: String = {
        use rand::Rng;
        let bytes: [u8; 24] = rand::rng().random();
        hex::encode(bytes)
    };
    std::fs::write(&path, &token).with_context(|| format!("failed to write {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
    }
    Ok((token, true))
}

/// Serve until SIGTERM or SIGINT (Ctrl-C). Prints the address once listening. On either
/// signal it stops accepting, lets running jobs store what they have finished and stop
/// (marked `interrupted`, resumable), flushes the store and returns, so the process exits 0.
pub async fn serve(
    state: AppState,
    addr: SocketAddr,
    announce: impl FnOnce(SocketAddr),
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("failed to listen on {addr}"))?;
    announce(listener.local_addr()?);
    let jobs = state.jobs.clone();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let mut rx = stop_rx.clone();
    let server = axum::serve(listener, app(state)).with_graceful_shutdown(async move {
        let _ = rx.wait_for(|stop| *stop).await;
    });
    let mut served = tokio::spawn(async move { server.await });
    let mut rx = stop_rx;
    tokio::select! {
        r = &mut served => {
            r??;
            return Ok(());
        }
        _ = rx.wait_for(|stop| *stop) => {}
    }
    tracing::info!("stopping: running jobs store their work and stop");
    let stopping = jobs.clone();
    tokio::task::spawn_blocking(move || stopping.shutdown()).await??;
    // In-flight requests get a moment to finish; an event stream of a run still queued would
    // otherwise hold the shutdown open for ever.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), served).await;
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                return;
            }
            Err(e) => tracing::warn!("cannot listen for SIGTERM: {e}"),
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
