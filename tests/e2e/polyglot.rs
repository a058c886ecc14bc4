//! The same metric written in Rust, Python (componentize-py) and JavaScript (componentize-js),
//! built here with their ordinary toolchains from the registries, loaded and run through the
//! real host: identical scores from all three.

use std::path::PathBuf;
use std::process::Command;

use crate::util::*;

/// Build the Python and JavaScript components with plugins/polyglot/build.sh (toolchains are
/// cached in ~/.cache/adapterlab/toolchains, components beside the host's wasm builds).
fn build_polyglot() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let out = PathBuf::from(adapterlab::plugin::registry::WASM_BUILD_DIR).join("polyglot");
    let status = Command::new("bash")
        .arg(root.join("plugins/polyglot/build.sh"))
        .arg(&out)
        .status()
        .expect("bash runs build.sh");
    assert!(status.success(), "plugins/polyglot/build.sh failed");
    out
}

#[test]
fn one_metric_in_three_languages_scores_identically() {
    let out = build_polyglot();
    let t = setup("polyglot");
    let components = [
        (
            "length",
            built_component("adapterlab-plugin-length"),
            "Rust",
        ),
        ("length-py", out.join("length-py.wasm"), "Python"),
        ("length-js", out.join("length-js.wasm"), "JavaScript"),
    ];
    for (name, path, language) in &components {
        let check = run_ok(&mut t.cmd(&["plugins", "check", path.to_str().unwrap(), "--json"]));
        let meta: serde_json::Value = serde_json::from_str(&check).unwrap();
        assert_eq!(meta["name"], *name);
        assert_eq!(meta["language"], *language, "{name}: {meta}");
        run_ok(&mut t.cmd(&["plugins", "install", path.to_str().unwrap()]));
    }
    let rows = [
        ("a", "one two three", "one two"),
        ("b", "  spaced\tout\nwords  ", "x"),
        ("c", "", "ref words here"),
        ("d", "Zoë 🚀 naïve", "two words"),
        ("e", "anything", ""),
    ];
    let lines: Vec<String> = rows
        .iter()
        .map(|(id, p, r)| {
            serde_json::json!({"id": id, "prediction": p, "reference": r}).to_string()
        })
        .collect();
    let p = t.write("p.jsonl", lines.join("\n"));
    let mut docs = Vec::new();
    for (name, _, _) in &components {
        let out = t.path().join(format!("{name}.json"));
        run_ok(&mut t.cmd(&[
            "eval",
            "--predictions",
            p.to_str().unwrap(),
            "--metrics",
            name,
            "--set",
            &format!("{name}.max_ratio=2.5"),
            "--json",
            out.to_str().unwrap(),
        ]));
        docs.push(read_json(&out));
    }
    let rust = &docs[0];
    assert_eq!(rust["samples"][0]["scores"]["length_words"], 3.0);
    assert_eq!(rust["samples"][0]["scores"]["length_ratio"], 1.5);
    assert_eq!(
        rust["samples"][1]["scores"]["length_ratio"], 2.5,
        "clipped by max_ratio"
    );
    assert!(
        rust["samples"][4]["errors"]["length"]
            .as_str()
            .unwrap()
            .contains("reference is empty")
    );
    for (doc, (name, _, _)) in docs.iter().zip(&components).skip(1) {
        for (i, (a, b)) in rust["samples"]
            .as_array()
            .unwrap()
            .iter()
            .zip(doc["samples"].as_array().unwrap())
            .enumerate()
        {
            assert_eq!(a["scores"], b["scores"], "{name}, sample {i}");
            assert_eq!(
                a["errors"].as_object().unwrap().len(),
                b["errors"].as_object().unwrap().len(),
                "{name}, sample {i}"
            );
        }
        assert_eq!(rust["corpus"], doc["corpus"], "{name}");
    }
}
