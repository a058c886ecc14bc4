//! Errors of the plugin runtime. Every error names the plugin it came from.

use std::time::Duration;

/// What went wrong in or around one plugin.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("{path}: not a valid plugin component: {reason}")]
    Invalid { path: String, reason: String },

    #[error("plugin {plugin}: exceeded its deadline of {limit:?} (wall-clock time of one call)")]
    Timeout { plugin: String, limit: Duration },

    #[error("plugin {plugin}: stopped because its run was cancelled")]
    Cancelled { plugin: String },

    #[error("plugin {plugin}: exceeded its memory limit of {limit_mib} MiB")]
    OutOfMemory { plugin: String, limit_mib: u64 },

    #[error(
        "plugin {plugin}: the host's memory budget for all running plugins ({limit_mib} MiB) is spent"
    )]
    MemoryBudget { plugin: String, limit_mib: u64 },

    #[error("plugin {plugin}: trapped: {message}")]
    Trap { plugin: String, message: String },

    #[error("plugin {plugin}: returned malformed output: {message}")]
    Malformed { plugin: String, message: String },

    #[error("plugin {plugin}: {message}")]
    Failed { plugin: String, message: String },

    #[error("plugin {plugin} is a {actual} plugin, not a {expected} plugin")]
    WrongKind {
        plugin: String,
        expected: &'static str,
        actual: &'static str,
    },

    #[error("no plugin named {name:?}{hint}")]
    NotFound { name: String, hint: String },

    #[error(transparent)]
    Host(#[from] anyhow::Error),
}
