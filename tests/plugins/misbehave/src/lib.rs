//! A metric that misbehaves on request, for the sandbox tests. The sample's prediction picks
//! the behaviour, so one batch can hold good and bad samples:
//! `loop` spins forever, `memory` allocates without end, `trap` panics, `nan` returns NaN,
//! `undeclared` returns a score it did not declare, `range` returns a value out of range,
//! `print` writes to stdout; anything else scores its length. The setting `batch=short`
//! makes the batch result one entry short (malformed for the whole batch), and `batch=chat`
//! calls the `chat` capability, which this plugin does not declare.
//!
//! The hostile cases (`tests/e2e/hostile.rs`): `huge` returns a finite in-range `big` score
//! of 4e306 (fifty of them overflow a plain sum), `empty` returns no scores, `long-error`
//! a 1 MiB error, `long-name` a 1 MiB score name, `log-flood` logs 32 lines of 1 MiB,
//! `print-40k` prints 40 KiB (harmless once, over a lifetime cap after 26 calls), `panic`
//! panics with its own words. `batch=huge-error` fails the whole batch with a 16 MiB error;
//! `batch=corpus` writes corpus values under its own score and under BLEU's.

// The metric is used only through the wasm export, which native builds leave out.
#![cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]

use adapterlab_sdk::v0_1::Manifest;
use adapterlab_sdk::v0_1::metric::{
    BatchResult, Metric, MetricInfo, Sample, SampleResult, ScoreSpec,
};

struct Misbehave;

impl Metric for Misbehave {
    fn info() -> MetricInfo {
        MetricInfo {
            manifest: Manifest::new(
                "misbehave",
                "0.1.0",
                "misbehaves on request (sandbox tests)",
            ),
            scores: vec![
                ScoreSpec::new("chars", "prediction length in characters", 0.0, 1e9, true),
                ScoreSpec::new("big", "an enormous but finite score", 0.0, 1e308, true),
            ],
        }
    }

    fn score_batch(samples: Vec<Sample>) -> Result<BatchResult, String> {
        let mode = adapterlab_sdk::v0_1::config::get("batch").unwrap_or_default();
        if mode == "chat" {
            let request = adapterlab_sdk::v0_1::metric::chat::Request {
                model: None,
                messages: vec![],
                temperature: None,
                max_tokens: None,
                logprobs: false,
                top_logprobs: None,
                seed: None,
            };
            let err = adapterlab_sdk::v0_1::metric::chat::complete(&request)
                .err()
                .unwrap_or_default();
            return Err(err);
        }
        if mode == "huge-error" {
            return Err("E".repeat(16 << 20));
        }
        let mut results: Vec<SampleResult> = samples.iter().map(score_one).collect();
        if mode == "short" {
            results.pop();
        }
        let corpus = if mode == "corpus" {
            vec![("chars".into(), 1.0), ("bleu".into(), 0.0)]
        } else {
            vec![]
        };
        Ok(BatchResult {
            samples: results,
            corpus,
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
        "huge" => SampleResult::Scores(vec![("chars".into(), 4.0), ("big".into(), 4e306)]),
        "empty" => SampleResult::Scores(vec![]),
        "long-error" => SampleResult::Error("e".repeat(1 << 20)),
        "long-name" => SampleResult::Scores(vec![("n".repeat(1 << 20), 1.0)]),
        "log-flood" => {
            let line = "l".repeat(1 << 20);
            for _ in 0..32 {
                adapterlab_sdk::v0_1::log::info(&line);
            }
            SampleResult::Scores(vec![("chars".into(), 9.0)])
        }
        "print-40k" => {
            println!("{}", "p".repeat(40 << 10));
            SampleResult::Scores(vec![("chars".into(), 9.0)])
        }
        "panic" => panic!("the plugin's own words 7431"),
        other => SampleResult::Scores(vec![("chars".into(), other.chars().count() as f64)]),
    }
}

adapterlab_sdk::export_metric_v0_1!(Misbehave);
