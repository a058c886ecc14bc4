//! `adapterlab store check [--repair]`: read every stored record, report what cannot be read,
//! and with `--repair` move it into quarantine so it no longer gets in the way.

use anyhow::Result;
use clap::Subcommand;

use crate::cli::{Context, ExitCode};

/// `store check`'s exit code when it found unreadable records and did not repair them.
pub const EXIT_PROBLEMS: u8 = 3;

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Read every record of the store as its type; list the ones that cannot be read.
    /// Exits 3 when some cannot (and `--repair` was not given).
    Check {
        /// Move unreadable records, byte for byte, into the store's `quarantine` keyspace.
        #[arg(long)]
        repair: bool,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: StoreCommand, ctx: &Context) -> Result<()> {
    match cmd {
        StoreCommand::Check { repair, json } => {
            let store = ctx.store()?;
            let report = store.check(repair)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                let counted: Vec<String> = report
                    .records
                    .iter()
                    .map(|(tree, n)| format!("{n} {tree}"))
                    .collect();
                println!("read {}", counted.join(", "));
                for p in &report.problems {
                    println!("unreadable: {} {}: {}", p.tree, p.key, p.reason);
                }
                if repair && report.quarantined > 0 {
                    println!("quarantined {} record(s)", report.quarantined);
                } else if report.is_clean() {
                    println!("the store is sound");
                }
            }
            if !report.is_clean() && !repair {
                return Err(ExitCode::new(
                    EXIT_PROBLEMS,
                    format!(
                        "{} unreadable record(s); `adapterlab store check --repair` quarantines them",
                        report.problems.len()
                    ),
                )
                .into());
            }
            Ok(())
        }
    }
}
