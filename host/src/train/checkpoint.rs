//! `checkpoint-N` folders: what a resume needs (the adapter, AdamW's moments, the training
//! position) and HF's `trainer_state.json`, written so that a kill at any moment leaves a whole
//! checkpoint or none, and rotated as HF's `save_total_limit` rotates them.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use adapterlab_model::engine::LoraRegistry;
use adapterlab_model::engine::peft::{self, SaveOptions};
use anyhow::{Context as _, Result, bail};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::train::config::TrainConfig;
use crate::train::optim::AdamW;

/// The training position a checkpoint records, beyond adapter and optimizer tensors.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ResumeState {
    pub global_step: usize,
    pub adam_step: u64,
    /// The RNG: batch order is seeded by `(seed, epoch)`, dropout by `(seed, micro-batch)`.
    pub seed: u64,
    pub next_micro_batch: u64,
    /// The data position: epoch and accumulation window within it.
    pub epoch: usize,
    pub window: usize,
    /// Losses of steps since the last log, so the next logged mean is the same.
    pub pending_losses: Vec<f64>,
    pub all_losses_sum: f64,
    pub tokens_seen: u64,
    pub log_history: Vec<Value>,
    pub first_eval_loss: Option<f64>,
    /// The best value of `metric_for_best_model` so far, its step and checkpoint.
    #[serde(default)]
    pub best_metric: Option<f64>,
    #[serde(default)]
    pub best_step: Option<usize>,
    #[serde(default)]
    pub best_checkpoint: Option<String>,
    /// The data-parallel layout that made it: ranks, and micro-batches an optimizer step
    /// (per-device batches × accumulation × ranks). Absent in checkpoints of one rank made
    /// before data parallelism.
    #[serde(default)]
    pub world_size: Option<usize>,
    #[serde(default)]
    pub micro_batches_per_step: Option<usize>,
}

impl ResumeState {
    /// A run's position before its first step.
    pub fn start(seed: u64, world_size: usize, micro_batches_per_step: usize) -> Self {
        ResumeState {
            global_step: 0,
            adam_step: 0,
            seed,
            next_micro_batch: 0,
            epoch: 0,
            window: 0,
            pending_losses: Vec::new(),
            all_losses_sum: 0.0,
            tokens_seen: 0,
            log_history: Vec::new(),
            first_eval_loss: None,
            best_metric: None,
            best_step: None,
            best_checkpoint: None,
            world_size: Some(world_size),
            micro_batches_per_step: Some(micro_batches_per_step),
        }
    }
}

const STATE_FILE: &str = "training_state.json";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub(crate) const TRAINER_STATE_FILE: &str = "trainer_state.json";

/// The `checkpoint-N` folder `spec` names (`latest`: the highest N in `output_dir`).
pub fn find_checkpoint(output_dir: &Path, spec: &str) -> Result<PathBuf> {
    if spec != "latest" {
        let p = PathBuf::from(spec);
        if !p.join(STATE_FILE).is_file() {
            bail!("{} is not a checkpoint (no {STATE_FILE})", p.display());
        }
        return Ok(p);
    }
    let mut best: Option<(usize, PathBuf)> = None;
    for entry in std::fs::read_dir(output_dir)
        .with_context(|| format!("failed to read {}", output_dir.display()))?
    {
        let path = entry?.path();
        let n = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("checkpoint-"))
            .and_then(|n| n.parse::<usize>().ok());
        if let Some(n) = n.filter(|_| path.join(STATE_FILE).is_file())
            && best.as_ref().is_none_or(|(b, _)| n > *b)
        {
            best = Some((n, path));
        }
    }
    best.map(|(_, p)| p)
        .with_context(|| format!("no checkpoint-N folder in {}", output_dir.display()))
}

/// What every checkpoint of one run shares: where they go, the config they record, and the
/// run's length (for `trainer_state.json`).
pub(crate) struct Checkpoints<'a> {
    pub output_dir: &'a Path,
    pub config: &'a TrainConfig,
    pub save_opts: &'a SaveOptions,
    pub max_steps: usize,
    pub steps_per_epoch: usize,
}

impl Checkpoints<'_> {
    /// Writes `checkpoint-N` into a temporary folder, syncs it, then renames it into place, so
    /// a kill at any moment leaves either a whole checkpoint or none.
    pub fn save(
        &self,
        registry: &LoraRegistry,
        opt: &AdamW,
        state: &ResumeState,
    ) -> Result<PathBuf> {
        let output_dir = self.output_dir;
        let name = format!("checkpoint-{}", state.global_step);
        let tmp = output_dir.join(format!(".{name}.tmp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)
            .with_context(|| format!("failed to create {}", tmp.display()))?;
        peft::save_adapter(&tmp, registry, self.save_opts)?;
        let opt_tensors: HashMap<String, Tensor> = opt
            .state_tensors()
            .into_iter()
            .map(|(k, t)| t.to_device(&Device::Cpu).map(|t| (k, t)))
            .collect::<candle_core::Result<_>>()?;
        candle_core::safetensors::save(&opt_tensors, tmp.join(OPTIMIZER_FILE))?;
        write_json(&tmp.join(STATE_FILE), state)?;
        write_json(&tmp.join(TRAINER_STATE_FILE), &self.trainer_state(state))?;
        for entry in std::fs::read_dir(&tmp)? {
            std::fs::File::open(entry?.path())?.sync_all()?;
        }
        let dest = output_dir.join(&name);
        if dest.exists() {
            std::fs::remove_dir_all(&dest)
                .with_context(|| format!("failed to replace {}", dest.display()))?;
        }
        std::fs::rename(&tmp, &dest)
            .with_context(|| format!("failed to move {} into place", dest.display()))?;
        if let Ok(d) = std::fs::File::open(output_dir) {
            let _ = d.sync_all();
        }
        if let Some(limit) = self.config.save_total_limit {
            prune_checkpoints(
                output_dir,
                limit,
                state.best_checkpoint.as_deref().map(Path::new),
            )?;
        }
        Ok(dest)
    }

    /// HF Trainer's `trainer_state.json`.
    pub fn trainer_state(&self, state: &ResumeState) -> Value {
        let config = self.config;
        let steps_per_epoch = self.steps_per_epoch;
        let best = state.best_checkpoint.as_ref().and(state.best_step);
        json!({
            "best_global_step": best,
            "best_metric": state.best_checkpoint.as_ref().and(state.best_metric),
            "best_model_checkpoint": state.best_checkpoint,
            "epoch": state.global_step as f64 / steps_per_epoch as f64,
            "eval_steps": config.eval_steps,
            "global_step": state.global_step,
            "is_hyper_param_search": false,
            "is_local_process_zero": true,
            "is_world_process_zero": true,
            "log_history": state.log_history,
            "logging_steps": config.logging_steps,
            "max_steps": self.max_steps,
            "num_input_tokens_seen": state.tokens_seen,
            "num_train_epochs": self.max_steps.div_ceil(steps_per_epoch),
            "save_steps": config.save_steps,
            "stateful_callbacks": {},
            "total_flos": 0.0,
            "train_batch_size": config.per_device_train_batch_size,
            "trial_name": null,
            "trial_params": null,
        })
    }
}

pub(crate) fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text + "\n").with_context(|| format!("failed to write {}", path.display()))
}

/// Half-written checkpoints of a killed run (`.checkpoint-N.tmp-PID`) are never used; drop them.
pub(crate) fn remove_stale_temporaries(output_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(output_dir) else {
        return;
    };
    for path in entries.filter_map(|e| e.ok().map(|e| e.path())) {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.starts_with(".checkpoint-") && name.contains(".tmp-") {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

/// Keeps the newest `keep` checkpoints, and the best one whatever its age (HF's rotation).
fn prune_checkpoints(output_dir: &Path, keep: usize, best: Option<&Path>) -> Result<()> {
    let mut found: Vec<(usize, PathBuf)> = std::fs::read_dir(output_dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| {
            let n = p
                .file_name()?
                .to_str()?
                .strip_prefix("checkpoint-")?
                .parse()
                .ok()?;
            Some((n, p))
        })
        .collect();
    found.sort();
    // The best never counts against the limit's oldest: it moves to the newest end.
    if let Some(best) = best
        && let Some(i) = found.iter().position(|(_, p)| p == best)
    {
        let b = found.remove(i);
        found.push(b);
    }
    let excess = found.len().saturating_sub(keep.max(1));
    for (_, p) in found.into_iter().take(excess) {
        std::fs::remove_dir_all(&p).with_context(|| format!("failed to remove {}", p.display()))?;
    }
    Ok(())
}

/// Restores a checkpoint's adapter weights and optimizer state into `opt`'s vars; returns its
/// training position.
pub(crate) fn load_checkpoint(dir: &Path, opt: &mut AdamW, device: &Device) -> Result<ResumeState> {
    let text = std::fs::read_to_string(dir.join(STATE_FILE))
        .with_context(|| format!("failed to read {}/{STATE_FILE}", dir.display()))?;
    let state: ResumeState = serde_json::from_str(&text)
        .with_context(|| format!("{}/{STATE_FILE} is malformed", dir.display()))?;
    let adapter_file = dir.join("adapter_model.safetensors");
    let weights = candle_core::safetensors::load(&adapter_file, device)
        .with_context(|| format!("failed to read {}", adapter_file.display()))?;
    for (name, var) in opt.vars() {
        let t = weights
            .get(name)
            .with_context(|| format!("{} has no tensor {name}", adapter_file.display()))?;
        if t.dims() != var.dims() {
            bail!(
                "{}: {name} has shape {:?}, the model needs {:?} (another lora config?)",
                adapter_file.display(),
                t.dims(),
                var.dims()
            );
        }
        var.set(&t.to_dtype(var.dtype())?)?;
    }
    let opt_file = dir.join(OPTIMIZER_FILE);
    let tensors: BTreeMap<String, Tensor> = candle_core::safetensors::load(&opt_file, device)
        .with_context(|| format!("failed to read {}", opt_file.display()))?
        .into_iter()
        .collect();
    opt.load_state(tensors, state.adam_step)?;
    Ok(state)
}
