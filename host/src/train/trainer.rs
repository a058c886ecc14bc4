//! The training loop: LoRA adapters on a frozen (NF4 or dense) base, token-weighted loss over a
//! gradient-accumulation window (as HF's Trainer with `num_items_in_batch`), global-norm
//! clipping, AdamW and an HF schedule; the logs in HF's shapes (evaluations in `evaluate`,
//! checkpoints in `checkpoint`).
//!
//! **Architecture Invariant:** a step depends only on the config, the checkpoint it resumed
//! from and the step number: the batch order is a function of `(seed, epoch)` and the dropout
//! masks of `(seed, micro-batch counter)`. That is what lets a resumed run reproduce the loss
//! curve of an uninterrupted one, and why a checkpoint's "RNG state" is a seed and a counter.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use adapterlab_model::engine::CausalLm;
use adapterlab_model::engine::LoraRegistry;
use adapterlab_model::engine::peft::{self, SaveOptions};
use anyhow::{Context as _, Result, bail};
use candle_core::{D, Device, Tensor, Var};
use serde::Serialize;
use serde_json::{Value, json};

use crate::data;
use crate::eval::input::PredictionRow;
use crate::store::RunEvent;
use crate::train::checkpoint::{
    Checkpoints, ResumeState, TRAINER_STATE_FILE, find_checkpoint, load_checkpoint,
    remove_stale_temporaries, write_json,
};
use crate::train::config::TrainConfig;
use crate::train::dist;
use crate::train::evaluate::{Evaluator, eval_after_train};
use crate::train::memory;
use crate::train::optim::{AdamW, AdamWParams, lr_lambda, warmup_steps};
use crate::train::setup::{Prepared, prepare};

pub use crate::train::env::TrainEnv;

/// What a finished (or stopped) run produced.
#[derive(Debug, Clone, Serialize)]
pub struct TrainOutcome {
    pub output_dir: PathBuf,
    /// The final adapter (PEFT format); `None` when the run stopped early.
    pub adapter_dir: Option<PathBuf>,
    pub global_step: usize,
    pub max_steps: usize,
    pub train_examples: usize,
    pub truncated: usize,
    pub first_eval_loss: Option<f64>,
    pub final_eval_loss: Option<f64>,
    pub train_loss: Option<f64>,
    pub log_history: Vec<Value>,
    pub stopped_early: bool,
    /// With `eval_after_train`: the trained model's generations on the validation (else test)
    /// split, for the metric plugins.
    pub predictions: Vec<PredictionRow>,
    /// Which split `predictions` come from.
    pub predictions_split: Option<String>,
    /// The most memory a step of this session used (a resumed run: since the resume).
    pub peak_memory: memory::InUse,
}

/// AdamW over the adapters' weights, with `config`'s betas, epsilon and weight decay.
pub fn adapter_optimizer(config: &TrainConfig, registry: &LoraRegistry) -> Result<AdamW> {
    let vars: Vec<(String, Var)> = registry
        .varmap()
        .data()
        .lock()
        .expect("varmap")
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    AdamW::new(
        vars,
        AdamWParams {
            beta1: config.adam_beta1,
            beta2: config.adam_beta2,
            eps: config.adam_epsilon,
            weight_decay: config.weight_decay,
        },
    )
}

/// The end of a step: a window's gradients (`None`: the weight got none, so zero) clipped to
/// `max_grad_norm` and applied at `lr`. Returns the norm before clipping.
pub fn apply_gradients(
    opt: &mut AdamW,
    grads: Vec<Option<Tensor>>,
    max_grad_norm: f64,
    lr: f64,
) -> Result<f64> {
    let grads: Vec<Tensor> = grads
        .into_iter()
        .zip(opt.vars())
        .map(|(g, (_, v))| g.map_or_else(|| v.as_tensor().zeros_like(), Ok))
        .collect::<candle_core::Result<_>>()?;
    let dev = grads
        .first()
        .map(|g| g.device().clone())
        .unwrap_or(Device::Cpu);
    let norm = adapterlab_model::engine::profile::scope_with("optimizer", &dev, || {
        opt.clip_and_step(&grads, max_grad_norm, lr)
    })?;
    Ok(norm)
}

/// One micro-batch's forward and backward: returns its share of the window's loss (token-weighted
/// over `total_targets`, as HF with `num_items_in_batch`) and adds the gradients of `vars` into
/// `grads` (same order).
pub fn accumulate_micro_batch(
    model: &dyn CausalLm,
    batch: &data::Batch,
    total_targets: usize,
    vars: &[(String, Var)],
    grads: &mut [Option<Tensor>],
) -> Result<f64> {
    use adapterlab_model::engine::profile;
    let dev = model.device();
    let hidden = profile::pass("forward", || {
        profile::scope("model", dev, || {
            adapterlab_model::engine::loss::batch_hidden_states(model, batch)
        })
    })?;
    let loss = profile::scope("loss", dev, || {
        let hidden = hidden.reshape((batch.rows * batch.width, hidden.dim(D::Minus1)?))?;
        let picked = batch.positions.gather(&hidden)?;
        let logits = model.lm_head(&picked)?;
        let nll = adapterlab_model::engine::cross_entropy_sum(&logits, &batch.labels)?;
        nll / total_targets.max(1) as f64
    })?;
    let value = f64::from(loss.to_scalar::<f32>()?);
    let store = profile::pass("backward", || {
        profile::scope("all", dev, || loss.backward())
    })?;
    for (i, (_, var)) in vars.iter().enumerate() {
        // Checkpointed layers hand their adapters' gradients over outside the graph.
        let found = [
            store.get(var.as_tensor()).cloned(),
            adapterlab_model::engine::checkpoint::take_grad(var.as_tensor()),
        ];
        for g in found.into_iter().flatten() {
            grads[i] = Some(match grads[i].take() {
                Some(acc) => (acc + g)?,
                None => g,
            });
        }
    }
    Ok(value)
}

/// Trains as `config` says. Dataset problems are reported before the model loads.
pub fn run(config: &TrainConfig, env: &TrainEnv) -> Result<TrainOutcome> {
    let report_to = crate::track::parse_report_to(&config.report_to)?;
    if report_to.is_empty() || !env.is_main() {
        return train(config, env);
    }
    // HF's run_name, else the run's id in the store, else the output folder.
    let run_name = match config.run_name.as_str() {
        "" => env
            .store
            .as_ref()
            .map(|(_, id)| id.clone())
            .unwrap_or_else(|| config.output_dir.clone()),
        name => name.to_string(),
    };
    let logging_dir = match config.logging_dir.as_str() {
        "" => crate::track::default_logging_dir(Path::new(&config.output_dir)),
        dir => PathBuf::from(dir),
    };
    let trackers =
        crate::track::Trackers::start(&report_to, &logging_dir, &run_name, &settings(config))?;
    let trackers = Arc::new(std::sync::Mutex::new(trackers));
    let env = TrainEnv {
        trackers: Some(trackers.clone()),
        ..env.clone()
    };
    let result = train(config, &env);
    let (adapter, status) = match &result {
        Ok(o) if o.stopped_early => (None, "KILLED"),
        Ok(o) => (o.adapter_dir.clone(), "FINISHED"),
        Err(_) => (None, "FAILED"),
    };
    trackers
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .finish(adapter.as_deref(), status);
    result
}

/// Every setting of a config as flat `key = value` pairs (`lora.r`), for trackers' params.
pub fn settings(config: &TrainConfig) -> Vec<(String, String)> {
    fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    flatten(&key, v, out);
                }
            }
            serde_json::Value::String(s) => out.push((prefix.to_string(), s.clone())),
            serde_json::Value::Null => {}
            other => out.push((prefix.to_string(), other.to_string())),
        }
    }
    let mut out = Vec::new();
    flatten(
        "",
        &serde_json::to_value(config).unwrap_or_default(),
        &mut out,
    );
    out
}

/// How a run's steps are laid out: HF's global batch of per-device batch × accumulation ×
/// world size, the run's length and its schedule's warmup.
struct Schedule {
    bs: usize,
    accum: usize,
    rank: usize,
    world: usize,
    /// Micro-batches an optimizer step, over all ranks.
    per_step: usize,
    /// [`TrainEnv::sum_in_groups`], at least 1.
    groups: usize,
    steps_per_epoch: usize,
    max_steps: usize,
    warmup: usize,
}

impl Schedule {
    fn new(config: &TrainConfig, env: &TrainEnv, rows: usize) -> Result<Self> {
        let bs = config.per_device_train_batch_size;
        let accum = config.gradient_accumulation_steps;
        let (rank, world) = (env.rank(), env.world_size());
        let per_step = accum * world;
        let groups = env.sum_in_groups.max(1);
        if !accum.is_multiple_of(groups) {
            bail!("sum_in_groups {groups} does not divide gradient_accumulation_steps {accum}");
        }
        let steps_per_epoch = rows.div_ceil(bs).div_ceil(per_step).max(1);
        let max_steps = if config.max_steps > 0 {
            config.max_steps as usize
        } else {
            (config.num_train_epochs * steps_per_epoch as f64).ceil() as usize
        };
        Ok(Schedule {
            bs,
            accum,
            rank,
            world,
            per_step,
            groups,
            steps_per_epoch,
            max_steps,
            warmup: warmup_steps(config.warmup_steps, config.warmup_ratio, max_steps),
        })
    }

    /// The learning rate after `step` optimizer steps.
    fn lr(&self, config: &TrainConfig, step: usize) -> f64 {
        config.learning_rate
            * lr_lambda(config.lr_scheduler_type, step, self.warmup, self.max_steps)
    }

    /// HF's `epoch` of a log entry: steps done over steps an epoch, to four places.
    fn epoch(&self, step: usize) -> f64 {
        round4(step as f64 / self.steps_per_epoch as f64)
    }
}

/// What one optimizer step did.
struct StepDone {
    /// The window's token-weighted loss (summed over ranks).
    loss: f64,
    /// The gradients' global norm before clipping.
    grad_norm: f64,
    /// Tokens of every rank's micro-batches, padding included.
    tokens: usize,
}

/// Tokens per second over the steps since the last log, and seconds a step over this
/// invocation (for the ETA).
struct Pace {
    started: Instant,
    window_started: Instant,
    window_tokens: u64,
    steps: usize,
}

impl Pace {
    /// `started`: when the run started (its load included, as the ETA has always counted it).
    fn new(started: Instant) -> Self {
        Pace {
            started,
            window_started: Instant::now(),
            window_tokens: 0,
            steps: 0,
        }
    }

    fn step(&mut self, tokens: usize) {
        self.window_tokens += tokens as u64;
        self.steps += 1;
    }

    fn tokens_per_second(&self) -> f64 {
        self.window_tokens as f64 / self.window_started.elapsed().as_secs_f64().max(1e-9)
    }

    fn eta(&self, steps_left: usize) -> f64 {
        self.started.elapsed().as_secs_f64() / self.steps as f64 * steps_left as f64
    }

    /// A log step starts a new window.
    fn restart_window(&mut self) {
        self.window_started = Instant::now();
        self.window_tokens = 0;
    }
}

/// The parts of a run every step reads.
struct Loop<'a> {
    config: &'a TrainConfig,
    env: &'a TrainEnv,
    schedule: &'a Schedule,
    prepared: &'a Prepared,
    device: &'a Device,
    /// The rows' lengths, which batches are made by.
    lengths: Vec<usize>,
    /// The batches of the epoch last asked for (rows' indices), computed once an epoch.
    epoch_cache: Option<(usize, Vec<Vec<usize>>)>,
}

impl Loop<'_> {
    /// Whether the run stops before the next step: the user's (or the server's) cancel, or
    /// `--stop-after-steps`. One rank's stop stops them all at the same step.
    fn stop_requested(&self, steps_this_run: usize) -> Result<bool> {
        let env = self.env;
        let mut stop = env
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
            || env.stop_after_steps.is_some_and(|n| steps_this_run >= n);
        if let Some(comm) = &env.comm {
            let mut flag = [f32::from(u8::from(stop))];
            comm.all_reduce_sum(&mut flag)?;
            stop = flag[0] > 0.0;
        }
        Ok(stop)
    }

    /// One optimizer step: this rank's share of the step's micro-batches forward and backward,
    /// the gradients summed (over groups and ranks, in order), clipped and applied.
    fn step(&mut self, opt: &mut AdamW, state: &mut ResumeState) -> Result<StepDone> {
        let (config, env, s) = (self.config, self.env, self.schedule);
        let rows = &self.prepared.train_rows;
        let registry = &self.prepared.registry;
        let epoch = state.global_step / s.steps_per_epoch;
        let window = state.global_step % s.steps_per_epoch;
        if self.epoch_cache.as_ref().is_none_or(|(e, _)| *e != epoch) {
            self.epoch_cache = Some((
                epoch,
                data::epoch_batches(
                    &self.lengths,
                    s.bs,
                    config.sampling(),
                    config.seed,
                    epoch as u64,
                ),
            ));
        }
        let batches = &self.epoch_cache.as_ref().expect("cached").1;
        // The step's micro-batches over all ranks; rank r takes the r-th run of `accum`. The
        // counts every rank needs are the whole window's, known without communication.
        let step_batches = &batches[(window * s.per_step).min(batches.len())
            ..((window + 1) * s.per_step).min(batches.len())];
        let total_targets: usize = step_batches
            .iter()
            .flatten()
            .map(|&i| data::n_targets(&rows[i].row))
            .sum();
        let tokens: usize = step_batches
            .iter()
            .flatten()
            .map(|&i| rows[i].row.input_ids.len())
            .sum();
        let mine = (s.rank * s.accum).min(step_batches.len())
            ..((s.rank + 1) * s.accum).min(step_batches.len());
        let collated = step_batches[mine.clone()]
            .iter()
            .map(|idx| {
                data::collate_packed(
                    &idx.iter().map(|&i| &rows[i]).collect::<Vec<_>>(),
                    self.prepared.pad_id,
                    self.device,
                )
            })
            .collect::<Result<Vec<_>>>()?;

        registry.set_training(true);
        let model: &dyn CausalLm = &self.prepared.loaded.model;
        let mut loss = 0.0;
        // One process alone keeps the gradients as tensors; otherwise each group's sum is
        // packed and the packed sums are added in order, then across ranks in rank order.
        let packed = env.comm.is_some() || s.groups > 1;
        let group_len = s.accum / s.groups;
        let mut grads: Vec<Option<Tensor>> = vec![None; opt.vars().len()];
        let mut partial: Option<Vec<f32>> = None;
        for g in 0..s.groups {
            let members =
                (g * group_len).min(collated.len())..((g + 1) * group_len).min(collated.len());
            for j in members {
                let batch = &collated[j];
                // Dropout keys are the micro-batch's place in the global order, the same
                // whatever rank runs it.
                registry.set_dropout_key(
                    config.seed,
                    state.next_micro_batch + (mine.start + j) as u64,
                );
                if batch.n_targets == 0 {
                    continue;
                }
                loss +=
                    accumulate_micro_batch(model, batch, total_targets, opt.vars(), &mut grads)?;
            }
            if packed {
                let part = dist::pack(
                    &std::mem::replace(&mut grads, vec![None; opt.vars().len()]),
                    opt.vars(),
                )?;
                match &mut partial {
                    None => partial = Some(part),
                    Some(acc) => dist::add_into(acc, &part),
                }
            }
        }
        if let Some(mut buf) = partial {
            if let Some(comm) = &env.comm {
                // The loss rides along: one all-reduce a step.
                buf.push(loss as f32);
                comm.all_reduce_sum(&mut buf)?;
                loss = f64::from(buf.pop().unwrap_or_default());
            }
            grads = dist::unpack(&buf, opt.vars())?
                .into_iter()
                .map(Some)
                .collect();
        }
        let lr = s.lr(config, state.global_step);
        let grad_norm = apply_gradients(opt, grads, config.max_grad_norm, lr)?;
        state.next_micro_batch += step_batches.len() as u64;
        state.tokens_seen += tokens as u64;
        state.global_step += 1;
        state.adam_step = opt.step;
        state.epoch = state.global_step / s.steps_per_epoch;
        state.window = state.global_step % s.steps_per_epoch;
        state.pending_losses.push(loss);
        state.all_losses_sum += loss;
        Ok(StepDone {
            loss,
            grad_norm,
            tokens,
        })
    }

    /// A step's events: every step a `Step` (its own loss), and at a logging step (HF's
    /// `logging_steps`, and the last) the window's mean loss in log_history, the dashboard's
    /// log and a `Loss` event.
    fn report(
        &self,
        state: &mut ResumeState,
        done: &StepDone,
        pace: &mut Pace,
        bar: &indicatif::ProgressBar,
        used: memory::InUse,
    ) {
        let (config, env, s) = (self.config, self.env, self.schedule);
        let step = state.global_step;
        let epoch = s.epoch(step);
        let lr = s.lr(config, step);
        let logged = config.logs_at(step, s.max_steps);
        // Every step, logged ones included: a logged step's `Loss` carries the mean over the
        // logging window (HF's), which on the chart would stand out from its neighbours.
        env.record(RunEvent::Step {
            step: step as u64,
            epoch,
            loss: done.loss,
            learning_rate: lr,
            grad_norm: done.grad_norm,
            eta_seconds: Some(pace.eta(s.max_steps - step)),
            tokens_per_second: Some(pace.tokens_per_second()),
            memory_bytes: used.rss_bytes,
            gpu_memory_bytes: used.gpu_bytes,
        });
        if !logged {
            env.record_progress(step, s.max_steps);
            return;
        }
        let mean = state.pending_losses.iter().sum::<f64>() / state.pending_losses.len() as f64;
        state.pending_losses.clear();
        let tps = pace.tokens_per_second();
        let eta = pace.eta(s.max_steps - step);
        pace.restart_window();
        state.log_history.push(json!({
            "epoch": epoch, "grad_norm": done.grad_norm, "learning_rate": lr, "loss": round4(mean), "step": step,
        }));
        bar.set_message(format!("loss {mean:.4} · {tps:.0} tok/s"));
        // The terminal has the progress bar; the dashboard's log gets a line per log step.
        env.record(RunEvent::Log {
            level: "info".into(),
            message: format!(
                "step {step}/{} · loss {mean:.4} · lr {lr:.3e} · {tps:.0} tok/s",
                s.max_steps
            ),
        });
        env.record(RunEvent::Loss {
            step: step as u64,
            epoch,
            loss: Some(mean),
            eval_loss: None,
            learning_rate: Some(lr),
            grad_norm: Some(done.grad_norm),
            tokens_per_second: Some(tps),
            eta_seconds: Some(eta),
            memory_bytes: used.rss_bytes,
            gpu_memory_bytes: used.gpu_bytes,
            eval_metrics: BTreeMap::new(),
        });
        env.record_progress(step, s.max_steps);
    }
}

/// What the run is about to do, on the terminal, in the dashboard's log and in tracing.
fn announce(config: &TrainConfig, env: &TrainEnv, s: &Schedule, prepared: &Prepared, opt: &AdamW) {
    let trainable: usize = opt.vars().iter().map(|(_, v)| v.elem_count()).sum();
    if let Some(comm) = &env.comm {
        env.log(format!(
            "data parallel over {} ranks ({}): global batch {} = {} a device × {} accumulation × {}",
            s.world,
            comm.backend(),
            s.bs * s.accum * s.world,
            s.bs,
            s.accum,
            s.world
        ));
    }
    let examples = prepared.train.examples.len();
    let rows = prepared.train_rows.len();
    env.log(format!(
        "training {} steps on {examples} examples{} ({} steps an epoch), {trainable} trainable parameters",
        s.max_steps,
        if config.packs_train() {
            format!(" in {rows} packed rows")
        } else {
            String::new()
        },
        s.steps_per_epoch
    ));
    tracing::info!(
        examples,
        rows,
        max_steps = s.max_steps,
        steps_per_epoch = s.steps_per_epoch,
        trainable,
        "training"
    );
}

/// The position to start from: a fresh one, or `resume_from`'s (its adapter and optimizer state
/// loaded into `opt`).
fn start_state(
    config: &TrainConfig,
    env: &TrainEnv,
    s: &Schedule,
    resume_from: Option<&Path>,
    opt: &mut AdamW,
    device: &Device,
) -> Result<ResumeState> {
    let Some(dir) = resume_from else {
        return Ok(ResumeState::start(config.seed, s.world, s.per_step));
    };
    let mut state = load_checkpoint(dir, opt, device)?;
    let before = state.micro_batches_per_step.unwrap_or(s.accum);
    if before != s.per_step {
        env.log(format!(
            "{} was made with {before} micro-batches a step, this run takes {} \
             ({} ranks × {}): steps after it see another slice of the data \
             than the original run would have",
            dir.display(),
            s.per_step,
            s.world,
            s.accum
        ));
    }
    state.world_size = Some(s.world);
    state.micro_batches_per_step = Some(s.per_step);
    if state.seed != config.seed {
        bail!(
            "{} was made with seed {}, the config says {}",
            dir.display(),
            state.seed,
            config.seed
        );
    }
    env.log(format!(
        "resuming from {} at step {}",
        dir.display(),
        state.global_step
    ));
    Ok(state)
}

fn train(config: &TrainConfig, env: &TrainEnv) -> Result<TrainOutcome> {
    let started = Instant::now();
    let output_dir = PathBuf::from(&config.output_dir);
    let resume_from = match &env.resume_from_checkpoint {
        Some(spec) => Some(find_checkpoint(&output_dir, spec)?),
        None => None,
    };
    let prepared = prepare(config, env)?;
    let registry = &prepared.registry;
    let device = prepared.loaded.model.device().clone();
    let s = Schedule::new(config, env, prepared.train_rows.len())?;

    let mut opt = adapter_optimizer(config, registry)?;
    announce(config, env, &s, &prepared, &opt);
    let mut state = start_state(config, env, &s, resume_from.as_deref(), &mut opt, &device)?;
    if let Some(comm) = &env.comm {
        // Every rank starts from rank 0's adapter (seeded alike already; this makes it so).
        let weights: Vec<Option<Tensor>> = opt
            .vars()
            .iter()
            .map(|(_, v)| Some(v.as_tensor().clone()))
            .collect();
        let mut buf = dist::pack(&weights, opt.vars())?;
        comm.broadcast(&mut buf)?;
        for ((_, var), t) in opt.vars().iter().zip(dist::unpack(&buf, opt.vars())?) {
            var.set(&t)?;
        }
    }
    if env.is_main() {
        std::fs::create_dir_all(&output_dir)
            .with_context(|| format!("failed to create {}", output_dir.display()))?;
        remove_stale_temporaries(&output_dir);
    }

    let evaluator = Evaluator {
        config,
        env,
        loaded: &prepared.loaded,
        val_rows: prepared.val_rows.as_deref(),
        generation: prepared.generation.as_ref(),
    };
    let mut last_eval_loss: Option<Option<f64>> = None;
    let mut evaluated_at: Option<usize> = None;
    if resume_from.is_none() && evaluator.evaluates() && evaluator.has_data() {
        state.first_eval_loss = evaluator.run(registry, &mut state, 0.0, false)?;
    }

    let save_opts = SaveOptions {
        base_model_name_or_path: Some(config.model_name_or_path.clone()),
        ..Default::default()
    };
    let checkpoints = Checkpoints {
        output_dir: &output_dir,
        config,
        save_opts: &save_opts,
        max_steps: s.max_steps,
        steps_per_epoch: s.steps_per_epoch,
    };
    let mut run = Loop {
        config,
        env,
        schedule: &s,
        prepared: &prepared,
        device: &device,
        lengths: prepared
            .train_rows
            .iter()
            .map(|r| r.row.input_ids.len())
            .collect(),
        epoch_cache: None,
    };
    let bar = progress_bar(env.progress_bar, s.max_steps, state.global_step);
    let mut pace = Pace::new(started);
    let mut peak = memory::InUse::default();
    let mut stopped_early = false;
    while state.global_step < s.max_steps {
        if run.stop_requested(pace.steps)? {
            stopped_early = true;
            let wanted = env
                .checkpoint_on_stop
                .as_ref()
                .is_some_and(|c| c.load(Ordering::SeqCst));
            let saved_already = saves_now(config, &state, s.steps_per_epoch);
            if wanted && pace.steps > 0 && !saved_already && env.is_main() {
                // The steps' events are made durable before the checkpoint that skips them.
                env.flush_store();
                checkpoints.save(registry, &opt, &state)?;
                env.log(format!("stopped; checkpoint-{} written", state.global_step));
                env.flush_store();
            }
            break;
        }
        let done = run.step(&mut opt, &mut state)?;
        pace.step(done.tokens);
        let used = memory::in_use(&device);
        peak = peak.max_with(used);
        run.report(&mut state, &done, &mut pace, &bar, used);
        if evaluator.due(state.global_step, s.steps_per_epoch) {
            // At the last step too, before its checkpoint, so the checkpoint can be the best.
            let epoch = s.epoch(state.global_step);
            last_eval_loss = Some(evaluator.run(registry, &mut state, epoch, true)?);
            evaluated_at = Some(state.global_step);
            registry.set_training(true);
        }
        if saves_now(config, &state, s.steps_per_epoch) && env.is_main() {
            if state.best_step == Some(state.global_step) {
                state.best_checkpoint = Some(
                    output_dir
                        .join(format!("checkpoint-{}", state.global_step))
                        .display()
                        .to_string(),
                );
            }
            // A resume starts after the checkpoint and does not redo its steps, so their events
            // must be in the store before it exists: a kill after the checkpoint's rename but
            // before a later flush lost them (the store had them in memory only).
            env.flush_store();
            checkpoints.save(registry, &opt, &state)?;
        }
        bar.inc(1);
    }
    bar.finish_and_clear();

    let mut outcome = TrainOutcome {
        output_dir: output_dir.clone(),
        adapter_dir: None,
        global_step: state.global_step,
        max_steps: s.max_steps,
        train_examples: prepared.train.examples.len(),
        truncated: prepared.train.truncated,
        first_eval_loss: state.first_eval_loss,
        final_eval_loss: None,
        train_loss: (state.global_step > 0)
            .then(|| state.all_losses_sum / state.global_step as f64),
        log_history: Vec::new(),
        stopped_early,
        predictions: Vec::new(),
        predictions_split: None,
        peak_memory: peak,
    };
    if !stopped_early && env.is_main() {
        if evaluated_at == Some(state.global_step) {
            outcome.final_eval_loss = last_eval_loss.flatten();
        } else if evaluator.evaluates() {
            let epoch = s.epoch(state.global_step);
            outcome.final_eval_loss = evaluator.run(registry, &mut state, epoch, true)?;
        }
        if config.load_best_model_at_end {
            load_best(registry, &state, env)?;
        }
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        state.log_history.push(json!({
            "epoch": s.epoch(state.global_step),
            "step": state.global_step,
            "total_flos": 0.0,
            "train_loss": outcome.train_loss,
            "train_runtime": round4(started.elapsed().as_secs_f64()),
            "train_samples_per_second": round4((state.global_step * s.bs * s.per_step) as f64 / secs),
            "train_steps_per_second": round4(pace.steps as f64 / secs),
        }));
        peft::save_adapter(&output_dir, registry, &save_opts)?;
        env.log(format!("saved the adapter in {}", output_dir.display()));
        write_json(
            &output_dir.join(TRAINER_STATE_FILE),
            &checkpoints.trainer_state(&state),
        )?;
        outcome.adapter_dir = Some(output_dir.clone());
        if !config.eval_after_train.is_empty() {
            let (predictions, split) = eval_after_train(config, env, &prepared)?;
            outcome.predictions = predictions;
            outcome.predictions_split = Some(split.to_string());
        }
    }
    outcome.log_history = state.log_history;
    Ok(outcome)
}

/// Whether the step just made gets a checkpoint: by `save_strategy`'s schedule, or with `best`
/// when its evaluation was a new best.
fn saves_now(config: &TrainConfig, state: &ResumeState, steps_per_epoch: usize) -> bool {
    config.saves_at(state.global_step, steps_per_epoch)
        || (config.saves_best() && state.best_step == Some(state.global_step))
}

/// `load_best_model_at_end`: the best checkpoint's adapter weights replace the last ones,
/// so the adapter saved in `output_dir` is the best one.
fn load_best(registry: &LoraRegistry, state: &ResumeState, env: &TrainEnv) -> Result<()> {
    let (Some(dir), Some(step), Some(value)) =
        (&state.best_checkpoint, state.best_step, state.best_metric)
    else {
        env.log(
            "load_best_model_at_end: no evaluation made a checkpoint; the last adapter stays"
                .into(),
        );
        return Ok(());
    };
    let file = Path::new(dir).join("adapter_model.safetensors");
    let device = registry
        .varmap()
        .all_vars()
        .first()
        .map(|v| v.device().clone())
        .unwrap_or(Device::Cpu);
    let weights = candle_core::safetensors::load(&file, &device).with_context(|| {
        format!(
            "failed to read the best checkpoint's adapter {}",
            file.display()
        )
    })?;
    for (name, var) in registry.varmap().data().lock().expect("varmap").iter() {
        let t = weights
            .get(name)
            .with_context(|| format!("{} has no tensor {name}", file.display()))?;
        var.set(&t.to_dtype(var.dtype())?)?;
    }
    env.log(format!(
        "loaded the best checkpoint, {dir} (step {step}, {value:.4})"
    ));
    Ok(())
}

fn progress_bar(on: bool, total: usize, done: usize) -> indicatif::ProgressBar {
    if !on {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps · {msg} · ETA {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_position(done as u64);
    bar
}

pub(crate) fn round4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use adapterlab_model::engine::LinearBuilder;
    use adapterlab_model::engine::loss::Example;
    use adapterlab_model::engine::{LoadOptions, load};
    use candle_core::{Device, Var};

    use super::accumulate_micro_batch;
    use crate::data;

    /// The train_step fixture as the trainer sees it: the small random Falcon with the
    /// fixture's adapter attached (training mode), and the fixture's batch.
    fn fixture_model_and_batch(
        fixture: &Path,
    ) -> anyhow::Result<(
        std::sync::Arc<adapterlab_model::engine::LoraRegistry>,
        adapterlab_model::engine::LoadedModel,
        data::Batch,
    )> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let model_dir = root.join("model/tests/fixtures/bnb/falcon_tiny");
        let registry = adapterlab_model::engine::peft::load_adapter(&fixture.join("adapter"))?
            .into_registry()?;
        registry.set_training(true);
        let loaded = load(
            model_dir.to_str().unwrap(),
            &LoadOptions {
                builder: LinearBuilder::dense().with_lora_registry(registry.clone()),
                ..LoadOptions::default()
            },
        )?;
        let batch =
            candle_core::safetensors::load(fixture.join("batch.safetensors"), &Device::Cpu)?;
        let ids = batch["input_ids"].to_vec2::<i64>()?;
        let mask = batch["attention_mask"].to_vec2::<i64>()?;
        let labels = batch["labels"].to_vec2::<i64>()?;
        let examples: Vec<Example> = (0..ids.len())
            .map(|r| {
                let len = mask[r].iter().filter(|m| **m == 1).count();
                Example {
                    input_ids: ids[r][..len].iter().map(|t| *t as u32).collect(),
                    targets: labels[r][..len].iter().map(|l| *l != -100).collect(),
                }
            })
            .collect();
        let refs: Vec<&Example> = examples.iter().collect();
        let batch = data::collate(&refs, 0, &Device::Cpu)?;
        Ok((registry, loaded, batch))
    }

    /// An adapter this trainer trains and writes gives, in HF PEFT, the logits it gives here.
    /// Five optimizer steps on the train_step fixture's batch, then `save_adapter`; the folder
    /// must equal `tests/fixtures/peft_roundtrip/adapter`, on which
    /// `make_peft_roundtrip_fixture.py` ran PEFT (`PeftModel.from_pretrained`) and recorded its
    /// last-position logits. Our logits with the adapter read back must be those within 1e-4.
    /// `ADAPTERLAB_WRITE_FIXTURES=1` rewrites the adapter (then rerun the script).
    #[test]
    fn a_trained_adapter_gives_hf_peft_logits() -> anyhow::Result<()> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let fixture = root.join("tests/fixtures/peft_roundtrip");
        let (registry, loaded, batch) =
            fixture_model_and_batch(&root.join("tests/fixtures/train_step"))?;
        let config = crate::train::config::TrainConfig::default();
        let mut opt = super::adapter_optimizer(&config, &registry)?;
        let mut losses = Vec::new();
        for _ in 0..5 {
            let mut grads = vec![None; opt.vars().len()];
            losses.push(accumulate_micro_batch(
                &loaded.model,
                &batch,
                batch.n_targets,
                opt.vars(),
                &mut grads,
            )?);
            super::apply_gradients(&mut opt, grads, 1.0, 1e-2)?;
        }
        assert!(
            losses[4] < losses[0],
            "training lowers the loss: {losses:?}"
        );
        let written = tempfile::tempdir()?;
        adapterlab_model::engine::peft::save_adapter(
            written.path(),
            &registry,
            &Default::default(),
        )?;
        let committed = fixture.join("adapter");
        if std::env::var_os("ADAPTERLAB_WRITE_FIXTURES").is_some() {
            std::fs::create_dir_all(&committed)?;
            for f in ["adapter_config.json", "adapter_model.safetensors"] {
                std::fs::copy(written.path().join(f), committed.join(f))?;
            }
        }
        let file = "adapter_model.safetensors";
        let ours = candle_core::safetensors::load(written.path().join(file), &Device::Cpu)?;
        let fixed = candle_core::safetensors::load(committed.join(file), &Device::Cpu)?;
        assert_eq!(ours.len(), fixed.len());
        for (name, t) in &ours {
            let diff = (t - &fixed[name])?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                diff < 1e-5,
                "{name} moved by {diff} from the committed adapter: the trainer's numerics \
                 changed; rerun with ADAPTERLAB_WRITE_FIXTURES=1 and make_peft_roundtrip_fixture.py"
            );
        }

        let expected: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixture.join("expected.json"))?)?;
        let reread = adapterlab_model::engine::linear_builder(
            adapterlab_model::engine::Quantize::None,
            Some(&committed),
        )?;
        let model_dir = root.join("model/tests/fixtures/bnb/falcon_tiny");
        let with_adapter = load(
            model_dir.to_str().unwrap(),
            &LoadOptions {
                builder: reread,
                ..LoadOptions::default()
            },
        )?;
        for (i, prompt) in expected["prompts"].as_array().unwrap().iter().enumerate() {
            let ids: Vec<u32> = prompt
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            let ids = candle_core::Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
            let got = adapterlab_model::engine::CausalLm::forward_last(
                &with_adapter.model,
                &ids,
                None,
                None,
            )?
            .to_vec2::<f32>()?;
            let want: Vec<f32> = expected["peft_last_logits"][i]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            let diff = got[0]
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                diff < 1e-4,
                "prompt {i}: logits differ from PEFT's by {diff}"
            );
        }
        Ok(())
    }

    /// One training step's LoRA gradients equal HF + PEFT's on the small random Falcon, from
    /// the fixture `host/tests/fixtures/make_train_fixture.py` wrote (the same adapter, a
    /// right-padded completion-only batch, loss summed over label tokens / their number).
    #[test]
    fn one_step_lora_gradients_equal_hf_peft() -> anyhow::Result<()> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let fixture = root.join("tests/fixtures/train_step");
        let expected: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixture.join("expected.json"))?)?;
        let (registry, loaded, batch) = fixture_model_and_batch(&fixture)?;
        assert_eq!(
            batch.n_targets as u64,
            expected["n_items"].as_u64().unwrap()
        );

        let layers = registry.layers();
        let vars: Vec<(String, Var)> = layers
            .iter()
            .flat_map(|l| {
                [
                    (
                        format!("base_model.model.{}.lora_A.weight", l.module),
                        l.a.clone(),
                    ),
                    (
                        format!("base_model.model.{}.lora_B.weight", l.module),
                        l.b.clone(),
                    ),
                ]
            })
            .collect();
        let mut grads = vec![None; vars.len()];
        let loss =
            accumulate_micro_batch(&loaded.model, &batch, batch.n_targets, &vars, &mut grads)?;
        let want_loss = expected["loss"].as_f64().unwrap();
        assert!(
            (loss - want_loss).abs() < 1e-4,
            "loss {loss} vs HF {want_loss}"
        );

        let theirs =
            candle_core::safetensors::load(fixture.join("grads.safetensors"), &Device::Cpu)?;
        assert_eq!(
            theirs.len(),
            vars.len(),
            "every LoRA weight has a gradient there"
        );
        for ((name, _), ours) in vars.iter().zip(&grads) {
            let ours = ours
                .as_ref()
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            let want = theirs
                .get(name)
                .unwrap_or_else(|| panic!("{name} not in the fixture"));
            let scale = want.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-6);
            let diff = (ours - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                diff <= 1e-4 * scale.max(1.0),
                "{name}: gradients differ by {diff} (scale {scale})"
            );
        }
        Ok(())
    }
}
