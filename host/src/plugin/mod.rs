//! The plugin runtime: WebAssembly components (metrics, formatters, reporters) run in
//! wasmtime, sandboxed, with host capabilities granted per plugin.

pub mod compat;
pub mod error;
pub mod host;
pub mod limits;
pub mod manifest;
pub mod registry;
pub mod runtime;
mod stdio;
pub mod wit;

pub use error::PluginError;
pub use host::{CallContext, HostServices, Interrupt, LogLine, NoServices};
pub use manifest::{PluginKind, PluginMeta, PluginSource};
pub use registry::Registry;
pub use runtime::{CompileSource, Limits, Plugin, Runtime, Scored, Session};
