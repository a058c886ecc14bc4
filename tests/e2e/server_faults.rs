//! `adapterlab serve` under faults, bad input and hostile requests: absurd configs, a foreign
//! Host header, a damaged request file, SIGTERM mid-run, concurrent resumes, kill -9 right
//! after acknowledged cancels, the token kept out of the output, the data directory's modes.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::server::{Server, TOKEN, get, get_as, post, rt, start, start_with, wait_for};
use crate::util::*;

/// An eval over the misbehaving plugin: every `loop` sample spins until the plugin deadline;
/// one more sample scores normally, so the run ends `done` (a metric failing on every
/// sample fails the run).
fn looping_eval(name: &str, loops: usize) -> Value {
    let rows: Vec<Value> =
        std::iter::once(json!({"id": "ok", "prediction": "fine", "reference": "r"}))
            .chain(
                (0..loops)
                    .map(|i| json!({"id": format!("{i}"), "prediction": "loop", "reference": "r"})),
            )
            .collect();
    json!({
        "kind": "eval", "name": name, "predictions": rows,
        "metrics": ["misbehave"], "settings": {"misbehave": {"batch_size": "1"}},
    })
}

fn install_misbehave(t: &TestDir) {
    let wasm = built_component("adapterlab-test-misbehave");
    run_ok(&mut t.cmd(&["plugins", "install", wasm.to_str().unwrap()]));
}

fn sigterm(server: &Server) {
    let pid = server.child.id().to_string();
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(ok.success());
}

/// Waits for the server's exit (at most `secs`), returning its exit code.
fn wait_exit(server: &mut Server, secs: u64) -> Option<i32> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            return status.code();
        }
        assert!(Instant::now() < deadline, "the server did not exit");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn absurd_configs_are_refused_before_queueing_naming_the_field_and_range() {
    let t = setup("faults-absurd");
    let server = start(&t, &[]);
    let base = server.base.clone();
    rt().block_on(async move {
        for (config, field) in [
            (json!({"lora": {"r": 1_000_000_000_000u64}}), "lora.r"),
            (json!({"per_device_train_batch_size": 1_000_000_000u64}), "per_device_train_batch_size"),
            (json!({"max_seq_length": 1_000_000_000_000u64}), "max_seq_length"),
            (json!({"max_steps": 1_000_000_000_000_000u64}), "max_steps"),
            (json!({"learning_rate": 1e308}), "learning_rate"),
            (json!({"max_grad_norm": -1}), "max_grad_norm"),
            (json!({"lora": {"lora_alpha": -1}}), "lora.lora_alpha"),
            (json!({"save_total_limit": 0}), "save_total_limit"),
        ] {
            let (s, body) =
                post(&base, "/api/runs", Some(TOKEN), json!({"kind": "train", "config": config})).await;
            assert_eq!(s, 422, "{field}: {body}");
            let e = body["error"].as_str().unwrap();
            assert!(e.contains(field) && e.contains("allowed"), "{field}: {e}");
        }
        // In range one by one, too big together: the memory estimate refuses it.
        let (s, body) = post(
            &base,
            "/api/runs",
            Some(TOKEN),
            json!({"kind": "train", "config": {"per_device_train_batch_size": 4096, "max_seq_length": 131072}}),
        )
        .await;
        assert_eq!(s, 422, "{body}");
        assert!(body["error"].as_str().unwrap().contains("memory"), "{body}");

        let (s, body) = post(
            &base,
            "/api/runs",
            Some(TOKEN),
            json!({"kind": "eval", "predictions": [{"id": "1", "prediction": "a", "reference": "a"}],
                   "metrics": ["rouge"], "settings": {"rouge": {"batch_size": 0}}}),
        )
        .await;
        assert_eq!(s, 422, "{body}");
        assert!(body["error"].as_str().unwrap().contains("rouge.batch_size"), "{body}");
        let (s, body) = post(
            &base,
            "/api/runs",
            Some(TOKEN),
            json!({"kind": "generate", "inputs": [{"id": "1", "source": "hi"}], "max_new_tokens": 1_000_000_000u64}),
        )
        .await;
        assert_eq!(s, 422, "{body}");
        assert!(body["error"].as_str().unwrap().contains("max_new_tokens"), "{body}");

        let (_, runs) = get(&base, "/api/runs").await;
        assert_eq!(runs.as_array().unwrap().len(), 0, "nothing was queued: {runs}");
        let (s, health) = get(&base, "/api/health").await;
        assert_eq!((s, health["status"].as_str()), (200, Some("ok")));
    });
}

#[test]
fn a_foreign_host_header_is_refused_unless_allowed() {
    let t = setup("faults-host");
    let server = start_with(&t, &["--allowed-host", "box.lan"], &[]);
    let base = server.base.clone();
    let port = base.rsplit(':').next().unwrap().to_string();
    rt().block_on(async move {
        let client = reqwest::Client::new();
        let with_host = |host: String, path: &str| {
            client
                .get(format!("{base}{path}"))
                .header("host", host)
                .bearer_auth(TOKEN)
                .send()
        };
        for host in [
            format!("attacker.example:{port}"),
            "attacker.example".into(),
            format!("127.0.0.1.nip.io:{port}"),
        ] {
            let resp = with_host(host.clone(), "/api/runs").await.unwrap();
            assert_eq!(resp.status().as_u16(), 421, "{host}");
            let body: Value = resp.json().await.unwrap();
            assert!(
                body["error"].as_str().unwrap().contains("--allowed-host"),
                "{body}"
            );
            let resp = with_host(host.clone(), "/").await.unwrap();
            assert_eq!(resp.status().as_u16(), 421, "{host}: the dashboard too");
        }
        for host in [
            format!("localhost:{port}"),
            format!("127.0.0.1:{port}"),
            format!("box.lan:{port}"),
        ] {
            let resp = with_host(host.clone(), "/api/runs").await.unwrap();
            assert_eq!(resp.status().as_u16(), 200, "{host}");
        }
        // The dashboard's files and the health check need no token; the OpenAI API does.
        let (s, _) = get_as(&base, "/v1/models", None).await;
        assert_eq!(s, 401);
        let resp = reqwest::get(format!("{base}/app.js")).await.unwrap();
        assert_eq!(resp.status().as_u16(), 200);
    });
}

#[test]
fn a_dataset_outside_the_data_dir_needs_allow_path() {
    let t = setup("faults-paths");
    let outside = t.write(
        "secret.jsonl",
        "{\"dialogue\": \"x\", \"summary\": \"y\"}\n",
    );
    let server = start(&t, &[]);
    let base = server.base.clone();
    rt().block_on(async move {
        let (s, body) = post(
            &base,
            "/api/runs",
            Some(TOKEN),
            json!({"kind": "generate", "dataset": outside, "split": "train"}),
        )
        .await;
        assert_eq!(s, 422, "{body}");
        assert!(
            body["error"].as_str().unwrap().contains("--allow-path"),
            "{body}"
        );
        let (s, body) = post(
            &base,
            "/api/runs",
            Some(TOKEN),
            json!({"kind": "train", "config": {"dataset": outside}}),
        )
        .await;
        assert_eq!(s, 422, "{body}");
        assert!(
            body["error"].as_str().unwrap().contains("--allow-path"),
            "{body}"
        );
        // output_dir may not climb out of runs/ into the store.
        let data = t.data_dir();
        let climbing = format!("{}/runs/../store/x", data.display());
        let (s, body) = post(
            &base,
            "/api/runs",
            Some(TOKEN),
            json!({"kind": "train", "config": {"output_dir": climbing}}),
        )
        .await;
        assert_eq!(s, 422, "{body}");
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("outside its runs/"),
            "{body}"
        );
    });
}

#[test]
fn a_damaged_request_file_fails_its_run_but_not_the_start_and_a_failed_resume_changes_nothing() {
    let t = setup("faults-damaged");
    install_misbehave(&t);
    let server = start(&t, &[]);
    let base = server.base.clone();
    let ids: Vec<String> = rt().block_on(async {
        let mut ids = Vec::new();
        // Two evaluations run at once; the third waits in the queue.
        for i in 0..3 {
            let (s, created) = post(
                &base,
                "/api/runs",
                Some(TOKEN),
                looping_eval(&format!("l{i}"), 2),
            )
            .await;
            assert_eq!(s, 201, "{created}");
            ids.push(created["id"].as_str().unwrap().to_string());
        }
        // Wait for a first finished sample, not just `running`: a client may read `running`
        // a moment before the store makes it durable, and the samples' write is durable.
        for id in &ids[..2] {
            wait_for(
                &base,
                id,
                |r| r["status"] == "running" && r["progress"]["done"].as_u64() >= Some(1),
                60,
            )
            .await;
        }
        ids
    });
    drop(server); // kill -9
    let requests = t.data_dir().join("store").join("requests");
    // The running one's request is damaged, the queued one's is gone.
    std::fs::write(requests.join(format!("{}.json", ids[0])), "{not json").unwrap();
    std::fs::remove_file(requests.join(format!("{}.json", ids[2]))).unwrap();

    let server = start(&t, &[("ADAPTERLAB_PLUGIN_TIMEOUT_MS", "300")]);
    let base = server.base.clone();
    rt().block_on(async move {
        let (_, queued) = get(&base, &format!("/api/runs/{}", ids[2])).await;
        assert_eq!(queued["status"], "failed", "{queued}");
        assert!(
            queued["error"].as_str().unwrap().contains("request"),
            "{queued}"
        );
        let (_, damaged) = get(&base, &format!("/api/runs/{}", ids[0])).await;
        assert_eq!(damaged["status"], "interrupted", "{damaged}");
        let (s, body) = post(
            &base,
            &format!("/api/runs/{}/resume", ids[0]),
            Some(TOKEN),
            json!({}),
        )
        .await;
        assert_eq!(s, 409, "{body}");
        let (_, after) = get(&base, &format!("/api/runs/{}", ids[0])).await;
        assert_eq!(after, damaged, "a failed resume leaves the run as it was");
        // The intact one resumes and finishes.
        let (s, body) = post(
            &base,
            &format!("/api/runs/{}/resume", ids[1]),
            Some(TOKEN),
            json!({}),
        )
        .await;
        assert_eq!(s, 200, "{body}");
        wait_for(&base, &ids[1], |r| r["status"] == "done", 60).await;
    });
    // And the next start is not blocked either.
    drop(server);
    let server = start(&t, &[]);
    rt().block_on(async move {
        let (s, _) = get(&server.base, "/api/runs").await;
        assert_eq!(s, 200);
    });
}

#[test]
fn sigterm_mid_run_exits_0_leaves_it_interrupted_and_one_of_ten_concurrent_resumes_wins() {
    let t = setup("faults-sigterm");
    install_misbehave(&t);
    let timeout = [("ADAPTERLAB_PLUGIN_TIMEOUT_MS", "1500")];
    let mut server = start(&t, &timeout);
    let base = server.base.clone();
    let id = rt().block_on(async {
        let (s, created) = post(&base, "/api/runs", Some(TOKEN), looping_eval("long", 6)).await;
        assert_eq!(s, 201, "{created}");
        let id = created["id"].as_str().unwrap().to_string();
        wait_for(
            &base,
            &id,
            |r| r["progress"]["done"].as_u64() >= Some(1),
            60,
        )
        .await;
        id
    });
    sigterm(&server);
    assert_eq!(
        wait_exit(&mut server, 30),
        Some(0),
        "SIGTERM is a clean stop"
    );
    drop(server);

    let server = start(&t, &timeout);
    let base = server.base.clone();
    rt().block_on(async move {
        let (_, run) = get(&base, &format!("/api/runs/{id}")).await;
        assert_eq!(run["status"], "interrupted", "{run}");
        let (_, samples) = get(&base, &format!("/api/runs/{id}/samples")).await;
        assert!(
            !samples.as_array().unwrap().is_empty(),
            "finished samples were kept"
        );

        let tasks: Vec<_> = (0..10)
            .map(|_| {
                let (base, id) = (base.clone(), id.clone());
                tokio::spawn(async move {
                    post(
                        &base,
                        &format!("/api/runs/{id}/resume"),
                        Some(TOKEN),
                        json!({}),
                    )
                    .await
                    .0
                })
            })
            .collect();
        let mut codes = Vec::new();
        for task in tasks {
            codes.push(task.await.unwrap());
        }
        codes.sort();
        assert_eq!(codes.iter().filter(|c| **c == 200).count(), 1, "{codes:?}");
        assert_eq!(codes.iter().filter(|c| **c == 409).count(), 9, "{codes:?}");
        let run = wait_for(&base, &id, |r| r["status"] == "done", 120).await;
        assert_eq!(run["progress"]["done"], 7, "{run}");
    });
}

#[test]
fn acknowledged_creates_and_cancels_survive_kill_9() {
    let t = setup("faults-durable");
    install_misbehave(&t);
    let server = start(&t, &[]);
    let base = server.base.clone();
    let (created, cancelled): (Vec<String>, Vec<String>) = rt().block_on(async {
        let mut ids = Vec::new();
        for i in 0..12 {
            let (s, created) = post(
                &base,
                "/api/runs",
                Some(TOKEN),
                looping_eval(&format!("q{i}"), 1),
            )
            .await;
            assert_eq!(s, 201, "{created}");
            ids.push(created["id"].as_str().unwrap().to_string());
        }
        // The first two occupy the evaluation slots; the rest wait and are cancelled.
        let mut cancelled = Vec::new();
        for id in &ids[2..] {
            let (s, body) = post(
                &base,
                &format!("/api/runs/{id}/cancel"),
                Some(TOKEN),
                json!({}),
            )
            .await;
            assert_eq!(s, 200, "{body}");
            if body["status"] == "cancelled" {
                cancelled.push(id.clone());
            }
        }
        (ids, cancelled)
    });
    assert!(!cancelled.is_empty());
    drop(server); // kill -9 right after the last acknowledgement
    let server = start(&t, &[("ADAPTERLAB_PLUGIN_TIMEOUT_MS", "300")]);
    rt().block_on(async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        for id in &cancelled {
            let (_, run) = get(&server.base, &format!("/api/runs/{id}")).await;
            assert_eq!(run["status"], "cancelled", "{run}");
        }
        for id in &created {
            let (s, run) = get(&server.base, &format!("/api/runs/{id}")).await;
            assert_eq!(s, 200, "an acknowledged create survives: {run}");
        }
    });
}

#[test]
fn a_given_token_is_not_printed_and_the_data_dir_is_private() {
    let t = setup("faults-secrets");
    let mut child = t
        .cmd(&["serve", "--addr", "127.0.0.1:0", "--token", TOKEN])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut printed = String::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        printed.push_str(&line);
        printed.push('\n');
        if line.starts_with("OpenAI-compatible API") {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(printed.contains("serving on"), "{printed}");
    assert!(
        !printed.contains(TOKEN),
        "the given token is not printed: {printed}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&t.data_dir()), 0o700);
        for entry in std::fs::read_dir(t.data_dir().join("store")).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                assert_eq!(mode(&path), 0o600, "{}", path.display());
            }
        }
    }
}

#[test]
fn samples_and_comparisons_page_compress_and_revalidate() {
    let t = setup("faults-reads");
    let server = start(&t, &[]);
    let base = server.base.clone();
    rt().block_on(async move {
        let mut ids = Vec::new();
        for name in ["a", "b"] {
            let rows: Vec<Value> = (0..30)
                .map(|i| json!({"id": format!("s{i}"), "prediction": format!("the cat {i} sat {name}"), "reference": "the cat sat on the mat"}))
                .collect();
            let (s, created) = post(
                &base,
                "/api/runs",
                Some(TOKEN),
                json!({"kind": "eval", "name": name, "predictions": rows, "metrics": ["rouge"]}),
            )
            .await;
            assert_eq!(s, 201, "{created}");
            let id = created["id"].as_str().unwrap().to_string();
            wait_for(&base, &id, |r| r["status"] == "done", 60).await;
            ids.push(id);
        }
        let (a, b) = (&ids[0], &ids[1]);
        let (_, all) = get(&base, &format!("/api/runs/{a}/samples")).await;
        assert_eq!(all.as_array().unwrap().len(), 30, "no limit: the whole list, as before");
        let client = reqwest::Client::new();
        let resp = client
            .get(format!("{base}/api/runs/{a}/samples?limit=10&offset=25"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.headers()["x-total-count"], "30");
        let page: Value = resp.json().await.unwrap();
        assert_eq!(page.as_array().unwrap().len(), 5);
        assert_eq!(page[0], all[25]);
        let (s, _) = get(&base, &format!("/api/runs/{a}/samples?limit=0")).await;
        assert_eq!(s, 400);

        let (_, cmp) = get(&base, &format!("/api/compare?runs={a},{b}&limit=7&offset=0")).await;
        assert_eq!(cmp["samples"].as_array().unwrap().len(), 7);
        assert_eq!(cmp["total_samples"], 30);

        // gzip when asked for, the same JSON inside.
        let resp = client
            .get(format!("{base}/api/runs/{a}/samples"))
            .bearer_auth(TOKEN)
            .header("accept-encoding", "gzip")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.headers()["content-encoding"], "gzip");
        let etag = resp.headers()["etag"].to_str().unwrap().to_string();
        let zipped = resp.bytes().await.unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&zipped[..]), &mut text)
            .unwrap();
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), all);
        // A finished run's answer revalidates to 304.
        let resp = client
            .get(format!("{base}/api/runs/{a}/samples"))
            .bearer_auth(TOKEN)
            .header("if-none-match", &etag)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 304);
    });
}

#[test]
fn sigterm_mid_training_writes_a_checkpoint_at_the_current_step_and_resume_finishes_it() {
    use crate::serve_models::{events, logged_steps, serve_tiny, train_config};
    let t = setup("faults-sigterm-train");
    let model = crate::train::tiny_model(&t);
    let data = crate::train::dataset(&t);
    let max_steps = 60;
    let mut server = serve_tiny(&t, &model);
    let base = server.base.clone();
    let id = rt().block_on(async {
        // No periodic checkpoint before the signal: the one found after it is the shutdown's.
        let (s, created) = post(
            &base,
            "/api/runs",
            Some(TOKEN),
            json!({"kind": "train", "name": "stopped", "config": train_config(&model, &data, max_steps, 1000)}),
        )
        .await;
        assert_eq!(s, 201, "{created}");
        let id = created["id"].as_str().unwrap().to_string();
        wait_for(&base, &id, |r| r["progress"]["done"].as_u64() >= Some(4), 120).await;
        id
    });
    sigterm(&server);
    assert_eq!(
        wait_exit(&mut server, 60),
        Some(0),
        "SIGTERM is a clean stop"
    );
    drop(server);
    let out = t.data_dir().join("runs").join(&id);
    let checkpoints: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    assert_eq!(checkpoints.len(), 1, "{checkpoints:?}");

    let server = serve_tiny(&t, &model);
    let base = server.base.clone();
    rt().block_on(async move {
        let (_, run) = get(&base, &format!("/api/runs/{id}")).await;
        assert_eq!(run["status"], "interrupted", "{run}");
        let stopped_at = run["progress"]["done"].as_u64().unwrap();
        assert_eq!(checkpoints[0], format!("checkpoint-{stopped_at}"), "{run}");
        let (s, body) = post(
            &base,
            &format!("/api/runs/{id}/resume"),
            Some(TOKEN),
            json!({}),
        )
        .await;
        assert_eq!(s, 200, "{body}");
        let run = wait_for(
            &base,
            &id,
            |r| matches!(r["status"].as_str(), Some("done" | "failed")),
            240,
        )
        .await;
        assert_eq!(run["status"], "done", "{run}");
        let mut steps = logged_steps(&events(&base, &id).await);
        steps.sort();
        assert_eq!(steps, (1..=max_steps).collect::<Vec<_>>(), "each step once");
    });
}

/// A tmpfs of `mib` MiB mounted on `dir` for the test's life; `None` where mounting is not
/// allowed (not root, a container without the capability).
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, mib: u64) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// Fills the file system holding `dir` with one file, to its last byte.
fn fill(dir: &std::path::Path) -> std::path::PathBuf {
    use std::io::Write as _;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    for size in [1 << 20, 4096, 1] {
        let chunk = vec![1u8; size];
        while f.write_all(&chunk).is_ok() {}
    }
    let _ = f.flush();
    path
}

#[test]
fn a_full_disk_fails_the_run_not_the_server_and_space_freed_brings_it_back() {
    let t = setup("faults-disk");
    let Some(mount) = Tmpfs::mount(&t.data_dir(), 400) else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    install_misbehave(&t);
    let server = start(&t, &[("ADAPTERLAB_PLUGIN_TIMEOUT_MS", "300")]);
    let base = server.base.clone();
    let pid = server.child.id();
    rt().block_on(async move {
        // A long evaluation is writing (a batch of samples every few milliseconds) when the
        // disk fills to its last byte.
        let rows: Vec<Value> = (0..200_000)
            .map(|i| json!({"id": format!("{i}"), "prediction": format!("the cat {i} sat"), "reference": "the cat sat on the mat"}))
            .collect();
        let body = json!({"kind": "eval", "name": "long", "predictions": rows, "metrics": ["rouge"],
                          "settings": {"rouge": {"batch_size": 20}}});
        let (s, created) = post(&base, "/api/runs", Some(TOKEN), body).await;
        assert_eq!(s, 201, "{created}");
        let long = created["id"].as_str().unwrap().to_string();
        wait_for(
            &base,
            &long,
            |r| r["progress"]["done"].as_u64() >= Some(100),
            60,
        )
        .await;
        let filler = fill(&t.data_dir());
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (s, health) = get(&base, "/api/health").await;
        assert_eq!(
            (s, health["status"].as_str()),
            (200, Some("degraded")),
            "{health}"
        );
        assert!(
            health["reason"].as_str().unwrap().contains("full"),
            "{health}"
        );
        let (s, body) = post(&base, "/api/runs", Some(TOKEN), looping_eval("refused", 1)).await;
        assert_eq!(s, 507, "{body}");
        // Reads work, or, while the store keeps a failed write's error, say why they cannot.
        let (s, body) = get(&base, &format!("/api/runs/{long}/samples")).await;
        assert!(s == 200 || s == 503, "{s}: {body}");
        if s == 503 {
            assert!(body["error"].as_str().unwrap().contains("full"), "{body}");
        }
        let (s, _) = get(&base, &format!("/api/runs/{long}")).await;
        assert_eq!(s, 200, "the run itself reads");

        std::fs::remove_file(&filler).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (_, health) = get(&base, "/api/health").await;
            if health["status"] == "ok" {
                break;
            }
            assert!(Instant::now() < deadline, "health stays {health}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // The run the full disk stopped failed (with the reason), whether the server stopped
        // it in time or its store had to be reopened.
        let run = wait_for(&base, &long, |r| r["status"] != "running", 30).await;
        assert_eq!(run["status"], "failed", "{run}");
        let error = run["error"].as_str().unwrap().to_lowercase();
        assert!(error.contains("full") || error.contains("space"), "{run}");
        let (s, created) = post(&base, "/api/runs", Some(TOKEN), looping_eval("after", 2)).await;
        assert_eq!(s, 201, "{created}");
        let id = created["id"].as_str().unwrap().to_string();
        let run = wait_for(
            &base,
            &id,
            |r| r["status"] != "queued" && r["status"] != "running",
            60,
        )
        .await;
        assert_eq!(run["status"], "done", "{run}");
    });
    assert_eq!(server.child.id(), pid, "the same server, on the same port");
    drop(server);
    drop(mount);
}

#[test]
fn a_cli_training_killed_with_9_reads_as_interrupted_afterwards() {
    let t = setup("faults-cli-kill");
    let model = crate::train::tiny_model(&t);
    let data = crate::train::dataset(&t);
    let out = t.path().join("out");
    let mut child = t
        .cmd(&["train"])
        .args(
            [
                format!("model_name_or_path={}", model.display()),
                format!("dataset={}", data.display()),
                format!("output_dir={}", out.display()),
                "max_steps=100000".into(),
                "per_device_train_batch_size=4".into(),
                "max_seq_length=64".into(),
                "lora.r=4".into(),
                "logging_steps=1".into(),
                "save_steps=1000".into(),
            ]
            .iter()
            .flat_map(|kv| ["--set".to_string(), kv.clone()]),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    // Training has begun once the run says which run it is and a step was logged.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(Instant::now() < deadline, "training did not start");
        match lines.next() {
            Some(Ok(line)) if line.contains("training ") && line.contains("steps") => break,
            Some(_) => {}
            None => panic!("train exited early"),
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let listed = run_ok(&mut t.cmd(&["runs", "list", "--json"]));
    let runs: Value = serde_json::from_str(&listed).unwrap();
    let run = &runs[0];
    assert_eq!(run["kind"], "train", "{runs}");
    assert_eq!(
        run["status"], "interrupted",
        "a dead process's run is not running: {run}"
    );
    assert!(run["error"].as_str().unwrap().contains("pid"), "{run}");
}

/// The server's resident memory, from /proc.
fn rss_mib(server: &Server) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.child.id())).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib >> 10)
}

/// The documented bound (README, "The server"): after the first job, 20 more sequential jobs
/// add at most this much resident memory.
const RSS_GROWTH_BOUND_MIB: u64 = 200;

#[test]
fn rss_after_twenty_sequential_jobs_stays_within_the_bound_of_rss_after_the_first() {
    use crate::serve_models::{serve_tiny, train_config};
    let t = setup("faults-rss");
    let model = crate::train::tiny_model(&t);
    let data = crate::train::dataset(&t);
    let server = serve_tiny(&t, &model);
    let base = server.base.clone();
    let rows: Vec<Value> = (0..2000)
        .map(|i| json!({"id": format!("s{i}"), "prediction": format!("the cat number {i} sat on a mat"), "reference": "the cat sat on the mat"}))
        .collect();
    let eval =
        json!({"kind": "eval", "name": "e", "predictions": rows, "metrics": ["rouge", "bleu"]});
    let train = json!({"kind": "train", "config": train_config(&model, &data, 2, 1000)});
    let mut after_first = None;
    for i in 0..21 {
        let body = if i % 2 == 0 {
            eval.clone()
        } else {
            train.clone()
        };
        rt().block_on(async {
            let (s, created) = post(&base, "/api/runs", Some(TOKEN), body).await;
            assert_eq!(s, 201, "{created}");
            let id = created["id"].as_str().unwrap().to_string();
            let run = wait_for(
                &base,
                &id,
                |r| matches!(r["status"].as_str(), Some("done" | "failed")),
                120,
            )
            .await;
            assert_eq!(run["status"], "done", "{run}");
        });
        if i == 1 {
            after_first = rss_mib(&server);
        }
    }
    let (Some(first), Some(last)) = (after_first, rss_mib(&server)) else {
        eprintln!("skipped: no /proc here");
        return;
    };
    eprintln!("RSS after the first jobs: {first} MiB; after 21: {last} MiB");
    assert!(
        last <= first + RSS_GROWTH_BOUND_MIB,
        "RSS grew from {first} MiB to {last} MiB"
    );
}

#[test]
fn a_damaged_store_is_an_error_naming_it_not_a_panic() {
    let t = setup("faults-store");
    let p = t.write(
        "p.jsonl",
        "{\"id\": \"1\", \"prediction\": \"a cat\", \"reference\": \"a cat\"}\n",
    );
    for _ in 0..2 {
        run_ok(&mut t.cmd(&[
            "eval",
            "--predictions",
            p.to_str().unwrap(),
            "--metrics",
            "rouge",
        ]));
    }
    // Overwrite part of sled's log with garbage.
    let db = t.data_dir().join("store").join("db");
    let mut bytes = std::fs::read(&db).unwrap();
    for b in bytes.iter_mut().skip(100).take(200) {
        *b = 0xA5;
    }
    std::fs::write(&db, bytes).unwrap();
    for args in [
        &["runs", "list"][..],
        &["serve", "--addr", "127.0.0.1:0", "--token", TOKEN][..],
    ] {
        let out = t.cmd(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains("damaged") && !stderr.contains("panicked"),
            "{stderr}"
        );
    }
}
