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
    #[arg(long, default_value = adapterlab_model::commands::DEFAULT_MODEL)]
    pub model: String,
}

pub fn run(args: ServeArgs, ctx: &Context) -> Result<()> {
    let (token, generated) = crate::server::resolve_token(&ctx.data_dir, args.token.clone())?;
    let store = ctx.store()?;
    let runtime = ctx.runtime()?;
    let registry = ctx.registry()?;
    let tokio = tokio::runtime::Runtime::new().context("failed to start the async runtime")?;
    let _guard = tokio.enter();
    let state = crate::server::state(
        ctx.data_dir.clone(),
        store,
        runtime,
        registry,
        token.clone(),
        args.model.clone(),
    )?;
    let data_dir = ctx.data_dir.root().display().to_string();
    tokio.block_on(crate::server::serve(state, args.addr, move |addr| {
        if !addr.ip().is_loopback() {
            eprintln!("warning: listening on {addr}, which is not loopback: anyone who can reach it can read your runs");
        }
        println!("adapterlab {} serving on http://{addr}/", env!("CARGO_PKG_VERSION"));
        println!("data directory: {data_dir}");
        println!("open http://{addr}/#token={token}");
        println!("OpenAI-compatible API: OPENAI_BASE_URL=http://{addr}/v1 OPENAI_API_KEY=<the token>");
        if generated {
            println!("(a new API token was generated and stored in the data directory's `token` file)");
        }
    }))
}
