//! Contract 0.2.0 end to end: a 0.1.0 plugin (`length`, built with the SDK's `v0_1`) and the
//! 0.2.0 built-ins score multi-reference samples in one evaluation; corpus BLEU from summed
//! statistics does not depend on how the samples were split across instances; reports and
//! comparisons show every reference.

use crate::util::{TestDir, built_component, read_json, run_fail, run_ok, setup};

fn write(t: &TestDir, name: &str, rows: &[serde_json::Value]) -> std::path::PathBuf {
    let lines: Vec<String> = rows.iter().map(|r| r.to_string()).collect();
    t.write(name, lines.join("\n"))
}

fn eval(
    t: &TestDir,
    predictions: &std::path::Path,
    metrics: &str,
    extra: &[&str],
    name: &str,
) -> serde_json::Value {
    let out = t.path().join(format!("{name}.json"));
    let mut args = vec![
        "eval",
        "--predictions",
        predictions.to_str().unwrap(),
        "--metrics",
        metrics,
        "--name",
        name,
        "--json",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    run_ok(&mut t.cmd(&args));
    read_json(&out)
}

fn score(doc: &serde_json::Value, sample: usize, name: &str) -> f64 {
    doc["samples"][sample]["scores"][name]
        .as_f64()
        .unwrap_or_else(|| panic!("sample {sample} has no {name}: {}", doc["samples"][sample]))
}

#[test]
fn a_0_1_0_and_a_0_2_0_plugin_score_multi_reference_samples_in_one_run() {
    let t = setup("contract-multi");
    let length = built_component("adapterlab-plugin-length");
    let check = run_ok(&mut t.cmd(&["plugins", "check", length.to_str().unwrap(), "--json"]));
    let meta: serde_json::Value = serde_json::from_str(&check).unwrap();
    assert_eq!(meta["contract"], "0.1.0", "{meta}");
    run_ok(&mut t.cmd(&["plugins", "install", length.to_str().unwrap()]));

    let rows = [
        (
            "1",
            "Amanda baked cookies for Jerry.",
            vec![
                "Amanda baked cookies and will bring Jerry some tomorrow.",
                "Amanda made cookies for Jerry.",
            ],
        ),
        (
            "2",
            "one two three four",
            vec!["one two", "a b c d e f g h"],
        ),
        (
            "3",
            "Tim is late.",
            vec!["Tim is running late, he will be there in ten minutes."],
        ),
    ];
    let multi: Vec<serde_json::Value> = rows
        .iter()
        .map(|(id, p, refs)| serde_json::json!({"id": id, "prediction": p, "references": refs}))
        .collect();
    let p = write(&t, "multi.jsonl", &multi);
    let doc = eval(&t, &p, "rouge,bleu,length", &[], "multi");
    assert_eq!(doc["samples"].as_array().unwrap().len(), 3);
    for s in doc["samples"].as_array().unwrap() {
        assert!(s["errors"].as_object().unwrap().is_empty(), "{s}");
    }
    // The stored sample keeps every reference.
    let show = run_ok(&mut t.cmd(&["runs", "show", "multi", "--json", "--samples"]));
    let show: serde_json::Value = serde_json::from_str(&show).unwrap();
    assert_eq!(
        show["samples"][1]["references"][1], "a b c d e f g h",
        "{show}"
    );

    // Each reference alone, to check the rules for several.
    let single = |k: usize| {
        let rows: Vec<serde_json::Value> = rows
            .iter()
            .map(|(id, p, refs)| {
                serde_json::json!({"id": id, "prediction": p, "reference": refs[k.min(refs.len() - 1)]})
            })
            .collect();
        let p = write(&t, &format!("single{k}.jsonl"), &rows);
        eval(&t, &p, "rouge,length", &[], &format!("single{k}"))
    };
    let (first, second) = (single(0), single(1));
    for i in 0..rows.len() {
        // 0.2.0 rouge: rouge-score's score_multi, the best F-measure.
        for name in ["rouge1", "rouge2", "rougeL", "rougeLsum"] {
            let best = score(&first, i, name).max(score(&second, i, name));
            assert_eq!(score(&doc, i, name), best, "sample {i} {name}");
        }
        // 0.1.0 length: scored once per reference, the best by its declared direction
        // (length_ratio: lower is better).
        let best = score(&first, i, "length_ratio").min(score(&second, i, "length_ratio"));
        assert_eq!(score(&doc, i, "length_ratio"), best, "sample {i}");
    }
    assert_eq!(score(&doc, 1, "length_ratio"), 0.5);
    assert!(
        doc["corpus"]["bleu"].as_f64().is_some(),
        "{}",
        doc["corpus"]
    );

    // Reports and comparisons of multi-reference runs.
    let md = run_ok(&mut t.cmd(&["report", "multi", "--format", "md"]));
    assert!(
        md.contains("Reference 2") && md.contains("a b c d e f g h"),
        "{md}"
    );
    let cmp = run_ok(&mut t.cmd(&["runs", "compare", "single0", "multi", "--json"]));
    let cmp: serde_json::Value = serde_json::from_str(&cmp).unwrap();
    assert!(
        cmp["deltas"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["score"] == "rouge1"),
        "{cmp}"
    );
    let html = t.path().join("cmp.html");
    run_ok(&mut t.cmd(&[
        "report",
        "single0,multi",
        "--format",
        "html",
        "--out",
        html.to_str().unwrap(),
    ]));
}

#[test]
fn corpus_bleu_is_the_same_however_the_samples_are_split() {
    let t = setup("contract-split");
    let words = [
        "the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "home",
    ];
    let rows: Vec<serde_json::Value> = (0..97)
        .map(|i| {
            let pick = |k: usize, n: usize| -> String {
                (0..n)
                    .map(|j| words[(i * 7 + k * 3 + j * j) % words.len()])
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            let refs: Vec<String> = (0..1 + i % 3)
                .map(|k| pick(k + 1, 4 + (i + k) % 6))
                .collect();
            serde_json::json!({"id": i, "prediction": pick(0, 3 + i % 7), "references": refs})
        })
        .collect();
    let p = write(&t, "p.jsonl", &rows);
    let one = eval(
        &t,
        &p,
        "rouge,bleu",
        &["--set", "bleu.parallel=1", "--set", "rouge.parallel=1"],
        "one",
    );
    let bleu = one["corpus"]["bleu"].as_f64().unwrap();
    for (parallel, batch) in [("3", "97"), ("1", "10"), ("4", "7")] {
        let name = format!("p{parallel}b{batch}");
        let doc = eval(
            &t,
            &p,
            "rouge,bleu",
            &[
                "--set",
                &format!("bleu.parallel={parallel}"),
                "--set",
                &format!("bleu.batch_size={batch}"),
                "--set",
                &format!("rouge.parallel={parallel}"),
            ],
            &name,
        );
        assert_eq!(
            doc["corpus"]["bleu"].as_f64().unwrap().to_bits(),
            bleu.to_bits(),
            "{name}"
        );
        assert_eq!(doc["samples"], one["samples"], "{name}");
    }
    // A metric whose samples are not independent cannot be split.
    let err = run_fail(&mut t.cmd(&[
        "eval",
        "--predictions",
        p.to_str().unwrap(),
        "--metrics",
        "bertscore",
        "--set",
        "bertscore.parallel=2",
    ]));
    assert!(
        err.contains("bertscore.parallel") && err.contains("cannot be split"),
        "{err}"
    );
}

#[test]
fn a_predictions_file_with_reference_and_references_is_refused_by_line() {
    let t = setup("contract-input");
    let p = t.write(
        "p.jsonl",
        "{\"id\":\"a\",\"prediction\":\"x\",\"reference\":\"y\"}\n{\"id\":\"b\",\"prediction\":\"x\",\"reference\":\"y\",\"references\":[\"y\"]}\n{\"id\":\"c\",\"prediction\":\"x\",\"references\":[]}\n",
    );
    let err = run_fail(&mut t.cmd(&[
        "eval",
        "--predictions",
        p.to_str().unwrap(),
        "--metrics",
        "rouge",
    ]));
    assert!(
        err.contains("line 2") && err.contains("both `reference` and `references`"),
        "{err}"
    );
    assert!(
        err.contains("line 3") && err.contains("empty list"),
        "{err}"
    );
}
