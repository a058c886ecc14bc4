//! The sandbox: a plugin that loops, hoards memory, traps or returns malformed output gets a
//! clear error on the samples it failed; every other result of the run is kept.

use crate::util::*;

const CASES: &[(&str, &str)] = &[
    ("ok", "hello"),
    ("loops", "loop"),
    ("hoards", "memory"),
    ("traps", "trap"),
    ("nan", "nan"),
    ("undeclared", "undeclared"),
    ("out-of-range", "range"),
    ("prints", "print"),
];

fn predictions(t: &TestDir) -> std::path::PathBuf {
    let lines: Vec<String> = CASES
        .iter()
        .map(|(id, p)| {
            serde_json::json!({"id": id, "prediction": p, "reference": "ref"}).to_string()
        })
        .collect();
    t.write("p.jsonl", lines.join("\n"))
}

fn install_misbehave(t: &TestDir) {
    let wasm = built_component("adapterlab-test-misbehave");
    run_ok(&mut t.cmd(&["plugins", "install", wasm.to_str().unwrap()]));
}

fn error_of<'a>(doc: &'a serde_json::Value, id: &str) -> &'a str {
    let sample = doc["samples"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .unwrap();
    sample["errors"]["misbehave"]
        .as_str()
        .unwrap_or_else(|| panic!("{id} has no misbehave error: {sample}"))
}

fn score_of(doc: &serde_json::Value, id: &str) -> f64 {
    let sample = doc["samples"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .unwrap();
    sample["scores"]["chars"]
        .as_f64()
        .unwrap_or_else(|| panic!("{id} has no score: {sample}"))
}

#[test]
fn each_failure_mode_is_stopped_and_named() {
    let t = setup("sandbox-modes");
    install_misbehave(&t);
    let p = predictions(&t);
    let out = t.path().join("out.json");
    let started = std::time::Instant::now();
    run_ok(
        t.cmd(&[
            "eval",
            "--predictions",
            p.to_str().unwrap(),
            "--metrics",
            "misbehave",
            "--set",
            "misbehave.batch_size=1",
            "--json",
            out.to_str().unwrap(),
        ])
        .env("ADAPTERLAB_PLUGIN_TIMEOUT_MS", "1000")
        .env("ADAPTERLAB_PLUGIN_MEMORY_MIB", "64"),
    );
    assert!(
        started.elapsed().as_secs() < 60,
        "the sandbox took too long: {:?}",
        started.elapsed()
    );
    let doc = read_json(&out);
    assert_eq!(doc["status"], "done");
    assert_eq!(
        doc["samples"].as_array().unwrap().len(),
        CASES.len(),
        "no sample may be lost"
    );
    assert_eq!(score_of(&doc, "ok"), 5.0);
    assert_eq!(score_of(&doc, "prints"), 5.0);
    assert!(
        error_of(&doc, "loops").contains("deadline"),
        "{}",
        error_of(&doc, "loops")
    );
    assert!(
        error_of(&doc, "hoards").contains("memory limit of 64 MiB"),
        "{}",
        error_of(&doc, "hoards")
    );
    assert!(
        error_of(&doc, "traps").contains("trapped"),
        "{}",
        error_of(&doc, "traps")
    );
    for id in ["nan", "undeclared", "out-of-range"] {
        assert!(
            error_of(&doc, id).contains("malformed output"),
            "{id}: {}",
            error_of(&doc, id)
        );
    }
    assert!(error_of(&doc, "undeclared").contains("bogus"));
}

#[test]
fn a_trap_in_a_batch_costs_only_its_sample() {
    let t = setup("sandbox-batch");
    install_misbehave(&t);
    let lines = ["hello", "trap", "worlds"]
        .iter()
        .enumerate()
        .map(|(i, p)| serde_json::json!({"id": i, "prediction": p, "reference": "r"}).to_string())
        .collect::<Vec<_>>()
        .join("\n");
    let p = t.write("p.jsonl", lines);
    let out = t.path().join("out.json");
    run_ok(&mut t.cmd(&[
        "eval",
        "--predictions",
        p.to_str().unwrap(),
        "--metrics",
        "misbehave",
        "--json",
        out.to_str().unwrap(),
    ]));
    let doc = read_json(&out);
    assert_eq!(score_of(&doc, "0"), 5.0);
    assert!(error_of(&doc, "1").contains("trapped"));
    assert_eq!(score_of(&doc, "2"), 6.0);
}

#[test]
fn undeclared_capabilities_are_refused() {
    let t = setup("sandbox-capability");
    install_misbehave(&t);
    let p = t.write("p.jsonl", r#"{"id":"a","prediction":"x","reference":"y"}"#);
    let out = t.path().join("out.json");
    // The metric fails on its only sample, so the run fails (exit code 3).
    let mut cmd = t.cmd(&[
        "eval",
        "--predictions",
        p.to_str().unwrap(),
        "--metrics",
        "misbehave",
        "--set",
        "misbehave.batch=chat",
        "--json",
        out.to_str().unwrap(),
    ]);
    assert_eq!(cmd.output().unwrap().status.code(), Some(3));
    let doc = read_json(&out);
    let e = error_of(&doc, "a");
    assert!(
        e.contains("capability `chat` is not granted to plugin misbehave"),
        "{e}"
    );
}
