//! `report_to`: a training run's steps reach TensorBoard event files (read back by the real
//! `tensorboard` package) and an MLflow tracking server (a fake here that answers as MLflow's
//! REST API does and records every request; `scripts/check/mlflow_real.sh` runs the same
//! against a real `mlflow server`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{StatusCode, Uri};
use axum::routing::{get, post, put};
use serde_json::{Value, json};

use crate::train::{dataset, tiny_model};
use crate::util::*;

fn train(t: &TestDir, out: &Path, report_to: &str, env: &[(&str, String)]) {
    train_with(t, out, report_to, env, &[]);
}

/// [`train`] with more `--set KEY=VALUE`s.
fn train_with(t: &TestDir, out: &Path, report_to: &str, env: &[(&str, String)], sets: &[String]) {
    let model = tiny_model(t);
    let data = dataset(t);
    let mut cmd = t.cmd(&["train"]);
    for kv in [
        format!("model_name_or_path={}", model.display()),
        format!("dataset={}", data.display()),
        format!("output_dir={}", out.display()),
        "max_steps=8".into(),
        "per_device_train_batch_size=4".into(),
        "logging_steps=1".into(),
        "eval_steps=4".into(),
        "save_steps=4".into(),
        "max_seq_length=64".into(),
        "lora.r=4".into(),
        format!("report_to={report_to}"),
    ]
    .iter()
    .chain(sets)
    {
        cmd.arg("--set").arg(kv);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    run_ok(&mut cmd);
}

#[test]
fn tensorboard_event_files_hold_every_logged_scalar() {
    let t = setup("track-tensorboard");
    let out = t.path().join("out");
    train(&t, &out, "tensorboard", &[]);
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/check/tensorboard_read.sh");
    let output = std::process::Command::new("bash")
        .arg(&script)
        .arg(out.join("runs"))
        .output()
        .expect("bash runs the reader");
    assert!(
        output.status.success(),
        "the tensorboard package could not read the event files (or could not be installed): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let scalars: Value = serde_json::from_slice(&output.stdout).unwrap();
    let steps = |tag: &str| -> Vec<u64> {
        scalars[tag]
            .as_array()
            .unwrap_or_else(|| panic!("no {tag} in {scalars}"))
            .iter()
            .map(|p| p[0].as_u64().unwrap())
            .collect()
    };
    assert_eq!(steps("train/loss"), (1..=8).collect::<Vec<_>>());
    for tag in [
        "train/learning_rate",
        "train/grad_norm",
        "train/tokens_per_second",
        "train/epoch",
    ] {
        assert_eq!(steps(tag).len(), 8, "{tag}");
    }
    let eval = steps("eval/loss");
    assert!(
        eval.contains(&0) && eval.contains(&4) && eval.contains(&8),
        "{eval:?}"
    );
    assert!(scalars["train/loss"][0][1].as_f64().unwrap() > 0.0);
    assert!(
        scalars["__text_tags__"].to_string().contains("args"),
        "{scalars}"
    );

    // The stored run exported afterwards gives the same curve.
    let runs: Value =
        serde_json::from_str(&run_ok(&mut t.cmd(&["runs", "list", "--json"]))).unwrap();
    let id = runs[0]["id"].as_str().unwrap();
    let exported = t.path().join("exported");
    run_ok(&mut t.cmd(&[
        "runs",
        "export",
        id,
        "--to",
        "tensorboard",
        "--out",
        exported.to_str().unwrap(),
    ]));
    let output = std::process::Command::new("bash")
        .arg(&script)
        .arg(exported.join("runs"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let again: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        again["train/loss"],
        scalars["train/loss"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| json!([p[0], p[1]]))
            .collect::<Value>()
    );
}

/// What the fake MLflow server was sent.
#[derive(Default)]
struct Received {
    params: Vec<(String, String)>,
    metrics: Vec<(String, f64, u64)>,
    artifacts: Vec<(String, usize)>,
    experiment: Option<String>,
    run_name: Option<String>,
    status: Option<String>,
}

type Shared = Arc<Mutex<Received>>;

async fn get_by_name(uri: Uri) -> (StatusCode, axum::Json<Value>) {
    assert!(
        uri.query()
            .unwrap_or_default()
            .contains("experiment_name=adapterlab-test"),
        "{uri}"
    );
    (
        StatusCode::NOT_FOUND,
        axum::Json(
            json!({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no such experiment"}),
        ),
    )
}

async fn create_experiment(
    State(s): State<Shared>,
    axum::Json(body): axum::Json<Value>,
) -> axum::Json<Value> {
    s.lock().unwrap().experiment = body["name"].as_str().map(str::to_string);
    axum::Json(json!({"experiment_id": "7"}))
}

async fn create_run(
    State(s): State<Shared>,
    axum::Json(body): axum::Json<Value>,
) -> axum::Json<Value> {
    assert_eq!(body["experiment_id"], "7", "{body}");
    s.lock().unwrap().run_name = body["run_name"].as_str().map(str::to_string);
    assert!(body["start_time"].as_u64().is_some(), "{body}");
    axum::Json(
        json!({"run": {"info": {"run_id": "r1", "experiment_id": "7",
        "artifact_uri": "mlflow-artifacts:/7/r1/artifacts", "status": "RUNNING"}}}),
    )
}

async fn log_batch(
    State(s): State<Shared>,
    axum::Json(body): axum::Json<Value>,
) -> axum::Json<Value> {
    assert_eq!(body["run_id"], "r1");
    let mut s = s.lock().unwrap();
    for p in body["params"].as_array().into_iter().flatten() {
        s.params.push((
            p["key"].as_str().unwrap().into(),
            p["value"].as_str().unwrap().into(),
        ));
    }
    for m in body["metrics"].as_array().into_iter().flatten() {
        assert!(m["timestamp"].as_u64().is_some(), "{m}");
        s.metrics.push((
            m["key"].as_str().unwrap().into(),
            m["value"].as_f64().unwrap(),
            m["step"].as_u64().unwrap(),
        ));
    }
    axum::Json(json!({}))
}

async fn upload(
    State(s): State<Shared>,
    UrlPath(path): UrlPath<String>,
    body: Bytes,
) -> StatusCode {
    s.lock().unwrap().artifacts.push((path, body.len()));
    StatusCode::OK
}

async fn update_run(
    State(s): State<Shared>,
    axum::Json(body): axum::Json<Value>,
) -> axum::Json<Value> {
    s.lock().unwrap().status = body["status"].as_str().map(str::to_string);
    axum::Json(json!({"run_info": {}}))
}

#[test]
fn mlflow_gets_params_metrics_per_step_the_adapter_and_the_status() {
    let t = setup("track-mlflow");
    let received: Shared = Arc::default();
    let app = Router::new()
        .route("/api/2.0/mlflow/experiments/get-by-name", get(get_by_name))
        .route(
            "/api/2.0/mlflow/experiments/create",
            post(create_experiment),
        )
        .route("/api/2.0/mlflow/runs/create", post(create_run))
        .route("/api/2.0/mlflow/runs/log-batch", post(log_batch))
        .route("/api/2.0/mlflow/runs/update", post(update_run))
        .route("/api/2.0/mlflow-artifacts/artifacts/{*path}", put(upload))
        .with_state(received.clone());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    runtime.spawn(async move { axum::serve(listener, app).await.unwrap() });

    let out = t.path().join("out");
    // HF's run_name names the tracker's run; logging_dir is where TensorBoard writes.
    let logs = t.path().join("tb-logs");
    train_with(
        &t,
        &out,
        "mlflow,tensorboard",
        &[
            ("MLFLOW_TRACKING_URI", format!("http://{addr}")),
            ("MLFLOW_EXPERIMENT_NAME", "adapterlab-test".into()),
        ],
        &[
            "run_name=qlora-v1".into(),
            format!("logging_dir={}", logs.display()),
        ],
    );
    let events: Vec<String> = std::fs::read_dir(&logs)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        events.iter().any(|n| n.starts_with("events.out.tfevents.")),
        "{events:?}"
    );
    assert!(
        !out.join("runs").exists(),
        "logging_dir replaces <output_dir>/runs"
    );
    let r = received.lock().unwrap();
    assert_eq!(r.run_name.as_deref(), Some("qlora-v1"));
    assert_eq!(r.experiment.as_deref(), Some("adapterlab-test"));
    let param = |k: &str| {
        r.params
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(param("lora.r").as_deref(), Some("4"));
    assert_eq!(param("max_steps").as_deref(), Some("8"));
    let steps = |key: &str| -> Vec<u64> {
        r.metrics
            .iter()
            .filter(|m| m.0 == key)
            .map(|m| m.2)
            .collect()
    };
    assert_eq!(steps("loss"), (1..=8).collect::<Vec<_>>());
    assert_eq!(steps("learning_rate").len(), 8);
    assert!(steps("eval_loss").contains(&8), "{:?}", steps("eval_loss"));
    let files: Vec<&str> = r.artifacts.iter().map(|(p, _)| p.as_str()).collect();
    assert!(
        files.contains(&"7/r1/artifacts/adapter/adapter_model.safetensors"),
        "{files:?}"
    );
    assert!(
        files.contains(&"7/r1/artifacts/adapter/adapter_config.json"),
        "{files:?}"
    );
    assert_eq!(r.status.as_deref(), Some("FINISHED"));
}

#[test]
fn an_unknown_tracker_is_refused_before_training() {
    let t = setup("track-unknown");
    let out = t.path().join("out");
    let model = tiny_model(&t);
    let e = run_fail(&mut t.cmd(&[
        "train",
        "--set",
        &format!("model_name_or_path={}", model.display()),
        "--set",
        &format!("output_dir={}", out.display()),
        "--set",
        "report_to=wandb",
    ]));
    assert!(e.contains("wandb sync --sync-tensorboard"), "{e}");
}

/// `eval_strategy = "steps"` with `[generation_eval]`: each evaluation generates for some
/// validation rows and scores them with metric plugins; log_history holds `eval_bleu` beside
/// `eval_loss` as HF logs them; the best checkpoint by `metric_for_best_model` survives
/// rotation and becomes the final adapter.
#[test]
fn generation_metrics_during_training_pick_the_best_checkpoint() {
    let t = setup("track-generation-eval");
    let model = tiny_model(&t);
    let data = dataset(&t);
    let out = t.path().join("out");
    let mut cmd = t.cmd(&["train"]);
    for kv in [
        format!("model_name_or_path={}", model.display()),
        format!("dataset={}", data.display()),
        format!("output_dir={}", out.display()),
        "max_steps=6".into(),
        "per_device_train_batch_size=4".into(),
        "learning_rate=0.01".into(),
        "logging_steps=1".into(),
        "eval_strategy=steps".into(),
        "eval_steps=2".into(),
        "save_steps=2".into(),
        "save_total_limit=1".into(),
        "max_seq_length=64".into(),
        "lora.r=4".into(),
        "generation_eval.metrics=bleu,length".into(),
        "generation_eval.rows=3".into(),
        "generation_eval.max_new_tokens=6".into(),
        "metric_for_best_model=length_words".into(),
        "greater_is_better=false".into(),
        "load_best_model_at_end=true".into(),
    ] {
        cmd.arg("--set").arg(kv);
    }
    install_length(&t);
    let (_, err) = run_ok_both(&mut cmd);
    assert!(err.contains("loaded the best checkpoint"), "{err}");
    let state = read_json(&out.join("trainer_state.json"));
    let evals: Vec<&Value> = state["log_history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e.get("eval_loss").is_some())
        .collect();
    let steps: Vec<u64> = evals.iter().map(|e| e["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [2, 4, 6], "{state}");
    for e in &evals {
        for key in [
            "eval_bleu",
            "eval_length_words",
            "eval_runtime",
            "eval_samples_per_second",
            "epoch",
        ] {
            assert!(e[key].is_number(), "{key} missing in {e}");
        }
    }
    // Lower is better here (greater_is_better = false), so the best is the smallest value
    // among evaluations that have a checkpoint (every one of them: save_steps = eval_steps);
    // the first of equal ones wins, as in HF.
    let best = state["best_metric"].as_f64().unwrap();
    let values: Vec<f64> = evals
        .iter()
        .map(|e| e["eval_length_words"].as_f64().unwrap())
        .collect();
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    assert_eq!(best, min, "{state}");
    let first_min = steps[values.iter().position(|v| *v == min).unwrap()];
    assert_eq!(state["best_global_step"], first_min);
    let best_dir = PathBuf::from(state["best_model_checkpoint"].as_str().unwrap());
    assert!(best_dir.is_dir(), "the best checkpoint survives rotation");
    assert_eq!(
        best_dir.file_name().unwrap().to_str().unwrap(),
        format!("checkpoint-{}", state["best_global_step"])
    );
    // The final adapter is the best checkpoint's.
    let tensors = |p: &Path| {
        candle_core::safetensors::load(
            p.join("adapter_model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap()
    };
    let (last, chosen) = (tensors(&out), tensors(&best_dir));
    for (name, t) in &chosen {
        let diff = (t - &last[name])
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0, "{name} differs from the best checkpoint's");
    }
    // The store has the evaluations as events with their metrics, step 0 included.
    let runs: Value =
        serde_json::from_str(&run_ok(&mut t.cmd(&["runs", "list", "--json"]))).unwrap();
    let id = runs[0]["id"].as_str().unwrap();
    assert!(runs[0]["kind"] == "train", "{runs}");
    let _ = id;
}

fn install_length(t: &TestDir) {
    let wasm = built_component("adapterlab-plugin-length");
    run_ok(&mut t.cmd(&["plugins", "install", wasm.to_str().unwrap()]));
}

#[test]
fn a_best_metric_that_is_never_logged_is_refused() {
    let t = setup("track-best-unknown");
    let model = tiny_model(&t);
    let data = dataset(&t);
    let e = run_fail(&mut t.cmd(&[
        "train",
        "--set",
        &format!("model_name_or_path={}", model.display()),
        "--set",
        &format!("dataset={}", data.display()),
        "--set",
        &format!("output_dir={}", t.path().join("o").display()),
        "--set",
        "generation_eval.metrics=bleu",
        "--set",
        "metric_for_best_model=rougeL",
    ]));
    assert!(e.contains("eval_rougeL") && e.contains("eval_bleu"), "{e}");
}
