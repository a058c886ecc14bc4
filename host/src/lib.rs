//! adapterlab: fine-tune and evaluate LLM adapters natively.
//!
//! See `ARCHITECTURE.md` at the repository root for the map of these modules.

pub mod cli;
pub mod eval;
pub mod infer;
pub mod llm;
pub mod paths;
pub mod plugin;
pub mod server;
pub mod store;
pub mod train;
