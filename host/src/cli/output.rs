//! How the CLI talks to people: coloured when stderr/stdout is a terminal, plain otherwise.

use owo_colors::{OwoColorize, Stream};

/// Print an error with its whole cause chain, one cause a line.
pub fn print_error(err: &anyhow::Error) {
    eprintln!(
        "{} {}",
        "error:".if_supports_color(Stream::Stderr, |t| t.red().bold().to_string()),
        err
    );
    for cause in err.chain().skip(1) {
        eprintln!(
            "  {} {}",
            "caused by:".if_supports_color(Stream::Stderr, |t| t.yellow().to_string()),
            cause
        );
    }
}

/// A header line for human output.
pub fn heading(text: &str) -> String {
    text.if_supports_color(Stream::Stdout, |t| t.bold().to_string())
        .to_string()
}

/// Render rows as an aligned plain-text table.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<String>, out: &mut String| {
        let padded: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = widths.get(i).copied().unwrap_or(0)))
            .collect();
        out.push_str(padded.join("  ").trim_end());
        out.push('\n');
    };
    let mut head = String::new();
    line(header.iter().map(|h| h.to_string()).collect(), &mut head);
    out.push_str(&heading(head.trim_end()));
    out.push('\n');
    for row in rows {
        line(row.clone(), &mut out);
    }
    out
}

/// A progress bar on stderr; hidden when stderr is not a terminal (scripts, tests).
pub fn progress_bar(total: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(total),
        indicatif::ProgressDrawTarget::stderr(),
    );
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}
