//! Predictions for rows: each row's prompt from the formatter plugin (or the row's own
//! `prompt`), the model's completion, and the row's reference and source kept beside it, ready
//! for the metric plugins. The one place rows become predictions: generate runs,
//! `eval_after_train` and `adapterlab generate --data` all come here.

use std::path::PathBuf;
use std::sync::Mutex;

use adapterlab_model::engine::LoadedModel;
use adapterlab_model::engine::generate::Decoding;
use adapterlab_model::engine::loss::Row;
use adapterlab_model::engine::{Engine, GenerateOptions, Quantize, generate_with};
use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::data::{self, Split};
use crate::eval::input::PredictionRow;
use crate::plugin::Registry;
use crate::settings::Range;

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

/// The ranges of the decoding settings: the one table validation, the published schema and the
/// dashboard's generate form read (unset `top_k`/`top_p` are not checked: off).
pub const SAMPLING_RANGES: &[Range] = &[
    Range::int("max_new_tokens", 1, MAX_NEW_TOKENS as u64),
    Range::real("temperature", 0.0, false, 2.0),
    Range::real("top_p", 0.0, true, 1.0),
    Range::int("top_k", 0, 1_000_000),
    Range::real("repetition_penalty", 0.0, true, 100.0),
    Range::int("seed", 0, u32::MAX as u64),
    Range::int("batch_size", 1, 256),
];

/// The decoding settings as JSON Schema, from [`Sampling`]'s defaults and [`SAMPLING_RANGES`].
pub fn sampling_schema() -> Value {
    let defaults = serde_json::to_value(Sampling::default()).unwrap_or_default();
    let props: serde_json::Map<String, Value> = defaults
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| {
            let range = SAMPLING_RANGES.iter().find(|r| r.key == k);
            let mut node = serde_json::json!({"default": v});
            if let Some(r) = range {
                r.describe(&mut node);
            }
            (k.clone(), node)
        })
        .collect();
    serde_json::json!({"type": "object", "properties": props})
}

impl Sampling {
    /// Checks every field, naming the one at fault.
    pub fn validate(&self) -> Result<()> {
        let values = serde_json::to_value(self).unwrap_or_default();
        for range in SAMPLING_RANGES {
            // JSON has no NaN or infinity: a non-finite value serialises as null, like an
            // unset option; only top_k and top_p may be unset.
            let v = match values.get(range.key) {
                Some(Value::Null) | None if matches!(range.key, "top_k" | "top_p") => continue,
                Some(v) => v.as_f64(),
                None => None,
            };
            let Some(v) = v else {
                bail!("`{}` must be a finite number", range.key);
            };
            if let Err(why) = range.check(v) {
                bail!("`{}` {why}", range.key);
            }
        }
        Ok(())
    }

    pub fn decoding(&self, batch: u64) -> Decoding {
        // Each batch draws its own stream; the run as a whole is reproducible.
        let seed = self.seed.wrapping_add(batch);
        Decoding::from_settings(self.temperature, self.top_k, self.top_p, seed)
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
            runtime: Engine::cpu(PathBuf::new()),
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
                references: Vec::new(),
                source: row.source.clone(),
            })
            .collect();
        each_batch(&batch)?;
        out.extend(batch);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoding_settings_are_checked_and_published_from_one_table() {
        assert!(Sampling::default().validate().is_ok());
        let bad = |f: fn(&mut Sampling)| {
            let mut s = Sampling::default();
            f(&mut s);
            s.validate().unwrap_err().to_string()
        };
        assert!(bad(|s| s.max_new_tokens = 0).contains("`max_new_tokens`"));
        assert!(bad(|s| s.temperature = 3.0).contains("`temperature`"));
        assert!(bad(|s| s.top_p = Some(0.0)).contains("`top_p`"));
        assert!(bad(|s| s.repetition_penalty = f32::INFINITY).contains("`repetition_penalty`"));
        let schema = sampling_schema();
        for range in SAMPLING_RANGES {
            assert_eq!(
                schema["properties"][range.key]["maximum"], range.max,
                "{}",
                range.key
            );
        }
        assert_eq!(schema["properties"]["max_new_tokens"]["default"], 50);
    }
}
