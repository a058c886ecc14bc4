//! Loading a model: from a local folder as transformers writes it (`config.json`,
//! `model.safetensors` or shards listed in `model.safetensors.index.json`, `tokenizer.json`,
//! `tokenizer_config.json`, `generation_config.json`), or by hub id through hf-hub.
//!
//! The files come from [`crate::io::checkpoint`]; every error names the file (and, for weights,
//! the tensor) it is about.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde_json::Value;
use tokenizers::Tokenizer;

use crate::io::checkpoint::{
    CheckpointFiles, Hub, check_safetensors_header, hub_files, local_files, looks_like_hub_id,
    prefetch_weights, read_json,
};
use crate::models::architecture::ModelConfig;
use crate::models::chat::ChatTemplate;
use crate::models::config::TokenIds;
use crate::models::falcon::Falcon;
use crate::models::llama::Llama;
use crate::nn::causal_lm::CausalLm;
use crate::nn::linear::{Linear, LinearBuilder};
use crate::ops::attention::{AttentionContext, AttentionKernel, KvCache};

/// Any of the architectures this crate runs.
#[derive(Debug, Clone)]
pub enum AnyModel {
    Falcon(Falcon),
    Llama(Llama),
}

impl AnyModel {
    /// Builds the model for `config` from `vb`.
    pub fn load(
        vb: VarBuilder,
        config: &ModelConfig,
        builder: &LinearBuilder,
    ) -> candle_core::Result<Self> {
        Ok(match config {
            ModelConfig::Falcon(c) => AnyModel::Falcon(Falcon::load(vb, c, builder)?),
            ModelConfig::Llama(c) => AnyModel::Llama(Llama::load(vb, c, builder)?),
        })
    }

    /// Runs the layers' attention with `kernel` from now on (transformers'
    /// `attn_implementation`); every model loads with eager attention.
    pub fn set_attention(&mut self, kernel: AttentionKernel) -> candle_core::Result<()> {
        match self {
            AnyModel::Falcon(m) => m.set_attention(kernel),
            AnyModel::Llama(m) => m.set_attention(kernel),
        }
    }

    fn inner(&self) -> &dyn CausalLm {
        match self {
            AnyModel::Falcon(m) => m,
            AnyModel::Llama(m) => m,
        }
    }
}

impl CausalLm for AnyModel {
    fn hidden_states_in(
        &self,
        ids: &Tensor,
        ctx: AttentionContext,
        cache: Option<&mut KvCache>,
    ) -> candle_core::Result<Tensor> {
        self.inner().hidden_states_in(ids, ctx, cache)
    }
    fn lm_head(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        self.inner().lm_head(hidden)
    }
    fn num_layers(&self) -> usize {
        self.inner().num_layers()
    }
    fn vocab_size(&self) -> usize {
        self.inner().vocab_size()
    }
    fn device(&self) -> &Device {
        self.inner().device()
    }
    fn dtype(&self) -> DType {
        self.inner().dtype()
    }
    fn linears(&self) -> Vec<&Linear> {
        self.inner().linears()
    }
    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        match self {
            AnyModel::Falcon(m) => m.linears_mut(),
            AnyModel::Llama(m) => m.linears_mut(),
        }
    }
}

/// Special tokens and template generation needs, merged from `config.json`,
/// `generation_config.json` and `tokenizer_config.json` the way transformers does (the
/// generation config wins).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationDefaults {
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    pub chat_template: Option<ChatTemplate>,
}

impl GenerationDefaults {
    /// The id rows are padded with: `pad_token_id`, else the first end-of-sequence id (what
    /// transformers' `generate` falls back to, and what SFT recipes set), else 0.
    pub fn pad_id(&self) -> u32 {
        self.pad_token_id
            .or(self.eos_token_ids.first().copied())
            .unwrap_or(0)
    }
}

/// A loaded model with what is needed to talk to it.
#[derive(Debug, Clone)]
pub struct LoadedModel {
    pub model: AnyModel,
    pub config: ModelConfig,
    pub tokenizer: Option<Tokenizer>,
    pub defaults: GenerationDefaults,
    /// Where the files came from (a folder, or the hub cache's snapshot folder).
    pub source: PathBuf,
}

/// How to load.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// The compute dtype; checkpoints in bf16/f16/f32 are converted to it.
    pub dtype: DType,
    pub device: Device,
    /// Decides the format of each linear layer (dense, NF4) and its adapter.
    pub builder: LinearBuilder,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            dtype: DType::F32,
            device: Device::Cpu,
            builder: LinearBuilder::dense(),
        }
    }
}

/// Loads from a local folder when `model` is one, else from the hub.
pub fn load(model: &str, opts: &LoadOptions) -> Result<LoadedModel> {
    let path = Path::new(model);
    let files = if path.is_dir() {
        local_files(path)?
    } else if looks_like_hub_id(model) {
        hub_files(model, &Hub::from_env())?
    } else {
        bail!("model `{model}` is neither a folder nor a hub id (owner/name)");
    };
    load_files(&files, opts)
}

/// Reads the config and builds the model from the safetensors files.
pub fn load_files(files: &CheckpointFiles, opts: &LoadOptions) -> Result<LoadedModel> {
    let text = std::fs::read_to_string(&files.config)
        .with_context(|| format!("failed to read {}", files.config.display()))?;
    let config =
        ModelConfig::from_json(&text).with_context(|| format!("in {}", files.config.display()))?;
    for w in &files.weights {
        check_safetensors_header(w)?;
    }
    prefetch_weights(&files.weights);
    // SAFETY: the files are memory-mapped read-only; they must not change while loaded, as
    // for any mmap-based loader (transformers' safetensors included).
    let vb =
        unsafe { VarBuilder::from_mmaped_safetensors(&files.weights, opts.dtype, &opts.device) }
            .with_context(|| {
                format!(
                    "failed to open the safetensors files in {}",
                    files.dir.display()
                )
            })?;
    let model = AnyModel::load(vb, &config, &opts.builder)
        .with_context(|| format!("failed to build the model from {}", files.dir.display()))?;
    let tokenizer = match &files.tokenizer {
        Some(p) => Some(
            Tokenizer::from_file(p)
                .map_err(|e| anyhow::anyhow!("failed to read {}: {e}", p.display()))?,
        ),
        None => None,
    };
    let defaults = generation_defaults(&config, files)?;
    Ok(LoadedModel {
        model,
        config,
        tokenizer,
        defaults,
        source: files.dir.clone(),
    })
}

fn token_ids(v: Option<&Value>) -> Option<Vec<u32>> {
    let v = v?;
    serde_json::from_value::<TokenIds>(v.clone())
        .ok()
        .map(|t| t.to_vec())
}

/// A special token in `tokenizer_config.json`: a string or `{"content": ...}`.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

fn generation_defaults(
    config: &ModelConfig,
    files: &CheckpointFiles,
) -> Result<GenerationDefaults> {
    let mut d = GenerationDefaults {
        eos_token_ids: config.eos_token_ids(),
        bos_token_id: config.bos_token_id(),
        pad_token_id: config.pad_token_id(),
        chat_template: None,
    };
    if let Some(p) = &files.generation_config {
        let g = read_json(p)?;
        if let Some(eos) = token_ids(g.get("eos_token_id")) {
            d.eos_token_ids = eos;
        }
        if let Some(bos) = g.get("bos_token_id").and_then(Value::as_u64) {
            d.bos_token_id = Some(bos as u32);
        }
        if let Some(pad) = g.get("pad_token_id").and_then(Value::as_u64) {
            d.pad_token_id = Some(pad as u32);
        }
    }
    if let Some(p) = &files.tokenizer_config {
        let t = read_json(p)?;
        let template = match t.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: transformers uses the one named "default".
            Some(Value::Array(list)) => list
                .iter()
                .find(|e| e.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|e| e.get("template").and_then(Value::as_str))
                .map(str::to_string),
            _ => None,
        };
        d.chat_template = template.map(|template| ChatTemplate {
            template,
            bos_token: token_text(t.get("bos_token")),
            eos_token: token_text(t.get("eos_token")),
        });
    }
    if d.chat_template.is_none() {
        // transformers 4.4x+ may save the template beside the tokenizer instead.
        let jinja = files.dir.join("chat_template.jinja");
        if jinja.is_file() {
            let template = std::fs::read_to_string(&jinja)
                .with_context(|| format!("failed to read {}", jinja.display()))?;
            d.chat_template = Some(ChatTemplate {
                template,
                bos_token: None,
                eos_token: None,
            });
        }
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_checkpoint(dir: &Path, sharded: bool) -> Result<()> {
        let cfg = crate::models::llama::tests::tiny();
        let weights = crate::models::llama::tests::random_weights(&cfg, 5)?;
        let mut config = serde_json::to_value(&cfg)?;
        config["rope_scaling"] = Value::Null;
        std::fs::write(dir.join("config.json"), config.to_string())?;
        if sharded {
            let (a, b): (Vec<_>, Vec<_>) = weights
                .into_iter()
                .partition(|(k, _)| k.contains("layers.0"));
            let mut map = serde_json::Map::new();
            for (name, part) in [
                ("model-00001-of-00002.safetensors", &a),
                ("model-00002-of-00002.safetensors", &b),
            ] {
                let part: std::collections::HashMap<String, Tensor> =
                    part.iter().cloned().collect();
                candle_core::safetensors::save(&part, dir.join(name))?;
                for k in part.keys() {
                    map.insert(k.clone(), Value::String(name.into()));
                }
            }
            std::fs::write(
                dir.join("model.safetensors.index.json"),
                serde_json::json!({"weight_map": map}).to_string(),
            )?;
        } else {
            // bf16 on disk, f32 in memory.
            let w: std::collections::HashMap<String, Tensor> = weights
                .into_iter()
                .map(|(k, t)| (k, t.to_dtype(DType::BF16).unwrap()))
                .collect();
            candle_core::safetensors::save(&w, dir.join("model.safetensors"))?;
        }
        Ok(())
    }

    #[test]
    fn loads_single_bf16_and_sharded() -> Result<()> {
        for sharded in [false, true] {
            let dir = tempfile::tempdir()?;
            write_checkpoint(dir.path(), sharded)?;
            let m = load(dir.path().to_str().unwrap(), &LoadOptions::default())?;
            assert_eq!(m.model.dtype(), DType::F32);
            let ids = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu)?;
            assert_eq!(m.model.forward(&ids, None, None)?.dims(), &[1, 3, 64]);
            assert_eq!(m.defaults.eos_token_ids, vec![2]);
        }
        Ok(())
    }

    #[test]
    fn errors_name_file_and_tensor() -> Result<()> {
        let dir = tempfile::tempdir()?;
        write_checkpoint(dir.path(), true)?;
        std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors"))?;
        let err = format!(
            "{:#}",
            load(dir.path().to_str().unwrap(), &LoadOptions::default()).unwrap_err()
        );
        assert!(
            err.contains("model-00002-of-00002.safetensors") && err.contains("model."),
            "{err}"
        );

        let dir = tempfile::tempdir()?;
        write_checkpoint(dir.path(), false)?;
        let mut w =
            candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu)?;
        w.remove("model.layers.1.mlp.up_proj.weight");
        candle_core::safetensors::save(&w, dir.path().join("model.safetensors"))?;
        let err = format!(
            "{:#}",
            load(dir.path().to_str().unwrap(), &LoadOptions::default()).unwrap_err()
        );
        assert!(err.contains("model.layers.1.mlp.up_proj.weight"), "{err}");

        std::fs::write(
            dir.path().join("model.safetensors"),
            b"not a checkpoint at all",
        )?;
        let err = format!(
            "{:#}",
            load(dir.path().to_str().unwrap(), &LoadOptions::default()).unwrap_err()
        );
        assert!(err.contains("model.safetensors"), "{err}");

        let err = format!(
            "{:#}",
            load("/nonexistent/dir/x", &LoadOptions::default()).unwrap_err()
        );
        assert!(err.contains("neither a folder nor a hub id"), "{err}");
        Ok(())
    }

    #[test]
    fn offline_hub_miss_is_a_clear_error() {
        let home = tempfile::tempdir().unwrap();
        let hub = Hub {
            home: home.path().to_path_buf(),
            endpoint: None,
            offline: true,
        };
        let err = format!("{:#}", hub_files("someone/absent-model", &hub).unwrap_err());
        assert!(
            err.contains("someone/absent-model/config.json") && err.contains("HF_HUB_OFFLINE"),
            "{err}"
        );
    }
}
