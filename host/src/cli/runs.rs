//! `adapterlab runs list|show|compare`.

use anyhow::Result;
use clap::Subcommand;

use crate::cli::Context;
use crate::cli::output::table;
use crate::eval::compare::compare;

#[derive(Debug, Subcommand)]
pub enum RunsCommand {
    /// List runs, newest first.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one run: metadata, aggregates and (with --samples) every sample.
    Show {
        /// Run id (a unique prefix is enough) or run name.
        id: String,
        #[arg(long)]
        json: bool,
        /// Include every sample's scores.
        #[arg(long)]
        samples: bool,
    },
    /// Compare runs: samples paired by id, each score's mean difference against the first run
    /// with a paired-bootstrap 95% interval.
    Compare {
        /// Two or more run ids or names; the first is the baseline.
        #[arg(num_args = 2.., required = true)]
        ids: Vec<String>,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: RunsCommand, ctx: &Context) -> Result<()> {
    let store = ctx.store()?;
    match cmd {
        RunsCommand::List { json } => {
            let runs = store.list_runs()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&runs)?);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = runs
                .iter()
                .map(|r| {
                    let key = r
                        .aggregates
                        .iter()
                        .take(4)
                        .map(|(k, e)| format!("{k}={:.3}", e.mean))
                        .collect::<Vec<_>>()
                        .join(" ");
                    vec![
                        r.id[..12.min(r.id.len())].to_string(),
                        r.name.clone(),
                        r.kind.as_str().into(),
                        r.status.as_str().into(),
                        r.created.get(..19).unwrap_or(&r.created).replace('T', " "),
                        format!("{}/{}", r.progress.done, r.progress.total),
                        key,
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &[
                        "ID",
                        "NAME",
                        "KIND",
                        "STATUS",
                        "CREATED",
                        "PROGRESS",
                        "KEY SCORES"
                    ],
                    &rows
                )
            );
            Ok(())
        }
        RunsCommand::Show { id, json, samples } => {
            let run = store.resolve_run(&id)?;
            let sample_records = store.samples(&run.id)?;
            if json {
                let mut doc = serde_json::to_value(&run)?;
                if samples {
                    doc["samples"] = serde_json::to_value(&sample_records)?;
                }
                println!("{}", serde_json::to_string_pretty(&doc)?);
                return Ok(());
            }
            for (k, v) in &run.metadata {
                println!("{k}: {v}");
            }
            if let Some(e) = &run.error {
                println!("error: {e}");
            }
            crate::cli::eval::print_summary(&run, &sample_records);
            if samples {
                for s in &sample_records {
                    let scores: Vec<String> = s
                        .scores
                        .iter()
                        .map(|(k, v)| format!("{k}={v:.4}"))
                        .collect();
                    println!("{}\t{}", s.id, scores.join(" "));
                    for (p, e) in &s.errors {
                        println!("\t{p} error: {e}");
                    }
                }
            }
            Ok(())
        }
        RunsCommand::Compare { ids, json } => {
            let c = compare(&store, &ids)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&c)?);
                return Ok(());
            }
            println!("baseline: {} ({})", c.runs[0].name, c.runs[0].id);
            let rows: Vec<Vec<String>> = c
                .deltas
                .iter()
                .map(|d| {
                    let name = c
                        .runs
                        .iter()
                        .find(|r| r.id == d.run)
                        .map(|r| r.name.clone())
                        .unwrap_or_default();
                    let verdict = match d.verdict {
                        Some(true) => "better",
                        Some(false) => "worse",
                        None => "no significant difference",
                    };
                    vec![
                        name,
                        d.score.clone(),
                        format!("{:+.4}", d.difference.mean),
                        format!("[{:+.4}, {:+.4}]", d.difference.low, d.difference.high),
                        d.paired.to_string(),
                        verdict.into(),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &[
                        "RUN",
                        "SCORE",
                        "DELTA",
                        "95% CI (PAIRED)",
                        "PAIRS",
                        "VERDICT"
                    ],
                    &rows
                )
            );
            Ok(())
        }
    }
}
