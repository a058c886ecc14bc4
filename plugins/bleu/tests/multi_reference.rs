//! Golden tests for several references against `fixtures/*multi_reference.jsonl`, made by
//! `fixtures/make_multi_reference.py` with sacrebleu 2.6: segment statistics identical
//! (clipped counts = the highest in one reference, the closest reference length), sentence and
//! corpus BLEU within 1e-4; the corpus through the plugin's statistics and `finalize`, also
//! with every batch cut in two and its statistics summed.

use std::collections::HashMap;

use adapterlab_plugin_bleu::bleu::{StatsCounter, compute_bleu};
use adapterlab_plugin_bleu::{finalize, score_samples};
use adapterlab_sdk::metric::{Sample, Statistic};
use serde_json::Value;

const TOLERANCE: f64 = 1e-4;

fn rows(name: &str) -> Vec<Value> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let text = std::fs::read_to_string(&path).expect("the fixture");
    text.lines()
        .map(|l| serde_json::from_str(l).expect("a JSON row"))
        .collect()
}

fn sample(row: &Value) -> Sample {
    Sample {
        id: row["id"].as_str().expect("id").to_string(),
        prediction: row["prediction"].as_str().expect("prediction").to_string(),
        references: row["references"]
            .as_array()
            .expect("references")
            .iter()
            .map(|r| r.as_str().expect("a reference").to_string())
            .collect(),
        source: None,
    }
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
    let rows = rows("multi_reference.jsonl");
    assert!(rows.len() > 500);
    for row in &rows {
        let s = sample(row);
        let stats = StatsCounter::default().segment_stats_multi(&s.prediction, &s.references);
        let got = (
            stats.correct.to_vec(),
            stats.total.to_vec(),
            stats.hyp_len,
            stats.ref_len,
        );
        let expect = (
            counts(&row["counts"]),
            counts(&row["totals"]),
            row["sys_len"].as_u64().expect("sys_len"),
            row["ref_len"].as_u64().expect("ref_len"),
        );
        if got != expect {
            failures.push(format!(
                "{}: statistics {got:?}, sacrebleu {expect:?}",
                s.id
            ));
        }
        let bleu = compute_bleu(&stats, true);
        let want = row["bleu"].as_f64().expect("bleu");
        if (bleu - want).abs() > TOLERANCE {
            failures.push(format!("{}: bleu {bleu}, sacrebleu {want}", s.id));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn add(into: &mut Vec<(String, Statistic)>, more: Vec<(String, Statistic)>) {
    if into.is_empty() {
        *into = more;
        return;
    }
    for ((name, x), (other, y)) in into.iter_mut().zip(more) {
        assert_eq!(*name, other);
        match (x, y) {
            (Statistic::Count(x), Statistic::Count(y)) => *x += y,
            _ => panic!("bleu's statistics are counts"),
        }
    }
}

#[test]
fn corpus_bleu_from_summed_statistics_matches_sacrebleu() {
    let samples: HashMap<String, Sample> = rows("multi_reference.jsonl")
        .iter()
        .map(|r| (r["id"].as_str().unwrap().to_string(), sample(r)))
        .collect();
    let mut failures = Vec::new();
    for batch in rows("corpus_multi_reference.jsonl") {
        let batch_samples: Vec<Sample> = batch["cases"]
            .as_array()
            .expect("cases")
            .iter()
            .map(|c| samples[c.as_str().unwrap()].clone())
            .collect();
        let whole = finalize(&score_samples(&batch_samples).statistics).unwrap();
        let want = batch["bleu"].as_f64().expect("bleu");
        if (whole[0].1 - want).abs() > TOLERANCE {
            failures.push(format!(
                "{:?}: bleu {}, sacrebleu {want}",
                batch["cases"], whole[0].1
            ));
        }
        for cut in 1..batch_samples.len() {
            let (a, b) = batch_samples.split_at(cut);
            let mut summed = Vec::new();
            add(&mut summed, score_samples(a).statistics);
            add(&mut summed, score_samples(b).statistics);
            assert_eq!(finalize(&summed).unwrap(), whole, "split bit for bit");
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
