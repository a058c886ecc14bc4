//! Parameter counts from `config.json` alone, as PEFT's `print_trainable_parameters` reports
//! them: `all` is every parameter of the model with its LoRA layers (tied embeddings once,
//! 4-bit weights at their unpacked size), `trainable` the LoRA matrices.

use anyhow::{Result, bail};
use serde::Serialize;

use crate::models::architecture::ModelConfig;
use crate::models::falcon::config::FalconConfig;
use crate::models::llama::config::LlamaConfig;

/// One linear layer of a model, by its module path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LinearShape {
    pub name: String,
    pub in_features: usize,
    pub out_features: usize,
    pub bias: bool,
}

impl LinearShape {
    fn params(&self) -> u64 {
        (self.in_features * self.out_features + if self.bias { self.out_features } else { 0 })
            as u64
    }
}

fn lin(name: String, in_features: usize, out_features: usize, bias: bool) -> LinearShape {
    LinearShape {
        name,
        in_features,
        out_features,
        bias,
    }
}

/// The model's linear layers (without the output head) and the count of its other parameters
/// (embeddings, norms, an untied `lm_head`).
pub fn shapes(config: &ModelConfig) -> (Vec<LinearShape>, u64) {
    match config {
        ModelConfig::Falcon(c) => falcon_shapes(c),
        ModelConfig::Llama(c) => llama_shapes(c),
    }
}

fn falcon_shapes(c: &FalconConfig) -> (Vec<LinearShape>, u64) {
    let (h, f, b) = (c.hidden_size, c.ffn_hidden_size, c.bias);
    let mut linears = Vec::new();
    for i in 0..c.num_hidden_layers {
        let p = format!("transformer.h.{i}");
        linears.push(lin(
            format!("{p}.self_attention.query_key_value"),
            h,
            c.qkv_out_dim(),
            b,
        ));
        linears.push(lin(format!("{p}.self_attention.dense"), h, h, b));
        linears.push(lin(format!("{p}.mlp.dense_h_to_4h"), h, f, b));
        linears.push(lin(format!("{p}.mlp.dense_4h_to_h"), f, h, b));
    }
    // Each layer has one LN (shared), two (ln_attn + ln_mlp, or input + post-attention).
    let norms_per_layer = if !c.parallel_attn || c.two_layer_norms() {
        2
    } else {
        1
    };
    let ln = 2 * h as u64;
    let mut other =
        (c.vocab_size * h) as u64 + c.num_hidden_layers as u64 * norms_per_layer * ln + ln;
    if !c.tie_word_embeddings {
        other += (c.vocab_size * h) as u64;
    }
    (linears, other)
}

fn llama_shapes(c: &LlamaConfig) -> (Vec<LinearShape>, u64) {
    let (h, d, i) = (c.hidden_size, c.head_dim, c.intermediate_size);
    let (n, kv) = (c.num_attention_heads, c.num_key_value_heads);
    let (ab, mb) = (c.attention_bias, c.mlp_bias);
    let mut linears = Vec::new();
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        linears.push(lin(format!("{p}.self_attn.q_proj"), h, n * d, ab));
        linears.push(lin(format!("{p}.self_attn.k_proj"), h, kv * d, ab));
        linears.push(lin(format!("{p}.self_attn.v_proj"), h, kv * d, ab));
        linears.push(lin(format!("{p}.self_attn.o_proj"), n * d, h, ab));
        linears.push(lin(format!("{p}.mlp.gate_proj"), h, i, mb));
        linears.push(lin(format!("{p}.mlp.up_proj"), h, i, mb));
        linears.push(lin(format!("{p}.mlp.down_proj"), i, h, mb));
    }
    let mut other =
        (c.vocab_size * h) as u64 + c.num_hidden_layers as u64 * 2 * h as u64 + h as u64;
    if !c.tie_word_embeddings {
        other += (c.vocab_size * h) as u64;
    }
    (linears, other)
}

/// Whether PEFT would put an adapter on the module `name` for `target_modules`: an exact name
/// or a suffix after a dot; `all-linear` is every linear layer but the output head.
pub fn is_target(name: &str, target_modules: &[String]) -> bool {
    target_modules
        .iter()
        .any(|t| t == "all-linear" || name == t || name.ends_with(&format!(".{t}")))
}

/// PEFT's figures.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ParamCount {
    pub trainable: u64,
    pub all: u64,
    /// `100 * trainable / all`.
    pub trainable_percent: f64,
}

/// Counts for LoRA of rank `lora_r` on `target_modules` (no adapter when `lora_r` is 0).
/// A target that matches no module is an error, as in PEFT.
pub fn count(config: &ModelConfig, lora_r: usize, target_modules: &[String]) -> Result<ParamCount> {
    let (linears, other) = shapes(config);
    let base: u64 = other + linears.iter().map(LinearShape::params).sum::<u64>();
    let mut trainable = 0u64;
    if lora_r > 0 {
        for t in target_modules {
            if !linears
                .iter()
                .any(|l| is_target(&l.name, std::slice::from_ref(t)))
            {
                bail!("target module `{t}` matches no linear layer of this model");
            }
        }
        for l in linears
            .iter()
            .filter(|l| is_target(&l.name, target_modules))
        {
            // lora_A: [r, in], lora_B: [out, r].
            trainable += (lora_r * (l.in_features + l.out_features)) as u64;
        }
    }
    let all = base + trainable;
    Ok(ParamCount {
        trainable,
        all,
        trainable_percent: if all == 0 {
            0.0
        } else {
            100.0 * trainable as f64 / all as f64
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets(t: &[&str]) -> Vec<String> {
        t.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn falcon7b_lora_r16_matches_peft() {
        let cfg = ModelConfig::Falcon(FalconConfig::falcon7b());
        let base = count(&cfg, 0, &[]).unwrap();
        assert_eq!(base.all, 6_921_720_704);
        let c = count(
            &cfg,
            16,
            &targets(&["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]),
        )
        .unwrap();
        assert_eq!((c.trainable, c.all), (32_636_928, 6_954_357_632));
        assert_eq!(format!("{:.4}", c.trainable_percent), "0.4693");
    }

    #[test]
    fn smollm2_counts() {
        let cfg = ModelConfig::Llama(LlamaConfig::smollm2_135m());
        // SmolLM2-135M: 134,515,008 parameters (the embedding tied to the head).
        assert_eq!(count(&cfg, 0, &[]).unwrap().all, 134_515_008);
        // r=8 on q_proj and v_proj: per layer 8*(576+576) + 8*(576+192) = 15,360; 30 layers.
        let c = count(&cfg, 8, &targets(&["q_proj", "v_proj"])).unwrap();
        assert_eq!(c.trainable, 460_800);
        assert_eq!(c.all, 134_515_008 + 460_800);
        let all = count(&cfg, 8, &targets(&["all-linear"])).unwrap();
        let each = 8 * ((576 + 576) * 2 + (576 + 192) * 2 + (576 + 1536) * 3);
        assert_eq!(all.trainable, 30 * each as u64);
    }

    #[test]
    fn unknown_target_is_refused() {
        let cfg = ModelConfig::Llama(LlamaConfig::smollm2_135m());
        let err = count(&cfg, 8, &targets(&["query_key_value"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("query_key_value"), "{err}");
    }
}
