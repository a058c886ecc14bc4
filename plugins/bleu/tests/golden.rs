//! Golden tests against `fixtures/*.jsonl`, made by `fixtures/make_fixtures.py` with sacrebleu
//! 2.6: the 13a tokenization and segment statistics must be identical, sentence and corpus
//! BLEU within 1e-4 (they differ at most in the last bits of `exp`/`ln`).
//! `BLEU_FIXTURES=folder` checks another folder of the same shape instead.

use std::collections::HashMap;
use std::path::PathBuf;

use adapterlab_plugin_bleu::bleu::{corpus_bleu, segment_stats, sentence_bleu};
use adapterlab_plugin_bleu::tokenizer::{py_rstrip, tokenize_13a};
use serde_json::Value;

const TOLERANCE: f64 = 1e-4;

fn rows(name: &str) -> Vec<Value> {
    let folder = std::env::var_os("BLEU_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"));
    let path = folder.join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let rows: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON row"))
        .collect();
    assert!(!rows.is_empty(), "no rows in {}", path.display());
    rows
}

fn counts(v: &Value) -> Vec<u64> {
    v.as_array()
        .expect("a list")
        .iter()
        .map(|x| x.as_u64().expect("a count"))
        .collect()
}

#[test]
fn sentence_bleu_matches_sacrebleu() {
    let mut failures = Vec::new();
    let mut exact = 0;
    let rows = rows("bleu.jsonl");
    for row in &rows {
        let id = &row["id"];
        let reference = row["reference"].as_str().expect("reference");
        let prediction = row["prediction"].as_str().expect("prediction");
        for (text, key) in [
            (reference, "reference_tokens"),
            (prediction, "prediction_tokens"),
        ] {
            let got = tokenize_13a(py_rstrip(text));
            if got != row[key].as_str().expect("tokens") {
                failures.push(format!("{id} {key}: got {got:?}, sacrebleu {}", row[key]));
            }
        }
        let stats = segment_stats(prediction, reference);
        let expect = (
            counts(&row["counts"]),
            counts(&row["totals"]),
            row["sys_len"].as_u64(),
            row["ref_len"].as_u64(),
        );
        let got = (
            stats.correct.to_vec(),
            stats.total.to_vec(),
            Some(stats.hyp_len),
            Some(stats.ref_len),
        );
        if got != expect {
            failures.push(format!("{id} stats: got {got:?}, sacrebleu {expect:?}"));
        }
        let bleu = sentence_bleu(prediction, reference);
        let expect = row["bleu"].as_f64().expect("bleu");
        exact += (bleu == expect) as usize;
        if (bleu - expect).abs() > TOLERANCE {
            failures.push(format!("{id} bleu: got {bleu}, sacrebleu {expect}"));
        }
    }
    eprintln!(
        "{} sentences, {exact} BLEU values bit-identical",
        rows.len()
    );
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn corpus_bleu_matches_sacrebleu() {
    let cases: HashMap<String, (String, String)> = rows("bleu.jsonl")
        .into_iter()
        .map(|r| {
            let text = |k: &str| r[k].as_str().expect("text").to_string();
            (text("id"), (text("prediction"), text("reference")))
        })
        .collect();
    let mut failures = Vec::new();
    for row in rows("corpus.jsonl") {
        let ids = row["cases"].as_array().expect("cases");
        let pairs: Vec<(&str, &str)> = ids
            .iter()
            .map(|id| {
                let (p, r) = &cases[id.as_str().expect("an id")];
                (p.as_str(), r.as_str())
            })
            .collect();
        let bleu = corpus_bleu(pairs.iter().copied());
        let expect = row["bleu"].as_f64().expect("bleu");
        if (bleu - expect).abs() > TOLERANCE {
            failures.push(format!(
                "batch of {} starting {}: got {bleu}, sacrebleu {expect}",
                ids.len(),
                ids[0]
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
