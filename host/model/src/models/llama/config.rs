//! The Llama family's `config.json` (`LlamaConfig` in transformers: SmolLM2, TinyLlama,
//! Llama 2/3), with transformers' defaults and `validate()`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::models::config::{
    Activation, ConfigError, RopeScaling, TokenIds, resolve_rope, validate_rope,
};

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
