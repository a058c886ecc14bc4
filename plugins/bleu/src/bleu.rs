//! BLEU as sacrebleu 2.6 computes it (`sacrebleu/metrics/bleu.py`): segment statistics with
//! the 13a tokenizer, `compute_bleu` with `exp` smoothing, sentence scores with effective
//! order (`sentence_bleu` defaults) and the corpus score without it (`corpus_bleu` defaults).
//! Arithmetic follows sacrebleu's expressions in order, so results agree to the last bits up
//! to the platform's `exp`/`ln`.

use crate::Map;
use crate::tokenizer::{py_rstrip, py_split, tokenize_13a};

/// sacrebleu's `MAX_NGRAM_ORDER`.
pub const MAX_NGRAM_ORDER: usize = 4;

/// One segment's sufficient statistics: `[hyp_len, ref_len] + correct + total` in sacrebleu.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub hyp_len: u64,
    pub ref_len: u64,
    pub correct: [u64; MAX_NGRAM_ORDER],
    pub total: [u64; MAX_NGRAM_ORDER],
}

impl std::ops::AddAssign for Stats {
    fn add_assign(&mut self, other: Stats) {
        self.hyp_len += other.hyp_len;
        self.ref_len += other.ref_len;
        for n in 0..MAX_NGRAM_ORDER {
            self.correct[n] += other.correct[n];
            self.total[n] += other.total[n];
        }
    }
}

/// `BLEU._preprocess_segment` (no lowercasing): right-strip, then tokenize.
fn preprocess(segment: &str) -> String {
    tokenize_13a(py_rstrip(segment))
}

/// `extract_all_word_ngrams(line, 1, 4)`: n-gram counts and the token count.
fn ngrams<'t, 'a>(tokens: &'t [&'a str]) -> Map<&'t [&'a str], u64> {
    let mut counts = Map::default();
    for n in 1..=MAX_NGRAM_ORDER {
        for gram in tokens.windows(n) {
            *counts.entry(gram).or_insert(0) += 1;
        }
    }
    counts
}

/// `_extract_corpus_statistics` for one hypothesis and one reference.
pub fn segment_stats(hypothesis: &str, reference: &str) -> Stats {
    let hyp = preprocess(hypothesis);
    let reference = preprocess(reference);
    let hyp_tokens: Vec<&str> = py_split(&hyp).collect();
    let ref_tokens: Vec<&str> = py_split(&reference).collect();
    let ref_ngrams = ngrams(&ref_tokens);

    let mut stats = Stats {
        hyp_len: hyp_tokens.len() as u64,
        // With one reference, the closest reference length is its length.
        ref_len: ref_tokens.len() as u64,
        ..Stats::default()
    };
    for (gram, count) in ngrams(&hyp_tokens) {
        let n = gram.len() - 1;
        stats.total[n] += count;
        if let Some(&ref_count) = ref_ngrams.get(gram) {
            stats.correct[n] += count.min(ref_count);
        }
    }
    stats
}

/// `sacrebleu.utils.my_log`: `log`, floored at -9999999999 for zero.
fn my_log(x: f64) -> f64 {
    if x == 0.0 { -9_999_999_999.0 } else { x.ln() }
}

/// `BLEU.compute_bleu` with `smooth_method='exp'`, on 0-100 scale.
pub fn compute_bleu(stats: &Stats, effective_order: bool) -> f64 {
    let (sys_len, ref_len) = (stats.hyp_len, stats.ref_len);
    let mut bp = 1.0;
    if sys_len < ref_len {
        bp = if sys_len > 0 {
            (1.0 - ref_len as f64 / sys_len as f64).exp()
        } else {
            0.0
        };
    }

    // Early stop if there are no matches (sacrebleu #141).
    if stats.correct.iter().all(|&c| c == 0) {
        return 0.0;
    }

    let mut precisions = [0.0f64; MAX_NGRAM_ORDER];
    let mut smooth_mteval = 1.0f64;
    let mut eff_order = MAX_NGRAM_ORDER;
    for n in 1..=MAX_NGRAM_ORDER {
        let (correct, total) = (stats.correct[n - 1], stats.total[n - 1]);
        if total == 0 {
            break;
        }
        if effective_order {
            eff_order = n;
        }
        precisions[n - 1] = if correct == 0 {
            smooth_mteval *= 2.0;
            100.0 / (smooth_mteval * total as f64)
        } else {
            100.0 * correct as f64 / total as f64
        };
    }

    let log_sum = precisions[..eff_order]
        .iter()
        .fold(0.0, |sum, &p| sum + my_log(p));
    bp * (log_sum / eff_order as f64).exp()
}

/// `sacrebleu.sentence_bleu(hypothesis, [reference]).score`.
pub fn sentence_bleu(hypothesis: &str, reference: &str) -> f64 {
    compute_bleu(&segment_stats(hypothesis, reference), true)
}

/// `sacrebleu.corpus_bleu(hypotheses, [references]).score` over aligned pairs.
pub fn corpus_bleu<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> f64 {
    let mut stats = Stats::default();
    for (hypothesis, reference) in pairs {
        stats += segment_stats(hypothesis, reference);
    }
    compute_bleu(&stats, false)
}

#[cfg(test)]
mod tests {
    use crate::bleu::{corpus_bleu, sentence_bleu};

    #[test]
    fn identical_sentence_scores_100() {
        let s = "The cat sat on the mat.";
        assert!((sentence_bleu(s, s) - 100.0).abs() < 1e-9);
    }

    #[test]
    fn empty_sides_score_zero() {
        assert_eq!(sentence_bleu("", ""), 0.0);
        assert_eq!(sentence_bleu("a b c", ""), 0.0);
        assert_eq!(sentence_bleu("", "a b c"), 0.0);
        assert_eq!(corpus_bleu([("", "")]), 0.0);
        assert_eq!(corpus_bleu(std::iter::empty()), 0.0);
    }
}
