//! `adapterlab report`: render a run or a comparison through a reporter plugin.

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::Args;

use crate::cli::Context;
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
    let store = ctx.store()?;
    let registry = ctx.registry()?;
    let reporter = registry.reporter_for(&args.format)?;
    let input = if args.runs.len() == 1 {
        let run = store.resolve_run(&args.runs[0])?;
        report::single(&run, &store.samples(&run.id)?)
    } else {
        report::comparison(&compare(&store, &args.runs)?)
    };
    let document = reporter.session(CallContext::default())?.render(&input)?;
    match &args.out {
        Some(path) => {
            std::fs::write(path, document.content.as_bytes())
                .with_context(|| format!("failed to write {}", path.display()))?;
            eprintln!(
                "wrote {} ({}, {} bytes)",
                path.display(),
                document.media_type,
                document.content.len()
            );
        }
        None => print!("{}", document.content),
    }
    Ok(())
}
