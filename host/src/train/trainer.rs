//! The training loop: LoRA adapters on a frozen (NF4 or dense) base, token-weighted loss over a
//! gradient-accumulation window (as HF's Trainer with `num_items_in_batch`), global-norm
//! clipping, AdamW and an HF schedule; logs, evaluations and checkpoints in HF's shapes.
//!
//! **Architecture Invariant:** a step depends only on the config, the checkpoint it resumed
//! from and the step number: the batch order is a function of `(seed, epoch)` and the dropout
//! masks of `(seed, micro-batch counter)`. That is what lets a resumed run reproduce the loss
//! curve of an uninterrupted one, and why a checkpoint's "RNG state" is a seed and a counter.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use adapterlab_model::engine::CausalLm;
use adapterlab_model::engine::Fetcher;
use adapterlab_model::engine::LoadedModel;
use adapterlab_model::engine::Nf4Options;
use adapterlab_model::engine::loss::loss_on_packed;
use adapterlab_model::engine::peft::{self, SaveOptions};
use adapterlab_model::engine::{BaseFormat, LinearBuilder};
use adapterlab_model::engine::{Engine, load_model_with};
use adapterlab_model::engine::{LoraConfig, LoraRegistry, TargetModules};
use anyhow::{Context as _, Result, bail};
use candle_core::{D, DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::data::{self, Encoded};
use crate::eval::input::PredictionRow;
use crate::infer::predict::{self, PromptRow, Sampling};
use crate::plugin::Registry;
use crate::store::{RunEvent, RunRecord, Store};
use crate::train::config::{ComputeDtype, PackingStrategy, TrainConfig};
use crate::train::dist::Comm;
use crate::train::memory;
use crate::train::optim::{AdamW, AdamWParams, lr_lambda, warmup_steps};

/// What a training run needs from its caller besides the config.
#[derive(Clone, Default)]
pub struct TrainEnv {
    /// Where default models are cached (`DataDir::assets()`).
    pub assets_dir: PathBuf,
    /// Plugins, for the formatter.
    pub registry: Option<Registry>,
    /// The store and the run to record logged steps into.
    pub store: Option<(Store, String)>,
    /// `latest` or a checkpoint folder.
    pub resume_from_checkpoint: Option<String>,
    /// Draw a progress bar on the terminal.
    pub progress_bar: bool,
    /// Set to stop after the current step (the server's cancel).
    pub cancel: Option<Arc<AtomicBool>>,
    /// Why `cancel` stopped the run when its user did not (a full disk): the run then ends
    /// failed with that reason instead of cancelled. `None`: every stop is the user's.
    pub stopped_because: Option<crate::eval::pipeline::StopReason>,
    /// Stop after this many steps of this invocation (tests: simulate an interruption).
    pub stop_after_steps: Option<usize>,
    /// When set at the moment the run stops early (a server shutdown), a checkpoint of the
    /// current step is written first, so that a resume loses no step.
    pub checkpoint_on_stop: Option<Arc<AtomicBool>>,
    /// Loss events of steps up to this one are already in the store (a resumed run redoes the
    /// steps after its checkpoint); they are not recorded twice.
    pub skip_loss_through: Option<u64>,
    /// The same for step events, counted apart: a step records its step event before its loss
    /// event, so a kill between the two leaves the step's loss to be recorded on the redo.
    pub skip_steps_through: Option<u64>,
    /// The trackers of `report_to`, started by [`run`].
    pub trackers: Option<Arc<std::sync::Mutex<crate::track::Trackers>>>,
    /// Data parallelism: this rank's communicator (`None`: one process, one device). Only
    /// rank 0 writes (checkpoints, `trainer_state.json`, the adapter, the store, trackers).
    pub comm: Option<Comm>,
    /// The GPU this rank trains on (`LOCAL_RANK`).
    pub device_ordinal: usize,
    /// Sum this rank's window of gradients in this many contiguous groups of micro-batches,
    /// in order, as that many ranks would before their all-reduce: how one process reproduces
    /// N ranks bit for bit (the data-parallel tests' reference). 0 or 1: one group.
    pub sum_in_groups: usize,
}

impl TrainEnv {
    fn rank(&self) -> usize {
        self.comm.as_ref().map_or(0, |c| c.rank())
    }

    fn world_size(&self) -> usize {
        self.comm.as_ref().map_or(1, |c| c.world_size())
    }

    /// Rank 0, the one that writes and reports.
    pub fn is_main(&self) -> bool {
        self.rank() == 0
    }
}

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

/// The training position a checkpoint records, beyond adapter and optimizer tensors.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ResumeState {
    global_step: usize,
    adam_step: u64,
    /// The RNG: batch order is seeded by `(seed, epoch)`, dropout by `(seed, micro-batch)`.
    seed: u64,
    next_micro_batch: u64,
    /// The data position: epoch and accumulation window within it.
    epoch: usize,
    window: usize,
    /// Losses of steps since the last log, so the next logged mean is the same.
    pending_losses: Vec<f64>,
    all_losses_sum: f64,
    tokens_seen: u64,
    log_history: Vec<Value>,
    first_eval_loss: Option<f64>,
    /// The best value of `metric_for_best_model` so far, its step and checkpoint.
    #[serde(default)]
    best_metric: Option<f64>,
    #[serde(default)]
    best_step: Option<usize>,
    #[serde(default)]
    best_checkpoint: Option<String>,
    /// The data-parallel layout that made it: ranks, and micro-batches an optimizer step
    /// (per-device batches × accumulation × ranks). Absent in checkpoints of one rank made
    /// before data parallelism.
    #[serde(default)]
    world_size: Option<usize>,
    #[serde(default)]
    micro_batches_per_step: Option<usize>,
}

const STATE_FILE: &str = "training_state.json";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const TRAINER_STATE_FILE: &str = "trainer_state.json";

fn device(ordinal: usize) -> Result<Device> {
    if cfg!(feature = "cuda") {
        Ok(adapterlab_model::engine::device::cuda_if_available(
            ordinal,
        )?)
    } else {
        Ok(Device::Cpu)
    }
}

fn compute_dtype(config: &TrainConfig, device: &Device) -> DType {
    if device.is_cpu() {
        // 16-bit matmuls on the CPU are slow and lose precision; QLoRA on a CPU computes in f32.
        return DType::F32;
    }
    match config.quantization.bnb_4bit_compute_dtype {
        ComputeDtype::Float32 => DType::F32,
        ComputeDtype::Float16 => DType::F16,
        ComputeDtype::Bfloat16 => DType::BF16,
    }
}

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

/// The model as `config` has it trained: the base frozen (NF4 with `load_in_4bit`), LoRA
/// adapters on the target modules, on the GPU when there is one.
pub fn load_for_training(
    config: &TrainConfig,
    assets_dir: &Path,
) -> Result<(
    adapterlab_model::engine::LoadedModel,
    Arc<LoraRegistry>,
    Engine,
)> {
    load_for_training_on(config, assets_dir, 0)
}

/// [`load_for_training`] on GPU `ordinal` (a data-parallel rank's `LOCAL_RANK`).
pub fn load_for_training_on(
    config: &TrainConfig,
    assets_dir: &Path,
    ordinal: usize,
) -> Result<(
    adapterlab_model::engine::LoadedModel,
    Arc<LoraRegistry>,
    Engine,
)> {
    let device = device(ordinal)?;
    let dtype = compute_dtype(config, &device);
    adapterlab_model::engine::checkpoint::set_enabled(config.gradient_checkpointing);
    adapterlab_model::engine::checkpoint::set_every(config.gradient_checkpointing_every);
    let rt = Engine {
        assets_dir: assets_dir.to_path_buf(),
        device: device.clone(),
        dtype,
        fetcher: Fetcher::default(),
    };
    let lora = LoraConfig {
        r: config.lora.r,
        lora_alpha: config.lora.lora_alpha,
        lora_dropout: config.lora.lora_dropout as f32,
        target_modules: if config.lora.target_modules.is_empty() {
            TargetModules::AllLinear
        } else {
            TargetModules::names(config.lora.target_modules.iter().cloned())
        },
        use_rslora: config.lora.use_rslora,
        dtype: DType::F32,
        seed: config.seed,
        ..Default::default()
    };
    let builder = if config.quantization.load_in_4bit {
        LinearBuilder::nf4().with_format(BaseFormat::Nf4(Nf4Options {
            double_quant: config.quantization.bnb_4bit_use_double_quant,
            ..Default::default()
        }))
    } else {
        LinearBuilder::dense()
    };
    let builder = builder.with_compute_dtype(dtype).with_lora(lora)?;
    let registry: Arc<LoraRegistry> = builder.lora().context("builder has adapters")?.clone();
    let mut loaded = load_model_with(&config.model_name_or_path, builder, &rt)
        .with_context(|| format!("failed to load model {}", config.model_name_or_path))?;
    loaded
        .model
        .set_attention(config.attn_implementation.kernel())
        .with_context(|| {
            format!(
                "attn_implementation = {} for {}",
                config.attn_implementation.as_str(),
                config.model_name_or_path
            )
        })?;
    // Each entry must match a layer: a typo among good names would otherwise train an adapter
    // quietly missing those layers, and write the typo into adapter_config.json.
    adapterlab_model::engine::check_targets(&loaded, &registry.config().target_modules)
        .with_context(|| format!("lora.target_modules for {}", config.model_name_or_path))?;
    if registry.layers().is_empty() {
        bail!(
            "lora.target_modules {:?} matches no linear layer of {}",
            config.lora.target_modules,
            config.model_name_or_path
        );
    }
    Ok((loaded, registry, rt))
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
    let run_name = env
        .store
        .as_ref()
        .map(|(_, id)| id.clone())
        .unwrap_or_else(|| config.output_dir.clone());
    let trackers = crate::track::Trackers::start(
        &report_to,
        Path::new(&config.output_dir),
        &run_name,
        &settings(config),
    )?;
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

fn train(config: &TrainConfig, env: &TrainEnv) -> Result<TrainOutcome> {
    let started = Instant::now();
    let output_dir = PathBuf::from(&config.output_dir);
    let resume_from = match &env.resume_from_checkpoint {
        Some(spec) => Some(find_checkpoint(&output_dir, spec)?),
        None => None,
    };

    // Data first: a bad row must not cost a model load.
    let splits = data::load_splits(&config.dataset)?;
    let train_rows = data::render(&splits.train, &config.formatter, env.registry.as_ref())?;
    let val_rows = match &splits.validation {
        Some(v) => Some(data::render(v, &config.formatter, env.registry.as_ref())?),
        None => None,
    };

    log(env, format!("loading {}", config.model_name_or_path));
    let (loaded, registry, rt) = load_for_training_on(config, &env.assets_dir, env.device_ordinal)?;
    let device = loaded.model.device().clone();
    // What the run computes in, kept with it: on the CPU that is f32 whatever
    // bnb_4bit_compute_dtype says (16-bit matmuls there are slow and lose precision).
    let compute = rt.compute();
    log(env, format!("computing on {compute}"));
    if let Some((store, id)) = env.store.as_ref().filter(|_| env.is_main()) {
        store.update_run(id, |r| {
            r.metadata
                .insert(RunRecord::COMPUTE.into(), compute.clone());
        })?;
    }
    let tokenizer = match config.tokenizer_name.as_str() {
        "" => loaded.tokenizer.clone().with_context(|| {
            format!(
                "{} has no tokenizer; give tokenizer_name",
                config.model_name_or_path
            )
        })?,
        name => {
            let path = Path::new(name);
            let file = if path.is_dir() {
                path.join("tokenizer.json")
            } else {
                path.to_path_buf()
            };
            tokenizers::Tokenizer::from_file(&file).map_err(|e| {
                anyhow::anyhow!("tokenizer_name: failed to read {}: {e}", file.display())
            })?
        }
    };
    let eos_id = loaded.defaults.eos_token_ids.first().copied();
    let eos = eos_id.and_then(|id| tokenizer.id_to_token(id));
    let pad_id = loaded.defaults.pad_token_id.or(eos_id).unwrap_or(0);
    let model: &dyn CausalLm = &loaded.model;

    let train = data::encode(
        &tokenizer,
        &train_rows,
        eos.as_deref(),
        config.completion_only_loss,
        config.max_seq_length,
        lengths_for(config, config.packs_train()),
    )?;
    report_truncation(env, "train", &train, config.max_seq_length);
    if !train.examples.iter().any(|e| data::n_targets(e) > 0) {
        bail!(
            "train: no row keeps a completion token after truncation to max_seq_length = {}; \
             raise max_seq_length or shorten the prompts",
            config.max_seq_length
        );
    }
    let vocab = model.vocab_size() as u32;
    if let Some(id) = train
        .examples
        .iter()
        .flat_map(|e| e.input_ids.iter())
        .find(|&&id| id >= vocab)
    {
        bail!(
            "the tokenizer produced token id {id}, outside the model's vocabulary of {vocab} \
             (tokenizer_name {:?})",
            config.tokenizer_name
        );
    }
    let val = match &val_rows {
        Some(rows) => Some(data::encode(
            &tokenizer,
            rows,
            eos.as_deref(),
            config.completion_only_loss,
            config.max_seq_length,
            lengths_for(config, config.packs_eval()),
        )?),
        None => None,
    };
    if !config.packs_train()
        && !config.packs_eval()
        && config.packing_strategy != PackingStrategy::Bfd
    {
        // TRL reads the key only when packing; say so rather than let it look applied.
        log(
            env,
            format!(
                "packing_strategy = {} has no effect: neither packing nor eval_packing is on",
                config.packing_strategy.as_str()
            ),
        );
    }
    let generation = GenerationEval::prepare(config, env, &splits)?;
    // The rows batches are made of: the examples, or with `packing` the packed rows.
    let train_rows = training_rows(env, "train", &train, config, config.packs_train());
    let val_rows = val
        .as_ref()
        .map(|v| training_rows(env, "validation", v, config, config.packs_eval()));
    let lengths: Vec<usize> = train_rows.iter().map(|r| r.row.input_ids.len()).collect();
    let bs = config.per_device_train_batch_size;
    let accum = config.gradient_accumulation_steps;
    let (rank, world) = (env.rank(), env.world_size());
    // An optimizer step takes `accum` micro-batches on each rank, HF's global batch of
    // per-device batch × accumulation × world size.
    let per_step = accum * world;
    let groups = env.sum_in_groups.max(1);
    if !accum.is_multiple_of(groups) {
        bail!("sum_in_groups {groups} does not divide gradient_accumulation_steps {accum}");
    }
    let batches_per_epoch = lengths.len().div_ceil(bs);
    let steps_per_epoch = batches_per_epoch.div_ceil(per_step).max(1);
    let max_steps = if config.max_steps > 0 {
        config.max_steps as usize
    } else {
        (config.num_train_epochs * steps_per_epoch as f64).ceil() as usize
    };
    let warmup = warmup_steps(config.warmup_steps, config.warmup_ratio, max_steps);

    let mut opt = adapter_optimizer(config, &registry)?;
    let trainable: usize = opt.vars().iter().map(|(_, v)| v.elem_count()).sum();
    if let Some(comm) = &env.comm {
        log(
            env,
            format!(
                "data parallel over {world} ranks ({}): global batch {} = {bs} a device × {accum} accumulation × {world}",
                comm.backend(),
                bs * accum * world
            ),
        );
    }
    log(
        env,
        format!(
            "training {max_steps} steps on {} examples{} ({steps_per_epoch} steps an epoch), {trainable} trainable parameters",
            train.examples.len(),
            if config.packs_train() {
                format!(" in {} packed rows", lengths.len())
            } else {
                String::new()
            }
        ),
    );
    tracing::info!(
        examples = train.examples.len(),
        rows = lengths.len(),
        max_steps,
        steps_per_epoch,
        trainable,
        "training"
    );

    let mut state = ResumeState {
        global_step: 0,
        adam_step: 0,
        seed: config.seed,
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
        world_size: Some(world),
        micro_batches_per_step: Some(per_step),
    };
    if let Some(dir) = &resume_from {
        state = load_checkpoint(dir, &mut opt, &device)?;
        let before = state.micro_batches_per_step.unwrap_or(accum);
        if before != per_step {
            log(
                env,
                format!(
                    "{} was made with {before} micro-batches a step, this run takes {per_step} \
                     ({world} ranks × {accum}): steps after it see another slice of the data \
                     than the original run would have",
                    dir.display()
                ),
            );
        }
        state.world_size = Some(world);
        state.micro_batches_per_step = Some(per_step);
        if state.seed != config.seed {
            bail!(
                "{} was made with seed {}, the config says {}",
                dir.display(),
                state.seed,
                config.seed
            );
        }
        log(
            env,
            format!(
                "resuming from {} at step {}",
                dir.display(),
                state.global_step
            ),
        );
    }
    // Every rank starts from rank 0's adapter (seeded alike already; this makes it so).
    if let Some(comm) = &env.comm {
        let weights: Vec<Option<Tensor>> = opt
            .vars()
            .iter()
            .map(|(_, v)| Some(v.as_tensor().clone()))
            .collect();
        let mut buf = pack(&weights, opt.vars())?;
        comm.broadcast(&mut buf)?;
        for ((_, var), t) in opt.vars().iter().zip(unpack(&buf, opt.vars())?) {
            var.set(&t)?;
        }
    }
    if env.is_main() {
        std::fs::create_dir_all(&output_dir)
            .with_context(|| format!("failed to create {}", output_dir.display()))?;
        remove_stale_temporaries(&output_dir);
    }

    let evaluate = |registry: &LoraRegistry| -> Result<Option<f64>> {
        let Some(val) = &val_rows else {
            return Ok(None);
        };
        registry.set_training(false);
        // Without packing `data::encode` has left out the rows without a target token.
        if !val.iter().any(|r| data::n_targets(&r.row) > 0) {
            return Ok(None);
        }
        Ok(Some(
            loss_on_packed(model, val, config.per_device_eval_batch_size.max(1))?.loss,
        ))
    };
    // Rank 0 evaluates alone; the others meet it at the next step's all-reduce.
    let evaluates = config.eval_strategy != "no" && env.is_main();
    // One evaluation: the validation loss, and with `generation_eval` the generation metrics.
    // Logged as HF logs it (one log_history entry); the pre-training one only as an event,
    // since HF's log_history has no step-0 entry without `eval_on_start`.
    let evaluate_all = |registry: &LoraRegistry,
                        state: &mut ResumeState,
                        epoch: f64,
                        in_history: bool|
     -> Result<Option<f64>> {
        let started = Instant::now();
        let loss = evaluate(registry)?;
        let scores = match &generation {
            Some(g) => {
                registry.set_training(false);
                g.score(&loaded, env, state.global_step)?
            }
            None => BTreeMap::new(),
        };
        let runtime = started.elapsed().as_secs_f64();
        if loss.is_none() && scores.is_empty() {
            return Ok(None);
        }
        let mut metrics: BTreeMap<String, f64> = scores
            .iter()
            .map(|(k, v)| (format!("eval_{k}"), *v))
            .collect();
        if let Some(g) = &generation {
            metrics.insert("eval_runtime".into(), round4(runtime));
            metrics.insert(
                "eval_samples_per_second".into(),
                round4(g.rows.len() as f64 / runtime.max(1e-9)),
            );
        }
        if in_history {
            let mut entry = json!({"epoch": epoch, "step": state.global_step});
            if let Some(l) = loss {
                entry["eval_loss"] = json!(l);
            }
            for (k, v) in &metrics {
                entry[k] = json!(v);
            }
            state.log_history.push(entry);
        }
        let shown: Vec<String> = loss
            .map(|l| format!("eval_loss {l:.4}"))
            .into_iter()
            .chain(scores.iter().map(|(k, v)| format!("eval_{k} {v:.4}")))
            .collect();
        log(
            env,
            format!(
                "evaluation at step {}: {} ({runtime:.1} s)",
                state.global_step,
                shown.join(", ")
            ),
        );
        record(
            env,
            RunEvent::Loss {
                step: state.global_step as u64,
                epoch,
                loss: None,
                eval_loss: loss,
                learning_rate: None,
                grad_norm: None,
                tokens_per_second: None,
                eta_seconds: None,
                memory_bytes: None,
                gpu_memory_bytes: None,
                eval_metrics: metrics.clone(),
            },
        );
        // The pre-training evaluation is a baseline, not a candidate (HF's `eval_on_start`).
        if let Some(name) = config.best_metric_name().filter(|_| in_history) {
            let value = if name == "eval_loss" {
                loss
            } else {
                metrics.get(&name).copied()
            };
            if let Some(v) = value.filter(|v| v.is_finite()) {
                let better = match state.best_metric {
                    None => true,
                    Some(best) if config.greater_is_better() => v > best,
                    Some(best) => v < best,
                };
                if better {
                    state.best_metric = Some(v);
                    state.best_step = Some(state.global_step);
                }
            }
        }
        Ok(loss)
    };
    let mut last_eval_loss: Option<Option<f64>> = None;
    let mut evaluated_at: Option<usize> = None;
    if resume_from.is_none() && evaluates && (val.is_some() || generation.is_some()) {
        state.first_eval_loss = evaluate_all(&registry, &mut state, 0.0, false)?;
    }

    let bar = progress_bar(env.progress_bar, max_steps, state.global_step);
    let mut epoch_cache: Option<(usize, Vec<Vec<usize>>)> = None;
    let mut window_started = Instant::now();
    let mut window_tokens = 0u64;
    let mut peak = memory::InUse::default();
    let mut steps_this_run = 0usize;
    let mut stopped_early = false;
    let save_opts = SaveOptions {
        base_model_name_or_path: Some(config.model_name_or_path.clone()),
        ..Default::default()
    };

    while state.global_step < max_steps {
        let mut stop = env
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
            || env.stop_after_steps.is_some_and(|n| steps_this_run >= n);
        if let Some(comm) = &env.comm {
            // One rank's cancel stops them all at the same step.
            let mut flag = [f32::from(u8::from(stop))];
            comm.all_reduce_sum(&mut flag)?;
            stop = flag[0] > 0.0;
        }
        if stop {
            stopped_early = true;
            let wanted = env
                .checkpoint_on_stop
                .as_ref()
                .is_some_and(|c| c.load(Ordering::SeqCst));
            let saved_already =
                config.save_steps > 0 && state.global_step.is_multiple_of(config.save_steps);
            if wanted && steps_this_run > 0 && !saved_already && env.is_main() {
                // The steps' events are made durable before the checkpoint that skips them.
                flush_store(env);
                save_checkpoint(
                    &output_dir,
                    config,
                    &registry,
                    &opt,
                    &state,
                    &save_opts,
                    max_steps,
                    steps_per_epoch,
                )?;
                log(
                    env,
                    format!("stopped; checkpoint-{} written", state.global_step),
                );
                flush_store(env);
            }
            break;
        }
        let epoch = state.global_step / steps_per_epoch;
        let window = state.global_step % steps_per_epoch;
        if epoch_cache.as_ref().is_none_or(|(e, _)| *e != epoch) {
            epoch_cache = Some((
                epoch,
                data::epoch_batches(&lengths, bs, config.sampling(), config.seed, epoch as u64),
            ));
        }
        let batches = &epoch_cache.as_ref().expect("cached").1;
        // The step's micro-batches over all ranks; rank r takes the r-th run of `accum`. The
        // counts every rank needs are the whole window's, known without communication.
        let step_batches = &batches
            [(window * per_step).min(batches.len())..((window + 1) * per_step).min(batches.len())];
        let total_targets: usize = step_batches
            .iter()
            .flatten()
            .map(|&i| data::n_targets(&train_rows[i].row))
            .sum();
        let step_tokens: usize = step_batches
            .iter()
            .flatten()
            .map(|&i| train_rows[i].row.input_ids.len())
            .sum();
        let mine =
            (rank * accum).min(step_batches.len())..((rank + 1) * accum).min(step_batches.len());
        let collated = step_batches[mine.clone()]
            .iter()
            .map(|idx| {
                data::collate_packed(
                    &idx.iter().map(|&i| &train_rows[i]).collect::<Vec<_>>(),
                    pad_id,
                    &device,
                )
            })
            .collect::<Result<Vec<_>>>()?;

        registry.set_training(true);
        let mut step_loss = 0.0;
        // One process alone keeps the gradients as tensors; otherwise each group's sum is
        // packed and the packed sums are added in order, then across ranks in rank order.
        let packed = env.comm.is_some() || groups > 1;
        let group_len = accum / groups;
        let mut grads: Vec<Option<Tensor>> = vec![None; opt.vars().len()];
        let mut partial: Option<Vec<f32>> = None;
        for g in 0..groups {
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
                step_loss +=
                    accumulate_micro_batch(model, batch, total_targets, opt.vars(), &mut grads)?;
            }
            if packed {
                let part = pack(
                    &std::mem::replace(&mut grads, vec![None; opt.vars().len()]),
                    opt.vars(),
                )?;
                match &mut partial {
                    None => partial = Some(part),
                    Some(acc) => crate::train::dist::add_into(acc, &part),
                }
            }
        }
        if let Some(mut buf) = partial {
            if let Some(comm) = &env.comm {
                // The loss rides along: one all-reduce a step.
                buf.push(step_loss as f32);
                comm.all_reduce_sum(&mut buf)?;
                step_loss = f64::from(buf.pop().unwrap_or_default());
            }
            grads = unpack(&buf, opt.vars())?.into_iter().map(Some).collect();
        }
        state.next_micro_batch += step_batches.len() as u64;
        state.tokens_seen += step_tokens as u64;
        window_tokens += step_tokens as u64;
        let lr = config.learning_rate
            * lr_lambda(
                config.lr_scheduler_type,
                state.global_step,
                warmup,
                max_steps,
            );
        let last_grad_norm = apply_gradients(&mut opt, grads, config.max_grad_norm, lr)?;
        state.global_step += 1;
        state.adam_step = opt.step;
        state.epoch = state.global_step / steps_per_epoch;
        state.window = state.global_step % steps_per_epoch;
        state.pending_losses.push(step_loss);
        state.all_losses_sum += step_loss;
        steps_this_run += 1;
        let epoch_f = round4(state.global_step as f64 / steps_per_epoch as f64);
        let is_last = state.global_step == max_steps;

        let logged = state
            .global_step
            .is_multiple_of(config.logging_steps.max(1))
            || is_last;
        let used = memory::in_use(&device);
        peak = peak.max_with(used);
        // Every step, logged ones included: a logged step's `Loss` carries the mean over the
        // logging window (HF's), which on the chart would stand out from its neighbours.
        let per_step = started.elapsed().as_secs_f64() / steps_this_run as f64;
        record(
            env,
            RunEvent::Step {
                step: state.global_step as u64,
                epoch: epoch_f,
                loss: step_loss,
                learning_rate: config.learning_rate
                    * lr_lambda(
                        config.lr_scheduler_type,
                        state.global_step,
                        warmup,
                        max_steps,
                    ),
                grad_norm: last_grad_norm,
                eta_seconds: Some(per_step * (max_steps - state.global_step) as f64),
                tokens_per_second: Some(
                    window_tokens as f64 / window_started.elapsed().as_secs_f64().max(1e-9),
                ),
                memory_bytes: used.rss_bytes,
                gpu_memory_bytes: used.gpu_bytes,
            },
        );
        if !logged {
            record_progress(env, state.global_step, max_steps);
        }
        if logged {
            let mean = state.pending_losses.iter().sum::<f64>() / state.pending_losses.len() as f64;
            state.pending_losses.clear();
            let next_lr = config.learning_rate
                * lr_lambda(
                    config.lr_scheduler_type,
                    state.global_step,
                    warmup,
                    max_steps,
                );
            let secs = window_started.elapsed().as_secs_f64().max(1e-9);
            let tps = window_tokens as f64 / secs;
            let per_step = started.elapsed().as_secs_f64() / steps_this_run as f64;
            let eta = per_step * (max_steps - state.global_step) as f64;
            window_started = Instant::now();
            window_tokens = 0;
            state.log_history.push(json!({
                "epoch": epoch_f, "grad_norm": last_grad_norm, "learning_rate": next_lr, "loss": round4(mean), "step": state.global_step,
            }));
            bar.set_message(format!("loss {mean:.4} · {tps:.0} tok/s"));
            // The terminal has the progress bar; the dashboard's log gets a line per log step.
            record(
                env,
                RunEvent::Log {
                    level: "info".into(),
                    message: format!(
                        "step {}/{max_steps} · loss {mean:.4} · lr {next_lr:.3e} · {tps:.0} tok/s",
                        state.global_step
                    ),
                },
            );
            record(
                env,
                RunEvent::Loss {
                    step: state.global_step as u64,
                    epoch: epoch_f,
                    loss: Some(mean),
                    eval_loss: None,
                    learning_rate: Some(next_lr),
                    grad_norm: Some(last_grad_norm),
                    tokens_per_second: Some(tps),
                    eta_seconds: Some(eta),
                    memory_bytes: used.rss_bytes,
                    gpu_memory_bytes: used.gpu_bytes,
                    eval_metrics: BTreeMap::new(),
                },
            );
            record_progress(env, state.global_step, max_steps);
        }
        let eval_now = match config.eval_strategy.as_str() {
            "steps" => config.eval_steps > 0 && state.global_step.is_multiple_of(config.eval_steps),
            "epoch" => state.global_step.is_multiple_of(steps_per_epoch),
            _ => false,
        };
        if eval_now && env.is_main() {
            // At the last step too, before its checkpoint, so the checkpoint can be the best.
            last_eval_loss = Some(evaluate_all(&registry, &mut state, epoch_f, true)?);
            evaluated_at = Some(state.global_step);
            registry.set_training(true);
        }
        if config.save_steps > 0
            && state.global_step.is_multiple_of(config.save_steps)
            && env.is_main()
        {
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
            flush_store(env);
            save_checkpoint(
                &output_dir,
                config,
                &registry,
                &opt,
                &state,
                &save_opts,
                max_steps,
                steps_per_epoch,
            )?;
        }
        bar.inc(1);
    }
    bar.finish_and_clear();

    let mut outcome = TrainOutcome {
        output_dir: output_dir.clone(),
        adapter_dir: None,
        global_step: state.global_step,
        max_steps,
        train_examples: train.examples.len(),
        truncated: train.truncated,
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
        } else if evaluates {
            let epoch = round4(state.global_step as f64 / steps_per_epoch as f64);
            outcome.final_eval_loss = evaluate_all(&registry, &mut state, epoch, true)?;
        }
        if config.load_best_model_at_end {
            load_best(&registry, &state, env)?;
        }
        state.log_history.push(json!({
            "epoch": round4(state.global_step as f64 / steps_per_epoch as f64),
            "step": state.global_step,
            "total_flos": 0.0,
            "train_loss": outcome.train_loss,
            "train_runtime": round4(started.elapsed().as_secs_f64()),
            "train_samples_per_second": round4((state.global_step * bs * per_step) as f64 / started.elapsed().as_secs_f64().max(1e-9)),
            "train_steps_per_second": round4(steps_this_run as f64 / started.elapsed().as_secs_f64().max(1e-9)),
        }));
        peft::save_adapter(&output_dir, &registry, &save_opts)?;
        log(
            env,
            format!("saved the adapter in {}", output_dir.display()),
        );
        write_json(
            &output_dir.join(TRAINER_STATE_FILE),
            &trainer_state(config, &state, max_steps, steps_per_epoch),
        )?;
        outcome.adapter_dir = Some(output_dir.clone());
        if !config.eval_after_train.is_empty() {
            let (name, split) = match (&splits.validation, &splits.test) {
                (Some(v), _) => ("validation", v),
                (None, Some(t)) => ("test", t),
                (None, None) => bail!(
                    "eval_after_train needs a validation or test split in {}",
                    config.dataset
                ),
            };
            registry.set_training(false);
            let rows = predict::prompt_rows(split, &config.formatter, env.registry.as_ref())?;
            log(
                env,
                format!(
                    "generating on {} rows of {} for eval_after_train",
                    rows.len(),
                    split.origin
                ),
            );
            outcome.predictions =
                predict::predict(&loaded, &rows, &Sampling::default(), None, |_| Ok(()))?;
            outcome.predictions_split = Some(name.to_string());
        }
    }
    outcome.log_history = state.log_history;
    Ok(outcome)
}

/// `load_best_model_at_end`: the best checkpoint's adapter weights replace the last ones,
/// so the adapter saved in `output_dir` is the best one.
fn load_best(registry: &LoraRegistry, state: &ResumeState, env: &TrainEnv) -> Result<()> {
    let (Some(dir), Some(step), Some(value)) =
        (&state.best_checkpoint, state.best_step, state.best_metric)
    else {
        log(
            env,
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
    log(
        env,
        format!("loaded the best checkpoint, {dir} (step {step}, {value:.4})"),
    );
    Ok(())
}

/// `[generation_eval]` made ready: the validation rows to generate for, the metric plugins,
/// the decoding settings.
struct GenerationEval {
    rows: Vec<PromptRow>,
    plugins: Vec<crate::plugin::Plugin>,
    metrics: Vec<String>,
    sampling: Sampling,
}

impl GenerationEval {
    fn prepare(
        config: &TrainConfig,
        env: &TrainEnv,
        splits: &data::Splits,
    ) -> Result<Option<Self>> {
        let g = &config.generation_eval;
        if g.metrics.is_empty() || config.eval_strategy == "no" {
            if let Some(name) = config.best_metric_name().filter(|n| n != "eval_loss") {
                bail!(
                    "metric_for_best_model: {name} is not logged; only eval_loss is without generation_eval.metrics"
                );
            }
            return Ok(None);
        }
        let registry = env
            .registry
            .as_ref()
            .context("generation_eval needs the plugin registry")?;
        let split = splits.validation.as_ref().with_context(|| {
            format!(
                "generation_eval needs a validation split in {}",
                config.dataset
            )
        })?;
        let head = data::Split {
            origin: split.origin.clone(),
            rows: split.rows.iter().take(g.rows).cloned().collect(),
        };
        let rows = predict::prompt_rows(&head, &config.formatter, Some(registry))?;
        let plugins =
            crate::eval::pipeline::validate_metrics(registry, &g.metrics, &Default::default())
                .context("generation_eval.metrics")?;
        if let Some(name) = config.best_metric_name() {
            let logged: Vec<String> = std::iter::once("eval_loss".to_string())
                .chain(
                    plugins
                        .iter()
                        .flat_map(|p| p.meta.scores.iter().map(|s| format!("eval_{}", s.name))),
                )
                .collect();
            if !logged.contains(&name) {
                bail!(
                    "metric_for_best_model: {name} is not logged (logged: {})",
                    logged.join(", ")
                );
            }
        }
        Ok(Some(GenerationEval {
            rows,
            plugins,
            metrics: g.metrics.clone(),
            sampling: Sampling {
                max_new_tokens: g.max_new_tokens,
                temperature: g.temperature as f32,
                top_p: (g.top_p < 1.0).then_some(g.top_p as f32),
                top_k: (g.top_k > 0).then_some(g.top_k),
                repetition_penalty: g.repetition_penalty as f32,
                seed: config.seed,
                batch_size: config.per_device_eval_batch_size.max(1),
            },
        }))
    }

    /// Generates for the rows with the adapter as it is now and scores the generations with
    /// the metric plugins (in a scratch store): each score's mean.
    fn score(
        &self,
        loaded: &LoadedModel,
        env: &TrainEnv,
        step: usize,
    ) -> Result<BTreeMap<String, f64>> {
        let predictions = predict::predict(loaded, &self.rows, &self.sampling, None, |_| Ok(()))?;
        let request = crate::eval::pipeline::EvalRequest {
            name: format!("generation_eval step {step}"),
            rows: predictions,
            metrics: self.metrics.clone(),
            settings: Default::default(),
            score_references: false,
            metadata: Default::default(),
            llm_base_url: None,
        };
        let scratch = Store::temporary()?;
        let run = crate::eval::pipeline::create_run(&scratch, &request, &self.plugins)?;
        let eval_env = crate::eval::pipeline::EvalEnv {
            store: scratch,
            services: Arc::new(crate::plugin::NoServices),
            cancel: env.cancel.clone().unwrap_or_default(),
            on_progress: Arc::new(|_, _| {}),
            stopped_because: crate::eval::pipeline::EvalEnv::user_stops(),
        };
        let done = crate::eval::pipeline::execute(&eval_env, &run.id, &request, &self.plugins)?;
        if let Some(e) = &done.error {
            log(env, format!("generation_eval at step {step}: {e}"));
        }
        Ok(done
            .aggregates
            .iter()
            .map(|(k, e)| (k.clone(), e.mean))
            .collect())
    }
}

/// How a split is tokenized: packed by a strategy that splits long examples, they stay whole.
fn lengths_for(config: &TrainConfig, packed: bool) -> data::Lengths {
    match (packed, config.packing_strategy) {
        (false, _) => data::Lengths::Truncate,
        (true, PackingStrategy::Bfd) => data::Lengths::TruncateKeepAll,
        (true, PackingStrategy::BfdSplit | PackingStrategy::Wrapped) => data::Lengths::KeepWhole,
    }
}

/// The rows a split's batches are made of: each example alone, or when `packed` the examples
/// packed into rows of up to `max_seq_length` tokens (logged with how full they are).
fn training_rows(
    env: &TrainEnv,
    split: &str,
    enc: &Encoded,
    config: &TrainConfig,
    packed: bool,
) -> Vec<data::Packed> {
    if !packed {
        return enc
            .examples
            .iter()
            .cloned()
            .map(data::Packed::single)
            .collect();
    }
    let (examples, n) = (&enc.examples, config.max_seq_length);
    let rows = match config.packing_strategy {
        PackingStrategy::Bfd => data::pack::pack_bfd(examples, n),
        PackingStrategy::BfdSplit => data::pack::pack_bfd_split(examples, n),
        PackingStrategy::Wrapped => {
            data::pack::pack_wrapped(examples, n, !config.completion_only_loss)
        }
    };
    log(
        env,
        format!(
            "{split}: packed {} examples into {} rows of up to {} tokens ({}, {:.1}% full)",
            enc.examples.len(),
            rows.len(),
            config.max_seq_length,
            config.packing_strategy.as_str(),
            100.0 * data::pack::fill(&rows, config.max_seq_length)
        ),
    );
    rows
}

fn report_truncation(env: &TrainEnv, split: &str, enc: &Encoded, max: usize) {
    if enc.longer > enc.truncated {
        log(
            env,
            format!(
                "{split}: {} of {} examples are longer than max_seq_length = {max} tokens and are split across packed rows",
                enc.longer - enc.truncated,
                enc.examples.len()
            ),
        );
    }
    if enc.truncated > 0 {
        log(
            env,
            format!(
                "{split}: {} of {} examples truncated to max_seq_length = {max} tokens",
                enc.truncated,
                enc.examples.len() + enc.no_targets
            ),
        );
    }
    if enc.no_targets > 0 {
        log(
            env,
            format!(
                "{split}: {} examples keep no completion token after truncation and are left out, as TRL leaves them out",
                enc.no_targets
            ),
        );
    }
}

/// A line for the person watching: on the terminal, and in the run's events for the dashboard.
/// Only rank 0 speaks; the others would repeat it.
fn log(env: &TrainEnv, message: String) {
    if !env.is_main() {
        return;
    }
    eprintln!("{message}");
    record(
        env,
        RunEvent::Log {
            level: "info".into(),
            message,
        },
    );
}

fn record(env: &TrainEnv, event: RunEvent) {
    if !env.is_main() {
        return;
    }
    if let Some(trackers) = &env.trackers {
        trackers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .event(&event);
    }
    // A resumed run redoes the steps after its checkpoint; the store has their events.
    let recorded = match &event {
        RunEvent::Loss { step, .. } => env.skip_loss_through.is_some_and(|t| *step <= t),
        RunEvent::Step { step, .. } => env.skip_steps_through.is_some_and(|t| *step <= t),
        _ => false,
    };
    if recorded {
        return;
    }
    if let Some((store, run_id)) = &env.store
        && let Err(e) = store.push_event(run_id, &event)
    {
        tracing::warn!("failed to record a training event: {e:#}");
    }
}

/// After a checkpoint: the store's record of the run is made durable as far as the checkpoint
/// goes, so a crash loses no logged step that a resume would not redo.
fn flush_store(env: &TrainEnv) {
    if let Some((store, _)) = &env.store
        && let Err(e) = store.flush()
    {
        tracing::warn!("failed to flush the store: {e:#}");
    }
}

fn record_progress(env: &TrainEnv, done: usize, total: usize) {
    if let Some((store, run_id)) = &env.store {
        let _ = store.update_run(run_id, |r| {
            r.progress.done = done as u64;
            r.progress.total = total as u64;
            r.progress.unit = "steps".into();
        });
        record(
            env,
            RunEvent::Progress {
                done: done as u64,
                total: total as u64,
                unit: "steps".into(),
            },
        );
    }
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

fn round4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

/// HF Trainer's `trainer_state.json`.
fn trainer_state(
    config: &TrainConfig,
    state: &ResumeState,
    max_steps: usize,
    steps_per_epoch: usize,
) -> Value {
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
        "max_steps": max_steps,
        "num_input_tokens_seen": state.tokens_seen,
        "num_train_epochs": max_steps.div_ceil(steps_per_epoch),
        "save_steps": config.save_steps,
        "stateful_callbacks": {},
        "total_flos": 0.0,
        "train_batch_size": config.per_device_train_batch_size,
        "trial_name": null,
        "trial_params": null,
    })
}

/// Gradients (`None`: zero) or weights as one flat `f32` buffer in `vars` order: one copy to
/// the host, one collective.
fn pack(tensors: &[Option<Tensor>], vars: &[(String, Var)]) -> Result<Vec<f32>> {
    let flat = tensors
        .iter()
        .zip(vars)
        .map(|(t, (_, v))| match t {
            Some(t) => t.flatten_all()?.to_dtype(DType::F32),
            None => Tensor::zeros(v.elem_count(), DType::F32, v.device()),
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    if flat.is_empty() {
        return Ok(Vec::new());
    }
    Ok(Tensor::cat(&flat, 0)?.to_vec1::<f32>()?)
}

/// [`pack`]'s inverse: one tensor per var, its shape, dtype and device.
fn unpack(buf: &[f32], vars: &[(String, Var)]) -> Result<Vec<Tensor>> {
    let mut at = 0;
    vars.iter()
        .map(|(name, v)| {
            let n = v.elem_count();
            let part = buf
                .get(at..at + n)
                .with_context(|| format!("packed buffer too short for {name}"))?;
            at += n;
            Ok(Tensor::from_slice(part, v.shape(), v.device())?.to_dtype(v.dtype())?)
        })
        .collect()
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text + "\n").with_context(|| format!("failed to write {}", path.display()))
}

/// Writes `checkpoint-N` into a temporary folder, syncs it, then renames it into place, so a
/// kill at any moment leaves either a whole checkpoint or none.
#[allow(clippy::too_many_arguments)]
fn save_checkpoint(
    output_dir: &Path,
    config: &TrainConfig,
    registry: &LoraRegistry,
    opt: &AdamW,
    state: &ResumeState,
    save_opts: &SaveOptions,
    max_steps: usize,
    steps_per_epoch: usize,
) -> Result<PathBuf> {
    let name = format!("checkpoint-{}", state.global_step);
    let tmp = output_dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("failed to create {}", tmp.display()))?;
    peft::save_adapter(&tmp, registry, save_opts)?;
    let opt_tensors: HashMap<String, Tensor> = opt
        .state_tensors()
        .into_iter()
        .map(|(k, t)| t.to_device(&Device::Cpu).map(|t| (k, t)))
        .collect::<candle_core::Result<_>>()?;
    candle_core::safetensors::save(&opt_tensors, tmp.join(OPTIMIZER_FILE))?;
    write_json(&tmp.join(STATE_FILE), state)?;
    write_json(
        &tmp.join(TRAINER_STATE_FILE),
        &trainer_state(config, state, max_steps, steps_per_epoch),
    )?;
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
    if let Some(limit) = config.save_total_limit {
        prune_checkpoints(
            output_dir,
            limit,
            state.best_checkpoint.as_deref().map(Path::new),
        )?;
    }
    Ok(dest)
}

/// Half-written checkpoints of a killed run (`.checkpoint-N.tmp-PID`) are never used; drop them.
fn remove_stale_temporaries(output_dir: &Path) {
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

fn load_checkpoint(dir: &Path, opt: &mut AdamW, device: &Device) -> Result<ResumeState> {
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
