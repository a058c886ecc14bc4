//! The `bleu` metric plugin: per-sample BLEU exactly as `sacrebleu.sentence_bleu(prediction,
//! [reference])` (13a tokenizer, `exp` smoothing, effective order) and, in the batch's
//! `corpus`, `sacrebleu.corpus_bleu(predictions, [references])` over the batch. Scores are on
//! sacrebleu's 0-100 scale. It has no settings.

pub mod bleu;
pub mod tokenizer;

use adapterlab_sdk::Manifest;
use adapterlab_sdk::metric::{BatchResult, Metric, MetricInfo, Sample, SampleResult, ScoreSpec};

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
        }
    }

    fn score_batch(samples: Vec<Sample>) -> Result<BatchResult, String> {
        Ok(score_samples(&samples))
    }
}

/// Scores a batch: `bleu` per sample, and corpus `bleu` when the batch is not empty. Each
/// pair's statistics are computed once and serve both.
pub fn score_samples(samples: &[Sample]) -> BatchResult {
    let mut counter = bleu::StatsCounter::default();
    let stats: Vec<bleu::Stats> = samples
        .iter()
        .map(|s| counter.segment_stats(&s.prediction, &s.reference))
        .collect();
    let per_sample = stats
        .iter()
        .map(|s| SampleResult::Scores(vec![("bleu".to_string(), bleu::compute_bleu(s, true))]))
        .collect();
    // sacrebleu cannot score an empty corpus (it indexes the first hypothesis); report nothing.
    let corpus = if samples.is_empty() {
        Vec::new()
    } else {
        // `corpus_bleu`: the sum of the segments' statistics.
        let mut total = bleu::Stats::default();
        for s in &stats {
            total += *s;
        }
        vec![("bleu".to_string(), bleu::compute_bleu(&total, false))]
    };
    BatchResult {
        samples: per_sample,
        corpus,
    }
}

adapterlab_sdk::export_metric!(Bleu);

#[cfg(test)]
mod tests {
    use adapterlab_sdk::metric::{Sample, SampleResult};

    use crate::score_samples;

    fn sample(prediction: &str, reference: &str) -> Sample {
        Sample {
            id: "s".into(),
            prediction: prediction.into(),
            reference: reference.into(),
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
        assert_eq!(result.corpus.len(), 1);
        assert!(score_samples(&[]).corpus.is_empty());
    }
}
