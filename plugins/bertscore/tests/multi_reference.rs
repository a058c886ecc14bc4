//! Multi-reference BERTScore against bert-score's own `score(cands, [[refs...]])`, from
//! `fixtures/bertscore_multi.json` (made by `fixtures/make_multi_reference.py` with the real
//! all-MiniLM-L6-v2; its `generator` names the versions). The fixture keeps the token vectors
//! bert-score scored, so this checks the plugin's scoring of them — the grouping, the best over
//! references taken per score, idf over the flattened references, the empty prediction, the
//! baseline rescaling — through the plugin's own `score_multi`. The host's encoder is checked
//! against the same vectors in `host/model/tests/real_assets.rs`.

use std::collections::HashMap;

use adapterlab_plugin_bertscore::{Embedding, Options, score_multi};
use adapterlab_sdk::metric::SampleResult;
use adapterlab_sdk::metric::embed::TokenEmbeddings;
use base64::Engine;
use serde_json::Value;

/// bert-score computes in float32 (cosines of normalised vectors, idf-weighted sums, then
/// rescaling); this plugin in f64 from the same f32 vectors. Differences come from bert-score's
/// roundings alone: a few float32 ulps of a value below 1, amplified by at most 1/(1-b) ≈ 1.7
/// when rescaled.
const TOLERANCE: f64 = 1e-5;

fn fixture() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/bertscore_multi.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).expect("the fixture")).expect("JSON")
}

fn embeddings(fixture: &Value) -> HashMap<String, Embedding> {
    let (cls, sep) = (
        fixture["cls"].as_u64().expect("cls") as u32,
        fixture["sep"].as_u64().expect("sep") as u32,
    );
    let dim = fixture["encoder"]["dim"].as_u64().expect("dim") as usize;
    fixture["texts"]
        .as_array()
        .expect("texts")
        .iter()
        .map(|t| {
            let ids: Vec<u32> = t["ids"]
                .as_array()
                .expect("ids")
                .iter()
                .map(|x| x.as_u64().expect("an id") as u32)
                .collect();
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(t["vectors_f32le"].as_str().expect("vectors"))
                .expect("base64");
            let vectors: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            assert_eq!(vectors.len(), ids.len() * dim, "{:?}", t["text"]);
            let embedding = TokenEmbeddings {
                tokens: ids.iter().map(|id| format!("#{id}")).collect(),
                special: ids.iter().map(|&id| id == cls || id == sep).collect(),
                ids,
                vectors,
            };
            (t["text"].as_str().expect("text").to_string(), Ok(embedding))
        })
        .collect()
}

#[test]
fn matches_bert_score_with_several_references() {
    let fixture = fixture();
    let texts = embeddings(&fixture);
    let samples = fixture["samples"].as_array().expect("samples");
    let groups: Vec<(&Embedding, Vec<&Embedding>)> = samples
        .iter()
        .map(|s| {
            let text = |v: &Value| &texts[v.as_str().expect("a text")];
            (
                text(&s["prediction"]),
                s["references"]
                    .as_array()
                    .expect("references")
                    .iter()
                    .map(text)
                    .collect(),
            )
        })
        .collect();
    assert!(
        groups.iter().any(|(_, r)| r.len() >= 3),
        "the fixture has samples with three or more references"
    );

    let (mut failures, mut checked, mut worst) = (Vec::new(), 0, 0f64);
    let runs = fixture["runs"].as_array().expect("runs");
    for run in runs {
        let baseline = run["baseline"].as_array().map(|b| {
            let v: Vec<f64> = b.iter().map(|x| x.as_f64().expect("a number")).collect();
            [v[0], v[1], v[2]]
        });
        let options = Options {
            dim: fixture["encoder"]["dim"].as_u64().expect("dim") as usize,
            idf: run["idf"].as_bool().expect("idf"),
            baseline,
        };
        let label = format!("idf {} baseline {:?}", options.idf, options.baseline);
        for (k, result) in score_multi(&groups, &options).iter().enumerate() {
            let SampleResult::Scores(scores) = result else {
                failures.push(format!("{label}, sample {k}: {result:?}"));
                continue;
            };
            for ((name, got), key) in scores.iter().zip(["P", "R", "F"]) {
                let want = run[key][k].as_f64().expect("a number");
                checked += 1;
                worst = worst.max((got - want).abs());
                if (got - want).abs() > TOLERANCE {
                    failures.push(format!(
                        "{label}, sample {k} {name}: got {got}, bert-score {want}"
                    ));
                }
            }
        }
    }
    eprintln!(
        "{checked} values checked against {}; largest difference {worst:e}",
        fixture["generator"]
    );
    assert_eq!(checked, runs.len() * samples.len() * 3);
    assert!(runs.len() >= 3, "idf off, idf on and a baseline");
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
