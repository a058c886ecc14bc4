//! A training run in the store: the `train` run record (queued → running → done/failed), its
//! logged steps as events (written by the trainer as they happen), and the adapter it made.

use std::collections::BTreeMap;

use anyhow::Result;

use crate::store::{AdapterRecord, RunEvent, RunKind, RunRecord, RunStatus, Store, new_run_id, now_rfc3339};
use crate::train::config::TrainConfig;
use crate::train::trainer::{self, TrainEnv, TrainOutcome};

/// Creates the queued `train` run for `config` (the server queues it; the CLI runs it at once).
pub fn create_run(store: &Store, config: &TrainConfig, name: Option<String>) -> Result<RunRecord> {
    let name = name.unwrap_or_else(|| format!("train {}", std::path::Path::new(&config.output_dir).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| config.output_dir.clone())));
    let mut run = RunRecord::new(new_run_id(), name, RunKind::Train);
    run.metadata = BTreeMap::from([
        ("model".to_string(), config.model_name_or_path.clone()),
        ("dataset".to_string(), config.dataset.clone()),
        ("output_dir".to_string(), config.output_dir.clone()),
        ("lora".to_string(), format!("r={} alpha={} dropout={}", config.lora.r, config.lora.lora_alpha, config.lora.lora_dropout)),
        ("learning_rate".to_string(), config.learning_rate.to_string()),
        ("quantization".to_string(), if config.quantization.load_in_4bit { "nf4".into() } else { "none".into() }),
    ]);
    run.request = serde_json::to_value(config)?;
    store.put_run(&run)?;
    Ok(run)
}

/// Runs the training of `run_id`, recording its status, events, outcome and adapter.
pub fn run_recorded(store: &Store, run_id: &str, config: &TrainConfig, mut env: TrainEnv) -> Result<TrainOutcome> {
    store.update_run(run_id, |r| {
        r.status = RunStatus::Running;
        r.started = Some(now_rfc3339());
        r.owner_pid = Some(std::process::id());
    })?;
    store.push_event(run_id, &RunEvent::Status { status: RunStatus::Running })?;
    env.store = Some((store.clone(), run_id.to_string()));
    let result = trainer::run(config, &env);
    let status = match &result {
        Ok(o) if o.stopped_early => RunStatus::Cancelled,
        Ok(_) => RunStatus::Done,
        Err(_) => RunStatus::Failed,
    };
    store.update_run(run_id, |r| {
        r.status = status;
        r.finished = Some(now_rfc3339());
        r.owner_pid = None;
        match &result {
            Ok(o) => {
                for (k, v) in [("train_loss", o.train_loss), ("eval_loss_before", o.first_eval_loss), ("eval_loss", o.final_eval_loss)] {
                    if let Some(v) = v {
                        r.corpus.insert(k.to_string(), v);
                    }
                }
                r.metadata.insert("global_step".into(), o.global_step.to_string());
                if let Some(dir) = &o.adapter_dir {
                    r.metadata.insert("adapter".into(), dir.display().to_string());
                }
            }
            Err(e) => r.error = Some(format!("{e:#}")),
        }
    })?;
    store.push_event(run_id, &RunEvent::Status { status })?;
    let outcome = result?;
    if let Some(dir) = &outcome.adapter_dir {
        let path = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.clone());
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "adapter".into());
        store.put_adapter(&AdapterRecord {
            name,
            path: path.display().to_string(),
            base_model: config.model_name_or_path.clone(),
            created: now_rfc3339(),
            run_id: Some(run_id.to_string()),
            metadata: BTreeMap::from([
                ("global_step".to_string(), outcome.global_step.to_string()),
                ("eval_loss".to_string(), outcome.final_eval_loss.map(|l| format!("{l:.4}")).unwrap_or_default()),
            ]),
        })?;
    }
    Ok(outcome)
}
