//! Llama-family models (SmolLM2, TinyLlama, Llama 2/3), mirroring transformers'
//! `LlamaForCausalLM` with the checkpoint's tensor names as `VarBuilder` paths.

pub mod config;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};

use crate::models::config::Activation;
use crate::nn::causal_lm::CausalLm;
use crate::nn::layers::{RmsNorm, lm_head};
use crate::nn::linear::{Linear, LinearBuilder};
use crate::ops::attention::{AttentionContext, AttentionKernel, KvCache, Rotary, attend_in};
use config::LlamaConfig;

#[derive(Debug, Clone)]
pub struct LlamaAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    num_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    layer_idx: usize,
}

impl LlamaAttention {
    pub fn load(
        vb: VarBuilder,
        cfg: &LlamaConfig,
        builder: &LinearBuilder,
        layer_idx: usize,
    ) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let (n, kv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let bias = cfg.attention_bias;
        Ok(LlamaAttention {
            q_proj: builder.load(vb.pp("q_proj"), h, n * d, bias)?,
            k_proj: builder.load(vb.pp("k_proj"), h, kv * d, bias)?,
            v_proj: builder.load(vb.pp("v_proj"), h, kv * d, bias)?,
            o_proj: builder.load(vb.pp("o_proj"), n * d, h, bias)?,
            num_heads: n,
            kv_heads: kv,
            head_dim: d,
            layer_idx,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        ctx: &AttentionContext,
        rope: &(Tensor, Tensor),
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let heads = |t: Tensor, n: usize| {
            t.reshape((b, s, n, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = heads(self.q_proj.forward(x)?, self.num_heads)?;
        let k = heads(self.k_proj.forward(x)?, self.kv_heads)?;
        let v = heads(self.v_proj.forward(x)?, self.kv_heads)?;
        let (cos, sin) = rope;
        let (q, k) = (Rotary::apply(&q, cos, sin)?, Rotary::apply(&k, cos, sin)?);
        let (k, v) = match cache {
            Some(c) => c.append(self.layer_idx, &k, &v)?,
            None => (k, v),
        };
        let out = attend_in(ctx, &q, &k, &v, 1.0 / (self.head_dim as f64).sqrt(), None)?;
        let out = out
            .transpose(1, 2)?
            .reshape((b, s, self.num_heads * self.head_dim))?;
        self.o_proj.forward(&out)
    }
}

#[derive(Debug, Clone)]
pub struct LlamaMlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    act: Activation,
}

impl LlamaMlp {
    pub fn load(vb: VarBuilder, cfg: &LlamaConfig, builder: &LinearBuilder) -> Result<Self> {
        let (h, i, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(LlamaMlp {
            gate_proj: builder.load(vb.pp("gate_proj"), h, i, bias)?,
            up_proj: builder.load(vb.pp("up_proj"), h, i, bias)?,
            down_proj: builder.load(vb.pp("down_proj"), i, h, bias)?,
            act: cfg.activation().map_err(candle_core::Error::wrap)?,
        })
    }
}

impl Module for LlamaMlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gated = (self.act.apply(&self.gate_proj.forward(x)?)? * self.up_proj.forward(x)?)?;
        self.down_proj.forward(&gated)
    }
}

#[derive(Debug, Clone)]
pub struct LlamaDecoderLayer {
    self_attn: LlamaAttention,
    mlp: LlamaMlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

impl LlamaDecoderLayer {
    pub fn load(
        vb: VarBuilder,
        cfg: &LlamaConfig,
        builder: &LinearBuilder,
        layer_idx: usize,
    ) -> Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(LlamaDecoderLayer {
            self_attn: LlamaAttention::load(vb.pp("self_attn"), cfg, builder, layer_idx)?,
            mlp: LlamaMlp::load(vb.pp("mlp"), cfg, builder)?,
            input_layernorm: RmsNorm::load(vb.pp("input_layernorm"), h, eps)?,
            post_attention_layernorm: RmsNorm::load(vb.pp("post_attention_layernorm"), h, eps)?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        ctx: &AttentionContext,
        rope: &(Tensor, Tensor),
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let attn = self
            .self_attn
            .forward(&self.input_layernorm.forward(x)?, ctx, rope, cache)?;
        let x = (x + attn)?;
        let mlp = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&x)?)?;
        &x + mlp
    }
}

impl crate::nn::checkpoint::DecoderLayer for LlamaDecoderLayer {
    fn linears(&self) -> Vec<&Linear> {
        let (a, m) = (&self.self_attn, &self.mlp);
        vec![
            &a.q_proj,
            &a.k_proj,
            &a.v_proj,
            &a.o_proj,
            &m.gate_proj,
            &m.up_proj,
            &m.down_proj,
        ]
    }
}

/// `LlamaForCausalLM`: `model.{embed_tokens, layers.{i}, norm}` and `lm_head`.
#[derive(Debug, Clone)]
pub struct Llama {
    embed_tokens: Embedding,
    layers: Vec<LlamaDecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rotary: Rotary,
    config: LlamaConfig,
    device: Device,
    dtype: DType,
    /// The attention the layers run (transformers' `attn_implementation`).
    attention: AttentionKernel,
}

impl Llama {
    pub fn load(vb: VarBuilder, cfg: &LlamaConfig, builder: &LinearBuilder) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::wrap)?;
        let m = vb.pp("model");
        let emb = m
            .pp("embed_tokens")
            .get((cfg.vocab_size, cfg.hidden_size), "weight")?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| LlamaDecoderLayer::load(m.pp(format!("layers.{i}")), cfg, builder, i))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(m.pp("norm"), cfg.hidden_size, cfg.rms_norm_eps)?;
        let lm_head = lm_head(
            &vb,
            builder,
            &emb,
            cfg.tie_word_embeddings,
            cfg.hidden_size,
            cfg.vocab_size,
        )?;
        Ok(Llama {
            embed_tokens: Embedding::new(emb, cfg.hidden_size),
            layers,
            norm,
            lm_head,
            rotary: Rotary::new(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling.as_ref()),
            config: cfg.clone(),
            device: vb.device().clone(),
            dtype: vb.dtype(),
            attention: AttentionKernel::Eager,
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Runs the layers' attention with `kernel` from now on; refused where it cannot serve
    /// this model's heads.
    pub fn set_attention(&mut self, kernel: AttentionKernel) -> Result<()> {
        kernel.check_head_dim(self.config.head_dim)?;
        self.attention = kernel;
        Ok(())
    }

    pub fn embeddings(&self) -> &Tensor {
        self.embed_tokens.embeddings()
    }
}

impl CausalLm for Llama {
    fn hidden_states_in(
        &self,
        input_ids: &Tensor,
        ctx: AttentionContext,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        ctx.check_fits(input_ids, cache.as_deref())?;
        let ctx = ctx.with_kernel(self.attention);
        let mut x = self.embed_tokens.forward(input_ids)?;
        let rope = self.rotary.cos_sin(&ctx, x.dtype(), &self.device)?;
        let inputs = std::sync::Arc::new((ctx, rope));
        for (i, layer) in self.layers.iter().enumerate() {
            let inputs = inputs.clone();
            x = crate::nn::checkpoint::run_layer(
                i,
                layer,
                &x,
                cache.as_deref_mut(),
                move |l, h, c| {
                    let (ctx, rope) = &*inputs;
                    l.forward(h, ctx, rope, c)
                },
            )?;
        }
        self.norm.forward(&x)
    }

    fn lm_head(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(hidden)
    }

    fn num_layers(&self) -> usize {
        self.layers.len()
    }

    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn linears(&self) -> Vec<&Linear> {
        let mut out: Vec<&Linear> = self
            .layers
            .iter()
            .flat_map(crate::nn::checkpoint::DecoderLayer::linears)
            .collect();
        out.push(&self.lm_head);
        out
    }

    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut out = Vec::new();
        for l in &mut self.layers {
            let a = &mut l.self_attn;
            out.extend([&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj]);
            let m = &mut l.mlp;
            out.extend([&mut m.gate_proj, &mut m.up_proj, &mut m.down_proj]);
        }
        out.push(&mut self.lm_head);
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::HashMap;

    use super::*;

    pub(crate) fn tiny() -> LlamaConfig {
        LlamaConfig {
            vocab_size: 64,
            hidden_size: 32,
            intermediate_size: 48,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 8,
            max_position_embeddings: 64,
            ..LlamaConfig::smollm2_135m()
        }
    }

    pub(crate) fn random_weights(cfg: &LlamaConfig, seed: u64) -> Result<HashMap<String, Tensor>> {
        let dev = Device::Cpu;
        let mut rng = seed.max(1);
        let mut next = |shape: &[usize], scale: f32, offset: f32| -> Result<Tensor> {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = (0..n)
                .map(|_| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    offset + scale * ((rng % 20000) as f32 / 10000.0 - 1.0)
                })
                .collect();
            Tensor::from_vec(data, shape, &dev)
        };
        let (h, i, d) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
        let (n, kv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let mut w = HashMap::new();
        w.insert(
            "model.embed_tokens.weight".to_string(),
            next(&[cfg.vocab_size, h], 0.5, 0.)?,
        );
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            for (name, o, i_) in [
                ("self_attn.q_proj", n * d, h),
                ("self_attn.k_proj", kv * d, h),
                ("self_attn.v_proj", kv * d, h),
                ("self_attn.o_proj", h, n * d),
                ("mlp.gate_proj", i, h),
                ("mlp.up_proj", i, h),
                ("mlp.down_proj", h, i),
            ] {
                w.insert(
                    format!("{p}.{name}.weight"),
                    next(&[o, i_], 1.0 / (i_ as f32).sqrt(), 0.)?,
                );
            }
            w.insert(format!("{p}.input_layernorm.weight"), next(&[h], 0.1, 1.)?);
            w.insert(
                format!("{p}.post_attention_layernorm.weight"),
                next(&[h], 0.1, 1.)?,
            );
        }
        w.insert("model.norm.weight".into(), next(&[h], 0.1, 1.)?);
        Ok(w)
    }

    #[test]
    fn cache_and_padding_agree_with_full_forward() -> Result<()> {
        let dev = Device::Cpu;
        let cfg = tiny();
        let vb = VarBuilder::from_tensors(random_weights(&cfg, 3)?, DType::F32, &dev);
        let model = Llama::load(vb, &cfg, &LinearBuilder::dense())?;
        let ids = Tensor::new(&[[5u32, 9, 3, 17, 2, 40]], &dev)?;
        let full = model.forward(&ids, None, None)?.squeeze(0)?;
        let mut cache = model.new_cache();
        let mut steps = vec![
            model
                .forward(&ids.narrow(1, 0, 3)?, None, Some(&mut cache))?
                .squeeze(0)?,
        ];
        for t in 3..6 {
            steps.push(
                model
                    .forward(&ids.narrow(1, t, 1)?, None, Some(&mut cache))?
                    .squeeze(0)?,
            );
        }
        let d = (&full - Tensor::cat(&steps, 0)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(d < 1e-4, "cached vs full differ by {d}");

        let padded = Tensor::new(&[[0u32, 0, 0, 5, 9, 3, 17, 2, 40]], &dev)?;
        let mask = Tensor::new(&[[0u32, 0, 0, 1, 1, 1, 1, 1, 1]], &dev)?;
        let last = model.forward_last(&padded, Some(&mask), None)?.squeeze(0)?;
        let d = (&last - full.get(5)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(d < 1e-4, "padded vs unpadded differ by {d}");
        Ok(())
    }

    /// Llama layers are checkpointed through the same loop step as Falcon's.
    #[test]
    fn checkpointed_layers_give_the_same_adapter_gradients() -> Result<()> {
        let cfg = tiny();
        let builder = crate::nn::checkpoint::tests::lora_builder()?;
        let vb = VarBuilder::from_tensors(random_weights(&cfg, 3)?, DType::F32, &Device::Cpu);
        let model = Llama::load(vb, &cfg, &builder)?;
        crate::nn::checkpoint::tests::assert_same_gradients(&model, builder.lora().unwrap())
    }
}
