//! Golden test against `fixtures/bertscore.json` (made by `fixtures/make_fixtures.py`; the
//! fixture's `generator` says whether bert-score's own `greedy_cos_idf` under torch or its
//! numpy transliteration computed it). Each batch is scored through the plugin's own path,
//! `score_pairs`, so idf comes from the batch's references as in the plugin.

use adapterlab_plugin_bertscore::{Embedding, Options, score_pairs};
use adapterlab_sdk::metric::SampleResult;
use adapterlab_sdk::metric::embed::TokenEmbeddings;
use serde_json::Value;

/// bert-score computes in float32; this plugin in f64 from the same f32 inputs.
const TOLERANCE: f64 = 1e-5;

fn embeddings(v: &Value) -> Embedding {
    let ids: Vec<u32> = v["ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|x| x.as_u64().expect("an id") as u32)
        .collect();
    let special = v["special"]
        .as_array()
        .expect("special")
        .iter()
        .map(|x| x.as_bool().expect("a flag"))
        .collect();
    let vectors = v["vectors"]
        .as_array()
        .expect("vectors")
        .iter()
        .flat_map(|row| {
            row.as_array()
                .expect("a row")
                .iter()
                .map(|x| x.as_f64().expect("a number") as f32)
        })
        .collect();
    Ok(TokenEmbeddings {
        tokens: ids.iter().map(|id| format!("#{id}")).collect(),
        ids,
        special,
        vectors,
    })
}

#[test]
fn matches_bert_score() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/bertscore.json");
    let fixture: Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("the fixture")).expect("JSON");
    let mut failures = Vec::new();
    let mut checked = 0;
    let mut worst: f64 = 0.0;
    for (b, batch) in fixture["batches"]
        .as_array()
        .expect("batches")
        .iter()
        .enumerate()
    {
        let pairs_json = batch["pairs"].as_array().expect("pairs");
        let embedded: Vec<(
            Result<TokenEmbeddings, String>,
            Result<TokenEmbeddings, String>,
        )> = pairs_json
            .iter()
            .map(|p| (embeddings(&p["prediction"]), embeddings(&p["reference"])))
            .collect();
        let pairs: Vec<_> = embedded.iter().map(|(p, r)| (p, r)).collect();
        let baseline = batch["baseline"].as_array().map(|b| {
            let v: Vec<f64> = b.iter().map(|x| x.as_f64().expect("a number")).collect();
            [v[0], v[1], v[2]]
        });
        let options = Options {
            dim: batch["dim"].as_u64().expect("dim") as usize,
            idf: batch["idf"].as_bool().expect("idf"),
            baseline,
        };
        let results = score_pairs(&pairs, &options);
        for (k, (result, pair)) in results.iter().zip(pairs_json).enumerate() {
            let expect = if baseline.is_some() {
                &pair["expect_rescaled"]
            } else {
                &pair["expect"]
            };
            let SampleResult::Scores(scores) = result else {
                failures.push(format!("batch {b} pair {k}: {result:?}"));
                continue;
            };
            for ((name, got), want) in scores.iter().zip(expect.as_array().expect("P,R,F")) {
                let want = want.as_f64().expect("a number");
                checked += 1;
                worst = worst.max((got - want).abs());
                if (got - want).abs() > TOLERANCE {
                    failures.push(format!(
                        "batch {b} pair {k} {name}: got {got}, bert-score {want}"
                    ));
                }
            }
        }
    }
    eprintln!(
        "{checked} values checked against {}; largest difference {worst:e}",
        fixture["generator"]
    );
    assert!(checked > 100, "only {checked} values");
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
