//! Predictions for rows: each row's prompt from the formatter plugin (or the row's own
//! `prompt`), the model's completion, and the row's reference and source kept beside it, ready
//! for the metric plugins. The one place rows become predictions: generate runs,
//! `eval_after_train` and `adapterlab generate --data` all come here.

use std::path::PathBuf;
use std::sync::Mutex;

use adapterlab_model::commands::{GenerateOptions, Quantize, Runtime, generate_with};
use adapterlab_model::generate::Decoding;
use adapterlab_model::loader::LoadedModel;
use adapterlab_model::loss::Row;
use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::eval::input::PredictionRow;
use crate::plugin::Registry;
use crate::train::data::{self, Split};

/// A row ready to generate for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptRow {
    pub id: String,
    pub prompt: String,
    /// The target (the formatter's completion, e.g. the `summary`); empty when the row has none.
    pub reference: String,
    /// What the prompt was made from (the `dialogue`), shown beside the prediction.
    pub source: Option<String>,
}

/// Renders the rows of `split` (problems reported together, with row numbers). A row's id is
/// its `id` field, else its 1-based row number.
pub fn prompt_rows(
    split: &Split,
    formatter: &str,
    registry: Option<&Registry>,
) -> Result<Vec<PromptRow>> {
    let rendered = data::render_prompts(split, formatter, registry)?;
    let text = |row: &Row, key: &str| row.get(key).and_then(Value::as_str).map(str::to_string);
    Ok(split
        .rows
        .iter()
        .zip(rendered)
        .enumerate()
        .map(|(i, (row, (prompt, completion)))| PromptRow {
            id: match row.get("id") {
                Some(Value::String(s)) => s.clone(),
                Some(v) if !v.is_null() => v.to_string(),
                _ => (i + 1).to_string(),
            },
            prompt,
            reference: completion
                .or_else(|| text(row, "reference"))
                .unwrap_or_default()
                .trim()
                .to_string(),
            source: text(row, "dialogue")
                .or_else(|| text(row, "source"))
                .or_else(|| text(row, "prompt")),
        })
        .collect())
}

/// How to generate. The defaults are the reference notebook's: greedy, repetition penalty 30,
/// 50 new tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Sampling {
    pub max_new_tokens: usize,
    /// 0 is greedy decoding; above it, sampling with `top_k`/`top_p`.
    pub temperature: f32,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    /// 1.0 is off.
    pub repetition_penalty: f32,
    pub seed: u64,
    /// Prompts generated together (left-padded into one batch).
    pub batch_size: usize,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            max_new_tokens: 50,
            temperature: 0.0,
            top_p: None,
            top_k: None,
            repetition_penalty: 30.0,
            seed: 0,
            batch_size: 8,
        }
    }
}

/// The most new tokens a request may ask for.
pub const MAX_NEW_TOKENS: usize = 4096;

impl Sampling {
    /// Checks every field, naming the one at fault.
    pub fn validate(&self) -> Result<()> {
        if self.max_new_tokens == 0 || self.max_new_tokens > MAX_NEW_TOKENS {
            bail!("`max_new_tokens` must be between 1 and {MAX_NEW_TOKENS}");
        }
        if !(self.temperature >= 0.0 && self.temperature <= 2.0) {
            bail!("`temperature` must be between 0 and 2 (0 is greedy)");
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            bail!("`top_p` must be in (0, 1]");
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            bail!("`repetition_penalty` must be positive (1 is off)");
        }
        if let Some(k) = self.top_k
            && k > 1_000_000
        {
            bail!("`top_k` must be at most 1000000");
        }
        if self.batch_size == 0 || self.batch_size > 256 {
            bail!("`batch_size` must be between 1 and 256");
        }
        Ok(())
    }

    pub fn decoding(&self, batch: u64) -> Decoding {
        if self.temperature == 0.0 {
            return Decoding::Greedy;
        }
        Decoding::Sample {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            // Each batch draws its own stream; the run as a whole is reproducible.
            seed: self.seed.wrapping_add(batch),
        }
    }
}

/// Generates a prediction for each row, a batch at a time. `device`, when given, is held for
/// each batch (one model computation at a time on a shared device); `each_batch` sees the new
/// predictions and may stop the work by returning an error (e.g. a cancelled run).
pub fn predict(
    loaded: &LoadedModel,
    rows: &[PromptRow],
    sampling: &Sampling,
    device: Option<&Mutex<()>>,
    mut each_batch: impl FnMut(&[PredictionRow]) -> Result<()>,
) -> Result<Vec<PredictionRow>> {
    sampling.validate()?;
    let mut out = Vec::with_capacity(rows.len());
    for (b, chunk) in rows.chunks(sampling.batch_size.max(1)).enumerate() {
        let opts = GenerateOptions {
            model: loaded.source.display().to_string(),
            adapter: None,
            prompts: chunk.iter().map(|r| r.prompt.clone()).collect(),
            chat: false,
            max_new_tokens: sampling.max_new_tokens,
            decoding: sampling.decoding(b as u64),
            repetition_penalty: sampling.repetition_penalty,
            quantize: Quantize::None,
            batch_size: chunk.len(),
            runtime: Runtime::cpu(PathBuf::new()),
        };
        let generations = {
            let _device = device.map(|d| d.lock().unwrap_or_else(|e| e.into_inner()));
            generate_with(loaded, &opts)?
        };
        let batch: Vec<PredictionRow> = chunk
            .iter()
            .zip(generations)
            .map(|(row, g)| PredictionRow {
                id: row.id.clone(),
                prediction: g.text.trim().to_string(),
                reference: row.reference.clone(),
                source: row.source.clone(),
            })
            .collect();
        each_batch(&batch)?;
        out.extend(batch);
    }
    Ok(out)
}
