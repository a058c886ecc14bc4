//! Golden test for several references: the plugin's scores must equal rouge-score 0.1.2's
//! `score_multi` F-measures in `fixtures/multi_reference.jsonl` (made by
//! `fixtures/make_multi_reference.py`) to 1e-6.

use adapterlab_plugin_rouge::{SCORE_NAMES, score_samples};
use adapterlab_sdk::metric::{Sample, SampleResult};
use serde_json::Value;

const TOLERANCE: f64 = 1e-6;

#[test]
fn matches_rouge_score_score_multi() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/multi_reference.jsonl");
    let text = std::fs::read_to_string(&path).expect("the fixture");
    let (mut checked, mut failures) = (0, Vec::new());
    for line in text.lines() {
        let row: Value = serde_json::from_str(line).expect("a JSON row");
        let sample = Sample {
            id: row["id"].as_str().expect("id").to_string(),
            prediction: row["prediction"].as_str().expect("prediction").to_string(),
            references: row["references"]
                .as_array()
                .expect("references")
                .iter()
                .map(|r| r.as_str().expect("a reference").to_string())
                .collect(),
            source: None,
        };
        let use_stemmer = row["use_stemmer"].as_bool().expect("use_stemmer");
        let result = score_samples(std::slice::from_ref(&sample), use_stemmer);
        let SampleResult::Scores(scores) = &result.samples[0] else {
            panic!("{}: {:?}", sample.id, result.samples[0]);
        };
        for (name, (got_name, got)) in SCORE_NAMES.iter().zip(scores) {
            assert_eq!(name, got_name);
            let expect = row[*name][2].as_f64().expect("fmeasure");
            checked += 1;
            if (got - expect).abs() > TOLERANCE {
                failures.push(format!(
                    "{} stem={use_stemmer} {name}: got {got}, rouge-score {expect}",
                    sample.id
                ));
            }
        }
    }
    assert!(
        checked > 1000,
        "only {checked} values in {}",
        path.display()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
