//! `adapterlab train`: QLoRA supervised fine-tuning with HF-named keys, recorded as a `train`
//! run in the store.

use std::io::IsTerminal as _;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::cli::Context;
use crate::train::record;
use crate::train::{TrainConfig, TrainEnv};

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// A TOML file of HF TrainingArguments / SFTConfig / LoraConfig ([lora]) /
    /// BitsAndBytesConfig ([quantization]) keys. Without one, the reference notebook's defaults
    /// on SmolLM2 and the bundled dataset.
    #[arg(long, value_name = "FILE.toml")]
    pub config: Option<PathBuf>,

    /// Override a key, KEY=VALUE (repeatable): max_steps=50, lora.r=8, lora.target_modules=q_proj,v_proj.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub settings: Vec<String>,

    /// Continue from `latest` (the newest checkpoint-N in output_dir) or a checkpoint folder.
    #[arg(long, value_name = "latest|DIR")]
    pub resume_from_checkpoint: Option<String>,

    /// A name for the run in the store; also the name its adapter is stored (and served) under
    /// (default: the output folder's name).
    #[arg(long)]
    pub name: Option<String>,

    /// Stop after this many optimizer steps of this invocation, with a checkpoint at that
    /// step, and continue later with `--resume-from-checkpoint latest` (time-sliced or
    /// preemptible machines); the resumed run reproduces the uninterrupted one.
    #[arg(long, value_name = "N")]
    pub stop_after_steps: Option<usize>,
}

pub fn run(args: TrainArgs, ctx: &Context) -> Result<()> {
    let config = TrainConfig::load(args.config.as_deref(), &args.settings)?;
    let store = ctx.store()?;
    let run = record::create_run(&store, &config, args.name)?;
    eprintln!(
        "run {} · model {} · dataset {} → {}",
        run.id, config.model_name_or_path, config.dataset, config.output_dir
    );
    let env = TrainEnv {
        assets_dir: ctx.data_dir.assets(),
        registry: Some(ctx.registry()?),
        resume_from_checkpoint: args.resume_from_checkpoint,
        progress_bar: std::io::stderr().is_terminal(),
        stop_after_steps: args.stop_after_steps,
        checkpoint_on_stop: args
            .stop_after_steps
            .map(|_| std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true))),
        ..Default::default()
    };
    let outcome = record::run_recorded(&store, &run.id, &config, env)?;
    store.flush()?;
    for entry in &outcome.log_history {
        println!("{entry}");
    }
    match &outcome.adapter_dir {
        Some(dir) => eprintln!(
            "trained {} steps; adapter in {}{}",
            outcome.global_step,
            dir.display(),
            match (outcome.first_eval_loss, outcome.final_eval_loss) {
                (Some(a), Some(b)) => format!("; validation loss {a:.4} → {b:.4}"),
                _ => String::new(),
            }
        ),
        None => eprintln!(
            "stopped at step {} of {}; resume with --resume-from-checkpoint latest",
            outcome.global_step, outcome.max_steps
        ),
    }
    Ok(())
}
