//! A metric that misbehaves on request, for the sandbox tests. The sample's prediction picks
//! the behaviour, so one batch can hold good and bad samples:
//! `loop` spins forever, `memory` allocates without end, `trap` panics, `nan` returns NaN,
//! `undeclared` returns a score it did not declare, `range` returns a value out of range,
//! `print` writes to stdout; anything else scores its length. The setting `batch=short`
//! makes the batch result one entry short (malformed for the whole batch), and `batch=chat`
//! calls the `chat` capability, which this plugin does not declare.

use adapterlab_sdk::Manifest;
use adapterlab_sdk::metric::{BatchResult, Metric, MetricInfo, Sample, SampleResult, ScoreSpec};

struct Misbehave;

impl Metric for Misbehave {
    fn info() -> MetricInfo {
        MetricInfo {
            manifest: Manifest::new(
                "misbehave",
                "0.1.0",
                "misbehaves on request (sandbox tests)",
            ),
            scores: vec![ScoreSpec::new(
                "chars",
                "prediction length in characters",
                0.0,
                1e9,
                true,
            )],
        }
    }

    fn score_batch(samples: Vec<Sample>) -> Result<BatchResult, String> {
        let mode = adapterlab_sdk::config::get("batch").unwrap_or_default();
        if mode == "chat" {
            let request = adapterlab_sdk::metric::chat::Request {
                model: None,
                messages: vec![],
                temperature: None,
                max_tokens: None,
                logprobs: false,
                top_logprobs: None,
                seed: None,
            };
            let err = adapterlab_sdk::metric::chat::complete(&request)
                .err()
                .unwrap_or_default();
            return Err(err);
        }
        let mut results: Vec<SampleResult> = samples.iter().map(score_one).collect();
        if mode == "short" {
            results.pop();
        }
        Ok(BatchResult {
            samples: results,
            corpus: vec![],
        })
    }
}

fn score_one(sample: &Sample) -> SampleResult {
    match sample.prediction.as_str() {
        "loop" => {
            let mut x: u64 = 0;
            loop {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
        "memory" => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 16 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        "trap" => panic!("asked to trap"),
        "nan" => SampleResult::Scores(vec![("chars".into(), f64::NAN)]),
        "undeclared" => SampleResult::Scores(vec![("bogus".into(), 1.0)]),
        "range" => SampleResult::Scores(vec![("chars".into(), -5.0)]),
        "print" => {
            println!("hello from the guest's stdout");
            SampleResult::Scores(vec![("chars".into(), 5.0)])
        }
        other => SampleResult::Scores(vec![("chars".into(), other.chars().count() as f64)]),
    }
}

adapterlab_sdk::export_metric!(Misbehave);
