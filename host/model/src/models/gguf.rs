//! Llama-architecture GGUF files (llama.cpp's format) turned into a trainable HF-layout
//! [`Llama`]: weights dequantized to the chosen dtype and renamed to transformers' names, the
//! config rebuilt from the metadata, and a `tokenizers::Tokenizer` rebuilt from the GPT-2 style
//! BPE vocabulary and merges, with the chat template and special ids.
//!
//! llama.cpp's converter permutes the rows of `q_proj`/`k_proj` so that its interleaved rotary
//! kernel sees HF's rotate-half layout; [`unpermute_qk`] undoes that, or the model would run its
//! rotary embedding on mismatched dimension pairs.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde_json::json;
use tokenizers::Tokenizer;

use crate::models::architecture::ModelConfig;
use crate::models::chat::ChatTemplate;
use crate::models::config::TokenIds;
use crate::models::llama::Llama;
use crate::models::llama::config::LlamaConfig;
use crate::models::load::{AnyModel, GenerationDefaults, LoadedModel};
use crate::nn::linear::LinearBuilder;

/// Inverse of llama.cpp's `permute(w, n_head)`: `[heads * head_dim, ..]` rows from
/// `(head, half, pair)` order back to `(head, pair, half)`.
pub fn unpermute_qk(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let dims = w.dims().to_vec();
    let rows = dims[0];
    let rest: Vec<usize> = dims[1..].to_vec();
    let half = rows / heads / 2;
    let mut shape = vec![heads, half, 2];
    shape.extend(&rest);
    w.reshape(shape)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

/// llama.cpp's `permute`, for tests and for writing GGUF files.
pub fn permute_qk(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let dims = w.dims().to_vec();
    let half = dims[0] / heads / 2;
    let mut shape = vec![heads, 2, half];
    shape.extend(&dims[1..]);
    w.reshape(shape)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

fn md<'a>(ct: &'a Content, key: &str) -> Result<&'a Value> {
    ct.metadata
        .get(key)
        .with_context(|| format!("GGUF metadata has no `{key}`"))
}

fn md_u(ct: &Content, key: &str) -> Result<usize> {
    let v = md(ct, key)?;
    Ok(v.to_u64()
        .or_else(|_| v.to_u32().map(u64::from))
        .or_else(|_| v.to_i32().map(|x| x as u64))
        .with_context(|| format!("GGUF `{key}` is not an integer"))? as usize)
}

fn md_f(ct: &Content, key: &str) -> Option<f64> {
    let v = ct.metadata.get(key)?;
    v.to_f32().map(f64::from).or_else(|_| v.to_f64()).ok()
}

fn md_id(ct: &Content, key: &str) -> Option<u32> {
    md_u(ct, key).ok().map(|v| v as u32)
}

fn md_strings(ct: &Content, key: &str) -> Result<Vec<String>> {
    md(ct, key)?
        .to_vec()
        .with_context(|| format!("GGUF `{key}` is not an array"))?
        .iter()
        .map(|v| {
            v.to_string()
                .cloned()
                .with_context(|| format!("GGUF `{key}` holds a non-string"))
        })
        .collect()
}

/// The Llama config a GGUF file's metadata describes.
pub fn llama_config(ct: &Content) -> Result<LlamaConfig> {
    let arch = md(ct, "general.architecture")?
        .to_string()
        .context("general.architecture is not a string")?
        .clone();
    if arch != "llama" {
        bail!("GGUF architecture `{arch}` is not supported (only llama)");
    }
    let heads = md_u(ct, "llama.attention.head_count")?;
    let hidden = md_u(ct, "llama.embedding_length")?;
    let vocab = match md_u(ct, "llama.vocab_size") {
        Ok(v) => v,
        Err(_) => md(ct, "tokenizer.ggml.tokens")?
            .to_vec()
            .context("tokenizer.ggml.tokens is not an array")?
            .len(),
    };
    let head_dim = md_u(ct, "llama.attention.key_length").unwrap_or(hidden / heads);
    if let Ok(rope_dim) = md_u(ct, "llama.rope.dimension_count")
        && rope_dim != head_dim
    {
        bail!(
            "GGUF llama.rope.dimension_count {rope_dim} != head_dim {head_dim}: partial rotary is not supported"
        );
    }
    let tied = !ct.tensor_infos.contains_key("output.weight");
    let cfg = LlamaConfig {
        model_type: "llama".into(),
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: md_u(ct, "llama.feed_forward_length")?,
        num_hidden_layers: md_u(ct, "llama.block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: md_u(ct, "llama.attention.head_count_kv").unwrap_or(heads),
        head_dim,
        hidden_act: "silu".into(),
        max_position_embeddings: md_u(ct, "llama.context_length").unwrap_or(2048),
        rms_norm_eps: md_f(ct, "llama.attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
        rope_theta: md_f(ct, "llama.rope.freq_base").unwrap_or(10_000.0),
        rope_scaling: None,
        attention_bias: ct.tensor_infos.contains_key("blk.0.attn_q.bias"),
        mlp_bias: false,
        tie_word_embeddings: tied,
        bos_token_id: md_id(ct, "tokenizer.ggml.bos_token_id"),
        eos_token_id: md_id(ct, "tokenizer.ggml.eos_token_id").map(TokenIds::One),
        pad_token_id: md_id(ct, "tokenizer.ggml.padding_token_id"),
        torch_dtype: None,
    };
    cfg.validate()?;
    Ok(cfg)
}

/// GGUF tensor name → HF name, for the Llama tensors.
fn hf_name(gguf: &str) -> Option<String> {
    let top = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(t) = top {
        return Some(t.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, name) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = name.rsplit_once('.')?;
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// Dequantizes every tensor to `dtype` under its HF name, undoing the Q/K permutation.
pub fn hf_weights(
    ct: &Content,
    file: &mut std::fs::File,
    cfg: &LlamaConfig,
    dtype: DType,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    let mut names: Vec<&String> = ct.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        let Some(hf) = hf_name(name) else {
            // rope_freqs and the like carry nothing transformers' Llama uses.
            tracing::debug!("GGUF tensor {name} has no HF counterpart; skipped");
            continue;
        };
        let q = ct
            .tensor(file, name, &Device::Cpu)
            .with_context(|| format!("failed to read GGUF tensor {name}"))?;
        let mut t = q
            .dequantize(&Device::Cpu)
            .with_context(|| format!("failed to dequantize GGUF tensor {name}"))?;
        if name.contains(".attn_q.") {
            t = unpermute_qk(&t, cfg.num_attention_heads)?;
        } else if name.contains(".attn_k.") {
            t = unpermute_qk(&t, cfg.num_key_value_heads)?;
        }
        out.insert(hf, t.to_dtype(dtype)?.to_device(device)?);
    }
    Ok(out)
}

/// A `tokenizers` tokenizer equal to the HF `tokenizer.json` the GGUF was converted from, for
/// GPT-2 style byte-level BPE vocabularies (`tokenizer.ggml.model` = `gpt2`).
pub fn tokenizer(ct: &Content) -> Result<Tokenizer> {
    let model = md(ct, "tokenizer.ggml.model")?
        .to_string()
        .context("tokenizer.ggml.model is not a string")?;
    if model != "gpt2" {
        bail!("GGUF tokenizer model `{model}` is not supported (only gpt2 byte-level BPE)");
    }
    let tokens = md_strings(ct, "tokenizer.ggml.tokens")?;
    let merges = md_strings(ct, "tokenizer.ggml.merges")?;
    let types: Vec<i32> = match ct.metadata.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()?
            .iter()
            .map(|t| t.to_i32())
            .collect::<candle_core::Result<_>>()?,
        None => vec![1; tokens.len()],
    };
    let pre = ct
        .metadata
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    // Control (3) and user-defined (4) tokens are HF's added tokens; they are matched whole in
    // text, so "<|im_end|>" in a prompt is one token.
    let added: Vec<serde_json::Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(types.get(*i), Some(3 | 4)))
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": types[i] == 3 || t.starts_with('<')})
        })
        .collect();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    // llama.cpp's pre-tokenizer names: `smollm` (and a few others) split digits one by one
    // before the GPT-2 regex, as HF's Digits(individual_digits) + ByteLevel.
    let pre_tokenizer = match pre.as_str() {
        "smollm" | "starcoder" | "refact" | "codeshell" => {
            json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level]})
        }
        "gpt2" | "default" | "" => byte_level.clone(),
        other => bail!("GGUF pre-tokenizer `{other}` is not supported"),
    };
    let spec = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges}
    });
    Tokenizer::from_bytes(spec.to_string().as_bytes())
        .map_err(|e| anyhow::anyhow!("failed to build the GGUF tokenizer: {e}"))
}

/// Loads a Llama GGUF file as an HF-layout model with its tokenizer and chat template.
pub fn load(
    path: &Path,
    dtype: DType,
    device: &Device,
    builder: &LinearBuilder,
) -> Result<LoadedModel> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("failed to open {}", path.display()))?;
    let ct = Content::read(&mut file)
        .with_context(|| format!("{} is not a GGUF file", path.display()))?;
    let cfg = llama_config(&ct).with_context(|| format!("in {}", path.display()))?;
    let weights = hf_weights(&ct, &mut file, &cfg, dtype, device)
        .with_context(|| format!("in {}", path.display()))?;
    let vb = VarBuilder::from_tensors(weights, dtype, device);
    let model = Llama::load(vb, &cfg, builder)
        .with_context(|| format!("failed to build the model from {}", path.display()))?;
    let tokenizer = tokenizer(&ct).with_context(|| format!("in {}", path.display()))?;
    let token_text = |id: Option<u32>| id.and_then(|i| tokenizer.id_to_token(i));
    let chat_template = ct
        .metadata
        .get("tokenizer.chat_template")
        .and_then(|v| v.to_string().ok())
        .map(|t| ChatTemplate {
            template: t.clone(),
            bos_token: token_text(cfg.bos_token_id),
            eos_token: token_text(
                cfg.eos_token_id
                    .as_ref()
                    .and_then(|e| e.to_vec().first().copied()),
            ),
        });
    let defaults = GenerationDefaults {
        eos_token_ids: cfg.eos_token_ids(),
        bos_token_id: cfg.bos_token_id,
        pad_token_id: cfg.pad_token_id,
        chat_template,
    };
    Ok(LoadedModel {
        model: AnyModel::Llama(model),
        config: ModelConfig::Llama(cfg),
        tokenizer: Some(tokenizer),
        defaults,
        source: path.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::{GgmlDType, QTensor, gguf_file};

    use super::*;
    use crate::nn::causal_lm::CausalLm;

    /// HF's rotate-half rotary on HF rows equals llama.cpp's interleaved rotary on permuted
    /// rows, and unpermute inverts permute: so the unpermuted GGUF weights run right here.
    #[test]
    fn unpermute_restores_rotate_half_layout() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let (heads, hd, inp) = (3, 8, 5);
        let w = Tensor::randn(0f32, 1., (heads * hd, inp), &dev)?;
        let p = permute_qk(&w, heads)?;
        assert_eq!(
            unpermute_qk(&p, heads)?.to_vec2::<f32>()?,
            w.to_vec2::<f32>()?
        );
        let x = Tensor::randn(0f32, 1., (1, 4, inp), &dev)?;
        let proj = |w: &Tensor| -> candle_core::Result<Tensor> {
            x.broadcast_matmul(&w.t()?)?
                .reshape((1, 4, heads, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let pos = Tensor::arange(0f32, 4., &dev)?.unsqueeze(1)?;
        let inv: Vec<f32> = (0..hd / 2)
            .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / hd as f32))
            .collect();
        let freqs = pos.broadcast_mul(&Tensor::new(inv.as_slice(), &dev)?.unsqueeze(0)?)?;
        let (cos, sin) = (freqs.cos()?, freqs.sin()?);
        let hf = candle_nn::rotary_emb::rope(&proj(&w)?, &cos, &sin)?;
        let cpp = candle_nn::rotary_emb::rope_i(&proj(&p)?, &cos, &sin)?;
        // Same values, each head's dims in llama.cpp's order: compare after unpermuting them.
        let rows = |t: Tensor| {
            t.squeeze(0)?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((heads * hd, 4))
        };
        let hf = rows(hf)?;
        let cpp = unpermute_qk(&rows(cpp)?, heads)?;
        let d = (hf - cpp)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-5, "{d}");
        Ok(())
    }

    /// A tiny llama GGUF written the way llama.cpp does (permuted Q/K, GGUF names, BPE
    /// vocabulary) loads back into the HF-layout model it came from.
    #[test]
    fn tiny_gguf_round_trip() -> Result<()> {
        let dev = Device::Cpu;
        let cfg = LlamaConfig {
            vocab_size: 8,
            ..crate::models::llama::tests::tiny()
        };
        let weights = crate::models::llama::tests::random_weights(&cfg, 9)?;
        let reference = Llama::load(
            VarBuilder::from_tensors(weights.clone(), DType::F32, &dev),
            &cfg,
            &LinearBuilder::dense(),
        )?;

        let mut tensors = Vec::new();
        for (name, t) in &weights {
            let gguf = if name == "model.embed_tokens.weight" {
                "token_embd.weight".to_string()
            } else if name == "model.norm.weight" {
                "output_norm.weight".to_string()
            } else {
                let rest = name.strip_prefix("model.layers.").unwrap();
                let (l, m) = rest.split_once('.').unwrap();
                let m = m.strip_suffix(".weight").unwrap();
                let g = [
                    ("input_layernorm", "attn_norm"),
                    ("post_attention_layernorm", "ffn_norm"),
                    ("self_attn.q_proj", "attn_q"),
                    ("self_attn.k_proj", "attn_k"),
                    ("self_attn.v_proj", "attn_v"),
                    ("self_attn.o_proj", "attn_output"),
                    ("mlp.gate_proj", "ffn_gate"),
                    ("mlp.up_proj", "ffn_up"),
                    ("mlp.down_proj", "ffn_down"),
                ]
                .iter()
                .find(|(h, _)| *h == m)
                .unwrap()
                .1;
                format!("blk.{l}.{g}.weight")
            };
            let t = if gguf.contains("attn_q") {
                permute_qk(t, cfg.num_attention_heads)?
            } else if gguf.contains("attn_k") {
                permute_qk(t, cfg.num_key_value_heads)?
            } else {
                t.clone()
            };
            tensors.push((gguf, QTensor::quantize(&t, GgmlDType::F32)?));
        }
        let tokens = [
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "a",
            "b",
            "ab",
            "Ġ",
            "Ġab",
        ];
        let s = |x: &str| gguf_file::Value::String(x.to_string());
        let u = gguf_file::Value::U32;
        let md: Vec<(&str, gguf_file::Value)> = vec![
            ("general.architecture", s("llama")),
            ("llama.attention.head_count", u(4)),
            ("llama.attention.head_count_kv", u(2)),
            ("llama.block_count", u(2)),
            ("llama.embedding_length", u(32)),
            ("llama.feed_forward_length", u(48)),
            ("llama.context_length", u(64)),
            ("llama.rope.dimension_count", u(8)),
            ("llama.rope.freq_base", gguf_file::Value::F32(100000.0)),
            (
                "llama.attention.layer_norm_rms_epsilon",
                gguf_file::Value::F32(1e-5),
            ),
            ("tokenizer.ggml.model", s("gpt2")),
            ("tokenizer.ggml.pre", s("smollm")),
            (
                "tokenizer.ggml.tokens",
                gguf_file::Value::Array(tokens.iter().map(|t| s(t)).collect()),
            ),
            (
                "tokenizer.ggml.token_type",
                gguf_file::Value::Array(
                    [3, 3, 3, 1, 1, 1, 1, 1]
                        .iter()
                        .map(|t| gguf_file::Value::I32(*t))
                        .collect(),
                ),
            ),
            (
                "tokenizer.ggml.merges",
                gguf_file::Value::Array(vec![s("a b"), s("Ġ ab")]),
            ),
            ("tokenizer.ggml.bos_token_id", u(1)),
            ("tokenizer.ggml.eos_token_id", u(2)),
            (
                "tokenizer.chat_template",
                s("{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}"),
            ),
        ];
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("tiny.gguf");
        let mut f = std::fs::File::create(&path)?;
        let tensor_refs: Vec<(&str, &QTensor)> =
            tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let md_refs: Vec<(&str, &gguf_file::Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
        gguf_file::write(&mut f, &md_refs, &tensor_refs)?;
        drop(f);

        let loaded = load(&path, DType::F32, &dev, &LinearBuilder::dense())?;
        let ids = Tensor::new(&[[1u32, 3, 4, 5, 7, 2]], &dev)?;
        let a = reference.forward(&ids, None, None)?;
        let b = loaded.model.forward(&ids, None, None)?;
        assert!((a - b)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-5);
        assert_eq!(loaded.defaults.eos_token_ids, vec![2]);
        let tok = loaded.tokenizer.unwrap();
        let enc = tok
            .encode("<|im_start|>ab ab<|im_end|>", true)
            .map_err(anyhow::Error::msg)?;
        assert_eq!(enc.get_ids(), &[1, 5, 7, 2]);
        assert_eq!(
            tok.decode(&[5, 7], true).map_err(anyhow::Error::msg)?,
            "ab ab"
        );
        let rendered = loaded
            .defaults
            .chat_template
            .unwrap()
            .render(&[crate::models::chat::Message::new("user", "ab")], false)?;
        assert_eq!(rendered, "<|im_start|>ab<|im_end|>");
        Ok(())
    }
}
