//! Unit tests of the shared report content.

use crate::fixtures::{self, estimate};
use crate::{
    Cell, NOT_AVAILABLE, Table, Verdict, comparison_table, interval, number, sample_table,
    score_names, signed, signed_interval,
};
use adapterlab_sdk::reporter::Delta;

fn texts(table: &Table) -> Vec<Vec<&str>> {
    table
        .rows
        .iter()
        .map(|row| row.iter().map(Cell::as_str).collect())
        .collect()
}

#[test]
fn numbers() {
    for (x, want) in [
        (0.123456, "0.1235"),
        (1.0, "1.0000"),
        (-0.5, "-0.5000"),
        (-0.00001, "0.0000"),
        (-0.0, "0.0000"),
        (12345.678, "12345.6780"),
        (f64::NAN, NOT_AVAILABLE),
        (f64::INFINITY, NOT_AVAILABLE),
        (f64::NEG_INFINITY, NOT_AVAILABLE),
    ] {
        assert_eq!(number(x), want, "{x}");
    }
}

#[test]
fn signed_numbers() {
    for (x, want) in [
        (0.05, "+0.0500"),
        (-0.05, "-0.0500"),
        (0.0, "0.0000"),
        (0.00001, "0.0000"),
        (-0.00001, "0.0000"),
        (f64::NAN, NOT_AVAILABLE),
    ] {
        assert_eq!(signed(x), want, "{x}");
    }
    assert_eq!(interval(&estimate(0.5, 0.25, 0.75)), "[0.2500, 0.7500]");
    assert_eq!(
        signed_interval(&estimate(0.0, -0.25, 0.75)),
        "[-0.2500, +0.7500]"
    );
    assert_eq!(interval(&estimate(0.5, f64::NAN, 0.75)), "[n/a, 0.7500]");
}

#[test]
fn verdicts_respect_the_direction() {
    let delta = |mean: f64, significant: bool, higher_is_better: bool| Delta {
        score: "s".to_string(),
        difference: estimate(mean, mean - 0.01, mean + 0.01),
        significant,
        higher_is_better,
        paired: 10,
    };
    for (mean, significant, higher, want) in [
        (0.1, true, true, Verdict::Better),
        (-0.1, true, true, Verdict::Worse),
        (0.1, true, false, Verdict::Worse),
        (-0.1, true, false, Verdict::Better),
        (0.1, false, true, Verdict::NotSignificant),
        (-0.1, false, false, Verdict::NotSignificant),
        (0.0, true, true, Verdict::NotSignificant),
        (f64::NAN, true, true, Verdict::NotSignificant),
    ] {
        assert_eq!(
            Verdict::of(&delta(mean, significant, higher)),
            want,
            "{mean} {significant} {higher}"
        );
    }
}

#[test]
fn score_names_in_order_of_first_appearance() {
    assert_eq!(
        score_names(&fixtures::comparison()),
        ["rouge1", "ter", "bleu"]
    );
    assert_eq!(score_names(&fixtures::non_finite()), ["rouge1", "bleu"]);
    assert!(score_names(&fixtures::empty()).is_empty());
}

#[test]
fn comparison_rows() {
    let table = comparison_table(&fixtures::comparison()).expect("deltas");
    assert_eq!(
        texts(&table),
        [
            [
                "rouge1",
                "0.3000",
                "0.3500",
                "+0.0500",
                "[+0.0200, +0.0800]",
                "500",
                "higher",
                "✓ better"
            ],
            [
                "ter",
                "0.7000",
                "0.8000",
                "+0.1000",
                "[+0.0400, +0.1600]",
                "500",
                "lower",
                "✗ worse"
            ],
            [
                "bleu",
                "0.1000",
                "0.1100",
                "+0.0100",
                "[-0.0100, +0.0300]",
                "500",
                "higher",
                "– not significant"
            ],
        ]
    );
    assert_eq!(table.columns[1].title, "Baseline: base");
    assert_eq!(table.columns[2].title, "Candidate: lora r=8, \"fast\"");
    assert!(comparison_table(&fixtures::single_run()).is_none());
}

#[test]
fn comparison_without_runs_or_aggregates() {
    let mut report = fixtures::comparison();
    report.runs.truncate(1);
    report.runs[0].aggregates.clear();
    let table = comparison_table(&report).expect("deltas");
    assert_eq!(table.columns[2].title, "Candidate: candidate");
    assert_eq!(texts(&table)[0][1..3], [NOT_AVAILABLE, NOT_AVAILABLE]);
}

#[test]
fn sample_rows_leave_out_runs_without_the_sample() {
    let report = fixtures::comparison();
    let table = sample_table(&report, &report.samples[1]);
    assert_eq!(texts(&table), [["base", "only base", "0.3000"]]);
    let table = sample_table(&report, &report.samples[0]);
    let titles: Vec<_> = table.columns.iter().map(|c| c.title.as_str()).collect();
    assert_eq!(titles, ["Run", "Summary", "rouge1", "ter", "bleu"]);
    assert_eq!(
        texts(&table)[0],
        ["base", "base says | this", "0.2500", "0.7500", "0.0500"]
    );
}

#[test]
fn sample_rows_survive_short_vectors() {
    let report = fixtures::non_finite();
    let table = sample_table(&report, &report.samples[0]);
    assert_eq!(texts(&table), [["a", "", NOT_AVAILABLE, NOT_AVAILABLE]]);
}
