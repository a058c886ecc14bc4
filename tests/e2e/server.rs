//! `adapterlab serve` through HTTP: auth, validation, a job through the queue, events, and a
//! restart in the middle of a job.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::util::*;

pub const TOKEN: &str = "test-token-123";

pub struct Server {
    pub child: Child,
    pub base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start `serve` on a free loopback port and wait until it says where it listens.
pub fn start(t: &TestDir, extra_env: &[(&str, &str)]) -> Server {
    start_with(t, &[], extra_env)
}

/// [`start`] with more arguments for `serve` (e.g. `--model DIR`).
pub fn start_with(t: &TestDir, args: &[&str], extra_env: &[(&str, &str)]) -> Server {
    let mut cmd = t.cmd(&["serve", "--addr", "127.0.0.1:0", "--token", TOKEN]);
    cmd.args(args);
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("serve starts");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let deadline = Instant::now() + Duration::from_secs(120);
    let base = loop {
        assert!(
            Instant::now() < deadline,
            "serve did not announce its address"
        );
        let line = lines
            .next()
            .expect("serve exited before listening")
            .unwrap();
        if let Some(rest) = line.strip_prefix(&format!(
            "adapterlab {} serving on ",
            env!("CARGO_PKG_VERSION")
        )) {
            break rest.trim_end_matches('/').to_string();
        }
    };
    // Keep draining stdout so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Server { child, base }
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

pub async fn post(base: &str, path: &str, token: Option<&str>, body: Value) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .json(&body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// GET with the token (every read but the health check and the dashboard's files needs it).
pub async fn get(base: &str, path: &str) -> (u16, Value) {
    get_as(base, path, Some(TOKEN)).await
}

/// GET with `token`, or none.
pub async fn get_as(base: &str, path: &str, token: Option<&str>) -> (u16, Value) {
    let mut req = reqwest::Client::new().get(format!("{base}{path}"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// A run's event stream, read to its end, with the token.
pub async fn event_text(base: &str, id: &str) -> String {
    reqwest::Client::new()
        .get(format!("{base}/api/runs/{id}/events"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

pub async fn wait_for(base: &str, id: &str, pred: impl Fn(&Value) -> bool, secs: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let (_, run) = get(base, &format!("/api/runs/{id}")).await;
        if pred(&run) {
            return run;
        }
        assert!(Instant::now() < deadline, "run {id} never got there: {run}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn eval_body(name: &str, predictions: &[&str]) -> Value {
    json!({
        "kind": "eval",
        "name": name,
        "predictions": predictions.iter().enumerate().map(|(i, p)| json!({"id": format!("s{i}"), "prediction": p, "reference": "the cat sat on the mat", "source": "A: hi"})).collect::<Vec<_>>(),
        "metrics": ["rouge", "bleu"],
        "settings": {"rouge": {"use_stemmer": false}},
    })
}

#[test]
fn mutations_need_the_token_and_bad_requests_get_clear_4xx() {
    let t = setup("server-auth");
    let server = start(&t, &[]);
    let base = server.base.clone();
    rt().block_on(async move {
        let (s, health) = get(&base, "/api/health").await;
        assert_eq!((s, health["status"].as_str()), (200, Some("ok")));
        let (s, health) = get_as(&base, "/api/health", None).await;
        assert_eq!((s, health["status"].as_str()), (200, Some("ok")));
        let (s, body) = get_as(&base, "/api/runs", None).await;
        assert_eq!(s, 401, "reads need the token too: {body}");
        let (s, _) = get_as(&base, "/api/runs", Some("wrong")).await;
        assert_eq!(s, 401);
        let (s, _) = get(&base, "/api/runs").await;
        assert_eq!(s, 200);

        let (s, body) = post(&base, "/api/runs", None, eval_body("x", &["a cat"])).await;
        assert_eq!(s, 401, "{body}");
        assert!(body["error"].as_str().unwrap().contains("Bearer"));
        let (s, _) = post(
            &base,
            "/api/runs",
            Some("wrong"),
            eval_body("x", &["a cat"]),
        )
        .await;
        assert_eq!(s, 401);
        let (s, _) = post(&base, "/api/plugins", None, json!({})).await;
        assert_eq!(s, 401);

        let resp = reqwest::Client::new()
            .post(format!("{base}/api/runs"))
            .bearer_auth(TOKEN)
            .body("{not json")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 400);

        let (s, body) = post(&base, "/api/runs", Some(TOKEN), json!({"name": "no kind"})).await;
        assert_eq!(s, 422, "{body}");
        assert!(body["error"].as_str().unwrap().contains("kind"));

        let mut bad = eval_body("bad-row", &["a", "b"]);
        bad["predictions"][1] = json!({"id": "x", "reference": "r"});
        let (s, body) = post(&base, "/api/runs", Some(TOKEN), bad).await;
        assert_eq!(s, 422);
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("predictions[1]: missing field `prediction`"),
            "{body}"
        );

        let mut unknown = eval_body("unknown", &["a"]);
        unknown["metrics"] = json!(["rouge", "blue"]);
        let (s, body) = post(&base, "/api/runs", Some(TOKEN), unknown).await;
        assert_eq!(s, 422);
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("did you mean \"bleu\""),
            "{body}"
        );

        let (s, body) = get(&base, "/api/runs/nonexistent").await;
        assert_eq!(s, 404, "{body}");
        let (s, _) = get(&base, "/api/compare?runs=onlyone").await;
        assert_eq!(s, 400);

        // A body over the limit is refused without being read whole.
        let huge = vec![b'x'; 65 << 20];
        let resp = reqwest::Client::new()
            .post(format!("{base}/api/plugins"))
            .bearer_auth(TOKEN)
            .header("content-type", "application/wasm")
            .body(huge)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 413);

        let (s, doc) = get(&base, "/api/openapi.json").await;
        assert_eq!(s, 200);
        assert!(doc["paths"]["/api/runs"]["post"].is_object());
    });
}

#[test]
fn an_eval_job_runs_through_the_queue_with_events_and_comparison() {
    let t = setup("server-eval");
    let server = start(&t, &[]);
    let base = server.base.clone();
    rt().block_on(async move {
        let (s, a) = post(
            &base,
            "/api/runs",
            Some(TOKEN),
            eval_body("a", &["the cat", "a dog sat", "mat"]),
        )
        .await;
        assert_eq!(s, 201, "{a}");
        let (s, b) = post(
            &base,
            "/api/runs",
            Some(TOKEN),
            eval_body("b", &["the cat sat", "the cat sat on a mat", "the mat"]),
        )
        .await;
        assert_eq!(s, 201, "{b}");
        let (a, b) = (
            a["id"].as_str().unwrap().to_string(),
            b["id"].as_str().unwrap().to_string(),
        );
        for id in [&a, &b] {
            let run = wait_for(&base, id, |r| r["status"] == "done", 60).await;
            assert_eq!(run["progress"]["done"], 3);
            assert!(run["aggregates"]["rouge1"]["mean"].is_number());
        }
        let (_, samples) = get(&base, &format!("/api/runs/{a}/samples")).await;
        assert_eq!(samples.as_array().unwrap().len(), 3);
        let (s, cmp) = get(&base, &format!("/api/compare?runs={a},{b}")).await;
        assert_eq!(s, 200);
        assert!(!cmp["deltas"].as_array().unwrap().is_empty());
        assert_eq!(cmp["samples"].as_array().unwrap().len(), 3);

        // The event stream replays the run and ends once it has finished.
        let text = event_text(&base, &a).await;
        assert!(
            text.contains("event: status") && text.contains("event: progress"),
            "{text}"
        );
        assert!(text.contains("\"status\":\"done\""), "{text}");
    });
}

#[test]
fn a_restart_mid_job_leaves_it_interrupted_with_its_samples_and_resumable() {
    let t = setup("server-restart");
    let wasm = built_component("adapterlab-test-misbehave");
    run_ok(&mut t.cmd(&["plugins", "install", wasm.to_str().unwrap()]));
    let server = start(&t, &[]);
    let base = server.base.clone();
    let id = rt().block_on(async {
        let body = json!({
            "kind": "eval", "name": "long",
            "predictions": [
                {"id": "1", "prediction": "one", "reference": "r"},
                {"id": "2", "prediction": "two", "reference": "r"},
                {"id": "3", "prediction": "loop", "reference": "r"},
            ],
            "metrics": ["misbehave"],
            "settings": {"misbehave": {"batch_size": "1"}},
        });
        let (s, created) = post(&base, "/api/runs", Some(TOKEN), body).await;
        assert_eq!(s, 201, "{created}");
        let id = created["id"].as_str().unwrap().to_string();
        wait_for(
            &base,
            &id,
            |r| r["progress"]["done"].as_u64() == Some(2),
            60,
        )
        .await;
        id
    });
    // Kill the server while the third sample spins (its deadline is 30 s).
    drop(server);

    let server = start(&t, &[("ADAPTERLAB_PLUGIN_TIMEOUT_MS", "500")]);
    let base = server.base.clone();
    rt().block_on(async move {
        let (_, run) = get(&base, &format!("/api/runs/{id}")).await;
        assert_eq!(run["status"], "interrupted", "{run}");
        let (_, samples) = get(&base, &format!("/api/runs/{id}/samples")).await;
        assert_eq!(
            samples.as_array().unwrap().len(),
            2,
            "what was stored before the crash stays"
        );
        let (s, resumed) = post(
            &base,
            &format!("/api/runs/{id}/resume"),
            Some(TOKEN),
            json!({}),
        )
        .await;
        assert_eq!(s, 200, "{resumed}");
        let run = wait_for(&base, &id, |r| r["status"] == "done", 60).await;
        assert_eq!(run["progress"]["done"], 3);
        let (_, samples) = get(&base, &format!("/api/runs/{id}/samples")).await;
        let looped = samples
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == "3")
            .unwrap()
            .clone();
        assert!(
            looped["errors"]["misbehave"]
                .as_str()
                .unwrap()
                .contains("deadline"),
            "{looped}"
        );
    });
}

#[test]
fn fifty_concurrent_clients_get_no_errors() {
    let t = setup("server-load");
    let server = start(&t, &[]);
    let base = server.base.clone();
    rt().block_on(async move {
        let (_, created) = post(
            &base,
            "/api/runs",
            Some(TOKEN),
            eval_body("load", &["the cat"]),
        )
        .await;
        let id = created["id"].as_str().unwrap().to_string();
        wait_for(&base, &id, |r| r["status"] == "done", 60).await;
        let client = reqwest::Client::new();
        let until = Instant::now() + Duration::from_secs(3);
        let tasks: Vec<_> = (0..50)
            .map(|i| {
                let (client, base, id) = (client.clone(), base.clone(), id.clone());
                tokio::spawn(async move {
                    let mut n = 0;
                    while Instant::now() < until {
                        let path = match i % 3 {
                            0 => "/api/runs".to_string(),
                            1 => format!("/api/runs/{id}"),
                            _ => format!("/api/runs/{id}/samples"),
                        };
                        let resp = client
                            .get(format!("{base}{path}"))
                            .bearer_auth(TOKEN)
                            .send()
                            .await
                            .expect("request");
                        assert_eq!(resp.status().as_u16(), 200);
                        resp.bytes().await.unwrap();
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        let mut total = 0;
        for t in tasks {
            total += t.await.unwrap();
        }
        assert!(total > 50, "only {total} requests completed");
    });
}

/// A request with the token, whatever the method (reads will need it too).
async fn call(base: &str, method: &str, path: &str, body: Option<Value>) -> (u16, String) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut req = reqwest::Client::new()
        .request(method, format!("{base}{path}"))
        .bearer_auth(TOKEN);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

#[test]
fn runs_take_tags_and_notes_are_deleted_and_reported_from_the_dashboard_routes() {
    let t = setup("server-workbench");
    let server = start(&t, &[]);
    let base = server.base.clone();
    rt().block_on(async move {
        let (s, a) = post(
            &base,
            "/api/runs",
            Some(TOKEN),
            eval_body("a", &["the cat", "mat"]),
        )
        .await;
        assert_eq!(s, 201, "{a}");
        let (s, b) = post(
            &base,
            "/api/runs",
            Some(TOKEN),
            eval_body("b", &["the cat sat", "the mat"]),
        )
        .await;
        assert_eq!(s, 201, "{b}");
        let (a, b) = (
            a["id"].as_str().unwrap().to_string(),
            b["id"].as_str().unwrap().to_string(),
        );
        for id in [&a, &b] {
            wait_for(&base, id, |r| r["status"] == "done", 60).await;
        }

        // Tags and notes: stored, trimmed, deduplicated; bounds and unknown fields refused.
        let body = json!({"tags": [" baseline ", "r16", "baseline"], "notes": "first try"});
        let (s, text) = call(&base, "PATCH", &format!("/api/runs/{a}"), Some(body)).await;
        assert_eq!(s, 200, "{text}");
        let (_, run) = get(&base, &format!("/api/runs/{a}")).await;
        assert_eq!(run["tags"], json!(["baseline", "r16"]));
        assert_eq!(run["notes"], "first try");
        let (s, _) = call(
            &base,
            "PATCH",
            &format!("/api/runs/{a}"),
            Some(json!({"notes": "x"})),
        )
        .await;
        assert_eq!(s, 200);
        let (_, run) = get(&base, &format!("/api/runs/{a}")).await;
        assert_eq!(
            run["tags"],
            json!(["baseline", "r16"]),
            "notes alone keep the tags"
        );
        let long = "x".repeat(65);
        for (bad, says) in [
            (json!({"tags": [long]}), "longer than 64"),
            (json!({"tags": [""]}), "empty"),
            (json!({"tags": "a"}), "array"),
            (json!({"color": "red"}), "unknown field `color`"),
        ] {
            let (s, text) = call(&base, "PATCH", &format!("/api/runs/{a}"), Some(bad)).await;
            assert_eq!(s, 422, "{text}");
            assert!(text.contains(says), "{text}");
        }
        let resp = reqwest::Client::new()
            .delete(format!("{base}/api/runs/{a}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 401, "deleting needs the token");

        // A report of the comparison, rendered by the built-in Markdown reporter.
        let (s, text) = call(
            &base,
            "GET",
            &format!("/api/report?runs={a},{b}&format=md"),
            None,
        )
        .await;
        assert_eq!(s, 200, "{text}");
        assert!(text.contains('a') && text.contains("rouge1"), "{text}");
        let (s, text) = call(
            &base,
            "GET",
            &format!("/api/report?runs={a}&format=nope"),
            None,
        )
        .await;
        assert_eq!(s, 404, "{text}");

        // A non-wasm upload is refused in plain words, not a parser's.
        let resp = reqwest::Client::new()
            .post(format!("{base}/api/plugins"))
            .bearer_auth(TOKEN)
            .body("this is not WebAssembly")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 422);
        let text = resp.text().await.unwrap();
        assert!(text.contains("not a component"), "{text}");

        // Delete: the run, its samples and events go; a second delete is 404.
        let (s, text) = call(&base, "DELETE", &format!("/api/runs/{b}"), None).await;
        assert_eq!(s, 204, "{text}");
        let (s, _) = get(&base, &format!("/api/runs/{b}")).await;
        assert_eq!(s, 404);
        let (s, _) = call(&base, "DELETE", &format!("/api/runs/{b}"), None).await;
        assert_eq!(s, 404);
        let (s, _) = call(&base, "DELETE", &format!("/api/runs/{a}"), None).await;
        assert_eq!(s, 204);
    });
}

#[test]
fn report_and_runs_read_through_the_server_while_it_holds_the_store() {
    let t = setup("server-cli-report");
    let mut server = start(&t, &[]);
    let base = server.base.clone();
    let ids: Vec<String> = rt().block_on(async {
        let mut ids = Vec::new();
        for (name, preds) in [
            ("cli-a", ["the cat sat", "a dog ran"]),
            ("cli-b", ["the cat sat on the mat", "the dog"]),
        ] {
            let (s, created) = post(&base, "/api/runs", Some(TOKEN), eval_body(name, &preds)).await;
            assert_eq!(s, 201, "{created}");
            let id = created["id"].as_str().unwrap().to_string();
            wait_for(&base, &id, |r| r["status"] == "done", 60).await;
            ids.push(id);
        }
        ids
    });
    let with_token = |args: &[&str]| {
        let mut cmd = t.cmd(args);
        cmd.env("ADAPTERLAB_TOKEN", TOKEN);
        cmd
    };
    // One run, and a comparison written to a file, rendered by the server's reporters.
    let md = run_ok(&mut with_token(&["report", "cli-a"]));
    assert!(md.contains("cli-a") && md.contains("rouge"), "{md}");
    let out = t.path().join("report.html");
    run_ok(&mut with_token(&[
        "report",
        &ids[0],
        &ids[1],
        "--format",
        "html",
        "--out",
        out.to_str().unwrap(),
    ]));
    let html = std::fs::read_to_string(&out).unwrap();
    assert!(html.contains("<html") && html.contains("cli-b"), "{html}");
    let list = run_ok(&mut with_token(&["runs", "list"]));
    assert!(list.contains("cli-a") && list.contains("cli-b"), "{list}");
    let listed: Value =
        serde_json::from_str(&run_ok(&mut with_token(&["runs", "list", "--json"]))).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 2, "{listed}");
    let compared = run_ok(&mut with_token(&["runs", "compare", "cli-a", "cli-b"]));
    assert!(
        compared.contains("rouge1") && compared.contains("cli-b"),
        "{compared}"
    );
    let shown = run_ok(&mut with_token(&["runs", "show", "cli-b", "--samples"]));
    assert!(shown.contains("rouge") && shown.contains("s1"), "{shown}");
    // The server's own words for what it refuses; a wrong token is said to be one.
    let e = run_fail(&mut with_token(&["report", "no-such-run"]));
    assert!(e.contains("no-such-run"), "{e}");
    let e = run_fail(
        t.cmd(&["runs", "list"])
            .env("ADAPTERLAB_TOKEN", "wrong-token"),
    );
    assert!(
        e.contains("ADAPTERLAB_TOKEN") && e.contains("refused"),
        "{e}"
    );
    // The server was started with --token, so no token file: without the variable, the
    // command says what it needs.
    let e = run_fail(t.cmd(&["runs", "list"]).env_remove("ADAPTERLAB_TOKEN"));
    assert!(e.contains("ADAPTERLAB_TOKEN"), "{e}");

    // A stopped server withdraws its announcement; the commands read the store again.
    let pid = server.child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let _ = server.child.wait();
    assert!(!t.data_dir().join("server.json").exists());
    let list = run_ok(t.cmd(&["runs", "list"]).env_remove("ADAPTERLAB_TOKEN"));
    assert!(list.contains("cli-a"), "{list}");
}
