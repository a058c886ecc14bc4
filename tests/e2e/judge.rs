//! The LLM judge against a local OpenAI-compatible test server: G-Eval weighting from
//! logprobs, retries on 429/5xx honouring Retry-After, parse errors kept per sample, and the
//! response cache (a rerun sends no requests).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

use crate::util::*;

#[derive(Default)]
struct Server {
    requests: AtomicUsize,
    /// Summaries that already got their one 429.
    throttled: Mutex<std::collections::HashSet<String>>,
    saw_auth: Mutex<Option<String>>,
}

async fn chat(
    State(s): State<Arc<Server>>,
    headers: axum::http::HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    s.requests.fetch_add(1, Ordering::SeqCst);
    *s.saw_auth.lock().unwrap() = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let prompt: String = body["messages"]
        .as_array()
        .map(|m| {
            m.iter()
                .filter_map(|m| m["content"].as_str())
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default();
    if prompt.contains("PLEASE-RETRY") {
        let key = prompt.to_string();
        if s.throttled.lock().unwrap().insert(key) {
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [("retry-after", "0")],
                "slow down",
            )
                .into_response();
        }
    }
    if prompt.contains("PLEASE-FAIL") {
        return (StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response();
    }
    if prompt.contains("GARBAGE") {
        return Json(json!({
            "model": "test-judge",
            "choices": [{"message": {"role": "assistant", "content": "I would rather not say."}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5}
        }))
        .into_response();
    }
    let with_logprobs = body["logprobs"].as_bool().unwrap_or(false);
    // 60% "4", 30% "5", 10% "3", plus a non-score token the judge must ignore.
    let top = json!([
        {"token": "4", "logprob": 0.6f64.ln()},
        {"token": "5", "logprob": 0.3f64.ln()},
        {"token": " 3", "logprob": 0.1f64.ln()},
        {"token": "The", "logprob": -9.0}
    ]);
    let mut choice = json!({"message": {"role": "assistant", "content": "4"}});
    if with_logprobs {
        choice["logprobs"] =
            json!({"content": [{"token": "4", "logprob": 0.6f64.ln(), "top_logprobs": top}]});
    }
    Json(json!({"model": "test-judge", "choices": [choice], "usage": {"prompt_tokens": 100, "completion_tokens": 1}})).into_response()
}

fn start_server() -> (String, Arc<Server>) {
    let state = Arc::new(Server::default());
    let app = axum::Router::new()
        .route("/v1/chat/completions", post(chat))
        .with_state(state.clone());
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
    (format!("http://{addr}/v1"), state)
}

fn sample(doc: &Value, id: &str) -> Value {
    doc["samples"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .cloned()
        .unwrap()
}

#[test]
fn judge_weights_retries_reports_parse_errors_and_caches() {
    let (base, server) = start_server();
    let t = setup("judge");
    let rows = [
        ("good", "Amanda will bring cookies tomorrow."),
        ("throttled", "PLEASE-RETRY Jerry forgot the keys."),
        ("garbage", "GARBAGE"),
        ("failing", "PLEASE-FAIL"),
    ];
    let lines: Vec<String> = rows
        .iter()
        .map(|(id, p)| {
            json!({"id": id, "prediction": p, "reference": "ref", "source": "A: hi\nB: hello"})
                .to_string()
        })
        .collect();
    let p = t.write("p.jsonl", lines.join("\n"));
    let out = t.path().join("out.json");
    let eval = |out: &std::path::Path| {
        let mut cmd = t.cmd(&[
            "eval",
            "--predictions",
            p.to_str().unwrap(),
            "--metrics",
            "judge",
            "--json",
            out.to_str().unwrap(),
        ]);
        cmd.env("OPENAI_BASE_URL", &base)
            .env("OPENAI_API_KEY", "sk-test")
            .env("ADAPTERLAB_LLM_BACKOFF_MS", "10")
            .env("ADAPTERLAB_LLM_MAX_RETRIES", "2");
        run_ok(&mut cmd)
    };
    eval(&out);
    let doc = read_json(&out);
    let good = sample(&doc, "good");
    for criterion in ["relevance", "coherence", "consistency", "fluency"] {
        let v = good["scores"][criterion]
            .as_f64()
            .unwrap_or_else(|| panic!("no {criterion}: {good}"));
        assert!(
            (v - 4.2).abs() < 1e-9,
            "{criterion} = {v}, expected the logprob-weighted 4.2"
        );
    }
    let throttled = sample(&doc, "throttled");
    assert!(
        (throttled["scores"]["relevance"].as_f64().unwrap() - 4.2).abs() < 1e-9,
        "a 429 is retried: {throttled}"
    );
    let garbage = sample(&doc, "garbage");
    let e = garbage["errors"]["judge"]
        .as_str()
        .unwrap_or_else(|| panic!("garbage has no error: {garbage}"));
    assert!(
        e.contains("I would rather not say"),
        "the raw answer is kept: {e}"
    );
    let failing = sample(&doc, "failing");
    assert!(
        failing["errors"]["judge"].as_str().unwrap().contains("500"),
        "{failing}"
    );
    assert_eq!(
        server.saw_auth.lock().unwrap().as_deref(),
        Some("Bearer sk-test")
    );
    assert!(doc["usage"]["requests"].as_u64().unwrap() > 0);

    // A rerun of the same evaluation is answered from the cache, except what failed.
    let sent = server.requests.load(Ordering::SeqCst);
    let out2 = t.path().join("out2.json");
    eval(&out2);
    let resent = server.requests.load(Ordering::SeqCst) - sent;
    let doc2 = read_json(&out2);
    assert_eq!(sample(&doc2, "good")["scores"], good["scores"]);
    // Only the failing sample's four requests (each tried 3 times) go out again.
    assert_eq!(resent, 4 * 3, "errors are not cached, successes are");
}
