//! The command line: one module per subcommand, each an `Args` struct and a `run` function.
//! This module only dispatches and owns how errors and output look.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::paths::DataDir;

mod output;
mod plugins;

pub use output::print_error;

#[derive(Debug, Parser)]
#[command(
    name = "adapterlab",
    version,
    about = "Fine-tune and evaluate LLM adapters: QLoRA training, generation, metric plugins, a dashboard",
    long_about = None,
    propagate_version = true
)]
pub struct Cli {
    /// Data directory (store, plugins, caches). Default: the platform's data dir,
    /// e.g. ~/.local/share/adapterlab.
    #[arg(long, global = true, env = "ADAPTERLAB_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// More log output (-v debug, -vv trace). RUST_LOG overrides it.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// List, check and install plugins (WebAssembly components).
    #[command(subcommand)]
    Plugins(plugins::PluginsCommand),
}

/// Everything a command needs from the environment, resolved once.
pub struct Context {
    pub data_dir: DataDir,
}

pub fn run(cli: Cli) -> Result<()> {
    let ctx = Context { data_dir: DataDir::resolve(cli.data_dir.as_deref())? };
    match cli.command {
        Command::Plugins(cmd) => plugins::run(cmd, &ctx),
    }
}

pub fn init_tracing(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 => "warn,adapterlab=info",
        1 => "info,adapterlab=debug",
        _ => "debug,adapterlab=trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}
