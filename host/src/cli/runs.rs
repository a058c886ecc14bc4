//! `adapterlab runs list|show|compare`.

use anyhow::Result;
use clap::Subcommand;

use crate::cli::output::table;
use crate::cli::remote::{self, Source};
use crate::cli::{Context, ExitCode};
use crate::eval::compare::{Comparison, compare};
use crate::store::{RunRecord, SampleRecord};

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
        /// How to print the table: `table` (the terminal) or `markdown` (a pull-request
        /// comment).
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// A CI gate: exit 3 when, for one of these scores (comma-separated), a run's paired 95%
        /// interval of the difference from the baseline lies wholly on the worse side of zero
        /// (of `--min-delta`). Direction follows each score's declaration (lower is better for
        /// some).
        #[arg(long, value_delimiter = ',', value_name = "SCORE,...")]
        fail_on_regression: Vec<String>,
        /// With `--fail-on-regression`: the worsening tolerated before it counts (default 0).
        #[arg(
            long,
            value_name = "X",
            default_value_t = 0.0,
            requires = "fail_on_regression"
        )]
        min_delta: f64,
    },
    /// Send a stored run to a tracker: its settings, every logged step (training) and its
    /// scores (evaluations). MLflow reads MLFLOW_TRACKING_URI and MLFLOW_EXPERIMENT_NAME.
    Export {
        /// Run id (a unique prefix is enough) or run name.
        id: String,
        #[arg(long, value_enum)]
        to: ExportTarget,
        /// TensorBoard: the log folder (default: runs/<run name>).
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
}

/// Where `runs export` sends a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportTarget {
    Tensorboard,
    Mlflow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Markdown,
}

/// `runs compare --fail-on-regression`'s exit code when a regression was found.
pub const EXIT_REGRESSION: u8 = 3;

pub fn run(cmd: RunsCommand, ctx: &Context) -> Result<()> {
    match cmd {
        RunsCommand::List { json } => {
            // While a server holds the store, through its API (cli/remote.rs).
            let runs: Vec<RunRecord> = match remote::source(ctx)? {
                Source::Store(store) => store.list_runs()?,
                Source::Server(server) => server.json(&["api", "runs"], &[])?,
            };
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
            let (run, sample_records): (RunRecord, Vec<SampleRecord>) = match remote::source(ctx)? {
                Source::Store(store) => {
                    let run = store.resolve_run(&id)?;
                    let samples = store.samples(&run.id)?;
                    (run, samples)
                }
                Source::Server(server) => {
                    let run: RunRecord = server.json(&["api", "runs", &id], &[])?;
                    let samples = server.json(&["api", "runs", &run.id, "samples"], &[])?;
                    (run, samples)
                }
            };
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
            for (name, p) in &run.plugins {
                println!(
                    "plugin {name}: {} ({}, sha256 {})",
                    p.version,
                    p.source,
                    p.sha256.get(..16).unwrap_or(&p.sha256)
                );
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
        RunsCommand::Export { id, to, out } => export(&ctx.store()?, &id, to, out),
        RunsCommand::Compare {
            ids,
            json,
            format,
            fail_on_regression,
            min_delta,
        } => {
            let c: Comparison = match remote::source(ctx)? {
                Source::Store(store) => compare(&store, &ids)?,
                Source::Server(server) => {
                    server.json(&["api", "compare"], &[("runs", ids.join(",").as_str())])?
                }
            };
            if !min_delta.is_finite() || min_delta < 0.0 {
                anyhow::bail!("--min-delta {min_delta}: must be a finite number ≥ 0");
            }
            // A gate that names nothing real must not pass silently.
            for name in &fail_on_regression {
                if !c.scores.iter().any(|s| &s.name == name) {
                    let names: Vec<&str> = c.scores.iter().map(|s| s.name.as_str()).collect();
                    anyhow::bail!(
                        "--fail-on-regression {name}: no such score in every compared run (they share: {})",
                        names.join(", ")
                    );
                }
            }
            let regressions: Vec<&crate::eval::compare::Delta> = c
                .deltas
                .iter()
                .filter(|d| fail_on_regression.contains(&d.score) && is_regression(d, min_delta))
                .collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&c)?);
            } else if format == Format::Markdown {
                print!("{}", markdown(&c, &fail_on_regression, min_delta));
            } else {
                print_table(&c);
            }
            if !regressions.is_empty() {
                let names: Vec<String> = regressions
                    .iter()
                    .map(|d| {
                        format!(
                            "{} {:+.4} [{:+.4}, {:+.4}]",
                            d.score, d.difference.mean, d.difference.low, d.difference.high
                        )
                    })
                    .collect();
                return Err(ExitCode::new(
                    EXIT_REGRESSION,
                    format!("regression: {}", names.join("; ")),
                )
                .into());
            }
            Ok(())
        }
    }
}

/// Replays a stored run into a tracker, as the trainer would have reported it live.
fn export(
    store: &crate::store::Store,
    id: &str,
    to: ExportTarget,
    out: Option<std::path::PathBuf>,
) -> Result<()> {
    let run = store.resolve_run(id)?;
    let mut params: Vec<(String, String)> = run
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    params.push(("adapterlab.run_id".into(), run.id.clone()));
    params.push(("adapterlab.kind".into(), run.kind.as_str().into()));
    let report_to = vec![match to {
        ExportTarget::Tensorboard => "tensorboard".to_string(),
        ExportTarget::Mlflow => "mlflow".to_string(),
    }];
    // TensorBoard writes below `<dir>/runs/`, as a training run's output folder has it.
    let dir = out.unwrap_or_else(|| std::path::PathBuf::from(&run.name));
    let logging_dir = crate::track::default_logging_dir(&dir);
    let mut trackers = crate::track::Trackers::start(&report_to, &logging_dir, &run.name, &params)?;
    let mut steps = 0usize;
    for (_, event) in store.events_after(&run.id, None)? {
        if matches!(event, crate::store::RunEvent::Loss { .. }) {
            trackers.event(&event);
            steps += 1;
        }
    }
    let scores: Vec<(&str, f64)> = run
        .aggregates
        .iter()
        .map(|(k, e)| (k.as_str(), e.mean))
        .chain(run.corpus.iter().map(|(k, v)| (k.as_str(), *v)))
        .collect();
    if !scores.is_empty() {
        trackers.scalars(run.progress.done, &[], &scores);
    }
    let adapter = run.metadata.get("adapter").map(std::path::PathBuf::from);
    let status = match run.status {
        crate::store::RunStatus::Done => "FINISHED",
        crate::store::RunStatus::Failed | crate::store::RunStatus::Corrupt => "FAILED",
        _ => "KILLED",
    };
    trackers.finish(adapter.as_deref().filter(|d| d.is_dir()), status);
    println!(
        "exported run {} ({}): {steps} logged steps, {} scores{}",
        run.id,
        run.name,
        scores.len(),
        match to {
            ExportTarget::Tensorboard => format!(", to {}", dir.join("runs").display()),
            ExportTarget::Mlflow => String::from(", to MLflow"),
        }
    );
    Ok(())
}

/// Whether the whole paired interval lies on the worse side of `-min_delta`.
fn is_regression(d: &crate::eval::compare::Delta, min_delta: f64) -> bool {
    if d.higher_is_better {
        d.difference.high < -min_delta
    } else {
        d.difference.low > min_delta
    }
}

fn verdict(d: &crate::eval::compare::Delta) -> &'static str {
    match d.verdict {
        Some(true) => "better",
        Some(false) => "worse",
        None => "no significant difference",
    }
}

fn run_name(c: &crate::eval::compare::Comparison, id: &str) -> String {
    c.runs
        .iter()
        .find(|r| r.id == id)
        .map(|r| r.name.clone())
        .unwrap_or_default()
}

/// The comparison as a Markdown table for a pull-request comment.
fn markdown(c: &crate::eval::compare::Comparison, gated: &[String], min_delta: f64) -> String {
    let mut out = format!(
        "**Baseline:** `{}` ({})\n\n| run | score | delta | 95% CI (paired) | pairs | verdict |\n| --- | --- | ---: | --- | ---: | --- |\n",
        c.runs[0].name, c.runs[0].id
    );
    for d in &c.deltas {
        let flag = if gated.contains(&d.score) && is_regression(d, min_delta) {
            " ❌ regression"
        } else {
            ""
        };
        out.push_str(&format!(
            "| `{}` | {} | {:+.4} | [{:+.4}, {:+.4}] | {} | {}{} |\n",
            run_name(c, &d.run),
            d.score,
            d.difference.mean,
            d.difference.low,
            d.difference.high,
            d.paired,
            verdict(d),
            flag
        ));
    }
    out
}

fn print_table(c: &crate::eval::compare::Comparison) {
    {
        {
            println!("baseline: {} ({})", c.runs[0].name, c.runs[0].id);
            let rows: Vec<Vec<String>> = c
                .deltas
                .iter()
                .map(|d| {
                    vec![
                        run_name(c, &d.run),
                        d.score.clone(),
                        format!("{:+.4}", d.difference.mean),
                        format!("[{:+.4}, {:+.4}]", d.difference.low, d.difference.high),
                        d.paired.to_string(),
                        verdict(d).into(),
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
