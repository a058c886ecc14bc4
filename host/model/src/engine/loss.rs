//! Evaluation loss: mean token cross-entropy over a dataset, tokenized as TRL's `SFTTrainer`
//! (0.2x) does.
//!
//! Rows are `prompt`/`completion` (TRL's prompt-completion format) or anything a formatter turns
//! into a prompt and completion (the host passes the plugin formatter for `dialogue`/`summary`
//! rows) or into one plain text. As TRL, for these non-conversational rows: the EOS token text
//! is appended to the completion (or text) unless it already ends with it; the prompt and
//! `prompt + completion` are tokenized separately, each with the tokenizer's special tokens;
//! the first `len(prompt_ids)` tokens are the prompt. With `completion_only`, only completion
//! tokens are targets; else every token but the first.

use anyhow::{Context, Result, bail};
use candle_core::{D, Device, Tensor};
use serde::Serialize;
use serde_json::Value;
use tokenizers::Tokenizer;

use crate::nn::causal_lm::CausalLm;
use crate::ops::attention::AttentionContext;
use crate::ops::cross_entropy::cross_entropy_sum;
use crate::ops::rows::PickedRows;

/// One dataset row, as JSON.
pub type Row = serde_json::Map<String, Value>;

/// Turns a row into `(prompt, Some(completion))` or `(text, None)`.
pub type Formatter<'a> = &'a dyn Fn(&Row) -> Result<(String, Option<String>)>;

/// A tokenized example: ids and which of them are loss targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub input_ids: Vec<u32>,
    /// `targets[t]`: token `t` is predicted (from position `t - 1`) and counted.
    pub targets: Vec<bool>,
}

/// The mean loss and how many tokens it averages over.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LossOutput {
    pub loss: f64,
    pub tokens: usize,
}

/// How rows are tokenized.
#[derive(Debug, Clone)]
pub struct TokenizeOptions {
    /// Count only completion tokens (TRL's `completion_only_loss`, on by default for
    /// prompt-completion data).
    pub completion_only: bool,
    /// The tokenizer's EOS token text, appended as TRL does; `None` appends nothing.
    pub eos_token: Option<String>,
    /// Truncate to this many tokens (TRL's `max_length`, 1024 by default).
    pub max_length: Option<usize>,
}

impl Default for TokenizeOptions {
    fn default() -> Self {
        TokenizeOptions {
            completion_only: true,
            eos_token: None,
            max_length: Some(1024),
        }
    }
}

fn encode(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    Ok(tokenizer
        .encode(text, true)
        .map_err(|e| anyhow::anyhow!("tokenizing failed: {e}"))?
        .get_ids()
        .to_vec())
}

/// The prompt and completion (or text) of a row: its own `prompt`/`completion` fields when it
/// has them, else what `formatter` makes of it.
pub fn render_row(row: &Row, formatter: Option<Formatter>) -> Result<(String, Option<String>)> {
    if let (Some(Value::String(p)), Some(Value::String(c))) =
        (row.get("prompt"), row.get("completion"))
    {
        return Ok((p.clone(), Some(c.clone())));
    }
    match formatter {
        Some(f) => f(row),
        None => {
            let keys: Vec<&String> = row.keys().collect();
            bail!(
                "row has no prompt/completion strings and no formatter was given (fields: {keys:?})"
            )
        }
    }
}

/// Tokenizes one row as TRL does.
pub fn tokenize_row(
    tokenizer: &Tokenizer,
    row: &Row,
    formatter: Option<Formatter>,
    opts: &TokenizeOptions,
) -> Result<Example> {
    let (first, completion) = render_row(row, formatter)?;
    let with_eos = |s: String| match &opts.eos_token {
        Some(eos) if !s.ends_with(eos.as_str()) => s + eos,
        _ => s,
    };
    let mut ex = match completion {
        Some(completion) => {
            let completion = with_eos(completion);
            let prompt_ids = encode(tokenizer, &first)?;
            let input_ids = encode(tokenizer, &format!("{first}{completion}"))?;
            let n = prompt_ids.len().min(input_ids.len());
            let targets = (0..input_ids.len())
                .map(|t| if opts.completion_only { t >= n } else { t > 0 })
                .collect();
            Example { input_ids, targets }
        }
        None => {
            let input_ids = encode(tokenizer, &with_eos(first))?;
            let targets = (0..input_ids.len()).map(|t| t > 0).collect();
            Example { input_ids, targets }
        }
    };
    if let Some(max) = opts.max_length {
        ex.input_ids.truncate(max);
        ex.targets.truncate(max);
    }
    // Position 0 is never predicted (the labels are shifted).
    if let Some(t) = ex.targets.first_mut() {
        *t = false;
    }
    Ok(ex)
}

/// A conversation as its chat template wrote it, tokenized as transformers'
/// `apply_chat_template` does (no special tokens added: the template writes them) and trained
/// on whole, as TRL trains a conversational language-modeling row (no EOS appended: the
/// template ends the turns).
pub fn tokenize_chat_text(tokenizer: &Tokenizer, text: &str) -> Result<Example> {
    let input_ids = tokenizer
        .encode(text, false)
        .map_err(|e| anyhow::anyhow!("tokenizing failed: {e}"))?
        .get_ids()
        .to_vec();
    // Position 0 is never predicted (the labels are shifted).
    let targets = (0..input_ids.len()).map(|t| t > 0).collect();
    Ok(Example { input_ids, targets })
}

/// Several examples in one row (TRL's `packing`): their ids and targets concatenated, and each
/// one's length. Every example's first token is never a target (see [`tokenize_row`]), so no
/// example is predicted from the one before it. An unpacked example is a row of one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packed {
    pub row: Example,
    /// The lengths of the examples in `row`, in order (TRL's `seq_lengths`).
    pub seq_lengths: Vec<usize>,
}

impl Packed {
    pub fn single(example: Example) -> Packed {
        let n = example.input_ids.len();
        Packed {
            row: example,
            seq_lengths: vec![n],
        }
    }

    /// `examples` one after the other in one row.
    pub fn concat(examples: &[&Example]) -> Packed {
        let mut row = Example {
            input_ids: Vec::new(),
            targets: Vec::new(),
        };
        for e in examples {
            row.input_ids.extend_from_slice(&e.input_ids);
            row.targets.extend_from_slice(&e.targets);
        }
        Packed {
            row,
            seq_lengths: examples.iter().map(|e| e.input_ids.len()).collect(),
        }
    }
}

/// One right-padded micro-batch with its loss targets.
#[derive(Debug)]
pub struct Batch {
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
    /// For packed rows, the example each token belongs to, `[rows][width]` (padding continues
    /// the row's last example; the mask hides it); `None` when every row holds one example.
    pub segments: Option<Vec<Vec<u32>>>,
    /// Flat positions `row * width + t - 1` whose hidden state predicts a target, increasing.
    pub positions: PickedRows,
    pub labels: Tensor,
    pub n_targets: usize,
    /// Real (unpadded) tokens, for tokens/s.
    pub n_tokens: usize,
    pub rows: usize,
    pub width: usize,
}

/// The tokens of `e` the loss counts: targets after the first position ([`collate`]'s labels).
pub fn n_targets(e: &Example) -> usize {
    e.targets.iter().skip(1).filter(|t| **t).count()
}

/// Right padding with `pad_id`; labels are the targets' ids (HF's `-100` positions left out).
pub fn collate(examples: &[&Example], pad_id: u32, device: &Device) -> Result<Batch> {
    let rows: Vec<(&Example, &[usize])> = examples.iter().map(|e| (*e, &[][..])).collect();
    collate_rows(&rows, pad_id, device)
}

/// [`collate`] for packed rows, with the segment ids that keep each example's attention and
/// positions to itself.
pub fn collate_packed(rows: &[&Packed], pad_id: u32, device: &Device) -> Result<Batch> {
    for (r, p) in rows.iter().enumerate() {
        let sum: usize = p.seq_lengths.iter().sum();
        if sum != p.row.input_ids.len() || p.row.targets.len() != sum {
            bail!(
                "packed row {r}: sequence lengths {:?} sum to {sum}, the row has {} tokens and {} targets",
                p.seq_lengths,
                p.row.input_ids.len(),
                p.row.targets.len()
            );
        }
    }
    let rows: Vec<(&Example, &[usize])> = rows
        .iter()
        .map(|p| (&p.row, p.seq_lengths.as_slice()))
        .collect();
    collate_rows(&rows, pad_id, device)
}

/// Rows with the lengths of the examples packed in them (empty or one length: unpacked).
fn collate_rows(examples: &[(&Example, &[usize])], pad_id: u32, device: &Device) -> Result<Batch> {
    let width = examples
        .iter()
        .map(|(e, _)| e.input_ids.len())
        .max()
        .unwrap_or(0)
        .max(1);
    let segments = examples.iter().any(|(_, l)| l.len() > 1).then(|| {
        examples
            .iter()
            .map(|(_, lengths)| {
                let mut ids: Vec<u32> = lengths
                    .iter()
                    .enumerate()
                    .flat_map(|(i, &n)| std::iter::repeat_n(i as u32, n))
                    .collect();
                let last = ids.last().copied().unwrap_or(0);
                ids.resize(width, last);
                ids
            })
            .collect()
    });
    let (mut ids, mut mask, mut positions, mut labels) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut n_tokens = 0;
    for (r, (e, lengths)) in examples.iter().enumerate() {
        // A sequence's first token is never predicted, in a packed row from the token of the
        // sequence before it (TRL's collator sets its label to -100 where `position_ids == 0`).
        let mut starts = lengths.iter().scan(0, |at, &n| {
            let start = *at;
            *at += n;
            Some(start)
        });
        let mut next_start = starts.next();
        let pad = width - e.input_ids.len();
        n_tokens += e.input_ids.len();
        ids.extend(
            e.input_ids
                .iter()
                .copied()
                .chain(std::iter::repeat_n(pad_id, pad)),
        );
        mask.extend(
            std::iter::repeat_n(1u32, e.input_ids.len()).chain(std::iter::repeat_n(0, pad)),
        );
        for (t, &is_target) in e.targets.iter().enumerate() {
            let starts_a_sequence = t == 0 || next_start == Some(t);
            while next_start.is_some_and(|s| s <= t) {
                next_start = starts.next();
            }
            if is_target && !starts_a_sequence {
                positions.push((r * width + t - 1) as u32);
                labels.push(e.input_ids[t]);
            }
        }
    }
    let n = examples.len();
    let n_targets = labels.len();
    Ok(Batch {
        input_ids: Tensor::from_vec(ids, (n, width), device)?,
        attention_mask: Tensor::from_vec(mask, (n, width), device)?,
        segments,
        positions: PickedRows::new(positions, device)?,
        labels: Tensor::from_vec(labels, n_targets, device)?,
        n_targets,
        n_tokens,
        rows: n,
        width,
    })
}

/// The final hidden states of a batch, `[rows, width, hidden]`: packed rows with their
/// segments ([`AttentionContext::packed`]), others as the model's plain forward.
pub fn batch_hidden_states(model: &dyn CausalLm, batch: &Batch) -> candle_core::Result<Tensor> {
    match &batch.segments {
        None => model.hidden_states(&batch.input_ids, Some(&batch.attention_mask), None),
        Some(segments) => {
            let ctx = AttentionContext::packed(
                Some(&batch.attention_mask),
                segments,
                batch.rows,
                batch.width,
                model.device(),
            )?;
            model.hidden_states_in(&batch.input_ids, ctx, None)
        }
    }
}

/// Mean cross-entropy over all target tokens of `examples`, run `batch_size` examples at a time
/// (right-padded, with an attention mask). Only target positions are projected onto the
/// vocabulary, which keeps memory to `targets x vocab` per batch.
pub fn loss_on_examples(
    model: &dyn CausalLm,
    examples: &[Example],
    batch_size: usize,
) -> Result<LossOutput> {
    let rows: Vec<(&Example, &[usize])> = examples.iter().map(|e| (e, &[][..])).collect();
    loss_on_rows(model, &rows, batch_size)
}

/// [`loss_on_examples`] over packed rows, `batch_size` rows at a time.
pub fn loss_on_packed(
    model: &dyn CausalLm,
    rows: &[Packed],
    batch_size: usize,
) -> Result<LossOutput> {
    let rows: Vec<(&Example, &[usize])> = rows
        .iter()
        .map(|p| (&p.row, p.seq_lengths.as_slice()))
        .collect();
    loss_on_rows(model, &rows, batch_size)
}

fn loss_on_rows(
    model: &dyn CausalLm,
    rows: &[(&Example, &[usize])],
    batch_size: usize,
) -> Result<LossOutput> {
    let device = model.device().clone();
    let mut total = 0f64;
    let mut tokens = 0usize;
    for (b, chunk) in rows.chunks(batch_size.max(1)).enumerate() {
        let chunk: Vec<(&Example, &[usize])> = chunk
            .iter()
            .filter(|(e, _)| e.targets.iter().any(|t| *t))
            .copied()
            .collect();
        if chunk.is_empty() {
            continue;
        }
        // Pad ids are masked out and never targets: any id will do.
        let batch = collate_rows(&chunk, 0, &device)?;
        let (n, width) = (batch.rows, batch.width);
        let hidden = batch_hidden_states(model, &batch)
            .with_context(|| format!("forward pass of batch {b} failed"))?;
        let hidden = hidden.reshape((n * width, hidden.dim(D::Minus1)?))?;
        let picked = batch.positions.gather(&hidden)?;
        let logits = model.lm_head(&picked)?;
        let nll = cross_entropy_sum(&logits, &batch.labels)?.to_scalar::<f32>()?;
        total += nll as f64;
        tokens += batch.n_targets;
    }
    if tokens == 0 {
        bail!("no target tokens: every example is empty or all prompt");
    }
    Ok(LossOutput {
        loss: total / tokens as f64,
        tokens,
    })
}

/// Tokenizes `rows` and returns the mean token loss over them.
pub fn eval_loss(
    model: &dyn CausalLm,
    tokenizer: &Tokenizer,
    rows: &[Row],
    formatter: Option<Formatter>,
    opts: &TokenizeOptions,
    batch_size: usize,
) -> Result<LossOutput> {
    let examples = rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            tokenize_row(tokenizer, r, formatter, opts).with_context(|| format!("row {i}"))
        })
        .collect::<Result<Vec<_>>>()?;
    loss_on_examples(model, &examples, batch_size)
}

#[cfg(test)]
mod tests {
    use candle_nn::VarBuilder;

    use super::*;
    use crate::models::llama::Llama;
    use crate::nn::linear::LinearBuilder;
    use candle_core::DType;

    /// A tiny word-level tokenizer: "a b c" -> ids, `<eos>` special.
    pub(crate) fn word_tokenizer() -> Tokenizer {
        let json = r#"{
          "version": "1.0",
          "added_tokens": [{"id": 1, "content": "<eos>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
          "normalizer": null,
          "pre_tokenizer": {"type": "Whitespace"},
          "post_processor": null,
          "decoder": null,
          "model": {"type": "WordLevel", "vocab": {"<unk>": 0, "<eos>": 1, "a": 2, "b": 3, "c": 4, "d": 5, "e": 6}, "unk_token": "<unk>"}
        }"#;
        Tokenizer::from_bytes(json.as_bytes()).unwrap()
    }

    fn row(pairs: &[(&str, &str)]) -> Row {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
            .collect()
    }

    #[test]
    fn prompt_completion_as_trl() -> Result<()> {
        let tok = word_tokenizer();
        let opts = TokenizeOptions {
            eos_token: Some("<eos>".into()),
            ..Default::default()
        };
        let ex = tokenize_row(
            &tok,
            &row(&[("prompt", "a b"), ("completion", " c d")]),
            None,
            &opts,
        )?;
        assert_eq!(ex.input_ids, vec![2, 3, 4, 5, 1]);
        assert_eq!(ex.targets, vec![false, false, true, true, true]);
        // A completion already ending in EOS gets no second one; full-sequence loss counts all but the first.
        let opts = TokenizeOptions {
            completion_only: false,
            ..opts
        };
        let ex = tokenize_row(
            &tok,
            &row(&[("prompt", "a"), ("completion", " b<eos>")]),
            None,
            &opts,
        )?;
        assert_eq!(
            (ex.input_ids, ex.targets),
            (vec![2, 3, 1], vec![false, true, true])
        );
        // Formatter rows.
        let f = |r: &Row| -> Result<(String, Option<String>)> {
            Ok((
                format!("{} e", r["dialogue"].as_str().unwrap()),
                Some(format!(" {}", r["summary"].as_str().unwrap())),
            ))
        };
        let ex = tokenize_row(
            &tok,
            &row(&[("dialogue", "a"), ("summary", "b")]),
            Some(&f),
            &TokenizeOptions::default(),
        )?;
        assert_eq!(
            (ex.input_ids, ex.targets),
            (vec![2, 6, 3], vec![false, false, true])
        );
        assert!(tokenize_row(&tok, &row(&[("dialogue", "a")]), None, &opts).is_err());
        Ok(())
    }

    /// The fused cross-entropy and its gradient equal candle's op-by-op log-softmax graph.
    #[test]
    fn cross_entropy_equals_log_softmax_and_its_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let v: Vec<f32> = (0..5 * 11).map(|i| (i as f32 * 0.77).sin() * 5.0).collect();
        let x = candle_core::Var::from_tensor(&Tensor::from_vec(v, (5, 11), &dev)?)?;
        let labels = Tensor::new(&[3u32, 0, 10, 7, 7], &dev)?;
        let ours = (cross_entropy_sum(x.as_tensor(), &labels)? * 0.5)?;
        let theirs = (candle_nn::ops::log_softmax(x.as_tensor(), D::Minus1)?
            .gather(&labels.unsqueeze(1)?, 1)?
            .neg()?
            .sum_all()?
            * 0.5)?;
        let (a, b) = (ours.to_scalar::<f32>()?, theirs.to_scalar::<f32>()?);
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        let (ga, gb) = (ours.backward()?, theirs.backward()?);
        let d = (ga.get(&x).unwrap() - gb.get(&x).unwrap())?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(d < 1e-6, "gradients differ by {d}");
        Ok(())
    }

    /// Each target's negative log-likelihood in `batch`, in [`collate`]'s label order.
    fn target_nll(model: &dyn CausalLm, batch: &Batch) -> Result<Tensor> {
        let hidden = batch_hidden_states(model, batch)?;
        let hidden = hidden.reshape((batch.rows * batch.width, hidden.dim(D::Minus1)?))?;
        let logits = model.lm_head(&batch.positions.gather(&hidden)?)?;
        Ok(candle_nn::ops::log_softmax(&logits, D::Minus1)?
            .gather(&batch.labels.unsqueeze(1)?, 1)?
            .squeeze(1)?
            .neg()?)
    }

    /// Packed rows give every example the loss it gets alone, and the adapter (`vars`) the
    /// gradient: for each example, the summed loss of its targets in the packed batch equals its
    /// summed loss unpacked within 1e-4 (f32; the sums are of a few tokens at ~4 nats each), and
    /// the gradients of the total within 1e-5 (max abs). Rows of unequal lengths also exercise
    /// the right padding.
    fn check_packing_equals_unpacked(
        model: &dyn CausalLm,
        vars: &[candle_core::Var],
    ) -> Result<()> {
        let dev = Device::Cpu;
        // B starts at zero, which would leave A without a gradient: give both some values.
        for (i, v) in vars.iter().enumerate() {
            let n = v.elem_count();
            let w: Vec<f32> = (0..n)
                .map(|j| (j as f32 * 0.37 + i as f32).sin() * 0.2)
                .collect();
            v.set(&Tensor::from_vec(w, v.shape(), &dev)?)?;
        }
        let ex = |ids: &[u32], first: usize| Example {
            input_ids: ids.to_vec(),
            targets: (0..ids.len()).map(|t| t >= first && t > 0).collect(),
        };
        let examples = [
            ex(&[1, 5, 9, 13, 2, 40, 7], 3),
            ex(&[3, 8, 21, 2, 11], 1),
            ex(&[6, 4, 33, 62], 2),
            ex(&[17, 9, 9, 50, 2, 3], 2),
            ex(&[12, 45, 8], 1),
        ];
        let e: Vec<&Example> = examples.iter().collect();
        let packed = [
            Packed::concat(&[e[0], e[1]]),
            Packed::concat(&[e[2], e[3], e[4]]),
            Packed::concat(&[e[1]]),
        ];
        let rows: Vec<&Packed> = packed.iter().collect();
        let batch = collate_packed(&rows, 0, &dev)?;
        assert!(batch.segments.is_some());
        let nll = target_nll(model, &batch)?;
        let per_target = nll.to_vec1::<f32>()?;
        let mut at = 0;
        let mut owners: Vec<&Example> = Vec::new();
        for p in &packed {
            let mut start = 0;
            for &n in &p.seq_lengths {
                let owner = examples
                    .iter()
                    .find(|x| x.input_ids == p.row.input_ids[start..start + n])
                    .unwrap();
                owners.push(owner);
                start += n;
            }
        }
        let mut unpacked_grads: Vec<Option<Tensor>> = vec![None; vars.len()];
        for owner in owners {
            let k = n_targets(owner);
            let packed_sum: f32 = per_target[at..at + k].iter().sum();
            at += k;
            let alone = target_nll(model, &collate(&[owner], 0, &dev)?)?;
            let alone_sum = alone.sum_all()?.to_scalar::<f32>()?;
            assert!(
                (packed_sum - alone_sum).abs() < 1e-4,
                "example {:?}: packed {packed_sum} vs alone {alone_sum}",
                owner.input_ids
            );
            let g = alone.sum_all()?.backward()?;
            for (acc, v) in unpacked_grads.iter_mut().zip(vars) {
                let gv = g.get(v.as_tensor()).unwrap().clone();
                *acc = Some(match acc.take() {
                    Some(a) => (a + gv)?,
                    None => gv,
                });
            }
        }
        assert_eq!(at, per_target.len());
        let g = nll.sum_all()?.backward()?;
        for (v, want) in vars.iter().zip(unpacked_grads) {
            let got = g.get(v.as_tensor()).unwrap();
            let d = (got - want.unwrap())?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            let size = got.abs()?.max_all()?.to_scalar::<f32>()?;
            // Relative to the gradient's size: the packed batch sums the same terms in another
            // order, and with gradients near 5 an absolute 1e-5 is a few f32 ulps (it failed
            // once at 1.01e-5 of 5.18).
            assert!(
                d < 1e-5 * size.max(1.0) && size > 0.0,
                "gradient differs by {d} (of {size})"
            );
        }
        Ok(())
    }

    fn lora(targets: &[&str]) -> crate::lora::LoraConfig {
        crate::lora::LoraConfig {
            r: 2,
            lora_alpha: 4.0,
            target_modules: crate::lora::TargetModules::names(targets.iter().copied()),
            ..Default::default()
        }
    }

    #[test]
    fn packed_llama_loss_and_gradients_equal_unpacked_per_example() -> Result<()> {
        let cfg = crate::models::llama::tests::tiny();
        let vb = VarBuilder::from_tensors(
            crate::models::llama::tests::random_weights(&cfg, 5)?,
            DType::F32,
            &Device::Cpu,
        );
        let builder = LinearBuilder::dense().with_lora(lora(&["v_proj", "down_proj"]))?;
        let model = Llama::load(vb, &cfg, &builder)?;
        builder.lora().unwrap().set_training(true);
        let vars = builder.lora().unwrap().varmap().all_vars();
        check_packing_equals_unpacked(&model, &vars)
    }

    #[test]
    fn packed_falcon_loss_and_gradients_equal_unpacked_per_example() -> Result<()> {
        use crate::models::falcon::{
            Falcon,
            tests::{random_weights, small},
        };
        // Rotary with multi-query attention, grouped KV heads, and ALiBi (the RW models).
        for kind in ["7b", "40b", "rw"] {
            let cfg = small(kind);
            let vb = VarBuilder::from_tensors(random_weights(&cfg, 7)?, DType::F32, &Device::Cpu);
            let builder =
                LinearBuilder::dense().with_lora(lora(&["query_key_value", "dense_4h_to_h"]))?;
            let model = Falcon::load(vb, &cfg, &builder)?;
            builder.lora().unwrap().set_training(true);
            let vars = builder.lora().unwrap().varmap().all_vars();
            check_packing_equals_unpacked(&model, &vars)
                .with_context(|| format!("falcon {kind}"))?;
        }
        Ok(())
    }

    #[test]
    fn batched_loss_equals_per_token_sum() -> Result<()> {
        let cfg = crate::models::llama::tests::tiny();
        let vb = VarBuilder::from_tensors(
            crate::models::llama::tests::random_weights(&cfg, 5)?,
            DType::F32,
            &Device::Cpu,
        );
        let model = Llama::load(vb, &cfg, &LinearBuilder::dense())?;
        let examples = vec![
            Example {
                input_ids: vec![1, 5, 9, 13, 2],
                targets: vec![false, false, true, true, true],
            },
            Example {
                input_ids: vec![1, 7, 3],
                targets: vec![false, true, true],
            },
        ];
        let batched = loss_on_examples(&model, &examples, 2)?;
        // Reference: full logits of each example alone.
        let mut total = 0f64;
        let mut n = 0;
        for e in &examples {
            let ids = Tensor::new(e.input_ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
            let logp = candle_nn::ops::log_softmax(
                &model.forward(&ids, None, None)?.squeeze(0)?,
                D::Minus1,
            )?
            .to_vec2::<f32>()?;
            for t in 1..e.input_ids.len() {
                if e.targets[t] {
                    total -= logp[t - 1][e.input_ids[t] as usize] as f64;
                    n += 1;
                }
            }
        }
        assert_eq!(batched.tokens, 5);
        assert!(
            (batched.loss - total / n as f64).abs() < 1e-5,
            "{} vs {}",
            batched.loss,
            total / n as f64
        );
        Ok(())
    }

    /// The first token of every sequence in a packed row is no label, even when marked a
    /// target (a `bfd_split` piece that starts inside a completion), as in TRL's collator.
    #[test]
    fn a_sequence_start_inside_a_packed_row_is_never_a_label() -> Result<()> {
        let packed = Packed {
            row: Example {
                input_ids: vec![10, 11, 12, 20, 21, 30],
                targets: vec![true, true, true, true, true, true],
            },
            seq_lengths: vec![3, 0, 2, 1],
        };
        let batch = collate_packed(&[&packed], 0, &Device::Cpu)?;
        assert_eq!(batch.labels.to_vec1::<u32>()?, vec![11, 12, 21]);
        assert_eq!(batch.positions.tensor().to_vec1::<u32>()?, vec![0, 1, 3]);
        // Unpacked, only the row's first token is skipped.
        let single = Packed::single(packed.row.clone());
        let batch = collate_packed(&[&single], 0, &Device::Cpu)?;
        assert_eq!(batch.labels.to_vec1::<u32>()?, vec![11, 12, 20, 21, 30]);
        Ok(())
    }
}
