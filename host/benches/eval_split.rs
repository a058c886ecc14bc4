//! Splitting one metric across parallel instances: 100,000 samples scored by `rouge,bleu`
//! through the eval pipeline, once with one instance per metric and then with the samples cut
//! into N contiguous chunks scored by N instances each (contract 0.2.0: per-sample scores are
//! independent, corpus BLEU is finalized from summed integer statistics). Prints the wall time
//! of each and checks that every per-sample score and the corpus BLEU are bit-identical.
//! `cargo bench -p adapterlab --bench eval_split [-- SAMPLES]`; results go to BENCHMARKS.md.

use std::sync::Arc;
use std::time::Instant;

use adapterlab::eval::input::PredictionRow;
use adapterlab::eval::pipeline::{self, EvalEnv, EvalRequest};
use adapterlab::paths::DataDir;
use adapterlab::plugin::{Limits, NoServices, Registry, Runtime};
use adapterlab::store::{RunStatus, Store};

/// Summary-like texts: 15 to 40 words from a small vocabulary, deterministic per index.
fn text(seed: u64, words: usize) -> String {
    const VOCAB: &[&str] = &[
        "the",
        "a",
        "person1",
        "person2",
        "tells",
        "asks",
        "about",
        "meeting",
        "tomorrow",
        "because",
        "train",
        "late",
        "doctor",
        "advises",
        "rest",
        "water",
        "and",
        "they",
        "agree",
        "to",
        "buy",
        "new",
        "car",
        "house",
        "party",
        "on",
        "Saturday",
        "will",
        "call",
        "mother",
        "school",
        "exam",
        "results",
        "job",
        "interview",
        "office",
        "weekend",
        "trip",
    ];
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..words)
        .map(|_| {
            x ^= x >> 33;
            x = x.wrapping_mul(0xff51afd7ed558ccd);
            VOCAB[(x >> 40) as usize % VOCAB.len()]
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(100_000);
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = DataDir::resolve(Some(tmp.path())).unwrap();
    let store = Store::open(&data_dir.store()).unwrap();
    let runtime = Runtime::new(Some(data_dir.component_cache()), Limits::default()).unwrap();
    let registry = Registry::load(&runtime, &data_dir.plugins()).unwrap();
    let rows: Vec<PredictionRow> = (0..n as u64)
        .map(|i| {
            PredictionRow::new(
                format!("s{i}"),
                text(2 * i, 15 + (i % 26) as usize),
                text(2 * i + 1, 15 + (i % 21) as usize),
                None,
            )
        })
        .collect();
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    println!("{n} samples, rouge,bleu; this machine has {cores} cores");
    let env = EvalEnv {
        store: store.clone(),
        services: Arc::new(NoServices),
        cancel: Arc::default(),
        on_progress: Arc::new(|_, _| {}),
        stopped_because: EvalEnv::user_stops(),
    };
    let mut first: Option<(u64, Vec<adapterlab::store::SampleRecord>)> = None;
    let mut counts = vec![1, 2, 4, cores.min(8)];
    counts.sort();
    counts.dedup();
    for parallel in counts {
        let settings = ["rouge", "bleu"]
            .iter()
            .map(|m| {
                (
                    m.to_string(),
                    [("parallel".to_string(), parallel.to_string())].into(),
                )
            })
            .collect();
        let request = EvalRequest {
            name: format!("parallel-{parallel}"),
            rows: rows.clone(),
            metrics: vec!["rouge".into(), "bleu".into()],
            settings,
            score_references: false,
            metadata: Default::default(),
            llm_base_url: None,
        };
        let plugins = pipeline::validate(&registry, &request).unwrap();
        let run = pipeline::create_run(&store, &request, &plugins).unwrap();
        let started = Instant::now();
        let (run, samples) =
            pipeline::execute_with_samples(&env, &run.id, &request, &plugins).unwrap();
        let elapsed = started.elapsed();
        assert_eq!(run.status, RunStatus::Done, "{:?}", run.error);
        let bleu = run.corpus["bleu"];
        println!(
            "  {parallel} instance(s) per metric: {:>6.2} s ({:>7.0} samples/s), corpus BLEU {bleu}",
            elapsed.as_secs_f64(),
            n as f64 / elapsed.as_secs_f64()
        );
        match &first {
            None => first = Some((bleu.to_bits(), samples)),
            Some((bits, reference)) => {
                assert_eq!(
                    bleu.to_bits(),
                    *bits,
                    "corpus BLEU differs with {parallel} instances"
                );
                assert!(
                    reference
                        .iter()
                        .zip(&samples)
                        .all(|(a, b)| a.scores == b.scores),
                    "per-sample scores differ with {parallel} instances"
                );
            }
        }
    }
    println!("  every split: per-sample scores and corpus BLEU bit-identical");
}
