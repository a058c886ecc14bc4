//! Unit tests of the Markdown reporter.

use adapterlab_report_common::fixtures::{self, AWKWARD, is_nan_free};

use crate::markdown::{cell, fenced, inline};
use crate::render;

/// The number of table-syntax pipes in a line: those not escaped with a backslash.
fn unescaped_pipes(line: &str) -> usize {
    let mut count = 0;
    let mut escaped = false;
    for c in line.chars() {
        match c {
            '\\' if !escaped => escaped = true,
            '|' if !escaped => count += 1,
            _ => escaped = false,
        }
    }
    count
}

/// Every table's rows have as many cells as its header.
fn assert_tables_well_formed(doc: &str) {
    let mut width = None;
    for line in doc.lines() {
        if !line.starts_with('|') {
            width = None;
            continue;
        }
        let pipes = unescaped_pipes(line);
        assert_eq!(
            *width.get_or_insert(pipes),
            pipes,
            "ragged table row: {line}"
        );
    }
}

#[test]
fn inline_text_escapes_syntax_and_line_breaks() {
    assert_eq!(inline("a|b"), "a\\|b");
    assert_eq!(
        inline("*x* _y_ `z` [l](u) <b> &amp; $1 #"),
        "\\*x\\* \\_y\\_ \\`z\\` \\[l\\](u) \\<b\\> \\&amp; \\$1 \\#"
    );
    assert_eq!(inline("back\\slash"), "back\\\\slash");
    assert_eq!(inline("one\ntwo\r\nthree\rfour"), "one two three four");
    assert_eq!(inline("plain text, 1-5."), "plain text, 1-5.");
}

#[test]
fn cells_keep_line_breaks_as_br() {
    assert_eq!(cell("a | b\nc\r\nd"), "a \\| b<br>c<br>d");
    assert_eq!(cell("<br>"), "\\<br\\>");
}

#[test]
fn fences_outgrow_backticks_inside() {
    assert_eq!(fenced("plain"), "```text\nplain\n```\n");
    assert_eq!(fenced("a ``` b\n"), "````text\na ``` b\n````\n");
    assert_eq!(fenced("`````"), "``````text\n`````\n``````\n");
    assert_eq!(fenced("x\r\ny\rz"), "```text\nx\ny\nz\n```\n");
    assert_eq!(fenced(""), "```text\n\n```\n");
}

#[test]
fn single_run_in_full() {
    let want = "\
# One run

## Runs

### only

Run run-1 · eval · created 2026-11-26T12:00:00Z

*Facts of run only*

| Key | Value |
| --- | --- |
| model | SmolLM2-135M-Instruct |
| dataset | dialogsum \\| dev |

*Scores of run only: mean and 95% bootstrap interval*

| Score | Mean | 95% interval | Better when |
| --- | ---: | ---: | --- |
| rouge1 | 0.4000 | [0.3500, 0.4500] | higher |

## Samples

### Sample a

**Dialogue**

```text
A: hi
```

**Reference**

```text
A greets.
```

*Sample a: each run's summary and scores*

| Run | Summary | rouge1 |
| --- | --- | ---: |
| only | Hi. | 0.4000 |
";
    assert_eq!(render(&fixtures::single_run()), want);
}

#[test]
fn comparison_marks_better_and_worse() {
    let doc = render(&fixtures::comparison());
    assert!(doc.contains("## Comparison\n"));
    assert!(doc.contains(
        "| Score | Baseline: base | Candidate: lora r=8, \"fast\" | Difference | 95% interval | Paired samples | Better when | Verdict |"
    ));
    assert!(doc.contains(
        "| rouge1 | 0.3000 | 0.3500 | +0.0500 | [+0.0200, +0.0800] | 500 | higher | ✓ better |"
    ));
    assert!(doc.contains(
        "| ter | 0.7000 | 0.8000 | +0.1000 | [+0.0400, +0.1600] | 500 | lower | ✗ worse |"
    ));
    assert!(doc.contains("| bleu | 0.1000 | 0.1100 | +0.0100 | [-0.0100, +0.0300] | 500 | higher | – not significant |"));
    assert_tables_well_formed(&doc);
}

#[test]
fn user_text_cannot_break_out() {
    let doc = render(&fixtures::comparison());
    assert!(doc.starts_with("# Base vs LoRA \\| \\<dialogsum\\>\n"));
    // Outside code blocks, no raw HTML and no unescaped table pipes from user text.
    let mut in_code = false;
    for line in doc.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if !in_code {
            assert!(!line.contains("<script>"), "raw HTML: {line}");
        }
    }
    assert!(!in_code, "unclosed code block");
    assert_tables_well_formed(&doc);
    // The awkward summary sits in one cell, its line break as <br>.
    assert!(doc.contains(&format!(
        "| lora r=8, \"fast\" | {} | 0.5000 | 0.6000 | 0.1250 |",
        cell(AWKWARD)
    )));
    assert!(cell(AWKWARD).contains("<br>"));
    // The dialogue is verbatim inside a fence longer than its ``` run.
    assert!(doc.contains("````text\n#P1#: a | b, \"quoted\" <script>"));
}

#[test]
fn runs_without_a_sample_are_left_out_of_its_table() {
    let doc = render(&fixtures::comparison());
    let s2 = &doc[doc.find("### Sample s2").expect("sample s2")..];
    assert!(s2.contains("| base | only base | 0.3000 |"));
    assert!(!s2.contains("| lora"));
    // No source: no dialogue heading.
    assert!(!s2.contains("**Dialogue**"));
}

#[test]
fn empty_report() {
    assert_eq!(
        render(&fixtures::empty()),
        "# Evaluation report\n\n## Runs\n\nThis report has no runs.\n"
    );
}

#[test]
fn non_finite_numbers_are_not_written() {
    let doc = render(&fixtures::non_finite());
    assert!(is_nan_free(&doc), "{doc}");
    assert!(doc.contains("| rouge1 | n/a | [n/a, n/a] | higher |"));
    assert!(
        doc.contains("| rouge1 | n/a | n/a | n/a | [n/a, n/a] | 0 | higher | – not significant |")
    );
    assert_tables_well_formed(&doc);
}
