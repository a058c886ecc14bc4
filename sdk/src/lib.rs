//! The Rust SDK for adapterlab plugins: metrics, formatters and reporters as WebAssembly
//! components (`wasm32-wasip2`).
//!
//! A metric is a type that implements [`metric::Metric`] and one [`export_metric!`] line:
//!
//! ```ignore
//! use adapterlab_sdk::metric::{Metric, MetricInfo, Sample, ScoreSpec};
//! use adapterlab_sdk::{Capability, Manifest};
//!
//! struct ExactMatch;
//!
//! impl Metric for ExactMatch {
//!     fn info() -> MetricInfo {
//!         MetricInfo {
//!             manifest: Manifest::new("exact-match", "0.1.0", "1 when prediction equals a reference"),
//!             scores: vec![ScoreSpec::new("exact_match", "prediction == a reference", 0.0, 1.0, true)],
//!             independent_samples: true,
//!         }
//!     }
//!
//!     fn score_sample(sample: &Sample) -> Result<Vec<(String, f64)>, String> {
//!         let hit = sample.references.iter().any(|r| sample.prediction.trim() == r.trim());
//!         Ok(vec![("exact_match".into(), if hit { 1.0 } else { 0.0 })])
//!     }
//! }
//!
//! adapterlab_sdk::export_metric!(ExactMatch);
//! ```
//!
//! Build it with `cargo build --release --target wasm32-wasip2` (crate type `cdylib`): the
//! output `.wasm` is a component that `adapterlab plugins check` accepts. With crate types
//! `["cdylib", "rlib"]` the same crate's unit tests run natively (`cargo test`): the
//! `export_*!` macros export the world only when compiling for wasm, so keep calls to host
//! capabilities (`log`, `config`, `chat`, `embed`) out of the code those tests reach.
//!
//! The contract is the WIT package `adapterlab:plugin@0.2.0` in `sdk/wit/since_v0.2.0/`.
//! Metrics written against 0.1.0 build unchanged in meaning with [`v0_1`] (the same API under
//! `adapterlab_sdk::v0_1`, exported with [`export_metric_v0_1!`]); their components keep
//! working on every host that serves 0.1.0.

/// The version of the WIT contract this SDK builds against.
pub const CONTRACT_VERSION: &str = "0.2.0";

/// Raw bindings: the host imports once, then one module per plugin world that reuses them.
/// Plugin authors use the re-exports instead.
#[doc(hidden)]
pub mod bindings {
    pub mod imports {
        wit_bindgen::generate!({
            path: "wit/since_v0.2.0",
            world: "imports",
        });
    }
    pub mod metric {
        wit_bindgen::generate!({
            path: "wit/since_v0.2.0",
            world: "metric-plugin",
            with: {
                "adapterlab:plugin/types@0.2.0": crate::bindings::imports::adapterlab::plugin::types,
                "adapterlab:plugin/log@0.2.0": crate::bindings::imports::adapterlab::plugin::log,
                "adapterlab:plugin/config@0.2.0": crate::bindings::imports::adapterlab::plugin::config,
                "adapterlab:plugin/embed@0.2.0": crate::bindings::imports::adapterlab::plugin::embed,
                "adapterlab:plugin/chat@0.2.0": crate::bindings::imports::adapterlab::plugin::chat,
            },
            pub_export_macro: true,
            export_macro_name: "__export_metric_world",
            default_bindings_module: "adapterlab_sdk::bindings::metric",
        });
    }
    pub mod formatter {
        wit_bindgen::generate!({
            path: "wit/since_v0.2.0",
            world: "formatter-plugin",
            with: {
                "adapterlab:plugin/types@0.2.0": crate::bindings::imports::adapterlab::plugin::types,
                "adapterlab:plugin/log@0.2.0": crate::bindings::imports::adapterlab::plugin::log,
                "adapterlab:plugin/config@0.2.0": crate::bindings::imports::adapterlab::plugin::config,
                "adapterlab:plugin/embed@0.2.0": crate::bindings::imports::adapterlab::plugin::embed,
                "adapterlab:plugin/chat@0.2.0": crate::bindings::imports::adapterlab::plugin::chat,
            },
            pub_export_macro: true,
            export_macro_name: "__export_formatter_world",
            default_bindings_module: "adapterlab_sdk::bindings::formatter",
        });
    }
    pub mod reporter {
        wit_bindgen::generate!({
            path: "wit/since_v0.2.0",
            world: "reporter-plugin",
            with: {
                "adapterlab:plugin/types@0.2.0": crate::bindings::imports::adapterlab::plugin::types,
                "adapterlab:plugin/log@0.2.0": crate::bindings::imports::adapterlab::plugin::log,
                "adapterlab:plugin/config@0.2.0": crate::bindings::imports::adapterlab::plugin::config,
                "adapterlab:plugin/embed@0.2.0": crate::bindings::imports::adapterlab::plugin::embed,
                "adapterlab:plugin/chat@0.2.0": crate::bindings::imports::adapterlab::plugin::chat,
            },
            pub_export_macro: true,
            export_macro_name: "__export_reporter_world",
            default_bindings_module: "adapterlab_sdk::bindings::reporter",
        });
    }
}

pub mod formatter;
pub mod hash;
pub mod metric;
pub mod reporter;
pub mod v0_1;

pub use bindings::imports::adapterlab::plugin::types::{Capability, Manifest, PluginKind};

impl Manifest {
    /// A manifest that asks for the `log` and `config` capabilities, which every plugin may
    /// use; add others with [`Manifest::with_capability`].
    pub fn new(name: &str, version: &str, description: &str) -> Self {
        Manifest {
            name: name.to_string(),
            version: version.to_string(),
            description: description.to_string(),
            capabilities: vec![Capability::Log, Capability::Config],
        }
    }

    pub fn with_capability(mut self, capability: Capability) -> Self {
        if !self.capabilities.contains(&capability) {
            self.capabilities.push(capability);
        }
        self
    }
}

/// Logging through the host (capability `log`). Lines show up in the run's log.
pub mod log {
    use crate::bindings::imports::adapterlab::plugin::log::{Level, log};

    pub fn debug(message: &str) {
        log(Level::Debug, message);
    }
    pub fn info(message: &str) {
        log(Level::Info, message);
    }
    pub fn warn(message: &str) {
        log(Level::Warn, message);
    }
    pub fn error(message: &str) {
        log(Level::Error, message);
    }
}

/// The user's settings for this plugin (capability `config`): `--set PLUGIN.KEY=VALUE`.
pub mod config {
    use crate::bindings::imports::adapterlab::plugin::config;

    /// The raw value of `key`, if set.
    pub fn get(key: &str) -> Option<String> {
        config::get(key)
    }

    /// Every key/value set for this plugin.
    pub fn all() -> Vec<(String, String)> {
        config::all()
    }

    /// `key` parsed as `T`, `default` when unset, an error naming the key when unparsable.
    pub fn get_parsed<T: std::str::FromStr>(key: &str, default: T) -> Result<T, String> {
        match get(key) {
            None => Ok(default),
            Some(raw) => raw
                .trim()
                .parse()
                .map_err(|_| format!("setting `{key}`: cannot parse {raw:?}")),
        }
    }

    /// A boolean setting: true/false, yes/no, 1/0, on/off.
    pub fn get_bool(key: &str, default: bool) -> Result<bool, String> {
        match get(key)
            .as_deref()
            .map(str::trim)
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None => Ok(default),
            Some("true" | "yes" | "1" | "on") => Ok(true),
            Some("false" | "no" | "0" | "off") => Ok(false),
            Some(other) => Err(format!(
                "setting `{key}`: expected true or false, got {other:?}"
            )),
        }
    }
}
