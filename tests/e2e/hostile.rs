//! Hostile plugins, as an attacker or a careless author would write them: none may make the
//! store unreadable, run past its wall-clock deadline, lose other samples' results, pass for
//! a built-in, flood the store, write another metric's corpus statistics, hide why it
//! failed, see a secret, or make a failed evaluation look like a success. The components are
//! built by the host's build script (`tests/plugins/*`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::server::{TOKEN, get, post, rt, start, wait_for};
use crate::util::*;

fn install(t: &TestDir, crate_name: &str) {
    let wasm = built_component(crate_name);
    run_ok(&mut t.cmd(&["plugins", "install", wasm.to_str().unwrap()]));
}

/// A predictions file whose predictions are `predictions` (ids `0`, `1`, …).
fn predictions(t: &TestDir, name: &str, predictions: &[&str]) -> PathBuf {
    let lines: Vec<String> = predictions
        .iter()
        .enumerate()
        .map(|(i, p)| {
            json!({"id": i.to_string(), "prediction": p, "reference": "the cat sat"}).to_string()
        })
        .collect();
    t.write(name, lines.join("\n"))
}

/// `eval` with `--json`; returns the exit code and the JSON document.
fn eval(
    t: &TestDir,
    file: &Path,
    metrics: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (i32, Value) {
    let out = t
        .path()
        .join(format!("{metrics}-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&out);
    let mut cmd = t.cmd(&[
        "eval",
        "--predictions",
        file.to_str().unwrap(),
        "--metrics",
        metrics,
        "--json",
        out.to_str().unwrap(),
    ]);
    cmd.args(extra);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let output = cmd.output().unwrap();
    assert!(
        out.exists(),
        "eval wrote no results\nstderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code().unwrap_or(-1), read_json(&out))
}

fn sample<'a>(doc: &'a Value, id: &str) -> &'a Value {
    doc["samples"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .unwrap_or_else(|| panic!("no sample {id} in {doc}"))
}

fn error<'a>(doc: &'a Value, id: &str, metric: &str) -> &'a str {
    sample(doc, id)["errors"][metric]
        .as_str()
        .unwrap_or_else(|| panic!("sample {id} has no {metric} error: {}", sample(doc, id)))
}

#[test]
fn overflowing_scores_never_make_the_store_unreadable() {
    let t = setup("hostile-overflow");
    install(&t, "adapterlab-test-misbehave");
    let p = predictions(&t, "p.jsonl", &["huge"; 50]);
    let (code, doc) = eval(&t, &p, "misbehave", &[], &[]);
    assert_eq!(code, 0, "{doc}");
    let mean = doc["aggregates"]["big"]["mean"]
        .as_f64()
        .expect("a finite mean");
    assert!((mean / 4e306 - 1.0).abs() < 1e-9, "{mean}");
    // Everything that reads runs still works.
    run_ok(&mut t.cmd(&["runs", "list"]));
    run_ok(&mut t.cmd(&["runs", "show", "p"]));
    run_ok(&mut t.cmd(&[
        "eval",
        "--predictions",
        p.to_str().unwrap(),
        "--metrics",
        "misbehave",
        "--name",
        "q",
    ]));
    run_ok(&mut t.cmd(&["runs", "compare", "p", "q"]));
    let report = run_ok(&mut t.cmd(&["store", "check"]));
    assert!(report.contains("the store is sound"), "{report}");
}

#[test]
fn a_plugin_retrying_a_dead_llm_stops_at_its_wall_clock_deadline_and_sees_no_secret() {
    let t = setup("hostile-deadline");
    install(&t, "adapterlab-test-chatty");
    install(&t, "adapterlab-test-misbehave");
    let p = predictions(&t, "p.jsonl", &["a", "b"]);
    let started = Instant::now();
    let env = [
        ("ADAPTERLAB_PLUGIN_TIMEOUT_MS", "1500"),
        // Nothing listens on port 9; the credentials must never be seen again.
        (
            "OPENAI_BASE_URL",
            "http://alice:hunter2-secret@127.0.0.1:9/v1?api-version=1",
        ),
        ("OPENAI_API_KEY", "sk-testkeyABCDEFGHIJKLMNOP"),
        ("ADAPTERLAB_LLM_BACKOFF_MS", "50"),
    ];
    let (code, doc) = eval(&t, &p, "chatty", &[], &env);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(
        code, 3,
        "a metric that failed on every sample fails the run: {doc}"
    );
    assert_eq!(doc["status"], "failed");
    assert!(doc["error"].as_str().unwrap().contains("chatty"), "{doc}");
    let e = error(&doc, "0", "chatty");
    assert!(e.contains("deadline"), "{e}");
    let all = doc.to_string();
    assert!(!all.contains("hunter2"), "credentials leaked: {all}");
    assert!(!all.contains("testkeyABCDEF"), "key leaked: {all}");
}

#[test]
fn a_looping_sample_costs_only_itself_and_trap_messages_are_kept() {
    let t = setup("hostile-isolation");
    install(&t, "adapterlab-test-misbehave");
    let mut preds = vec!["fine"; 40];
    preds[17] = "loop";
    preds[30] = "panic";
    let p = predictions(&t, "p.jsonl", &preds);
    let started = Instant::now();
    let (code, doc) = eval(
        &t,
        &p,
        "misbehave,bleu",
        &[],
        &[("ADAPTERLAB_PLUGIN_TIMEOUT_MS", "1000")],
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(code, 0, "{doc}");
    let scored = doc["samples"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["scores"]["chars"].is_number())
        .count();
    assert_eq!(scored, 38, "only the two culprits lose their score");
    assert!(error(&doc, "17", "misbehave").contains("deadline"));
    let e = error(&doc, "30", "misbehave");
    assert!(
        e.contains("the plugin's own words 7431"),
        "the panic's text: {e}"
    );
    // The other metric scored every sample, the culprits included.
    assert!(sample(&doc, "17")["scores"]["bleu"].is_number());
}

#[test]
fn built_in_names_are_reserved_and_runs_record_where_plugins_came_from() {
    let t = setup("hostile-names");
    let wasm = built_component("adapterlab-test-fake-rouge");
    let e = run_fail(&mut t.cmd(&["plugins", "install", wasm.to_str().unwrap()]));
    assert!(
        e.contains("built-in") && e.contains("--replace-builtin"),
        "{e}"
    );
    let p = predictions(&t, "p.jsonl", &["the cat sat", "a dog"]);
    let (_, real) = eval(&t, &p, "rouge", &[], &[]);
    assert_eq!(real["plugins"]["rouge"]["source"], "built-in");

    let (_, err) = run_ok_both(&mut t.cmd(&[
        "plugins",
        "install",
        "--replace-builtin",
        wasm.to_str().unwrap(),
    ]));
    assert!(err.contains("replaces the built-in"), "{err}");
    let (_, fake) = eval(&t, &p, "rouge", &[], &[]);
    assert_eq!(fake["plugins"]["rouge"]["source"], "user");
    assert_ne!(
        fake["plugins"]["rouge"]["sha256"],
        real["plugins"]["rouge"]["sha256"]
    );
    let shown = run_ok(&mut t.cmd(&["runs", "show", fake["run_id"].as_str().unwrap()]));
    assert!(shown.contains("plugin rouge: 0.1.0 (user"), "{shown}");
}

#[test]
fn what_a_plugin_returns_is_bounded() {
    let t = setup("hostile-sizes");
    install(&t, "adapterlab-test-misbehave");
    let p = predictions(&t, "p.jsonl", &["long-error", "long-name", "empty", "fine"]);
    let (_, doc) = eval(
        &t,
        &p,
        "misbehave",
        &["--set", "misbehave.batch_size=1"],
        &[],
    );
    let e = error(&doc, "0", "misbehave");
    assert!(
        e.len() < 5000 && e.contains("truncated"),
        "{} bytes",
        e.len()
    );
    let e = error(&doc, "1", "misbehave");
    assert!(
        e.len() < 1000 && e.contains("truncated"),
        "{} bytes",
        e.len()
    );
    assert!(error(&doc, "2", "misbehave").contains("no scores"));

    // One 16 MiB batch error: stored once, each sample points to it.
    let many = predictions(&t, "many.jsonl", &["x"; 20]);
    let (code, doc) = eval(
        &t,
        &many,
        "misbehave",
        &["--set", "misbehave.batch=huge-error"],
        &[],
    );
    assert_eq!(code, 3);
    for i in 0..20 {
        assert!(error(&doc, &i.to_string(), "misbehave").len() < 400);
    }
    let whole = doc["metric_errors"]["misbehave"].as_str().unwrap();
    assert!(whole.len() < 5000, "{} bytes", whole.len());
    assert!(doc.to_string().len() < 100_000, "the results stay small");

    // 32 MiB of log lines and 40 KiB of stdout on each of 40 calls: nothing fails, little
    // is kept.
    let mut preds = vec!["print-40k"; 40];
    preds[0] = "log-flood";
    let noisy = predictions(&t, "noisy.jsonl", &preds);
    let (code, doc) = eval(
        &t,
        &noisy,
        "misbehave",
        &["--set", "misbehave.batch_size=1"],
        &[],
    );
    assert_eq!(code, 0, "{doc}");
    assert!(
        doc["samples"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["errors"].as_object().unwrap().is_empty()),
        "{doc}"
    );
    let store_bytes = dir_size(&t.data_dir().join("store"));
    assert!(
        store_bytes < 40 << 20,
        "the store grew to {store_bytes} bytes"
    );
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| {
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                dir_size(&e.path())
            } else {
                meta.len()
            }
        })
        .sum()
}

#[test]
fn corpus_statistics_stay_under_their_own_names() {
    let t = setup("hostile-corpus");
    install(&t, "adapterlab-test-misbehave");
    let p = predictions(&t, "p.jsonl", &["the cat sat", "the cat sat on"]);
    let (_, honest) = eval(&t, &p, "bleu", &[], &[]);
    let (_, both) = eval(
        &t,
        &p,
        "misbehave,bleu",
        &["--set", "misbehave.batch=corpus"],
        &[],
    );
    assert_eq!(both["corpus"]["bleu"], honest["corpus"]["bleu"], "{both}");
    assert!(both["corpus"]["bleu"].as_f64().unwrap() > 0.0);
    assert_eq!(both["corpus"]["chars"], 1.0);
}

#[test]
fn a_memory_budget_spans_every_running_plugin() {
    let t = setup("hostile-memory");
    install(&t, "adapterlab-test-misbehave");
    let p = predictions(&t, "p.jsonl", &["memory", "fine"]);
    let env = [
        ("ADAPTERLAB_PLUGIN_MEMORY_MIB", "1024"),
        ("ADAPTERLAB_PLUGIN_MEMORY_TOTAL_MIB", "96"),
    ];
    let (code, doc) = eval(&t, &p, "misbehave", &[], &env);
    assert_eq!(code, 0, "{doc}");
    assert!(
        error(&doc, "0", "misbehave").contains("memory budget"),
        "{doc}"
    );
    assert_eq!(sample(&doc, "1")["scores"]["chars"], 4.0);
}

#[test]
fn exit_codes_tell_failure_from_success() {
    let t = setup("hostile-exit");
    install(&t, "adapterlab-test-misbehave");
    let p = predictions(&t, "p.jsonl", &["empty", "empty"]);
    let (code, doc) = eval(&t, &p, "misbehave", &[], &[]);
    assert_eq!(code, 3, "{doc}");
    assert_eq!(doc["status"], "failed");
    let listed = run_ok(&mut t.cmd(&["runs", "list"]));
    assert!(listed.contains("failed"), "{listed}");

    let p = predictions(&t, "q.jsonl", &["fine", "trap"]);
    let (code, _) = eval(&t, &p, "misbehave", &[], &[]);
    assert_eq!(code, 0, "a sample error alone is not a failure");
    let (code, _) = eval(&t, &p, "misbehave", &["--strict"], &[]);
    assert_eq!(code, 4, "--strict fails on any sample error");
}

#[test]
fn files_that_are_not_components_are_refused_with_the_fix() {
    let t = setup("hostile-not-component");
    let text = t.write("notes.wasm", "(module)");
    let e = run_fail(&mut t.cmd(&["plugins", "check", text.to_str().unwrap()]));
    assert!(
        e.contains("not a component") && e.contains("not WebAssembly in binary form"),
        "{e}"
    );
    let core = t.write("core.wasm", b"\0asm\x01\0\0\0");
    let e = run_fail(&mut t.cmd(&["plugins", "install", core.to_str().unwrap()]));
    assert!(
        e.contains("core WebAssembly module") && e.contains("wasm-tools component new"),
        "{e}"
    );
}

/// Uploads a component (raw bytes) with the token; the answer's status and body.
async fn upload(base: &str, query: &str, bytes: Vec<u8>) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(format!("{base}/api/plugins{query}"))
        .bearer_auth(TOKEN)
        .body(bytes)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Creates an eval run of `metrics` over rows whose predictions are `predictions`; its id.
async fn create_eval(
    base: &str,
    name: &str,
    predictions: &[&str],
    metrics: &[&str],
    extra: Value,
) -> String {
    let rows: Vec<Value> = predictions
        .iter()
        .enumerate()
        .map(|(i, p)| json!({"id": i.to_string(), "prediction": p, "reference": "r"}))
        .collect();
    let mut body = json!({"kind": "eval", "name": name, "predictions": rows, "metrics": metrics});
    for (k, v) in extra.as_object().into_iter().flatten() {
        body[k] = v.clone();
    }
    let (status, created) = post(base, "/api/runs", Some(TOKEN), body).await;
    assert_eq!(status, 201, "{created}");
    created["id"].as_str().unwrap().to_string()
}

fn finished(run: &Value) -> bool {
    run["status"] != "queued" && run["status"] != "running"
}

#[test]
fn through_the_server_too() {
    let t = setup("hostile-server");
    let server = start(&t, &[("ADAPTERLAB_PLUGIN_TIMEOUT_MS", "1000")]);
    let base = server.base.clone();
    let fake = std::fs::read(built_component("adapterlab-test-fake-rouge")).unwrap();
    let misbehave = std::fs::read(built_component("adapterlab-test-misbehave")).unwrap();
    rt().block_on(async move {
        let (status, body) = upload(&base, "", fake).await;
        assert_eq!(status, 422);
        assert!(body.to_string().contains("--replace-builtin"), "{body}");
        let (_, body) = upload(&base, "", b"hello".to_vec()).await;
        assert!(body.to_string().contains("not a component"), "{body}");
        assert_eq!(upload(&base, "", misbehave).await.0, 201);

        // A loop among good samples: only it fails; the run reads as done.
        let id = create_eval(
            &base,
            "h",
            &["fine", "loop", "fine", "empty"],
            &["misbehave"],
            json!({}),
        )
        .await;
        let run = wait_for(&base, &id, finished, 60).await;
        assert_eq!(run["status"], "done", "{run}");
        assert_eq!(run["plugins"]["misbehave"]["source"], "user", "{run}");
        let (_, samples) = get(&base, &format!("/api/runs/{id}/samples")).await;
        let text = samples.to_string();
        assert!(text.contains("deadline"), "{text}");
        assert!(text.contains("no scores"), "{text}");
    });
}

/// Cancel stops a plugin that is waiting on the LLM, and the run ends at once: a stuck chat
/// never holds an evaluation slot.
#[test]
fn cancel_interrupts_a_plugin_waiting_on_a_dead_llm() {
    let t = setup("hostile-cancel");
    let server = start(
        &t,
        &[
            ("OPENAI_BASE_URL", "http://127.0.0.1:9/v1"),
            ("ADAPTERLAB_LLM_BACKOFF_MS", "2000"),
        ],
    );
    let base = server.base.clone();
    let chatty = std::fs::read(built_component("adapterlab-test-chatty")).unwrap();
    rt().block_on(async move {
        assert_eq!(upload(&base, "", chatty).await.0, 201);
        let id = create_eval(&base, "stuck", &["p", "p"], &["chatty"], json!({})).await;
        wait_for(&base, &id, |r| r["status"] == "running", 30).await;
        // Inside the plugin's chat retries now (back-off 2 s, deadline 60 s).
        tokio::time::sleep(Duration::from_millis(500)).await;
        let cancelled_at = Instant::now();
        let (status, answer) = post(
            &base,
            &format!("/api/runs/{id}/cancel"),
            Some(TOKEN),
            json!({}),
        )
        .await;
        assert!((200..300).contains(&status), "{status} {answer}");
        // Within 5 s of the cancel: wait_for fails the test past its deadline.
        wait_for(&base, &id, |r| r["status"] == "cancelled", 5).await;
        assert!(cancelled_at.elapsed() < Duration::from_secs(6));
    });
}

/// A run can name its own OpenAI-compatible endpoint (the judge's, say); the host's API key
/// goes only to the endpoint it was configured for, never to one a request chose.
#[test]
fn a_run_endpoint_is_used_without_the_hosts_key() {
    use std::sync::{Arc, Mutex};
    let t = setup("hostile-endpoint");
    let seen: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let fake = {
        let seen = seen.clone();
        let app = axum::Router::new().route(
            "/v1/chat/completions",
            axum::routing::post(move |headers: axum::http::HeaderMap| {
                let seen = seen.clone();
                async move {
                    seen.lock().unwrap().push(
                        headers
                            .get("authorization")
                            .and_then(|v| v.to_str().ok())
                            .map(String::from),
                    );
                    axum::Json(
                        json!({"model": "m", "choices": [{"message": {"content": "ok"}}],
                                      "usage": {"prompt_tokens": 1, "completion_tokens": 1}}),
                    )
                }
            }),
        );
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        runtime.spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}/v1")
    };
    let server = start(&t, &[("OPENAI_API_KEY", "sk-hostkeyABCDEFGHIJKLMNOP")]);
    let base = server.base.clone();
    let chatty = std::fs::read(built_component("adapterlab-test-chatty")).unwrap();
    let run = rt().block_on(async move {
        assert_eq!(upload(&base, "", chatty).await.0, 201);
        let (status, _) = post(
            &base,
            "/api/runs",
            Some(TOKEN),
            json!({"kind": "eval", "predictions": [{"id": "0", "prediction": "p", "reference": "r"}],
                   "metrics": ["chatty"], "llm_base_url": "ftp://nowhere"}),
        )
        .await;
        assert_eq!(status, 422);
        let id = create_eval(&base, "own-endpoint", &["p"], &["chatty"], json!({"llm_base_url": fake})).await;
        wait_for(&base, &id, finished, 60).await
    });
    assert_eq!(run["status"], "done", "{run}");
    assert_eq!(run["aggregates"]["answered"]["mean"], 1.0, "{run}");
    assert!(
        run["metadata"]["llm_base_url"]
            .as_str()
            .unwrap()
            .starts_with("http://127.0.0.1"),
        "{run}"
    );
    let seen = seen.lock().unwrap();
    assert!(!seen.is_empty(), "the run's endpoint got no request");
    assert!(
        seen.iter().all(|a| a.is_none()),
        "the host's key went to the run's endpoint: {seen:?}"
    );
}
