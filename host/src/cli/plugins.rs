//! `adapterlab plugins list|check|install`.

use anyhow::Result;
use clap::Subcommand;

use crate::cli::Context;

#[derive(Debug, Subcommand)]
pub enum PluginsCommand {
    /// List built-in and installed plugins.
    List,
}

pub fn run(cmd: PluginsCommand, _ctx: &Context) -> Result<()> {
    match cmd {
        PluginsCommand::List => Ok(()),
    }
}
