//! Reports for the reporters' unit tests: a comparison of two runs with awkward text, a
//! single run, an empty report and one full of non-finite numbers.

use adapterlab_sdk::reporter::{Aggregate, Delta, Estimate, Report, Run, SampleView};

pub fn estimate(mean: f64, low: f64, high: f64) -> Estimate {
    Estimate { mean, low, high }
}

fn aggregate(score: &str, estimate: Estimate, higher_is_better: bool) -> Aggregate {
    Aggregate {
        score: score.to_string(),
        estimate,
        higher_is_better,
    }
}

fn run(id: &str, name: &str, aggregates: Vec<Aggregate>) -> Run {
    Run {
        id: id.to_string(),
        name: name.to_string(),
        kind: "eval".to_string(),
        created: "2026-11-26T12:00:00Z".to_string(),
        metadata: vec![
            ("model".to_string(), "SmolLM2-135M-Instruct".to_string()),
            ("dataset".to_string(), "dialogsum | dev".to_string()),
        ],
        aggregates,
    }
}

fn scores(pairs: &[(&str, f64)]) -> Vec<(String, f64)> {
    pairs.iter().map(|&(n, v)| (n.to_string(), v)).collect()
}

/// A text that needs escaping in every format: Markdown table and emphasis syntax, HTML,
/// CSV quotes and separators, newlines of both kinds, a code fence.
pub const AWKWARD: &str = "#P1#: a | b, \"quoted\" <script>alert('x')</script> & *stars* _u_\r\n#P2#: ```fence``` [link](http://x) $5";

/// Two runs compared: rouge1 better (significant), ter worse (significant, lower is
/// better), bleu unchanged. Sample `s2` is missing from the candidate.
pub fn comparison() -> Report {
    Report {
        title: "Base vs LoRA | <dialogsum>".to_string(),
        runs: vec![
            run(
                "run-base",
                "base",
                vec![
                    aggregate("rouge1", estimate(0.30, 0.28, 0.32), true),
                    aggregate("ter", estimate(0.70, 0.65, 0.75), false),
                    aggregate("bleu", estimate(0.10, 0.08, 0.12), true),
                ],
            ),
            run(
                "run-lora",
                "lora r=8, \"fast\"",
                vec![
                    aggregate("rouge1", estimate(0.35, 0.33, 0.37), true),
                    aggregate("ter", estimate(0.80, 0.75, 0.85), false),
                    aggregate("bleu", estimate(0.11, 0.09, 0.13), true),
                ],
            ),
        ],
        deltas: vec![
            Delta {
                score: "rouge1".to_string(),
                difference: estimate(0.05, 0.02, 0.08),
                significant: true,
                higher_is_better: true,
                paired: 500,
            },
            Delta {
                score: "ter".to_string(),
                difference: estimate(0.10, 0.04, 0.16),
                significant: true,
                higher_is_better: false,
                paired: 500,
            },
            Delta {
                score: "bleu".to_string(),
                difference: estimate(0.01, -0.01, 0.03),
                significant: false,
                higher_is_better: true,
                paired: 500,
            },
        ],
        samples: vec![
            SampleView {
                id: "s1".to_string(),
                source: Some(AWKWARD.to_string()),
                references: vec!["Ref, with comma\nand newline".to_string()],
                predictions: vec![
                    Some("base says | this".to_string()),
                    Some(AWKWARD.to_string()),
                ],
                scores: vec![
                    scores(&[("rouge1", 0.25), ("ter", 0.75), ("bleu", 0.05)]),
                    scores(&[("rouge1", 0.5), ("ter", 0.6), ("bleu", 0.125)]),
                ],
            },
            SampleView {
                id: "s2".to_string(),
                source: None,
                references: vec!["r2".to_string(), "r2, second".to_string()],
                predictions: vec![Some("only base".to_string()), None],
                scores: vec![scores(&[("rouge1", 0.3)]), Vec::new()],
            },
        ],
    }
}

/// One run, no deltas.
pub fn single_run() -> Report {
    Report {
        title: "One run".to_string(),
        runs: vec![run(
            "run-1",
            "only",
            vec![aggregate("rouge1", estimate(0.4, 0.35, 0.45), true)],
        )],
        deltas: Vec::new(),
        samples: vec![SampleView {
            id: "a".to_string(),
            source: Some("A: hi".to_string()),
            references: vec!["A greets.".to_string()],
            predictions: vec![Some("Hi.".to_string())],
            scores: vec![scores(&[("rouge1", 0.4)])],
        }],
    }
}

/// No runs, no deltas, no samples.
pub fn empty() -> Report {
    Report {
        title: String::new(),
        runs: Vec::new(),
        deltas: Vec::new(),
        samples: Vec::new(),
    }
}

/// Non-finite numbers everywhere a number can be, and vectors shorter than `runs`.
pub fn non_finite() -> Report {
    let nan = estimate(f64::NAN, f64::NEG_INFINITY, f64::INFINITY);
    Report {
        title: "Broken numbers".to_string(),
        runs: vec![
            run(
                "a",
                "a",
                vec![
                    aggregate("rouge1", nan, true),
                    aggregate("bleu", estimate(0.1, f64::NAN, 0.2), true),
                ],
            ),
            run(
                "b",
                "b",
                vec![aggregate(
                    "rouge1",
                    estimate(f64::INFINITY, 0.0, f64::NAN),
                    true,
                )],
            ),
        ],
        deltas: vec![
            Delta {
                score: "rouge1".to_string(),
                difference: nan,
                significant: true,
                higher_is_better: true,
                paired: 0,
            },
            Delta {
                score: "bleu".to_string(),
                difference: estimate(0.2, f64::NAN, 0.3),
                significant: true,
                higher_is_better: true,
                paired: 3,
            },
        ],
        samples: vec![SampleView {
            id: "x".to_string(),
            source: None,
            references: vec![String::new()],
            predictions: vec![Some(String::new())],
            scores: vec![scores(&[("rouge1", f64::NAN), ("bleu", f64::INFINITY)])],
        }],
    }
}

/// True when `text` writes no non-finite number (Rust writes them `NaN`, `inf`, `-inf`).
pub fn is_nan_free(text: &str) -> bool {
    !text.contains("NaN") && !text.contains("inf")
}
