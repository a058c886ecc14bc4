//! Merging a LoRA adapter into a base checkpoint: `W' = W + scaling * B @ A` for every adapted
//! layer, written as a plain HF model folder (config.json without adapter or quantization
//! config, safetensors with metadata `{"format": "pt"}`, optional sharding).
//!
//! Works on tensors by HF name, so any architecture merges the same way. An NF4
//! (bitsandbytes) base is dequantized first, exactly as bitsandbytes would, so the merged model
//! is dense.

// Errors here are built once per failed file or tensor and carry names for the message;
// boxing them would buy nothing measurable.
#![allow(clippy::result_large_err)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};

use crate::io::tensors::{self, TensorIoError, TensorMap};
use crate::lora::peft::{self, PeftError};
use crate::quant::bnb::{self, MapLayer};

#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error(transparent)]
    Io(#[from] TensorIoError),
    #[error(transparent)]
    Peft(#[from] PeftError),
    #[error(transparent)]
    Bnb(#[from] bnb::BnbError),
    #[error(
        "{origin}: tensor {weight} has shape {found:?}, but the adapter's {module} needs [{out}, {inp}]"
    )]
    Shape {
        origin: String,
        weight: String,
        module: String,
        found: Vec<usize>,
        out: usize,
        inp: usize,
    },
    #[error("{adapter}: modules not found in {base}: {modules:?}")]
    NotFound {
        adapter: String,
        base: String,
        modules: Vec<String>,
    },
    #[error("{origin}: {source}")]
    Candle {
        origin: String,
        source: candle_core::Error,
    },
}

/// One adapted module: `(module path, A [r, in], B [out, r], scaling)`.
pub type LoraModule = (String, Tensor, Tensor, f64);

/// Replace every bitsandbytes NF4 layer in `map` by its dense weight (in the quant state's
/// dtype). Returns the layers dequantized.
pub fn dequantize_map(map: &mut TensorMap) -> Result<Vec<String>, MergeError> {
    let layers: Vec<String> = map
        .names()
        .filter_map(|n| {
            n.strip_suffix(&format!(".{}", bnb::QUANT_STATE_NF4))
                .map(String::from)
        })
        .collect();
    for layer in &layers {
        let q = bnb::read_nf4(&MapLayer { map, prefix: layer })?;
        let w = q
            .dequantize(q.dtype())
            .map_err(|source| MergeError::Candle {
                origin: map.origin().to_string(),
                source,
            })?;
        for suffix in [
            bnb::WEIGHT,
            bnb::ABSMAX,
            bnb::QUANT_MAP,
            bnb::NESTED_ABSMAX,
            bnb::NESTED_QUANT_MAP,
            bnb::QUANT_STATE_NF4,
        ] {
            map.remove(&format!("{layer}.{suffix}"));
        }
        map.insert(format!("{layer}.weight"), w);
    }
    Ok(layers)
}

/// Merge the modules whose `{module}.weight` is in `map`, in place. The sum is done in f32 and
/// rounded once to the weight's dtype, as PEFT's `merge_and_unload` does for a 16-bit base.
/// Returns the modules merged (others may live in another shard).
pub fn merge_into_map(
    map: &mut TensorMap,
    modules: &[LoraModule],
) -> Result<Vec<String>, MergeError> {
    let mut merged = Vec::new();
    for (module, a, b, scaling) in modules {
        let name = format!("{module}.weight");
        let Some(w) = map.get(&name).cloned() else {
            continue;
        };
        let (out, inp) = (b.dims()[0], a.dims()[1]);
        if w.dims() != [out, inp] {
            return Err(MergeError::Shape {
                origin: map.origin().to_string(),
                weight: name,
                module: module.clone(),
                found: w.dims().to_vec(),
                out,
                inp,
            });
        }
        let origin = map.origin().to_string();
        let candle = |source| MergeError::Candle {
            origin: origin.clone(),
            source,
        };
        let delta = b
            .to_dtype(DType::F32)
            .and_then(|b| b.matmul(&a.to_dtype(DType::F32)?))
            .and_then(|d| d * *scaling)
            .map_err(candle)?;
        let w2 = w
            .to_dtype(DType::F32)
            .and_then(|w32| (w32 + delta)?.to_dtype(w.dtype()))
            .map_err(candle)?;
        map.insert(name, w2);
        merged.push(module.clone());
    }
    Ok(merged)
}

/// Options for [`merge_model_dir`].
#[derive(Debug, Clone, Default)]
pub struct MergeOptions {
    /// Shard the output when a single input file is larger than this.
    pub max_shard_bytes: Option<u64>,
}

/// What [`merge_model_dir`] did.
#[derive(Debug, Clone)]
pub struct MergeReport {
    pub merged_modules: Vec<String>,
    pub dequantized_layers: Vec<String>,
    pub files: Vec<PathBuf>,
}

/// Merge the PEFT adapter in `adapter_dir` into the HF model in `base_dir` (dense or
/// bitsandbytes NF4) and write a dense HF model to `out_dir`.
pub fn merge_model_dir(
    base_dir: &Path,
    adapter_dir: &Path,
    out_dir: &Path,
    opts: &MergeOptions,
) -> Result<MergeReport, MergeError> {
    let adapter = peft::load_adapter(adapter_dir)?;
    let modules = adapter.modules()?;
    let mut config = tensors::read_config(base_dir)?;
    let mut merged: BTreeSet<String> = BTreeSet::new();
    let mut dequantized = Vec::new();
    let mut files = tensors::transform_model_dir(
        base_dir,
        out_dir,
        opts.max_shard_bytes,
        |mut map: TensorMap| {
            dequantized.extend(dequantize_map(&mut map)?);
            merged.extend(merge_into_map(&mut map, &modules)?);
            Ok::<_, MergeError>(map)
        },
    )?;
    let missing: Vec<String> = modules
        .iter()
        .map(|m| m.0.clone())
        .filter(|m| !merged.contains(m))
        .collect();
    if !missing.is_empty() {
        return Err(MergeError::NotFound {
            adapter: adapter_dir.join(peft::WEIGHTS_FILE).display().to_string(),
            base: base_dir.display().to_string(),
            modules: missing,
        });
    }
    if let Some(obj) = config.as_object_mut() {
        obj.remove("quantization_config");
    }
    files.push(tensors::write_config(out_dir, &config)?);
    Ok(MergeReport {
        merged_modules: merged.into_iter().collect(),
        dequantized_layers: dequantized,
        files,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::Device;

    use super::*;
    use crate::lora::{LoraConfig, TargetModules};
    use crate::nn::linear::LinearBuilder;
    use crate::quant::nf4::{Nf4Options, Nf4Tensor};

    fn t(v: &[f32], shape: (usize, usize)) -> Tensor {
        Tensor::from_slice(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn merges_dense_and_nf4_layers_and_writes_hf_folder() {
        let dev = Device::Cpu;
        let base = tempfile::tempdir().unwrap();
        let ad = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        let wq: Vec<f32> = (0..24).map(|i| (i as f32 * 0.37).sin() * 0.1).collect();
        let wq = t(&wq, (6, 4)).to_dtype(DType::BF16).unwrap();
        let nf4 = Nf4Tensor::from_tensor(&wq, Nf4Options::default()).unwrap();
        let mut m = TensorMap::from_tensors("b", bnb::nf4_tensors("m.k", &nf4).unwrap());
        m.insert("m.q.weight", wq.clone());
        m.insert("m.norm.weight", Tensor::ones(4, DType::BF16, &dev).unwrap());
        m.write_model_dir(base.path(), None).unwrap();
        let mut cfg = serde_json::json!({"model_type": "llama", "hidden_size": 4});
        cfg["quantization_config"] = bnb::quantization_config(DType::BF16, true, None);
        tensors::write_config(base.path(), &cfg).unwrap();
        std::fs::write(base.path().join("tokenizer.json"), "{}").unwrap();

        // An adapter on q and k with non-zero B.
        let vb = candle_nn::VarBuilder::from_tensors(
            HashMap::from([
                ("m.q.weight".to_string(), wq.clone()),
                ("m.k.weight".to_string(), wq.clone()),
            ]),
            DType::BF16,
            &dev,
        );
        let b = LinearBuilder::dense()
            .with_lora(LoraConfig {
                r: 2,
                lora_alpha: 4.0,
                target_modules: TargetModules::names(["q", "k"]),
                ..Default::default()
            })
            .unwrap();
        for name in ["m.q", "m.k"] {
            let l = b.load(vb.pp(name), 4, 6, false).unwrap();
            l.lora
                .as_ref()
                .unwrap()
                .b
                .set(&Tensor::full(0.25f32, (6, 2), &dev).unwrap())
                .unwrap();
        }
        peft::save_adapter(ad.path(), b.lora().unwrap(), &Default::default()).unwrap();

        let report =
            merge_model_dir(base.path(), ad.path(), out.path(), &MergeOptions::default()).unwrap();
        assert_eq!(report.merged_modules, ["m.k", "m.q"]);
        assert_eq!(report.dequantized_layers, ["m.k"]);
        let merged = TensorMap::read_model_dir(out.path()).unwrap();
        let names: Vec<&String> = merged.names().collect();
        assert_eq!(names, ["m.k.weight", "m.norm.weight", "m.q.weight"]);
        let cfg_out = tensors::read_config(out.path()).unwrap();
        assert!(cfg_out.get("quantization_config").is_none());
        assert!(out.path().join("tokenizer.json").is_file());
        // q: W + 2 * B @ A, against the layer's own merged weight.
        let ql = b
            .lora()
            .unwrap()
            .layers()
            .into_iter()
            .find(|l| l.module == "m.q")
            .unwrap();
        let expect = ql
            .merged_weight(&crate::quant::weight::DenseWeight { weight: wq.clone() })
            .unwrap();
        let got = merged.require("m.q.weight").unwrap();
        assert_eq!(got.dtype(), DType::BF16);
        assert_eq!(
            got.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap(),
            expect
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()
        );
    }

    #[test]
    fn merge_reports_shape_mismatch_and_missing_modules() {
        let mut m = TensorMap::from_tensors(
            "base/model.safetensors",
            [(
                "x.weight".to_string(),
                Tensor::zeros((3, 3), DType::F32, &Device::Cpu).unwrap(),
            )],
        );
        let a = Tensor::zeros((1, 4), DType::F32, &Device::Cpu).unwrap();
        let b = Tensor::zeros((3, 1), DType::F32, &Device::Cpu).unwrap();
        let e = merge_into_map(&mut m, &[("x".into(), a, b, 1.0)])
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "base/model.safetensors: tensor x.weight has shape [3, 3], but the adapter's x needs [3, 4]"
        );
    }
}
