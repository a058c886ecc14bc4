//! The API's OpenAPI 3.1 document, served at `/api/openapi.json`. Written by hand next to
//! the handlers so the contract is reviewed where it is implemented.

use serde_json::{Value, json};

pub fn document() -> Value {
    let error = json!({"$ref": "#/components/schemas/Error"});
    let err = |desc: &str| json!({"description": desc, "content": {"application/json": {"schema": error}}});
    let ok = |desc: &str, schema: Value| json!({"description": desc, "content": {"application/json": {"schema": schema}}});
    let run_id = json!({"name": "id", "in": "path", "required": true, "schema": {"type": "string"}, "description": "run id (a unique prefix is enough) or run name"});
    let secured = json!([{"bearer": []}]);
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "adapterlab",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Launch and watch train, generate and eval runs; compare adapter versions. Reads are open; mutating calls need `Authorization: Bearer TOKEN`."
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
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
                    "error": {"type": ["string", "null"]}}},
                "Sample": {"type": "object", "properties": {
                    "index": {"type": "integer"}, "id": {"type": "string"}, "prediction": {"type": "string"},
                    "reference": {"type": "string"}, "source": {"type": ["string", "null"]},
                    "scores": {"type": "object", "additionalProperties": {"type": "number"}},
                    "errors": {"type": "object", "additionalProperties": {"type": "string"}}}},
                "PredictionRow": {"type": "object", "required": ["id", "prediction", "reference"], "properties": {
                    "id": {"type": ["string", "integer"]}, "prediction": {"type": "string"}, "reference": {"type": "string"},
                    "source": {"type": ["string", "null"]}}},
                "EvalRunRequest": {"type": "object", "required": ["kind", "predictions", "metrics"], "properties": {
                    "kind": {"const": "eval"}, "name": {"type": "string"},
                    "predictions": {"type": "array", "items": {"$ref": "#/components/schemas/PredictionRow"}},
                    "metrics": {"type": "array", "items": {"type": "string"}},
                    "settings": {"type": "object", "additionalProperties": {"type": "object", "additionalProperties": {"type": "string"}}},
                    "score_references": {"type": "boolean"}}},
                "TrainRunRequest": {"type": "object", "required": ["kind", "config"], "properties": {
                    "kind": {"const": "train"}, "config": {"type": "object", "description": "the train keys (HF TrainingArguments / LoraConfig names)"}}},
                "GenerateRunRequest": {"type": "object", "required": ["kind"], "properties": {"kind": {"const": "generate"}}},
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
                        "predictions": {"type": "array", "items": {"type": ["string", "null"]}},
                        "scores": {"type": "array", "items": {"type": "object"}}, "disagreement": {"type": "number"}}}}}}
            }
        },
        "paths": {
            "/api/health": {"get": {"summary": "Liveness", "responses": {"200": ok("ok", json!({"type": "object"}))}}},
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
            "/api/adapters": {"get": {"summary": "Trained adapters", "responses": {"200": ok("adapters", json!({"type": "array"}))}}},
            "/api/runs": {
                "get": {"summary": "Runs, newest first", "responses": {"200": ok("runs", json!({"type": "array", "items": {"$ref": "#/components/schemas/Run"}}))}},
                "post": {"summary": "Create a run (queued)", "security": secured,
                    "requestBody": {"required": true, "content": {"application/json": {"schema": {"oneOf": [
                        {"$ref": "#/components/schemas/EvalRunRequest"}, {"$ref": "#/components/schemas/TrainRunRequest"},
                        {"$ref": "#/components/schemas/GenerateRunRequest"}]}}}},
                    "responses": {"201": ok("created", json!({"type": "object", "required": ["id"], "properties": {"id": {"type": "string"}}})),
                        "400": err("not JSON"), "401": err("missing or wrong token"), "413": err("too large"), "422": err("invalid request")}}
            },
            "/api/runs/{id}": {"get": {"summary": "One run", "parameters": [run_id],
                "responses": {"200": ok("run", json!({"$ref": "#/components/schemas/Run"})), "404": err("no such run")}}},
            "/api/runs/{id}/samples": {"get": {"summary": "A run's samples with their scores", "parameters": [run_id],
                "responses": {"200": ok("samples", json!({"type": "array", "items": {"$ref": "#/components/schemas/Sample"}})), "404": err("no such run")}}},
            "/api/runs/{id}/events": {"get": {"summary": "Server-Sent Events: status, progress, log and loss events; resumable with Last-Event-ID; ends when the run has finished",
                "parameters": [run_id], "responses": {"200": {"description": "event stream", "content": {"text/event-stream": {}}}, "404": err("no such run")}}},
            "/api/runs/{id}/cancel": {"post": {"summary": "Cancel a queued or running run", "parameters": [run_id], "security": secured,
                "responses": {"200": ok("status", json!({"type": "object"})), "401": err("missing or wrong token"), "404": err("no such run")}}},
            "/api/runs/{id}/resume": {"post": {"summary": "Queue an interrupted, failed or cancelled run again", "parameters": [run_id], "security": secured,
                "responses": {"200": ok("status", json!({"type": "object"})), "401": err("missing or wrong token"), "404": err("no such run"), "409": err("not resumable")}}},
            "/api/compare": {"get": {"summary": "Compare runs: paired deltas with 95% intervals, samples by disagreement",
                "parameters": [{"name": "runs", "in": "query", "required": true, "schema": {"type": "string"}, "description": "two or more run ids, comma-separated; the first is the baseline"}],
                "responses": {"200": ok("comparison", json!({"$ref": "#/components/schemas/Comparison"})), "400": err("fewer than two runs"), "404": err("no such run")}}}
        }
    })
}
