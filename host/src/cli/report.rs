//! `adapterlab report`: render a run or a comparison through a reporter plugin.

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::Args;

use crate::cli::Context;
use crate::cli::remote::{self, Source};
use crate::eval::{compare::compare, report};
use crate::plugin::CallContext;

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// One run, or several to compare (the first is the baseline), as ids or names,
    /// space- or comma-separated.
    #[arg(required = true, value_delimiter = ',', value_name = "RUN_OR_IDS")]
    pub runs: Vec<String>,
    /// The format, i.e. a reporter plugin's format name: md, html, csv, or an installed one.
    #[arg(long, default_value = "md")]
    pub format: String,
    /// Where to write the document (default: standard output).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(args: ReportArgs, ctx: &Context) -> Result<()> {
    let (media_type, content) = match remote::source(ctx)? {
        Source::Store(store) => {
            let registry = ctx.registry()?;
            let reporter = registry.reporter_for(&args.format)?;
            let input = if args.runs.len() == 1 {
                let run = store.resolve_run(&args.runs[0])?;
                report::single(&run, &store.samples(&run.id)?)
            } else {
                report::comparison(&compare(&store, &args.runs)?)
            };
            let document = reporter.session(CallContext::default())?.render(&input)?;
            (document.media_type, document.content)
        }
        // The server renders it with its reporter plugins (GET /api/report).
        Source::Server(server) => {
            let runs = args.runs.join(",");
            let response = server.get(
                &["api", "report"],
                &[("runs", runs.as_str()), ("format", args.format.as_str())],
            )?;
            let media_type = response
                .headers()
                .get(reqwest::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("application/octet-stream")
                .to_string();
            let content = response
                .text()
                .with_context(|| format!("failed to read the report from {}", server.url))?;
            (media_type, content)
        }
    };
    match &args.out {
        Some(path) => {
            std::fs::write(path, content.as_bytes())
                .with_context(|| format!("failed to write {}", path.display()))?;
            eprintln!(
                "wrote {} ({}, {} bytes)",
                path.display(),
                media_type,
                content.len()
            );
        }
        None => print!("{content}"),
    }
    Ok(())
}
