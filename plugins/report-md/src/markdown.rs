//! Markdown syntax: escaping user text, fenced code blocks and tables.

use adapterlab_report_common::{Cell, Table};

/// Characters escaped with a backslash wherever user text goes. CommonMark lets any ASCII
/// punctuation be escaped; these are the ones that start syntax mid-line in GitHub-flavoured
/// Markdown (emphasis, code, links, HTML, entities, tables, strikethrough, math, closing `#`s
/// of headings). Characters that matter only at the start of a line (`-`, `+`, `1.`, `>`) are
/// safe because user text never starts a line here, except in code blocks.
const SPECIAL: &[char] = &[
    '\\', '`', '*', '_', '[', ']', '<', '>', '|', '~', '&', '$', '#', '!',
];

fn escape(text: &str, line_break: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {
                // `\r\n` is one break.
                if chars.peek() == Some(&'\n') {
                    chars.next();
                }
                out.push_str(line_break);
            }
            '\n' => out.push_str(line_break),
            c if SPECIAL.contains(&c) => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out
}

/// User text for running text and headings: syntax escaped, line breaks as spaces.
pub fn inline(text: &str) -> String {
    escape(text, " ")
}

/// User text for a table cell: syntax escaped, line breaks as `<br>`.
pub fn cell(text: &str) -> String {
    escape(text, "<br>")
}

/// `text` as a fenced code block, shown verbatim. The fence is one backtick longer than the
/// longest run of backticks in the text, so nothing inside can close it.
pub fn fenced(text: &str) -> String {
    let longest = text.split(|c| c != '`').map(str::len).max().unwrap_or(0);
    let fence = "`".repeat((longest + 1).max(3));
    let body = text.replace("\r\n", "\n").replace('\r', "\n");
    let body = body.trim_end_matches('\n');
    format!("{fence}text\n{body}\n{fence}\n")
}

/// A table, its caption above it in italics. An empty table shows a line saying so.
pub fn table(table: &Table) -> String {
    let mut out = format!("*{}*\n\n", inline(&table.caption));
    if table.rows.is_empty() {
        out.push_str("None.\n");
        return out;
    }
    let titles: Vec<String> = table.columns.iter().map(|c| cell(&c.title)).collect();
    out.push_str(&format!("| {} |\n", titles.join(" | ")));
    let rules: Vec<&str> = table
        .columns
        .iter()
        .map(|c| if c.numeric { "---:" } else { "---" })
        .collect();
    out.push_str(&format!("| {} |\n", rules.join(" | ")));
    for row in &table.rows {
        // A row of the wrong width would shift cells under the wrong headers; pad or cut.
        let cells: Vec<String> = (0..table.columns.len())
            .map(|i| match row.get(i) {
                None => String::new(),
                Some(Cell::Text(text)) => cell(text),
                // Written by report-common: numbers, intervals, verdict labels; no syntax.
                Some(other) => other.as_str().to_string(),
            })
            .collect();
        out.push_str(&format!("| {} |\n", cells.join(" | ")));
    }
    out
}
