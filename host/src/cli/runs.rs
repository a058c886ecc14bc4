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
            let short = unique_prefixes(runs.iter().map(|r| r.id.as_str()), 12);
            let rows: Vec<Vec<String>> = runs
                .iter()
                .zip(short)
                .map(|(r, short)| {
                    let key = r
                        .aggregates
                        .iter()
                        .take(4)
                        .map(|(k, e)| format!("{k}={:.3}", e.mean))
                        .collect::<Vec<_>>()
                        .join(" ");
                    vec![
                        short,
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

/// The shortest prefix of each id, at least `min` characters, that no other id shares.
/// Run ids are UUIDv7 whose first 12 hex digits are a millisecond clock, so runs
/// started together share long prefixes; a fixed cut would print ambiguous ids.
fn unique_prefixes<'a>(ids: impl Iterator<Item = &'a str>, min: usize) -> Vec<String> {
    let ids: Vec<&str> = ids.collect();
    let mut sorted: Vec<&str> = ids.clone();
    sorted.sort_unstable();
    let common = |a: &str, b: &str| a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
    ids.iter()
        .map(|id| {
            let i = sorted.binary_search(id).unwrap_or(0);
            let before = i.checked_sub(1).map_or(0, |j| common(sorted[j], id));
            let after = sorted.get(i + 1).map_or(0, |n| common(n, id));
            let len = (before.max(after) + 1).max(min).min(id.len());
            id.get(..len).unwrap_or(id).to_string()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::unique_prefixes;

    #[test]
    fn prefixes_are_unique_and_at_least_the_minimum() {
        let ids = ["0195aa01", "0196ffff", "0195aa02", "0195b000"];
        let got = unique_prefixes(ids.into_iter(), 2);
        assert_eq!(got, ["0195aa01", "0196", "0195aa02", "0195b"]);
        let got = unique_prefixes(["abc", "xyz"].into_iter(), 2);
        assert_eq!(got, ["ab", "xy"]);
    }
}
