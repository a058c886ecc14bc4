//! A metric that calls `chat` until it succeeds, with no limit of its own: against an LLM
//! server that is down, only the host's wall-clock deadline (or a cancel) stops it. The
//! hostile-plugin tests use it to show that time spent in host capabilities counts.

// The metric is used only through the wasm export, which native builds leave out.
#![cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]

use adapterlab_sdk::v0_1::metric::chat::{Message, Request, complete};
use adapterlab_sdk::v0_1::metric::{
    BatchResult, Metric, MetricInfo, Sample, SampleResult, ScoreSpec,
};
use adapterlab_sdk::v0_1::{Capability, Manifest};

struct Chatty;

impl Metric for Chatty {
    fn info() -> MetricInfo {
        MetricInfo {
            manifest: Manifest::new("chatty", "0.1.0", "retries chat for ever (tests)")
                .with_capability(Capability::Chat),
            scores: vec![ScoreSpec::new(
                "answered",
                "1 once chat answered",
                0.0,
                1.0,
                true,
            )],
        }
    }

    fn score_batch(samples: Vec<Sample>) -> Result<BatchResult, String> {
        let request = Request {
            model: None,
            messages: vec![Message {
                role: "user".into(),
                content: "hello".into(),
            }],
            temperature: None,
            max_tokens: None,
            logprobs: false,
            top_logprobs: None,
            seed: None,
        };
        while complete(&request).is_err() {}
        Ok(BatchResult {
            samples: samples
                .iter()
                .map(|_| SampleResult::Scores(vec![("answered".into(), 1.0)]))
                .collect(),
            corpus: vec![],
        })
    }
}

adapterlab_sdk::export_metric_v0_1!(Chatty);
