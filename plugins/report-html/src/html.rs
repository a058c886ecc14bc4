//! HTML syntax: escaping user text and writing accessible tables.

use adapterlab_report_common::{Cell, Table};

/// `text` safe in element content and in quoted attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            // NUL is a parse error in HTML; the parser would replace it anyway.
            '\0' => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

/// A table with a caption, column headers and row headers (the first cell of each row).
/// An empty table becomes a sentence saying so.
pub fn table(table: &Table) -> String {
    if table.rows.is_empty() {
        return format!("<p class=\"empty\">{}: none.</p>\n", escape(&table.caption));
    }
    let mut out = format!(
        "<div class=\"table\"><table>\n<caption>{}</caption>\n<thead><tr>",
        escape(&table.caption)
    );
    for column in &table.columns {
        let class = if column.numeric { " class=\"num\"" } else { "" };
        out.push_str(&format!(
            "<th scope=\"col\"{class}>{}</th>",
            escape(&column.title)
        ));
    }
    out.push_str("</tr></thead>\n<tbody>\n");
    for row in &table.rows {
        out.push_str("<tr>");
        // A row of the wrong width would shift cells under the wrong headers; pad or cut.
        for (i, column) in table.columns.iter().enumerate() {
            let (tag, scope) = if i == 0 {
                ("th", " scope=\"row\"")
            } else {
                ("td", "")
            };
            let class = match row.get(i) {
                Some(Cell::Verdict(v)) => format!(" class=\"verdict {}\"", v.key()),
                _ if column.numeric => " class=\"num\"".to_string(),
                _ => " class=\"text\"".to_string(),
            };
            let text = row.get(i).map_or("", Cell::as_str);
            out.push_str(&format!("<{tag}{scope}{class}>{}</{tag}>", escape(text)));
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</tbody>\n</table></div>\n");
    out
}
