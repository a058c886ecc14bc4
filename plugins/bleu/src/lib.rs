//! The `bleu` metric plugin: per-sample BLEU exactly as `sacrebleu.sentence_bleu(prediction,
//! references)` (13a tokenizer, `exp` smoothing, effective order) and the corpus `bleu` as
//! `sacrebleu.corpus_bleu(predictions, reference_streams)` over the whole run: each batch
//! returns its summed segment statistics (lengths and n-gram counts, as integer counts), the
//! host adds them over every batch and `finalize` computes BLEU once, so the corpus score is
//! the same however the samples were split. Several references follow sacrebleu: clipped
//! counts are the highest in any one reference, the brevity penalty uses the closest
//! reference length. Scores are on sacrebleu's 0-100 scale. It has no settings.

pub mod bleu;
pub mod tokenizer;

use adapterlab_sdk::Manifest;
use adapterlab_sdk::metric::{
    self, BatchResult, Metric, MetricInfo, Sample, SampleResult, ScoreSpec, Statistic,
};

/// Hash maps with a fixed-key hasher. std's default `RandomState` seeds itself from the
/// system, which on wasm32-wasip2 makes the component import `wasi:random/insecure-seed`; a
/// metric needs no randomness, and its texts are no hash-flooding threat.
pub(crate) type Map<K, V> = adapterlab_sdk::hash::FastMap<K, V>;

pub struct Bleu;

impl Metric for Bleu {
    fn info() -> MetricInfo {
        MetricInfo {
            manifest: Manifest::new(
                "bleu",
                env!("CARGO_PKG_VERSION"),
                "Sentence and corpus BLEU (0-100), identical to sacrebleu 2.6 with its defaults",
            ),
            scores: vec![ScoreSpec::new(
                "bleu",
                "BLEU, 13a tokenizer, exp smoothing; per sample with effective order, corpus without",
                0.0,
                100.0,
                true,
            )],
            independent_samples: true,
        }
    }

    fn score_batch(samples: Vec<Sample>) -> Result<BatchResult, String> {
        Ok(score_samples(&samples))
    }

    fn finalize(statistics: Vec<(String, Statistic)>) -> Result<Vec<(String, f64)>, String> {
        finalize(&statistics)
    }
}

/// The statistics' names: sacrebleu's `[hyp_len, ref_len] + correct + total`.
const STATISTICS: [&str; 2 + 2 * bleu::MAX_NGRAM_ORDER] = [
    "hyp_len",
    "ref_len",
    "correct_1",
    "correct_2",
    "correct_3",
    "correct_4",
    "total_1",
    "total_2",
    "total_3",
    "total_4",
];

fn to_statistics(stats: &bleu::Stats) -> Vec<(String, Statistic)> {
    let values = [stats.hyp_len, stats.ref_len]
        .into_iter()
        .chain(stats.correct)
        .chain(stats.total);
    STATISTICS
        .iter()
        .zip(values)
        .map(|(name, v)| (name.to_string(), Statistic::Count(v)))
        .collect()
}

/// Corpus BLEU from the run's summed statistics (`corpus_bleu`: no effective order).
pub fn finalize(statistics: &[(String, Statistic)]) -> Result<Vec<(String, f64)>, String> {
    let mut values = [0u64; STATISTICS.len()];
    for (value, name) in values.iter_mut().zip(STATISTICS) {
        *value = metric::count(statistics, name)?;
    }
    let mut stats = bleu::Stats {
        hyp_len: values[0],
        ref_len: values[1],
        ..bleu::Stats::default()
    };
    stats
        .correct
        .copy_from_slice(&values[2..2 + bleu::MAX_NGRAM_ORDER]);
    stats
        .total
        .copy_from_slice(&values[2 + bleu::MAX_NGRAM_ORDER..]);
    Ok(vec![(
        "bleu".to_string(),
        bleu::compute_bleu(&stats, false),
    )])
}

/// Scores a batch: `bleu` per sample, and the batch's summed segment statistics (none for
/// an empty batch: sacrebleu cannot score an empty corpus). Each sample's statistics are
/// computed once and serve both.
pub fn score_samples(samples: &[Sample]) -> BatchResult {
    let mut counter = bleu::StatsCounter::default();
    let stats: Vec<bleu::Stats> = samples
        .iter()
        .map(|s| counter.segment_stats_multi(&s.prediction, &s.references))
        .collect();
    let per_sample = stats
        .iter()
        .map(|s| SampleResult::Scores(vec![("bleu".to_string(), bleu::compute_bleu(s, true))]))
        .collect();
    let statistics = if samples.is_empty() {
        Vec::new()
    } else {
        let mut total = bleu::Stats::default();
        for s in &stats {
            total += *s;
        }
        to_statistics(&total)
    };
    BatchResult {
        samples: per_sample,
        statistics,
    }
}

adapterlab_sdk::export_metric!(Bleu);

#[cfg(test)]
mod tests {
    use adapterlab_sdk::metric::{Sample, SampleResult};

    use adapterlab_sdk::metric::Statistic;

    use crate::{finalize, score_samples};

    fn sample(prediction: &str, reference: &str) -> Sample {
        Sample {
            id: "s".into(),
            prediction: prediction.into(),
            references: vec![reference.into()],
            source: None,
        }
    }

    #[test]
    fn scores_every_sample_and_the_corpus() {
        let big = "token ".repeat(170_000);
        let samples = [
            sample("", ""),
            sample("a cat", "the cat"),
            sample(&big, "token token"),
            sample("😀\u{0}&amp;", "\u{FFFF}"),
        ];
        let result = score_samples(&samples);
        assert_eq!(result.samples.len(), samples.len());
        for r in &result.samples {
            let SampleResult::Scores(scores) = r else {
                panic!("expected scores, got {r:?}")
            };
            assert_eq!(scores.len(), 1);
            assert!((0.0..=100.0).contains(&scores[0].1), "{scores:?}");
        }
        assert_eq!(result.statistics.len(), 10);
        assert!(score_samples(&[]).statistics.is_empty());
    }

    #[test]
    fn split_statistics_sum_to_the_whole_batch_bit_for_bit() {
        let texts = [
            ("the cat sat on the mat", "a cat sat on a mat"),
            ("it is raining", "it rains today"),
            ("hello there general kenobi", "hello there"),
            ("", "nothing"),
            ("one two three four five", "one two three four five"),
        ];
        let samples: Vec<Sample> = texts.iter().map(|(p, r)| sample(p, r)).collect();
        let whole = finalize(&score_samples(&samples).statistics).unwrap();
        for cut in 1..samples.len() {
            let (a, b) = samples.split_at(cut);
            let mut summed = score_samples(a).statistics;
            for ((_, x), (_, y)) in summed.iter_mut().zip(score_samples(b).statistics) {
                match (x, y) {
                    (Statistic::Count(x), Statistic::Count(y)) => *x += y,
                    _ => panic!("bleu's statistics are counts"),
                }
            }
            assert_eq!(finalize(&summed).unwrap(), whole, "cut at {cut}");
        }
    }
}
