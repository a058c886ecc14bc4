//! The `rouge` metric plugin: ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum F-measures, identical
//! to Google's `rouge-score` 0.1.2 with its default tokenizer and (by default) NLTK's Porter
//! stemmer.
//!
//! Several references score as rouge-score's `score_multi`: each ROUGE type keeps the score
//! of the reference with the highest F-measure.
//!
//! Setting: `use_stemmer` (default `true`), as `RougeScorer(..., use_stemmer=...)`.
//! `rougeLsum` splits both texts into sentences on `\n`, as rouge-score does; it does not
//! split sentences itself.

pub mod lcs;
pub mod porter;
pub mod score;
pub mod tokenize;

use adapterlab_sdk::Manifest;
use adapterlab_sdk::metric::{BatchResult, Metric, MetricInfo, Sample, SampleResult, ScoreSpec};

/// Hash maps with a fixed-key hasher. std's default `RandomState` seeds itself from the
/// system, which on wasm32-wasip2 makes the component import `wasi:random/insecure-seed`; a
/// metric needs no randomness, and its texts are no hash-flooding threat.
pub(crate) type Map<K, V> = adapterlab_sdk::hash::FastMap<K, V>;

/// The score names, in the order every sample reports them.
pub const SCORE_NAMES: [&str; 4] = ["rouge1", "rouge2", "rougeL", "rougeLsum"];

pub struct Rouge;

impl Metric for Rouge {
    fn info() -> MetricInfo {
        let spec =
            |name: &str, description: &str| ScoreSpec::new(name, description, 0.0, 1.0, true);
        MetricInfo {
            manifest: Manifest::new(
                "rouge",
                env!("CARGO_PKG_VERSION"),
                "ROUGE-1/2/L/Lsum F-measure, identical to rouge-score 0.1.2",
            ),
            scores: vec![
                spec("rouge1", "ROUGE-1 F-measure: unigram overlap"),
                spec("rouge2", "ROUGE-2 F-measure: bigram overlap"),
                spec("rougeL", "ROUGE-L F-measure: longest common subsequence"),
                spec(
                    "rougeLsum",
                    "ROUGE-Lsum F-measure: summary-level LCS over newline-separated sentences",
                ),
            ],
            // No corpus score, and a sample's scores are its own: any split gives the same.
            independent_samples: true,
        }
    }

    fn score_batch(samples: Vec<Sample>) -> Result<BatchResult, String> {
        // Read once per batch: a bad value fails the batch, since no sample could be scored.
        let use_stemmer = adapterlab_sdk::config::get_bool("use_stemmer", true)?;
        Ok(score_samples(&samples, use_stemmer))
    }
}

/// Scores a batch without touching the host, so that it can be tested natively. One
/// [`Scorer`](score::Scorer) serves the whole batch, so each distinct word is stemmed once.
pub fn score_samples(samples: &[Sample], use_stemmer: bool) -> BatchResult {
    let mut scorer = score::Scorer::new(use_stemmer);
    let samples = samples
        .iter()
        .map(|sample| match score_multi(&mut scorer, sample) {
            Ok(values) => SampleResult::Scores(
                SCORE_NAMES
                    .iter()
                    .map(|n| n.to_string())
                    .zip(values)
                    .collect(),
            ),
            Err(e) => SampleResult::Error(e),
        })
        .collect();
    BatchResult {
        samples,
        statistics: Vec::new(),
    }
}

/// rouge-score's `score_multi`: per ROUGE type, the score of the reference whose F-measure
/// is highest (`np.argmax`: the first on ties). Only F-measures are reported, so that is the
/// highest F-measure over the references.
fn score_multi(scorer: &mut score::Scorer, sample: &Sample) -> Result<[f64; 4], String> {
    let mut best: Option<[f64; 4]> = None;
    for (i, reference) in sample.references.iter().enumerate() {
        let s = scorer.score(reference, &sample.prediction).map_err(|e| {
            if sample.references.len() > 1 {
                format!("reference {}: {e}", i + 1)
            } else {
                e.to_string()
            }
        })?;
        let values = [s.rouge1, s.rouge2, s.rouge_l, s.rouge_lsum].map(|v| v.fmeasure);
        best = Some(match best {
            None => values,
            Some(b) => std::array::from_fn(|k| if values[k] > b[k] { values[k] } else { b[k] }),
        });
    }
    best.ok_or_else(|| "the sample has no reference".to_string())
}

adapterlab_sdk::export_metric!(Rouge);

#[cfg(test)]
mod tests {
    use adapterlab_sdk::metric::{Sample, SampleResult};

    use crate::score_samples;

    fn sample(prediction: &str, reference: &str) -> Sample {
        Sample {
            id: "s".into(),
            prediction: prediction.into(),
            references: vec![reference.into()],
            source: None,
        }
    }

    #[test]
    fn every_sample_gets_four_scores_in_range() {
        let megabyte = "word ".repeat(200_000);
        let samples = [
            sample("", ""),
            sample("a cat", "the cats"),
            sample(&megabyte, "word word"),
            sample("word word", &megabyte),
            sample("😀\u{0}\r\n\u{2028}", "\u{FFFF}\u{10FFFF}İ"),
        ];
        let result = score_samples(&samples, true);
        assert_eq!(result.samples.len(), samples.len());
        for r in &result.samples {
            let SampleResult::Scores(scores) = r else {
                panic!("expected scores, got {r:?}")
            };
            let names: Vec<&str> = scores.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(names, ["rouge1", "rouge2", "rougeL", "rougeLsum"]);
            assert!(
                scores.iter().all(|(_, v)| (0.0..=1.0).contains(v)),
                "{scores:?}"
            );
        }
    }

    #[test]
    fn an_oversized_sample_fails_alone() {
        let megabyte = "word ".repeat(200_000);
        let result = score_samples(&[sample(&megabyte, &megabyte), sample("a", "a")], false);
        let SampleResult::Error(e) = &result.samples[0] else {
            panic!("expected an error, got {:?}", result.samples[0])
        };
        assert!(
            e.contains("200000 reference tokens x 200000 prediction tokens"),
            "{e}"
        );
        assert!(matches!(result.samples[1], SampleResult::Scores(_)));
    }
}
