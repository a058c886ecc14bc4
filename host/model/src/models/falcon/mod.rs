//! Falcon, mirroring transformers' `FalconForCausalLM` module for module, with the checkpoint's
//! tensor names as `VarBuilder` paths: Falcon-7B (multi-query, parallel attention, one LN),
//! Falcon-40B/180B (`new_decoder_architecture`: grouped KV heads, `ln_attn` + `ln_mlp`),
//! Falcon2-11B (new architecture, one LN) and the RW models (ALiBi, attention then MLP).

pub mod config;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};

use crate::models::config::Activation;
use crate::nn::causal_lm::CausalLm;
use crate::nn::layers::{LayerNorm, lm_head};
use crate::nn::linear::{Linear, LinearBuilder};
use crate::ops::attention::{
    AttentionContext, AttentionKernel, KvCache, Rotary, alibi_bias, attend_in,
};
use crate::ops::epilogue::Epilogue;
use crate::ops::flash::flash_attend_packed;
use crate::ops::heads::merge_heads;
use crate::ops::profile;
use crate::ops::residual::add3;
use crate::ops::rope_append::{QkvGroups, heads_for_flash, split_rotate_append};
use config::FalconConfig;

/// How `query_key_value`'s output is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QkvLayout {
    /// Per head `(q, k, v)`: the RW models without multi-query.
    PerHead,
    /// All query heads, then one key and one value head: Falcon-7B.
    MultiQuery,
    /// Per KV group, its query heads then its key and value: the new architecture.
    Grouped,
}

#[derive(Debug, Clone)]
pub struct FalconAttention {
    query_key_value: Linear,
    dense: Linear,
    layout: QkvLayout,
    num_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    rotary: Option<Rotary>,
    layer_idx: usize,
}

impl FalconAttention {
    pub fn load(
        vb: VarBuilder,
        cfg: &FalconConfig,
        builder: &LinearBuilder,
        layer_idx: usize,
    ) -> Result<Self> {
        let h = cfg.hidden_size;
        let layout = if cfg.new_decoder_architecture {
            QkvLayout::Grouped
        } else if cfg.multi_query {
            QkvLayout::MultiQuery
        } else {
            QkvLayout::PerHead
        };
        let rotary = (!cfg.alibi)
            .then(|| Rotary::new(cfg.head_dim(), cfg.rope_theta, cfg.rope_scaling.as_ref()));
        Ok(FalconAttention {
            query_key_value: builder.load(
                vb.pp("query_key_value"),
                h,
                cfg.qkv_out_dim(),
                cfg.bias,
            )?,
            dense: builder.load(vb.pp("dense"), h, h, cfg.bias)?,
            layout,
            num_heads: cfg.num_attention_heads,
            kv_heads: cfg.kv_heads(),
            head_dim: cfg.head_dim(),
            rotary,
            layer_idx,
        })
    }

    /// How `query_key_value`'s output holds the heads, as [`split_rotate_append`] reads it.
    fn groups(&self) -> QkvGroups {
        let (n, kv, d) = (self.num_heads, self.kv_heads, self.head_dim);
        let (kv_heads, q_per_kv) = match self.layout {
            QkvLayout::PerHead => (n, 1),
            QkvLayout::MultiQuery => (1, n),
            QkvLayout::Grouped => (kv, n / kv),
        };
        QkvGroups {
            kv_heads,
            q_per_kv,
            head_dim: d,
        }
    }

    /// `[b, s, qkv]` → q `[b, heads, s, d]`, k and v `[b, kv_heads, s, d]`.
    fn split_heads(&self, fused: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, s, _) = fused.dims3()?;
        let (n, kv, d) = (self.num_heads, self.kv_heads, self.head_dim);
        let (q, k, v) = match self.layout {
            QkvLayout::PerHead => {
                let x = fused.reshape((b, s, n, 3, d))?;
                (
                    x.narrow(3, 0, 1)?.squeeze(3)?,
                    x.narrow(3, 1, 1)?.squeeze(3)?,
                    x.narrow(3, 2, 1)?.squeeze(3)?,
                )
            }
            QkvLayout::MultiQuery => {
                let x = fused.reshape((b, s, n + 2, d))?;
                (
                    x.narrow(2, 0, n)?,
                    x.narrow(2, n, 1)?,
                    x.narrow(2, n + 1, 1)?,
                )
            }
            QkvLayout::Grouped => {
                let r = n / kv;
                let x = fused.reshape((b, s, kv, r + 2, d))?;
                let q = x.narrow(3, 0, r)?.reshape((b, s, n, d))?;
                let k = x.narrow(3, r, 1)?.squeeze(3)?;
                let v = x.narrow(3, r + 1, 1)?.squeeze(3)?;
                (q, k, v)
            }
        };
        let t = |x: Tensor| x.transpose(1, 2)?.contiguous();
        Ok((t(q)?, t(k)?, t(v)?))
    }

    fn forward(
        &self,
        x: &Tensor,
        ctx: &AttentionContext,
        rope: Option<&(Tensor, Tensor)>,
        alibi: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let dev = x.device();
        let fused = profile::scope("attn.qkv", dev, || self.query_key_value.forward(x))?;
        let rope = match (&self.rotary, rope) {
            (Some(_), Some((cos, sin))) => Some((cos, sin)),
            _ => None,
        };
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        // Flash attention without a cache (training, a prefill) reads the heads packed in one
        // buffer, split and rotated in one kernel, where it can.
        if cache.is_none()
            && ctx.kernel == AttentionKernel::Flash
            && let Some(heads) = profile::scope("attn.rope", dev, || {
                heads_for_flash(&fused, self.groups(), rope)
            })?
        {
            let out = profile::scope("attn.core", dev, || {
                merge_heads(&flash_attend_packed(
                    &heads,
                    scale,
                    alibi,
                    ctx.visibility()?,
                )?)
            })?;
            return profile::scope("attn.dense", dev, || self.dense.forward(&out));
        }
        // Decoding splits, rotates and caches in one kernel where it can.
        let done = match cache.as_mut() {
            Some(c) => profile::scope("attn.rope", dev, || {
                split_rotate_append(c, self.layer_idx, &fused, self.groups(), rope)
            })?,
            None => None,
        };
        let (q, k, v) = match done {
            Some(qkv) => qkv,
            None => {
                let (q, k, v) = profile::scope("attn.rope", dev, || {
                    let (q, k, v) = self.split_heads(&fused)?;
                    Ok(match rope {
                        Some((cos, sin)) => (
                            Rotary::apply(&q, cos, sin)?,
                            Rotary::apply(&k, cos, sin)?,
                            v,
                        ),
                        None => (q, k, v),
                    })
                })?;
                match cache {
                    Some(c) => {
                        let (k, v) =
                            profile::scope("attn.core", dev, || c.append(self.layer_idx, &k, &v))?;
                        (q, k, v)
                    }
                    None => (q, k, v),
                }
            }
        };
        let out = profile::scope("attn.core", dev, || {
            merge_heads(&attend_in(ctx, &q, &k, &v, scale, alibi)?)
        })?;
        profile::scope("attn.dense", dev, || self.dense.forward(&out))
    }
}

#[derive(Debug, Clone)]
pub struct FalconMlp {
    dense_h_to_4h: Linear,
    dense_4h_to_h: Linear,
    act: Activation,
}

impl FalconMlp {
    pub fn load(vb: VarBuilder, cfg: &FalconConfig, builder: &LinearBuilder) -> Result<Self> {
        let (h, f) = (cfg.hidden_size, cfg.ffn_hidden_size);
        Ok(FalconMlp {
            dense_h_to_4h: builder.load(vb.pp("dense_h_to_4h"), h, f, cfg.bias)?,
            dense_4h_to_h: builder.load(vb.pp("dense_4h_to_h"), f, h, cfg.bias)?,
            act: cfg.activation().map_err(candle_core::Error::wrap)?,
        })
    }

    fn training(&self) -> bool {
        [&self.dense_h_to_4h, &self.dense_4h_to_h]
            .iter()
            .any(|l| l.lora.as_ref().is_some_and(|l| l.training()))
    }

    /// `residual + (mlp(x) + attn)`, a parallel layer's output (transformers' order of the
    /// adds). Outside training the decoding kernels may apply the GELU after the up projection
    /// and the residual after the down projection (`ops::epilogue`, the same bits).
    fn forward_residual(&self, x: &Tensor, residual: &Tensor, attn: &Tensor) -> Result<Tensor> {
        let dev = x.device();
        if let Some(act) = self.up_gelu_outside_training(x)? {
            let down = &self.dense_4h_to_h;
            let out = Epilogue::Residual {
                x: residual,
                b: attn,
            };
            return profile::scope("mlp.down_residual", dev, || {
                down.forward_then(&act, false, out)
            });
        }
        let mlp = self.forward(x)?;
        profile::scope("residual", dev, || add3(residual, &mlp, attn))
    }

    /// The GELU of the up projection outside training, where the activation is GELU: the
    /// decoding kernel may apply it (`ops::epilogue`); `None` otherwise.
    fn up_gelu_outside_training(&self, x: &Tensor) -> Result<Option<Tensor>> {
        if self.act != Activation::Gelu || self.training() {
            return Ok(None);
        }
        let up = &self.dense_h_to_4h;
        profile::scope("mlp.up_act", x.device(), || {
            up.forward_then(x, false, Epilogue::Gelu)
        })
        .map(Some)
    }
}

impl Module for FalconMlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dev = x.device();
        let (up_proj, down) = (&self.dense_h_to_4h, &self.dense_4h_to_h);
        if let Some(act) = self.up_gelu_outside_training(x)? {
            return profile::scope("mlp.down", dev, || down.forward_t(&act, false));
        }
        let up = profile::scope("mlp.up", dev, || up_proj.forward(x))?;
        if self.act == Activation::Gelu {
            // The exact GELU goes into dense_4h_to_h's training node (the graph then keeps `up`
            // alone, not the activation too: the widest tensor of a layer).
            let train = down.lora.as_ref().is_some_and(|l| l.training());
            return profile::scope("mlp.act_down", dev, || down.forward_gelu_t(&up, train));
        }
        let act = profile::scope("mlp.act", dev, || self.act.apply(&up))?;
        profile::scope("mlp.down", dev, || self.dense_4h_to_h.forward(&act))
    }
}

/// The layer norms of a decoder layer, by variant.
#[derive(Debug, Clone)]
enum Norms {
    /// Parallel attention and MLP reading one `input_layernorm` (7B, 11B).
    Shared { input_layernorm: LayerNorm },
    /// Parallel attention and MLP with `ln_attn` and `ln_mlp` (40B, 180B).
    Split {
        ln_attn: LayerNorm,
        ln_mlp: LayerNorm,
    },
    /// Attention, residual, `post_attention_layernorm`, MLP (RW models without parallel_attn).
    Sequential {
        input_layernorm: LayerNorm,
        post_attention_layernorm: LayerNorm,
    },
}

#[derive(Debug, Clone)]
pub struct FalconDecoderLayer {
    self_attention: FalconAttention,
    mlp: FalconMlp,
    norms: Norms,
}

impl FalconDecoderLayer {
    pub fn load(
        vb: VarBuilder,
        cfg: &FalconConfig,
        builder: &LinearBuilder,
        layer_idx: usize,
    ) -> Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.layer_norm_epsilon);
        let norms = if !cfg.parallel_attn {
            Norms::Sequential {
                input_layernorm: LayerNorm::load(vb.pp("input_layernorm"), h, eps)?,
                post_attention_layernorm: LayerNorm::load(
                    vb.pp("post_attention_layernorm"),
                    h,
                    eps,
                )?,
            }
        } else if cfg.two_layer_norms() {
            Norms::Split {
                ln_attn: LayerNorm::load(vb.pp("ln_attn"), h, eps)?,
                ln_mlp: LayerNorm::load(vb.pp("ln_mlp"), h, eps)?,
            }
        } else {
            Norms::Shared {
                input_layernorm: LayerNorm::load(vb.pp("input_layernorm"), h, eps)?,
            }
        };
        Ok(FalconDecoderLayer {
            self_attention: FalconAttention::load(
                vb.pp("self_attention"),
                cfg,
                builder,
                layer_idx,
            )?,
            mlp: FalconMlp::load(vb.pp("mlp"), cfg, builder)?,
            norms,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        ctx: &AttentionContext,
        rope: Option<&(Tensor, Tensor)>,
        alibi: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        // The additions keep transformers' order, `residual + (mlp + attention)`, so f32 sums
        // round the same way.
        match &self.norms {
            Norms::Shared { input_layernorm } => {
                let dev = x.device();
                let ln = profile::scope("ln", dev, || input_layernorm.forward(x))?;
                let attn = self.self_attention.forward(&ln, ctx, rope, alibi, cache)?;
                self.mlp.forward_residual(&ln, x, &attn)
            }
            Norms::Split { ln_attn, ln_mlp } => {
                let attn =
                    self.self_attention
                        .forward(&ln_attn.forward(x)?, ctx, rope, alibi, cache)?;
                self.mlp.forward_residual(&ln_mlp.forward(x)?, x, &attn)
            }
            Norms::Sequential {
                input_layernorm,
                post_attention_layernorm,
            } => {
                let attn = self.self_attention.forward(
                    &input_layernorm.forward(x)?,
                    ctx,
                    rope,
                    alibi,
                    cache,
                )?;
                let residual = (x + attn)?;
                let mlp = self
                    .mlp
                    .forward(&post_attention_layernorm.forward(&residual)?)?;
                &residual + mlp
            }
        }
    }
}

impl crate::nn::checkpoint::DecoderLayer for FalconDecoderLayer {
    fn linears(&self) -> Vec<&Linear> {
        vec![
            &self.self_attention.query_key_value,
            &self.self_attention.dense,
            &self.mlp.dense_h_to_4h,
            &self.mlp.dense_4h_to_h,
        ]
    }
}

/// `FalconForCausalLM`: `transformer.{word_embeddings, h.{i}, ln_f}` and `lm_head` (tied to
/// the embeddings unless `tie_word_embeddings` is false).
#[derive(Debug, Clone)]
pub struct Falcon {
    word_embeddings: Embedding,
    h: Vec<FalconDecoderLayer>,
    ln_f: LayerNorm,
    lm_head: Linear,
    config: FalconConfig,
    rotary: Option<Rotary>,
    device: Device,
    dtype: DType,
    /// The attention the layers run (transformers' `attn_implementation`).
    attention: AttentionKernel,
}

impl Falcon {
    /// Builds the model from `vb` (rooted at the checkpoint's top level); every linear layer
    /// comes from `builder`.
    pub fn load(vb: VarBuilder, cfg: &FalconConfig, builder: &LinearBuilder) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::wrap)?;
        let t = vb.pp("transformer");
        let emb = t
            .pp("word_embeddings")
            .get((cfg.vocab_size, cfg.hidden_size), "weight")?;
        let h = (0..cfg.num_hidden_layers)
            .map(|i| FalconDecoderLayer::load(t.pp(format!("h.{i}")), cfg, builder, i))
            .collect::<Result<Vec<_>>>()?;
        let ln_f = LayerNorm::load(t.pp("ln_f"), cfg.hidden_size, cfg.layer_norm_epsilon)?;
        let lm_head = lm_head(
            &vb,
            builder,
            &emb,
            cfg.tie_word_embeddings,
            cfg.hidden_size,
            cfg.vocab_size,
        )?;
        Ok(Falcon {
            word_embeddings: Embedding::new(emb, cfg.hidden_size),
            h,
            ln_f,
            lm_head,
            rotary: (!cfg.alibi)
                .then(|| Rotary::new(cfg.head_dim(), cfg.rope_theta, cfg.rope_scaling.as_ref())),
            config: cfg.clone(),
            device: vb.device().clone(),
            dtype: vb.dtype(),
            attention: AttentionKernel::Eager,
        })
    }

    pub fn config(&self) -> &FalconConfig {
        &self.config
    }

    /// Runs the layers' attention with `kernel` from now on; refused where it cannot serve
    /// this model's heads.
    pub fn set_attention(&mut self, kernel: AttentionKernel) -> Result<()> {
        kernel.check_head_dim(self.config.head_dim())?;
        self.attention = kernel;
        Ok(())
    }

    /// The token embedding matrix `[vocab, hidden]`.
    pub fn embeddings(&self) -> &Tensor {
        self.word_embeddings.embeddings()
    }
}

impl CausalLm for Falcon {
    fn hidden_states_in(
        &self,
        input_ids: &Tensor,
        ctx: AttentionContext,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        ctx.check_fits(input_ids, cache.as_deref())?;
        let ctx = ctx.with_kernel(self.attention);
        let mut x = self.word_embeddings.forward(input_ids)?;
        let rope = match &self.rotary {
            Some(r) => Some(r.cos_sin(&ctx, x.dtype(), &self.device)?),
            None => None,
        };
        let alibi = if self.config.alibi {
            Some(alibi_bias(
                &ctx,
                self.config.num_attention_heads,
                x.dtype(),
                &self.device,
            )?)
        } else {
            None
        };
        let inputs = std::sync::Arc::new((ctx, rope, alibi));
        for (i, layer) in self.h.iter().enumerate() {
            let inputs = inputs.clone();
            x = crate::nn::checkpoint::run_layer(
                i,
                layer,
                &x,
                cache.as_deref_mut(),
                move |l, h, c| {
                    let (ctx, rope, alibi) = &*inputs;
                    l.forward(h, ctx, rope.as_ref(), alibi.as_ref(), c)
                },
            )?;
        }
        self.ln_f.forward(&x)
    }

    fn lm_head(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(hidden)
    }

    fn num_layers(&self) -> usize {
        self.h.len()
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
            .h
            .iter()
            .flat_map(crate::nn::checkpoint::DecoderLayer::linears)
            .collect();
        out.push(&self.lm_head);
        out
    }

    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut out = Vec::new();
        for l in &mut self.h {
            let a = &mut l.self_attention;
            out.extend([&mut a.query_key_value, &mut a.dense]);
            out.extend([&mut l.mlp.dense_h_to_4h, &mut l.mlp.dense_4h_to_h]);
        }
        out.push(&mut self.lm_head);
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::HashMap;

    use super::*;

    /// A random checkpoint in HF names for `cfg`, as a map.
    pub(crate) fn random_weights(cfg: &FalconConfig, seed: u64) -> Result<HashMap<String, Tensor>> {
        let dev = Device::Cpu;
        let mut rng = seed;
        let mut next = |shape: &[usize], scale: f32, offset: f32| -> Result<Tensor> {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = (0..n)
                .map(|_| {
                    // xorshift: deterministic without pulling a RNG into the test.
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    offset + scale * ((rng % 20000) as f32 / 10000.0 - 1.0)
                })
                .collect();
            Tensor::from_vec(data, shape, &dev)
        };
        let (h, f, v) = (cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size);
        let mut w = HashMap::new();
        w.insert(
            "transformer.word_embeddings.weight".to_string(),
            next(&[v, h], 0.5, 0.)?,
        );
        let norms: Vec<&str> = if !cfg.parallel_attn {
            vec!["input_layernorm", "post_attention_layernorm"]
        } else if cfg.two_layer_norms() {
            vec!["ln_attn", "ln_mlp"]
        } else {
            vec!["input_layernorm"]
        };
        for i in 0..cfg.num_hidden_layers {
            let p = format!("transformer.h.{i}");
            for n in &norms {
                w.insert(format!("{p}.{n}.weight"), next(&[h], 0.1, 1.)?);
                w.insert(format!("{p}.{n}.bias"), next(&[h], 0.1, 0.)?);
            }
            for (name, o, i_) in [
                ("self_attention.query_key_value", cfg.qkv_out_dim(), h),
                ("self_attention.dense", h, h),
                ("mlp.dense_h_to_4h", f, h),
                ("mlp.dense_4h_to_h", h, f),
            ] {
                w.insert(
                    format!("{p}.{name}.weight"),
                    next(&[o, i_], 1.0 / (i_ as f32).sqrt(), 0.)?,
                );
                if cfg.bias {
                    w.insert(format!("{p}.{name}.bias"), next(&[o], 0.1, 0.)?);
                }
            }
        }
        w.insert("transformer.ln_f.weight".into(), next(&[h], 0.1, 1.)?);
        w.insert("transformer.ln_f.bias".into(), next(&[h], 0.1, 0.)?);
        Ok(w)
    }

    pub(crate) fn small(kind: &str) -> FalconConfig {
        let base = FalconConfig {
            vocab_size: 64,
            hidden_size: 32,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_kv_heads: 4,
            ffn_hidden_size: 128,
            max_position_embeddings: 64,
            ..FalconConfig::falcon7b()
        };
        match kind {
            "7b" => base,
            "40b" => FalconConfig {
                new_decoder_architecture: true,
                num_kv_heads: 2,
                ..base
            },
            "11b" => FalconConfig {
                new_decoder_architecture: true,
                num_kv_heads: 1,
                num_ln_in_parallel_attn: Some(1),
                ..base
            },
            "rw" => FalconConfig {
                alibi: true,
                multi_query: false,
                parallel_attn: false,
                bias: true,
                num_attention_heads: 8,
                num_kv_heads: 8,
                ..base
            },
            _ => unreachable!(),
        }
    }

    /// Cached decoding must give the logits a full forward gives, with and without left padding.
    #[test]
    fn cache_and_padding_agree_with_full_forward() -> Result<()> {
        let dev = Device::Cpu;
        for kind in ["7b", "40b", "11b", "rw"] {
            let cfg = small(kind);
            let vb = VarBuilder::from_tensors(random_weights(&cfg, 7)?, DType::F32, &dev);
            let model = Falcon::load(vb, &cfg, &LinearBuilder::dense())?;
            let ids = Tensor::new(&[[5u32, 9, 3, 17, 2, 40]], &dev)?;
            let full = model.forward(&ids, None, None)?.squeeze(0)?;

            let mut cache = model.new_cache();
            let first = model
                .forward(&ids.narrow(1, 0, 4)?, None, Some(&mut cache))?
                .squeeze(0)?;
            let mut steps = vec![first];
            for t in 4..6 {
                steps.push(
                    model
                        .forward(&ids.narrow(1, t, 1)?, None, Some(&mut cache))?
                        .squeeze(0)?,
                );
            }
            let cached = Tensor::cat(&steps, 0)?;
            let d = (&full - &cached)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d < 1e-4, "{kind}: cached vs full differ by {d}");

            // The same sequence behind two pads, in a batch with itself unpadded.
            let padded = Tensor::new(
                &[[0u32, 0, 5, 9, 3, 17, 2, 40], [1, 1, 5, 9, 3, 17, 2, 40]],
                &dev,
            )?;
            let mask = Tensor::new(
                &[[0u32, 0, 1, 1, 1, 1, 1, 1], [1u32, 1, 1, 1, 1, 1, 1, 1]],
                &dev,
            )?;
            let out = model.forward_last(&padded, Some(&mask), None)?;
            let row0 = out.get(0)?;
            let d = (&row0 - full.get(5)?)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(d < 1e-4, "{kind}: padded vs unpadded differ by {d}");
        }
        Ok(())
    }

    /// The gradient of a tensor split by `narrow`, as the fused q, k, v are: every piece's
    /// gradient lands in its slice, added to what other uses of the tensor contribute, and a
    /// piece used twice counts twice (a guard for any change to how candle's autograd
    /// accumulates narrows; one was tried on 2026-12-06 and measured no faster).
    #[test]
    fn narrowed_pieces_give_their_gradients_to_their_slices() -> Result<()> {
        let dev = Device::Cpu;
        let x =
            candle_core::Var::from_tensor(&Tensor::arange(0f32, 60., &dev)?.reshape((2, 5, 6))?)?;
        let w = |seed: f32, cols: usize| -> Result<Tensor> {
            let t = Tensor::arange(0f32, (10 * cols) as f32, &dev)?.reshape((2, 5, cols))?;
            t.affine(0.1, seed as f64)?.cos()
        };
        let (wq, wk, wv, wx) = (w(0.3, 3)?, w(0.7, 2)?, w(1.1, 1)?, w(1.9, 6)?);
        let xt = x.as_tensor();
        let q = xt.narrow(2, 0, 3)?;
        let k = xt.narrow(2, 3, 2)?;
        let v = xt.narrow(2, 5, 1)?;
        let loss = ((xt * &wx)?.sum_all()?
            + (&q * &wq)?.sum_all()?
            + (&k * &wk)?.sum_all()?
            + (&v * &wv)?.sum_all()?
            + (&k * &wk)?.sum_all()?
            + (xt.sqr()?.sum_all()? * 0.5)?)?;
        let grads = loss.backward()?;
        let got = grads
            .get(xt)
            .expect("x has a gradient")
            .flatten_all()?
            .to_vec1::<f32>()?;
        let want = (Tensor::cat(&[&wq, &(&wk * 2.0)?, &wv], 2)? + &wx + xt)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let worst = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (g - w).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-5, "{worst}: {got:?} against {want:?}");
        Ok(())
    }

    /// Checkpointing recomputes the same graph: every adapter gradient equals the plain run's.
    #[test]
    fn checkpointed_layers_give_the_same_adapter_gradients() -> Result<()> {
        let cfg = small("7b");
        let builder = crate::nn::checkpoint::tests::lora_builder()?;
        let vb = VarBuilder::from_tensors(random_weights(&cfg, 3)?, DType::F32, &Device::Cpu);
        let model = Falcon::load(vb, &cfg, &builder)?;
        crate::nn::checkpoint::tests::assert_same_gradients(&model, builder.lora().unwrap())
    }

    /// The bf16 path (as on a GPU) runs every variant and stays close to f32.
    #[test]
    fn bf16_runs_close_to_f32() -> Result<()> {
        let dev = Device::Cpu;
        for kind in ["7b", "40b", "11b", "rw"] {
            let cfg = small(kind);
            let w = random_weights(&cfg, 7)?;
            let ids = Tensor::new(&[[0u32, 5, 9, 3, 17]], &dev)?;
            let mask = Tensor::new(&[[0u32, 1, 1, 1, 1]], &dev)?;
            let mut out = Vec::new();
            for dtype in [DType::F32, DType::BF16] {
                let vb = VarBuilder::from_tensors(w.clone(), dtype, &dev);
                let model = Falcon::load(vb, &cfg, &LinearBuilder::dense())?;
                out.push(
                    model
                        .forward_last(&ids, Some(&mask), None)?
                        .to_dtype(DType::F32)?,
                );
            }
            let scale = out[0].abs()?.max_all()?.to_scalar::<f32>()?;
            let d = (&out[0] - &out[1])?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                d < 0.05 * scale.max(1.0),
                "{kind}: bf16 differs by {d} (scale {scale})"
            );
        }
        Ok(())
    }

    #[test]
    fn missing_tensor_is_named() -> Result<()> {
        let cfg = small("40b");
        let mut w = random_weights(&cfg, 1)?;
        w.remove("transformer.h.1.ln_mlp.bias");
        let vb = VarBuilder::from_tensors(w, DType::F32, &Device::Cpu);
        let err = Falcon::load(vb, &cfg, &LinearBuilder::dense())
            .unwrap_err()
            .to_string();
        assert!(err.contains("transformer.h.1.ln_mlp.bias"), "{err}");
        Ok(())
    }
}
