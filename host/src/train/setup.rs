//! What a run trains on, made ready before its first step: the model loaded as the config has
//! it trained (the base frozen, NF4 with `load_in_4bit`, adapters on the target modules), the
//! splits read, rendered, tokenized and, with `packing`, packed into the rows batches are made
//! of. Dataset problems are found before the model loads.

use std::path::Path;
use std::sync::Arc;

use adapterlab_model::engine::{
    BaseFormat, CausalLm, Engine, Fetcher, LinearBuilder, LoadedModel, LoraConfig, LoraRegistry,
    Nf4Options, TargetModules, load_model_with,
};
use anyhow::{Context as _, Result, bail};
use candle_core::{DType, Device};

use crate::data::{self, Encoded};
use crate::store::RunRecord;
use crate::train::TrainEnv;
use crate::train::config::{ComputeDtype, PackingStrategy, TrainConfig};
use crate::train::evaluate::GenerationEval;

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
    match config.gpu_compute_dtype() {
        ComputeDtype::Float32 => DType::F32,
        ComputeDtype::Float16 => DType::F16,
        ComputeDtype::Bfloat16 => DType::BF16,
    }
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

/// What a run trains on, made ready before the first step: the model with its adapters, the
/// splits tokenized (and packed) into the rows batches are made of.
pub(crate) struct Prepared {
    pub splits: data::Splits,
    pub loaded: LoadedModel,
    pub registry: Arc<LoraRegistry>,
    pub pad_id: u32,
    /// The training split's examples (before packing).
    pub train: Encoded,
    pub train_rows: Vec<data::Packed>,
    pub val_rows: Option<Vec<data::Packed>>,
    pub generation: Option<GenerationEval>,
}

/// Reads and checks the data, loads the model, tokenizes. Dataset problems are reported before
/// the model loads: a bad row must not cost a model load.
pub(crate) fn prepare(config: &TrainConfig, env: &TrainEnv) -> Result<Prepared> {
    let splits = data::load_splits(&config.dataset)?;
    let train_text = data::render(
        &splits.train,
        &config.formatter,
        config.text_field(),
        env.registry.as_ref(),
    )?;
    let val_text = match &splits.validation {
        Some(v) => Some(data::render(
            v,
            &config.formatter,
            config.text_field(),
            env.registry.as_ref(),
        )?),
        None => None,
    };

    env.log(format!("loading {}", config.model_name_or_path));
    let (loaded, registry, rt) = load_for_training_on(config, &env.assets_dir, env.device_ordinal)?;
    // What the run computes in, kept with it: on the CPU that is f32 whatever bf16, fp16 and
    // bnb_4bit_compute_dtype say (16-bit matmuls there are slow and lose precision).
    let compute = rt.compute();
    env.log(format!("computing on {compute}"));
    if let Some((store, id)) = env.store.as_ref().filter(|_| env.is_main()) {
        store.update_run(id, |r| {
            r.metadata
                .insert(RunRecord::COMPUTE.into(), compute.clone());
        })?;
    }
    let tokenizer = tokenizer_for(config, &loaded)?;
    let eos = match config.eos_token.as_str() {
        "" => loaded
            .defaults
            .eos_token_ids
            .first()
            .and_then(|&id| tokenizer.id_to_token(id)),
        // A token the tokenizer would split is no end-of-sequence token.
        token => match tokenizer.token_to_id(token) {
            Some(_) => Some(token.to_string()),
            None => bail!(
                "eos_token {token:?} is not a token of the tokenizer of {}",
                config.model_name_or_path
            ),
        },
    };
    let pad_id = loaded.defaults.pad_id();

    let train = data::encode(
        &tokenizer,
        &train_text,
        eos.as_deref(),
        loaded.defaults.chat_template.as_ref(),
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
    let vocab = loaded.model.vocab_size() as u32;
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
    let val = match &val_text {
        Some(rows) => Some(data::encode(
            &tokenizer,
            rows,
            eos.as_deref(),
            loaded.defaults.chat_template.as_ref(),
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
        env.log(format!(
            "packing_strategy = {} has no effect: neither packing nor eval_packing is on",
            config.packing_strategy.as_str()
        ));
    }
    let generation = GenerationEval::prepare(config, env, &splits)?;
    let train_rows = training_rows(env, "train", &train, config, config.packs_train());
    let val_rows = val
        .as_ref()
        .map(|v| training_rows(env, "validation", v, config, config.packs_eval()));
    Ok(Prepared {
        splits,
        loaded,
        registry,
        pad_id,
        train,
        train_rows,
        val_rows,
        generation,
    })
}

/// `tokenizer_name` (a `tokenizer.json` or a folder holding one), else the model's own.
fn tokenizer_for(config: &TrainConfig, loaded: &LoadedModel) -> Result<tokenizers::Tokenizer> {
    match config.tokenizer_name.as_str() {
        "" => loaded.tokenizer.clone().with_context(|| {
            format!(
                "{} has no tokenizer; give tokenizer_name",
                config.model_name_or_path
            )
        }),
        name => {
            let path = Path::new(name);
            let file = if path.is_dir() {
                path.join("tokenizer.json")
            } else {
                path.to_path_buf()
            };
            tokenizers::Tokenizer::from_file(&file).map_err(|e| {
                anyhow::anyhow!("tokenizer_name: failed to read {}: {e}", file.display())
            })
        }
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
    env.log(format!(
        "{split}: packed {} examples into {} rows of up to {} tokens ({}, {:.1}% full)",
        enc.examples.len(),
        rows.len(),
        config.max_seq_length,
        config.packing_strategy.as_str(),
        100.0 * data::pack::fill(&rows, config.max_seq_length)
    ));
    rows
}

fn report_truncation(env: &TrainEnv, split: &str, enc: &Encoded, max: usize) {
    if enc.longer > enc.truncated {
        env.log(format!(
                "{split}: {} of {} examples are longer than max_seq_length = {max} tokens and are split across packed rows",
                enc.longer - enc.truncated,
                enc.examples.len()
            ),
        );
    }
    if enc.truncated > 0 {
        env.log(format!(
            "{split}: {} of {} examples truncated to max_seq_length = {max} tokens",
            enc.truncated,
            enc.examples.len() + enc.no_targets
        ));
    }
    if enc.no_targets > 0 {
        env.log(format!(
                "{split}: {} examples keep no completion token after truncation and are left out, as TRL leaves them out",
                enc.no_targets
            ),
        );
    }
}
