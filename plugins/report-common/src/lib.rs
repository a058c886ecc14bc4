//! What the built-in reporters (`report-md`, `report-html`, `report-csv`) share: which
//! tables a report shows and what is in their cells, the verdict on a delta, and how numbers
//! are written. Each reporter only adds its syntax and escaping, so the three agree on
//! content.
//!
//! **Invariant:** no text this crate produces holds `NaN` or `inf`; a non-finite number is
//! written as [`NOT_AVAILABLE`].

use adapterlab_sdk::reporter::{Aggregate, Delta, Estimate, Report, Run, SampleView};

/// How a missing or non-finite number is shown.
pub const NOT_AVAILABLE: &str = "n/a";

/// Decimals shown for means and intervals: enough for scores in 0..1 (ROUGE, BERTScore) and
/// for judge scores in 1..5 alike.
const DECIMALS: usize = 4;

/// `x` with [`DECIMALS`] decimals, [`NOT_AVAILABLE`] when not finite. A value that rounds to
/// zero is written `0.0000`, never `-0.0000`.
pub fn number(x: f64) -> String {
    if !x.is_finite() {
        return NOT_AVAILABLE.to_string();
    }
    let text = format!("{x:.DECIMALS$}");
    match text.strip_prefix('-') {
        Some(rest) if rest.bytes().all(|b| b == b'0' || b == b'.') => rest.to_string(),
        _ => text,
    }
}

/// Like [`number`], with a `+` on positive values: for differences.
pub fn signed(x: f64) -> String {
    let text = number(x);
    if x.is_finite() && !text.starts_with('-') && text.bytes().any(|b| (b'1'..=b'9').contains(&b)) {
        format!("+{text}")
    } else {
        text
    }
}

/// `[low, high]`.
pub fn interval(estimate: &Estimate) -> String {
    format!("[{}, {}]", number(estimate.low), number(estimate.high))
}

/// `[low, high]` with signs, for differences.
pub fn signed_interval(estimate: &Estimate) -> String {
    format!("[{}, {}]", signed(estimate.low), signed(estimate.high))
}

/// What a delta says about the candidate, taking the score's direction into account.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Significantly better than the baseline.
    Better,
    /// Significantly worse than the baseline.
    Worse,
    /// The interval includes zero (or the difference is unknown).
    NotSignificant,
}

impl Verdict {
    pub fn of(delta: &Delta) -> Verdict {
        let mean = delta.difference.mean;
        if !delta.significant || !mean.is_finite() || mean == 0.0 {
            return Verdict::NotSignificant;
        }
        if (mean > 0.0) == delta.higher_is_better {
            Verdict::Better
        } else {
            Verdict::Worse
        }
    }

    /// A mark and a word, so the meaning never rests on a symbol or a colour alone.
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Better => "✓ better",
            Verdict::Worse => "✗ worse",
            Verdict::NotSignificant => "– not significant",
        }
    }

    /// A short identifier, e.g. for a CSS class.
    pub fn key(self) -> &'static str {
        match self {
            Verdict::Better => "better",
            Verdict::Worse => "worse",
            Verdict::NotSignificant => "not-significant",
        }
    }
}

/// `higher` or `lower`: which way a score improves.
/// The heading over a sample's `k`-th reference (0-based) of `n`: `Reference` when it is the
/// only one, else `Reference 1`, `Reference 2`, ...
pub fn reference_heading(k: usize, n: usize) -> String {
    if n == 1 {
        "Reference".to_string()
    } else {
        format!("Reference {}", k + 1)
    }
}

pub fn direction(higher_is_better: bool) -> &'static str {
    if higher_is_better { "higher" } else { "lower" }
}

/// Every score name in the report, in order of first appearance: the runs' aggregates, then
/// the deltas, then the samples' scores.
pub fn score_names(report: &Report) -> Vec<String> {
    let aggregates = report
        .runs
        .iter()
        .flat_map(|r| &r.aggregates)
        .map(|a| &a.score);
    let deltas = report.deltas.iter().map(|d| &d.score);
    let samples = report
        .samples
        .iter()
        .flat_map(|s| &s.scores)
        .flatten()
        .map(|(name, _)| name);
    let mut names: Vec<String> = Vec::new();
    for name in aggregates.chain(deltas).chain(samples) {
        if !names.contains(name) {
            names.push(name.clone());
        }
    }
    names
}

/// The aggregate of `score` in `run`.
pub fn aggregate<'a>(run: &'a Run, score: &str) -> Option<&'a Aggregate> {
    run.aggregates.iter().find(|a| a.score == score)
}

/// The value of `score` among one run's scores of a sample.
pub fn sample_score(scores: &[(String, f64)], score: &str) -> Option<f64> {
    scores
        .iter()
        .find(|(name, _)| name == score)
        .map(|&(_, value)| value)
}

/// The name of run `index`, or `fallback` when the report has no such run.
pub fn run_name<'a>(report: &'a Report, index: usize, fallback: &'a str) -> &'a str {
    report.runs.get(index).map_or(fallback, |r| r.name.as_str())
}

/// A table as the reporters show it: the first cell of each row is that row's header.
#[derive(Debug)]
pub struct Table {
    pub caption: String,
    pub columns: Vec<Column>,
    pub rows: Vec<Vec<Cell>>,
}

#[derive(Debug)]
pub struct Column {
    pub title: String,
    /// Numbers are aligned right.
    pub numeric: bool,
}

/// One cell. Text comes from users and is escaped by each format; numbers and verdicts are
/// written by this crate and hold nothing to escape, so Markdown can show `[0.1, 0.2]`
/// rather than `\[0.1, 0.2\]`.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Text(String),
    /// A number, an interval, a count or [`NOT_AVAILABLE`], as this crate wrote it.
    Number(String),
    Verdict(Verdict),
}

impl Cell {
    fn text(text: &str) -> Cell {
        Cell::Text(text.to_string())
    }

    /// The cell's text, unescaped.
    pub fn as_str(&self) -> &str {
        match self {
            Cell::Text(text) | Cell::Number(text) => text,
            Cell::Verdict(verdict) => verdict.label(),
        }
    }
}

impl Column {
    fn text(title: &str) -> Column {
        Column {
            title: title.to_string(),
            numeric: false,
        }
    }
    fn number(title: &str) -> Column {
        Column {
            title: title.to_string(),
            numeric: true,
        }
    }
}

/// A run's facts (`metadata`), one row per key.
pub fn metadata_table(run: &Run) -> Table {
    Table {
        caption: format!("Facts of run {}", run.name),
        columns: vec![Column::text("Key"), Column::text("Value")],
        rows: run
            .metadata
            .iter()
            .map(|(k, v)| vec![Cell::text(k), Cell::text(v)])
            .collect(),
    }
}

/// A run's aggregates: each score's mean with its 95% interval.
pub fn aggregates_table(run: &Run) -> Table {
    Table {
        caption: format!(
            "Scores of run {}: mean and 95% bootstrap interval",
            run.name
        ),
        columns: vec![
            Column::text("Score"),
            Column::number("Mean"),
            Column::number("95% interval"),
            Column::text("Better when"),
        ],
        rows: run
            .aggregates
            .iter()
            .map(|a| {
                vec![
                    Cell::text(&a.score),
                    Cell::Number(number(a.estimate.mean)),
                    Cell::Number(interval(&a.estimate)),
                    Cell::text(direction(a.higher_is_better)),
                ]
            })
            .collect(),
    }
}

/// The comparison of the candidate (`runs[1]`) with the baseline (`runs[0]`); None when the
/// report has no deltas.
pub fn comparison_table(report: &Report) -> Option<Table> {
    if report.deltas.is_empty() {
        return None;
    }
    let baseline = run_name(report, 0, "baseline");
    let candidate = run_name(report, 1, "candidate");
    let mean_of = |index: usize, score: &str| {
        let aggregate = report.runs.get(index).and_then(|run| aggregate(run, score));
        aggregate.map_or_else(|| NOT_AVAILABLE.to_string(), |a| number(a.estimate.mean))
    };
    let rows = report
        .deltas
        .iter()
        .map(|d| {
            vec![
                Cell::text(&d.score),
                Cell::Number(mean_of(0, &d.score)),
                Cell::Number(mean_of(1, &d.score)),
                Cell::Number(signed(d.difference.mean)),
                Cell::Number(signed_interval(&d.difference)),
                Cell::Number(d.paired.to_string()),
                Cell::text(direction(d.higher_is_better)),
                Cell::Verdict(Verdict::of(d)),
            ]
        })
        .collect();
    Some(Table {
        caption: format!(
            "{candidate} (candidate) minus {baseline} (baseline), paired by sample, with 95% \
             paired-bootstrap intervals"
        ),
        columns: vec![
            Column::text("Score"),
            Column::number(&format!("Baseline: {baseline}")),
            Column::number(&format!("Candidate: {candidate}")),
            Column::number("Difference"),
            Column::number("95% interval"),
            Column::number("Paired samples"),
            Column::text("Better when"),
            Column::text("Verdict"),
        ],
        rows,
    })
}

/// One sample as each run saw it: its summary and its scores. Runs without the sample are
/// left out.
pub fn sample_table(report: &Report, sample: &SampleView) -> Table {
    let mut names: Vec<&String> = Vec::new();
    for (name, _) in sample.scores.iter().flatten() {
        if !names.contains(&name) {
            names.push(name);
        }
    }
    let mut columns = vec![Column::text("Run"), Column::text("Summary")];
    columns.extend(names.iter().map(|n| Column::number(n)));
    let rows = report
        .runs
        .iter()
        .enumerate()
        .filter_map(|(index, run)| {
            let prediction = sample.predictions.get(index).and_then(Option::as_deref);
            let scores = sample.scores.get(index).map_or(&[][..], Vec::as_slice);
            if prediction.is_none() && scores.is_empty() {
                return None;
            }
            let mut row = vec![
                Cell::text(&run.name),
                Cell::text(prediction.unwrap_or(NOT_AVAILABLE)),
            ];
            row.extend(names.iter().map(|n| {
                let value = sample_score(scores, n);
                Cell::Number(value.map_or_else(|| NOT_AVAILABLE.to_string(), number))
            }));
            Some(row)
        })
        .collect();
    Table {
        caption: format!("Sample {}: each run's summary and scores", sample.id),
        columns,
        rows,
    }
}

#[cfg(any(test, feature = "fixtures"))]
pub mod fixtures;

#[cfg(test)]
mod tests;
