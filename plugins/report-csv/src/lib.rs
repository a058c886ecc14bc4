//! `report-csv`: renders a report's per-sample scores as CSV (format `csv`, RFC 4180), for
//! spreadsheets and scripts.
//!
//! Columns, in order:
//! - `run_id`: the run's id;
//! - `run_name`: the run's name;
//! - `sample_id`: the sample's id;
//! - then one column per score name in the report, in order of first appearance (the runs'
//!   aggregates, then the deltas, then the samples' scores), holding that run's score on
//!   that sample.
//!
//! One row per (run, sample) for the samples in the report (`report.samples`, the samples the
//! host chose to show) and the runs that have the sample, runs in report order, then samples
//! in report order. A score the run did not give the sample, or that is not finite, is an
//! empty field; others are written with Rust's shortest round-trip form (`0.25`, `1`), never
//! in exponent notation. The header row is always there, even with no rows.
//!
//! RFC 4180: records end with CRLF; a field containing a comma, a double quote, CR or LF is
//! enclosed in double quotes, its quotes doubled. CSV holds one table, so the aggregates,
//! deltas and texts are left to the Markdown and HTML reporters. The rows cover only the
//! samples the report carries, which may be a subset of a run's, so means over them need
//! not equal the aggregates.

use adapterlab_report_common::{sample_score, score_names};
use adapterlab_sdk::Manifest;
use adapterlab_sdk::reporter::{Document, Report, Reporter, ReporterInfo};

/// The columns before the score columns.
pub const FIXED_COLUMNS: [&str; 3] = ["run_id", "run_name", "sample_id"];

/// One field, quoted when RFC 4180 requires it.
pub fn field(text: &str) -> String {
    if text.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

/// A score as a field: empty when missing or not finite.
fn value(score: Option<f64>) -> String {
    score
        .filter(|v| v.is_finite())
        .map_or_else(String::new, |v| v.to_string())
}

fn record(fields: impl IntoIterator<Item = String>) -> String {
    let mut line = fields.into_iter().collect::<Vec<_>>().join(",");
    line.push_str("\r\n");
    line
}

/// The whole file.
pub fn render(report: &Report) -> String {
    let scores = score_names(report);
    let header = FIXED_COLUMNS
        .iter()
        .map(|c| c.to_string())
        .chain(scores.iter().map(|s| field(s)));
    let mut out = record(header);
    for (index, run) in report.runs.iter().enumerate() {
        for sample in &report.samples {
            let has_prediction = sample.predictions.get(index).is_some_and(Option::is_some);
            let run_scores = sample.scores.get(index).map_or(&[][..], Vec::as_slice);
            if !has_prediction && run_scores.is_empty() {
                continue;
            }
            let fixed = [field(&run.id), field(&run.name), field(&sample.id)];
            let values = scores.iter().map(|s| value(sample_score(run_scores, s)));
            out.push_str(&record(fixed.into_iter().chain(values)));
        }
    }
    out
}

pub struct ReportCsv;

impl Reporter for ReportCsv {
    fn info() -> ReporterInfo {
        ReporterInfo {
            manifest: Manifest::new(
                "report-csv",
                env!("CARGO_PKG_VERSION"),
                "CSV of per-sample scores: one row per (run, sample); run_id, run_name, sample_id, one column per score",
            ),
            format: "csv".to_string(),
        }
    }

    fn render(report: Report) -> Result<Document, String> {
        Ok(Document {
            media_type: "text/csv".to_string(),
            extension: "csv".to_string(),
            content: render(&report),
        })
    }
}

adapterlab_sdk::export_reporter!(ReportCsv);

#[cfg(test)]
mod tests {
    use adapterlab_report_common::fixtures::{self, is_nan_free};

    use crate::{field, render};

    /// A minimal RFC 4180 reader, independent of the writer: the records and their fields.
    fn parse(text: &str) -> Vec<Vec<String>> {
        let mut records = Vec::new();
        let mut record = Vec::new();
        let mut current = String::new();
        let mut chars = text.chars().peekable();
        let mut quoted = false;
        while let Some(c) = chars.next() {
            match (quoted, c) {
                (true, '"') if chars.peek() == Some(&'"') => {
                    chars.next();
                    current.push('"');
                }
                (true, '"') => quoted = false,
                (true, c) => current.push(c),
                (false, '"') => {
                    assert!(current.is_empty(), "quote inside an unquoted field");
                    quoted = true;
                }
                (false, ',') => record.push(std::mem::take(&mut current)),
                (false, '\r') => {
                    assert_eq!(chars.next(), Some('\n'), "CR without LF");
                    record.push(std::mem::take(&mut current));
                    records.push(std::mem::take(&mut record));
                }
                (false, '\n') => panic!("bare LF outside quotes"),
                (false, c) => current.push(c),
            }
        }
        assert!(!quoted, "unterminated quoted field");
        assert!(
            current.is_empty() && record.is_empty(),
            "last record lacks CRLF"
        );
        records
    }

    #[test]
    fn fields_are_quoted_only_when_needed() {
        for (text, want) in [
            ("plain", "plain"),
            ("", ""),
            ("a,b", "\"a,b\""),
            ("say \"hi\"", "\"say \"\"hi\"\"\""),
            ("line\nbreak", "\"line\nbreak\""),
            ("cr\rhere", "\"cr\rhere\""),
            ("  spaced  ", "  spaced  "),
        ] {
            assert_eq!(field(text), want, "{text:?}");
        }
    }

    #[test]
    fn comparison_in_full() {
        let csv = render(&fixtures::comparison());
        assert_eq!(
            csv,
            "run_id,run_name,sample_id,rouge1,ter,bleu\r\n\
             run-base,base,s1,0.25,0.75,0.05\r\n\
             run-base,base,s2,0.3,,\r\n\
             run-lora,\"lora r=8, \"\"fast\"\"\",s1,0.5,0.6,0.125\r\n"
        );
        let records = parse(&csv);
        assert!(records.iter().all(|r| r.len() == 6));
        assert_eq!(records[3][1], "lora r=8, \"fast\"");
    }

    #[test]
    fn awkward_ids_and_names_round_trip() {
        let mut report = fixtures::single_run();
        report.runs[0].id = "id,with\r\nbreaks".to_string();
        report.runs[0].name = fixtures::AWKWARD.to_string();
        report.samples[0].id = "\"quoted\"".to_string();
        report.samples[0].scores[0][0].0 = "score, \"odd\"".to_string();
        report.runs[0].aggregates[0].score = "score, \"odd\"".to_string();
        let records = parse(&render(&report));
        assert_eq!(
            records[0],
            ["run_id", "run_name", "sample_id", "score, \"odd\""]
        );
        assert_eq!(
            records[1],
            ["id,with\r\nbreaks", fixtures::AWKWARD, "\"quoted\"", "0.4"]
        );
    }

    #[test]
    fn empty_report_is_a_header() {
        assert_eq!(render(&fixtures::empty()), "run_id,run_name,sample_id\r\n");
        let mut no_samples = fixtures::comparison();
        no_samples.samples.clear();
        assert_eq!(
            render(&no_samples),
            "run_id,run_name,sample_id,rouge1,ter,bleu\r\n"
        );
    }

    #[test]
    fn non_finite_scores_are_empty_fields() {
        let csv = render(&fixtures::non_finite());
        assert!(is_nan_free(&csv), "{csv}");
        assert_eq!(csv, "run_id,run_name,sample_id,rouge1,bleu\r\na,a,x,,\r\n");
    }

    #[test]
    fn numbers_round_trip_without_exponents() {
        let mut report = fixtures::single_run();
        for value in [1e-12, 123456789.125, 0.1 + 0.2, -0.0, 5.0] {
            report.samples[0].scores[0][0].1 = value;
            let records = parse(&render(&report));
            let text = &records[1][3];
            assert!(!text.contains(['e', 'E']), "{text}");
            assert_eq!(text.parse::<f64>(), Ok(value));
        }
    }
}
