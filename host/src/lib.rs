//! adapterlab: fine-tune and evaluate LLM adapters natively.
//!
//! See `ARCHITECTURE.md` at the repository root for the map of these modules.

// The OpenAPI document (`server/openapi.rs`) is written as `json!` literals, whose schemas
// nest deeper than the default limit allows.
#![recursion_limit = "256"]

pub mod cli;
pub mod data;
pub mod eval;
pub mod hub;
pub mod infer;
pub mod llm;
pub mod paths;
pub mod plugin;
pub mod redact;
pub mod server;
pub mod settings;
pub mod store;
pub mod track;
pub mod train;
