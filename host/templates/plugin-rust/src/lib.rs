//! `{{name}}`: an adapterlab metric plugin. Score `{{score}}_overlap`: the share of the
//! reference's distinct words that also occur in the prediction (unigram recall, exact
//! match, case-sensitive). A word is a maximal run of characters other than ASCII whitespace.

// The SDK's FastSet: std's HashSet seeds itself from the host's randomness (an extra import)
// and hashes short keys slowly.
use adapterlab_sdk::hash::FastSet;
use adapterlab_sdk::metric::{BatchResult, Metric, MetricInfo, Sample, SampleResult, ScoreSpec};
use adapterlab_sdk::{Manifest, log};

pub const NAME: &str = "{{name}}";
pub const OVERLAP: &str = "{{score}}_overlap";

/// The words of `text`: runs of characters other than the six ASCII whitespace characters
/// (space, \t, \n, \r, \x0b, \x0c). Named explicitly: `split_whitespace` would also split on
/// Unicode spaces and `split_ascii_whitespace` not on \x0b, which other languages count.
pub fn words(text: &str) -> impl Iterator<Item = &str> {
    text.split([' ', '\t', '\n', '\r', '\x0b', '\x0c'])
        .filter(|w| !w.is_empty())
}

/// The share of the reference's distinct words found in the prediction, in [0, 1].
pub fn overlap(prediction: &str, reference: &str) -> Result<f64, String> {
    let reference: FastSet<&str> = words(reference).collect();
    if reference.is_empty() {
        return Err("reference has no words".to_string());
    }
    let prediction: FastSet<&str> = words(prediction).collect();
    let shared = reference.intersection(&prediction).count();
    Ok(shared as f64 / reference.len() as f64)
}

pub struct Overlap;

impl Metric for Overlap {
    fn info() -> MetricInfo {
        MetricInfo {
            // Manifest::new asks for the `log` and `config` capabilities; declare others
            // (`embed`, `chat`) with `.with_capability(..)` before calling them.
            manifest: Manifest::new(
                NAME,
                "0.1.0",
                "Word overlap: share of the reference's distinct words found in the prediction",
            ),
            scores: vec![ScoreSpec::new(
                OVERLAP,
                "Distinct reference words that occur in the prediction / distinct reference words",
                0.0,
                1.0,
                true,
            )],
            // A sample's score is its own, so the host may split a run across instances.
            independent_samples: true,
        }
    }

    fn score_batch(samples: Vec<Sample>) -> Result<BatchResult, String> {
        // Host calls (log, config) stay here; the pure functions above are unit-tested.
        let result = score_samples(&samples);
        log::debug(&format!("scored {} samples", samples.len()));
        Ok(result)
    }
}

/// One result per sample, in order: a score or that sample's error (never a whole-batch
/// error for a problem of one sample).
pub fn score_samples(samples: &[Sample]) -> BatchResult {
    BatchResult {
        samples: samples
            .iter()
            .map(|s| match best_overlap(&s.prediction, &s.references) {
                Ok(value) => SampleResult::Scores(vec![(OVERLAP.to_string(), value)]),
                Err(e) => SampleResult::Error(e),
            })
            .collect(),
        statistics: Vec::new(),
    }
}

adapterlab_sdk::export_metric!(Overlap);

/// With several references, the best overlap with any of them.
pub fn best_overlap(prediction: &str, references: &[String]) -> Result<f64, String> {
    let mut best: Option<f64> = None;
    for reference in references {
        let value = overlap(prediction, reference)?;
        best = Some(best.map_or(value, |b| b.max(value)));
    }
    best.ok_or_else(|| "the sample has no reference".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_distinct_reference_words() {
        assert_eq!(overlap("the cat sat", "the cat the dog"), Ok(2.0 / 3.0));
        assert_eq!(overlap("", "a b"), Ok(0.0));
        assert_eq!(overlap("b\x0ba", "a b"), Ok(1.0));
    }

    #[test]
    fn empty_reference_is_a_sample_error() {
        assert!(overlap("words", " \t").is_err());
    }
}
