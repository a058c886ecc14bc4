//! BLEU as sacrebleu 2.6 computes it (`sacrebleu/metrics/bleu.py`): segment statistics with
//! the 13a tokenizer, `compute_bleu` with `exp` smoothing, sentence scores with effective
//! order (`sentence_bleu` defaults) and the corpus score without it (`corpus_bleu` defaults).
//! Arithmetic follows sacrebleu's expressions in order, so results agree to the last bits up
//! to the platform's `exp`/`ln`.

use crate::Map;
use crate::tokenizer::{Tokenizer13a, py_rstrip, py_split};

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

/// Computes segment statistics one pair after another, sharing token ids and scratch
/// buffers between them.
#[derive(Default)]
pub struct StatsCounter {
    /// Token → id, over every segment seen.
    ids: Map<Box<str>, u32>,
    tokenizer: Tokenizer13a,
    hyp: Vec<u32>,
    references: Vec<Vec<u32>>,
    /// The hypothesis's distinct n-grams of one order with their counts.
    runs: Vec<(u128, usize)>,
    /// Per distinct hypothesis n-gram, its best clipped count over the references.
    best: Vec<usize>,
    hyp_grams: Vec<u128>,
    ref_grams: Vec<u128>,
}

impl StatsCounter {
    /// `_extract_corpus_statistics` for one hypothesis and one reference.
    pub fn segment_stats(&mut self, hypothesis: &str, reference: &str) -> Stats {
        self.segment_stats_multi(hypothesis, &[reference])
    }

    /// `_extract_corpus_statistics` for one hypothesis and its references
    /// (`_extract_reference_info` + `_compute_segment_statistics`): each n-gram's reference
    /// count is its highest count in any one reference, and the reference length is the one
    /// closest to the hypothesis length, the shorter on ties.
    pub fn segment_stats_multi<R: AsRef<str>>(
        &mut self,
        hypothesis: &str,
        references: &[R],
    ) -> Stats {
        let mut hyp = std::mem::take(&mut self.hyp);
        let mut ref_store = std::mem::take(&mut self.references);
        let mut runs = std::mem::take(&mut self.runs);
        let mut best = std::mem::take(&mut self.best);
        self.token_ids(hypothesis, &mut hyp);
        if ref_store.len() < references.len() {
            ref_store.resize_with(references.len(), Vec::new);
        }
        for (ids, reference) in ref_store.iter_mut().zip(references) {
            self.token_ids(reference.as_ref(), ids);
        }
        let ref_ids = &ref_store[..references.len()];

        let mut stats = Stats {
            hyp_len: hyp.len() as u64,
            ref_len: closest_ref_len(hyp.len(), ref_ids.iter().map(Vec::len)) as u64,
            ..Stats::default()
        };
        // sacrebleu counts the n-grams of each side in a Counter and, for each hypothesis
        // n-gram, adds its count to `total` and its count clipped by the references' (the
        // highest count in one reference) to `correct`. Here each side's n-grams of one order
        // are a sorted key list; min(h, max_r c_r) = max_r min(h, c_r), so each reference is
        // merged against the hypothesis's distinct n-grams and the best clip kept.
        let count_run = |keys: &[u128], start: usize| {
            keys[start..]
                .iter()
                .take_while(|&&k| k == keys[start])
                .count()
        };
        for n in 1..=MAX_NGRAM_ORDER {
            ngram_keys(&hyp, n, &mut self.hyp_grams);
            let h = &self.hyp_grams[..];
            stats.total[n - 1] = h.len() as u64;
            runs.clear();
            let mut i = 0;
            while i < h.len() {
                let c = count_run(h, i);
                runs.push((h[i], c));
                i += c;
            }
            best.clear();
            best.resize(runs.len(), 0);
            for ids in ref_ids {
                ngram_keys(ids, n, &mut self.ref_grams);
                let r = &self.ref_grams[..];
                let (mut i, mut j) = (0, 0);
                while i < runs.len() && j < r.len() {
                    match runs[i].0.cmp(&r[j]) {
                        std::cmp::Ordering::Less => i += 1,
                        std::cmp::Ordering::Greater => j += 1,
                        std::cmp::Ordering::Equal => {
                            let rc = count_run(r, j);
                            best[i] = best[i].max(runs[i].1.min(rc));
                            i += 1;
                            j += rc;
                        }
                    }
                }
            }
            stats.correct[n - 1] = best.iter().map(|&c| c as u64).sum();
        }
        self.hyp = hyp;
        self.references = ref_store;
        self.runs = runs;
        self.best = best;
        stats
    }

    /// The ids of the tokens of a segment after `BLEU._preprocess_segment` (right-strip, then
    /// tokenize; no lowercasing) and `split()`, into `out`.
    fn token_ids(&mut self, segment: &str, out: &mut Vec<u32>) {
        out.clear();
        for token in py_split(self.tokenizer.tokenize(py_rstrip(segment))) {
            let id = match self.ids.get(token) {
                Some(&id) => id,
                None => {
                    let id = self.ids.len() as u32;
                    self.ids.insert(token.into(), id);
                    id
                }
            };
            out.push(id);
        }
    }
}

/// The `n`-grams of `tokens` as sortable keys, into `keys`: the ids, each plus one, in 32-bit
/// fields (no text has 2^32 - 1 distinct tokens).
fn ngram_keys(tokens: &[u32], n: usize, keys: &mut Vec<u128>) {
    keys.clear();
    keys.extend(tokens.windows(n).map(|gram| {
        gram.iter()
            .fold(0u128, |key, &id| key << 32 | (id as u128 + 1))
    }));
    keys.sort_unstable();
}

/// sacrebleu's `_get_closest_ref_len`: the reference length closest to the hypothesis
/// length, the shorter of two equally close; -1 (here 0) without references.
fn closest_ref_len(hyp_len: usize, ref_lens: impl Iterator<Item = usize>) -> usize {
    let mut closest: Option<(usize, usize)> = None;
    for len in ref_lens {
        let diff = hyp_len.abs_diff(len);
        closest = match closest {
            Some((d, l)) if d < diff || (d == diff && l <= len) => Some((d, l)),
            _ => Some((diff, len)),
        };
    }
    closest.map_or(0, |(_, len)| len)
}

/// `_extract_corpus_statistics` for one hypothesis and one reference.
pub fn segment_stats(hypothesis: &str, reference: &str) -> Stats {
    StatsCounter::default().segment_stats(hypothesis, reference)
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

/// `sacrebleu.sentence_bleu(hypothesis, references).score`.
pub fn sentence_bleu_multi<R: AsRef<str>>(hypothesis: &str, references: &[R]) -> f64 {
    compute_bleu(
        &StatsCounter::default().segment_stats_multi(hypothesis, references),
        true,
    )
}

/// `sacrebleu.corpus_bleu(hypotheses, [references]).score` over aligned pairs.
pub fn corpus_bleu<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> f64 {
    let mut counter = StatsCounter::default();
    let mut stats = Stats::default();
    for (hypothesis, reference) in pairs {
        stats += counter.segment_stats(hypothesis, reference);
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
