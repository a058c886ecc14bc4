//! Scoring a batch: one chat request per (sample, criterion), all sent at once, and each
//! answer turned into a score or into its sample's error.

use adapterlab_sdk::metric::chat::{Request, Response};
use adapterlab_sdk::metric::{Sample, SampleResult};

use crate::criteria::{Criterion, SourceUse};
use crate::score::answer_score;
use crate::settings::Settings;

/// Score `samples` on the chosen criteria. `send` answers a list of requests, aligned with
/// it (the host's `complete-many`, which runs them concurrently); it is called once, and not
/// at all when there is nothing to ask.
///
/// A sample whose every criterion got a score gets them, in the order of the criteria; any
/// failure makes it an error naming each failed criterion, and the other samples go on.
/// A sample without a source dialogue is an error when a chosen criterion needs one, and
/// then none of its requests is sent.
pub fn judge(
    samples: &[Sample],
    settings: &Settings,
    send: impl FnOnce(&[Request]) -> Vec<Result<Response, String>>,
) -> Vec<SampleResult> {
    let needing_source: Vec<_> = settings
        .criteria
        .iter()
        .filter(|c| c.source == SourceUse::Required)
        .map(|c| c.name)
        .collect();
    let mut outcomes: Vec<Outcome> = Vec::with_capacity(samples.len());
    let mut requests = Vec::new();
    // What each request asks: the index of its sample and the criterion.
    let mut asked: Vec<(usize, &Criterion)> = Vec::new();
    for (index, sample) in samples.iter().enumerate() {
        let source = sample.source.as_deref().filter(|s| !s.trim().is_empty());
        if source.is_none() && !needing_source.is_empty() {
            let names = needing_source.join(" and ");
            let error = format!("no source dialogue, needed by {names}");
            outcomes.push(Outcome::Failed(vec![error]));
            continue;
        }
        outcomes.push(Outcome::Scored(Vec::new()));
        for &criterion in &settings.criteria {
            requests.push(settings.request(criterion.messages(source, &sample.prediction)));
            asked.push((index, criterion));
        }
    }

    let answers = if requests.is_empty() {
        Vec::new()
    } else {
        send(&requests)
    };
    // A host that answers fewer requests than asked breaks the contract; the missing answers
    // become errors rather than a panic.
    let mut answers = answers.into_iter();
    for (index, criterion) in asked {
        let result = match answers.next() {
            None => Err("the host returned no answer".to_string()),
            Some(Err(e)) => Err(format!("request failed: {e}")),
            Some(Ok(response)) => answer_score(&response.content, response.logprobs.as_deref()),
        };
        outcomes[index].add(criterion.name, result);
    }
    outcomes.into_iter().map(Outcome::into_result).collect()
}

/// A sample's scores so far, or its errors once one criterion failed.
enum Outcome {
    Scored(Vec<(String, f64)>),
    Failed(Vec<String>),
}

impl Outcome {
    fn add(&mut self, criterion: &str, result: Result<f64, String>) {
        match (self, result) {
            (Outcome::Scored(scores), Ok(score)) => scores.push((criterion.to_string(), score)),
            (Outcome::Failed(_), Ok(_)) => {}
            (this @ Outcome::Scored(_), Err(e)) => {
                *this = Outcome::Failed(vec![format!("{criterion}: {e}")])
            }
            (Outcome::Failed(errors), Err(e)) => errors.push(format!("{criterion}: {e}")),
        }
    }

    fn into_result(self) -> SampleResult {
        match self {
            Outcome::Scored(scores) => SampleResult::Scores(scores),
            Outcome::Failed(errors) => SampleResult::Error(errors.join("; ")),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use adapterlab_sdk::metric::chat::{Request, Response, TokenLogprob, TopLogprob};
    use adapterlab_sdk::metric::{Sample, SampleResult};

    use crate::judge::judge;
    use crate::settings::Settings;

    fn sample(source: Option<&str>, prediction: &str) -> Sample {
        Sample {
            id: "id".to_string(),
            prediction: prediction.to_string(),
            references: vec!["ref".to_string()],
            source: source.map(str::to_string),
        }
    }

    fn answer(content: &str, logprobs: Option<Vec<TokenLogprob>>) -> Result<Response, String> {
        Ok(Response {
            content: content.to_string(),
            logprobs,
            model: "judge-model".to_string(),
            prompt_tokens: 100,
            completion_tokens: 1,
            cached: false,
        })
    }

    /// Log-probabilities whose first position generated `top[0]` with `top` as alternatives.
    fn first_token(top: &[(&str, f64)]) -> Option<Vec<TokenLogprob>> {
        let alternatives = top.iter().map(|&(t, lp)| TopLogprob {
            token: t.to_string(),
            logprob: lp,
        });
        Some(vec![TokenLogprob {
            token: top[0].0.to_string(),
            logprob: top[0].1,
            top: alternatives.collect(),
        }])
    }

    fn settings(criteria: &str) -> Settings {
        Settings::new(None, 0.0, 5, 5, Some(criteria.to_string())).unwrap()
    }

    fn scores(pairs: &[(&str, f64)]) -> SampleResult {
        SampleResult::Scores(pairs.iter().map(|&(n, s)| (n.to_string(), s)).collect())
    }

    fn error(message: &str) -> SampleResult {
        SampleResult::Error(message.to_string())
    }

    /// The bindings derive no `PartialEq`; their `Debug` output shows every field.
    fn check(got: &[SampleResult], want: &[SampleResult]) {
        assert_eq!(format!("{got:#?}"), format!("{want:#?}"));
    }

    /// Which criterion a request asks about, read from its form line.
    fn criterion_of(request: &Request) -> String {
        let user = &request.messages[1].content;
        let form = user.rsplit("- ").next().unwrap_or_default();
        form.trim_end_matches(':').to_ascii_lowercase()
    }

    #[test]
    fn one_request_per_sample_and_criterion_sent_at_once() {
        let samples = [
            sample(Some("A: hi\nB: hello"), "They greet."),
            sample(Some("C: bye"), "C leaves."),
        ];
        let calls = Cell::new(0);
        let results = judge(&samples, &Settings::default(), |requests| {
            calls.set(calls.get() + 1);
            let asked: Vec<_> = requests.iter().map(criterion_of).collect();
            let each = ["relevance", "coherence", "consistency", "fluency"];
            assert_eq!(asked, [each, each].concat());
            assert!(requests[0].messages[1].content.contains("A: hi\nB: hello"));
            assert!(requests[4].messages[1].content.contains("C leaves."));
            assert!(
                requests
                    .iter()
                    .all(|r| r.logprobs && r.top_logprobs == Some(5))
            );
            (0..requests.len())
                .map(|i| answer(&format!("{}", i % 5 + 1), None))
                .collect()
        });
        assert_eq!(calls.get(), 1);
        check(
            &results,
            &[
                scores(&[
                    ("relevance", 1.0),
                    ("coherence", 2.0),
                    ("consistency", 3.0),
                    ("fluency", 4.0),
                ]),
                scores(&[
                    ("relevance", 5.0),
                    ("coherence", 1.0),
                    ("consistency", 2.0),
                    ("fluency", 3.0),
                ]),
            ],
        );
    }

    #[test]
    fn log_probabilities_weight_the_score() {
        let results = judge(&[sample(Some("d"), "s")], &settings("fluency"), |_| {
            vec![answer(
                "4",
                first_token(&[("4", 0.75f64.ln()), (" 2", 0.25f64.ln())]),
            )]
        });
        check(&results, &[scores(&[("fluency", 3.5)])]);
    }

    #[test]
    fn missing_source_fails_only_criteria_that_need_it() {
        let samples = [sample(None, "s"), sample(Some("  "), "s")];
        let results = judge(&samples, &Settings::default(), |_| {
            panic!("nothing should be sent")
        });
        let no_source = error("no source dialogue, needed by relevance and consistency");
        check(&results, &[no_source.clone(), no_source]);

        let results = judge(&samples, &settings("consistency,fluency"), |_| {
            panic!("nothing should be sent")
        });
        let no_source = error("no source dialogue, needed by consistency");
        check(&results, &[no_source.clone(), no_source]);

        let results = judge(&samples, &settings("coherence,fluency"), |requests| {
            assert_eq!(requests.len(), 4);
            assert!(
                requests
                    .iter()
                    .all(|r| !r.messages[1].content.contains("Dialogue:"))
            );
            requests.iter().map(|_| answer("5", None)).collect()
        });
        let five = scores(&[("coherence", 5.0), ("fluency", 5.0)]);
        check(&results, &[five.clone(), five]);
    }

    #[test]
    fn one_bad_answer_fails_its_sample_only() {
        let samples = [sample(Some("d"), "s"), sample(Some("d"), "s")];
        let results = judge(&samples, &settings("relevance,fluency"), |_| {
            vec![
                answer("3", None),
                answer("As an AI, I cannot.", None),
                answer("4", None),
                answer("5", None),
            ]
        });
        check(
            &results,
            &[
                error("fluency: no score from 1 to 5 in the answer \"As an AI, I cannot.\""),
                scores(&[("relevance", 4.0), ("fluency", 5.0)]),
            ],
        );
    }

    #[test]
    fn failed_requests_name_their_criterion() {
        let results = judge(
            &[sample(Some("d"), "s")],
            &settings("relevance,coherence,fluency"),
            |_| {
                vec![
                    Err("rate limited after 5 retries".into()),
                    answer("2", None),
                    Err("timeout".into()),
                ]
            },
        );
        check(
            &results,
            &[error(
                "relevance: request failed: rate limited after 5 retries; fluency: request failed: timeout",
            )],
        );
    }

    #[test]
    fn short_host_answers_become_errors() {
        let samples = [sample(Some("d"), "s"), sample(Some("d"), "s")];
        let results = judge(&samples, &settings("fluency"), |_| vec![answer("3", None)]);
        check(
            &results,
            &[
                scores(&[("fluency", 3.0)]),
                error("fluency: the host returned no answer"),
            ],
        );
    }

    #[test]
    fn empty_batch_sends_nothing() {
        let results = judge(&[], &Settings::default(), |_| {
            panic!("nothing should be sent")
        });
        check(&results, &[]);
    }
}
