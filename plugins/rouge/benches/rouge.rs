//! Native timing of the ROUGE plugin's scoring, phase by phase (tokenizing, stemming, LCS, the
//! whole score), to find where the guest spends its time without WebAssembly in the way.
//!
//!   cargo bench -p adapterlab-plugin-rouge [-- PAIRS.jsonl]
//!
//! PAIRS.jsonl holds one object a line with `prediction` and `reference` (or `target`), e.g. the
//! predictions file `scripts/bench/eval_vs_python.sh` writes; by default the golden fixture's
//! texts. Each phase runs over the whole set several times; the median is printed.

use std::hint::black_box;
use std::time::{Duration, Instant};

use adapterlab_plugin_rouge::lcs::{lcs_indices, lcs_length};
use adapterlab_plugin_rouge::porter::stem;
use adapterlab_plugin_rouge::score_samples;
use adapterlab_plugin_rouge::tokenize::{Tokenizer, tokenize};
use adapterlab_sdk::metric::Sample;

const REPEATS: usize = 9;

fn pairs() -> Vec<(String, String)> {
    let path = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .unwrap_or_else(|| {
            concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/rouge.jsonl").into()
        });
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
    let mut pairs = Vec::new();
    for line in text.lines() {
        let row: serde_json::Value = serde_json::from_str(line).expect("a JSON row");
        // The fixture holds every pair twice (with and without the stemmer).
        if row["use_stemmer"] == false {
            continue;
        }
        let reference = row
            .get("reference")
            .or(row.get("target"))
            .expect("reference");
        pairs.push((
            row["prediction"].as_str().expect("prediction").to_string(),
            reference.as_str().expect("reference").to_string(),
        ));
    }
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
    let texts: Vec<&str> = pairs
        .iter()
        .flat_map(|(p, r)| [p.as_str(), r.as_str()])
        .collect();
    let words: Vec<String> = texts.iter().flat_map(|t| tokenize(t, false)).collect();
    let long_words: Vec<&String> = words.iter().filter(|w| w.len() > 3).collect();
    // Token ids local to each pair, dense from 0, as the scorer gives them to the LCS.
    let id_pairs: Vec<(Vec<u32>, Vec<u32>)> = pairs
        .iter()
        .map(|(p, r)| {
            let mut ids = std::collections::HashMap::new();
            let mut intern = |t: &str| -> Vec<u32> {
                tokenize(t, true)
                    .into_iter()
                    .map(|w| {
                        let next = ids.len() as u32;
                        *ids.entry(w).or_insert(next)
                    })
                    .collect()
            };
            (intern(r), intern(p))
        })
        .collect();
    println!(
        "{n} samples, {} tokens, {} stemmed (len > 3)",
        words.len(),
        long_words.len()
    );

    time("score_samples, stemmer (the plugin)", n, || {
        black_box(score_samples(black_box(&samples), true));
    });
    time("score_samples, no stemmer", n, || {
        black_box(score_samples(black_box(&samples), false));
    });
    for use_stemmer in [true, false] {
        time(
            &format!("tokenize both texts, stemmer {use_stemmer}"),
            n,
            || {
                // As the plugin does: one tokenizer (and stem cache) for the batch.
                let mut tokenizer = Tokenizer::new(use_stemmer);
                let mut ids = Vec::new();
                for t in &texts {
                    ids.clear();
                    tokenizer.tokenize_ids(black_box(t), &mut ids);
                    black_box(&ids);
                }
            },
        );
    }
    time("porter::stem of every token > 3 chars", n, || {
        for w in &long_words {
            black_box(stem(black_box(w)));
        }
    });
    time("lcs_length (rougeL)", n, || {
        for (a, b) in &id_pairs {
            black_box(lcs_length(black_box(a), black_box(b)));
        }
    });
    time("lcs_indices (rougeLsum, one sentence)", n, || {
        for (a, b) in &id_pairs {
            black_box(lcs_indices(black_box(a), black_box(b)));
        }
    });
}
