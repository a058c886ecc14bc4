//! KV-cached decoding with transformers' `generate` semantics: greedy or sampling, logits
//! processors in transformers' order (repetition penalty, then temperature, top-k, top-p),
//! per-row stopping at EOS with finished rows padded, left-padded batches.
//!
//! Sampling draws from this crate's seeded RNG, so a seed reproduces our runs but not torch's
//! random stream; greedy decoding matches transformers token for token.

use std::collections::HashSet;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};

use crate::nn::causal_lm::CausalLm;
use crate::ops::argmax::first_max;

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoding {
    /// The most likely token (transformers' `do_sample=False`, `num_beams=1`).
    Greedy,
    /// Sampling (`do_sample=True`). As in transformers, `temperature` 1.0, `top_k` 0/None and
    /// `top_p` 1.0/None switch that warper off; transformers' default `top_k` is 50, see
    /// [`Decoding::sample`].
    Sample {
        temperature: f32,
        top_k: Option<usize>,
        top_p: Option<f32>,
        seed: u64,
    },
}

impl Decoding {
    /// The one conversion from user-facing sampling settings (the CLI's flags, a generate run's
    /// settings, an OpenAI request) to a decoding strategy: temperature 0 is greedy decoding,
    /// as OpenAI defines it and as transformers' `do_sample=False`; any other temperature
    /// samples with the given warpers. Each edge picks its own default temperature first.
    pub fn from_settings(
        temperature: f32,
        top_k: Option<usize>,
        top_p: Option<f32>,
        seed: u64,
    ) -> Self {
        if temperature == 0.0 {
            return Decoding::Greedy;
        }
        Decoding::Sample {
            temperature,
            top_k,
            top_p,
            seed,
        }
    }

    /// Sampling with transformers' defaults (temperature 1.0, top_k 50, top_p 1.0).
    pub fn sample(seed: u64) -> Self {
        Decoding::Sample {
            temperature: 1.0,
            top_k: Some(50),
            top_p: None,
            seed,
        }
    }
}

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    pub decoding: Decoding,
    /// transformers' `repetition_penalty`; 1.0 is off.
    pub repetition_penalty: f32,
    /// A row stops when it produces any of these.
    pub eos_token_ids: Vec<u32>,
    /// Left padding of prompts, and what finished rows get.
    pub pad_token_id: u32,
    /// Also return each new token's log-probability with this many most likely alternatives
    /// (`Some(0)`: the token's own only), as the OpenAI API's `logprobs`/`top_logprobs`.
    pub logprobs: Option<usize>,
}

impl GenerationConfig {
    pub fn greedy(max_new_tokens: usize, eos_token_ids: Vec<u32>, pad_token_id: u32) -> Self {
        GenerationConfig {
            max_new_tokens,
            decoding: Decoding::Greedy,
            repetition_penalty: 1.0,
            eos_token_ids,
            pad_token_id,
            logprobs: None,
        }
    }

    fn validate(&self) -> Result<()> {
        if self.repetition_penalty.is_nan() || self.repetition_penalty <= 0.0 {
            bail!(
                "repetition_penalty must be positive, got {}",
                self.repetition_penalty
            );
        }
        if let Decoding::Sample {
            temperature, top_p, ..
        } = &self.decoding
        {
            if temperature.is_nan() || *temperature <= 0.0 {
                bail!(
                    "temperature must be positive when sampling, got {temperature} (use greedy decoding instead)"
                );
            }
            if let Some(p) = top_p
                && !(*p > 0.0 && *p <= 1.0)
            {
                bail!("top_p must be in (0, 1], got {p}");
            }
        }
        Ok(())
    }
}

/// Generated tokens for each prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationOutput {
    /// New tokens per row, up to and including the EOS that stopped it; no padding.
    pub tokens: Vec<Vec<u32>>,
    /// Whether each row stopped at EOS (else it ran to `max_new_tokens` or was stopped).
    pub stopped_at_eos: Vec<bool>,
    /// With [`GenerationConfig::logprobs`]: one entry per token of `tokens`, per row.
    pub logprobs: Vec<Vec<TokenLogprobs>>,
}

/// A generated token's log-probability under the model, and the most likely alternatives at its
/// position. These are the model's own distribution (log-softmax of its logits), before the
/// repetition penalty, temperature or top-k/top-p shape the choice, as OpenAI reports them.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub token: u32,
    pub logprob: f32,
    /// Most likely first.
    pub top: Vec<(u32, f32)>,
}

/// One new token of one row, as an observer of [`generate_ids_with`] sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct StepToken {
    pub row: usize,
    pub token: u32,
    pub is_eos: bool,
    /// With [`GenerationConfig::logprobs`].
    pub logprobs: Option<TokenLogprobs>,
}

/// What an observer wants after seeing a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Stop this row here (the token is kept), e.g. when a stop string appeared.
    StopRow,
}

/// The most tokens of room generation reserves in the KV cache's buffers at a time; longer
/// generations grow them by this much when full.
const MAX_CACHE_ROOM: usize = 512;

/// `log_softmax(logits)` at the chosen token and the `n` best, most likely first.
fn token_logprobs(logits: &[f32], token: u32, n: usize) -> TokenLogprobs {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_sum = logits.iter().map(|v| (v - max).exp()).sum::<f32>().ln() + max;
    let mut order: Vec<usize> = (0..logits.len()).collect();
    let n = n.min(logits.len());
    if n > 0 {
        // Likeliest first; ties go to the lower id, as `first_max` does.
        let rank = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
        order.select_nth_unstable_by(n - 1, rank);
        order.truncate(n);
        order.sort_by(rank);
    } else {
        order.clear();
    }
    TokenLogprobs {
        token,
        logprob: logits
            .get(token as usize)
            .map_or(f32::NEG_INFINITY, |v| v - log_sum),
        top: order
            .into_iter()
            .map(|i| (i as u32, logits[i] - log_sum))
            .collect(),
    }
}

/// transformers' `RepetitionPenaltyLogitsProcessor`: every token in `seen` (prompt, its
/// padding and what was generated) has its score divided by `penalty` if positive, multiplied
/// if negative.
pub fn apply_repetition_penalty(scores: &mut [f32], seen: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let unique: HashSet<u32> = seen.iter().copied().collect();
    for id in unique {
        if let Some(s) = scores.get_mut(id as usize) {
            *s = if *s < 0.0 { *s * penalty } else { *s / penalty };
        }
    }
}

/// `TopKLogitsWarper`: scores below the k-th largest become -inf (ties with it stay).
pub fn apply_top_k(scores: &mut [f32], k: usize) {
    let k = k.max(1).min(scores.len());
    if k == scores.len() {
        return;
    }
    let mut sorted: Vec<f32> = scores.to_vec();
    sorted.sort_unstable_by(|a, b| b.total_cmp(a));
    let kth = sorted[k - 1];
    scores
        .iter_mut()
        .filter(|s| **s < kth)
        .for_each(|s| *s = f32::NEG_INFINITY);
}

/// `TopPLogitsWarper`: sorted ascending, tokens whose cumulative probability is at most
/// `1 - top_p` become -inf, always keeping the most likely one.
pub fn apply_top_p(scores: &mut [f32], top_p: f32) {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let probs = softmax(&order.iter().map(|&i| scores[i]).collect::<Vec<_>>());
    let mut cum = 0f32;
    let last = order.len() - 1;
    for (rank, &i) in order.iter().enumerate() {
        cum += probs[rank];
        if cum <= 1.0 - top_p && rank != last {
            scores[i] = f32::NEG_INFINITY;
        }
    }
}

fn softmax(x: &[f32]) -> Vec<f32> {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = x.iter().map(|v| (v - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// Chooses the next token of one row from its last-position logits.
fn next_token(
    scores: &mut [f32],
    seen: &[u32],
    cfg: &GenerationConfig,
    rng: &mut rand::rngs::StdRng,
) -> u32 {
    apply_repetition_penalty(scores, seen, cfg.repetition_penalty);
    match &cfg.decoding {
        Decoding::Greedy => first_max(scores),
        Decoding::Sample {
            temperature,
            top_k,
            top_p,
            ..
        } => {
            if *temperature != 1.0 {
                scores.iter_mut().for_each(|s| *s /= temperature);
            }
            if let Some(k) = top_k.filter(|k| *k > 0) {
                apply_top_k(scores, k);
            }
            if let Some(p) = top_p.filter(|p| *p < 1.0) {
                apply_top_p(scores, p);
            }
            let probs = softmax(scores);
            let mut u: f32 = rng.random();
            for (i, p) in probs.iter().enumerate() {
                if u < *p {
                    return i as u32;
                }
                u -= p;
            }
            // Rounding left a sliver: take the most likely token.
            first_max(&probs)
        }
    }
}

/// Generates for a batch of tokenized prompts, left-padding them into one batch.
pub fn generate_ids(
    model: &dyn CausalLm,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
) -> Result<GenerationOutput> {
    generate_ids_with(model, prompts, cfg, |_| Flow::Continue)
}

/// [`generate_ids`], showing each new token to `observe` as it is chosen (for streaming), which
/// may stop its row.
pub fn generate_ids_with(
    model: &dyn CausalLm,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    observe: impl FnMut(&StepToken) -> Flow,
) -> Result<GenerationOutput> {
    // Looking ahead pays where the device runs behind the host (a GPU's queue); on the CPU the
    // work is done as it is issued, so it would only add a wasted step after the last EOS.
    let lookahead = model.device().is_cuda();
    decode(model, prompts, cfg, observe, lookahead)
}

/// The decoding loop; `lookahead` asks for the lookahead (see below) where the choice allows it.
fn decode(
    model: &dyn CausalLm,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    mut observe: impl FnMut(&StepToken) -> Flow,
    lookahead: bool,
) -> Result<GenerationOutput> {
    cfg.validate()?;
    if prompts.is_empty() {
        return Ok(GenerationOutput {
            tokens: vec![],
            stopped_at_eos: vec![],
            logprobs: vec![],
        });
    }
    if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
        bail!("prompt {i} is empty");
    }
    let vocab = model.vocab_size() as u32;
    for (i, p) in prompts.iter().enumerate() {
        if let Some(t) = p.iter().find(|t| **t >= vocab) {
            bail!("prompt {i} has token id {t}, outside the vocabulary of {vocab}");
        }
    }
    let device = model.device().clone();
    let batch = prompts.len();
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut rows: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            std::iter::repeat_n(cfg.pad_token_id, width - p.len())
                .chain(p.iter().copied())
                .collect()
        })
        .collect();
    let mut mask: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            std::iter::repeat_n(0, width - p.len())
                .chain(std::iter::repeat_n(1, p.len()))
                .collect()
        })
        .collect();
    let seed = match cfg.decoding {
        Decoding::Sample { seed, .. } => seed,
        Decoding::Greedy => 0,
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut finished = vec![false; batch];
    let mut stopped_at_eos = vec![false; batch];
    // How many new tokens each finished row keeps.
    let mut kept: Vec<Option<usize>> = vec![None; batch];
    let mut logprobs: Vec<Vec<TokenLogprobs>> = vec![Vec::new(); batch];
    // Room for the tokens this call may add, so the buffers are made once, up to a bound: a
    // large `max_new_tokens` that EOS cuts short must not reserve its whole length up front.
    let mut cache = model
        .new_cache()
        .with_room(cfg.max_new_tokens.min(MAX_CACHE_ROOM));

    let to_tensor = |m: &Vec<Vec<u32>>, device: &Device| -> Result<Tensor> {
        let w = m[0].len();
        Ok(Tensor::from_vec(m.concat(), (m.len(), w), device)?)
    };
    // The mask stays on the host: the attention context reads it there (on a GPU that was an
    // upload and a download every step).
    let host = Device::Cpu;
    if cfg.max_new_tokens == 0 {
        return Ok(GenerationOutput {
            tokens: vec![vec![]; batch],
            stopped_at_eos,
            logprobs,
        });
    }
    let mut logits = model
        .forward_last(
            &to_tensor(&rows, &device)?,
            Some(&to_tensor(&mask, &host)?),
            Some(&mut cache),
        )
        .context("forward pass over the prompts failed")?;
    // Lookahead: where the choice needs nothing but the logits (greedy, no repetition penalty,
    // no log-probabilities), the device picks each row's token (`ops::argmax::rows`) and the
    // next forward pass is queued from those ids before the host reads them, so the host's
    // work of launching a step overlaps the device's work on the one before (at batch 1 on a
    // GPU the host's launching is as long as the device's computing). A row that has finished
    // is fed its own choice instead of the pad token: rows do not see each other, and a
    // finished row's later tokens are cut off, so the output is the same. When every row
    // stops before `max_new_tokens`, the step queued last is computed and dropped.
    let lookahead = lookahead
        && cfg.decoding == Decoding::Greedy
        && cfg.repetition_penalty == 1.0
        && cfg.logprobs.is_none();
    let mut chosen_ids = if lookahead {
        Some(crate::ops::argmax::rows(&logits)?)
    } else {
        None
    };
    for step in 0..cfg.max_new_tokens {
        let last = step + 1 == cfg.max_new_tokens;
        // The lookahead's next step: its forward pass and its choice, queued now.
        let queued = match &chosen_ids {
            Some(ids) if !last => {
                let next_mask: Vec<Vec<u32>> = mask
                    .iter()
                    .map(|m| m.iter().copied().chain([1]).collect())
                    .collect();
                let next_logits = forward_step(
                    model,
                    &ids.reshape((batch, 1))?,
                    &to_tensor(&next_mask, &host)?,
                    &mut cache,
                    step + 1,
                )?;
                Some(crate::ops::argmax::rows(&next_logits)?)
            }
            _ => None,
        };
        // Each row's token (and its scores where log-probabilities are asked for).
        let picks: Vec<(u32, Option<Vec<f32>>)> = match &chosen_ids {
            Some(ids) => {
                crate::ops::profile::scope("decode.read_ids", &device, || ids.to_vec1::<u32>())?
                    .into_iter()
                    .map(|t| (t, None))
                    .collect()
            }
            None => {
                let scores = crate::ops::profile::scope("decode.read_logits", &device, || {
                    logits.to_dtype(DType::F32)?.to_vec2::<f32>()
                })?;
                scores
                    .into_iter()
                    .enumerate()
                    .map(|(r, mut s)| {
                        let raw = cfg.logprobs.filter(|_| !finished[r]).map(|_| s.clone());
                        // Finished rows still draw, so a row's random stream does not depend on
                        // when the others finish.
                        (next_token(&mut s, &rows[r], cfg, &mut rng), raw)
                    })
                    .collect()
            }
        };
        let mut next = Vec::with_capacity(batch);
        for (r, (t, raw)) in picks.into_iter().enumerate() {
            if finished[r] {
                next.push(cfg.pad_token_id);
                continue;
            }
            let lp = raw.map(|raw| token_logprobs(&raw, t, cfg.logprobs.unwrap_or(0)));
            let is_eos = cfg.eos_token_ids.contains(&t);
            let flow = observe(&StepToken {
                row: r,
                token: t,
                is_eos,
                logprobs: lp.clone(),
            });
            if let Some(lp) = lp {
                logprobs[r].push(lp);
            }
            if is_eos || flow == Flow::StopRow {
                finished[r] = true;
                stopped_at_eos[r] = is_eos;
                kept[r] = Some(step + 1);
            }
            next.push(t);
        }
        for r in 0..batch {
            rows[r].push(next[r]);
            mask[r].push(1);
        }
        if finished.iter().all(|f| *f) || last {
            break;
        }
        tracing::trace!(step, batch, "decoded a token");
        if lookahead {
            chosen_ids = queued;
            continue;
        }
        let input = Tensor::from_vec(next, (batch, 1), &device)?;
        logits = forward_step(
            model,
            &input,
            &to_tensor(&mask, &host)?,
            &mut cache,
            step + 1,
        )?;
    }
    let tokens = rows
        .iter()
        .zip(&kept)
        .map(|(row, kept)| {
            let new = &row[width..];
            new[..kept.unwrap_or(new.len()).min(new.len())].to_vec()
        })
        .collect();
    Ok(GenerationOutput {
        tokens,
        stopped_at_eos,
        logprobs,
    })
}

/// One decoding step's forward pass: the new token of each row (`input`, `[batch, 1]`) after
/// the cached ones, under `mask` (every position so far, the new one included); the logits of
/// new token `new_token`, profiled as `decode.forward`.
fn forward_step(
    model: &dyn CausalLm,
    input: &Tensor,
    mask: &Tensor,
    cache: &mut crate::ops::attention::KvCache,
    new_token: usize,
) -> Result<Tensor> {
    crate::ops::profile::scope_with("decode.forward", model.device(), || {
        model
            .forward_last(input, Some(mask), Some(cache))
            .with_context(|| format!("forward pass at new token {new_token} failed"))
    })
}

#[cfg(test)]
mod tests {
    use candle_core::Device;
    use candle_nn::VarBuilder;

    use super::*;
    use crate::models::llama::Llama;
    use crate::nn::linear::LinearBuilder;

    #[test]
    fn repetition_penalty_as_transformers() {
        let mut s = vec![2.0, -2.0, 1.0, 0.5];
        apply_repetition_penalty(&mut s, &[0, 1, 1, 3], 2.0);
        assert_eq!(s, vec![1.0, -4.0, 1.0, 0.25]);
    }

    #[test]
    fn top_k_keeps_ties_and_top_p_keeps_the_best() {
        let mut s = vec![1.0, 3.0, 3.0, 2.0];
        apply_top_k(&mut s, 2);
        assert_eq!(s, vec![f32::NEG_INFINITY, 3.0, 3.0, f32::NEG_INFINITY]);
        // probs ~ [0.032, 0.087, 0.237, 0.644]: top_p 0.7 drops the two smallest (cum 0.119 <= 0.3)
        // and the third (cum 0.356 > 0.3 stays).
        let mut s = vec![0.0, 1.0, 2.0, 3.0];
        apply_top_p(&mut s, 0.7);
        assert_eq!(s, vec![f32::NEG_INFINITY, f32::NEG_INFINITY, 2.0, 3.0]);
        let mut s = vec![0.0, 1.0, 9.0];
        apply_top_p(&mut s, 0.01);
        assert_eq!(s, vec![f32::NEG_INFINITY, f32::NEG_INFINITY, 9.0]);
    }

    fn tiny_model() -> Llama {
        let cfg = crate::models::llama::tests::tiny();
        let vb = VarBuilder::from_tensors(
            crate::models::llama::tests::random_weights(&cfg, 11).unwrap(),
            DType::F32,
            &Device::Cpu,
        );
        Llama::load(vb, &cfg, &LinearBuilder::dense()).unwrap()
    }

    /// Greedy decoding of each prompt alone equals decoding them as one padded batch, and equals
    /// recomputing the full sequence without cache at every step.
    #[test]
    fn batched_cached_greedy_equals_naive() -> Result<()> {
        let model = tiny_model();
        let prompts = vec![vec![1u32, 7, 9, 30, 4], vec![1, 12], vec![1, 3, 5]];
        let cfg = GenerationConfig {
            repetition_penalty: 1.3,
            ..GenerationConfig::greedy(8, vec![], 0)
        };
        let batch = generate_ids(&model, &prompts, &cfg)?;
        for (i, p) in prompts.iter().enumerate() {
            let alone = generate_ids(&model, std::slice::from_ref(p), &cfg)?;
            assert_eq!(alone.tokens[0], batch.tokens[i], "prompt {i}");
            // Naive: full forward each step, no cache.
            let mut seq = p.clone();
            for _ in 0..8 {
                let ids = Tensor::new(seq.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
                let mut s = model
                    .forward_last(&ids, None, None)?
                    .squeeze(0)?
                    .to_vec1::<f32>()?;
                apply_repetition_penalty(&mut s, &seq, 1.3);
                seq.push(first_max(&s));
            }
            assert_eq!(seq[p.len()..], batch.tokens[i][..], "prompt {i} naive");
        }
        Ok(())
    }

    /// The lookahead (a GPU's default, forced here on the CPU) gives the plain loop's tokens and
    /// shows the observer the same tokens: with a row stopping at EOS, with the observer
    /// stopping a row, and with a single new token.
    #[test]
    fn lookahead_decodes_as_the_plain_loop() -> Result<()> {
        let model = tiny_model();
        let prompts = vec![vec![1u32, 7, 9], vec![1, 12, 40, 41], vec![1, 3]];
        let free = generate_ids(&model, &prompts, &GenerationConfig::greedy(10, vec![], 0))?;
        let eos = free.tokens[0][2];
        for cfg in [
            GenerationConfig::greedy(10, vec![], 0),
            GenerationConfig::greedy(10, vec![eos], 0),
            GenerationConfig::greedy(1, vec![], 0),
        ] {
            let stop_row_1 = |t: &StepToken| {
                if t.row == 1 && t.token == free.tokens[1][4] {
                    Flow::StopRow
                } else {
                    Flow::Continue
                }
            };
            let mut runs = Vec::new();
            for lookahead in [false, true] {
                let mut seen = Vec::new();
                let out = decode(
                    &model,
                    &prompts,
                    &cfg,
                    |t| {
                        seen.push((t.row, t.token));
                        stop_row_1(t)
                    },
                    lookahead,
                )?;
                runs.push((out, seen));
            }
            assert_eq!(runs[1], runs[0], "{cfg:?}");
        }
        Ok(())
    }

    #[test]
    fn rows_stop_at_eos_and_sampling_is_seeded() -> Result<()> {
        let model = tiny_model();
        let prompts = vec![vec![1u32, 7, 9], vec![1, 12, 40, 41]];
        let free = generate_ids(&model, &prompts, &GenerationConfig::greedy(10, vec![], 0))?;
        let eos = free.tokens[0][3];
        let stopped = generate_ids(
            &model,
            &prompts,
            &GenerationConfig::greedy(10, vec![eos], 0),
        )?;
        let cut = free.tokens[0].iter().position(|t| *t == eos).unwrap();
        assert_eq!(stopped.tokens[0], free.tokens[0][..=cut].to_vec());
        assert!(stopped.stopped_at_eos[0]);

        let cfg = GenerationConfig {
            decoding: Decoding::Sample {
                temperature: 0.8,
                top_k: Some(10),
                top_p: Some(0.9),
                seed: 42,
            },
            ..GenerationConfig::greedy(6, vec![], 0)
        };
        assert_eq!(
            generate_ids(&model, &prompts, &cfg)?,
            generate_ids(&model, &prompts, &cfg)?
        );
        // top_k 1 is greedy whatever the temperature (the reference notebook's setting).
        let cfg = GenerationConfig {
            decoding: Decoding::Sample {
                temperature: 0.1,
                top_k: Some(1),
                top_p: None,
                seed: 1,
            },
            ..GenerationConfig::greedy(10, vec![], 0)
        };
        assert_eq!(generate_ids(&model, &prompts, &cfg)?.tokens, free.tokens);
        assert!(generate_ids(&model, &[vec![]], &cfg).is_err());
        assert!(generate_ids(&model, &[vec![999]], &cfg).is_err());
        Ok(())
    }
}
