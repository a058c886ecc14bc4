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
    /// Set when this process was executed by its predecessor to reopen a store that had
    /// failed a write (see [`serve_on`]).
    pub restart_reason: Option<String>,
    /// The runs that predecessor had stopped because the disk was full.
    pub restart_failed: Vec<String>,
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
            restart_reason: options.restart_reason,
            restart_failed: options.restart_failed,
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
    if let Ok(t) = std::fs::read_to_string(&path)
        && !t.trim().is_empty()
    {
        return Ok((t.trim().to_string(), false));
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
    // tokio's bind sets SO_REUSEADDR, so a restart is not refused for the old connections'
    // TIME_WAIT.
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("failed to listen on {addr}"))?
        .into_std()?;
    serve_on(state, listener, announce).await
}

/// [`serve`] on a listening socket already open (one inherited from the previous process).
///
/// When the store fails a write and cannot recover (sled keeps the error until it is
/// reopened; a disk filled to its last byte does this), the jobs are stopped and the process
/// executes itself again with the same arguments, handing over the listening socket: the
/// port stays, connections made meanwhile wait in its backlog, and the new process opens
/// the store afresh and marks the runs that were running failed.
pub async fn serve_on(
    state: AppState,
    listener: std::net::TcpListener,
    announce: impl FnOnce(SocketAddr),
) -> anyhow::Result<()> {
    listener.set_nonblocking(true)?;
    // A second descriptor of the socket, kept for a re-execution (close-on-exec until then).
    let kept = listener.try_clone()?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    announce(listener.local_addr()?);
    let jobs = state.jobs.clone();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut rx = stop_rx;
    let server = axum::serve(listener, app(state)).with_graceful_shutdown(async move {
        let _ = rx.wait_for(|stop| *stop).await;
    });
    let mut served = tokio::spawn(async move { server.await });
    let restart = tokio::select! {
        r = &mut served => {
            r??;
            return Ok(());
        }
        _ = shutdown_signal() => None,
        reason = jobs.store_broken() => Some(reason),
    };
    let _ = stop_tx.send(true);
    tracing::info!("stopping: running jobs store their work and stop");
    let stopping = jobs.clone();
    let stopped = tokio::task::spawn_blocking(move || stopping.shutdown()).await?;
    // In-flight requests get a moment to finish; an event stream of a run still queued would
    // otherwise hold the shutdown open for ever.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), served).await;
    match restart {
        None => stopped,
        Some(reason) => reexec(kept, &reason, &jobs.disk_stopped()),
    }
}

/// Replaces this process by a new run of the same command, which inherits `listener`.
#[cfg(unix)]
fn reexec(listener: std::net::TcpListener, reason: &str, failed: &[String]) -> anyhow::Result<()> {
    use std::os::unix::io::AsRawFd as _;
    use std::os::unix::process::CommandExt as _;
    let fd = listener.as_raw_fd();
    // SAFETY: clears close-on-exec on a descriptor this function owns, so it survives exec.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } != 0 {
        anyhow::bail!(
            "cannot hand the listening socket over: {}",
            std::io::Error::last_os_error()
        );
    }
    let exe = std::env::current_exe().context("cannot find this program to execute it again")?;
    let error = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(LISTEN_FD_ENV, fd.to_string())
        .env(RESTART_REASON_ENV, reason)
        .env(RESTART_FAILED_ENV, failed.join(","))
        .exec();
    Err(anyhow::Error::from(error)
        .context("failed to execute the server again to reopen its store"))
}

#[cfg(not(unix))]
fn reexec(
    _listener: std::net::TcpListener,
    reason: &str,
    _failed: &[String],
) -> anyhow::Result<()> {
    anyhow::bail!("the store cannot write any more ({reason}); restart the server")
}

/// The listening socket a server inherits from its predecessor (see [`serve_on`]).
pub const LISTEN_FD_ENV: &str = "ADAPTERLAB_LISTEN_FD";
/// Why the predecessor executed this server.
pub const RESTART_REASON_ENV: &str = "ADAPTERLAB_RESTART_REASON";
/// The runs the predecessor stopped for a full disk (comma-separated ids): they end failed.
pub const RESTART_FAILED_ENV: &str = "ADAPTERLAB_RESTART_FAILED";

/// The listening socket inherited from a predecessor, if this process is one's successor.
pub fn inherited_listener() -> Option<std::net::TcpListener> {
    #[cfg(unix)]
    {
        use std::os::unix::io::FromRawFd as _;
        let fd: i32 = std::env::var(LISTEN_FD_ENV).ok()?.parse().ok()?;
        // SAFETY: the predecessor handed this descriptor over for this purpose; it is checked
        // to be a listening TCP socket before use.
        let listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
        listener.local_addr().ok()?;
        Some(listener)
    }
    #[cfg(not(unix))]
    None
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
