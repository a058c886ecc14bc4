//! Unit tests of the HTML reporter.

use adapterlab_report_common::fixtures::{self, is_nan_free};

use crate::html::escape;
use crate::render;

/// Checks that every element is closed in order, which also shows that no user text opened
/// a tag. Void elements and self-closed SVG shapes close themselves.
fn assert_balanced(doc: &str) {
    let mut open: Vec<String> = Vec::new();
    let mut rest = doc;
    while let Some(start) = rest.find('<') {
        let after = &rest[start + 1..];
        let end = after.find('>').expect("unterminated tag");
        let tag = &after[..end];
        rest = &after[end + 1..];
        if tag.starts_with('!') {
            continue;
        }
        if let Some(name) = tag.strip_prefix('/') {
            assert_eq!(open.pop().as_deref(), Some(name), "mismatched </{name}>");
            continue;
        }
        let name: String = tag
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect();
        assert!(!name.is_empty(), "stray '<' before {tag:?}");
        if !tag.ends_with('/') && name != "meta" && name != "br" {
            open.push(name);
        }
    }
    assert!(open.is_empty(), "unclosed: {open:?}");
}

fn assert_self_contained(doc: &str) {
    for banned in [
        "<script",
        "<link",
        "<img",
        "<iframe",
        "src=",
        "url(",
        "@import",
        "xlink:href",
    ] {
        assert!(!doc.contains(banned), "{banned} in the page");
    }
    for (i, _) in doc.match_indices("href=\"") {
        assert!(doc[i + 6..].starts_with('#'), "a link out of the page");
    }
    assert!(doc.contains("Content-Security-Policy\" content=\"default-src 'none'"));
}

/// Every id is unique, and every aria-labelledby names ids that exist.
fn assert_ids_resolve(doc: &str) {
    let attribute = |name: &str| -> Vec<String> {
        let needle = format!(" {name}=\"");
        doc.match_indices(&needle)
            .map(|(i, _)| {
                let value = &doc[i + needle.len()..];
                value[..value.find('"').unwrap_or(0)].to_string()
            })
            .collect()
    };
    let ids = attribute("id");
    for (i, id) in ids.iter().enumerate() {
        assert!(!ids[..i].contains(id), "duplicate id {id}");
    }
    for labels in attribute("aria-labelledby") {
        for id in labels.split(' ') {
            assert!(
                ids.iter().any(|i| i == id),
                "aria-labelledby names missing id {id}"
            );
        }
    }
}

fn assert_well_formed(doc: &str) {
    assert!(doc.starts_with("<!DOCTYPE html>\n<html lang=\"en\">"));
    assert!(doc.ends_with("</html>\n"));
    assert_balanced(doc);
    assert_self_contained(doc);
    assert_ids_resolve(doc);
    assert!(is_nan_free(doc));
}

#[test]
fn escaping() {
    assert_eq!(
        escape("<a href='x'>\"&\"</a>"),
        "&lt;a href=&#39;x&#39;&gt;&quot;&amp;&quot;&lt;/a&gt;"
    );
    assert_eq!(escape("plain, text\n"), "plain, text\n");
    assert_eq!(escape("a\0b"), "a\u{FFFD}b");
}

#[test]
fn comparison_page() {
    let doc = render(&fixtures::comparison());
    assert_well_formed(&doc);
    assert!(doc.contains("<title>Base vs LoRA | &lt;dialogsum&gt;</title>"));
    assert!(!doc.contains("<script>alert"));
    assert!(doc.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;"));
    // Three charts of means, one forest plot, each an image with a title and description.
    assert_eq!(doc.matches("<svg").count(), 4);
    assert_eq!(doc.matches("role=\"img\"").count(), 4);
    assert_eq!(doc.matches("<desc id=").count(), 4);
    assert!(doc.contains("<td class=\"verdict better\">✓ better</td>"));
    assert!(doc.contains("<td class=\"verdict worse\">✗ worse</td>"));
    assert!(doc.contains("<td class=\"verdict not-significant\">– not significant</td>"));
    assert!(
        doc.contains("<th scope=\"col\" class=\"num\">Candidate: lora r=8, &quot;fast&quot;</th>")
    );
    assert!(
        doc.contains("<th scope=\"row\" class=\"text\">rouge1</th><td class=\"num\">0.3000</td>")
    );
    // Every table has a caption.
    assert_eq!(
        doc.matches("<table>").count(),
        doc.matches("<table>\n<caption>").count()
    );
    assert!(doc.contains("<nav aria-label=\"Sections\"><ul><li><a href=\"#runs\">Runs</a></li><li><a href=\"#comparison\">"));
    // The sample missing from the candidate has one row.
    let s2 = &doc[doc.find("Sample s2").expect("sample s2")..];
    assert_eq!(s2.matches("<tr>").count(), 2);
}

#[test]
fn single_run_has_no_comparison() {
    let doc = render(&fixtures::single_run());
    assert_well_formed(&doc);
    assert!(!doc.contains("id=\"comparison\""));
    assert!(!doc.contains("#comparison"));
    assert_eq!(doc.matches("<svg").count(), 1);
    assert!(doc.contains("<pre>\nA: hi</pre>"));
}

#[test]
fn empty_report() {
    let doc = render(&fixtures::empty());
    assert_well_formed(&doc);
    assert!(doc.contains("<h1>Evaluation report</h1>"));
    assert!(doc.contains("This report has no runs."));
    assert!(!doc.contains("<svg"));
    assert!(!doc.contains("id=\"samples\""));
}

#[test]
fn non_finite_numbers_are_not_written() {
    let doc = render(&fixtures::non_finite());
    assert_well_formed(&doc);
    assert!(doc.contains("<td class=\"num\">n/a</td>"));
}

#[test]
fn runs_without_aggregates_get_no_chart_but_a_note() {
    let mut report = fixtures::single_run();
    report.runs[0].aggregates.clear();
    report.samples.clear();
    let doc = render(&report);
    assert_well_formed(&doc);
    assert!(!doc.contains("<svg"));
    assert!(doc.contains(
        "<p class=\"empty\">Scores of run only: mean and 95% bootstrap interval: none.</p>"
    ));
}
