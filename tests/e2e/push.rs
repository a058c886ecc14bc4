//! `adapterlab push` against a fake Hugging Face Hub that checks each request as the real API
//! would (token, repository creation, preupload, the LFS batch API with the object's sha256,
//! the NDJSON commit): the right files arrive, large weights through LFS, and the model card
//! parses as YAML with PEFT's fields and the adapter's stored evaluation results.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{post, put};
use base64::Engine as _;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::train::{dataset, tiny_model};
use crate::util::*;

const HF_TOKEN: &str = "hf_testtoken_0123456789";

#[derive(Default)]
struct Hub {
    base: String,
    repos: Vec<(String, bool)>,
    branches: Vec<String>,
    lfs: BTreeMap<String, usize>,
    /// (revision, path) → contents, per commit.
    commits: Vec<(String, BTreeMap<String, Vec<u8>>)>,
}

type Shared = Arc<Mutex<Hub>>;

fn authorized(headers: &HeaderMap) -> bool {
    headers.get("authorization").and_then(|v| v.to_str().ok())
        == Some(&format!("Bearer {HF_TOKEN}"))
}

async fn create_repo(
    State(h): State<Shared>,
    headers: HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> StatusCode {
    if !authorized(&headers) {
        return StatusCode::UNAUTHORIZED;
    }
    let repo = format!(
        "{}/{}",
        body["organization"].as_str().unwrap(),
        body["name"].as_str().unwrap()
    );
    let mut h = h.lock().unwrap();
    if h.repos.iter().any(|(r, _)| *r == repo) {
        return StatusCode::CONFLICT;
    }
    h.repos.push((repo, body["private"].as_bool().unwrap()));
    StatusCode::OK
}

async fn branch(
    State(h): State<Shared>,
    headers: HeaderMap,
    Path((_o, _n, b)): Path<(String, String, String)>,
) -> StatusCode {
    assert!(authorized(&headers));
    h.lock().unwrap().branches.push(b);
    StatusCode::OK
}

async fn preupload(headers: HeaderMap, axum::Json(body): axum::Json<Value>) -> axum::Json<Value> {
    assert!(authorized(&headers));
    let files: Vec<Value> = body["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let sample = base64::engine::general_purpose::STANDARD.decode(f["sample"].as_str().unwrap()).unwrap();
            assert!(sample.len() <= 512);
            // The Hub sends weights and anything over 10 MB through LFS.
            let path = f["path"].as_str().unwrap();
            let lfs = path.ends_with(".safetensors") || f["size"].as_u64().unwrap() > 10 << 20;
            json!({"path": path, "uploadMode": if lfs { "lfs" } else { "regular" }, "shouldIgnore": false})
        })
        .collect();
    axum::Json(json!({"files": files}))
}

async fn lfs_batch(State(h): State<Shared>, headers: HeaderMap, body: Bytes) -> axum::Json<Value> {
    assert!(authorized(&headers));
    assert_eq!(headers["accept"], "application/vnd.git-lfs+json");
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["operation"], "upload");
    assert_eq!(body["hash_algo"], "sha256");
    let base = h.lock().unwrap().base.clone();
    let objects: Vec<Value> = body["objects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            let oid = o["oid"].as_str().unwrap();
            json!({"oid": oid, "size": o["size"], "actions": {
                "upload": {"href": format!("{base}/lfs-store/{oid}"), "header": {"X-Upload-Check": "yes"}},
                "verify": {"href": format!("{base}/lfs-verify")}}})
        })
        .collect();
    axum::Json(json!({"transfer": "basic", "objects": objects}))
}

async fn lfs_store(
    State(h): State<Shared>,
    headers: HeaderMap,
    Path(oid): Path<String>,
    body: Bytes,
) -> StatusCode {
    assert_eq!(headers["x-upload-check"], "yes");
    assert_eq!(
        hex::encode(Sha256::digest(&body)),
        oid,
        "the LFS object is its sha256"
    );
    h.lock().unwrap().lfs.insert(oid, body.len());
    StatusCode::OK
}

async fn lfs_verify(State(h): State<Shared>, axum::Json(body): axum::Json<Value>) -> StatusCode {
    let h = h.lock().unwrap();
    assert_eq!(
        h.lfs.get(body["oid"].as_str().unwrap()).copied(),
        body["size"].as_u64().map(|s| s as usize)
    );
    StatusCode::OK
}

async fn commit(
    State(h): State<Shared>,
    headers: HeaderMap,
    Path((_o, _n, rev)): Path<(String, String, String)>,
    body: String,
) -> axum::Json<Value> {
    assert!(authorized(&headers));
    assert_eq!(headers["content-type"], "application/x-ndjson");
    let lines: Vec<Value> = body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["key"], "header", "the header comes first");
    assert!(
        lines[0]["value"]["summary"]
            .as_str()
            .unwrap()
            .contains("adapterlab")
    );
    let mut h = h.lock().unwrap();
    let mut files = BTreeMap::new();
    for line in &lines[1..] {
        let v = &line["value"];
        let path = v["path"].as_str().unwrap().to_string();
        match line["key"].as_str().unwrap() {
            "file" => {
                assert_eq!(v["encoding"], "base64");
                files.insert(
                    path,
                    base64::engine::general_purpose::STANDARD
                        .decode(v["content"].as_str().unwrap())
                        .unwrap(),
                );
            }
            "lfsFile" => {
                assert_eq!(v["algo"], "sha256");
                let oid = v["oid"].as_str().unwrap();
                assert!(
                    h.lfs.contains_key(oid),
                    "committed an LFS file that was never uploaded"
                );
                files.insert(path, format!("lfs:{oid}").into_bytes());
            }
            other => panic!("unexpected commit line {other}"),
        }
    }
    h.commits.push((rev, files));
    axum::Json(json!({"commitUrl": "https://hub.example/commit/1", "commitOid": "1"}))
}

fn fake_hub(runtime: &tokio::runtime::Runtime) -> (String, Shared) {
    let hub: Shared = Arc::default();
    let app = Router::new()
        .route("/api/repos/create", post(create_repo))
        .route("/api/models/{owner}/{name}/branch/{branch}", post(branch))
        .route(
            "/api/models/{owner}/{name}/preupload/{rev}",
            post(preupload),
        )
        .route("/api/models/{owner}/{name}/commit/{rev}", post(commit))
        .route("/{owner}/{repo}/info/lfs/objects/batch", post(lfs_batch))
        .route("/lfs-store/{oid}", put(lfs_store))
        .route("/lfs-verify", post(lfs_verify))
        .with_state(hub.clone());
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    hub.lock().unwrap().base = base.clone();
    runtime.spawn(async move { axum::serve(listener, app).await.unwrap() });
    (base, hub)
}

#[test]
fn push_sends_the_adapter_lfs_weights_and_a_card_with_its_results() {
    let t = setup("push");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (endpoint, hub) = fake_hub(&runtime);
    let model = tiny_model(&t);
    let data = dataset(&t);
    let out = t.path().join("tiny-lora");
    run_ok(&mut t.cmd(&[
        "train",
        "--set",
        &format!("model_name_or_path={}", model.display()),
        "--set",
        &format!("dataset={}", data.display()),
        "--set",
        &format!("output_dir={}", out.display()),
        "--set",
        "max_steps=2",
        "--set",
        "max_seq_length=64",
        "--set",
        "lora.r=4",
        "--set",
        "eval_after_train=bleu",
    ]));
    let push = |args: &[&str]| {
        let mut cmd = t.cmd(&["push"]);
        cmd.args(args)
            .env("HF_ENDPOINT", &endpoint)
            .env("HF_TOKEN", HF_TOKEN);
        run_ok(&mut cmd)
    };
    let printed = push(&["tiny-lora", "--repo", "me/tiny-lora", "--private"]);
    assert!(
        printed.contains("adapter_model.safetensors") && printed.contains("LFS"),
        "{printed}"
    );

    let h = hub.lock().unwrap();
    assert_eq!(h.repos, [("me/tiny-lora".to_string(), true)]);
    let (rev, files) = &h.commits[0];
    assert_eq!(rev, "main");
    let names: Vec<&str> = files.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "README.md",
            "adapter_config.json",
            "adapter_model.safetensors"
        ]
    );
    assert!(String::from_utf8_lossy(&files["adapter_model.safetensors"]).starts_with("lfs:"));
    let readme = String::from_utf8(files["README.md"].clone()).unwrap();
    let front = readme
        .strip_prefix("---\n")
        .unwrap()
        .split("\n---\n")
        .next()
        .unwrap();
    let card: serde_yaml::Value = serde_yaml::from_str(front).unwrap();
    assert_eq!(card["library_name"], "peft");
    let base = model.display().to_string();
    assert_eq!(card["base_model"].as_str(), Some(base.as_str()));
    let tags: Vec<&str> = card["tags"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|t| t.as_str())
        .collect();
    assert!(
        tags.contains(&format!("base_model:adapter:{base}").as_str()) && tags.contains(&"lora"),
        "{tags:?}"
    );
    assert_eq!(card["pipeline_tag"], "text-generation");
    let metrics = &card["model-index"][0]["results"][0]["metrics"];
    let bleu = metrics
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["type"] == "bleu")
        .expect("the stored BLEU");
    assert!(bleu["value"].as_f64().is_some(), "{readme}");
    assert!(readme.contains("| lora.r | 4 |"), "{readme}");
    drop(h);

    // A second push to a branch: the repository exists (409 is fine), the branch is made.
    push(&["tiny-lora", "--repo", "me/tiny-lora", "--revision", "v2"]);
    let h = hub.lock().unwrap();
    assert_eq!(h.branches, ["v2"]);
    assert_eq!(h.commits[1].0, "v2");
    drop(h);

    // A merged model goes up the same way, with a transformers card.
    let merged = t.path().join("merged");
    run_ok(&mut t.cmd(&[
        "merge",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        out.to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ]));
    push(&[merged.to_str().unwrap(), "--repo", "me/tiny-merged"]);
    let h = hub.lock().unwrap();
    let files = &h.commits[2].1;
    assert!(
        files.contains_key("config.json") && files.contains_key("model.safetensors"),
        "{:?}",
        files.keys()
    );
    let readme = String::from_utf8(files["README.md"].clone()).unwrap();
    assert!(readme.contains("library_name: transformers"), "{readme}");
    drop(h);

    // The server pushes a stored adapter with its own token.
    let server = crate::server::start(
        &t,
        &[("HF_ENDPOINT", endpoint.as_str()), ("HF_TOKEN", HF_TOKEN)],
    );
    let (status, body) = runtime.block_on(crate::server::post(
        &server.base,
        "/api/adapters/tiny-lora/push",
        Some(crate::server::TOKEN),
        json!({"repo": "me/from-server"}),
    ));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["repo"], "me/from-server");
    assert!(
        hub.lock()
            .unwrap()
            .repos
            .iter()
            .any(|(r, _)| r == "me/from-server")
    );
}

#[test]
fn push_without_a_token_or_with_a_bad_repo_says_why() {
    let t = setup("push-errors");
    let dir = t.path().join("a");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("adapter_config.json"), "{}").unwrap();
    let e = run_fail(
        t.cmd(&["push", dir.to_str().unwrap(), "--repo", "me/x"])
            .env_remove("HF_TOKEN")
            .env("HF_HOME", t.path()),
    );
    assert!(e.contains("HF_TOKEN"), "{e}");
    let e = run_fail(&mut t.cmd(&["push", dir.to_str().unwrap(), "--repo", "no-owner"]));
    assert!(e.contains("OWNER/NAME"), "{e}");
}
