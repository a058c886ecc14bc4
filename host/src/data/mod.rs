//! Datasets, for training and for generation alike: the splits (bundled, or local
//! JSON/JSONL/CSV files), rows rendered by a formatter plugin, tokenized as TRL does
//! (`adapterlab_model::engine::loss`), truncated with a count, packed with TRL's `packing`
//! ([`pack`]), and batched with HF's length grouping and right padding. `train` and `infer`
//! both use it; it uses neither.
//!
//! **Architecture Invariant:** every dataset problem (unreadable file, missing column, empty
//! text) is found here, with its row number, before a model is loaded.

pub mod pack;

use std::path::{Path, PathBuf};

pub use adapterlab_model::engine::loss::{Batch, Packed, collate, collate_packed, n_targets};
use adapterlab_model::engine::loss::{
    Example, Row, TokenizeOptions, tokenize_chat_text, tokenize_row,
};
use adapterlab_model::engine::{ChatTemplate, Message};
use anyhow::{Context as _, Result, bail};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde_json::Value;
use tokenizers::Tokenizer;

use crate::plugin::{CallContext, PluginKind, Registry};
use crate::train::config::Sampling;

/// The bundled dialogue-summarization set (`data/dialogsum-mini`, made by
/// `scripts/make_dialogsum_mini.py`), embedded so training works from any directory.
pub const BUNDLED: [(&str, &str); 3] = [
    (
        "train",
        include_str!("../../../data/dialogsum-mini/train.jsonl"),
    ),
    (
        "validation",
        include_str!("../../../data/dialogsum-mini/validation.jsonl"),
    ),
    (
        "test",
        include_str!("../../../data/dialogsum-mini/test.jsonl"),
    ),
];

/// One split: its rows and where they came from (for error messages).
#[derive(Debug, Clone, Default)]
pub struct Split {
    pub origin: String,
    pub rows: Vec<Row>,
}

#[derive(Debug, Clone, Default)]
pub struct Splits {
    pub train: Split,
    pub validation: Option<Split>,
    pub test: Option<Split>,
}

/// Reads `dataset`: `bundled`, a JSON/JSONL/CSV file (the train split), or a folder holding
/// `train`, `validation` and `test` files in one of those formats.
pub fn load_splits(dataset: &str) -> Result<Splits> {
    if dataset == "bundled" {
        let parse = |(name, text): (&str, &str)| -> Result<Split> {
            let origin = format!("bundled/{name}.jsonl");
            Ok(Split {
                rows: parse_jsonl(text, &origin)?,
                origin,
            })
        };
        return Ok(Splits {
            train: parse(BUNDLED[0])?,
            validation: Some(parse(BUNDLED[1])?),
            test: Some(parse(BUNDLED[2])?),
        });
    }
    let path = Path::new(dataset);
    if path.is_file() {
        return Ok(Splits {
            train: read_split(path)?,
            validation: None,
            test: None,
        });
    }
    if path.is_dir() {
        let find = |name: &str| -> Option<PathBuf> {
            ["jsonl", "json", "csv"]
                .iter()
                .map(|ext| path.join(format!("{name}.{ext}")))
                .find(|p| p.is_file())
        };
        let train = find("train").with_context(|| {
            format!(
                "{} has no train.jsonl, train.json or train.csv",
                path.display()
            )
        })?;
        let opt = |name: &str| find(name).map(|p| read_split(&p)).transpose();
        return Ok(Splits {
            train: read_split(&train)?,
            validation: opt("validation")?,
            test: opt("test")?,
        });
    }
    if dataset.contains('/') || !dataset.contains('.') {
        bail!(
            "dataset `{dataset}` is not a local file or folder; hub datasets are not supported yet (use `bundled` or a local JSON/JSONL/CSV file)"
        );
    }
    bail!("dataset file {dataset} does not exist")
}

fn read_split(path: &Path) -> Result<Split> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).with_context(|| format!("failed to read {origin}"))?;
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let rows = match ext.as_str() {
        "jsonl" => parse_jsonl(&text, &origin)?,
        "json" => match serde_json::from_str::<Value>(&text) {
            Ok(Value::Array(items)) => items
                .into_iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::Object(m) => Ok(m),
                    _ => bail!("{origin}: row {}: not a JSON object", i + 1),
                })
                .collect::<Result<_>>()?,
            // A JSON file may also hold one object per line.
            _ => parse_jsonl(&text, &origin)?,
        },
        "csv" => parse_csv(&text, &origin)?,
        "parquet" => bail!("{origin}: Parquet is not supported yet; convert it to JSONL or CSV"),
        _ => bail!("{origin}: unknown format (expected .jsonl, .json or .csv)"),
    };
    Ok(Split { origin, rows })
}

fn parse_jsonl(text: &str, origin: &str) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(m)) => rows.push(m),
            Ok(_) => bail!("{origin}: line {}: not a JSON object", i + 1),
            Err(e) => bail!("{origin}: line {}: {e}", i + 1),
        }
    }
    Ok(rows)
}

fn parse_csv(text: &str, origin: &str) -> Result<Vec<Row>> {
    let mut reader = csv::ReaderBuilder::new()
        .flexible(false)
        .from_reader(text.as_bytes());
    let headers = reader
        .headers()
        .with_context(|| format!("{origin}: no header row"))?
        .clone();
    let mut rows = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let record = record.with_context(|| format!("{origin}: row {}", i + 1))?;
        rows.push(
            headers
                .iter()
                .zip(record.iter())
                .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
                .collect(),
        );
    }
    Ok(rows)
}

/// A row rendered for training.
#[derive(Debug, Clone, PartialEq)]
pub enum Rendered {
    /// A prompt and its completion. A text row (TRL's language modeling rows,
    /// `dataset_text_field`) is an empty prompt and the text as its completion, so every token
    /// of it is trained on, as TRL trains a text row whatever `completion_only_loss` says.
    Pair { prompt: String, completion: String },
    /// TRL's conversational row (`messages`): the model's chat template writes it at
    /// [`encode`], and all of it is trained on.
    Conversation(Vec<Message>),
}

impl Rendered {
    pub fn pair(prompt: impl Into<String>, completion: impl Into<String>) -> Self {
        Rendered::Pair {
            prompt: prompt.into(),
            completion: completion.into(),
        }
    }
}

/// What [`format_rows`] makes of a row.
enum Formatted {
    Pair(String, Option<String>),
    Conversation(Vec<Message>),
}

/// A row in [`format_rows`]: read as it will be used (a conversation, a text row), or a prompt
/// and completion still to be checked for emptiness (the row's own, or the formatter's).
enum Slot {
    Ready(Formatted),
    Unchecked(String, Option<String>),
}

/// Renders every row for training: rows with `prompt`/`completion` strings as they are, rows
/// with a `messages` list of `{role, content}` as conversations (TRL's conversational rows),
/// with `text_field` (TRL's `dataset_text_field`, when set) rows holding that string as text
/// rows, others through the formatter plugin. All problems are collected and reported together
/// with row numbers.
pub fn render(
    split: &Split,
    formatter: &str,
    text_field: Option<&str>,
    registry: Option<&Registry>,
) -> Result<Vec<Rendered>> {
    let rendered = format_rows(split, formatter, text_field, registry, true)?;
    Ok(rendered
        .into_iter()
        .map(|f| match f {
            Formatted::Pair(prompt, completion) => Rendered::Pair {
                prompt,
                completion: completion.unwrap_or_default(),
            },
            Formatted::Conversation(messages) => Rendered::Conversation(messages),
        })
        .collect())
}

/// A row's `messages`, if it has that field: a non-empty list of `{role, content}` strings.
fn messages_of(row: &Row) -> Option<Result<Vec<Message>, String>> {
    let value = row.get("messages")?;
    let parse = || -> Result<Vec<Message>, String> {
        let Value::Array(items) = value else {
            return Err("`messages` must be a list of {role, content}".into());
        };
        if items.is_empty() {
            return Err("`messages` is empty".into());
        }
        items
            .iter()
            .enumerate()
            .map(|(j, m)| match (m.get("role"), m.get("content")) {
                (Some(Value::String(role)), Some(Value::String(content))) => {
                    Ok(Message::new(role, content))
                }
                _ => Err(format!(
                    "`messages` item {} must have `role` and `content` strings",
                    j + 1
                )),
            })
            .collect()
    };
    Some(parse())
}

/// Renders every row for generation: the prompt, and the completion (the reference) when the
/// row has one. Rows with a `prompt` string are used as they are.
pub fn render_prompts(
    split: &Split,
    formatter: &str,
    registry: Option<&Registry>,
) -> Result<Vec<(String, Option<String>)>> {
    Ok(format_rows(split, formatter, None, registry, false)?
        .into_iter()
        .filter_map(|f| match f {
            Formatted::Pair(prompt, completion) => Some((prompt, completion)),
            // Conversations are read for training only.
            Formatted::Conversation(_) => None,
        })
        .collect())
}

fn format_rows(
    split: &Split,
    formatter: &str,
    text_field: Option<&str>,
    registry: Option<&Registry>,
    need_completion: bool,
) -> Result<Vec<Formatted>> {
    let mut out: Vec<Option<Slot>> = (0..split.rows.len()).map(|_| None).collect();
    let mut problems = Vec::new();
    let mut pending = Vec::new();
    for (i, row) in split.rows.iter().enumerate() {
        // Conversations are read for training only.
        let messages = if need_completion {
            messages_of(row)
        } else {
            None
        };
        let text = text_field.and_then(|f| row.get(f));
        out[i] = match (row.get("prompt"), row.get("completion"), messages, text) {
            (Some(Value::String(p)), Some(Value::String(c)), _, _) => {
                Some(Slot::Unchecked(p.clone(), Some(c.clone())))
            }
            (Some(Value::String(p)), None, _, _) if !need_completion => {
                Some(Slot::Unchecked(p.clone(), None))
            }
            (_, _, Some(Ok(m)), _) => Some(Slot::Ready(Formatted::Conversation(m))),
            (_, _, Some(Err(e)), _) => {
                problems.push(format!("row {}: {e}", i + 1));
                None
            }
            (_, _, None, Some(Value::String(t))) if t.trim().is_empty() => {
                problems.push(format!(
                    "row {}: empty `{}` (dataset_text_field)",
                    i + 1,
                    text_field.unwrap_or_default()
                ));
                None
            }
            // A text row: no prompt, the whole text trained on (see `Rendered`).
            (_, _, None, Some(Value::String(t))) => {
                Some(Slot::Ready(Formatted::Pair(String::new(), Some(t.clone()))))
            }
            _ => {
                pending.push(i);
                None
            }
        };
    }
    if !pending.is_empty() {
        let registry = registry
            .context("rows need a formatter plugin, but no plugin registry is available")?;
        let plugin = registry.get(formatter, PluginKind::Formatter)?;
        let mut session = plugin.session(CallContext::default())?;
        for chunk in pending.chunks(64) {
            let rows: Vec<Vec<(String, String)>> =
                chunk.iter().map(|&i| plugin_row(&split.rows[i])).collect();
            for (&i, result) in chunk.iter().zip(session.format(&rows)?) {
                match result {
                    Ok(f) => out[i] = Some(Slot::Unchecked(f.prompt, f.completion)),
                    Err(e) => problems.push(format!("row {}: {e}", i + 1)),
                }
            }
        }
    }
    let mut rendered = Vec::with_capacity(out.len());
    for (i, slot) in out.into_iter().enumerate() {
        match slot {
            Some(Slot::Ready(f)) => rendered.push(f),
            Some(Slot::Unchecked(prompt, _)) if prompt.trim().is_empty() => {
                problems.push(format!("row {}: empty prompt", i + 1))
            }
            Some(Slot::Unchecked(prompt, Some(completion))) if !completion.trim().is_empty() => {
                rendered.push(Formatted::Pair(prompt, Some(completion)))
            }
            Some(Slot::Unchecked(prompt, _)) if !need_completion => {
                rendered.push(Formatted::Pair(prompt, None))
            }
            Some(_) => problems.push(format!(
                "row {}: empty prompt or no completion (e.g. a missing or empty `summary`)",
                i + 1
            )),
            None => {}
        }
    }
    if !problems.is_empty() {
        problems.sort_by_key(|p| {
            p.split(':')
                .next()
                .and_then(|r| r.trim_start_matches("row ").parse::<usize>().ok())
        });
        let n = problems.len();
        let shown: Vec<String> = problems.into_iter().take(20).collect();
        let purpose = if need_completion {
            "training"
        } else {
            "generation"
        };
        // TRL's text rows, given to the formatter because dataset_text_field is unset.
        let hint = if need_completion
            && text_field.is_none()
            && split
                .rows
                .iter()
                .any(|r| matches!(r.get("text"), Some(Value::String(_))))
        {
            "\n  (rows with a `text` field are trained on whole with dataset_text_field = \"text\")"
        } else {
            ""
        };
        bail!(
            "{}: {n} row(s) cannot be used for {purpose}:\n  {}{}{hint}",
            split.origin,
            shown.join("\n  "),
            if n > 20 { "\n  …" } else { "" }
        );
    }
    if rendered.is_empty() {
        bail!("{}: no rows", split.origin);
    }
    Ok(rendered)
}

/// A row's string fields (numbers as text) for a formatter plugin.
fn plugin_row(row: &Row) -> Vec<(String, String)> {
    row.iter()
        .filter_map(|(k, v)| match v {
            Value::String(s) => Some((k.clone(), s.clone())),
            Value::Number(n) => Some((k.clone(), n.to_string())),
            Value::Bool(b) => Some((k.clone(), b.to_string())),
            _ => None,
        })
        .collect()
}

/// Tokenized examples and how many of them were longer than `max_seq_length`.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub examples: Vec<Example>,
    /// Examples longer than `max_seq_length`, whether cut to it or kept whole.
    pub longer: usize,
    /// Examples cut to `max_seq_length` (with [`Lengths::Truncate`]).
    pub truncated: usize,
    /// Rows left out because they kept no completion token after truncation: TRL's SFTTrainer
    /// drops such fully masked examples, and so does this, or every later batch would hold
    /// different rows than TRL's (and a row that teaches nothing would take a batch slot).
    /// Packing keeps them (TRL drops them only when not packing), so 0 then.
    pub no_targets: usize,
}

/// What [`encode`] does with examples longer than `max_seq_length`, as TRL prepares a split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lengths {
    /// Cut to `max_seq_length`, and rows left without a completion token left out (TRL's
    /// `truncate_dataset` and its filter of fully masked rows, when not packing).
    Truncate,
    /// Cut to `max_seq_length`, every row kept (packing with `bfd`: TRL's packer cuts them and
    /// skips that filter).
    TruncateKeepAll,
    /// Kept whole for the packer to split (`bfd_split`, `wrapped`).
    KeepWhole,
}

/// Tokenizes as TRL does (EOS appended to the completion; a conversation written by
/// `chat_template`, the model's), then cuts to `max_seq_length` and filters as `lengths` says.
pub fn encode(
    tokenizer: &Tokenizer,
    rows: &[Rendered],
    eos: Option<&str>,
    chat_template: Option<&ChatTemplate>,
    completion_only: bool,
    max_seq_length: usize,
    lengths: Lengths,
) -> Result<Encoded> {
    let opts = TokenizeOptions {
        completion_only,
        eos_token: eos.map(str::to_string),
        max_length: None,
    };
    let mut examples = Vec::with_capacity(rows.len());
    let (mut longer, mut truncated, mut no_targets) = (0, 0, 0);
    for (i, r) in rows.iter().enumerate() {
        let mut ex = match r {
            Rendered::Pair { prompt, completion } => {
                let row: Row = [
                    ("prompt".to_string(), Value::String(prompt.clone())),
                    ("completion".to_string(), Value::String(completion.clone())),
                ]
                .into_iter()
                .collect();
                tokenize_row(tokenizer, &row, None, &opts)
            }
            Rendered::Conversation(messages) => chat_template
                .context(
                    "`messages` rows need the model's chat template (tokenizer_config.json's \
                     chat_template), and this model has none",
                )
                .and_then(|t| t.render(messages, false))
                .and_then(|text| tokenize_chat_text(tokenizer, &text)),
        }
        .with_context(|| format!("row {}", i + 1))?;
        if ex.input_ids.len() > max_seq_length {
            longer += 1;
            if lengths != Lengths::KeepWhole {
                truncated += 1;
                ex.input_ids.truncate(max_seq_length);
                ex.targets.truncate(max_seq_length);
            }
        }
        if lengths == Lengths::Truncate && !ex.targets.iter().any(|t| *t) {
            no_targets += 1;
            continue;
        }
        examples.push(ex);
    }
    Ok(Encoded {
        examples,
        longer,
        truncated,
        no_targets,
    })
}

/// The order of micro-batches for one epoch: `sequential` is file order; otherwise a permutation
/// seeded by `seed + epoch` (as HF's sampler reseeds per epoch), and with `group_by_length`
/// HF's `LengthGroupedSampler`: mega-batches of 50 batches sorted by length, longest first, and
/// the longest batch of all moved first.
pub fn epoch_batches(
    lengths: &[usize],
    batch_size: usize,
    sampling: Sampling,
    seed: u64,
    epoch: u64,
) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    let bs = batch_size.max(1);
    if sampling == Sampling::Sequential {
        return order.chunks(bs).map(<[usize]>::to_vec).collect();
    }
    let mut rng =
        rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(epoch.wrapping_mul(0x9e37_79b9)));
    order.shuffle(&mut rng);
    if sampling == Sampling::Random {
        return order.chunks(bs).map(<[usize]>::to_vec).collect();
    }
    let mut flat = Vec::with_capacity(order.len());
    for mega in order.chunks(bs * 50) {
        let mut mega = mega.to_vec();
        // Stable sort: equal lengths keep the shuffled order.
        mega.sort_by(|a, b| lengths[*b].cmp(&lengths[*a]));
        flat.extend(mega);
    }
    let mut batches: Vec<Vec<usize>> = flat.chunks(bs).map(<[usize]>::to_vec).collect();
    if let Some(longest) = (0..batches.len()).max_by_key(|&i| {
        (
            batches[i].iter().map(|&j| lengths[j]).max().unwrap_or(0),
            std::cmp::Reverse(i),
        )
    }) {
        batches.swap(0, longest);
    }
    batches
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn ex(ids: &[u32], first_target: usize) -> Example {
        Example {
            input_ids: ids.to_vec(),
            targets: (0..ids.len()).map(|t| t >= first_target && t > 0).collect(),
        }
    }

    #[test]
    fn bundled_dataset_parses_with_samsum_columns() {
        let s = load_splits("bundled").unwrap();
        assert!(s.train.rows.len() >= 200, "{}", s.train.rows.len());
        assert!(s.validation.as_ref().unwrap().rows.len() >= 20);
        for row in &s.train.rows {
            for k in ["id", "dialogue", "summary"] {
                assert!(
                    row.get(k)
                        .and_then(Value::as_str)
                        .is_some_and(|v| !v.is_empty()),
                    "{row:?}"
                );
            }
        }
    }

    #[test]
    fn local_files_and_bad_rows_are_reported_with_row_numbers() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("train.csv"),
            "prompt,completion\nhi,there\n\"a, b\",c\n",
        )
        .unwrap();
        let s = load_splits(dir.path().to_str().unwrap()).unwrap();
        assert_eq!(s.train.rows.len(), 2);
        assert_eq!(s.train.rows[1]["prompt"], "a, b");
        let r = render(&s.train, "summarize", None, None).unwrap();
        assert_eq!(r[0], Rendered::pair("hi", "there"));
        let bad = dir.path().join("bad.jsonl");
        std::fs::write(&bad, "{\"prompt\": \"x\", \"completion\": \"\"}\n{\"prompt\": \"y\", \"completion\": \"z\"}\n").unwrap();
        let e = render(
            &load_splits(bad.to_str().unwrap()).unwrap().train,
            "summarize",
            None,
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("row 1") && !e.contains("row 2"), "{e}");
        let missing = dir.path().join("m.jsonl");
        std::fs::write(&missing, "{\"dialogue\": \"x\"}\n").unwrap();
        let e = render(
            &load_splits(missing.to_str().unwrap()).unwrap().train,
            "summarize",
            None,
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("formatter"), "{e}");
        let e = load_splits("samsum").unwrap_err().to_string();
        assert!(e.contains("not a local file"), "{e}");
    }

    #[test]
    fn batches_cover_every_row_once_deterministically_and_group_by_length() {
        let lengths: Vec<usize> = (0..37).map(|i| (i * 7919) % 101).collect();
        let a = epoch_batches(&lengths, 4, Sampling::GroupByLength, 42, 0);
        assert_eq!(
            a,
            epoch_batches(&lengths, 4, Sampling::GroupByLength, 42, 0)
        );
        // Each epoch reshuffles (visible without grouping: one mega-batch here sorts them all).
        assert_ne!(
            epoch_batches(&lengths, 4, Sampling::Random, 42, 0),
            epoch_batches(&lengths, 4, Sampling::Random, 42, 1)
        );
        let mut all: Vec<usize> = a.iter().flatten().copied().collect();
        all.sort();
        assert_eq!(all, (0..37).collect::<Vec<_>>());
        assert_eq!(
            a[0].iter().map(|&i| lengths[i]).max(),
            lengths.iter().max().copied(),
            "longest batch first"
        );
        // Within the (single) mega-batch, batches after the first are in descending length.
        for b in &a[1..] {
            assert!(b.windows(2).all(|w| lengths[w[0]] >= lengths[w[1]]));
        }
        let plain = epoch_batches(&lengths, 4, Sampling::Random, 42, 0);
        assert_eq!(plain.len(), 10);
    }

    #[test]
    fn sequential_sampling_is_file_order_every_epoch() {
        let lengths = [3, 9, 1, 7, 5];
        let want = vec![vec![0, 1], vec![2, 3], vec![4]];
        for epoch in 0..3 {
            assert_eq!(
                epoch_batches(&lengths, 2, Sampling::Sequential, 42, epoch),
                want
            );
        }
    }

    #[test]
    fn collate_pads_right_and_masks_prompt_tokens() {
        let a = ex(&[5, 6, 7, 8], 2);
        let b = ex(&[9, 10], 1);
        let batch = collate(&[&a, &b], 0, &Device::Cpu).unwrap();
        assert_eq!(
            batch.input_ids.to_vec2::<u32>().unwrap(),
            vec![vec![5, 6, 7, 8], vec![9, 10, 0, 0]]
        );
        assert_eq!(
            batch.attention_mask.to_vec2::<u32>().unwrap(),
            vec![vec![1, 1, 1, 1], vec![1, 1, 0, 0]]
        );
        // Targets 7, 8 (predicted from positions 1, 2) and 10 (from row 1, position 0).
        assert_eq!(
            batch.positions.tensor().to_vec1::<u32>().unwrap(),
            vec![1, 2, 4]
        );
        assert_eq!(batch.labels.to_vec1::<u32>().unwrap(), vec![7, 8, 10]);
        assert_eq!((batch.n_targets, batch.n_tokens), (3, 6));
    }
}

#[cfg(test)]
mod encode_tests {
    use std::str::FromStr as _;

    use super::*;

    #[test]
    fn text_rows_are_trained_on_whole_when_dataset_text_field_names_them() {
        let row = |v: Value| v.as_object().unwrap().clone();
        let split = Split {
            origin: "t.jsonl".into(),
            rows: vec![
                row(serde_json::json!({"text": "abc def"})),
                row(serde_json::json!({"prompt": "p: ", "completion": "c", "text": "ignored"})),
            ],
        };
        let r = render(&split, "summarize", Some("text"), None).unwrap();
        assert_eq!(r[0], Rendered::pair("", "abc def"));
        // prompt/completion wins over the text field.
        assert_eq!(r[1], Rendered::pair("p: ", "c"));
        // Every token but the first is a target, even with completion_only_loss.
        let e = encode(
            &char_tokenizer(),
            &r[..1],
            Some("</s>"),
            None,
            true,
            64,
            Lengths::Truncate,
        )
        .unwrap();
        let ex = &e.examples[0];
        assert_eq!(ex.input_ids.len(), "abc def".len() + 1, "the text and EOS");
        assert!(!ex.targets[0] && ex.targets[1..].iter().all(|t| *t));

        let empty = Split {
            origin: "t.jsonl".into(),
            rows: vec![row(serde_json::json!({"text": "  "}))],
        };
        let e = render(&empty, "summarize", Some("text"), None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("row 1: empty `text` (dataset_text_field)"),
            "{e}"
        );
        // Without the setting a text row is the formatter's (here: no registry to find it).
        let e = render(&split, "summarize", None, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("formatter"), "{e}");
    }

    #[test]
    fn conversations_are_written_by_the_chat_template_and_trained_on_whole() {
        let row = |v: Value| v.as_object().unwrap().clone();
        let split = Split {
            origin: "c.jsonl".into(),
            rows: vec![row(serde_json::json!({"messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo"},
            ]}))],
        };
        let r = render(&split, "summarize", None, None).unwrap();
        assert_eq!(
            r[0],
            Rendered::Conversation(vec![
                Message::new("user", "hi"),
                Message::new("assistant", "yo")
            ])
        );
        let template = ChatTemplate {
            template: "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}".into(),
            bos_token: Some("<s>".into()),
            eos_token: Some("</s>".into()),
        };
        let encode_with = |t: Option<&ChatTemplate>| {
            encode(
                &char_tokenizer(),
                &r,
                Some("</s>"),
                t,
                true,
                64,
                Lengths::Truncate,
            )
        };
        let e = encode_with(Some(&template)).unwrap();
        let ex = &e.examples[0];
        // The template's text, each </s> it writes one token, and no EOS added after it.
        let text = "user: hiassistant: yo";
        assert_eq!(ex.input_ids.len(), text.len() + 2);
        assert_eq!(
            ex.input_ids[ex.input_ids.len() - 1],
            2,
            "the template's own </s>"
        );
        assert_ne!(
            ex.input_ids[ex.input_ids.len() - 2],
            2,
            "a second </s> was added"
        );
        assert!(!ex.targets[0] && ex.targets[1..].iter().all(|t| *t));
        let err = format!("{:#}", encode_with(None).unwrap_err());
        assert!(
            err.contains("row 1") && err.contains("chat template"),
            "{err}"
        );

        let bad = Split {
            origin: "c.jsonl".into(),
            rows: vec![
                row(serde_json::json!({"messages": []})),
                row(serde_json::json!({"messages": [{"role": "user"}]})),
            ],
        };
        let e = render(&bad, "summarize", None, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("row 1: `messages` is empty") && e.contains("row 2: `messages` item 1"),
            "{e}"
        );
    }

    /// One token a character, `</s>` as EOS.
    fn char_tokenizer() -> Tokenizer {
        let mut vocab = serde_json::Map::new();
        for (i, tok) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
            vocab.insert(tok.to_string(), i.into());
        }
        for (i, c) in (32u8..127).map(char::from).enumerate() {
            vocab.insert(c.to_string(), (i + 3).into());
        }
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [{"id": 2, "content": "</s>", "single_word": false, "lstrip": false,
                              "rstrip": false, "normalized": false, "special": true}],
            "normalizer": null,
            "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "[\\s\\S]"},
                              "behavior": "Isolated", "invert": false},
            "post_processor": null, "decoder": {"type": "Fuse"},
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
        });
        Tokenizer::from_str(&json.to_string()).unwrap()
    }

    #[test]
    fn rows_truncated_to_no_completion_token_are_left_out_as_trl_does() {
        let rendered = |prompt: &str, completion: &str| Rendered::pair(prompt, completion);
        let rows = [
            rendered("short prompt: ", "kept"),
            rendered(&"a long prompt ".repeat(10), "cut away"),
            rendered("another: ", "kept too"),
        ];
        let enc = |lengths| {
            encode(
                &char_tokenizer(),
                &rows,
                Some("</s>"),
                None,
                true,
                40,
                lengths,
            )
        };
        let e = enc(Lengths::Truncate).unwrap();
        assert_eq!(e.examples.len(), 2, "the fully masked row is gone");
        assert_eq!((e.longer, e.truncated, e.no_targets), (1, 1, 1));
        assert!(e.examples.iter().all(|e| n_targets(e) > 0));
        // Packing keeps it, as TRL skips that filter when packing.
        let e = enc(Lengths::TruncateKeepAll).unwrap();
        assert_eq!((e.examples.len(), e.truncated, e.no_targets), (3, 1, 0));
        assert!(e.examples.iter().all(|e| e.input_ids.len() <= 40));
        // Splitting packers get it whole, completion included.
        let e = enc(Lengths::KeepWhole).unwrap();
        assert_eq!(
            (e.examples.len(), e.longer, e.truncated, e.no_targets),
            (3, 1, 0, 0)
        );
        assert!(e.examples[1].input_ids.len() > 40 && n_targets(&e.examples[1]) > 0);
    }
}
