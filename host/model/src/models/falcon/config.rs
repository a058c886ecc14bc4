//! Falcon's `config.json` (`FalconConfig` in transformers, and the legacy RefinedWeb names),
//! with transformers' defaults and `validate()` refusing what [`crate::models::falcon`] does
//! not implement, naming the field.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::models::config::{
    Activation, ConfigError, RopeScaling, TokenIds, resolve_rope, unsupported, validate_rope,
};

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

    /// Refuses what [`crate::models::falcon`] does not implement, and combinations transformers itself
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
