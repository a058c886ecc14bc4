//! The command line: one module per subcommand, each an `Args` struct and a `run` function.
//! This module only dispatches and owns how errors and output look.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::paths::DataDir;

mod bench;
mod eval;
mod model;
mod output;
mod plugins;
mod push;
mod remote;
mod report;
mod runs;
mod serve;
mod store;
mod train;

pub use output::print_error;
pub use push::{PushArgs, prepare as push_request};

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
    /// Serve the dashboard and its API (the main command): launch runs, watch them, compare
    /// adapter versions.
    Serve(serve::ServeArgs),
    /// Score a predictions file with metric plugins (ROUGE, BLEU, BERTScore, LLM judge…)
    /// and store the run.
    Eval(eval::EvalArgs),
    /// QLoRA supervised fine-tuning: HF-named keys, PEFT adapters, resumable checkpoints.
    Train(train::TrainArgs),
    /// List, show and compare stored runs.
    #[command(subcommand)]
    Runs(runs::RunsCommand),
    /// Render a run, or a comparison of runs, as Markdown, HTML or CSV (reporter plugins).
    Report(report::ReportArgs),
    /// List, check and install plugins (WebAssembly components).
    #[command(subcommand)]
    Plugins(plugins::PluginsCommand),
    /// Publish an adapter (or a merged model) with its model card and stored evaluation
    /// results to the Hugging Face Hub (HF_TOKEN, HF_ENDPOINT).
    Push(push::PushArgs),
    /// Check the store: read every record, report what cannot be read, quarantine it.
    #[command(subcommand)]
    Store(store::StoreCommand),
    /// Count trainable and all parameters of a LoRA setup from config.json alone, as PEFT's
    /// print_trainable_parameters does.
    Params(model::ParamsArgs),
    /// Generate with a base model and optional adapter (KV-cached, HF decoding semantics).
    Generate(model::GenerateArgs),
    /// Mean cross-entropy of a model (and adapter) on rows, optionally completion-only.
    EvalLoss(model::EvalLossArgs),
    /// Quantize a checkpoint to NF4 with double quantization (bitsandbytes serialization).
    Quantize(model::QuantizeArgs),
    /// Merge a PEFT adapter into its base model and save the merged model.
    Merge(model::MergeArgs),
    /// Write the base weights adapterlab trains on (e.g. SmolLM2 dequantized from its GGUF) as
    /// an HF checkpoint folder, so the Python stack can start from identical bits.
    Export(model::ExportArgs),
    /// Measure training and generation speed on random tokens, as the Python reference
    /// benchmark does (scripts/bench/gpu_qlora.sh runs both).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

/// An error that asks for a particular exit code (documented per command), so scripts can
/// tell, say, a metric that failed everywhere from a bad command line.
#[derive(Debug)]
pub struct ExitCode {
    pub code: u8,
    pub message: String,
}

impl ExitCode {
    pub fn new(code: u8, message: String) -> Self {
        ExitCode { code, message }
    }
}

impl std::fmt::Display for ExitCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ExitCode {}

/// Everything a command needs from the environment, resolved lazily and once.
pub struct Context {
    pub data_dir: DataDir,
    runtime: std::sync::OnceLock<crate::plugin::Runtime>,
    registry: std::sync::OnceLock<crate::plugin::Registry>,
    store: std::sync::OnceLock<crate::store::Store>,
}

impl Context {
    pub fn new(data_dir: DataDir) -> Self {
        Context {
            data_dir,
            runtime: Default::default(),
            registry: Default::default(),
            store: Default::default(),
        }
    }

    /// The plugin runtime, caching compiled components in the data directory.
    pub fn runtime(&self) -> Result<crate::plugin::Runtime> {
        if let Some(r) = self.runtime.get() {
            return Ok(r.clone());
        }
        let r = crate::plugin::Runtime::new(
            Some(self.data_dir.component_cache()),
            crate::plugin::Limits::from_env(),
        )?;
        Ok(self.runtime.get_or_init(|| r).clone())
    }

    /// Built-in plugins plus those installed in the data directory.
    pub fn registry(&self) -> Result<crate::plugin::Registry> {
        if let Some(r) = self.registry.get() {
            return Ok(r.clone());
        }
        let r = crate::plugin::Registry::load(&self.runtime()?, &self.data_dir.plugins())?;
        Ok(self.registry.get_or_init(|| r).clone())
    }

    /// The services behind `embed` and `chat` for an evaluation.
    pub fn eval_services(
        &self,
        handle: tokio::runtime::Handle,
        store: &crate::store::Store,
    ) -> Result<crate::eval::services::EvalServices> {
        let llm =
            crate::llm::LlmClient::new(crate::llm::LlmConfig::from_env(), Some(store.clone()))?;
        Ok(crate::eval::services::EvalServices::new(
            Some((llm, handle)),
            crate::eval::services::default_encoders(&self.data_dir),
        ))
    }

    pub fn store(&self) -> Result<crate::store::Store> {
        if let Some(s) = self.store.get() {
            return Ok(s.clone());
        }
        let s = crate::store::Store::open(&self.data_dir.store())?;
        // A command that opens the store holds its lock, so any run still `running` belongs
        // to a process that died: it reads as interrupted from now on.
        if let Err(e) = s.interrupt_orphans() {
            tracing::warn!("cannot mark the runs of dead processes interrupted: {e:#}");
        }
        Ok(self.store.get_or_init(|| s).clone())
    }
}

pub fn run(cli: Cli) -> Result<()> {
    let ctx = Context::new(DataDir::resolve(cli.data_dir.as_deref())?);
    match cli.command {
        Command::Serve(args) => serve::run(args, &ctx),
        Command::Eval(args) => eval::run(args, &ctx),
        Command::Train(args) => train::run(args, &ctx),
        Command::Runs(cmd) => runs::run(cmd, &ctx),
        Command::Report(args) => report::run(args, &ctx),
        Command::Plugins(cmd) => plugins::run(cmd, &ctx),
        Command::Store(cmd) => store::run(cmd, &ctx),
        Command::Push(args) => push::run(args, &ctx),
        Command::Params(args) => model::params(args, &ctx),
        Command::Generate(args) => model::generate(args, &ctx),
        Command::EvalLoss(args) => model::eval_loss(args, &ctx),
        Command::Quantize(args) => model::quantize(args, &ctx),
        Command::Merge(args) => model::merge(args, &ctx),
        Command::Export(args) => model::export(args, &ctx),
        Command::Bench(cmd) => bench::run(cmd, &ctx),
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
