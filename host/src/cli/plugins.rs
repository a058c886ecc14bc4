//! `adapterlab plugins list|check|install|uninstall|new`.

mod new;

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::Subcommand;

use crate::cli::Context;
use crate::cli::output::table;
use crate::plugin::{PluginMeta, registry};

#[derive(Debug, Subcommand)]
pub enum PluginsCommand {
    /// List built-in and installed plugins: name, kind, version, source, language, capabilities.
    List {
        /// Print JSON (an array of plugin descriptions) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Validate a component against the plugin contract and print its manifest, or exactly
    /// what is wrong with it. Installs nothing.
    Check {
        /// The component (.wasm) to check.
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Validate a component and install it into the data directory's plugins folder.
    Install {
        file: PathBuf,
        #[arg(long)]
        json: bool,
        /// Allow a component named like a built-in plugin (e.g. `rouge`) to replace the
        /// built-in for every run of this data directory. Runs record it as a user plugin.
        #[arg(long)]
        replace_builtin: bool,
    },
    /// Remove an installed plugin: its component in the data directory and its record.
    /// Built-in plugins cannot be uninstalled.
    Uninstall {
        /// The plugin's name, as `plugins list` shows it.
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Write a new metric-plugin project, ready to build: PARENT/NAME/ with the plugin
    /// contract, a small word-overlap metric, a README and build.sh (which makes NAME.wasm).
    New {
        /// The plugin's name: a lowercase letter, then lowercase letters, digits or '-'.
        name: String,
        /// The language of the project.
        #[arg(long, value_enum)]
        lang: new::Lang,
        /// The folder to create the project in (default: the current folder).
        #[arg(long, value_name = "PARENT", default_value = ".")]
        dir: PathBuf,
    },
}

pub fn run(cmd: PluginsCommand, ctx: &Context) -> Result<()> {
    match cmd {
        PluginsCommand::List { json } => {
            let registry = ctx.registry()?;
            let metas: Vec<&PluginMeta> = registry.all().iter().map(|p| p.meta.as_ref()).collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&metas)?);
            } else {
                let rows: Vec<Vec<String>> = metas.iter().map(|m| summary_row(m)).collect();
                print!(
                    "{}",
                    table(
                        &[
                            "NAME",
                            "KIND",
                            "VERSION",
                            "SOURCE",
                            "LANGUAGE",
                            "CAPABILITIES",
                            "PROVIDES"
                        ],
                        &rows
                    )
                );
                for (path, problem) in &registry.problems {
                    eprintln!("warning: {} was not loaded: {problem}", path.display());
                }
            }
            Ok(())
        }
        PluginsCommand::Check { file, json } => {
            let bytes = std::fs::read(&file)
                .with_context(|| format!("failed to read {}", file.display()))?;
            let plugin = ctx
                .runtime()?
                .load(&bytes, crate::plugin::PluginSource::File(file.clone()))
                .with_context(|| format!("{} does not pass the plugin contract", file.display()))?;
            print_meta(&plugin.meta, json, "ok")?;
            Ok(())
        }
        PluginsCommand::Install {
            file,
            json,
            replace_builtin,
        } => {
            let bytes = std::fs::read(&file)
                .with_context(|| format!("failed to read {}", file.display()))?;
            let plugin = registry::install(
                &ctx.runtime()?,
                &ctx.registry()?,
                &ctx.data_dir.plugins(),
                &bytes,
                &file,
                replace_builtin,
            )
            .with_context(|| format!("{} was not installed", file.display()))?;
            if ctx.registry()?.is_builtin(&plugin.meta.name) {
                eprintln!(
                    "warning: {} now replaces the built-in plugin {:?} for every run of this data directory",
                    file.display(),
                    plugin.meta.name
                );
            }
            ctx.store()?
                .put_plugin(&registry::install_record(&plugin.meta, &file))?;
            print_meta(&plugin.meta, json, "installed")?;
            Ok(())
        }
        PluginsCommand::Uninstall { name, json } => {
            let plugins_dir = ctx.data_dir.plugins();
            let removed = registry::uninstall(&ctx.registry()?, &plugins_dir, &ctx.store()?, &name)
                .with_context(|| format!("plugin {name:?} was not uninstalled"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&removed)?);
                return Ok(());
            }
            println!("uninstalled {name}");
            for file in &removed.files {
                println!("  deleted {}", file.display());
            }
            // An installed plugin may have shadowed a built-in of the same name.
            let now = crate::plugin::Registry::load(&ctx.runtime()?, &plugins_dir)?;
            if now.all().iter().any(|p| {
                p.meta.name == name && p.meta.source == crate::plugin::PluginSource::Builtin
            }) {
                println!("  the built-in plugin {name} is in use again");
            }
            Ok(())
        }
        PluginsCommand::New { name, lang, dir } => {
            // A built-in's name is reserved: such a project would build but not install.
            // (A registry that cannot load is no reason to refuse writing a project.)
            if let Ok(registry) = ctx.registry()
                && registry.is_builtin(&name)
            {
                anyhow::bail!(
                    "plugin project {name:?} was not created: {name:?} is the name of a built-in plugin; choose another name"
                );
            }
            let project = new::create(&name, lang, &dir)
                .with_context(|| format!("plugin project {name:?} was not created"))?;
            println!(
                "created {} ({} files)",
                project.dir.display(),
                project.files.len()
            );
            println!("build it with:");
            println!("  cd {} && {}", project.dir.display(), project.build);
            println!(
                "then: adapterlab plugins check {}",
                project.dir.join(format!("{name}.wasm")).display()
            );
            Ok(())
        }
    }
}

fn summary_row(m: &PluginMeta) -> Vec<String> {
    let provides = match m.kind {
        crate::plugin::PluginKind::Metric => m
            .scores
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(" "),
        crate::plugin::PluginKind::Reporter => {
            format!("format {}", m.format.as_deref().unwrap_or("?"))
        }
        crate::plugin::PluginKind::Formatter => format!("fields {}", m.required_fields.join(" ")),
    };
    vec![
        m.name.clone(),
        m.kind.to_string(),
        m.version.clone(),
        match &m.source {
            crate::plugin::PluginSource::Builtin => "built-in".to_string(),
            crate::plugin::PluginSource::File(_) => "file".to_string(),
        },
        m.language.clone(),
        m.capability_names().join(","),
        provides,
    ]
}

fn print_meta(meta: &PluginMeta, json: bool, verdict: &str) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(meta)?);
        return Ok(());
    }
    println!(
        "{verdict}: {} {} ({} plugin, contract {})",
        meta.name, meta.version, meta.kind, meta.contract
    );
    println!("  description:  {}", meta.description);
    println!("  source:       {}", meta.source);
    println!("  language:     {}", meta.language);
    println!("  capabilities: {}", meta.capability_names().join(", "));
    println!(
        "  size:         {} bytes, sha256 {}",
        meta.size_bytes,
        &meta.sha256[..16]
    );
    for s in &meta.scores {
        println!(
            "  score {:<24} [{}, {}] {}  {}",
            s.name,
            s.min,
            s.max,
            if s.higher_is_better {
                "higher is better"
            } else {
                "lower is better"
            },
            s.description
        );
    }
    if let Some(f) = &meta.format {
        println!("  format:       {f}");
    }
    if !meta.required_fields.is_empty() {
        println!("  fields:       {}", meta.required_fields.join(", "));
    }
    Ok(())
}
