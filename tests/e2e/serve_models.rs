//! `adapterlab serve` with models, on the tiny random Llama of the train tests: training jobs
//! (events, adapter, validation, cancel, restart and resume), generate jobs (samples, scores),
//! and the OpenAI-compatible `/v1` (models, completions with log-probabilities, streaming,
//! errors, and the LLM judge plugin scoring through it).

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::server::{Server, TOKEN, get, post, rt, start_with, wait_for};
use crate::train::{dataset, tiny_model};
use crate::util::*;

/// The tiny model with a chat template, and room for long prompts (the judge's).
pub(crate) fn chat_model(t: &TestDir) -> PathBuf {
    let dir = tiny_model(t);
    let mut config = read_json(&dir.join("config.json"));
    config["max_position_embeddings"] = 4096.into();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        json!({
            "chat_template": "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}",
            "eos_token": "</s>",
        })
        .to_string(),
    )
    .unwrap();
    dir
}

pub(crate) fn serve_tiny(t: &TestDir, model: &Path) -> Server {
    // The test's datasets lie in its temporary folder, outside the data directory.
    start_with(
        t,
        &[
            "--model",
            model.to_str().unwrap(),
            "--allow-path",
            t.path().to_str().unwrap(),
        ],
        &[],
    )
}

/// A small, quick training config on the tiny model.
pub(crate) fn train_config(model: &Path, data: &Path, max_steps: u64, save_steps: u64) -> Value {
    json!({
        "model_name_or_path": model, "dataset": data, "max_steps": max_steps,
        "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
        "learning_rate": 0.01, "warmup_ratio": 0.1, "logging_steps": 1,
        "save_steps": save_steps, "eval_steps": 0, "max_seq_length": 64,
        "lora": {"r": 4, "lora_alpha": 8},
    })
}

/// Every event of a finished run: `(event name, data)`.
pub(crate) async fn events(base: &str, id: &str) -> Vec<(String, Value)> {
    let text = crate::server::event_text(base, id).await;
    let mut out = Vec::new();
    let mut name = String::new();
    for line in text.lines() {
        if let Some(n) = line.strip_prefix("event: ") {
            name = n.to_string();
        } else if let Some(d) = line.strip_prefix("data: ") {
            out.push((name.clone(), serde_json::from_str(d).unwrap()));
        }
    }
    out
}

pub(crate) fn logged_steps(events: &[(String, Value)]) -> Vec<u64> {
    events
        .iter()
        .filter(|(n, d)| n == "loss" && d["loss"].is_number())
        .map(|(_, d)| d["step"].as_u64().unwrap())
        .collect()
}

fn logs(events: &[(String, Value)]) -> Vec<String> {
    events
        .iter()
        .filter(|(n, _)| n == "log")
        .map(|(_, d)| d["message"].as_str().unwrap().to_string())
        .collect()
}

async fn create(base: &str, body: Value) -> String {
    let (s, created) = post(base, "/api/runs", Some(TOKEN), body).await;
    assert_eq!(s, 201, "{created}");
    created["id"].as_str().unwrap().to_string()
}

async fn chat(base: &str, body: Value) -> (u16, Value) {
    post(base, "/v1/chat/completions", Some(TOKEN), body).await
}

#[test]
fn a_training_job_streams_its_loss_records_its_adapter_which_generates_and_serves() {
    let t = setup("serve-train");
    let model = chat_model(&t);
    let data = dataset(&t);
    let server = serve_tiny(&t, &model);
    let base = server.base.clone();
    let data_dir = t.data_dir();
    rt().block_on(async move {
        // Bad configs are refused up front, naming the key.
        let mut bad = train_config(&model, &data, 8, 4);
        bad["lerning_rate"] = json!(0.1);
        let (s, body) = post(&base, "/api/runs", Some(TOKEN), json!({"kind": "train", "config": bad})).await;
        assert_eq!(s, 422, "{body}");
        let e = body["error"].as_str().unwrap();
        assert!(e.contains("`lerning_rate`") && e.contains("did you mean `learning_rate`"), "{e}");
        for (key, value, needle) in [
            ("lora", json!({"r": "four"}), "`lora.r` must be an integer"),
            ("output_dir", json!("../../elsewhere"), "runs/"),
            ("dataset", json!("/nonexistent/data.jsonl"), "config.dataset"),
            ("model_name_or_path", json!("/nonexistent/model"), "model_name_or_path"),
        ] {
            let mut bad = train_config(&model, &data, 8, 4);
            bad[key] = value;
            let (s, body) = post(&base, "/api/runs", Some(TOKEN), json!({"kind": "train", "config": bad})).await;
            assert_eq!(s, 422, "{key}: {body}");
            assert!(body["error"].as_str().unwrap().contains(needle), "{key}: {body}");
        }
        let (s, body) = post(&base, "/api/runs", Some(TOKEN), json!({"kind": "train", "confg": {}})).await;
        assert_eq!(s, 422);
        assert!(body["error"].as_str().unwrap().contains("did you mean `config`"), "{body}");

        let id = create(
            &base,
            json!({"kind": "train", "name": "echo-v1", "config": train_config(&model, &data, 8, 4)}),
        )
        .await;
        let run = wait_for(&base, &id, |r| matches!(r["status"].as_str(), Some("done" | "failed")), 180).await;
        assert_eq!(run["status"], "done", "{run}");
        assert_eq!(run["progress"]["done"], 8);
        assert_eq!(run["metadata"]["global_step"], "8");
        let out = data_dir.join("runs").join(&id);
        assert_eq!(run["metadata"]["output_dir"], out.display().to_string());
        assert!(out.join("adapter_model.safetensors").is_file());
        assert!(out.join("checkpoint-8").is_dir());
        let ev = events(&base, &id).await;
        assert_eq!(logged_steps(&ev), (1..=8).collect::<Vec<_>>());
        assert!(ev.iter().any(|(n, d)| n == "loss" && d["learning_rate"].is_number()));
        // Every step, logged ones included, has its own event for the charts, with throughput
        // and the process's memory; the run keeps the peak.
        let steps: Vec<&Value> = ev.iter().filter(|(n, _)| n == "step").map(|(_, d)| d).collect();
        assert_eq!(steps.iter().map(|d| d["step"].as_u64().unwrap()).collect::<Vec<_>>(), (1..=8).collect::<Vec<_>>());
        for d in &steps {
            assert!(d["loss"].is_number() && d["tokens_per_second"].as_f64() > Some(0.0), "{d}");
            assert!(d["memory_bytes"].as_u64() > Some(1 << 20), "{d}");
            assert!(d["gpu_memory_bytes"].is_null(), "{d}");
        }
        assert!(run["metadata"]["peak_memory_bytes"].as_str().and_then(|v| v.parse::<u64>().ok()) > Some(1 << 20), "{run}");
        let log = logs(&ev);
        assert!(log.iter().any(|l| l.starts_with("step 8/8 · loss")), "{log:?}");
        assert!(log.iter().any(|l| l.starts_with("saved the adapter")), "{log:?}");

        // The adapter is stored under the run's name and served as a model.
        let (_, adapters) = get(&base, "/api/adapters").await;
        let adapter = adapters
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["name"] == "echo-v1")
            .unwrap_or_else(|| panic!("{adapters}"));
        assert_eq!(adapter["run_id"], id.as_str());
        let (_, models) = get(&base, "/v1/models").await;
        let ids: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
        assert_eq!(ids, [model.to_str().unwrap(), "echo-v1"]);

        // A generate run with the adapter on inline inputs, scored by ROUGE in place.
        let inputs = json!([
            {"id": "a", "source": "cat dog cat. Echo dog:", "reference": "dog dog dog"},
            {"id": "b", "source": "sun fish sun. Echo fish:", "reference": "fish fish fish"},
        ]);
        let gen_id = create(
            &base,
            json!({"kind": "generate", "name": "echo-v1 on inputs", "adapter": "echo-v1", "inputs": inputs,
                   "formatter": "summarize", "max_new_tokens": 8, "metrics": ["rouge"]}),
        )
        .await;
        let run = wait_for(&base, &gen_id, |r| matches!(r["status"].as_str(), Some("done" | "failed")), 120).await;
        assert_eq!(run["status"], "done", "{run}");
        assert_eq!(run["kind"], "generate");
        assert_eq!(run["metadata"]["adapter"], "echo-v1");
        assert_eq!(run["metadata"]["model"], model.to_str().unwrap());
        // Where the generations were computed (this server: the CPU, f32).
        assert_eq!(run["metadata"]["compute"], "cpu f32", "{run}");
        assert!(run["aggregates"]["rouge1"]["mean"].is_number(), "{run}");
        let (_, samples) = get(&base, &format!("/api/runs/{gen_id}/samples")).await;
        let samples = samples.as_array().unwrap();
        assert_eq!(samples.len(), 2);
        assert_eq!(samples[0]["id"], "a");
        assert_eq!(samples[0]["reference"], "dog dog dog");
        assert_eq!(samples[0]["source"], "cat dog cat. Echo dog:");
        assert!(samples[0]["scores"]["rouge1"].is_number(), "{}", samples[0]);

        // The base on a dataset split, unscored; comparable with the adapter's run by id.
        let base_id = create(
            &base,
            json!({"kind": "generate", "dataset": data, "split": "validation", "limit": 3, "max_new_tokens": 4}),
        )
        .await;
        let run = wait_for(&base, &base_id, |r| matches!(r["status"].as_str(), Some("done" | "failed")), 120).await;
        assert_eq!(run["status"], "done", "{run}");
        let (_, samples) = get(&base, &format!("/api/runs/{base_id}/samples")).await;
        let samples = samples.as_array().unwrap();
        assert_eq!(samples.len(), 3);
        assert!(samples.iter().all(|s| s["prediction"].is_string() && s["scores"] == json!({})));
        assert_eq!(samples[0]["reference"], "tree tree tree");

        for (body, needle) in [
            (json!({"kind": "generate", "adapter": "echo-v2"}), "did you mean \"echo-v1\""),
            (json!({"kind": "generate", "split": "dev"}), "`split`"),
            (json!({"kind": "generate", "temperature": 5}), "`temperature`"),
            (json!({"kind": "generate", "metrics": ["rogue"]}), "did you mean \"rouge\""),
            (json!({"kind": "generate", "inputs": [{"id": 1}]}), "inputs[0]"),
            (json!({"kind": "generate", "max_tokens": 3}), "did you mean `max_new_tokens`"),
        ] {
            let (s, e) = post(&base, "/api/runs", Some(TOKEN), body.clone()).await;
            assert_eq!(s, 422, "{body}: {e}");
            assert!(e["error"].as_str().unwrap().contains(needle), "{body}: {e}");
        }

        // The adapter answers chat completions by its name.
        let (s, answer) = chat(
            &base,
            json!({"model": "echo-v1", "messages": [{"role": "user", "content": "cat dog cat. Echo dog:"}],
                   "max_tokens": 4, "temperature": 0, "logprobs": true, "top_logprobs": 2}),
        )
        .await;
        assert_eq!(s, 200, "{answer}");
        assert_eq!(answer["model"], "echo-v1");
        let tokens = answer["choices"][0]["logprobs"]["content"].as_array().unwrap();
        assert!(!tokens.is_empty() && tokens.iter().all(|t| t["top_logprobs"].as_array().unwrap().len() == 2));
    });
}

#[test]
fn a_training_job_cancels_at_a_step_and_resumes_from_its_checkpoint_across_a_restart() {
    let t = setup("serve-train-resume");
    let model = tiny_model(&t);
    let data = dataset(&t);
    let max_steps = 160;
    let server = serve_tiny(&t, &model);
    let base = server.base.clone();
    let id = rt().block_on(async {
        let id = create(
            &base,
            json!({"kind": "train", "name": "long", "config": train_config(&model, &data, max_steps, 5)}),
        )
        .await;
        wait_for(&base, &id, |r| r["progress"]["done"].as_u64() >= Some(6), 120).await;
        let (s, cancelled) = post(&base, &format!("/api/runs/{id}/cancel"), Some(TOKEN), json!({})).await;
        assert_eq!(s, 200, "{cancelled}");
        let run = wait_for(&base, &id, |r| r["status"] != "running", 60).await;
        assert_eq!(run["status"], "cancelled", "{run}");
        let stopped_at = run["progress"]["done"].as_u64().unwrap();
        assert!(stopped_at < max_steps, "cancel stops before the end: {run}");
        let out = t.data_dir().join("runs").join(&id);
        assert!(out.join("checkpoint-5").is_dir(), "the last checkpoint stays");
        assert!(!out.join("adapter_model.safetensors").exists(), "a stopped run saves no final adapter");

        // Resumed, it continues from its newest checkpoint.
        let (s, resumed) = post(&base, &format!("/api/runs/{id}/resume"), Some(TOKEN), json!({})).await;
        assert_eq!(s, 200, "{resumed}");
        wait_for(&base, &id, |r| r["progress"]["done"].as_u64() >= Some(stopped_at + 10), 120).await;
        id
    });
    // The server dies in the middle of the training.
    drop(server);

    let server = serve_tiny(&t, &model);
    let base = server.base.clone();
    rt().block_on(async move {
        let (_, run) = get(&base, &format!("/api/runs/{id}")).await;
        assert_eq!(run["status"], "interrupted", "{run}");
        assert!(
            run["error"].as_str().unwrap().contains("last checkpoint"),
            "{run}"
        );
        let (s, _) = post(
            &base,
            &format!("/api/runs/{id}/resume"),
            Some(TOKEN),
            json!({}),
        )
        .await;
        assert_eq!(s, 200);
        let run = wait_for(
            &base,
            &id,
            |r| matches!(r["status"].as_str(), Some("done" | "failed")),
            240,
        )
        .await;
        assert_eq!(run["status"], "done", "{run}");
        assert_eq!(run["metadata"]["global_step"], max_steps.to_string());
        let ev = events(&base, &id).await;
        let log = logs(&ev);
        let resumes: Vec<&String> = log
            .iter()
            .filter(|l| l.starts_with("resuming from"))
            .collect();
        assert!(
            resumes.len() >= 2 && resumes.iter().all(|l| l.contains("checkpoint-")),
            "{log:?}"
        );
        // Every step was logged once: those redone after a checkpoint are not stored again.
        let mut steps = logged_steps(&ev);
        steps.sort();
        assert_eq!(steps, (1..=max_steps).collect::<Vec<_>>());
        let statuses: Vec<&str> = ev
            .iter()
            .filter(|(n, _)| n == "status")
            .map(|(_, d)| d["status"].as_str().unwrap())
            .collect();
        assert!(
            statuses.contains(&"cancelled") && statuses.contains(&"interrupted"),
            "{statuses:?}"
        );
        assert_eq!(statuses.last(), Some(&"done"));
    });
}

/// Sets the tiny model's output layer so that at every position `3` and `4` are equally likely
/// and the rest unlikely, or (when the hidden state points the other way) `2` and `5` are: a
/// judge weighting the score tokens by their probabilities gets 3.5 either way, where reading
/// the answer's text would give a whole number.
fn make_a_judge(model: &Path) {
    let file = model.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&file, &candle_core::Device::Cpu).unwrap();
    let head = &tensors["lm_head.weight"];
    let (vocab, hidden) = head.dims2().unwrap();
    // One token per character: '3' and '4' follow the three special tokens, '\n' and ' '.
    let id = |c: char| c as usize - 32 + 4;
    let mut w = vec![0f32; vocab * hidden];
    for j in 0..hidden {
        for (c, sign) in [('3', 1.0), ('4', 1.0), ('2', -1.0), ('5', -1.0)] {
            w[id(c) * hidden + j] = 50.0 * sign;
        }
    }
    tensors.insert(
        "lm_head.weight".into(),
        candle_core::Tensor::from_vec(w, (vocab, hidden), &candle_core::Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &file).unwrap();
}

#[test]
fn v1_serves_chat_completions_with_logprobs_streaming_errors_and_the_judge() {
    let t = setup("serve-v1");
    let model = chat_model(&t);
    make_a_judge(&model);
    let served = model.to_str().unwrap().to_string();
    let server = serve_tiny(&t, &model);
    let base = server.base.clone();
    let messages = json!([{"role": "system", "content": "Score it."}, {"role": "user", "content": "Summary: ok"}]);
    let answer = rt().block_on({
        let (base, served, messages) = (base.clone(), served.clone(), messages.clone());
        async move {
            let (s, list) = get(&base, "/v1/models").await;
            assert_eq!(s, 200);
            assert_eq!(list["object"], "list");
            assert_eq!(list["data"][0]["id"], served.as_str());

            let (s, answer) = chat(
                &base,
                json!({"model": served, "messages": messages, "max_tokens": 5, "temperature": 0,
                       "logprobs": true, "top_logprobs": 5, "seed": 1}),
            )
            .await;
            assert_eq!(s, 200, "{answer}");
            assert_eq!(answer["object"], "chat.completion");
            let choice = &answer["choices"][0];
            assert_eq!(choice["message"]["role"], "assistant");
            assert_eq!(choice["finish_reason"], "length");
            let text = choice["message"]["content"].as_str().unwrap();
            assert_eq!(text.len(), 5);
            // Ties go to the lower token id, as argmax does.
            assert!(text.chars().all(|c| c == '2' || c == '3'), "{text:?}");
            let first = &choice["logprobs"]["content"][0];
            let top = first["top_logprobs"].as_array().unwrap();
            assert_eq!(top.len(), 5);
            let top2: Vec<&str> = top[..2].iter().map(|t| t["token"].as_str().unwrap()).collect();
            assert!(top2 == ["3", "4"] || top2 == ["2", "5"], "{top:?}");
            assert_eq!(first["token"], top[0]["token"]);
            let lp = |i: usize| top[i]["logprob"].as_f64().unwrap();
            assert!((lp(0) - lp(1)).abs() < 1e-4 && lp(0) <= 0.0, "{top:?}");
            let p: f64 = top.iter().map(|t| t["logprob"].as_f64().unwrap().exp()).sum();
            assert!(p <= 1.0 + 1e-4, "probabilities sum to {p}");
            assert_eq!(first["bytes"], json!(first["token"].as_str().unwrap().as_bytes()));
            let usage = &answer["usage"];
            assert_eq!(usage["completion_tokens"], 5);
            assert_eq!(
                usage["total_tokens"].as_u64(),
                Some(usage["prompt_tokens"].as_u64().unwrap() + 5)
            );

            // A stop string ends the answer before it.
            let stop = &text[1..2];
            let cut = &text[..text.find(stop).unwrap()];
            let (_, stopped) = chat(
                &base,
                json!({"model": served, "messages": messages, "max_tokens": 5, "temperature": 0, "stop": [stop]}),
            )
            .await;
            assert_eq!(stopped["choices"][0]["finish_reason"], "stop");
            assert_eq!(stopped["choices"][0]["message"]["content"], cut);

            // Streaming: chunks that add up to the same answer, usage, then [DONE].
            let resp = reqwest::Client::new()
                .post(format!("{base}/v1/chat/completions"))
                .bearer_auth(TOKEN)
                .json(&json!({"model": served, "messages": messages, "max_tokens": 5, "temperature": 0,
                              "stream": true, "stream_options": {"include_usage": true}, "logprobs": true}))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status().as_u16(), 200);
            assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
            let body = resp.text().await.unwrap();
            let data: Vec<&str> = body.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
            assert_eq!(data.last(), Some(&"[DONE]"), "{body}");
            let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
            assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"]));
            assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
            let streamed: String = chunks
                .iter()
                .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
                .collect();
            assert_eq!(streamed, text);
            let streamed_lp: usize = chunks
                .iter()
                .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array())
                .map(Vec::len)
                .sum();
            assert_eq!(streamed_lp, 5);
            let finish: Vec<&Value> = chunks.iter().map(|c| &c["choices"][0]["finish_reason"]).filter(|f| !f.is_null()).collect();
            assert_eq!(finish, [&json!("length")]);
            assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 5);

            // Errors in OpenAI's shape.
            let (s, e) = chat(&base, json!({"model": "gpt-9", "messages": messages})).await;
            assert_eq!(s, 404, "{e}");
            assert_eq!(e["error"]["code"], "model_not_found");
            assert_eq!(e["error"]["param"], "model");
            let (s, e) = chat(&base, json!({"model": served, "messages": messages, "n": 3})).await;
            assert_eq!((s, e["error"]["param"].as_str()), (400, Some("n")), "{e}");
            let (s, e) = post(&base, "/v1/chat/completions", None, json!({"model": served, "messages": messages})).await;
            assert_eq!(s, 401, "{e}");
            assert_eq!(e["error"]["code"], "invalid_api_key");
            let (s, e) = get(&base, "/v1/models/gpt-9").await;
            assert_eq!(s, 404, "{e}");
            let (_, doc) = get(&base, "/api/openapi.json").await;
            for path in ["/v1/chat/completions", "/v1/models"] {
                assert!(doc["paths"][path].is_object(), "{path} is documented");
            }
            assert!(doc["components"]["schemas"]["TrainConfig"]["properties"]["lora"].is_object());
            text.to_string()
        }
    });
    assert!(!answer.is_empty());

    // The LLM judge scores through this server as any OpenAI-compatible one, weighting the
    // score tokens of the first answer position by their log-probabilities (G-Eval).
    let client = setup("serve-v1-judge");
    let preds = client.write(
        "p.jsonl",
        [
            json!({"id": "1", "prediction": "Amanda will bring cookies.", "reference": "r", "source": "Amanda: I baked cookies.\nJerry: Bring some!"}),
            json!({"id": "2", "prediction": "Jerry lost his keys.", "reference": "r", "source": "Jerry: Where are my keys?"}),
        ]
        .map(|r| r.to_string())
        .join("\n"),
    );
    let out = client.path().join("judged.json");
    let mut cmd = client.cmd(&[
        "eval",
        "--predictions",
        preds.to_str().unwrap(),
        "--metrics",
        "judge",
        "--set",
        &format!("judge.model={served}"),
        "--json",
        out.to_str().unwrap(),
    ]);
    cmd.env("OPENAI_BASE_URL", format!("{base}/v1"))
        .env("OPENAI_API_KEY", TOKEN)
        .env("ADAPTERLAB_LLM_MAX_RETRIES", "0");
    run_ok(&mut cmd);
    let doc = read_json(&out);
    let samples = doc["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 2);
    for s in samples {
        assert!(s["errors"].as_object().is_none_or(|e| e.is_empty()), "{s}");
        for criterion in ["relevance", "coherence", "consistency", "fluency"] {
            let v = s["scores"][criterion]
                .as_f64()
                .unwrap_or_else(|| panic!("no {criterion}: {s}"));
            assert!((v - 3.5).abs() < 1e-6, "{criterion} = {v}");
        }
    }
    assert_eq!(doc["usage"]["requests"], 8, "{}", doc["usage"]);
}
