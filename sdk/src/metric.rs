//! Metric plugins: implement [`Metric`], then `export_metric!(YourType)`.

pub use crate::bindings::imports::adapterlab::plugin::chat;
pub use crate::bindings::imports::adapterlab::plugin::embed;
pub use crate::bindings::metric::exports::adapterlab::plugin::metric::{
    BatchResult, MetricInfo, Sample, SampleResult, ScoreSpec, Statistic,
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

/// The value of the count `name` among `statistics`, 0 when absent (a batch with no scored
/// sample may leave its counts out). An error names a statistic that is a sum.
pub fn count(statistics: &[(String, Statistic)], name: &str) -> Result<u64, String> {
    match statistics.iter().find(|(n, _)| n == name) {
        None => Ok(0),
        Some((_, Statistic::Count(c))) => Ok(*c),
        Some((_, Statistic::Sum(_))) => Err(format!("statistic {name:?} is a sum, not a count")),
    }
}

/// A metric. Implement `score_sample` for a per-sample metric, or `score_batch` when the
/// metric needs the whole batch or has corpus scores; then `finalize` turns the statistics
/// its batches returned, summed by the host, into the corpus scores.
pub trait Metric {
    fn info() -> MetricInfo;

    /// Score one sample. A returned error becomes that sample's error; the others go on.
    fn score_sample(sample: &Sample) -> Result<Vec<(String, f64)>, String> {
        let _ = sample;
        Err("this metric implements neither score_sample nor score_batch".to_string())
    }

    /// Score a batch. The default scores each sample with `score_sample` and returns no
    /// statistics.
    fn score_batch(samples: Vec<Sample>) -> Result<BatchResult, String> {
        Ok(BatchResult {
            samples: samples
                .iter()
                .map(|s| match Self::score_sample(s) {
                    Ok(scores) => SampleResult::Scores(scores),
                    Err(e) => SampleResult::Error(e),
                })
                .collect(),
            statistics: Vec::new(),
        })
    }

    /// The corpus scores from the statistics of every batch, summed name by name. The
    /// default has none.
    fn finalize(statistics: Vec<(String, Statistic)>) -> Result<Vec<(String, f64)>, String> {
        let _ = statistics;
        Ok(Vec::new())
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
                fn finalize(
                    statistics: ::std::vec::Vec<(::std::string::String, $crate::metric::Statistic)>,
                ) -> ::std::result::Result<::std::vec::Vec<(::std::string::String, f64)>, ::std::string::String> {
                    <$ty as $crate::metric::Metric>::finalize(statistics)
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
