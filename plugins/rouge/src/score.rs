//! ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum as `rouge_score.rouge_scorer.RougeScorer.score`
//! computes them (rouge-score 0.1.2), operation for operation, so that values agree to the
//! last bits rather than merely to a tolerance.

use crate::Map;
use crate::lcs::{lcs_indices, lcs_length};
use crate::tokenize::Tokenizer;

/// rouge-score's `Score` tuple.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Score {
    pub precision: f64,
    pub recall: f64,
    pub fmeasure: f64,
}

impl Score {
    const ZERO: Score = Score {
        precision: 0.0,
        recall: 0.0,
        fmeasure: 0.0,
    };

    fn new(precision: f64, recall: f64) -> Score {
        Score {
            precision,
            recall,
            fmeasure: fmeasure(precision, recall),
        }
    }
}

/// The four scores of one (target, prediction) pair.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RougeScores {
    pub rouge1: Score,
    pub rouge2: Score,
    pub rouge_l: Score,
    pub rouge_lsum: Score,
}

/// `rouge_score.scoring.fmeasure`, with its evaluation order.
fn fmeasure(precision: f64, recall: f64) -> f64 {
    if precision + recall > 0.0 {
        2.0 * precision * recall / (precision + recall)
    } else {
        0.0
    }
}

/// The most token pairs (`target tokens x prediction tokens`) one sample may need for its
/// LCS scores. The bit-parallel LCS does about 64 pairs per word operation; this bound keeps
/// a sample under a second or so, so that one degenerate output (a model looping for a
/// megabyte) fails alone instead of running into the host's deadline with the whole batch.
pub const MAX_TOKEN_PAIRS: u64 = 4_000_000_000;

/// Why a sample could not be scored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScoreError {
    TooLong {
        target_tokens: usize,
        prediction_tokens: usize,
    },
}

impl std::fmt::Display for ScoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ScoreError::TooLong {
                target_tokens,
                prediction_tokens,
            } => write!(
                f,
                "texts too long for ROUGE-L: {target_tokens} reference tokens x {prediction_tokens} \
                 prediction tokens exceeds the limit of {MAX_TOKEN_PAIRS} token pairs"
            ),
        }
    }
}

impl std::error::Error for ScoreError {}

/// Scores pairs one after another, sharing the tokenizer (its stem cache and token ids) and
/// scratch buffers between them: a batch of summaries repeats most of its words.
pub struct Scorer {
    tokenizer: Tokenizer,
    target: Text,
    prediction: Text,
    /// Token id → id local to the pair being scored (dense from 0, as the LCS tables want).
    local: Map<u32, u32>,
    /// n-gram keys of the target and the prediction.
    target_grams: Vec<u64>,
    prediction_grams: Vec<u64>,
    /// Per local id: its count in the reference and in the candidate (rougeLsum).
    counts_reference: Vec<u32>,
    counts_candidate: Vec<u32>,
    in_union: Vec<bool>,
}

/// A text's tokens, and where each of its non-empty lines (rougeLsum's sentences) starts.
#[derive(Default)]
struct Text {
    tokens: Vec<u32>,
    /// `tokens[starts[i]..starts[i + 1]]` is line `i`; the last entry is `tokens.len()`.
    starts: Vec<usize>,
}

impl Text {
    /// Tokenizes each non-empty line of `text` (rouge-score drops empty lines before
    /// tokenizing and keeps lines that tokenize to nothing). A newline separates tokens
    /// anyway, so the whole text's tokens are its lines' tokens.
    fn read(&mut self, text: &str, tokenizer: &mut Tokenizer) {
        self.tokens.clear();
        self.starts.clear();
        for line in text.split('\n').filter(|s| !s.is_empty()) {
            self.starts.push(self.tokens.len());
            tokenizer.tokenize_ids(line, &mut self.tokens);
        }
        self.starts.push(self.tokens.len());
    }

    fn sentences(&self) -> impl Iterator<Item = &[u32]> {
        self.starts.windows(2).map(|w| &self.tokens[w[0]..w[1]])
    }

    fn sentence_count(&self) -> usize {
        self.starts.len() - 1
    }
}

impl Scorer {
    pub fn new(use_stemmer: bool) -> Self {
        Scorer {
            tokenizer: Tokenizer::new(use_stemmer),
            target: Text::default(),
            prediction: Text::default(),
            local: Map::default(),
            target_grams: Vec::new(),
            prediction_grams: Vec::new(),
            counts_reference: Vec::new(),
            counts_candidate: Vec::new(),
            in_union: Vec::new(),
        }
    }

    /// `RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer).score(target, prediction)`.
    pub fn score(&mut self, target: &str, prediction: &str) -> Result<RougeScores, ScoreError> {
        self.target.read(target, &mut self.tokenizer);
        self.prediction.read(prediction, &mut self.tokenizer);
        let (m, n) = (self.target.tokens.len(), self.prediction.tokens.len());

        // Summary-level LCS pairs every reference sentence with every candidate sentence: the
        // same number of token pairs as the plain LCS.
        if m as u64 * n as u64 > MAX_TOKEN_PAIRS {
            return Err(ScoreError::TooLong {
                target_tokens: m,
                prediction_tokens: n,
            });
        }

        // Renumber the pair's tokens densely from 0: the LCS tables and the rougeLsum counts
        // are indexed by id.
        self.local.clear();
        for t in self
            .target
            .tokens
            .iter_mut()
            .chain(self.prediction.tokens.iter_mut())
        {
            let next = self.local.len() as u32;
            *t = *self.local.entry(*t).or_insert(next);
        }

        let (target, prediction) = (&self.target.tokens, &self.prediction.tokens);
        Ok(RougeScores {
            rouge1: score_ngrams(
                target,
                prediction,
                1,
                &mut self.target_grams,
                &mut self.prediction_grams,
            ),
            rouge2: score_ngrams(
                target,
                prediction,
                2,
                &mut self.target_grams,
                &mut self.prediction_grams,
            ),
            rouge_l: score_lcs(target, prediction),
            rouge_lsum: self.summary_level_lcs(),
        })
    }

    /// `_summary_level_lcs`: for each reference sentence, the union of its LCS with every
    /// candidate sentence; each token counts at most as often as it occurs on both sides.
    fn summary_level_lcs(&mut self) -> Score {
        let (reference, candidate) = (&self.target, &self.prediction);
        if reference.sentence_count() == 0 || candidate.sentence_count() == 0 {
            return Score::ZERO;
        }
        let (m, n) = (reference.tokens.len(), candidate.tokens.len());
        if n == 0 || m == 0 {
            return Score::ZERO;
        }

        let ids = self.local.len();
        let counts_reference = &mut self.counts_reference;
        let counts_candidate = &mut self.counts_candidate;
        counts_reference.clear();
        counts_reference.resize(ids, 0);
        counts_candidate.clear();
        counts_candidate.resize(ids, 0);
        for &t in &reference.tokens {
            counts_reference[t as usize] += 1;
        }
        for &t in &candidate.tokens {
            counts_candidate[t as usize] += 1;
        }

        let mut hits = 0usize;
        for r in reference.sentences() {
            // `_union_lcs`: the tokens of `r` at the sorted union of its LCS indices against
            // each candidate sentence.
            let in_union = &mut self.in_union;
            in_union.clear();
            in_union.resize(r.len(), false);
            for c in candidate.sentences() {
                for i in lcs_indices(r, c) {
                    in_union[i] = true;
                }
            }
            for (&t, _) in r.iter().zip(in_union.iter()).filter(|(_, hit)| **hit) {
                // rouge-score reads Counters, where a token used up on either side counts 0.
                let (c, rc) = (
                    &mut counts_candidate[t as usize],
                    &mut counts_reference[t as usize],
                );
                if *c > 0 && *rc > 0 {
                    hits += 1;
                    *c -= 1;
                    *rc -= 1;
                }
            }
        }
        Score::new(hits as f64 / n as f64, hits as f64 / m as f64)
    }
}

/// `RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer).score(target, prediction)`.
pub fn score(target: &str, prediction: &str, use_stemmer: bool) -> Result<RougeScores, ScoreError> {
    Scorer::new(use_stemmer).score(target, prediction)
}

/// The `n`-grams (`n` is 1 or 2) of `tokens` as sortable keys, into `keys`.
fn ngram_keys(tokens: &[u32], n: usize, keys: &mut Vec<u64>) {
    keys.clear();
    match n {
        1 => keys.extend(tokens.iter().map(|&t| t as u64)),
        2 => keys.extend(tokens.windows(2).map(|w| (w[0] as u64) << 32 | w[1] as u64)),
        _ => unreachable!("rouge-score's rouge1 and rouge2 only"),
    }
    keys.sort_unstable();
}

/// `_score_ngrams`: clipped n-gram overlap; empty sides count as 1 in the denominators.
/// rouge-score counts n-grams in two `Counter`s and sums `min` over the target's; here both
/// multisets are sorted key lists, merged.
fn score_ngrams(
    target: &[u32],
    prediction: &[u32],
    n: usize,
    target_keys: &mut Vec<u64>,
    prediction_keys: &mut Vec<u64>,
) -> Score {
    ngram_keys(target, n, target_keys);
    ngram_keys(prediction, n, prediction_keys);
    let (t, p) = (&target_keys[..], &prediction_keys[..]);
    let run = |keys: &[u64], start: usize| {
        keys[start..]
            .iter()
            .take_while(|&&k| k == keys[start])
            .count()
    };
    let (mut i, mut j, mut intersection) = (0, 0, 0usize);
    while i < t.len() && j < p.len() {
        match t[i].cmp(&p[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                let (tc, pc) = (run(t, i), run(p, j));
                intersection += tc.min(pc);
                i += tc;
                j += pc;
            }
        }
    }
    Score::new(
        intersection as f64 / p.len().max(1) as f64,
        intersection as f64 / t.len().max(1) as f64,
    )
}

/// `_score_lcs`.
fn score_lcs(target: &[u32], prediction: &[u32]) -> Score {
    if target.is_empty() || prediction.is_empty() {
        return Score::ZERO;
    }
    let lcs = lcs_length(target, prediction) as f64;
    Score::new(lcs / prediction.len() as f64, lcs / target.len() as f64)
}

#[cfg(test)]
mod tests {
    use crate::score::{MAX_TOKEN_PAIRS, ScoreError, score};

    #[test]
    fn readme_example() {
        // rouge-score's docstring example; values from rouge-score 0.1.2 (no stemmer).
        let s = score(
            "The quick brown fox jumps over the lazy dog",
            "The quick brown dog jumps on the log.",
            false,
        )
        .unwrap();
        assert_eq!(s.rouge1.precision, 0.75);
        assert_eq!(s.rouge1.recall, 6.0 / 9.0);
        assert_eq!(
            s.rouge_l.fmeasure,
            2.0 * 0.625 * (5.0 / 9.0) / (0.625 + 5.0 / 9.0)
        );
    }

    #[test]
    fn empty_texts_score_zero() {
        for (t, p) in [
            ("", ""),
            ("a b", ""),
            ("", "a b"),
            ("!!!", "a"),
            ("\n\n", "\n"),
        ] {
            let s = score(t, p, true).unwrap();
            for v in [s.rouge1, s.rouge2, s.rouge_l, s.rouge_lsum] {
                assert_eq!(v.fmeasure, 0.0, "{t:?} {p:?}");
            }
        }
    }

    #[test]
    fn too_many_token_pairs_is_an_error() {
        let long = "a ".repeat(70_000);
        const { assert!(70_000u64 * 70_000 > MAX_TOKEN_PAIRS) };
        assert_eq!(
            score(&long, &long, true),
            Err(ScoreError::TooLong {
                target_tokens: 70_000,
                prediction_tokens: 70_000
            })
        );
        assert!(score(&long, "a b", true).is_ok());
    }
}
