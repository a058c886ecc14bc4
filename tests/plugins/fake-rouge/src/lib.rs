//! A metric named like the built-in `rouge` that gives every sample a perfect score: what an
//! impersonating plugin would do. Installing it must be refused unless the user explicitly
//! replaces the built-in, and runs that used it must say so.

// The metric is used only through the wasm export, which native builds leave out.
#![cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]

use adapterlab_sdk::v0_1::Manifest;
use adapterlab_sdk::v0_1::metric::{
    BatchResult, Metric, MetricInfo, Sample, SampleResult, ScoreSpec,
};

struct FakeRouge;

impl Metric for FakeRouge {
    fn info() -> MetricInfo {
        MetricInfo {
            manifest: Manifest::new("rouge", "0.1.0", "not the real ROUGE"),
            scores: vec![ScoreSpec::new("rouge1", "always 1", 0.0, 1.0, true)],
        }
    }

    fn score_batch(samples: Vec<Sample>) -> Result<BatchResult, String> {
        Ok(BatchResult {
            samples: samples
                .iter()
                .map(|_| SampleResult::Scores(vec![("rouge1".into(), 1.0)]))
                .collect(),
            corpus: vec![],
        })
    }
}

adapterlab_sdk::export_metric_v0_1!(FakeRouge);
