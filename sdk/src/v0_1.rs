//! Contract 0.1.0 for metric authors who stay on it: the API this SDK had at 0.1.0, under
//! `adapterlab_sdk::v0_1` (`Manifest`, `Capability`, `config`, `log`, `metric`), exported with
//! [`export_metric_v0_1!`](crate::export_metric_v0_1). A 0.1.0 metric sees one `reference`
//! per sample; the host scores a multi-reference sample once per reference and keeps, per
//! score, the best value (see `sdk/README.md`). It has no sufficient statistics: its
//! batch-level `corpus` is used only when one batch covered the whole run.
//!
//! Migrating to 0.2.0: drop `v0_1::` from the paths, read `sample.references` instead of
//! `sample.reference`, add `independent_samples` to `MetricInfo`, and return corpus values as
//! `statistics` plus a `finalize`.

/// The version of the WIT contract this module builds against.
pub const CONTRACT_VERSION: &str = "0.1.0";

/// Raw 0.1.0 bindings. Plugin authors use the re-exports instead.
#[doc(hidden)]
pub mod bindings {
    pub mod imports {
        wit_bindgen::generate!({
            path: "wit/since_v0.1.0",
            world: "imports",
        });
    }
    pub mod metric {
        // The 0.1.0 `metric-plugin` world under a name of its own: wit-bindgen names the
        // crate-level export macro after the world, and 0.2.0's world has the same name.
        wit_bindgen::generate!({
            inline: "package adapterlab:sdk-v0-1;
                world metric-plugin-v0-1 {
                    include adapterlab:plugin/metric-plugin@0.1.0;
                }",
            path: "wit/since_v0.1.0",
            world: "adapterlab:sdk-v0-1/metric-plugin-v0-1",
            with: {
                "adapterlab:plugin/types@0.1.0": crate::v0_1::bindings::imports::adapterlab::plugin::types,
                "adapterlab:plugin/log@0.1.0": crate::v0_1::bindings::imports::adapterlab::plugin::log,
                "adapterlab:plugin/config@0.1.0": crate::v0_1::bindings::imports::adapterlab::plugin::config,
                "adapterlab:plugin/embed@0.1.0": crate::v0_1::bindings::imports::adapterlab::plugin::embed,
                "adapterlab:plugin/chat@0.1.0": crate::v0_1::bindings::imports::adapterlab::plugin::chat,
            },
            pub_export_macro: true,
            export_macro_name: "__export_metric_world_v0_1",
            default_bindings_module: "adapterlab_sdk::v0_1::bindings::metric",
        });
    }
}

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

/// Logging through the host's 0.1.0 `log` capability.
pub mod log {
    use crate::v0_1::bindings::imports::adapterlab::plugin::log::{Level, log};

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

/// The user's settings for this plugin through the 0.1.0 `config` capability.
pub mod config {
    use crate::v0_1::bindings::imports::adapterlab::plugin::config;

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
}

/// 0.1.0 metric plugins: implement [`metric::Metric`], then `export_metric_v0_1!(YourType)`.
pub mod metric {
    pub use crate::v0_1::bindings::imports::adapterlab::plugin::chat;
    pub use crate::v0_1::bindings::imports::adapterlab::plugin::embed;
    pub use crate::v0_1::bindings::metric::exports::adapterlab::plugin::metric::{
        BatchResult, MetricInfo, Sample, SampleResult, ScoreSpec,
    };

    impl ScoreSpec {
        pub fn new(
            name: &str,
            description: &str,
            min: f64,
            max: f64,
            higher_is_better: bool,
        ) -> Self {
            ScoreSpec {
                name: name.to_string(),
                description: description.to_string(),
                min,
                max,
                higher_is_better,
            }
        }
    }

    /// A 0.1.0 metric, as [`crate::metric::Metric`] was at 0.1.0.
    pub trait Metric {
        fn info() -> MetricInfo;

        /// Score one sample. A returned error becomes that sample's error.
        fn score_sample(sample: &Sample) -> Result<Vec<(String, f64)>, String> {
            let _ = sample;
            Err("this metric implements neither score_sample nor score_batch".to_string())
        }

        /// Score a batch. The default scores each sample with `score_sample`.
        fn score_batch(samples: Vec<Sample>) -> Result<BatchResult, String> {
            Ok(BatchResult {
                samples: samples
                    .iter()
                    .map(|s| match Self::score_sample(s) {
                        Ok(scores) => SampleResult::Scores(scores),
                        Err(e) => SampleResult::Error(e),
                    })
                    .collect(),
                corpus: Vec::new(),
            })
        }
    }
}

/// Export a [`v0_1::metric::Metric`](crate::v0_1::metric::Metric) implementation as the
/// plugin's `adapterlab:plugin/metric@0.1.0` interface.
#[macro_export]
macro_rules! export_metric_v0_1 {
    ($ty:ty) => {
        const _: () = {
            struct __AdapterlabMetricV01;
            impl $crate::v0_1::bindings::metric::exports::adapterlab::plugin::metric::Guest
                for __AdapterlabMetricV01
            {
                fn info() -> $crate::v0_1::metric::MetricInfo {
                    <$ty as $crate::v0_1::metric::Metric>::info()
                }
                fn score(
                    samples: ::std::vec::Vec<$crate::v0_1::metric::Sample>,
                ) -> ::std::result::Result<$crate::v0_1::metric::BatchResult, ::std::string::String>
                {
                    <$ty as $crate::v0_1::metric::Metric>::score_batch(samples)
                }
            }
            // Exported only on wasm, as `export_metric!` (native linkers reject the names).
            #[cfg(target_arch = "wasm32")]
            $crate::v0_1::bindings::metric::__export_metric_world_v0_1!(__AdapterlabMetricV01 with_types_in $crate::v0_1::bindings::metric);
        };
    };
}
