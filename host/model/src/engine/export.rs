//! `adapterlab export`: the exact base weights adapterlab trains on, as an HF checkpoint
//! folder (`config.json`, `model.safetensors`, `tokenizer.json`, `tokenizer_config.json`,
//! `generation_config.json`) that transformers loads, so the Python stack and adapterlab can
//! start a comparison from identical bits. A GGUF model (SmolLM2's default copy is one) is
//! dequantized as the loader does it; a checkpoint folder is copied as it is.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use serde_json::json;

use crate::engine::DEFAULT_MODEL;
use crate::io::assets::{Fetcher, SMOLLM2, SMOLLM2_GGUF};

/// What was written.
#[derive(Debug, Clone, Serialize)]
pub struct ExportReport {
    pub out: PathBuf,
    /// `gguf` (dequantized) or `folder` (copied).
    pub from: String,
    pub files: Vec<String>,
    pub tensors: usize,
    pub dtype: String,
}

/// Writes `model` (the default alias, a `.gguf` file or a checkpoint folder) into `out`, which
/// must be new or empty. GGUF tensors are dequantized to `dtype`.
pub fn export(
    model: &str,
    out: &Path,
    dtype: DType,
    assets_dir: &Path,
    fetcher: &Fetcher,
) -> Result<ExportReport> {
    if out.is_file() || out.read_dir().is_ok_and(|mut d| d.next().is_some()) {
        bail!("{} exists and is not an empty folder", out.display());
    }
    std::fs::create_dir_all(out).with_context(|| format!("failed to create {}", out.display()))?;
    let source = if model == DEFAULT_MODEL {
        let dir = SMOLLM2.ensure(assets_dir, fetcher)?;
        if dir.join("model.safetensors").is_file() {
            dir
        } else {
            dir.join(SMOLLM2_GGUF)
        }
    } else {
        PathBuf::from(model)
    };
    if source.is_file() && source.extension().is_some_and(|e| e == "gguf") {
        return from_gguf(&source, out, dtype);
    }
    if source.is_dir() {
        return copy_folder(&source, out);
    }
    bail!("{model}: not the default model, a .gguf file or a checkpoint folder")
}

fn from_gguf(path: &Path, out: &Path, dtype: DType) -> Result<ExportReport> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("failed to open {}", path.display()))?;
    let ct = candle_core::quantized::gguf_file::Content::read(&mut file)
        .with_context(|| format!("{} is not a GGUF file", path.display()))?;
    let cfg =
        crate::models::gguf::llama_config(&ct).with_context(|| format!("in {}", path.display()))?;
    let weights: HashMap<String, Tensor> =
        crate::models::gguf::hf_weights(&ct, &mut file, &cfg, dtype, &Device::Cpu)
            .with_context(|| format!("in {}", path.display()))?;
    let tokenizer =
        crate::models::gguf::tokenizer(&ct).with_context(|| format!("in {}", path.display()))?;
    let dtype_name = match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    };
    let mut config = serde_json::to_value(&cfg)?;
    config["architectures"] = json!(["LlamaForCausalLM"]);
    config["torch_dtype"] = json!(dtype_name);
    write(out, "config.json", &serde_json::to_string_pretty(&config)?)?;
    let tensors = weights.len();
    candle_core::safetensors::save(&weights, out.join("model.safetensors")).with_context(|| {
        format!(
            "failed to write {}",
            out.join("model.safetensors").display()
        )
    })?;
    tokenizer
        .save(out.join("tokenizer.json"), false)
        .map_err(|e| anyhow::anyhow!("failed to write tokenizer.json: {e}"))?;
    let token = |id: Option<u32>| id.and_then(|i| tokenizer.id_to_token(i));
    let eos = cfg
        .eos_token_id
        .as_ref()
        .and_then(|e| e.to_vec().first().copied());
    let chat_template = ct
        .metadata
        .get("tokenizer.chat_template")
        .and_then(|v| v.to_string().ok())
        .cloned();
    let mut tokenizer_config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token(cfg.bos_token_id),
        "eos_token": token(eos),
        "model_max_length": cfg.max_position_embeddings,
        "clean_up_tokenization_spaces": false,
    });
    if let Some(t) = chat_template {
        tokenizer_config["chat_template"] = json!(t);
    }
    if let Some(pad) = token(cfg.pad_token_id) {
        tokenizer_config["pad_token"] = json!(pad);
    }
    write(
        out,
        "tokenizer_config.json",
        &serde_json::to_string_pretty(&tokenizer_config)?,
    )?;
    write(
        out,
        "generation_config.json",
        &serde_json::to_string_pretty(&json!({
            "bos_token_id": cfg.bos_token_id,
            "eos_token_id": cfg.eos_token_id,
            "pad_token_id": cfg.pad_token_id,
        }))?,
    )?;
    Ok(ExportReport {
        out: out.to_path_buf(),
        from: "gguf".into(),
        files: [
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
        ]
        .map(String::from)
        .to_vec(),
        tensors,
        dtype: dtype_name.into(),
    })
}

/// A checkpoint folder is already what transformers reads: its files are copied.
fn copy_folder(dir: &Path, out: &Path) -> Result<ExportReport> {
    if !dir.join("config.json").is_file() {
        bail!(
            "{} has no config.json: not a checkpoint folder",
            dir.display()
        );
    }
    let mut files = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("failed to read {}", dir.display()))?
        .flatten()
        .filter(|e| e.path().is_file())
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".json")
            || name.ends_with(".safetensors")
            || name.ends_with(".model")
            || name == "merges.txt"
            || name == "vocab.json"
        {
            std::fs::copy(entry.path(), out.join(&name))
                .with_context(|| format!("failed to copy {}", entry.path().display()))?;
            files.push(name);
        }
    }
    Ok(ExportReport {
        out: out.to_path_buf(),
        from: "folder".into(),
        files,
        tensors: 0,
        dtype: "as stored".into(),
    })
}

fn write(dir: &Path, name: &str, text: &str) -> Result<()> {
    let path = dir.join(name);
    std::fs::write(&path, text.to_string() + "\n")
        .with_context(|| format!("failed to write {}", path.display()))
}
