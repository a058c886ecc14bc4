//! `report-html`: renders a report as one self-contained HTML page (format `html`): each
//! run's facts and scores, bar charts of each score's mean per run with 95% error bars, the
//! comparison table with a forest plot of the differences, and the samples where the runs
//! disagree most.
//!
//! The page fetches nothing: CSS is inline, charts are inline SVG, and a Content Security
//! Policy forbids every load. All user text is HTML-escaped. For accessibility, tables have
//! captions and `scope`d headers, charts are `role="img"` with a title and a description
//! that lists their numbers, and verdicts are words, not colours alone.

pub mod html;
pub mod svg;

use adapterlab_report_common::{
    aggregate, aggregates_table, comparison_table, direction, metadata_table, sample_table,
    score_names,
};
use adapterlab_sdk::Manifest;
use adapterlab_sdk::reporter::{Document, Report, Reporter, ReporterInfo};

use crate::html::{escape, table};
use crate::svg::{Bar, delta_chart, means_chart, run_colour};

const CSS: &str = "\
:root{color-scheme:light dark;--fg:#1f2328;--bg:#fff;--muted:#59636e;--line:#d1d9e0;--head:#f6f8fa;\
--better:#0072B2;--worse:#D55E00;--ns:#6e7781}\
@media (prefers-color-scheme:dark){:root{--fg:#e6edf3;--bg:#0d1117;--muted:#9198a1;--line:#3d444d;\
--head:#151b23;--better:#56B4E9;--worse:#E69F00;--ns:#9198a1}}\
body{margin:0;background:var(--bg);color:var(--fg);font:15px/1.5 system-ui,-apple-system,\"Segoe UI\",sans-serif}\
main{max-width:1100px;margin:0 auto;padding:1.5rem}\
h1{font-size:1.7rem}h2{border-bottom:1px solid var(--line);padding-bottom:.3rem;margin-top:2.5rem}\
nav ul{list-style:none;padding:0;display:flex;gap:1.2rem}a{color:var(--better)}\
.meta,.note,.empty,figcaption{color:var(--muted)}\
.table{overflow-x:auto;margin:1rem 0}table{border-collapse:collapse}\
caption{text-align:left;font-weight:600;padding:.3rem 0}\
th,td{border:1px solid var(--line);padding:.3rem .6rem;vertical-align:top}thead th{background:var(--head)}\
th[scope=row]{text-align:left;font-weight:600}.num{text-align:right;font-variant-numeric:tabular-nums}td.num{white-space:nowrap}\
td.text{white-space:pre-wrap;overflow-wrap:anywhere;max-width:40rem}\
.verdict{white-space:nowrap;font-weight:600}.verdict.better{color:var(--better)}.verdict.worse{color:var(--worse)}\
.verdict.not-significant{color:var(--ns)}\
pre{white-space:pre-wrap;overflow-wrap:anywhere;background:var(--head);border:1px solid var(--line);padding:.6rem;\
max-height:24rem;overflow:auto}\
.legend{list-style:none;padding:0;display:flex;flex-wrap:wrap;gap:1rem}.swatch{display:inline-block;width:.9em;\
height:.9em;margin-right:.3em;vertical-align:-.1em;border:1px solid var(--line)}\
.charts{display:flex;flex-wrap:wrap;gap:1.5rem}figure{margin:0}\
svg.chart{overflow:visible;font-size:11px}svg text{fill:var(--fg)}svg .axis,svg .baseline{stroke:var(--fg)}\
svg .error{stroke:var(--fg);stroke-width:1.5;fill:none}svg .zero{stroke:var(--muted);stroke-dasharray:4 3}\
svg .interval{stroke-width:3}svg .better .interval,svg .better .point{stroke:var(--better);fill:var(--better)}\
svg .worse .interval,svg .worse .point{stroke:var(--worse);fill:var(--worse)}\
svg .not-significant .interval,svg .not-significant .point{stroke:var(--ns);fill:var(--ns)}\
svg .na{fill:var(--muted)}article{margin-bottom:2rem}";

/// The whole page.
pub fn render(report: &Report) -> String {
    let title = if report.title.trim().is_empty() {
        "Evaluation report"
    } else {
        &report.title
    };
    let mut out = format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">\n\
         <title>{title}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n<h1>{title}</h1>\n",
        title = escape(title)
    );
    let comparison = comparison_table(report);
    out.push_str("<nav aria-label=\"Sections\"><ul><li><a href=\"#runs\">Runs</a></li>");
    if comparison.is_some() {
        out.push_str("<li><a href=\"#comparison\">Comparison</a></li>");
    }
    if !report.samples.is_empty() {
        out.push_str("<li><a href=\"#samples\">Samples</a></li>");
    }
    out.push_str("</ul></nav>\n");

    push_runs(&mut out, report);
    if let Some(comparison) = comparison {
        out.push_str("<section id=\"comparison\" aria-labelledby=\"comparison-heading\">\n");
        out.push_str("<h2 id=\"comparison-heading\">Comparison</h2>\n");
        out.push_str(&table(&comparison));
        out.push_str(
            "<p class=\"note\">✓ better and ✗ worse mark differences whose 95% interval excludes \
             zero, read in each score's direction.</p>\n",
        );
        out.push_str("<figure>\n");
        out.push_str(&delta_chart("delta-chart", &report.deltas));
        out.push_str(
            "<figcaption>Candidate minus baseline: dot at the mean difference, line across the \
             95% interval, dashed line at zero. Each row has its own scale.</figcaption>\n</figure>\n",
        );
        out.push_str("</section>\n");
    }
    push_samples(&mut out, report);
    out.push_str(&format!(
        "<footer class=\"note\"><p>Made by adapterlab's report-html {}.</p></footer>\n</main>\n</body>\n</html>\n",
        env!("CARGO_PKG_VERSION")
    ));
    out
}

fn push_runs(out: &mut String, report: &Report) {
    out.push_str("<section id=\"runs\" aria-labelledby=\"runs-heading\">\n<h2 id=\"runs-heading\">Runs</h2>\n");
    if report.runs.is_empty() {
        out.push_str("<p class=\"empty\">This report has no runs.</p>\n</section>\n");
        return;
    }
    // Scores some run has an aggregate of; those get a chart.
    let charted: Vec<String> = score_names(report)
        .into_iter()
        .filter(|s| report.runs.iter().any(|r| aggregate(r, s).is_some()))
        .collect();
    if !charted.is_empty() {
        out.push_str("<h3>Means with 95% intervals</h3>\n<ul class=\"legend\" aria-label=\"Runs, as numbered in the charts\">");
        for (i, run) in report.runs.iter().enumerate() {
            out.push_str(&format!(
                "<li><span class=\"swatch\" style=\"background:{}\" aria-hidden=\"true\"></span>{} {}</li>",
                run_colour(i),
                i + 1,
                escape(&run.name)
            ));
        }
        out.push_str("</ul>\n<div class=\"charts\">\n");
        for (chart, score) in charted.iter().enumerate() {
            let bars: Vec<Bar> = report
                .runs
                .iter()
                .enumerate()
                .map(|(i, run)| Bar {
                    run: i + 1,
                    name: &run.name,
                    estimate: aggregate(run, score).map(|a| &a.estimate),
                })
                .collect();
            let higher_is_better = report
                .runs
                .iter()
                .find_map(|r| aggregate(r, score))
                .is_none_or(|a| a.higher_is_better);
            out.push_str("<figure>\n");
            out.push_str(&means_chart(
                &format!("means-{chart}"),
                score,
                higher_is_better,
                &bars,
            ));
            out.push_str(&format!(
                "<figcaption>{} ({} is better)</figcaption>\n</figure>\n",
                escape(score),
                direction(higher_is_better)
            ));
        }
        out.push_str("</div>\n");
    }
    for (i, run) in report.runs.iter().enumerate() {
        out.push_str(&format!(
            "<article aria-labelledby=\"run-{i}\">\n<h3 id=\"run-{i}\">{n}. {name}</h3>\n\
             <p class=\"meta\">Run <code>{id}</code> · {kind} · created {created}</p>\n",
            n = i + 1,
            name = escape(&run.name),
            id = escape(&run.id),
            kind = escape(&run.kind),
            created = escape(&run.created),
        ));
        if !run.metadata.is_empty() {
            out.push_str(&table(&metadata_table(run)));
        }
        out.push_str(&table(&aggregates_table(run)));
        out.push_str("</article>\n");
    }
    out.push_str("</section>\n");
}

/// Each sample's texts and the runs' summaries and scores. A `<pre>` opens with a line break
/// because HTML drops one right after `<pre>`: a text that starts with its own keeps it.
fn push_samples(out: &mut String, report: &Report) {
    if report.samples.is_empty() {
        return;
    }
    out.push_str("<section id=\"samples\" aria-labelledby=\"samples-heading\">\n<h2 id=\"samples-heading\">Samples</h2>\n");
    for (i, sample) in report.samples.iter().enumerate() {
        out.push_str(&format!(
            "<article aria-labelledby=\"sample-{i}\">\n<h3 id=\"sample-{i}\">Sample {}</h3>\n",
            escape(&sample.id)
        ));
        if let Some(source) = &sample.source {
            out.push_str(&format!(
                "<h4>Dialogue</h4>\n<pre>\n{}</pre>\n",
                escape(source)
            ));
        }
        for (k, reference) in sample.references.iter().enumerate() {
            out.push_str(&format!(
                "<h4>{}</h4>\n<pre>\n{}</pre>\n",
                adapterlab_report_common::reference_heading(k, sample.references.len()),
                escape(reference)
            ));
        }
        out.push_str(&table(&sample_table(report, sample)));
        out.push_str("</article>\n");
    }
    out.push_str("</section>\n");
}

pub struct ReportHtml;

impl Reporter for ReportHtml {
    fn info() -> ReporterInfo {
        ReporterInfo {
            manifest: Manifest::new(
                "report-html",
                env!("CARGO_PKG_VERSION"),
                "Self-contained HTML report with SVG charts: scores per run, the comparison, disputed samples",
            ),
            format: "html".to_string(),
        }
    }

    fn render(report: Report) -> Result<Document, String> {
        Ok(Document {
            media_type: "text/html".to_string(),
            extension: "html".to_string(),
            content: render(&report),
        })
    }
}

adapterlab_sdk::export_reporter!(ReportHtml);

#[cfg(test)]
mod tests;
