//! Adapters and target modules that do not fit the model are errors naming what did not
//! match, on the command line and through the server, never a silent no-op that generates
//! the base model's tokens or trains an adapter missing layers.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use serde_json::json;

use crate::server::{TOKEN, post, rt, start_with, wait_for};
use crate::train::{dataset, tiny_model};
use crate::util::*;

/// A PEFT folder for a Falcon (`query_key_value`), which the tiny Llama does not have.
fn falcon_adapter(t: &TestDir) -> std::path::PathBuf {
    let dir = t.path().join("falcon-adapter");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("adapter_config.json"),
        json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["query_key_value"],
               "task_type": "CAUSAL_LM", "base_model_name_or_path": "tiiuae/falcon-7b"})
        .to_string(),
    )
    .unwrap();
    let prefix = "base_model.model.transformer.h.0.self_attention.query_key_value";
    let tensors: HashMap<String, Tensor> = [
        (
            format!("{prefix}.lora_A.weight"),
            Tensor::zeros((2, 8), DType::F32, &Device::Cpu).unwrap(),
        ),
        (
            format!("{prefix}.lora_B.weight"),
            Tensor::zeros((24, 2), DType::F32, &Device::Cpu).unwrap(),
        ),
    ]
    .into();
    candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors")).unwrap();
    dir
}

#[test]
fn a_mismatched_adapter_is_refused_on_the_command_line() {
    let t = setup("attach-cli");
    let model = tiny_model(&t);
    let adapter = falcon_adapter(&t);
    for command in ["generate", "eval-loss"] {
        let mut args = vec![
            command,
            "--model",
            model.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
        ];
        let rows = t.write("rows.jsonl", r#"{"prompt": "a b", "completion": " c"}"#);
        if command == "generate" {
            args.extend(["--prompt", "hello", "--max-new-tokens", "2"]);
        } else {
            args.extend(["--data", rows.to_str().unwrap()]);
        }
        let e = run_fail(&mut t.cmd(&args));
        assert!(
            e.contains("does not fit the model") && e.contains("query_key_value"),
            "{command}: {e}"
        );
        assert!(e.contains("q_proj"), "names what the model has: {e}");
    }
    // A name that is neither a folder nor a stored adapter says so.
    let e = run_fail(&mut t.cmd(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        "no-such-adapter",
        "--prompt",
        "x",
    ]));
    assert!(e.contains("no-such-adapter"), "{e}");
}

#[test]
fn a_target_module_that_matches_nothing_is_refused_before_training() {
    let t = setup("attach-train");
    let model = tiny_model(&t);
    let data = dataset(&t);
    let out = t.path().join("out");
    let e = run_fail(&mut t.cmd(&[
        "train",
        "--set",
        &format!("model_name_or_path={}", model.display()),
        "--set",
        &format!("dataset={}", data.display()),
        "--set",
        &format!("output_dir={}", out.display()),
        "--set",
        "max_steps=1",
        "--set",
        "lora.target_modules=q_proj,nonexistent_proj",
    ]));
    assert!(
        e.contains("nonexistent_proj") && !e.contains("\"q_proj\""),
        "{e}"
    );
    assert!(
        !out.join("adapter_config.json").exists(),
        "nothing written for a refused config"
    );

    // The dataset lies in the test's folder, outside the data directory.
    let server = start_with(&t, &["--allow-path", t.path().to_str().unwrap()], &[]);
    let base = server.base.clone();
    let (model, data) = (model.display().to_string(), data.display().to_string());
    rt().block_on(async move {
        let (status, body) = post(
            &base,
            "/api/runs",
            Some(TOKEN),
            json!({
                "kind": "train",
                "config": {"model_name_or_path": model, "dataset": data, "max_steps": 1,
                           "lora": {"target_modules": ["q_proj", "nonexistent_proj"]}}
            }),
        )
        .await;
        assert!((400..500).contains(&status), "{status} {body}");
        assert!(body.to_string().contains("nonexistent_proj"), "{body}");
    });
}

#[test]
fn a_mismatched_adapter_is_refused_by_the_server() {
    let t = setup("attach-server");
    let model = tiny_model(&t);
    let adapter = falcon_adapter(&t);
    let server = start_with(&t, &["--allow-path", t.path().to_str().unwrap()], &[]);
    let base = server.base.clone();
    let (model, adapter) = (model.display().to_string(), adapter.display().to_string());
    rt().block_on(async move {
        let (status, body) = post(
            &base,
            "/api/runs",
            Some(TOKEN),
            json!({"kind": "generate", "model": model, "adapter": adapter, "max_new_tokens": 2,
                   "inputs": [{"id": 1, "source": "A: hi\nB: hello"}]}),
        )
        .await;
        // Refused when it is queued, or failed when it runs: never generations of the base.
        let error = if (400..500).contains(&status) {
            body.to_string()
        } else {
            assert_eq!(status, 201, "{body}");
            let id = body["id"].as_str().unwrap().to_string();
            let run = wait_for(
                &base,
                &id,
                |r| r["status"] != "queued" && r["status"] != "running",
                120,
            )
            .await;
            assert_eq!(run["status"], "failed", "{run}");
            run["error"].to_string()
        };
        assert!(
            error.contains("does not fit the model") && error.contains("query_key_value"),
            "{error}"
        );
    });
}
