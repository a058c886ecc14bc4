//! The crate's front door, what the host's CLI, server and trainer call: model resolution and
//! loading, the one adapter attach path ([`with_adapter`]), parameter counts, generation, chat
//! completion and evaluation loss. Every entry resolves a model name the same way: `smollm2`
//! (the default asset), a local checkpoint folder, a `.gguf` file, or a hub id.

pub mod device;
pub mod export;
pub mod generate;
pub mod loss;

// What the host uses of the wings below, named here so that the host has one door into the
// crate (host/model/tests/layering.rs checks that it uses no other).
pub use crate::io::assets::{Fetcher, MINILM};
#[cfg(feature = "cuda")]
pub use crate::lora::kernels::{GradOut, train_da, train_h, train_h_keeping, trains};
pub use crate::lora::merge::merge_model_dir;
pub use crate::lora::peft;
pub use crate::lora::train_node::{Adapter, Dropout, Input, lora_linear};
pub use crate::lora::{LoraConfig, LoraRegistry, TargetModules};
pub use crate::models::bert::{Bert, embed, prepare_tokenizer};
pub use crate::models::chat::{ChatTemplate, Message};
pub use crate::models::load::{LoadOptions, LoadedModel, load};
pub use crate::nn::causal_lm::CausalLm;
pub use crate::nn::checkpoint;
pub use crate::nn::linear::{BaseFormat, LinearBuilder};
pub use crate::ops::attention::{AttentionContext, AttentionKernel, PackedAttention, attend_in};
pub use crate::ops::cross_entropy::cross_entropy_sum;
pub use crate::ops::epilogue::Epilogue;
#[cfg(feature = "cuda")]
pub use crate::ops::kernels::{AdamWScalars, MultiTensorStep, adamw_f32};
pub use crate::ops::profile;
pub use crate::ops::switch;
#[cfg(feature = "cuda")]
pub use crate::quant::kernels::{DecodeKernel, MmaTiling, runs_mma};
pub use crate::quant::nf4::Nf4Options;
pub use crate::quant::quantize::quantize_model_dir;
pub use crate::quant::weight::QuantizeOn;
pub use crate::quant::weight::{BaseWeight, Nf4Weight};

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::engine::generate::{Decoding, Flow, GenerationConfig, generate_ids, generate_ids_with};
use crate::engine::loss::{Formatter, LossOutput, Row, TokenizeOptions, eval_loss as loss_of_rows};
use crate::io::assets::{SMOLLM2, SMOLLM2_GGUF};
use crate::models::architecture::ModelConfig;
use crate::models::falcon::config::FalconConfig;
use crate::models::llama::config::LlamaConfig;
use crate::models::load;
use crate::models::params::{self, ParamCount};

/// The decoding speed switches in force on `device`, by environment variable, with their
/// defaults applied: what a benchmark's figures were measured with. The NF4 kernels' switches
/// are reported on a CUDA device of a CUDA build only; elsewhere no kernel reads them.
pub fn decoding_settings(
    device: &Device,
) -> candle_core::Result<Vec<(&'static str, &'static str)>> {
    let attention = (
        "ADAPTERLAB_DECODE_ATTENTION",
        crate::ops::decode_attention::setting()?,
    );
    let rope = (
        "ADAPTERLAB_DECODE_ROPE",
        crate::ops::rope_append::setting()?,
    );
    let gelu = ("ADAPTERLAB_DECODE_GELU", crate::ops::gelu::setting()?);
    let residual = (
        "ADAPTERLAB_DECODE_RESIDUAL",
        crate::ops::residual::setting()?,
    );
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        let mut settings = vec![
            attention,
            rope,
            gelu,
            residual,
            (
                "ADAPTERLAB_DECODE_LORA_H",
                crate::lora::kernels::h_setting()?,
            ),
        ];
        settings.extend(crate::quant::kernels::decode_settings()?);
        settings.push(("ADAPTERLAB_DECODE_PDL", crate::ops::pdl::setting(device)?));
        return Ok(settings);
    }
    let _ = device;
    Ok(vec![attention, rope, gelu, residual])
}

/// The alias of the default model.
pub const DEFAULT_MODEL: &str = "smollm2";

/// Where models live and run: the assets folder, the device, the compute dtype.
#[derive(Debug, Clone)]
pub struct Engine {
    /// Where default models are cached (the host's `DataDir::assets()`).
    pub assets_dir: PathBuf,
    pub device: Device,
    /// Compute dtype (f32 on the CPU; bf16 is the usual choice on a GPU).
    pub dtype: DType,
    pub fetcher: Fetcher,
}

impl Engine {
    pub fn cpu(assets_dir: impl Into<PathBuf>) -> Self {
        Engine {
            assets_dir: assets_dir.into(),
            device: Device::Cpu,
            dtype: DType::F32,
            fetcher: Fetcher::default(),
        }
    }

    /// Where and in what the model computes, as runs record it (`"cpu f32"`, `"cuda bf16"`):
    /// the same request gives other numbers on another device or dtype.
    pub fn compute(&self) -> String {
        let device = match self.device {
            Device::Cpu => "cpu",
            Device::Cuda(_) => "cuda",
            Device::Metal(_) => "metal",
        };
        format!("{device} {}", self.dtype.as_str())
    }
}

/// The base weights' format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub enum Quantize {
    #[default]
    None,
    /// bitsandbytes-style 4-bit NormalFloat (see `nn::linear::LinearBuilder`).
    Nf4,
}

/// Builds the `LinearBuilder` for a quantization and an optional adapter (for the benchmark and
/// the trainer's re-read of a written adapter, which build the adapter into the layers as they
/// load). Commands that load a model with an adapter go through [`load_model`], whose
/// [`with_adapter`] checks that the adapter fits.
pub fn linear_builder(quantize: Quantize, adapter: Option<&Path>) -> Result<LinearBuilder> {
    let mut builder = match quantize {
        Quantize::Nf4 => LinearBuilder::nf4(),
        Quantize::None => LinearBuilder::dense(),
    };
    if let Some(dir) = adapter {
        let registry = crate::lora::peft::load_adapter(dir)
            .and_then(|a| a.into_registry())
            .with_context(|| format!("failed to load the adapter in {}", dir.display()))?;
        builder = builder.with_lora_registry(registry);
    }
    Ok(builder)
}

/// Loads `model`: `smollm2`, a checkpoint folder, a `.gguf` file or a hub id; with an adapter,
/// attached through [`with_adapter`], the one path every adapter takes onto a model.
pub fn load_model(
    model: &str,
    adapter: Option<&Path>,
    quantize: Quantize,
    rt: &Engine,
) -> Result<LoadedModel> {
    let base = load_model_with(model, linear_builder(quantize, None)?, rt)?;
    match adapter {
        None => Ok(base),
        Some(dir) => with_adapter(&base, dir),
    }
}

/// `base` with the PEFT adapter in `dir` on top, unmerged. The copy shares the base's frozen
/// weights (tensors are reference-counted), so switching adapters never reloads the base.
///
/// The adapter must fit: every entry of its `target_modules` matches a linear layer of the
/// model, and every tensor of its file lands on one. A Llama adapter on a Falcon is an error
/// naming what did not match, never the base model's output in disguise.
pub fn with_adapter(base: &LoadedModel, dir: &Path) -> Result<LoadedModel> {
    let registry = crate::lora::peft::load_adapter(dir)
        .and_then(|a| a.into_registry())
        .with_context(|| format!("failed to load the adapter in {}", dir.display()))?;
    let mut model = base.clone();
    check_targets(base, &registry.config().target_modules)
        .with_context(|| format!("the adapter in {} does not fit the model", dir.display()))?;
    let attached = crate::nn::causal_lm::attach_lora(&registry, &mut model.model)
        .with_context(|| format!("the adapter in {} does not fit the model", dir.display()))?;
    registry
        .finish()
        .with_context(|| format!("the adapter in {} does not fit the model", dir.display()))?;
    if attached == 0 {
        anyhow::bail!(
            "the adapter in {} targets no layer of the model",
            dir.display()
        );
    }
    Ok(model)
}

/// Checks that every entry of `targets` matches a linear layer of a loaded model.
pub fn check_targets(model: &LoadedModel, targets: &TargetModules) -> Result<()> {
    // `linears_mut` needs a mutable model; the copy shares every tensor with the original.
    let mut copy = model.clone();
    let names: Vec<String> = copy
        .model
        .linears_mut()
        .into_iter()
        .map(|l| l.name.clone())
        .collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    Ok(targets.check_against(&names)?)
}

/// Checks `target_modules` against `model`'s linear layers from its config alone (no weights
/// are read), so a typo is refused before a training run is queued.
pub fn check_target_modules(model: &str, target_modules: &[String], rt: &Engine) -> Result<()> {
    if target_modules.is_empty() {
        return Ok(());
    }
    let config = model_config(model, rt)?;
    let (linears, _) = params::shapes(&config);
    let names: Vec<&str> = linears.iter().map(|l| l.name.as_str()).collect();
    TargetModules::names(target_modules.iter().cloned())
        .check_against(&names)
        .with_context(|| format!("lora.target_modules for {model}"))
}

/// Loads `model` with a prepared builder (e.g. NF4 with fresh adapters for training).
pub fn load_model_with(model: &str, builder: LinearBuilder, rt: &Engine) -> Result<LoadedModel> {
    let opts = LoadOptions {
        dtype: rt.dtype,
        device: rt.device.clone(),
        builder,
    };
    if model == DEFAULT_MODEL {
        let dir = SMOLLM2.ensure(&rt.assets_dir, &rt.fetcher)?;
        let gguf = dir.join(SMOLLM2_GGUF);
        if dir.join("model.safetensors").is_file() {
            return load::load_files(&crate::io::checkpoint::local_files(&dir)?, &opts);
        }
        return crate::models::gguf::load(&gguf, opts.dtype, &opts.device, &opts.builder);
    }
    let path = Path::new(model);
    if path.is_file() && path.extension().is_some_and(|e| e == "gguf") {
        return crate::models::gguf::load(path, opts.dtype, &opts.device, &opts.builder);
    }
    load::load(model, &opts)
}

/// `config.json` of `model` without its weights; the published configs of Falcon-7B/40B and
/// SmolLM2 are built in, so those need no download.
pub fn model_config(model: &str, rt: &Engine) -> Result<ModelConfig> {
    let builtin = match model {
        "tiiuae/falcon-7b" | "falcon-7b" => Some(ModelConfig::Falcon(FalconConfig::falcon7b())),
        "tiiuae/falcon-40b" | "falcon-40b" => Some(ModelConfig::Falcon(FalconConfig::falcon40b())),
        "smollm2" | "HuggingFaceTB/SmolLM2-135M-Instruct" => {
            Some(ModelConfig::Llama(LlamaConfig::smollm2_135m()))
        }
        _ => None,
    };
    let path = Path::new(model);
    if path.is_dir() {
        let p = path.join("config.json");
        let text = std::fs::read_to_string(&p)
            .with_context(|| format!("failed to read {}", p.display()))?;
        return ModelConfig::from_json(&text).with_context(|| format!("in {}", p.display()));
    }
    if path.is_file() && path.extension().is_some_and(|e| e == "gguf") {
        let mut f = std::fs::File::open(path)
            .with_context(|| format!("failed to open {}", path.display()))?;
        let ct = candle_core::quantized::gguf_file::Content::read(&mut f)
            .with_context(|| format!("{} is not a GGUF file", path.display()))?;
        return Ok(ModelConfig::Llama(crate::models::gguf::llama_config(&ct)?));
    }
    if let Some(c) = builtin {
        return Ok(c);
    }
    let p = rt.fetcher.hub.fetcher(model)?("config.json")?;
    let text =
        std::fs::read_to_string(&p).with_context(|| format!("failed to read {}", p.display()))?;
    ModelConfig::from_json(&text).with_context(|| format!("in {model}/config.json"))
}

/// PEFT's default LoRA targets for an architecture (its `TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`).
pub fn default_target_modules(config: &ModelConfig) -> Vec<String> {
    match config {
        ModelConfig::Falcon(_) => vec!["query_key_value".into()],
        ModelConfig::Llama(_) => vec!["q_proj".into(), "v_proj".into()],
    }
}

/// Trainable and all parameters as PEFT's `print_trainable_parameters` reports them, from the
/// config alone; empty `target_modules` means PEFT's defaults for the architecture.
pub fn params(
    model: &str,
    lora_r: usize,
    target_modules: &[String],
    rt: &Engine,
) -> Result<ParamCount> {
    let config = model_config(model, rt)?;
    let targets = if target_modules.is_empty() {
        default_target_modules(&config)
    } else {
        target_modules.to_vec()
    };
    params::count(&config, lora_r, &targets)
}

/// What `generate` should do.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// `smollm2`, a checkpoint folder, a `.gguf` file or a hub id.
    pub model: String,
    /// A PEFT adapter folder to apply.
    pub adapter: Option<PathBuf>,
    pub prompts: Vec<String>,
    /// Wrap each prompt as one user message through the model's chat template.
    pub chat: bool,
    pub max_new_tokens: usize,
    pub decoding: Decoding,
    /// 1.0 is off.
    pub repetition_penalty: f32,
    pub quantize: Quantize,
    /// Prompts per batch (left-padded together).
    pub batch_size: usize,
    pub runtime: Engine,
}

impl GenerateOptions {
    /// The reference notebook's settings (greedy: top_k 1, repetition penalty 30, 50 tokens).
    pub fn reference(model: &str, prompts: Vec<String>, runtime: Engine) -> Self {
        GenerateOptions {
            model: model.into(),
            adapter: None,
            prompts,
            chat: false,
            max_new_tokens: 50,
            decoding: Decoding::Sample {
                temperature: 0.1,
                top_k: Some(1),
                top_p: None,
                seed: 0,
            },
            repetition_penalty: 30.0,
            quantize: Quantize::None,
            batch_size: 8,
            runtime,
        }
    }
}

/// One generated completion.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Generation {
    pub prompt: String,
    /// The new text, special tokens skipped.
    pub text: String,
    /// The new token ids, up to and including the EOS that stopped it.
    pub token_ids: Vec<u32>,
    pub stopped_at_eos: bool,
}

/// Loads the model and generates for every prompt.
pub fn generate(opts: GenerateOptions) -> Result<Vec<Generation>> {
    let loaded = load_model(
        &opts.model,
        opts.adapter.as_deref(),
        opts.quantize,
        &opts.runtime,
    )?;
    generate_with(&loaded, &opts)
}

/// Generates with an already loaded model (the options' model fields are ignored).
pub fn generate_with(loaded: &LoadedModel, opts: &GenerateOptions) -> Result<Vec<Generation>> {
    let tokenizer = loaded
        .tokenizer
        .as_ref()
        .context("the model has no tokenizer (tokenizer.json)")?;
    let eos = loaded.defaults.eos_token_ids.clone();
    let pad = loaded.defaults.pad_id();
    let cfg = GenerationConfig {
        max_new_tokens: opts.max_new_tokens,
        decoding: opts.decoding.clone(),
        repetition_penalty: opts.repetition_penalty,
        eos_token_ids: eos,
        pad_token_id: pad,
        logprobs: None,
    };
    let mut out = Vec::with_capacity(opts.prompts.len());
    for chunk in opts.prompts.chunks(opts.batch_size.max(1)) {
        let ids = chunk
            .iter()
            .map(|p| encode_prompt(loaded, p, opts.chat))
            .collect::<Result<Vec<_>>>()?;
        let generated = generate_ids(&loaded.model, &ids, &cfg)?;
        for ((prompt, tokens), eos) in chunk
            .iter()
            .zip(generated.tokens)
            .zip(generated.stopped_at_eos)
        {
            let text = tokenizer
                .decode(&tokens, true)
                .map_err(|e| anyhow::anyhow!("decoding failed: {e}"))?;
            out.push(Generation {
                prompt: prompt.clone(),
                text,
                token_ids: tokens,
                stopped_at_eos: eos,
            });
        }
    }
    Ok(out)
}

/// Token ids of a prompt as transformers makes them: `tokenizer(prompt)` (with special tokens),
/// or `apply_chat_template([user prompt], add_generation_prompt=True)` (without).
pub fn encode_prompt(loaded: &LoadedModel, prompt: &str, chat: bool) -> Result<Vec<u32>> {
    let tokenizer = loaded
        .tokenizer
        .as_ref()
        .context("the model has no tokenizer (tokenizer.json)")?;
    let (text, special) = if chat {
        let t = loaded
            .defaults
            .chat_template
            .as_ref()
            .context("the model has no chat template")?;
        (t.render(&[Message::new("user", prompt)], true)?, false)
    } else {
        (prompt.to_string(), true)
    };
    Ok(tokenizer
        .encode(text, special)
        .map_err(|e| anyhow::anyhow!("tokenizing failed: {e}"))?
        .get_ids()
        .to_vec())
}

/// What [`complete_chat`] should do.
#[derive(Debug, Clone)]
pub struct ChatOptions {
    pub max_new_tokens: usize,
    pub decoding: Decoding,
    /// 1.0 is off.
    pub repetition_penalty: f32,
    /// The answer ends before the first of these appears, which is left out of it.
    pub stop: Vec<String>,
    /// Log-probabilities of the answer's tokens with this many alternatives each.
    pub logprobs: Option<usize>,
}

/// Why an answer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model's end of turn, or a stop string.
    Stop,
    /// `max_new_tokens` ran out.
    Length,
}

/// One token of an answer as text, with its log-probability and the likeliest alternatives.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TextLogprob {
    pub token: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

/// A finished chat answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatCompletion {
    pub text: String,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    /// Every new token, the end-of-turn one included.
    pub completion_tokens: usize,
    /// With [`ChatOptions::logprobs`]: the answer's tokens (not the end-of-turn one).
    pub logprobs: Vec<TextLogprob>,
}

/// Renders `messages` with the model's chat template (`add_generation_prompt`) and generates
/// the assistant's answer for one conversation. `on_delta` sees the answer's text as it becomes
/// final, with the log-probabilities of the tokens since the last call: text that could still
/// turn out to start a stop string, or ends in an incomplete character, is held back until it
/// is settled, so the pieces concatenate to the returned text exactly.
pub fn complete_chat(
    loaded: &LoadedModel,
    messages: &[Message],
    opts: &ChatOptions,
    mut on_delta: impl FnMut(&str, &[TextLogprob]),
) -> Result<ChatCompletion> {
    let tokenizer = loaded
        .tokenizer
        .as_ref()
        .context("the model has no tokenizer (tokenizer.json)")?;
    let template = loaded
        .defaults
        .chat_template
        .as_ref()
        .context("the model has no chat template (tokenizer_config.json's chat_template)")?;
    let prompt = template.render(messages, true)?;
    let ids = tokenizer
        .encode(prompt, false)
        .map_err(|e| anyhow::anyhow!("tokenizing failed: {e}"))?
        .get_ids()
        .to_vec();
    let eos = loaded.defaults.eos_token_ids.clone();
    let pad = loaded.defaults.pad_id();
    let cfg = GenerationConfig {
        max_new_tokens: opts.max_new_tokens,
        decoding: opts.decoding.clone(),
        repetition_penalty: opts.repetition_penalty,
        eos_token_ids: eos,
        pad_token_id: pad,
        logprobs: opts.logprobs,
    };
    let piece = |t: u32| tokenizer.decode(&[t], false).unwrap_or_default();
    let mut answer: Vec<u32> = Vec::new();
    let mut logprobs: Vec<TextLogprob> = Vec::new();
    let (mut emitted, mut emitted_lp) = (0usize, 0usize);
    let mut text = String::new();
    let mut cut: Option<usize> = None;
    let mut failure: Option<anyhow::Error> = None;
    let output = generate_ids_with(&loaded.model, std::slice::from_ref(&ids), &cfg, |step| {
        if step.is_eos {
            return Flow::Continue;
        }
        answer.push(step.token);
        if let Some(lp) = &step.logprobs {
            logprobs.push(TextLogprob {
                token: piece(lp.token),
                logprob: lp.logprob,
                top: lp.top.iter().map(|&(t, l)| (piece(t), l)).collect(),
            });
        }
        text = match tokenizer.decode(&answer, true) {
            Ok(t) => t,
            Err(e) => {
                failure = Some(anyhow::anyhow!("decoding failed: {e}"));
                return Flow::StopRow;
            }
        };
        let found = opts
            .stop
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| text.find(s.as_str()))
            .min();
        let settled = match found {
            Some(at) => at,
            None => settled_len(&text, &opts.stop),
        };
        if settled > emitted && text.is_char_boundary(emitted) {
            on_delta(&text[emitted..settled], &logprobs[emitted_lp..]);
            emitted = settled;
            emitted_lp = logprobs.len();
        }
        match found {
            Some(at) => {
                cut = Some(at);
                Flow::StopRow
            }
            None => Flow::Continue,
        }
    })?;
    if let Some(e) = failure {
        return Err(e);
    }
    let final_text = match cut {
        Some(at) => text[..at].to_string(),
        None => tokenizer
            .decode(&answer, true)
            .map_err(|e| anyhow::anyhow!("decoding failed: {e}"))?,
    };
    if final_text.len() > emitted && final_text.is_char_boundary(emitted) {
        on_delta(&final_text[emitted..], &logprobs[emitted_lp..]);
    } else if logprobs.len() > emitted_lp {
        on_delta("", &logprobs[emitted_lp..]);
    }
    let finish_reason = if output.stopped_at_eos[0] || cut.is_some() {
        FinishReason::Stop
    } else {
        FinishReason::Length
    };
    Ok(ChatCompletion {
        text: final_text,
        finish_reason,
        prompt_tokens: ids.len(),
        completion_tokens: output.tokens[0].len(),
        logprobs,
    })
}

/// How much of `text` is settled: all but a trailing incomplete character (decoded as U+FFFD)
/// or a tail that is the start of a stop string.
fn settled_len(text: &str, stop: &[String]) -> usize {
    let mut end = text.trim_end_matches('\u{FFFD}').len();
    let held = stop
        .iter()
        .flat_map(|s| {
            (1..s.len())
                .filter(|&k| s.is_char_boundary(k))
                .filter(|&k| text[..end].ends_with(&s[..k]))
                .max()
        })
        .max()
        .unwrap_or(0);
    end -= held;
    end
}

/// What `eval_loss` should do.
#[derive(Debug, Clone)]
pub struct EvalLossOptions {
    pub model: String,
    pub adapter: Option<PathBuf>,
    /// `prompt`/`completion` rows, or rows the formatter understands.
    pub rows: Vec<Row>,
    /// Count only completion tokens (TRL's `completion_only_loss`).
    pub completion_only: bool,
    /// TRL's `max_length` (1024 by default).
    pub max_length: Option<usize>,
    pub batch_size: usize,
    pub quantize: Quantize,
    pub runtime: Engine,
}

/// Loads the model and returns the mean token loss over `rows`.
pub fn eval_loss(opts: &EvalLossOptions, formatter: Option<Formatter>) -> Result<LossOutput> {
    let loaded = load_model(
        &opts.model,
        opts.adapter.as_deref(),
        opts.quantize,
        &opts.runtime,
    )?;
    eval_loss_with(&loaded, opts, formatter)
}

/// `eval_loss` with an already loaded model.
pub fn eval_loss_with(
    loaded: &LoadedModel,
    opts: &EvalLossOptions,
    formatter: Option<Formatter>,
) -> Result<LossOutput> {
    let tokenizer = loaded
        .tokenizer
        .as_ref()
        .context("the model has no tokenizer (tokenizer.json)")?;
    let eos_token = loaded
        .defaults
        .eos_token_ids
        .first()
        .and_then(|id| tokenizer.id_to_token(*id));
    let tok_opts = TokenizeOptions {
        completion_only: opts.completion_only,
        eos_token,
        max_length: opts.max_length,
    };
    loss_of_rows(
        &loaded.model,
        tokenizer,
        &opts.rows,
        formatter,
        &tok_opts,
        opts.batch_size,
    )
}

/// Logits at the last position of each prompt (left-padded batch), for quick checks.
pub fn last_logits(model: &dyn CausalLm, prompts: &[Vec<u32>], pad: u32) -> Result<Vec<Vec<f32>>> {
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let ids: Vec<u32> = prompts
        .iter()
        .flat_map(|p| std::iter::repeat_n(pad, width - p.len()).chain(p.iter().copied()))
        .collect();
    let mask: Vec<u32> = prompts
        .iter()
        .flat_map(|p| {
            std::iter::repeat_n(0, width - p.len()).chain(std::iter::repeat_n(1, p.len()))
        })
        .collect();
    let d = model.device();
    let ids = Tensor::from_vec(ids, (prompts.len(), width), d)?;
    let mask = Tensor::from_vec(mask, (prompts.len(), width), d)?;
    Ok(model
        .forward_last(&ids, Some(&mask), None)?
        .to_dtype(DType::F32)?
        .to_vec2::<f32>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_of_builtin_configs_need_no_network() {
        let rt = Engine::cpu(std::env::temp_dir());
        let t: Vec<String> = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let c = params("tiiuae/falcon-7b", 16, &t, &rt).unwrap();
        assert_eq!((c.trainable, c.all), (32_636_928, 6_954_357_632));
        let d = params("smollm2", 8, &[], &rt).unwrap();
        assert_eq!(d.trainable, 460_800);
    }

    /// The tiny random Llama with a character-level tokenizer (one token per character of
    /// `CHARS`, `</s>` as EOS) and a minimal chat template.
    fn tiny_chat_model(seed: u64) -> LoadedModel {
        use candle_nn::VarBuilder;
        const CHARS: &str = "\n abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ012345:";
        let cfg = crate::models::llama::tests::tiny();
        let mut vocab = serde_json::Map::new();
        for (i, tok) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
            vocab.insert(tok.to_string(), i.into());
        }
        for (i, c) in CHARS.chars().enumerate() {
            vocab.insert(c.to_string(), (i + 3).into());
        }
        assert!(vocab.len() <= cfg.vocab_size);
        let tokenizer = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [{"id": 2, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
            "normalizer": null,
            "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "[\\s\\S]"}, "behavior": "Isolated", "invert": false},
            "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
        });
        let vb = VarBuilder::from_tensors(
            crate::models::llama::tests::random_weights(&cfg, seed).unwrap(),
            DType::F32,
            &Device::Cpu,
        );
        LoadedModel {
            model: crate::models::load::AnyModel::Llama(
                crate::models::llama::Llama::load(vb, &cfg, &LinearBuilder::dense()).unwrap(),
            ),
            config: ModelConfig::Llama(cfg),
            tokenizer: Some(tokenizers::Tokenizer::from_bytes(tokenizer.to_string()).unwrap()),
            defaults: crate::models::load::GenerationDefaults {
                eos_token_ids: vec![2],
                bos_token_id: None,
                pad_token_id: None,
                chat_template: Some(crate::models::chat::ChatTemplate {
                    template: "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}A:{% endif %}".into(),
                    bos_token: None,
                    eos_token: None,
                }),
            },
            source: PathBuf::from("tiny"),
        }
    }

    fn chat_options(max_new_tokens: usize) -> ChatOptions {
        ChatOptions {
            max_new_tokens,
            decoding: Decoding::Greedy,
            repetition_penalty: 1.0,
            stop: vec![],
            logprobs: Some(3),
        }
    }

    #[test]
    fn chat_streams_pieces_that_add_up_and_reports_logprobs() {
        let m = tiny_chat_model(5);
        let messages = [Message::new("user", "hi")];
        let mut pieces = Vec::new();
        let mut streamed_lp = 0;
        let done = complete_chat(&m, &messages, &chat_options(12), |t, lp| {
            pieces.push(t.to_string());
            streamed_lp += lp.len();
        })
        .unwrap();
        assert_eq!(pieces.concat(), done.text);
        assert_eq!(done.prompt_tokens, "user: hi\nA:".len());
        assert!(done.completion_tokens >= 1 && done.completion_tokens <= 12);
        assert_eq!(streamed_lp, done.logprobs.len());
        for lp in &done.logprobs {
            // Greedy: the chosen token is the likeliest, and log-probabilities are <= 0.
            assert_eq!(lp.top.len(), 3);
            assert_eq!(lp.top[0].0, lp.token);
            assert!((lp.top[0].1 - lp.logprob).abs() < 1e-6);
            assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1) && lp.logprob <= 0.0);
        }
        let total: f32 = done.logprobs[0].top.iter().map(|(_, l)| l.exp()).sum();
        assert!(total <= 1.0 + 1e-5, "{total}");

        // A stop string cuts the answer before it, in the stream too.
        assert!(done.text.chars().count() > 3, "{:?}", done.text);
        {
            let c = done.text.chars().nth(2).unwrap();
            let opts = ChatOptions {
                stop: vec![c.to_string()],
                ..chat_options(12)
            };
            let mut streamed = String::new();
            let cut = complete_chat(&m, &messages, &opts, |t, _| streamed.push_str(t)).unwrap();
            assert_eq!(cut.finish_reason, FinishReason::Stop);
            assert_eq!(cut.text, done.text[..done.text.find(c).unwrap()]);
            assert_eq!(streamed, cut.text);
        }
    }

    #[test]
    fn settled_text_holds_back_stop_prefixes_and_broken_characters() {
        let stop = vec!["END".to_string()];
        assert_eq!(settled_len("abc EN", &stop), 4);
        assert_eq!(settled_len("abc E", &stop), 4);
        assert_eq!(settled_len("abc", &stop), 3);
        assert_eq!(settled_len("ab\u{FFFD}", &[]), 2);
    }

    #[test]
    fn an_adapter_applied_on_a_loaded_base_equals_one_loaded_with_it() {
        use crate::lora::{LoraConfig, TargetModules};
        let base = tiny_chat_model(9);
        let cfg = crate::models::llama::tests::tiny();
        let weights = crate::models::llama::tests::random_weights(&cfg, 9).unwrap();
        // Train-like adapter: B made non-zero so the adapter changes the output.
        let builder = LinearBuilder::dense()
            .with_lora(LoraConfig {
                r: 2,
                lora_alpha: 4.0,
                target_modules: TargetModules::names(["q_proj", "v_proj"]),
                ..Default::default()
            })
            .unwrap();
        let vb = candle_nn::VarBuilder::from_tensors(weights.clone(), DType::F32, &Device::Cpu);
        crate::models::llama::Llama::load(vb, &cfg, &builder).unwrap();
        let registry = builder.lora().unwrap().clone();
        for layer in registry.layers() {
            let b = Tensor::ones(layer.b.dims(), DType::F32, &Device::Cpu).unwrap();
            layer.b.set(&(b * 0.01).unwrap()).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        crate::lora::peft::save_adapter(dir.path(), &registry, &Default::default()).unwrap();

        let vb = candle_nn::VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
        let loaded_with = crate::models::llama::Llama::load(
            vb,
            &cfg,
            &linear_builder(Quantize::None, Some(dir.path())).unwrap(),
        )
        .unwrap();
        let applied = with_adapter(&base, dir.path()).unwrap();
        let prompt = vec![vec![1u32, 7, 9, 30, 4]];
        let want = last_logits(&loaded_with, &prompt, 0).unwrap();
        let got = last_logits(&applied.model, &prompt, 0).unwrap();
        let plain = last_logits(&base.model, &prompt, 0).unwrap();
        let diff = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max)
        };
        assert!(diff(&want[0], &got[0]) < 1e-5);
        assert!(
            diff(&plain[0], &got[0]) > 1e-4,
            "the adapter changes the output"
        );
        // The base it was applied to is untouched.
        assert!(base.model.linears().iter().all(|l| l.lora.is_none()));
    }

    #[test]
    fn nf4_builds_and_a_missing_adapter_is_named() {
        assert!(linear_builder(Quantize::Nf4, None).is_ok());
        let e =
            linear_builder(Quantize::None, Some(Path::new("/nonexistent/adapter"))).unwrap_err();
        assert!(format!("{e:#}").contains("/nonexistent/adapter"), "{e:#}");
    }
}
