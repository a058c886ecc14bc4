//! `adapterlab serve`: the dashboard and its API.

use std::net::SocketAddr;

use anyhow::{Context as _, Result};
use clap::Args;

use crate::cli::Context;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on. Loopback by default; anything else exposes the API to the network.
    #[arg(long, default_value = "127.0.0.1:7860")]
    pub addr: SocketAddr,

    /// Token that mutating API calls must present as `Authorization: Bearer TOKEN`.
    /// Default: generated on first start and kept in the data directory's `token` file.
    #[arg(long, env = "ADAPTERLAB_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// The base model served under /v1 (OpenAI-compatible) and used by generate runs by
    /// default: `smollm2`, a checkpoint folder, a `.gguf` file or a hub id. Loaded on first use
    /// and kept; stored adapters are served on top of it by name.
    #[arg(long, default_value = adapterlab_model::engine::DEFAULT_MODEL)]
    pub model: String,

    /// Accept requests whose `Host` header names NAME (repeatable). Only loopback names
    /// (localhost, 127.0.0.1, [::1]) are accepted by default, which defeats DNS rebinding;
    /// when listening on another address, allow the names clients use to reach it.
    #[arg(long = "allowed-host", value_name = "NAME")]
    pub allowed_hosts: Vec<String>,

    /// Allow datasets (a training `dataset`, a generate run's `dataset`) from files under DIR
    /// (repeatable). By default only files inside the data directory, and the bundled
    /// dataset, may be used: a dataset's rows become samples anyone with the token can read.
    #[arg(long = "allow-path", value_name = "DIR")]
    pub allow_paths: Vec<std::path::PathBuf>,

    /// The store's page cache, in MiB. It bounds most of the server's memory beside the
    /// models: RSS stays within roughly this plus the loaded models plus ~200 MiB.
    #[arg(long, default_value_t = 64, value_name = "MIB")]
    pub store_cache_mib: u64,
}

pub fn run(args: ServeArgs, ctx: &Context) -> Result<()> {
    restrict_files(ctx.data_dir.root());
    tune_allocator();
    let explicit = args.token.is_some();
    let (token, generated) = crate::server::resolve_token(&ctx.data_dir, args.token.clone())?;
    let store = crate::store::Store::open_with_cache(
        &ctx.data_dir.store(),
        args.store_cache_mib.clamp(1, 1 << 20) << 20,
    )?;
    let runtime = ctx.runtime()?;
    let registry = ctx.registry()?;
    let tokio = tokio::runtime::Runtime::new().context("failed to start the async runtime")?;
    let _guard = tokio.enter();
    let state = crate::server::state_with(
        ctx.data_dir.clone(),
        store,
        runtime,
        registry,
        token.clone(),
        args.model.clone(),
        crate::server::ServeOptions {
            allowed_hosts: args.allowed_hosts.clone(),
            allow_paths: args.allow_paths.clone(),
            watch_disk: true,
            restart_reason: std::env::var(crate::server::RESTART_REASON_ENV).ok(),
            restart_failed: std::env::var(crate::server::RESTART_FAILED_ENV)
                .unwrap_or_default()
                .split(',')
                .filter(|id| !id.is_empty())
                .map(str::to_string)
                .collect(),
        },
    )?;
    let token_file = ctx.data_dir.root().join("token");
    let data_dir = ctx.data_dir.root().display().to_string();
    let inherited = crate::server::inherited_listener();
    let listener = match inherited {
        Some(l) => l,
        // tokio's bind sets SO_REUSEADDR, so a restart is not refused for the old
        // connections' TIME_WAIT.
        None => tokio
            .block_on(tokio::net::TcpListener::bind(args.addr))
            .with_context(|| format!("failed to listen on {}", args.addr))?
            .into_std()?,
    };
    let announced = ctx.data_dir.clone();
    let served = tokio.block_on(crate::server::serve_on(state, listener, move |addr| {
        // Read-only commands find the server here while it holds the store (cli/remote.rs).
        if let Err(e) = crate::cli::remote::announce(&announced, addr) {
            eprintln!("warning: {e:#}; `adapterlab report` and `runs` cannot reach this server");
        }
        if !addr.ip().is_loopback() {
            eprintln!("warning: listening on {addr}, which is not loopback: anyone who can reach it and holds the token can use it; requests must name a host allowed with --allowed-host");
        }
        println!("adapterlab {} serving on http://{addr}/", env!("CARGO_PKG_VERSION"));
        println!("data directory: {data_dir}");
        // The token is printed only when it was just made: one given by the operator or
        // kept from before stays out of logs (systemd's journal, CI output).
        if generated {
            println!("open http://{addr}/#token={token}");
            println!("(a new API token was generated and stored in {})", token_file.display());
        } else if explicit {
            println!("open http://{addr}/#token=<the token given with --token or ADAPTERLAB_TOKEN>");
        } else {
            println!("open http://{addr}/#token=<the token in {}>", token_file.display());
        }
        println!("OpenAI-compatible API: OPENAI_BASE_URL=http://{addr}/v1 OPENAI_API_KEY=<the token>");
    }));
    crate::cli::remote::withdraw(&ctx.data_dir);
    served
}

/// The data directory holds every run's sources and predictions and the API token: only its
/// owner may read it. New files get 0600 and folders 0700 (umask); existing ones are
/// tightened (the root, and the store's files).
fn restrict_files(root: &std::path::Path) {
    #[cfg(unix)]
    {
        // SAFETY: umask only sets the process's file mode creation mask.
        unsafe {
            libc::umask(0o077);
        }
        fn walk(path: &std::path::Path, depth: usize) {
            use std::os::unix::fs::PermissionsExt;
            let Ok(meta) = std::fs::symlink_metadata(path) else {
                return;
            };
            if meta.is_dir() {
                let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700));
                if depth > 0 {
                    for entry in std::fs::read_dir(path).into_iter().flatten().flatten() {
                        walk(&entry.path(), depth - 1);
                    }
                }
            } else if meta.is_file() {
                let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
            }
        }
        walk(root, 0);
        walk(&root.join("token"), 0);
        walk(&root.join("store"), 3);
    }
}

/// glibc gives every thread that allocates its own arena, and never returns most of them:
/// with a thread per job, RSS grew by hundreds of MB per job. Two arenas keep the memory of
/// finished jobs reusable.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's tuning; M_ARENA_MAX is -8 in glibc.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}
