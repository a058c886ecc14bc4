//! The API's OpenAPI 3.1 document, served at `/api/openapi.json`. Written by hand next to
//! the handlers so the contract is reviewed where it is implemented.

use serde_json::{Value, json};

pub fn document() -> Value {
    let error = json!({"$ref": "#/components/schemas/Error"});
    let err = |desc: &str| json!({"description": desc, "content": {"application/json": {"schema": error}}});
    let ok = |desc: &str, schema: Value| json!({"description": desc, "content": {"application/json": {"schema": schema}}});
    let openai_err = |desc: &str| json!({"description": desc, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/OpenAiError"}}}});
    let run_id = json!({"name": "id", "in": "path", "required": true, "schema": {"type": "string"}, "description": "run id (a unique prefix is enough) or run name"});
    let secured = json!([{"bearer": []}]);
    let limit = json!({"name": "limit", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 1, "maximum": 10000}, "description": "a page of at most this many items; without it, all of them"});
    let offset = json!({"name": "offset", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 0}, "description": "items skipped before the page (needs `limit`)"});
    // Generated from the config type, its ranges and its choices: the defaults and bounds
    // written once, in train/config.rs.
    let mut train_config = crate::train::config::schema();
    train_config["description"] = json!(
        "HF TrainingArguments / SFTConfig / LoraConfig / BitsAndBytesConfig key names, with the reference notebook's defaults (those of `adapterlab train`). Checked before the run is queued: an unknown key is a 422 naming it and the closest known one; so are wrong types and values, a missing formatter, dataset rows that cannot be used (with their numbers), unknown `eval_after_train` metrics. Training writes to `output_dir`: by default `<data dir>/runs/<run id>`; a relative path is taken under `<data dir>/runs/` and may not contain `..`; an absolute path is used as given, but never inside the data directory outside `runs/`, nor in an existing folder holding anything but training outputs. Cancelling stops at the next step and keeps the checkpoints; resuming (an interrupted, cancelled or failed run) continues from the newest `checkpoint-N` in `output_dir`."
    );
    let generate_run_request = json!({"type": "object", "required": ["kind"], "additionalProperties": false,
        "description": "Generate with a model (and adapter) for a dataset split or given inputs; the generations become the run's samples (prediction, reference, source); with `metrics` they are scored in place by the eval pipeline, so the run compares like an eval run. Decoding defaults are the reference notebook's (greedy, repetition penalty 30, 50 new tokens). Resuming an interrupted run generates again.",
        "properties": {
            "kind": {"const": "generate"}, "name": {"type": "string", "maxLength": 200},
            "model": {"type": "string", "description": "default: the adapter's base model, else the served model (`serve --model`)"},
            "adapter": {"type": "string", "description": "a stored adapter's name (GET /api/adapters) or its train run's id, or a PEFT adapter folder"},
            "dataset": {"type": "string", "default": "bundled"}, "split": {"enum": ["train", "validation", "test"], "default": "test"},
            "inputs": {"type": "array", "description": "instead of a dataset", "items": {"type": "object", "required": ["id", "source"], "properties": {
                "id": {"type": ["string", "integer"]}, "source": {"type": "string", "description": "the dialogue"}, "reference": {"type": "string"}}}},
            "formatter": {"type": "string", "default": "summarize", "description": "the formatter plugin that makes each prompt"},
            "limit": {"type": "integer", "minimum": 1, "description": "only the first rows"},
            "metrics": {"type": "array", "items": {"type": "string"}},
            "settings": {"type": "object", "additionalProperties": {"type": "object", "additionalProperties": {"type": "string"}}},
            "score_references": {"type": "boolean"}}});
    // The decoding settings, their defaults and bounds from `infer::predict`'s one table.
    let mut generate_run_request = generate_run_request;
    if let Some(Value::Object(sampling)) =
        crate::infer::predict::sampling_schema().get("properties")
    {
        for (key, node) in sampling {
            generate_run_request["properties"][key] = node.clone();
        }
    }
    generate_run_request["properties"]["temperature"]["description"] = json!("0 is greedy");
    let chat_completion_request = json!({"type": "object", "required": ["model", "messages"], "properties": {
        "model": {"type": "string", "description": "the served model's id or a stored adapter's name (GET /v1/models)"},
        "messages": {"type": "array", "items": {"type": "object", "required": ["role"], "properties": {
            "role": {"type": "string"}, "content": {"oneOf": [{"type": "string"}, {"type": "null"},
                {"type": "array", "items": {"type": "object", "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}}]}}}},
        "max_completion_tokens": {"type": "integer"}, "max_tokens": {"type": "integer", "default": 256},
        "temperature": {"type": "number", "default": 1, "description": "0 is greedy"}, "top_p": {"type": "number"},
        "top_k": {"type": "integer", "description": "extension"}, "repetition_penalty": {"type": "number", "description": "extension; 1 is off"},
        "seed": {"type": "integer"}, "stop": {"oneOf": [{"type": "string"}, {"type": "array", "maxItems": 4, "items": {"type": "string"}}]},
        "n": {"const": 1}, "logprobs": {"type": "boolean"}, "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
        "stream": {"type": "boolean"}, "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}}}});
    let chat_completion = json!({"type": "object", "properties": {
        "id": {"type": "string"}, "object": {"const": "chat.completion"}, "created": {"type": "integer"}, "model": {"type": "string"},
        "choices": {"type": "array", "items": {"type": "object", "properties": {
            "index": {"type": "integer"}, "message": {"type": "object", "properties": {"role": {"const": "assistant"}, "content": {"type": "string"}}},
            "logprobs": {"type": ["object", "null"], "description": "the model's own distribution, before sampling settings", "properties": {"content": {"type": "array", "items": {"type": "object", "properties": {
                "token": {"type": "string"}, "logprob": {"type": "number"}, "bytes": {"type": "array", "items": {"type": "integer"}},
                "top_logprobs": {"type": "array", "items": {"type": "object"}}}}}}},
            "finish_reason": {"enum": ["stop", "length"]}}}},
        "usage": {"type": "object", "properties": {"prompt_tokens": {"type": "integer"}, "completion_tokens": {"type": "integer"}, "total_tokens": {"type": "integer"}}}}});
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "adapterlab",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Launch and watch train, generate and eval runs; compare adapter versions; use the served model and the stored adapters through an OpenAI-compatible API under /v1. Every call but `GET /api/health` and the dashboard's static files needs `Authorization: Bearer TOKEN`, reads included (OpenAI clients send the token as their API key). A request whose `Host` is not a loopback name (localhost, 127.0.0.1, [::1]) nor one allowed with `serve --allowed-host` is refused with 421. Datasets given as paths must lie inside the data directory or a folder allowed with `serve --allow-path`. `/api/health` answers `{\"status\": \"degraded\", \"reason\": ...}` while the data directory cannot be written."
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
                "OpenAiError": {"type": "object", "required": ["error"], "properties": {"error": {"type": "object",
                    "required": ["message", "type"], "properties": {
                    "message": {"type": "string"}, "type": {"enum": ["invalid_request_error", "server_error"]},
                    "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"], "examples": ["model_not_found", "invalid_api_key"]}}}}},
                "Adapter": {"type": "object", "required": ["name", "path", "base_model", "created"], "properties": {
                    "name": {"type": "string", "description": "the train run's name, or its output folder's (a `-XXXXXX` run-id suffix is added when another folder's adapter has it)"},
                    "path": {"type": "string", "description": "the PEFT folder"}, "base_model": {"type": "string"},
                    "created": {"type": "string", "format": "date-time"}, "run_id": {"type": ["string", "null"]},
                    "metadata": {"type": "object", "additionalProperties": {"type": "string"}}}},
                "Estimate": {"type": "object", "required": ["mean", "low", "high"], "properties": {
                    "mean": {"type": "number"}, "low": {"type": "number"}, "high": {"type": "number"}}},
                "ScoreInfo": {"type": "object", "properties": {
                    "name": {"type": "string"}, "metric": {"type": "string"}, "min": {"type": "number"},
                    "max": {"type": "number"}, "higher_is_better": {"type": "boolean"}}},
                "Run": {"type": "object", "required": ["id", "name", "kind", "status", "created"], "properties": {
                    "id": {"type": "string"}, "name": {"type": "string"},
                    "kind": {"enum": ["eval", "train", "generate"]},
                    "status": {"enum": ["queued", "running", "done", "failed", "interrupted", "cancelled"]},
                    "created": {"type": "string", "format": "date-time"},
                    "started": {"type": ["string", "null"]}, "finished": {"type": ["string", "null"]},
                    "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                    "scores": {"type": "array", "items": {"$ref": "#/components/schemas/ScoreInfo"}},
                    "aggregates": {"type": "object", "additionalProperties": {"$ref": "#/components/schemas/Estimate"}},
                    "reference_aggregates": {"type": "object", "additionalProperties": {"$ref": "#/components/schemas/Estimate"}},
                    "corpus": {"type": "object", "additionalProperties": {"type": "number"}},
                    "progress": {"type": "object", "properties": {"done": {"type": "integer"}, "total": {"type": "integer"}, "unit": {"type": "string"}}},
                    "usage": {"type": "object", "properties": {"requests": {"type": "integer"}, "cached": {"type": "integer"},
                        "prompt_tokens": {"type": "integer"}, "completion_tokens": {"type": "integer"}, "cost_usd": {"type": "number"}}},
                    "error": {"type": ["string", "null"]},
                    "tags": {"type": "array", "maxItems": 32, "items": {"type": "string", "maxLength": 64}},
                    "notes": {"type": "string", "maxLength": 10000},
                    "request": {"type": "object", "description": "GET /api/runs/{id} only, train and generate runs: the settings the run was launched with (the training config; the generate request with every decoding setting)"}}},
                "Sample": {"type": "object", "properties": {
                    "index": {"type": "integer"}, "id": {"type": "string"}, "prediction": {"type": "string"},
                    "reference": {"type": "string", "description": "the reference, or the first of several"},
                    "references": {"type": "array", "items": {"type": "string"}, "description": "every reference, present when there are several"},
                    "source": {"type": ["string", "null"]},
                    "scores": {"type": "object", "additionalProperties": {"type": "number"}},
                    "errors": {"type": "object", "additionalProperties": {"type": "string"}}}},
                "PredictionRow": {"type": "object", "required": ["id", "prediction"], "description": "exactly one of `reference` and `references`", "properties": {
                    "id": {"type": ["string", "integer"]}, "prediction": {"type": "string"}, "reference": {"type": "string"},
                    "references": {"type": "array", "minItems": 1, "items": {"type": "string"}, "description": "several references: metrics take the best over them"},
                    "source": {"type": ["string", "null"]}}},
                "EvalRunRequest": {"type": "object", "required": ["kind", "predictions", "metrics"], "properties": {
                    "kind": {"const": "eval"}, "name": {"type": "string"},
                    "predictions": {"type": "array", "items": {"$ref": "#/components/schemas/PredictionRow"}},
                    "metrics": {"type": "array", "items": {"type": "string"}},
                    "settings": {"type": "object", "additionalProperties": {"type": "object", "additionalProperties": {"type": "string"}}},
                    "score_references": {"type": "boolean"}}},
                "TrainRunRequest": {"type": "object", "required": ["kind"], "additionalProperties": false, "properties": {
                    "kind": {"const": "train"},
                    "name": {"type": "string", "maxLength": 200, "description": "the run's name, also the name its adapter is stored (and served under /v1) by; default `<model>-lora-<end of the run id>`"},
                    "config": {"$ref": "#/components/schemas/TrainConfig"}}},
                "TrainConfig": train_config,
                "GenerateRunRequest": generate_run_request,
                "ChatCompletionRequest": chat_completion_request,
                "ChatCompletion": chat_completion,
                "Plugin": {"type": "object", "properties": {
                    "name": {"type": "string"}, "version": {"type": "string"}, "description": {"type": "string"},
                    "kind": {"enum": ["metric", "formatter", "reporter"]},
                    "capabilities": {"type": "array", "items": {"enum": ["log", "config", "embed", "chat"]}},
                    "source": {"type": "object"}, "language": {"type": "string"}, "contract": {"type": "string"},
                    "sha256": {"type": "string"}, "size_bytes": {"type": "integer"},
                    "scores": {"type": "array"}, "format": {"type": "string"}, "required_fields": {"type": "array"}}},
                "Comparison": {"type": "object", "properties": {
                    "runs": {"type": "array", "items": {"$ref": "#/components/schemas/Run"}},
                    "scores": {"type": "array", "items": {"$ref": "#/components/schemas/ScoreInfo"}},
                    "deltas": {"type": "array", "items": {"type": "object", "properties": {
                        "run": {"type": "string"}, "score": {"type": "string"}, "difference": {"$ref": "#/components/schemas/Estimate"},
                        "significant": {"type": "boolean"}, "higher_is_better": {"type": "boolean"},
                        "verdict": {"type": ["boolean", "null"]}, "paired": {"type": "integer"}}}},
                    "samples": {"type": "array", "items": {"type": "object", "properties": {
                        "id": {"type": "string"}, "source": {"type": ["string", "null"]}, "reference": {"type": "string"},
                        "references": {"type": "array", "items": {"type": "string"}},
                        "predictions": {"type": "array", "items": {"type": ["string", "null"]}},
                        "scores": {"type": "array", "items": {"type": "object"}}, "disagreement": {"type": "number"}}}}}}
            }
        },
        "paths": {
            "/api/health": {"get": {"summary": "Liveness", "responses": {"200": ok("ok", json!({"type": "object"}))}}},
            "/api/schema": {"get": {"summary": "The settings' schemas (training: every key with its type, default, range and choices), from which the dashboard's forms take their defaults and checks", "security": secured,
                "responses": {"200": ok("schemas", json!({"type": "object", "properties": {"train": {"$ref": "#/components/schemas/TrainConfig"}, "generate": crate::infer::predict::sampling_schema()}})), "401": err("no or wrong token")}}},
            "/api/openapi.json": {"get": {"summary": "This document", "responses": {"200": ok("OpenAPI document", json!({"type": "object"}))}}},
            "/api/plugins": {
                "get": {"summary": "Installed plugins", "responses": {"200": ok("plugins", json!({"type": "array", "items": {"$ref": "#/components/schemas/Plugin"}}))}},
                "post": {"summary": "Upload a plugin component (multipart field `file`, or the raw bytes); validated, then installed",
                    "security": secured,
                    "requestBody": {"content": {
                        "multipart/form-data": {"schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}}}},
                        "application/wasm": {"schema": {"type": "string", "format": "binary"}}}},
                    "responses": {"201": ok("installed", json!({"$ref": "#/components/schemas/Plugin"})),
                        "400": err("bad upload"), "401": err("missing or wrong token"), "413": err("too large"), "422": err("not a valid plugin")}}
            },
            "/api/adapters": {"get": {"summary": "Trained adapters", "responses": {"200": ok("adapters", json!({"type": "array", "items": {"$ref": "#/components/schemas/Adapter"}}))}}},
            "/api/runs": {
                "get": {"summary": "Runs, newest first", "responses": {"200": ok("runs", json!({"type": "array", "items": {"$ref": "#/components/schemas/Run"}}))}},
                "post": {"summary": "Create a run (queued)", "security": secured,
                    "requestBody": {"required": true, "content": {"application/json": {"schema": {"oneOf": [
                        {"$ref": "#/components/schemas/EvalRunRequest"}, {"$ref": "#/components/schemas/TrainRunRequest"},
                        {"$ref": "#/components/schemas/GenerateRunRequest"}]}}}},
                    "responses": {"201": ok("created", json!({"type": "object", "required": ["id"], "properties": {"id": {"type": "string"}}})),
                        "400": err("not JSON"), "401": err("missing or wrong token"), "413": err("too large"), "422": err("invalid request: the message names the field (and row, or key of `config`), with the closest known name for an unknown one")}}
            },
            "/api/runs/{id}": {
                "get": {"summary": "One run, with `request` (the settings it was launched with) for train and generate runs", "parameters": [run_id],
                    "responses": {"200": ok("run", json!({"$ref": "#/components/schemas/Run"})), "404": err("no such run")}},
                "delete": {"summary": "Delete a finished run with its samples and events (a training run's adapter and files stay)", "parameters": [run_id], "security": secured,
                    "responses": {"204": {"description": "deleted"}, "401": err("missing or wrong token"), "404": err("no such run"), "409": err("the run is queued or running: cancel it first")}},
                "patch": {"summary": "Set a run's tags and/or notes", "parameters": [run_id], "security": secured,
                    "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object", "additionalProperties": false, "properties": {
                        "tags": {"type": "array", "maxItems": 32, "items": {"type": "string", "minLength": 1, "maxLength": 64}},
                        "notes": {"type": "string", "maxLength": 10000}}}}}},
                    "responses": {"200": ok("run", json!({"$ref": "#/components/schemas/Run"})), "400": err("not JSON"), "401": err("missing or wrong token"), "404": err("no such run"), "422": err("an unknown field, or tags/notes out of bounds")}}
            },
            "/api/runs/{id}/samples": {"get": {"summary": "A run's samples with their scores, in input order: all of them, or with `limit` (and `offset`) one page, the total in the `X-Total-Count` header. gzip when accepted; a finished run's answer has an ETag (If-None-Match: 304)", "parameters": [run_id, limit, offset], "security": secured,
                "responses": {"200": ok("samples", json!({"type": "array", "items": {"$ref": "#/components/schemas/Sample"}})), "304": {"description": "not modified"}, "400": err("bad limit or offset"), "404": err("no such run")}}},
            "/api/runs/{id}/events": {"get": {"summary": "Server-Sent Events: status, progress, log and loss events (training: step, epoch, loss, eval_loss, learning_rate, grad_norm, tokens_per_second, eta_seconds, memory_bytes (process RSS), gpu_memory_bytes (CUDA tensors)); resumable with Last-Event-ID; ends when the run has finished",
                "parameters": [run_id], "responses": {"200": {"description": "event stream", "content": {"text/event-stream": {}}}, "404": err("no such run")}}},
            "/api/runs/{id}/cancel": {"post": {"summary": "Cancel a queued or running run: an evaluation or generation stops after its current batch, a training after its current step (its checkpoints stay)", "parameters": [run_id], "security": secured,
                "responses": {"200": ok("status", json!({"type": "object"})), "401": err("missing or wrong token"), "404": err("no such run")}}},
            "/api/runs/{id}/resume": {"post": {"summary": "Queue an interrupted, failed or cancelled run again: training continues from its newest checkpoint, other kinds start over", "parameters": [run_id], "security": secured,
                "responses": {"200": ok("status", json!({"type": "object"})), "401": err("missing or wrong token"), "404": err("no such run"), "409": err("not resumable")}}},
            "/api/report": {"get": {"summary": "A report of one run, or of a comparison (the first run is the baseline), rendered by the reporter plugin for `format`; sent as a download",
                "parameters": [{"name": "runs", "in": "query", "required": true, "schema": {"type": "string"}, "description": "one run id, or several comma-separated"},
                    {"name": "format", "in": "query", "required": false, "schema": {"type": "string", "default": "md"}, "description": "a reporter plugin's format: md, html, csv, or an installed one"}],
                "responses": {"200": {"description": "the document, in the reporter's media type"}, "400": err("no runs"), "404": err("no such run, or no reporter for the format"), "422": err("the reporter failed")}}},
            "/api/compare": {"get": {"summary": "Compare runs: paired deltas with 95% intervals, samples by disagreement. With `limit` (and `offset`), `samples` is one page and the answer adds `total_samples`, `offset` and `limit`. gzip when accepted; finished runs' comparisons have an ETag (If-None-Match: 304)", "security": secured,
                "parameters": [{"name": "runs", "in": "query", "required": true, "schema": {"type": "string"}, "description": "two or more run ids, comma-separated; the first is the baseline"}, limit, offset],
                "responses": {"200": ok("comparison", json!({"$ref": "#/components/schemas/Comparison"})), "400": err("fewer than two runs"), "404": err("no such run")}}},
            "/v1/models": {"get": {"summary": "OpenAI-compatible: the served base model (`serve --model`) and every stored adapter, each a model id",
                "responses": {"200": ok("models", json!({"type": "object", "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": {"type": "object", "properties": {
                    "id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"}, "owned_by": {"type": "string"},
                    "root": {"type": "string", "description": "an adapter's base model"}}}}}}))}}},
            "/v1/models/{model}": {"get": {"summary": "OpenAI-compatible: one model id",
                "parameters": [{"name": "model", "in": "path", "required": true, "schema": {"type": "string"}}],
                "responses": {"200": ok("model", json!({"type": "object"})), "404": openai_err("no such model")}}},
            "/v1/chat/completions": {"post": {"summary": "OpenAI-compatible chat completions: the messages through the model's chat template; an adapter is applied unmerged over the base, which is loaded once and kept. Needs the server's token as the API key.",
                "security": secured,
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}}},
                "responses": {
                    "200": {"description": "the answer, or with `stream` Server-Sent Events of `chat.completion.chunk` objects ending with `data: [DONE]`",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletion"}}, "text/event-stream": {}}},
                    "400": openai_err("invalid request"), "401": openai_err("missing or wrong token"),
                    "404": openai_err("unknown model"), "500": openai_err("the model failed to load or run")}}}
        }
    })
}
