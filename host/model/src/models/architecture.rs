//! The architectures this crate runs, chosen from `config.json`'s `model_type`, each parsed
//! by its own `Config` with transformers' defaults and validated, naming the field.

use serde_json::Value;

use crate::models::config::ConfigError;
use crate::models::falcon::config::FalconConfig;
use crate::models::llama::config::LlamaConfig;

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
    use crate::models::config::RopeScaling;

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
