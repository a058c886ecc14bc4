//! `adapterlab push ADAPTER --repo OWNER/NAME`: publish an adapter (or a merged model) with a
//! model card carrying its stored evaluation results to the Hugging Face Hub.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use clap::Args;

use crate::cli::Context;
use crate::hub::card::{Card, EvalResult};
use crate::hub::{self, Hub, HubConfig, PushRequest};
use crate::store::{RunStatus, Store};

#[derive(Debug, Args)]
pub struct PushArgs {
    /// A stored adapter's name, the id of the run that trained it, a PEFT adapter folder, or a
    /// merged model folder (`adapterlab merge`'s output).
    pub adapter: String,
    /// The Hub repository, OWNER/NAME (created when missing).
    #[arg(long)]
    pub repo: String,
    /// Create the repository private.
    #[arg(long)]
    pub private: bool,
    /// The branch to commit to (created when missing); default main.
    #[arg(long)]
    pub revision: Option<String>,
    /// The commit message.
    #[arg(long)]
    pub message: Option<String>,
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: PushArgs, ctx: &Context) -> Result<()> {
    hub::check_repo_id(&args.repo)?;
    let store = if Path::new(&args.adapter).is_dir() {
        // A folder needs no store; its results are added when the store can be read.
        ctx.store().ok()
    } else {
        Some(
            ctx.store()
                .context("the store holding adapter names cannot be opened")?,
        )
    };
    let dir = match &store {
        Some(store) if !Path::new(&args.adapter).is_dir() => {
            crate::infer::run::resolve_adapter(store, &args.adapter)?.dir
        }
        _ => PathBuf::from(&args.adapter),
    };
    let request = prepare(store.as_ref(), &args.adapter, &dir, &args)?;
    let outcome = Hub::new(HubConfig::from_env()?)?.push(&request)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&outcome)?);
    } else {
        for f in &outcome.files {
            println!(
                "{} ({} bytes{})",
                f.path,
                f.size,
                if f.lfs { ", LFS" } else { "" }
            );
        }
        println!(
            "pushed to {}/{} on {}{}",
            HubConfig::from_env()
                .map(|c| c.endpoint)
                .unwrap_or_default(),
            outcome.repo,
            outcome.revision,
            outcome
                .commit_url
                .map(|u| format!(": {u}"))
                .unwrap_or_default()
        );
    }
    Ok(())
}

/// The files to push: the folder's, plus the model card built from what the store knows.
pub fn prepare(
    store: Option<&Store>,
    spec: &str,
    dir: &Path,
    args: &PushArgs,
) -> Result<PushRequest> {
    let (is_adapter, mut files) = hub::folder_files(dir)?;
    let card = card_for(store, spec, dir, &args.repo, is_adapter)?;
    files.push(("README.md".into(), card.render().into_bytes()));
    Ok(PushRequest {
        repo: args.repo.clone(),
        private: args.private,
        revision: args.revision.clone(),
        message: args.message.clone().unwrap_or_else(|| {
            format!(
                "Upload {} with adapterlab",
                if is_adapter {
                    "adapter"
                } else {
                    "merged model"
                }
            )
        }),
        files,
    })
}

fn card_for(
    store: Option<&Store>,
    spec: &str,
    dir: &Path,
    repo: &str,
    is_adapter: bool,
) -> Result<Card> {
    let config_file = if is_adapter {
        "adapter_config.json"
    } else {
        "config.json"
    };
    let config: serde_json::Value = std::fs::read_to_string(dir.join(config_file))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let mut base_model = config["base_model_name_or_path"]
        .as_str()
        .or_else(|| config["_name_or_path"].as_str())
        .filter(|s| !s.is_empty())
        .map(str::to_string);
    let mut settings = Vec::new();
    let mut results = Vec::new();
    if let Some(store) = store {
        let canonical = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        let adapter = store.list_adapters()?.into_iter().find(|a| {
            a.name == spec
                || a.run_id.as_deref() == Some(spec)
                || std::fs::canonicalize(&a.path).is_ok_and(|p| p == canonical)
        });
        let names: Vec<String> = adapter
            .iter()
            .map(|a| a.name.clone())
            .chain([
                spec.to_string(),
                canonical.display().to_string(),
                dir.display().to_string(),
            ])
            .collect();
        if let Some(a) = &adapter {
            base_model = base_model.or_else(|| Some(a.base_model.clone()));
            if let Some(run_id) = &a.run_id
                && let Ok(Some(config)) = store.request::<crate::train::config::TrainConfig>(run_id)
            {
                settings = crate::train::trainer::settings(&config)
                    .into_iter()
                    .filter(|(k, _)| CARD_SETTINGS.contains(&k.as_str()))
                    .collect();
            }
        }
        // The newest finished run of each dataset that scored this adapter.
        let mut seen = std::collections::BTreeSet::new();
        for run in store.list_runs()? {
            let about_it = run
                .metadata
                .get("adapter")
                .is_some_and(|a| names.contains(a))
                || adapter
                    .as_ref()
                    .and_then(|a| a.run_id.as_ref())
                    .is_some_and(|id| run.metadata.get("train_run") == Some(id));
            if !about_it || run.status != RunStatus::Done || run.aggregates.is_empty() {
                continue;
            }
            let dataset = match (run.metadata.get("dataset"), run.metadata.get("split")) {
                (Some(d), Some(s)) => format!("{d} ({s})"),
                (Some(d), None) => d.clone(),
                (None, Some(s)) => format!("{s} split"),
                (None, None) => run.name.clone(),
            };
            if !seen.insert(dataset.clone()) {
                continue;
            }
            for (metric, e) in &run.aggregates {
                results.push(EvalResult {
                    metric: metric.clone(),
                    value: e.mean,
                    dataset: dataset.clone(),
                });
            }
        }
    }
    Ok(Card {
        repo: repo.to_string(),
        base_model,
        is_adapter,
        settings,
        results,
    })
}

/// The training settings a card lists (the ones that shape an adapter).
const CARD_SETTINGS: &[&str] = &[
    "dataset",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_ratio",
    "max_steps",
    "num_train_epochs",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_seq_length",
    "max_grad_norm",
    "optim",
    "seed",
    "lora.r",
    "lora.lora_alpha",
    "lora.lora_dropout",
    "lora.target_modules",
    "quantization.load_in_4bit",
    "quantization.bnb_4bit_quant_type",
    "quantization.bnb_4bit_use_double_quant",
];
