//! `report-md`: renders a report as GitHub-flavoured Markdown (format `md`): each run's facts
//! and scores, the comparison of the candidate with the baseline, and the samples where the
//! runs disagree most.
//!
//! All user text is escaped: in running text and table cells every character Markdown could
//! read as syntax (`|`, `*`, `_`, `` ` ``, `[`, `<`, `&`, `$`…) gets a backslash and line
//! breaks become spaces, or `<br>` in table cells; long texts (dialogues, references) go in
//! fenced code blocks whose fence is longer than any run of backticks inside.

pub mod markdown;

use adapterlab_report_common::{
    Table, aggregates_table, comparison_table, metadata_table, sample_table,
};
use adapterlab_sdk::Manifest;
use adapterlab_sdk::reporter::{Document, Report, Reporter, ReporterInfo};

use crate::markdown::{fenced, inline, table};

/// The whole document.
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    let title = if report.title.trim().is_empty() {
        "Evaluation report"
    } else {
        &report.title
    };
    out.push_str(&format!("# {}\n\n", inline(title)));

    out.push_str("## Runs\n\n");
    if report.runs.is_empty() {
        out.push_str("This report has no runs.\n\n");
    }
    for run in &report.runs {
        out.push_str(&format!("### {}\n\n", inline(&run.name)));
        out.push_str(&format!(
            "Run {} · {} · created {}\n\n",
            inline(&run.id),
            inline(&run.kind),
            inline(&run.created)
        ));
        if !run.metadata.is_empty() {
            push_table(&mut out, &metadata_table(run));
        }
        if run.aggregates.is_empty() {
            out.push_str("No scores.\n\n");
        } else {
            push_table(&mut out, &aggregates_table(run));
        }
    }

    if let Some(comparison) = comparison_table(report) {
        out.push_str("## Comparison\n\n");
        push_table(&mut out, &comparison);
        out.push_str(
            "✓ better and ✗ worse mark differences whose 95% interval excludes zero, read in \
             each score's direction.\n\n",
        );
    }

    if !report.samples.is_empty() {
        out.push_str("## Samples\n\n");
    }
    for sample in &report.samples {
        out.push_str(&format!("### Sample {}\n\n", inline(&sample.id)));
        if let Some(source) = &sample.source {
            out.push_str(&format!("**Dialogue**\n\n{}\n", fenced(source)));
        }
        for (k, reference) in sample.references.iter().enumerate() {
            out.push_str(&format!(
                "**{}**\n\n{}\n",
                adapterlab_report_common::reference_heading(k, sample.references.len()),
                fenced(reference)
            ));
        }
        push_table(&mut out, &sample_table(report, sample));
    }
    // One trailing newline, as text files end.
    let end = out.trim_end().len();
    out.truncate(end);
    out.push('\n');
    out
}

fn push_table(out: &mut String, t: &Table) {
    out.push_str(&table(t));
    out.push('\n');
}

pub struct ReportMd;

impl Reporter for ReportMd {
    fn info() -> ReporterInfo {
        ReporterInfo {
            manifest: Manifest::new(
                "report-md",
                env!("CARGO_PKG_VERSION"),
                "Markdown report: scores per run, the comparison, disputed samples",
            ),
            format: "md".to_string(),
        }
    }

    fn render(report: Report) -> Result<Document, String> {
        Ok(Document {
            media_type: "text/markdown".to_string(),
            extension: "md".to_string(),
            content: render(&report),
        })
    }
}

adapterlab_sdk::export_reporter!(ReportMd);

#[cfg(test)]
mod tests;
