//! A BERT encoder mirroring transformers' `BertModel` (tensor names `embeddings.*`,
//! `encoder.layer.{i}.attention.self.query`, …, with or without a `bert.` prefix) that returns
//! the hidden states of one chosen layer, and the tokenization BERTScore needs around it.
//!
//! This backs the host's `embed` capability: per text, its tokens, ids, which are special
//! (`[CLS]`, `[SEP]`) and one vector per token.

use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, VarBuilder};
use serde::{Deserialize, Serialize};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use crate::models::config::Activation;
use crate::nn::layers::LayerNorm;
use crate::nn::linear::{Linear, LinearBuilder};
use crate::ops::softmax::softmax_last_dim;

/// transformers' `BertConfig` fields this encoder uses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_pos_type")]
    pub position_embedding_type: String,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_max_pos() -> usize {
    512
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_pos_type() -> String {
    "absolute".into()
}

impl BertConfig {
    pub fn validate(&self) -> Result<()> {
        if self.position_embedding_type != "absolute" {
            bail!(
                "config field `position_embedding_type` = {:?} is not supported (only absolute)",
                self.position_embedding_type
            );
        }
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            bail!(
                "config field `num_attention_heads` ({}) does not divide hidden_size ({})",
                self.num_attention_heads,
                self.hidden_size
            );
        }
        self.activation()?;
        Ok(())
    }

    fn activation(&self) -> Result<Activation> {
        Ok(match self.hidden_act.as_str() {
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            other => bail!("config field `hidden_act` = {other:?} is not supported"),
        })
    }
}

#[derive(Debug, Clone)]
struct BertEmbeddings {
    word_embeddings: Embedding,
    position_embeddings: Embedding,
    token_type_embeddings: Embedding,
    layer_norm: LayerNorm,
}

impl BertEmbeddings {
    fn load(vb: VarBuilder, c: &BertConfig) -> candle_core::Result<Self> {
        let emb = |name: &str, n: usize| -> candle_core::Result<Embedding> {
            Ok(Embedding::new(
                vb.pp(name).get((n, c.hidden_size), "weight")?,
                c.hidden_size,
            ))
        };
        Ok(BertEmbeddings {
            word_embeddings: emb("word_embeddings", c.vocab_size)?,
            position_embeddings: emb("position_embeddings", c.max_position_embeddings)?,
            token_type_embeddings: emb("token_type_embeddings", c.type_vocab_size)?,
            layer_norm: LayerNorm::load(vb.pp("LayerNorm"), c.hidden_size, c.layer_norm_eps)?,
        })
    }

    fn forward(&self, ids: &Tensor, type_ids: &Tensor) -> candle_core::Result<Tensor> {
        let (_, s) = ids.dims2()?;
        let pos = Tensor::arange(0u32, s as u32, ids.device())?.unsqueeze(0)?;
        let x = self.word_embeddings.forward(ids)?;
        let x = (x + self.token_type_embeddings.forward(type_ids)?)?;
        let x = x.broadcast_add(&self.position_embeddings.forward(&pos)?)?;
        self.layer_norm.forward(&x)
    }
}

#[derive(Debug, Clone)]
struct BertLayer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    out_norm: LayerNorm,
    heads: usize,
    act: Activation,
}

impl BertLayer {
    fn load(vb: VarBuilder, c: &BertConfig, b: &LinearBuilder) -> candle_core::Result<Self> {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let a = vb.pp("attention");
        Ok(BertLayer {
            query: b.load(a.pp("self.query"), h, h, true)?,
            key: b.load(a.pp("self.key"), h, h, true)?,
            value: b.load(a.pp("self.value"), h, h, true)?,
            attn_out: b.load(a.pp("output.dense"), h, h, true)?,
            attn_norm: LayerNorm::load(a.pp("output.LayerNorm"), h, c.layer_norm_eps)?,
            intermediate: b.load(vb.pp("intermediate.dense"), h, i, true)?,
            output: b.load(vb.pp("output.dense"), i, h, true)?,
            out_norm: LayerNorm::load(vb.pp("output.LayerNorm"), h, c.layer_norm_eps)?,
            heads: c.num_attention_heads,
            act: c.activation().map_err(candle_core::Error::wrap)?,
        })
    }

    fn forward(&self, x: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
        let (b, s, h) = x.dims3()?;
        let d = h / self.heads;
        let split = |t: Tensor| {
            t.reshape((b, s, self.heads, d))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.query.forward(x)?)?;
        let k = split(self.key.forward(x)?)?;
        let v = split(self.value.forward(x)?)?;
        let scores = (q.matmul(&k.t()?.contiguous()?)? / (d as f64).sqrt())?.broadcast_add(bias)?;
        let probs = softmax_last_dim(&scores, x.dtype())?;
        let ctx = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, s, h))?;
        let x = self
            .attn_norm
            .forward(&(self.attn_out.forward(&ctx)? + x)?)?;
        let inter = self.act.apply(&self.intermediate.forward(&x)?)?;
        self.out_norm.forward(&(self.output.forward(&inter)? + &x)?)
    }
}

/// `BertModel` without the pooler.
#[derive(Debug, Clone)]
pub struct Bert {
    embeddings: BertEmbeddings,
    layers: Vec<BertLayer>,
    pub config: BertConfig,
    device: Device,
}

impl Bert {
    pub fn load(vb: VarBuilder, config: &BertConfig) -> Result<Self> {
        config.validate()?;
        // sentence-transformers checkpoints store `embeddings.*`; BertFor* ones `bert.embeddings.*`.
        let vb = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") {
            vb.pp("bert")
        } else {
            vb
        };
        let builder = LinearBuilder::dense();
        let embeddings = BertEmbeddings::load(vb.pp("embeddings"), config)?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| BertLayer::load(vb.pp(format!("encoder.layer.{i}")), config, &builder))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Bert {
            embeddings,
            layers,
            config: config.clone(),
            device: vb.device().clone(),
        })
    }

    /// Loads `config.json` + `model.safetensors` from a folder.
    pub fn load_dir(dir: &Path, device: &Device) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path)
            .with_context(|| format!("failed to read {}", cfg_path.display()))?;
        let config: BertConfig = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a BERT config", cfg_path.display()))?;
        let weights = dir.join("model.safetensors");
        if !weights.is_file() {
            bail!("{} has no model.safetensors", dir.display());
        }
        // SAFETY: read-only mmap of a file that is not modified while loaded.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, device) }
            .with_context(|| format!("failed to open {}", weights.display()))?;
        Bert::load(vb, &config)
            .with_context(|| format!("failed to build BERT from {}", dir.display()))
    }

    /// Hidden states of `layer` (0 = embeddings output, n = after layer n), `[batch, seq,
    /// hidden]`, for `ids` with `attention_mask` (1 = token, 0 = padding).
    pub fn hidden_states(
        &self,
        ids: &Tensor,
        attention_mask: &Tensor,
        layer: usize,
    ) -> Result<Tensor> {
        if layer > self.layers.len() {
            bail!(
                "layer {layer} asked of a {}-layer encoder",
                self.layers.len()
            );
        }
        let (b, s) = ids.dims2()?;
        if s > self.config.max_position_embeddings {
            bail!(
                "{s} tokens exceed max_position_embeddings {}",
                self.config.max_position_embeddings
            );
        }
        let type_ids = Tensor::zeros((b, s), DType::U32, &self.device)?;
        // transformers' extended mask: (1 - mask) * finfo.min, over keys.
        let mask = attention_mask.to_dtype(DType::F32)?;
        let bias = ((mask.ones_like()? - mask)? * f32::MIN as f64)?.reshape((b, 1, 1, s))?;
        let mut x = self.embeddings.forward(ids, &type_ids)?;
        for l in &self.layers[..layer] {
            x = l.forward(&x, &bias)?;
        }
        Ok(x)
    }
}

/// One text, embedded.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EmbeddedText {
    pub tokens: Vec<String>,
    pub ids: Vec<u32>,
    /// `true` for `[CLS]`, `[SEP]` and other special tokens.
    pub special: Vec<bool>,
    /// One vector per token.
    pub vectors: Vec<Vec<f32>>,
}

/// The tokenizer as BERTScore needs it: the fixed padding/truncation a `tokenizer.json` may
/// carry (MiniLM's pads and truncates at 128) replaced by truncation at
/// `max_position_embeddings` and padding to the batch's longest, with an attention mask.
pub fn prepare_tokenizer(mut tokenizer: Tokenizer, max_len: usize) -> Result<Tokenizer> {
    tokenizer
        .with_truncation(Some(TruncationParams {
            max_length: max_len,
            ..Default::default()
        }))
        .map_err(|e| anyhow::anyhow!("failed to set truncation: {e}"))?;
    let pad_id = tokenizer.token_to_id("[PAD]").unwrap_or(0);
    let pad_token = tokenizer
        .id_to_token(pad_id)
        .unwrap_or_else(|| "[PAD]".into());
    tokenizer.with_padding(Some(PaddingParams {
        strategy: PaddingStrategy::BatchLongest,
        pad_id,
        pad_token,
        ..Default::default()
    }));
    Ok(tokenizer)
}

/// Tokenizes `texts` (with `[CLS]`/`[SEP]`) and returns each one's tokens and layer-`layer`
/// vectors, `batch_size` texts per forward pass.
pub fn embed(
    model: &Bert,
    tokenizer: &Tokenizer,
    texts: &[String],
    layer: usize,
    batch_size: usize,
) -> Result<Vec<EmbeddedText>> {
    let mut out = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(batch_size.max(1)) {
        let encs = tokenizer
            .encode_batch(chunk.to_vec(), true)
            .map_err(|e| anyhow::anyhow!("tokenizing failed: {e}"))?;
        let (b, s) = (encs.len(), encs[0].get_ids().len());
        let ids: Vec<u32> = encs.iter().flat_map(|e| e.get_ids().to_vec()).collect();
        let mask: Vec<u32> = encs
            .iter()
            .flat_map(|e| e.get_attention_mask().to_vec())
            .collect();
        let ids_t = Tensor::from_vec(ids, (b, s), &model.device)?;
        let mask_t = Tensor::from_vec(mask, (b, s), &model.device)?;
        let hidden = model
            .hidden_states(&ids_t, &mask_t, layer)?
            .to_dtype(DType::F32)?;
        for (r, e) in encs.iter().enumerate() {
            let n = e.get_attention_mask().iter().filter(|m| **m == 1).count();
            let vectors = hidden.get(r)?.narrow(0, 0, n)?.to_vec2::<f32>()?;
            out.push(EmbeddedText {
                tokens: e.get_tokens()[..n].to_vec(),
                ids: e.get_ids()[..n].to_vec(),
                special: e.get_special_tokens_mask()[..n]
                    .iter()
                    .map(|m| *m == 1)
                    .collect(),
                vectors,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn tiny() -> (BertConfig, HashMap<String, Tensor>) {
        let c = BertConfig {
            vocab_size: 20,
            hidden_size: 8,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            intermediate_size: 16,
            hidden_act: "gelu".into(),
            max_position_embeddings: 16,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            position_embedding_type: "absolute".into(),
        };
        let dev = Device::Cpu;
        let r = |shape: &[usize]| Tensor::randn(0f32, 0.5, shape, &dev).unwrap();
        let mut w = HashMap::new();
        w.insert("embeddings.word_embeddings.weight".into(), r(&[20, 8]));
        w.insert("embeddings.position_embeddings.weight".into(), r(&[16, 8]));
        w.insert("embeddings.token_type_embeddings.weight".into(), r(&[2, 8]));
        for n in ["embeddings.LayerNorm"]
            .into_iter()
            .map(String::from)
            .chain((0..2).flat_map(|i| {
                [
                    format!("encoder.layer.{i}.attention.output.LayerNorm"),
                    format!("encoder.layer.{i}.output.LayerNorm"),
                ]
            }))
        {
            w.insert(format!("{n}.weight"), (r(&[8]) + 1.0).unwrap());
            w.insert(format!("{n}.bias"), r(&[8]));
        }
        for i in 0..2 {
            for (n, o, inp) in [
                ("attention.self.query", 8, 8),
                ("attention.self.key", 8, 8),
                ("attention.self.value", 8, 8),
                ("attention.output.dense", 8, 8),
                ("intermediate.dense", 16, 8),
                ("output.dense", 8, 16),
            ] {
                w.insert(format!("encoder.layer.{i}.{n}.weight"), r(&[o, inp]));
                w.insert(format!("encoder.layer.{i}.{n}.bias"), r(&[o]));
            }
        }
        (c, w)
    }

    /// Padding a text in a batch must not change its vectors.
    #[test]
    fn padded_batch_equals_alone() -> Result<()> {
        let (c, w) = tiny();
        let model = Bert::load(VarBuilder::from_tensors(w, DType::F32, &Device::Cpu), &c)?;
        let dev = Device::Cpu;
        let alone = model.hidden_states(
            &Tensor::new(&[[1u32, 5, 6, 2]], &dev)?,
            &Tensor::new(&[[1u32, 1, 1, 1]], &dev)?,
            2,
        )?;
        let batch = model.hidden_states(
            &Tensor::new(&[[1u32, 5, 6, 2, 0, 0], [1, 7, 8, 9, 10, 2]], &dev)?,
            &Tensor::new(&[[1u32, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], &dev)?,
            2,
        )?;
        let d = (alone.get(0)? - batch.get(0)?.narrow(0, 0, 4)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(d < 1e-5, "{d}");
        assert_eq!(
            model
                .hidden_states(
                    &Tensor::new(&[[1u32]], &dev)?,
                    &Tensor::new(&[[1u32]], &dev)?,
                    0
                )?
                .dims(),
            &[1, 1, 8]
        );
        assert!(
            model
                .hidden_states(
                    &Tensor::new(&[[1u32]], &dev)?,
                    &Tensor::new(&[[1u32]], &dev)?,
                    3
                )
                .is_err()
        );
        Ok(())
    }
}
