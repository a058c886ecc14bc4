//! The dashboard in a real browser (Debian's Chromium driven by playwright-core) against the
//! real server: launch evaluations from the form, watch them finish, compare two runs, drill
//! into a sample, launch a training run and watch it live (on the tiny model of the train
//! tests, so it takes seconds), cancel one, resume one a stopped server left interrupted, see
//! a judge run whose every score failed read as such, chat in the playground with the served
//! tiny model, visit every page. Screenshots go to tests/artifacts/.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use axum::Json;
use axum::routing::post;
use serde_json::{Value, json};

use crate::serve_models::{chat_model, train_config};
use crate::server::{Server, TOKEN, post as api_post, rt, start_with, wait_for};
use crate::train::dataset;
use crate::util::*;

/// An OpenAI-compatible endpoint whose every answer is one no judge can read a score from:
/// each sample's judge score fails, at once and without retries.
fn unreadable_judge() -> String {
    async fn chat(Json(_): Json<Value>) -> Json<Value> {
        Json(json!({
            "model": "test-judge",
            "choices": [{"message": {"role": "assistant", "content": "I would rather not say."}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5}
        }))
    }
    let app = axum::Router::new().route("/v1/chat/completions", post(chat));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        rt.block_on(async move { axum::serve(listener, app).await.unwrap() })
    });
    format!("http://{addr}/v1")
}

/// Stops `server` with SIGTERM, as an operator would: its running training stores a
/// checkpoint and becomes `interrupted`.
fn stop(mut server: Server) {
    let pid = server.child.id().to_string();
    let ok = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(ok.success());
    let deadline = Instant::now() + Duration::from_secs(60);
    while server.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the server did not stop");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn dashboard_flows_in_chromium() {
    if std::env::var_os("ADAPTERLAB_SKIP_BROWSER").is_some() {
        eprintln!("ADAPTERLAB_SKIP_BROWSER is set: skipping the browser tests");
        return;
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let t = setup("browser");
    // The tiny model, with a chat template, is the served one (the playground chats with it);
    // it and the dataset live in the test's folder.
    let model = chat_model(&t);
    let data = dataset(&t);
    let judge = unreadable_judge();
    let args = [
        "--model",
        model.to_str().unwrap(),
        "--allow-path",
        t.path().to_str().unwrap(),
    ];
    let env = [
        ("OPENAI_BASE_URL", judge.as_str()),
        ("OPENAI_API_KEY", "sk-test"),
    ];

    // A training run that a stopped server left interrupted, for the Resume step.
    let first = start_with(&t, &args, &env);
    let base = first.base.clone();
    rt().block_on(async {
        let (s, created) = api_post(
            &base,
            "/api/runs",
            Some(TOKEN),
            json!({"kind": "train", "name": "stopped-by-restart", "config": train_config(&model, &data, 60, 1000)}),
        )
        .await;
        assert_eq!(s, 201, "{created}");
        let id = created["id"].as_str().unwrap().to_string();
        wait_for(&base, &id, |r| r["progress"]["done"].as_u64() >= Some(2), 120).await;
    });
    stop(first);

    let server = start_with(&t, &args, &env);
    let fixtures = root.join("tests/browser/fixtures");
    let artifacts = root.join("tests/artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let status = Command::new("bash")
        .arg(root.join("tests/browser/run.sh"))
        .env("ADAPTERLAB_URL", &server.base)
        .env("ADAPTERLAB_TOKEN", TOKEN)
        .env(
            "ADAPTERLAB_PREDICTIONS_A",
            fixtures.join("predictions-a.jsonl"),
        )
        .env(
            "ADAPTERLAB_PREDICTIONS_B",
            fixtures.join("predictions-b.jsonl"),
        )
        .env("ADAPTERLAB_ARTIFACTS", &artifacts)
        .env(
            "ADAPTERLAB_PLUGIN_WASM",
            built_component("adapterlab-plugin-length"),
        )
        .env("ADAPTERLAB_TEST_TRAIN", "1")
        .env("ADAPTERLAB_TRAIN_MODEL", &model)
        .env("ADAPTERLAB_TRAIN_DATASET", &data)
        // Long enough to watch it run (the form's logging_steps is 20), short enough for CI:
        // ~90 ms a step on two CPU cores.
        .env("ADAPTERLAB_TRAIN_MAX_STEPS", "300")
        .env("ADAPTERLAB_TEST_CANCEL", "1")
        .env("ADAPTERLAB_TEST_JUDGE", "1")
        .env("ADAPTERLAB_TEST_RESUME", "1")
        .env("ADAPTERLAB_TEST_CHAT", "1")
        .status()
        .expect("bash runs tests/browser/run.sh");
    assert!(
        status.success(),
        "the browser tests failed; screenshots are in {}",
        artifacts.display()
    );
}
