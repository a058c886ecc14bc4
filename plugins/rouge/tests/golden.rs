//! Golden test: every value in `fixtures/rouge.jsonl` (made by `fixtures/make_fixtures.py` with
//! rouge-score 0.1.2) must be reproduced to 1e-6. `ROUGE_FIXTURE=path` checks another file of
//! the same shape instead (e.g. a local-only one made from real summaries).

use std::path::PathBuf;

use adapterlab_plugin_rouge::score::{Score, score};
use serde_json::Value;

const TOLERANCE: f64 = 1e-6;

fn fixture() -> (PathBuf, String) {
    let path = std::env::var_os("ROUGE_FIXTURE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rouge.jsonl")
        });
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    (path, text)
}

#[test]
fn matches_rouge_score() {
    let (path, text) = fixture();
    let mut checked = 0;
    let mut exact = 0;
    let mut failures = Vec::new();
    for (line_no, line) in text.lines().enumerate() {
        let row: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("{}:{}: {e}", path.display(), line_no + 1));
        let target = row["target"].as_str().expect("target");
        let prediction = row["prediction"].as_str().expect("prediction");
        let use_stemmer = row["use_stemmer"].as_bool().expect("use_stemmer");
        let got = score(target, prediction, use_stemmer).expect("fixture texts are short");
        for (name, score) in [
            ("rouge1", got.rouge1),
            ("rouge2", got.rouge2),
            ("rougeL", got.rouge_l),
            ("rougeLsum", got.rouge_lsum),
        ] {
            let Score {
                precision,
                recall,
                fmeasure,
            } = score;
            for (part, value, expect) in [
                ("precision", precision, &row[name][0]),
                ("recall", recall, &row[name][1]),
                ("fmeasure", fmeasure, &row[name][2]),
            ] {
                let expect = expect.as_f64().expect("a number");
                checked += 1;
                exact += (value == expect) as usize;
                if (value - expect).abs() > TOLERANCE {
                    failures.push(format!(
                        "{} stem={use_stemmer} {name}.{part}: got {value}, rouge-score {expect}",
                        row["id"]
                    ));
                }
            }
        }
    }
    assert!(checked > 0, "no rows in {}", path.display());
    eprintln!(
        "{}: {checked} values checked, {exact} bit-identical",
        path.display()
    );
    assert!(
        failures.is_empty(),
        "{} of {checked} values differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
