//! Serving contract 0.1.0 on a host that works in 0.2.0 (`latest`): the 0.1.0 capability
//! imports delegate to the latest ones, and the 0.1.0 exports' types are converted to and
//! from the latest types (Zed's extension host does the same per version).
//!
//! Multi-reference samples reach a 0.1.0 metric one reference at a time: the runtime scores
//! each (prediction, reference) pair and keeps, per score, the best value over the references
//! by the score's declared direction (bert-score's rule for several references). Corpus
//! statistics a 0.1.0 metric returns cover only the batch they came with; see
//! [`crate::plugin::runtime::Session::score`] for when they are kept.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::plugin::host::HostState;
use crate::plugin::wit::latest::imports::adapterlab::plugin as caps;
use crate::plugin::wit::since_v0_1_0 as v1;
use crate::plugin::wit::types::{ChatRequest, SampleResult, ScoreSpec};

use v1::imports::adapterlab::plugin as v1caps;

/// A value of one contract version as the same-shaped type of another. Only for the cold
/// paths (manifests, chat, formatter rows, reports), where a JSON round trip costs nothing
/// that matters, and only for types whose floats are finite by then (JSON has no NaN):
/// what a plugin says with floats (score specs, scores) is converted field by field.
pub(crate) fn convert<A: Serialize, B: DeserializeOwned>(value: &A) -> B {
    let json = serde_json::to_value(value).expect("contract types serialize");
    serde_json::from_value(json).expect("the two contract versions' types have the same shape")
}

impl v1caps::types::Host for HostState {}

impl v1caps::log::Host for HostState {
    fn log(&mut self, level: v1caps::log::Level, message: String) {
        caps::log::Host::log(self, convert(&level), message)
    }
}

impl v1caps::config::Host for HostState {
    fn get(&mut self, key: String) -> Option<String> {
        caps::config::Host::get(self, key)
    }

    fn all(&mut self) -> Vec<(String, String)> {
        caps::config::Host::all(self)
    }
}

impl v1caps::embed::Host for HostState {
    fn info(
        &mut self,
        model: Option<String>,
        layer: Option<u32>,
    ) -> Result<v1caps::embed::EncoderInfo, String> {
        caps::embed::Host::info(self, model, layer).map(|i| convert(&i))
    }

    fn embed(
        &mut self,
        model: Option<String>,
        layer: Option<u32>,
        texts: Vec<String>,
    ) -> Result<Vec<v1caps::embed::TokenEmbeddings>, String> {
        // Field by field: the vectors are megabytes.
        caps::embed::Host::embed(self, model, layer, texts).map(|all| {
            all.into_iter()
                .map(|e| v1caps::embed::TokenEmbeddings {
                    tokens: e.tokens,
                    ids: e.ids,
                    special: e.special,
                    vectors: e.vectors,
                })
                .collect()
        })
    }
}

impl v1caps::chat::Host for HostState {
    fn complete(
        &mut self,
        request: v1caps::chat::Request,
    ) -> Result<v1caps::chat::Response, String> {
        caps::chat::Host::complete(self, convert::<_, ChatRequest>(&request)).map(|r| convert(&r))
    }

    fn complete_many(
        &mut self,
        requests: Vec<v1caps::chat::Request>,
    ) -> Vec<Result<v1caps::chat::Response, String>> {
        let requests = requests.iter().map(convert).collect();
        caps::chat::Host::complete_many(self, requests)
            .into_iter()
            .map(|r| r.map(|r| convert(&r)))
            .collect()
    }
}

/// The best of several values of one score: the highest, or the lowest where lower is better.
pub(crate) fn best(spec: Option<&ScoreSpec>, a: f64, b: f64) -> f64 {
    let higher = spec.is_none_or(|s| s.higher_is_better);
    if (b > a) == higher && b != a { b } else { a }
}

pub(crate) fn score_spec(
    s: v1::metric::exports::adapterlab::plugin::metric::ScoreSpec,
) -> ScoreSpec {
    ScoreSpec {
        name: s.name,
        description: s.description,
        min: s.min,
        max: s.max,
        higher_is_better: s.higher_is_better,
    }
}

pub(crate) fn sample_result(
    r: v1::metric::exports::adapterlab::plugin::metric::SampleResult,
) -> SampleResult {
    use v1::metric::exports::adapterlab::plugin::metric::SampleResult as V1;
    match r {
        V1::Scores(scores) => SampleResult::Scores(scores),
        V1::Error(e) => SampleResult::Error(e),
    }
}
