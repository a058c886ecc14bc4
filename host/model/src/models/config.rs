//! What every model's `config.json` shares: the error type naming the field, token ids, rotary
//! parameters (in transformers 4 and 5 spellings) and activations. Each model's own `Config`
//! is beside it (`models/falcon/config.rs`, `models/llama/config.rs`); [`super::architecture`]
//! picks one from `model_type`.
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

pub(crate) fn unsupported(
    field: &'static str,
    value: impl std::fmt::Debug,
    reason: &str,
) -> ConfigError {
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

pub use crate::ops::attention::RopeScaling;

/// Reads `rope_theta` and the scaling from either transformers 4 (`rope_theta`, `rope_scaling`)
/// or transformers 5 (`rope_parameters`) spelling.
pub(crate) fn resolve_rope(
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

pub(crate) fn validate_rope(scaling: &Option<RopeScaling>) -> Result<(), ConfigError> {
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
    pub(crate) fn parse(field: &'static str, name: &str) -> Result<Self, ConfigError> {
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
            Activation::Gelu => crate::ops::gelu::gelu_erf(x),
            Activation::GeluTanh => x.gelu(),
            Activation::Relu => x.relu(),
            Activation::Silu => x.silu(),
        }
    }
}
