//! Metric plugins: implement [`Metric`], then `export_metric!(YourType)`.

pub use crate::bindings::imports::adapterlab::plugin::chat;
pub use crate::bindings::imports::adapterlab::plugin::embed;
pub use crate::bindings::metric::exports::adapterlab::plugin::metric::{
    BatchResult, MetricInfo, Sample, SampleResult, ScoreSpec,
};

impl ScoreSpec {
    pub fn new(name: &str, description: &str, min: f64, max: f64, higher_is_better: bool) -> Self {
        ScoreSpec {
            name: name.to_string(),
            description: description.to_string(),
            min,
            max,
            higher_is_better,
        }
    }
}

/// A metric. Implement `score_sample` for a per-sample metric, or `score_batch` when the
/// metric needs the whole batch (idf weights, corpus statistics).
pub trait Metric {
    fn info() -> MetricInfo;

    /// Score one sample. A returned error becomes that sample's error; the others go on.
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

/// Export a [`Metric`] implementation as the plugin's `metric` interface.
#[macro_export]
macro_rules! export_metric {
    ($ty:ty) => {
        const _: () = {
            struct __AdapterlabMetric;
            impl $crate::bindings::metric::exports::adapterlab::plugin::metric::Guest for __AdapterlabMetric {
                fn info() -> $crate::metric::MetricInfo {
                    <$ty as $crate::metric::Metric>::info()
                }
                fn score(
                    samples: ::std::vec::Vec<$crate::metric::Sample>,
                ) -> ::std::result::Result<$crate::metric::BatchResult, ::std::string::String> {
                    <$ty as $crate::metric::Metric>::score_batch(samples)
                }
            }
            // The export names hold `:` and `@`, which native linkers reject in a cdylib's
            // symbol list; exporting only on wasm lets plugin crates (`cdylib` + `rlib`) run
            // their unit tests natively, while the impl above is still type-checked there.
            #[cfg(target_arch = "wasm32")]
            $crate::bindings::metric::__export_metric_world!(__AdapterlabMetric with_types_in $crate::bindings::metric);
        };
    };
}
