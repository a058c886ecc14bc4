//! `adapterlab train`: QLoRA supervised fine-tuning with HF-named keys, recorded as a `train`
//! run in the store.

use std::io::IsTerminal as _;
use std::path::PathBuf;

use std::ffi::OsString;

use anyhow::{Context as _, Result};
use clap::Args;

use crate::cli::Context;
use crate::train::dist::topology::{self, LaunchFlags, Role, Topology};
use crate::train::dist::{Comm, launch, rendezvous};
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

    /// Data parallelism, as torchrun: start N worker processes on this host, one per GPU
    /// (ranks node_rank × N … node_rank × N + N − 1), and fail the run if one fails. Without
    /// it, torchrun's RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT or Slurm's
    /// SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID (with MASTER_ADDR) make this process one rank.
    #[arg(long, value_name = "N")]
    pub nproc_per_node: Option<usize>,

    /// Hosts taking part (each runs this command with its own --node-rank).
    #[arg(long, value_name = "K")]
    pub nnodes: Option<usize>,

    /// This host's place among the --nnodes hosts (0 hosts rank 0).
    #[arg(long, value_name = "R")]
    pub node_rank: Option<usize>,

    /// The address of the host of rank 0, which every rank dials (default 127.0.0.1).
    #[arg(long, value_name = "HOST")]
    pub master_addr: Option<String>,

    /// The port rank 0 listens on for the rendezvous (default 29500).
    #[arg(long, value_name = "PORT")]
    pub master_port: Option<u16>,
}

/// The launcher's flags: the workers get the command line without them.
const LAUNCH_FLAGS: [&str; 5] = [
    "--nproc-per-node",
    "--nnodes",
    "--node-rank",
    "--master-addr",
    "--master-port",
];

pub fn run(args: TrainArgs, ctx: &Context) -> Result<()> {
    let flags = LaunchFlags {
        nproc_per_node: args.nproc_per_node,
        nnodes: args.nnodes,
        node_rank: args.node_rank,
        master_addr: args.master_addr.clone(),
        master_port: args.master_port,
    };
    let topo = match topology::resolve(&flags, |k| std::env::var(k).ok())? {
        Role::Launcher {
            nproc_per_node,
            nnodes,
            node_rank,
            master_addr,
            master_port,
        } => {
            // Bad settings fail here once, not in every worker.
            TrainConfig::load(args.config.as_deref(), &args.settings)?;
            let launch = launch::Launch {
                nproc_per_node,
                nnodes,
                node_rank,
                master_addr,
                master_port,
            };
            let exe =
                std::env::current_exe().context("cannot find this program to start workers")?;
            return launch::run(&launch, &exe, &worker_args(std::env::args_os().skip(1)));
        }
        Role::Single => None,
        Role::Worker(topo) => Some(topo),
    };
    let config = TrainConfig::load(args.config.as_deref(), &args.settings)?;
    let comm = match &topo {
        Some(topo) => Some(communicator(topo)?),
        None => None,
    };
    if let Some(topo) = topo.as_ref().filter(|t| !t.is_main()) {
        // Rank 0 owns the store (sled admits one process) and the terminal.
        let env = TrainEnv {
            assets_dir: ctx.data_dir.assets(),
            registry: Some(ctx.registry()?),
            resume_from_checkpoint: args.resume_from_checkpoint,
            stop_after_steps: args.stop_after_steps,
            comm,
            device_ordinal: topo.local_rank,
            ..Default::default()
        };
        crate::train::run(&config, &env)?;
        return Ok(());
    }
    crate::train::prepare::check(&config, &ctx.registry()?, &ctx.data_dir.assets())?;
    let store = ctx.store()?;
    let run = record::create_run(&store, &config, args.name)?;
    if let Some(topo) = &topo {
        store.update_run(&run.id, |r| {
            r.metadata
                .insert("world_size".into(), topo.world_size.to_string());
        })?;
    }
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
        device_ordinal: topo.as_ref().map_or(0, |t| t.local_rank),
        comm,
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

/// This rank's communicator: NCCL between GPUs when the build has it, else the TCP one
/// (CPU training, and GPUs in a build without NCCL, reducing through rank 0's host memory).
fn communicator(topo: &Topology) -> Result<Comm> {
    let timeout = match std::env::var("ADAPTERLAB_RENDEZVOUS_TIMEOUT") {
        Ok(v) => std::time::Duration::from_secs(v.trim().parse().with_context(|| {
            format!("ADAPTERLAB_RENDEZVOUS_TIMEOUT={v:?} is not a number of seconds")
        })?),
        Err(_) => rendezvous::DEFAULT_TIMEOUT,
    };
    #[cfg(feature = "nccl")]
    if candle_core::utils::cuda_is_available() {
        let device = adapterlab_model::engine::device::cuda_if_available(topo.local_rank)?;
        let comm = crate::train::dist::nccl::NcclCommunicator::new(&device, topo, timeout)
            .with_context(|| format!("rank {} of {}", topo.rank, topo.world_size))?;
        return Ok(std::sync::Arc::new(comm));
    }
    let comm = crate::train::dist::tcp::TcpCommunicator::connect(
        &topo.master(),
        topo.rank,
        topo.world_size,
        timeout,
    )
    .with_context(|| format!("rank {} of {}", topo.rank, topo.world_size))?;
    Ok(std::sync::Arc::new(comm))
}

/// The command line less the launcher's flags (`--flag value` and `--flag=value`).
fn worker_args(args: impl Iterator<Item = OsString>) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut skip_value = false;
    for a in args {
        if std::mem::take(&mut skip_value) {
            continue;
        }
        let text = a.to_string_lossy();
        if LAUNCH_FLAGS.contains(&text.as_ref()) {
            skip_value = true;
            continue;
        }
        if LAUNCH_FLAGS
            .iter()
            .any(|f| text.starts_with(&format!("{f}=")))
        {
            continue;
        }
        out.push(a);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn workers_get_the_command_line_without_the_launch_flags() {
        let args = [
            "--data-dir",
            "d",
            "train",
            "--nproc-per-node",
            "2",
            "--set",
            "a=1",
            "--master-port=7",
            "--nnodes",
            "1",
            "--config",
            "c.toml",
        ];
        let got = super::worker_args(args.iter().map(Into::into));
        assert_eq!(
            got,
            [
                "--data-dir",
                "d",
                "train",
                "--set",
                "a=1",
                "--config",
                "c.toml"
            ]
            .map(std::ffi::OsString::from)
        );
    }
}
