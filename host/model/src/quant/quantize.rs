//! Quantizing a dense HF checkpoint to bitsandbytes NF4, saved so transformers loads it as a
//! pre-quantized model (`config.json` gets the `quantization_config` it reads).
//!
//! Which tensors: every 2-D float `*.weight` except those of modules named in
//! `keep_dense` (by default the embeddings and `lm_head`). For Falcon and Llama that is exactly
//! the set of `nn.Linear` layers transformers quantizes, so no architecture knowledge is needed.

// Errors here are built once per failed file or tensor and carry names for the message;
// boxing them would buy nothing measurable.
#![allow(clippy::result_large_err)]

use std::path::{Path, PathBuf};

use candle_core::DType;

use crate::io::tensors::{self, TensorIoError, TensorMap};
use crate::quant::bnb;
use crate::quant::nf4::{Nf4Options, Nf4Tensor};

#[derive(Debug, thiserror::Error)]
pub enum QuantizeError {
    #[error(transparent)]
    Io(#[from] TensorIoError),
    #[error("{origin}: tensor {name}: {source}")]
    Candle {
        origin: String,
        name: String,
        source: candle_core::Error,
    },
    #[error("{}: already has a quantization_config", path.display())]
    AlreadyQuantized { path: PathBuf },
}

/// Options for [`quantize_map`] and [`quantize_model_dir`].
#[derive(Debug, Clone)]
pub struct QuantizeOptions {
    pub nf4: Nf4Options,
    /// Written as `bnb_4bit_compute_dtype`.
    pub compute_dtype: DType,
    /// Module names (matched as path suffixes) whose weights stay dense.
    pub keep_dense: Vec<String>,
    /// Shard the output when a single input file is larger than this.
    pub max_shard_bytes: Option<u64>,
    /// Cast every float tensor to this dtype first (transformers' `dtype=` when it loads a model
    /// to quantize it); `None` keeps the checkpoint's dtypes.
    pub cast: Option<DType>,
}

impl Default for QuantizeOptions {
    fn default() -> Self {
        QuantizeOptions {
            nf4: Nf4Options::default(),
            compute_dtype: DType::BF16,
            keep_dense: [
                "lm_head",
                "embed_tokens",
                "word_embeddings",
                "wte",
                "wpe",
                "embed_positions",
                "embed_out",
            ]
            .map(String::from)
            .to_vec(),
            max_shard_bytes: None,
            cast: None,
        }
    }
}

impl QuantizeOptions {
    fn quantizes(&self, name: &str, t: &candle_core::Tensor) -> Option<String> {
        let module = name.strip_suffix(".weight")?;
        let float = matches!(t.dtype(), DType::BF16 | DType::F16 | DType::F32);
        let kept = self
            .keep_dense
            .iter()
            .any(|k| module == k || module.ends_with(&format!(".{k}")));
        (t.rank() == 2 && float && !kept).then(|| module.to_string())
    }
}

/// The tensors of `map` with every linear weight replaced by its bitsandbytes NF4 tensors.
/// Returns the new map and the modules quantized. Layers already in NF4 pass through.
pub fn quantize_map(
    map: &TensorMap,
    opts: &QuantizeOptions,
) -> Result<(TensorMap, Vec<String>), QuantizeError> {
    let mut out = TensorMap::new(map.origin());
    let mut done = Vec::new();
    for (name, t) in map.iter() {
        let candle = |source| QuantizeError::Candle {
            origin: map.origin().to_string(),
            name: name.clone(),
            source,
        };
        let is_float = matches!(
            t.dtype(),
            DType::BF16 | DType::F16 | DType::F32 | DType::F64
        );
        let cast;
        let t = match opts.cast {
            Some(dtype) if is_float && t.dtype() != dtype => {
                cast = t.to_dtype(dtype).map_err(candle)?;
                &cast
            }
            _ => t,
        };
        let Some(module) = opts.quantizes(name, t) else {
            out.insert(name.clone(), t.clone());
            continue;
        };
        let q = Nf4Tensor::from_tensor(t, opts.nf4).map_err(candle)?;
        for (k, v) in bnb::nf4_tensors(&module, &q).map_err(candle)? {
            out.insert(k, v);
        }
        done.push(module);
    }
    Ok((out, done))
}

/// What [`quantize_model_dir`] did.
#[derive(Debug, Clone)]
pub struct QuantizeReport {
    pub quantized_modules: Vec<String>,
    pub files: Vec<PathBuf>,
}

/// Quantize the dense HF model in `src` to NF4 and write it to `dst`, HF-loadable.
pub fn quantize_model_dir(
    src: &Path,
    dst: &Path,
    opts: &QuantizeOptions,
) -> Result<QuantizeReport, QuantizeError> {
    let mut config = tensors::read_config(src)?;
    if config.get("quantization_config").is_some() {
        return Err(QuantizeError::AlreadyQuantized {
            path: src.join("config.json"),
        });
    }
    let mut quantized = Vec::new();
    let mut files =
        tensors::transform_model_dir(src, dst, opts.max_shard_bytes, |map: TensorMap| {
            let (out, done) = quantize_map(&map, opts)?;
            quantized.extend(done);
            Ok::<_, QuantizeError>(out)
        })?;
    config["quantization_config"] =
        bnb::quantization_config(opts.compute_dtype, opts.nf4.double_quant, None);
    if let (Some(dtype), Some(obj)) = (opts.cast.and_then(bnb::dtype_name), config.as_object_mut())
    {
        // transformers 5 writes `dtype`, 4.x `torch_dtype`; update whichever is there.
        for key in ["dtype", "torch_dtype"] {
            if obj.contains_key(key) {
                obj.insert(
                    key.to_string(),
                    serde_json::Value::String(dtype.to_string()),
                );
            }
        }
    }
    files.push(tensors::write_config(dst, &config)?);
    quantized.sort();
    Ok(QuantizeReport {
        quantized_modules: quantized,
        files,
    })
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::quant::bnb::MapLayer;

    #[test]
    fn quantizes_linears_only_and_writes_config() {
        let dev = Device::Cpu;
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        let w: Vec<f32> = (0..64 * 8).map(|i| (i as f32 * 0.1).sin()).collect();
        let w = Tensor::from_vec(w, (8, 64), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let mut m = TensorMap::new("src");
        m.insert("transformer.word_embeddings.weight", w.clone());
        m.insert(
            "transformer.h.0.self_attention.query_key_value.weight",
            w.clone(),
        );
        m.insert(
            "transformer.h.0.input_layernorm.weight",
            Tensor::ones(64, DType::BF16, &dev).unwrap(),
        );
        m.insert("lm_head.weight", w.clone());
        m.write_model_dir(src.path(), None).unwrap();
        tensors::write_config(src.path(), &serde_json::json!({"model_type": "falcon"})).unwrap();

        let report =
            quantize_model_dir(src.path(), dst.path(), &QuantizeOptions::default()).unwrap();
        assert_eq!(
            report.quantized_modules,
            ["transformer.h.0.self_attention.query_key_value"]
        );
        let out = TensorMap::read_model_dir(dst.path()).unwrap();
        let layer = MapLayer {
            map: &out,
            prefix: "transformer.h.0.self_attention.query_key_value",
        };
        let q = bnb::read_nf4(&layer).unwrap();
        assert_eq!(
            q,
            Nf4Tensor::from_tensor(&w, Nf4Options::default()).unwrap()
        );
        assert_eq!(out.require("lm_head.weight").unwrap().dtype(), DType::BF16);
        assert_eq!(
            out.require("transformer.word_embeddings.weight")
                .unwrap()
                .dtype(),
            DType::BF16
        );
        let cfg = tensors::read_config(dst.path()).unwrap();
        assert_eq!(cfg["quantization_config"]["quant_method"], "bitsandbytes");
        assert_eq!(
            cfg["quantization_config"]["bnb_4bit_use_double_quant"],
            true
        );
        let e = quantize_model_dir(dst.path(), src.path(), &QuantizeOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.ends_with("config.json: already has a quantization_config"),
            "{e}"
        );
    }
}
