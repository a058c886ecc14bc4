//! Comparing runs: samples paired by id, each score's mean difference against the first run
//! (the baseline) with a paired-bootstrap 95% interval, and the samples where the runs
//! disagree most.

use std::collections::{BTreeMap, HashMap};

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

use crate::eval::input::all_references;
use crate::eval::stats::{is_significant, paired_difference};
use crate::store::{Estimate, RunRecord, SampleRecord, ScoreInfo, Store};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Delta {
    /// The run compared against the baseline.
    pub run: String,
    pub score: String,
    /// Mean of (candidate − baseline) over paired samples, with its interval.
    pub difference: Estimate,
    pub significant: bool,
    pub higher_is_better: bool,
    /// Whether the candidate is significantly better (true), worse (false) or neither (none).
    pub verdict: Option<bool>,
    pub paired: usize,
}

/// One sample as every compared run saw it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SampleView {
    pub id: String,
    pub source: Option<String>,
    /// The reference, or the first of several (what single-reference views show).
    pub reference: String,
    /// Every reference (one or more), as the first run stored them.
    pub references: Vec<String>,
    /// Aligned with `Comparison::runs`.
    pub predictions: Vec<Option<String>>,
    pub scores: Vec<BTreeMap<String, f64>>,
    /// Spread of the runs' scores on this sample, each score scaled by its declared range,
    /// summed: the sort key for "largest disagreement".
    pub disagreement: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Comparison {
    pub runs: Vec<RunRecord>,
    pub scores: Vec<ScoreInfo>,
    pub deltas: Vec<Delta>,
    /// Samples present in every run, largest disagreement first.
    pub samples: Vec<SampleView>,
}

pub fn compare(store: &Store, ids: &[String]) -> Result<Comparison> {
    if ids.len() < 2 {
        bail!("compare needs at least two runs");
    }
    let runs: Vec<RunRecord> = ids
        .iter()
        .map(|id| store.resolve_run(id))
        .collect::<Result<_, _>>()?;
    let samples: Vec<Vec<SampleRecord>> = runs
        .iter()
        .map(|r| store.samples(&r.id))
        .collect::<Result<_, _>>()?;
    Ok(compare_loaded(runs, samples))
}

pub fn compare_loaded(runs: Vec<RunRecord>, samples: Vec<Vec<SampleRecord>>) -> Comparison {
    // Scores every run has, in the baseline's order.
    let scores: Vec<ScoreInfo> = runs[0]
        .scores
        .iter()
        .filter(|s| {
            runs[1..]
                .iter()
                .all(|r| r.scores.iter().any(|o| o.name == s.name))
        })
        .cloned()
        .collect();
    let by_id: Vec<HashMap<&str, &SampleRecord>> = samples
        .iter()
        .map(|ss| ss.iter().map(|s| (s.id.as_str(), s)).collect())
        .collect();

    let mut deltas = Vec::new();
    for (c, run) in runs.iter().enumerate().skip(1) {
        for score in &scores {
            let (mut base, mut cand) = (Vec::new(), Vec::new());
            for s in &samples[0] {
                let Some(other) = by_id[c].get(s.id.as_str()) else {
                    continue;
                };
                if let (Some(a), Some(b)) =
                    (s.scores.get(&score.name), other.scores.get(&score.name))
                {
                    base.push(*a);
                    cand.push(*b);
                }
            }
            if base.is_empty() {
                continue;
            }
            let difference = paired_difference(&base, &cand);
            let significant = is_significant(&difference);
            let verdict = significant.then_some((difference.mean > 0.0) == score.higher_is_better);
            deltas.push(Delta {
                run: run.id.clone(),
                score: score.name.clone(),
                difference,
                significant,
                higher_is_better: score.higher_is_better,
                verdict,
                paired: base.len(),
            });
        }
    }

    let mut views: Vec<SampleView> = samples[0]
        .iter()
        .filter(|s| by_id[1..].iter().all(|m| m.contains_key(s.id.as_str())))
        .map(|s| {
            let per_run: Vec<&SampleRecord> = by_id.iter().map(|m| m[s.id.as_str()]).collect();
            let disagreement = scores
                .iter()
                .map(|spec| {
                    let vals: Vec<f64> = per_run
                        .iter()
                        .filter_map(|r| r.scores.get(&spec.name).copied())
                        .collect();
                    if vals.len() < 2 {
                        return 0.0;
                    }
                    let (lo, hi) = vals
                        .iter()
                        .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| {
                            (l.min(*v), h.max(*v))
                        });
                    let range = (spec.max - spec.min).abs();
                    // Unbounded scores (max 1e9) would swamp bounded ones; scale them by the
                    // spread seen instead.
                    let scale = if range > 0.0 && range < 1e6 {
                        range
                    } else {
                        hi.abs().max(lo.abs()).max(1e-12)
                    };
                    (hi - lo) / scale
                })
                .sum();
            SampleView {
                id: s.id.clone(),
                source: s.source.clone(),
                reference: s.reference.clone(),
                references: all_references(&s.reference, &s.references),
                predictions: per_run.iter().map(|r| Some(r.prediction.clone())).collect(),
                scores: per_run.iter().map(|r| r.scores.clone()).collect(),
                disagreement,
            }
        })
        .collect();
    views.sort_by(|a, b| {
        b.disagreement
            .total_cmp(&a.disagreement)
            .then_with(|| a.id.cmp(&b.id))
    });
    Comparison {
        runs,
        scores,
        deltas,
        samples: views,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{RunKind, RunRecord};

    fn run(id: &str) -> RunRecord {
        let mut r = RunRecord::new(id.into(), id.into(), RunKind::Eval);
        r.scores = vec![ScoreInfo {
            name: "s".into(),
            metric: "m".into(),
            min: 0.0,
            max: 1.0,
            higher_is_better: true,
        }];
        r
    }

    fn sample(i: u32, v: f64) -> SampleRecord {
        SampleRecord {
            index: i,
            id: format!("id{i}"),
            scores: [("s".to_string(), v)].into(),
            ..Default::default()
        }
    }

    #[test]
    fn pairs_by_id_and_flags_significant_gains() {
        let a: Vec<SampleRecord> = (0..50)
            .map(|i| sample(i, 0.3 + (i % 5) as f64 * 0.01))
            .collect();
        // Same ids in another order, each better by 0.1, one sample missing.
        let mut b: Vec<SampleRecord> = (1..50)
            .rev()
            .map(|i| sample(i, 0.4 + (i % 5) as f64 * 0.01))
            .collect();
        b[0].scores.insert("s".into(), 0.95);
        let c = compare_loaded(vec![run("a"), run("b")], vec![a, b]);
        assert_eq!(c.deltas.len(), 1);
        let d = &c.deltas[0];
        assert_eq!(d.paired, 49);
        assert!(d.significant);
        assert_eq!(d.verdict, Some(true));
        assert_eq!(c.samples.len(), 49);
        assert_eq!(c.samples[0].id, "id49", "largest disagreement first");
    }
}
