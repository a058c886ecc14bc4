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

/// Maps token strings to small ids shared by both texts, so that n-grams and LCS compare ids.
#[derive(Default)]
struct Interner {
    ids: Map<String, u32>,
}

impl Interner {
    fn intern(&mut self, tokens: Vec<String>) -> Vec<u32> {
        tokens
            .into_iter()
            .map(|t| {
                let next = self.ids.len() as u32;
                *self.ids.entry(t).or_insert(next)
            })
            .collect()
    }
}

/// The tokens of each non-empty line of `text` (rougeLsum's sentences: rouge-score drops
/// empty lines before tokenizing and keeps lines that tokenize to nothing).
fn sentences(text: &str, tokenizer: &mut Tokenizer, interner: &mut Interner) -> Vec<Vec<u32>> {
    text.split('\n')
        .filter(|s| !s.is_empty())
        .map(|s| interner.intern(tokenizer.tokenize(s)))
        .collect()
}

/// `RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer).score(target, prediction)`.
pub fn score(target: &str, prediction: &str, use_stemmer: bool) -> Result<RougeScores, ScoreError> {
    let mut tokenizer = Tokenizer::new(use_stemmer);
    let mut interner = Interner::default();
    let target_sentences = sentences(target, &mut tokenizer, &mut interner);
    let prediction_sentences = sentences(prediction, &mut tokenizer, &mut interner);
    // A newline separates tokens anyway, so the whole text's tokens are its lines' tokens.
    let target_tokens = target_sentences.concat();
    let prediction_tokens = prediction_sentences.concat();

    // Summary-level LCS pairs every reference sentence with every candidate sentence: the
    // same number of token pairs as the plain LCS.
    if target_tokens.len() as u64 * prediction_tokens.len() as u64 > MAX_TOKEN_PAIRS {
        return Err(ScoreError::TooLong {
            target_tokens: target_tokens.len(),
            prediction_tokens: prediction_tokens.len(),
        });
    }

    Ok(RougeScores {
        rouge1: score_ngrams(&target_tokens, &prediction_tokens, 1),
        rouge2: score_ngrams(&target_tokens, &prediction_tokens, 2),
        rouge_l: score_lcs(&target_tokens, &prediction_tokens),
        rouge_lsum: summary_level_lcs(&target_sentences, &prediction_sentences),
    })
}

/// `_create_ngrams`: a multiset of the `n`-grams of `tokens`.
fn ngrams(tokens: &[u32], n: usize) -> Map<&[u32], usize> {
    let mut counts = Map::default();
    for gram in tokens.windows(n) {
        *counts.entry(gram).or_insert(0) += 1;
    }
    counts
}

/// `_score_ngrams`: clipped n-gram overlap; empty sides count as 1 in the denominators.
fn score_ngrams(target: &[u32], prediction: &[u32], n: usize) -> Score {
    let target_ngrams = ngrams(target, n);
    let prediction_ngrams = ngrams(prediction, n);
    let intersection: usize = target_ngrams
        .iter()
        .map(|(gram, &count)| count.min(prediction_ngrams.get(gram).copied().unwrap_or(0)))
        .sum();
    let target_count: usize = target_ngrams.values().sum();
    let prediction_count: usize = prediction_ngrams.values().sum();
    Score::new(
        intersection as f64 / prediction_count.max(1) as f64,
        intersection as f64 / target_count.max(1) as f64,
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

/// `_summary_level_lcs`: for each reference sentence, the union of its LCS with every
/// candidate sentence; each token counts at most as often as it occurs on both sides.
fn summary_level_lcs(reference: &[Vec<u32>], candidate: &[Vec<u32>]) -> Score {
    if reference.is_empty() || candidate.is_empty() {
        return Score::ZERO;
    }
    let m: usize = reference.iter().map(Vec::len).sum();
    let n: usize = candidate.iter().map(Vec::len).sum();
    if n == 0 || m == 0 {
        return Score::ZERO;
    }

    let mut counts_reference: Map<u32, usize> = Map::default();
    let mut counts_candidate: Map<u32, usize> = Map::default();
    for &t in reference.iter().flatten() {
        *counts_reference.entry(t).or_insert(0) += 1;
    }
    for &t in candidate.iter().flatten() {
        *counts_candidate.entry(t).or_insert(0) += 1;
    }

    let mut hits = 0usize;
    for r in reference {
        for t in union_lcs(r, candidate) {
            // Both counters hold every token of the union (it comes from `r`), but rouge-score
            // reads a Counter, where a missing key is 0; mirror that.
            let (Some(c), Some(rc)) = (counts_candidate.get_mut(&t), counts_reference.get_mut(&t))
            else {
                continue;
            };
            if *c > 0 && *rc > 0 {
                hits += 1;
                *c -= 1;
                *rc -= 1;
            }
        }
    }
    Score::new(hits as f64 / n as f64, hits as f64 / m as f64)
}

/// `_union_lcs`: the tokens of `reference` at the sorted union of its LCS indices against
/// each candidate sentence.
fn union_lcs(reference: &[u32], candidates: &[Vec<u32>]) -> Vec<u32> {
    let mut in_union = vec![false; reference.len()];
    for c in candidates {
        for i in lcs_indices(reference, c) {
            in_union[i] = true;
        }
    }
    reference
        .iter()
        .zip(in_union)
        .filter(|(_, hit)| *hit)
        .map(|(&t, _)| t)
        .collect()
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
