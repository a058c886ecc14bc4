//! `judge`: a G-Eval rubric judge. An LLM, reached through the host's `chat` capability,
//! scores each summary 1-5 on relevance, coherence, consistency and fluency.
//!
//! Method (G-Eval, Liu et al., 2023, "NLG Evaluation using GPT-4 with Better Human
//! Alignment"): for each (sample, criterion) the judge model gets the criterion's definition,
//! chain-of-thought evaluation steps, the dialogue and the summary, and answers with the score
//! only. The score is the probability-weighted mean of the score tokens "1".."5" at the first
//! generated position, renormalised over those tokens, which gives fine-grained scores
//! (e.g. 3.8) instead of ties on integers. Where the server returns no log-probabilities, or
//! none of the alternatives is a score, the first integer 1-5 in the answer is the score.
//!
//! Settings (`judge.KEY=VALUE`):
//! - `model` (default `gpt-3.5-turbo`): the judge model;
//! - `temperature` (default 0), `max_tokens` (default 5), `top_logprobs` (default 5, 0-20);
//! - `criteria` (default all four): a comma-separated subset, e.g. `relevance,fluency`.
//!
//! Relevance and consistency compare the summary with the dialogue (`sample.source`), so a
//! sample without one is an error when either is chosen. Coherence shows the dialogue when
//! known; fluency never does, as in G-Eval. All four are 1-5 here, fluency included (G-Eval
//! rates it 1-3), because the project's contract gives the judge's scores one range; see
//! [`criteria`] for the rubrics.
//!
//! `info` declares all four scores whatever `criteria` says: it is answered before any
//! settings apply. A sample then carries only the chosen criteria's scores.

pub mod criteria;
pub mod judge;
pub mod score;
pub mod settings;

use adapterlab_sdk::metric::{BatchResult, Metric, MetricInfo, Sample, ScoreSpec, chat};
use adapterlab_sdk::{Capability, Manifest, log};

use crate::criteria::CRITERIA;
use crate::score::{MAX_SCORE, MIN_SCORE};
use crate::settings::Settings;

pub struct Judge;

impl Metric for Judge {
    fn info() -> MetricInfo {
        MetricInfo {
            manifest: Manifest::new(
                "judge",
                env!("CARGO_PKG_VERSION"),
                "G-Eval rubric judge: relevance, coherence, consistency, fluency (1-5) by an LLM",
            )
            .with_capability(Capability::Chat),
            scores: CRITERIA
                .iter()
                .map(|c| {
                    ScoreSpec::new(
                        c.name,
                        &format!(
                            "G-Eval {} judged by an LLM: {}",
                            c.name,
                            first_sentence(c.definition)
                        ),
                        f64::from(MIN_SCORE),
                        f64::from(MAX_SCORE),
                        true,
                    )
                })
                .collect(),
            // A sample's scores are its own; the host does not split it anyway (it calls an LLM).
            independent_samples: true,
        }
    }

    fn score_batch(samples: Vec<Sample>) -> Result<BatchResult, String> {
        // Bad settings fail the batch: every sample would fail the same way.
        let settings = Settings::from_config()?;
        let samples = judge::judge(&samples, &settings, |requests| {
            let answers = chat::complete_many(requests);
            let cached = answers
                .iter()
                .filter(|a| a.as_ref().is_ok_and(|r| r.cached))
                .count();
            let failed = answers.iter().filter(|a| a.is_err()).count();
            log::debug(&format!(
                "judge: {} requests to {}, {cached} from the host's cache, {failed} failed",
                requests.len(),
                settings.model,
            ));
            answers
        });
        Ok(BatchResult {
            samples,
            statistics: Vec::new(),
        })
    }
}

/// The text up to its first full stop, for a one-line score description.
fn first_sentence(text: &str) -> &str {
    let end = text
        .char_indices()
        .find(|&(i, c)| c == '.' && text[i + 1..].chars().next().is_none_or(char::is_whitespace))
        .map_or(text.len(), |(i, _)| i);
    &text[..end]
}

adapterlab_sdk::export_metric!(Judge);

#[cfg(test)]
mod tests {
    use adapterlab_sdk::Capability;
    use adapterlab_sdk::metric::Metric;

    use crate::Judge;

    #[test]
    fn info_declares_four_one_to_five_scores_and_chat() {
        let info = Judge::info();
        assert_eq!(info.manifest.name, "judge");
        assert!(info.manifest.capabilities.contains(&Capability::Chat));
        let scores: Vec<_> = info
            .scores
            .iter()
            .map(|s| (s.name.as_str(), s.min, s.max, s.higher_is_better))
            .collect();
        assert_eq!(
            scores,
            [
                ("relevance", 1.0, 5.0, true),
                ("coherence", 1.0, 5.0, true),
                ("consistency", 1.0, 5.0, true),
                ("fluency", 1.0, 5.0, true),
            ]
        );
        assert_eq!(
            info.scores[0].description,
            "G-Eval relevance judged by an LLM: selection of important content from the dialogue"
        );
        assert_eq!(
            info.scores[3].description,
            "G-Eval fluency judged by an LLM: the quality of the summary in terms of grammar, \
             spelling, punctuation, word choice, and sentence structure"
        );
    }
}
