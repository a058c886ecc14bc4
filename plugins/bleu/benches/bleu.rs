//! Native timing of the BLEU plugin's scoring, phase by phase (13a tokenizer, segment
//! statistics, the whole batch with its corpus score), to find where the guest spends its
//! time without WebAssembly in the way.
//!
//!   cargo bench -p adapterlab-plugin-bleu [-- PAIRS.jsonl]
//!
//! PAIRS.jsonl holds one object a line with `prediction` and `reference`, e.g. the predictions
//! file `scripts/bench/eval_vs_python.sh` writes; by default the golden fixture's texts. Each
//! phase runs over the whole set several times; the median is printed.

use std::hint::black_box;
use std::time::{Duration, Instant};

use adapterlab_plugin_bleu::bleu::{corpus_bleu, segment_stats};
use adapterlab_plugin_bleu::score_samples;
use adapterlab_plugin_bleu::tokenizer::tokenize_13a;
use adapterlab_sdk::metric::Sample;

const REPEATS: usize = 9;

fn pairs() -> Vec<(String, String)> {
    let path = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .unwrap_or_else(|| {
            concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/bleu.jsonl").into()
        });
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
    let pairs: Vec<(String, String)> = text
        .lines()
        .map(|line| {
            let row: serde_json::Value = serde_json::from_str(line).expect("a JSON row");
            (
                row["prediction"].as_str().expect("prediction").to_string(),
                row["reference"].as_str().expect("reference").to_string(),
            )
        })
        .collect();
    eprintln!("{path}: {} pairs", pairs.len());
    pairs
}

fn time(name: &str, samples: usize, mut f: impl FnMut()) {
    let mut times: Vec<Duration> = (0..REPEATS)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .collect();
    times.sort();
    let median = times[REPEATS / 2];
    println!(
        "{name:<40} {:>9.3} ms   {:>8.2} us/sample",
        median.as_secs_f64() * 1e3,
        median.as_secs_f64() * 1e6 / samples as f64
    );
}

fn main() {
    let pairs = pairs();
    let n = pairs.len();
    let samples: Vec<Sample> = pairs
        .iter()
        .enumerate()
        .map(|(i, (p, r))| Sample {
            id: i.to_string(),
            prediction: p.clone(),
            references: vec![r.clone()],
            source: None,
        })
        .collect();
    println!("{n} samples");
    time("score_samples (the plugin, with corpus)", n, || {
        black_box(score_samples(black_box(&samples)));
    });
    time("segment_stats of every pair", n, || {
        for (p, r) in &pairs {
            black_box(segment_stats(black_box(p), black_box(r)));
        }
    });
    time("corpus_bleu", n, || {
        black_box(corpus_bleu(
            pairs.iter().map(|(p, r)| (p.as_str(), r.as_str())),
        ));
    });
    time("tokenize_13a of both texts", n, || {
        for (p, r) in &pairs {
            black_box(tokenize_13a(black_box(p)));
            black_box(tokenize_13a(black_box(r)));
        }
    });
}
