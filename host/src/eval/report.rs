//! Turning runs and comparisons into the reporter plugins' `report` record.

use std::collections::BTreeMap;

use crate::eval::compare::Comparison;
use crate::eval::input::all_references;
use crate::plugin::wit::types::{
    Aggregate, Delta, Estimate as WitEstimate, Report, ReportRun, SampleView,
};
use crate::store::{Estimate, RunRecord, SampleRecord};

fn estimate(e: &Estimate) -> WitEstimate {
    WitEstimate {
        mean: e.mean,
        low: e.low,
        high: e.high,
    }
}

fn run_view(run: &RunRecord) -> ReportRun {
    let higher = |name: &str| {
        run.scores
            .iter()
            .find(|s| s.name == name)
            .is_none_or(|s| s.higher_is_better)
    };
    let mut metadata: Vec<(String, String)> = run
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    metadata.push(("status".into(), run.status.as_str().into()));
    for (k, v) in &run.corpus {
        metadata.push((format!("corpus.{k}"), format!("{v:.4}")));
    }
    if run.usage.requests + run.usage.cached > 0 {
        metadata.push((
            "llm usage".into(),
            format!(
                "{} requests ({} cached), {} prompt + {} completion tokens, ${:.4}",
                run.usage.requests,
                run.usage.cached,
                run.usage.prompt_tokens,
                run.usage.completion_tokens,
                run.usage.cost_usd
            ),
        ));
    }
    let mut aggregates: Vec<Aggregate> = run
        .aggregates
        .iter()
        .map(|(score, e)| Aggregate {
            score: score.clone(),
            estimate: estimate(e),
            higher_is_better: higher(score),
        })
        .collect();
    aggregates.extend(run.reference_aggregates.iter().map(|(score, e)| Aggregate {
        score: format!("{score} (reference)"),
        estimate: estimate(e),
        higher_is_better: higher(score),
    }));
    ReportRun {
        id: run.id.clone(),
        name: run.name.clone(),
        kind: run.kind.as_str().into(),
        created: run.created.clone(),
        metadata,
        aggregates,
    }
}

fn scores_list(m: &BTreeMap<String, f64>) -> Vec<(String, f64)> {
    m.iter().map(|(k, v)| (k.clone(), *v)).collect()
}

/// A report of one run with all its samples.
pub fn single(run: &RunRecord, samples: &[SampleRecord]) -> Report {
    Report {
        title: format!("adapterlab evaluation: {}", run.name),
        runs: vec![run_view(run)],
        deltas: vec![],
        samples: samples
            .iter()
            .map(|s| SampleView {
                id: s.id.clone(),
                source: s.source.clone(),
                references: all_references(&s.reference, &s.references),
                predictions: vec![Some(s.prediction.clone())],
                scores: vec![scores_list(&s.scores)],
            })
            .collect(),
    }
}

/// A report comparing runs: deltas against the first run, samples by disagreement.
pub fn comparison(c: &Comparison) -> Report {
    let names: Vec<&str> = c.runs.iter().map(|r| r.name.as_str()).collect();
    Report {
        title: format!("adapterlab comparison: {}", names.join(" vs ")),
        runs: c.runs.iter().map(run_view).collect(),
        deltas: c
            .deltas
            .iter()
            .map(|d| Delta {
                score: if c.runs.len() > 2 {
                    let name = c
                        .runs
                        .iter()
                        .find(|r| r.id == d.run)
                        .map(|r| r.name.as_str())
                        .unwrap_or(&d.run);
                    format!("{} ({name})", d.score)
                } else {
                    d.score.clone()
                },
                difference: estimate(&d.difference),
                significant: d.significant,
                higher_is_better: d.higher_is_better,
                paired: d.paired as u32,
            })
            .collect(),
        samples: c
            .samples
            .iter()
            .map(|s| SampleView {
                id: s.id.clone(),
                source: s.source.clone(),
                references: s.references.clone(),
                predictions: s.predictions.clone(),
                scores: s.scores.iter().map(scores_list).collect(),
            })
            .collect(),
    }
}
