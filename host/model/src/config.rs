//! Model configurations read from HF `config.json` as it is written, for every Falcon variant
//! (including the legacy RefinedWeb names) and the Llama family, with `validate()` refusing
//! what the models here do not implement, naming the field.
//!
//! Defaults are transformers' defaults, so a field missing from `config.json` means what it
//! means to transformers. transformers 5 moved `rope_theta`/`rope_scaling` into
//! `rope_parameters`; both spellings are read.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config field `{field}` = {value} is not supported: {reason}")]
    Unsupported {
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error("config field `{field}` is invalid: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("config.json is not a known model: {0}")]
    UnknownModel(String),
    #[error("config.json does not parse: {0}")]
    Parse(#[from] serde_json::Error),
}

fn unsupported(field: &'static str, value: impl std::fmt::Debug, reason: &str) -> ConfigError {
    ConfigError::Unsupported {
        field,
        value: format!("{value:?}"),
        reason: reason.to_string(),
    }
}

/// One token id or several (Llama 3 lists several EOS ids).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// Rotary scaling, as transformers' `ROPE_INIT_FUNCTIONS` computes it. Only the kinds that are
/// a fixed change of `inv_freq` are implemented; `dynamic`, `yarn` and `longrope` are refused by
/// `validate()`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum RopeScaling {
    /// `inv_freq / factor`.
    Linear { factor: f64 },
    /// Llama 3.1's smooth per-frequency scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// A kind this crate does not implement; kept so `validate()` can name it.
    Other(String),
}

/// Reads `rope_theta` and the scaling from either transformers 4 (`rope_theta`, `rope_scaling`)
/// or transformers 5 (`rope_parameters`) spelling.
fn resolve_rope(
    rope_theta: Option<f64>,
    rope_scaling: &Option<Value>,
    rope_parameters: &Option<Value>,
) -> Result<(f64, Option<RopeScaling>), ConfigError> {
    let params_theta = rope_parameters
        .as_ref()
        .and_then(|p| p.get("rope_theta"))
        .and_then(Value::as_f64);
    let theta = params_theta.or(rope_theta).unwrap_or(10_000.0);
    let scaling = match rope_scaling {
        Some(v) if !v.is_null() => Some(v),
        _ => rope_parameters.as_ref(),
    };
    let Some(scaling) = scaling else {
        return Ok((theta, None));
    };
    let kind = scaling
        .get("rope_type")
        .or_else(|| scaling.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default")
        .to_string();
    let num = |key: &'static str| -> Result<f64, ConfigError> {
        scaling
            .get(key)
            .and_then(Value::as_f64)
            .ok_or(ConfigError::Invalid {
                field: "rope_scaling",
                reason: format!("rope type `{kind}` needs a numeric `{key}`"),
            })
    };
    let parsed = match kind.as_str() {
        "default" => None,
        "linear" => Some(RopeScaling::Linear {
            factor: num("factor")?,
        }),
        "llama3" => Some(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
        }),
        other => Some(RopeScaling::Other(other.to_string())),
    };
    Ok((theta, parsed))
}

fn validate_rope(scaling: &Option<RopeScaling>) -> Result<(), ConfigError> {
    match scaling {
        Some(RopeScaling::Other(kind)) => Err(unsupported(
            "rope_scaling.rope_type",
            kind,
            "only default, linear and llama3 rotary scaling are implemented",
        )),
        Some(RopeScaling::Linear { factor }) if *factor <= 0.0 => Err(ConfigError::Invalid {
            field: "rope_scaling.factor",
            reason: format!("{factor} is not positive"),
        }),
        _ => Ok(()),
    }
}

/// The activations transformers' `get_activation` names that the MLPs here implement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Activation {
    /// `gelu`: the exact, erf-based GELU (candle's `gelu_erf`, not its tanh `gelu`).
    Gelu,
    /// `gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`: the tanh approximation.
    GeluTanh,
    Relu,
    Silu,
}

impl Activation {
    fn parse(field: &'static str, name: &str) -> Result<Self, ConfigError> {
        Ok(match name {
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            "silu" | "swish" => Activation::Silu,
            other => {
                return Err(unsupported(
                    field,
                    other,
                    "use gelu, gelu_new, relu or silu",
                ));
            }
        })
    }

    pub fn apply(&self, x: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
        match self {
            Activation::Gelu => crate::gelu::gelu_erf(x),
            Activation::GeluTanh => x.gelu(),
            Activation::Relu => x.relu(),
            Activation::Silu => x.silu(),
        }
    }
}

/// `config.json` of a Falcon model as written, every field optional so that transformers'
/// defaults and the legacy RW names can be resolved in one place.
#[derive(Debug, Clone, Default, Deserialize)]
struct RawFalcon {
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    n_embed: Option<usize>,
    num_hidden_layers: Option<usize>,
    n_layer: Option<usize>,
    num_attention_heads: Option<usize>,
    n_head: Option<usize>,
    num_kv_heads: Option<usize>,
    n_head_kv: Option<usize>,
    num_ln_in_parallel_attn: Option<usize>,
    layer_norm_epsilon: Option<f64>,
    alibi: Option<bool>,
    new_decoder_architecture: Option<bool>,
    multi_query: Option<bool>,
    parallel_attn: Option<bool>,
    bias: Option<bool>,
    max_position_embeddings: Option<usize>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<TokenIds>,
    pad_token_id: Option<u32>,
    ffn_hidden_size: Option<usize>,
    activation: Option<String>,
    tie_word_embeddings: Option<bool>,
    apply_residual_connection_post_layernorm: Option<bool>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
}

/// A Falcon configuration with transformers' defaults filled in (`FalconConfig`), covering
/// Falcon-7B (multi-query, parallel attention, one LN), Falcon-40B/180B
/// (`new_decoder_architecture`, grouped KV heads, `ln_attn` + `ln_mlp`), Falcon2-11B (new
/// architecture with one LN) and the RW models (alibi, sequential attention then MLP).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FalconConfig {
    /// `falcon`, or the legacy `RefinedWeb` / `RefinedWebModel`.
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// KV heads as written (`num_kv_heads`, legacy `n_head_kv`), defaulting to
    /// `num_attention_heads`; what attention uses is [`FalconConfig::kv_heads`].
    pub num_kv_heads: usize,
    pub num_ln_in_parallel_attn: Option<usize>,
    pub layer_norm_epsilon: f64,
    pub alibi: bool,
    pub new_decoder_architecture: bool,
    pub multi_query: bool,
    pub parallel_attn: bool,
    pub bias: bool,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<TokenIds>,
    pub pad_token_id: Option<u32>,
    pub ffn_hidden_size: usize,
    pub activation: String,
    pub tie_word_embeddings: bool,
    pub apply_residual_connection_post_layernorm: bool,
    /// The dtype the checkpoint was saved in (`torch_dtype`, or transformers 5's `dtype`).
    pub torch_dtype: Option<String>,
}

impl<'de> Deserialize<'de> for FalconConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = RawFalcon::deserialize(d)?;
        FalconConfig::from_raw(raw).map_err(serde::de::Error::custom)
    }
}

/// Picks the field written under its current or legacy name, refusing two different values.
fn either<T: PartialEq + std::fmt::Debug>(
    field: &'static str,
    current: Option<T>,
    legacy: Option<T>,
) -> Result<Option<T>, ConfigError> {
    match (current, legacy) {
        (Some(a), Some(b)) if a != b => Err(ConfigError::Invalid {
            field,
            reason: format!("given as {a:?} and, under its legacy name, as {b:?}"),
        }),
        (Some(a), _) => Ok(Some(a)),
        (None, b) => Ok(b),
    }
}

impl FalconConfig {
    fn from_raw(raw: RawFalcon) -> Result<Self, ConfigError> {
        let model_type = raw
            .model_type
            .clone()
            .unwrap_or_else(|| "falcon".to_string());
        let legacy = matches!(model_type.as_str(), "RefinedWeb" | "RefinedWebModel");
        let hidden_size = either("hidden_size", raw.hidden_size, raw.n_embed)?.unwrap_or(4544);
        let num_hidden_layers =
            either("num_hidden_layers", raw.num_hidden_layers, raw.n_layer)?.unwrap_or(32);
        let num_attention_heads =
            either("num_attention_heads", raw.num_attention_heads, raw.n_head)?.unwrap_or(71);
        let kv_given = either("num_kv_heads", raw.num_kv_heads, raw.n_head_kv)?;
        // transformers' conversion of RW checkpoints (convert_custom_code_checkpoint.py): an RW
        // config with `n_head_kv` is the new decoder architecture (40B); without, it is not.
        let new_decoder_architecture = match raw.new_decoder_architecture {
            Some(v) => v,
            None => legacy && raw.n_head_kv.is_some(),
        };
        let (rope_theta, rope_scaling) =
            resolve_rope(raw.rope_theta, &raw.rope_scaling, &raw.rope_parameters)?;
        Ok(FalconConfig {
            model_type,
            vocab_size: raw.vocab_size.unwrap_or(65024),
            hidden_size,
            num_hidden_layers,
            num_attention_heads,
            num_kv_heads: kv_given.unwrap_or(num_attention_heads),
            num_ln_in_parallel_attn: raw.num_ln_in_parallel_attn,
            layer_norm_epsilon: raw.layer_norm_epsilon.unwrap_or(1e-5),
            alibi: raw.alibi.unwrap_or(false),
            new_decoder_architecture,
            multi_query: raw.multi_query.unwrap_or(true),
            parallel_attn: raw.parallel_attn.unwrap_or(true),
            bias: raw.bias.unwrap_or(false),
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(2048),
            rope_theta,
            rope_scaling,
            bos_token_id: raw.bos_token_id.or(Some(11)),
            eos_token_id: raw.eos_token_id.or(Some(TokenIds::One(11))),
            pad_token_id: raw.pad_token_id,
            ffn_hidden_size: raw.ffn_hidden_size.unwrap_or(4 * hidden_size),
            activation: raw.activation.unwrap_or_else(|| "gelu".to_string()),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(true),
            apply_residual_connection_post_layernorm: raw
                .apply_residual_connection_post_layernorm
                .unwrap_or(false),
            torch_dtype: raw.torch_dtype.or(raw.dtype),
        })
    }

    /// Parses `config.json` text.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        Ok(serde_json::from_str(text)?)
    }

    /// tiiuae/falcon-7b's `config.json`.
    pub fn falcon7b() -> Self {
        FalconConfig {
            model_type: "falcon".to_string(),
            vocab_size: 65024,
            hidden_size: 4544,
            num_hidden_layers: 32,
            num_attention_heads: 71,
            num_kv_heads: 71,
            num_ln_in_parallel_attn: None,
            layer_norm_epsilon: 1e-5,
            alibi: false,
            new_decoder_architecture: false,
            multi_query: true,
            parallel_attn: true,
            bias: false,
            max_position_embeddings: 2048,
            rope_theta: 10_000.0,
            rope_scaling: None,
            bos_token_id: Some(11),
            eos_token_id: Some(TokenIds::One(11)),
            pad_token_id: None,
            ffn_hidden_size: 4 * 4544,
            activation: "gelu".to_string(),
            tie_word_embeddings: true,
            apply_residual_connection_post_layernorm: false,
            torch_dtype: Some("bfloat16".to_string()),
        }
    }

    /// tiiuae/falcon-40b's `config.json`.
    pub fn falcon40b() -> Self {
        FalconConfig {
            hidden_size: 8192,
            num_hidden_layers: 60,
            num_attention_heads: 128,
            num_kv_heads: 8,
            new_decoder_architecture: true,
            ffn_hidden_size: 4 * 8192,
            ..Self::falcon7b()
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// The KV heads attention really has: `num_kv_heads` in the new architecture, one with
    /// multi-query, else one per query head.
    pub fn kv_heads(&self) -> usize {
        if self.new_decoder_architecture {
            self.num_kv_heads
        } else if self.multi_query {
            1
        } else {
            self.num_attention_heads
        }
    }

    /// Output width of `query_key_value`.
    pub fn qkv_out_dim(&self) -> usize {
        (self.num_attention_heads + 2 * self.kv_heads()) * self.head_dim()
    }

    /// Whether the decoder layer has `ln_attn` + `ln_mlp` rather than `input_layernorm`
    /// (transformers sets `num_ln_in_parallel_attn` to 2 for the new architecture when unset).
    pub fn two_layer_norms(&self) -> bool {
        self.new_decoder_architecture && self.num_ln_in_parallel_attn.unwrap_or(2) == 2
    }

    pub fn activation(&self) -> Result<Activation, ConfigError> {
        Activation::parse("activation", &self.activation)
    }

    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map(TokenIds::to_vec)
            .unwrap_or_default()
    }

    /// Refuses what [`crate::falcon`] does not implement, and combinations transformers itself
    /// cannot run, naming the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(ConfigError::Invalid {
                field: "num_attention_heads",
                reason: format!(
                    "hidden_size {} is not divisible by {}",
                    self.hidden_size, self.num_attention_heads
                ),
            });
        }
        if !self.alibi && !self.head_dim().is_multiple_of(2) {
            return Err(ConfigError::Invalid {
                field: "hidden_size",
                reason: "rotary needs an even head_dim".into(),
            });
        }
        if self.new_decoder_architecture {
            if self.num_kv_heads == 0 || !self.num_attention_heads.is_multiple_of(self.num_kv_heads)
            {
                return Err(ConfigError::Invalid {
                    field: "num_kv_heads",
                    reason: format!(
                        "{} query heads cannot be grouped over {} KV heads",
                        self.num_attention_heads, self.num_kv_heads
                    ),
                });
            }
            if !self.parallel_attn {
                return Err(unsupported(
                    "parallel_attn",
                    false,
                    "the new decoder architecture is always parallel (transformers fails on this too)",
                ));
            }
        } else {
            if !self.multi_query && self.num_kv_heads != self.num_attention_heads {
                return Err(unsupported(
                    "num_kv_heads",
                    self.num_kv_heads,
                    "without multi_query or new_decoder_architecture every head has its own KV head",
                ));
            }
            if self.num_ln_in_parallel_attn == Some(2) {
                return Err(unsupported(
                    "num_ln_in_parallel_attn",
                    2,
                    "two layer norms need new_decoder_architecture (transformers fails on this too)",
                ));
            }
        }
        if let Some(n) = self.num_ln_in_parallel_attn
            && n != 1
            && n != 2
        {
            return Err(unsupported("num_ln_in_parallel_attn", n, "must be 1 or 2"));
        }
        if self.apply_residual_connection_post_layernorm {
            return Err(unsupported(
                "apply_residual_connection_post_layernorm",
                true,
                "transformers' Falcon does not implement it either",
            ));
        }
        validate_rope(&self.rope_scaling)?;
        self.activation()?;
        Ok(())
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
struct RawLlama {
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    hidden_act: Option<String>,
    max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    tie_word_embeddings: Option<bool>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<TokenIds>,
    pad_token_id: Option<u32>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
}

/// A Llama-family configuration with transformers' `LlamaConfig` defaults filled in (SmolLM2,
/// TinyLlama, Llama 2/3 and the like).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LlamaConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<TokenIds>,
    pub pad_token_id: Option<u32>,
    pub torch_dtype: Option<String>,
}

impl<'de> Deserialize<'de> for LlamaConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = RawLlama::deserialize(d)?;
        LlamaConfig::from_raw(raw).map_err(serde::de::Error::custom)
    }
}

impl LlamaConfig {
    fn from_raw(raw: RawLlama) -> Result<Self, ConfigError> {
        let hidden_size = raw.hidden_size.unwrap_or(4096);
        let num_attention_heads = raw.num_attention_heads.unwrap_or(32);
        let (rope_theta, rope_scaling) =
            resolve_rope(raw.rope_theta, &raw.rope_scaling, &raw.rope_parameters)?;
        Ok(LlamaConfig {
            model_type: raw.model_type.unwrap_or_else(|| "llama".to_string()),
            vocab_size: raw.vocab_size.unwrap_or(32000),
            hidden_size,
            intermediate_size: raw.intermediate_size.unwrap_or(11008),
            num_hidden_layers: raw.num_hidden_layers.unwrap_or(32),
            num_attention_heads,
            num_key_value_heads: raw.num_key_value_heads.unwrap_or(num_attention_heads),
            head_dim: raw
                .head_dim
                .unwrap_or(hidden_size / num_attention_heads.max(1)),
            hidden_act: raw.hidden_act.unwrap_or_else(|| "silu".to_string()),
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(2048),
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            attention_bias: raw.attention_bias.unwrap_or(false),
            mlp_bias: raw.mlp_bias.unwrap_or(false),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            bos_token_id: raw.bos_token_id.or(Some(1)),
            eos_token_id: raw.eos_token_id.or(Some(TokenIds::One(2))),
            pad_token_id: raw.pad_token_id,
            torch_dtype: raw.torch_dtype.or(raw.dtype),
        })
    }

    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        Ok(serde_json::from_str(text)?)
    }

    /// HuggingFaceTB/SmolLM2-135M-Instruct's `config.json`.
    pub fn smollm2_135m() -> Self {
        LlamaConfig {
            model_type: "llama".to_string(),
            vocab_size: 49152,
            hidden_size: 576,
            intermediate_size: 1536,
            num_hidden_layers: 30,
            num_attention_heads: 9,
            num_key_value_heads: 3,
            head_dim: 64,
            hidden_act: "silu".to_string(),
            max_position_embeddings: 8192,
            rms_norm_eps: 1e-5,
            rope_theta: 100_000.0,
            rope_scaling: None,
            attention_bias: false,
            mlp_bias: false,
            tie_word_embeddings: true,
            bos_token_id: Some(1),
            eos_token_id: Some(TokenIds::One(2)),
            pad_token_id: Some(2),
            torch_dtype: Some("bfloat16".to_string()),
        }
    }

    pub fn activation(&self) -> Result<Activation, ConfigError> {
        Activation::parse("hidden_act", &self.hidden_act)
    }

    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map(TokenIds::to_vec)
            .unwrap_or_default()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.num_attention_heads == 0 {
            return Err(ConfigError::Invalid {
                field: "num_attention_heads",
                reason: "is zero".into(),
            });
        }
        if self.num_key_value_heads == 0
            || !self
                .num_attention_heads
                .is_multiple_of(self.num_key_value_heads)
        {
            return Err(ConfigError::Invalid {
                field: "num_key_value_heads",
                reason: format!(
                    "{} query heads cannot be grouped over {} KV heads",
                    self.num_attention_heads, self.num_key_value_heads
                ),
            });
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(ConfigError::Invalid {
                field: "head_dim",
                reason: "rotary needs an even head_dim".into(),
            });
        }
        validate_rope(&self.rope_scaling)?;
        self.activation()?;
        Ok(())
    }
}

/// The architectures this crate runs, chosen from `config.json`'s `model_type` (or its
/// `architectures` list when `model_type` is missing).
#[derive(Debug, Clone, PartialEq)]
pub enum ModelConfig {
    Falcon(FalconConfig),
    Llama(LlamaConfig),
}

impl ModelConfig {
    /// Parses and validates `config.json` text.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let value: Value = serde_json::from_str(text)?;
        let model_type = value
            .get("model_type")
            .and_then(Value::as_str)
            .map(str::to_string);
        let arch = value
            .get("architectures")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let kind = match model_type.as_deref() {
            Some("falcon" | "RefinedWeb" | "RefinedWebModel") => "falcon",
            Some("llama") => "llama",
            Some(other) => return Err(ConfigError::UnknownModel(format!("model_type `{other}`"))),
            None if arch.starts_with("Falcon") || arch.starts_with("RW") => "falcon",
            None if arch.starts_with("Llama") => "llama",
            None => {
                return Err(ConfigError::UnknownModel(
                    "no model_type and no known architectures".into(),
                ));
            }
        };
        let config = if kind == "falcon" {
            let c: FalconConfig = serde_json::from_value(value)?;
            c.validate()?;
            ModelConfig::Falcon(c)
        } else {
            let c: LlamaConfig = serde_json::from_value(value)?;
            c.validate()?;
            ModelConfig::Llama(c)
        };
        Ok(config)
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            ModelConfig::Falcon(c) => c.vocab_size,
            ModelConfig::Llama(c) => c.vocab_size,
        }
    }

    pub fn eos_token_ids(&self) -> Vec<u32> {
        match self {
            ModelConfig::Falcon(c) => c.eos_token_ids(),
            ModelConfig::Llama(c) => c.eos_token_ids(),
        }
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        match self {
            ModelConfig::Falcon(c) => c.bos_token_id,
            ModelConfig::Llama(c) => c.bos_token_id,
        }
    }

    pub fn pad_token_id(&self) -> Option<u32> {
        match self {
            ModelConfig::Falcon(c) => c.pad_token_id,
            ModelConfig::Llama(c) => c.pad_token_id,
        }
    }

    pub fn tie_word_embeddings(&self) -> bool {
        match self {
            ModelConfig::Falcon(c) => c.tie_word_embeddings,
            ModelConfig::Llama(c) => c.tie_word_embeddings,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FALCON_7B: &str = r#"{"alibi": false, "apply_residual_connection_post_layernorm": false,
        "architectures": ["FalconForCausalLM"], "attention_dropout": 0.0, "bias": false,
        "bos_token_id": 11, "eos_token_id": 11, "hidden_dropout": 0.0, "hidden_size": 4544,
        "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "falcon",
        "multi_query": true, "new_decoder_architecture": false, "num_attention_heads": 71,
        "num_hidden_layers": 32, "parallel_attn": true, "torch_dtype": "bfloat16",
        "transformers_version": "4.27.4", "use_cache": true, "vocab_size": 65024}"#;

    // tiiuae/falcon-40b as first published, for the custom RW code.
    const RW_40B: &str = r#"{"alibi": false, "apply_residual_connection_post_layernorm": false,
        "architectures": ["RWForCausalLM"], "attention_dropout": 0.0, "bias": false,
        "bos_token_id": 11, "eos_token_id": 11, "hidden_dropout": 0.0, "hidden_size": 8192,
        "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "RefinedWeb",
        "n_head": 128, "n_head_kv": 8, "n_layer": 60, "parallel_attn": true,
        "torch_dtype": "bfloat16", "use_cache": true, "vocab_size": 65024}"#;

    // tiiuae/falcon-rw-1b as first published.
    const RW_1B: &str = r#"{"alibi": true, "apply_residual_connection_post_layernorm": false,
        "attention_dropout": 0.0, "bias": true, "bos_token_id": 1, "eos_token_id": 2,
        "hidden_dropout": 0.0, "hidden_size": 2048, "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05, "model_type": "RefinedWebModel", "multi_query": false,
        "n_head": 32, "n_layer": 24, "parallel_attn": false, "vocab_size": 50304}"#;

    const SMOLLM2: &str = r#"{"architectures": ["LlamaForCausalLM"], "attention_bias": false,
        "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "hidden_size": 576, "initializer_range": 0.041666666666666664, "intermediate_size": 1536,
        "is_llama_config": true, "max_position_embeddings": 8192, "mlp_bias": false,
        "model_type": "llama", "num_attention_heads": 9, "num_hidden_layers": 30,
        "num_key_value_heads": 3, "pad_token_id": 2, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_interleaved": false, "rope_scaling": null, "rope_theta": 100000,
        "tie_word_embeddings": true, "torch_dtype": "bfloat16", "transformers_version": "4.42.3",
        "use_cache": true, "vocab_size": 49152}"#;

    fn falcon(text: &str) -> FalconConfig {
        match ModelConfig::from_json(text).unwrap() {
            ModelConfig::Falcon(c) => c,
            other => panic!("not falcon: {other:?}"),
        }
    }

    #[test]
    fn falcon7b_json_equals_preset() {
        assert_eq!(falcon(FALCON_7B), FalconConfig::falcon7b());
        let c = FalconConfig::falcon7b();
        assert_eq!(
            (c.head_dim(), c.kv_heads(), c.qkv_out_dim()),
            (64, 1, 4544 + 128)
        );
        assert!(!c.two_layer_norms());
    }

    #[test]
    fn legacy_rw_40b_is_new_architecture() {
        let c = falcon(RW_40B);
        assert!(c.new_decoder_architecture);
        assert_eq!(
            (c.num_attention_heads, c.num_kv_heads, c.num_hidden_layers),
            (128, 8, 60)
        );
        assert!(c.two_layer_norms());
        assert_eq!(c.qkv_out_dim(), (128 + 16) * 64);
        assert_eq!(
            FalconConfig {
                model_type: "RefinedWeb".into(),
                ..FalconConfig::falcon40b()
            },
            c
        );
    }

    #[test]
    fn legacy_rw_1b_alibi_sequential() {
        let c = falcon(RW_1B);
        assert!(
            c.alibi && !c.parallel_attn && !c.multi_query && !c.new_decoder_architecture && c.bias
        );
        assert_eq!(c.kv_heads(), 32);
    }

    #[test]
    fn rope_parameters_of_transformers_5() {
        let c = FalconConfig::from_json(
            r#"{"hidden_size": 64, "num_attention_heads": 4, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}"#,
        )
        .unwrap();
        assert_eq!((c.rope_theta, c.rope_scaling.clone()), (500000.0, None));
        let c = LlamaConfig::from_json(
            r#"{"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}"#,
        )
        .unwrap();
        assert_eq!(c.rope_scaling, Some(RopeScaling::Linear { factor: 2.0 }));
    }

    fn unsupported_field(text: &str) -> &'static str {
        match ModelConfig::from_json(text) {
            Err(ConfigError::Unsupported { field, .. } | ConfigError::Invalid { field, .. }) => {
                field
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn refusals_name_the_field() {
        let check = |json: &str, field: &str| assert_eq!(unsupported_field(json), field, "{json}");
        check(
            r#"{"model_type": "falcon", "hidden_size": 64, "num_attention_heads": 4, "new_decoder_architecture": true, "parallel_attn": false, "num_kv_heads": 2}"#,
            "parallel_attn",
        );
        check(
            r#"{"model_type": "falcon", "hidden_size": 64, "num_attention_heads": 4, "new_decoder_architecture": true, "num_kv_heads": 3}"#,
            "num_kv_heads",
        );
        check(
            r#"{"model_type": "falcon", "hidden_size": 64, "num_attention_heads": 5}"#,
            "num_attention_heads",
        );
        check(
            r#"{"model_type": "falcon", "hidden_size": 64, "num_attention_heads": 4, "rope_scaling": {"type": "dynamic", "factor": 2.0}}"#,
            "rope_scaling.rope_type",
        );
        check(
            r#"{"model_type": "falcon", "hidden_size": 64, "num_attention_heads": 4, "activation": "gelu_10"}"#,
            "activation",
        );
        check(
            r#"{"model_type": "llama", "num_attention_heads": 4, "num_key_value_heads": 3}"#,
            "num_key_value_heads",
        );
        check(
            r#"{"model_type": "falcon", "hidden_size": 64, "num_attention_heads": 4, "multi_query": false, "num_kv_heads": 2}"#,
            "num_kv_heads",
        );
        assert!(matches!(
            ModelConfig::from_json(r#"{"model_type": "gpt2"}"#),
            Err(ConfigError::UnknownModel(_))
        ));
    }

    #[test]
    fn smollm2_json_equals_preset() {
        match ModelConfig::from_json(SMOLLM2).unwrap() {
            ModelConfig::Llama(c) => assert_eq!(c, LlamaConfig::smollm2_135m()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn llama3_eos_list_and_scaling() {
        let c = LlamaConfig::from_json(
            r#"{"eos_token_id": [128001, 128008, 128009], "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192, "rope_type": "llama3"}, "rope_theta": 500000.0}"#,
        )
        .unwrap();
        assert_eq!(c.eos_token_ids(), vec![128001, 128008, 128009]);
        assert!(matches!(c.rope_scaling, Some(RopeScaling::Llama3 { .. })));
        c.validate().unwrap();
    }
}
