//! A training run in the store: the `train` run record (queued → running → done/failed), its
//! logged steps as events (written by the trainer as they happen), and the adapter it made.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::Result;

use crate::eval::input::PredictionRow;
use crate::eval::pipeline::{self, EvalEnv, EvalRequest};
use crate::plugin::NoServices;

use crate::store::{AdapterRecord, RunKind, RunRecord, RunStatus, Store, new_run_id, now_rfc3339};
use crate::train::config::TrainConfig;
use crate::train::trainer::{self, TrainEnv, TrainOutcome};

/// Creates the queued `train` run for `config` (the server queues it; the CLI runs it at once).
pub fn create_run(store: &Store, config: &TrainConfig, name: Option<String>) -> Result<RunRecord> {
    create_run_with_id(store, new_run_id(), config, name)
}

/// [`create_run`] with an id chosen by the caller (the server names the output folder after it).
/// The adapter the run makes is stored under `name` when one is given, else under the output
/// folder's name.
pub fn create_run_with_id(
    store: &Store,
    id: String,
    config: &TrainConfig,
    name: Option<String>,
) -> Result<RunRecord> {
    let folder = std::path::Path::new(&config.output_dir)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| config.output_dir.clone());
    let adapter_name = name.clone().unwrap_or_else(|| folder.clone());
    let name = name.unwrap_or_else(|| format!("train {folder}"));
    let mut run = RunRecord::new(id, name, RunKind::Train);
    run.metadata = BTreeMap::from([
        ("adapter_name".to_string(), adapter_name),
        ("model".to_string(), config.model_name_or_path.clone()),
        ("dataset".to_string(), config.dataset.clone()),
        ("output_dir".to_string(), config.output_dir.clone()),
        (
            "lora".to_string(),
            format!(
                "r={} alpha={} dropout={}",
                config.lora.r, config.lora.lora_alpha, config.lora.lora_dropout
            ),
        ),
        (
            "learning_rate".to_string(),
            config.learning_rate.to_string(),
        ),
        (
            "quantization".to_string(),
            if config.quantization.load_in_4bit {
                "nf4".into()
            } else {
                "none".into()
            },
        ),
    ]);
    store.put_request(&run.id, config)?;
    store.put_run(&run)?;
    Ok(run)
}

/// Runs the training of `run_id`, recording its status, events, outcome and adapter.
pub fn run_recorded(
    store: &Store,
    run_id: &str,
    config: &TrainConfig,
    mut env: TrainEnv,
) -> Result<TrainOutcome> {
    store.start_run(run_id)?;
    // What must hold before training starts; a failure here ends the run as failed, with why.
    let prepared = (|| -> Result<_> {
        let switches =
            adapterlab_model::engine::switch::set_in_environment().map_err(anyhow::Error::msg)?;
        store.update_run(run_id, |r| r.note_speed_switches(&switches))?;
        // Unknown metric plugins fail now, not after hours of training.
        Ok(match (&env.registry, config.eval_after_train.is_empty()) {
            (_, true) => Vec::new(),
            (Some(registry), false) => {
                // validate wants samples; one placeholder stands for the generations to come.
                let placeholder = PredictionRow::new("0".into(), "x".into(), "x".into(), None);
                pipeline::validate(
                    registry,
                    &eval_request("", config, vec![placeholder], BTreeMap::new()),
                )?
            }
            (None, false) => anyhow::bail!("eval_after_train needs the plugin registry"),
        })
    })();
    let metric_plugins = match prepared {
        Ok(plugins) => plugins,
        Err(e) => {
            store.end_run(run_id, RunStatus::Failed, Some(format!("{e:#}")), |_| {})?;
            return Err(e);
        }
    };
    env.store = Some((store.clone(), run_id.to_string()));
    let result = trainer::run(config, &env);
    // A stop its user did not ask for (a full disk) is a failure, in this one write.
    let stop_failure = match &result {
        Ok(o) if o.stopped_early => env.stopped_because.as_ref().and_then(|why| why()),
        _ => None,
    };
    let status = match &result {
        Ok(_) if stop_failure.is_some() => RunStatus::Failed,
        Ok(o) if o.stopped_early => RunStatus::Cancelled,
        Ok(_) => RunStatus::Done,
        Err(_) => RunStatus::Failed,
    };
    let error = match &result {
        Err(e) => Some(format!("{e:#}")),
        Ok(_) => stop_failure,
    };
    store.end_run(run_id, status, error, |r| {
        if let Ok(o) = &result {
            for (k, v) in [
                ("train_loss", o.train_loss),
                ("eval_loss_before", o.first_eval_loss),
                ("eval_loss", o.final_eval_loss),
            ] {
                if let Some(v) = v {
                    r.corpus.insert(k.to_string(), v);
                }
            }
            r.metadata
                .insert("global_step".into(), o.global_step.to_string());
            for (k, v) in [
                ("peak_memory_bytes", o.peak_memory.rss_bytes),
                ("peak_gpu_memory_bytes", o.peak_memory.gpu_bytes),
            ] {
                if let Some(v) = v {
                    r.metadata.insert(k.into(), v.to_string());
                }
            }
            if let Some(dir) = &o.adapter_dir {
                r.metadata
                    .insert("adapter".into(), dir.display().to_string());
            }
        }
    })?;
    let outcome = result?;
    let run = store.resolve_run(run_id)?;
    let mut stored_as = None;
    if let Some(dir) = &outcome.adapter_dir {
        let path = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.clone());
        let name = adapter_name(store, &run, &path)?;
        store.update_run(run_id, |r| {
            r.metadata.insert("adapter_name".into(), name.clone());
        })?;
        stored_as = Some(name.clone());
        store.put_adapter(&AdapterRecord {
            name,
            path: path.display().to_string(),
            base_model: config.model_name_or_path.clone(),
            created: now_rfc3339(),
            run_id: Some(run_id.to_string()),
            metadata: BTreeMap::from([
                ("global_step".to_string(), outcome.global_step.to_string()),
                (
                    "eval_loss".to_string(),
                    outcome
                        .final_eval_loss
                        .map(|l| format!("{l:.4}"))
                        .unwrap_or_default(),
                ),
            ]),
        })?;
    }
    if !outcome.predictions.is_empty() {
        let mut metadata = BTreeMap::from([
            ("train_run".to_string(), run_id.to_string()),
            ("model".to_string(), config.model_name_or_path.clone()),
            (
                "split".to_string(),
                outcome.predictions_split.clone().unwrap_or_default(),
            ),
        ]);
        if let Some(dir) = &outcome.adapter_dir {
            metadata.insert(
                "adapter".into(),
                std::fs::canonicalize(dir)
                    .unwrap_or_else(|_| dir.clone())
                    .display()
                    .to_string(),
            );
        }
        // The name people pick the adapter by (the folder is the run's id).
        if let Some(name) = &stored_as {
            metadata.insert("adapter_name".into(), name.clone());
        }
        let request = eval_request(&run.name, config, outcome.predictions.clone(), metadata);
        let eval_run = pipeline::create_run(store, &request, &metric_plugins)?;
        let eval_env = EvalEnv {
            store: store.clone(),
            services: Arc::new(NoServices),
            cancel: Arc::new(AtomicBool::new(false)),
            on_progress: Arc::new(|_, _| {}),
            stopped_because: crate::eval::pipeline::EvalEnv::user_stops(),
        };
        let done = pipeline::execute(&eval_env, &eval_run.id, &request, &metric_plugins)?;
        eprintln!(
            "eval run {} on the {} split:",
            done.id,
            request
                .metadata
                .get("split")
                .map(String::as_str)
                .unwrap_or("?")
        );
        for (name, e) in &done.aggregates {
            eprintln!("  {name}: {:.4} [{:.4}, {:.4}]", e.mean, e.low, e.high);
        }
        store.update_run(run_id, |r| {
            r.metadata.insert("eval_run".into(), done.id.clone());
        })?;
    }
    Ok(outcome)
}

/// The name the adapter of `run` is stored under: the one chosen at creation, unless another
/// folder's adapter has it already (then the run id's end is added).
fn adapter_name(store: &Store, run: &RunRecord, path: &std::path::Path) -> Result<String> {
    let wanted = run
        .metadata
        .get("adapter_name")
        .cloned()
        .or_else(|| path.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "adapter".into());
    match store.get_adapter(&wanted)? {
        Some(a) if a.path != path.display().to_string() => Ok(format!(
            "{wanted}-{}",
            &run.id[run.id.len().saturating_sub(6)..]
        )),
        _ => Ok(wanted),
    }
}

fn eval_request(
    run_name: &str,
    config: &TrainConfig,
    rows: Vec<PredictionRow>,
    metadata: BTreeMap<String, String>,
) -> EvalRequest {
    EvalRequest {
        name: format!("{run_name} (after training)"),
        rows,
        metrics: config.eval_after_train.clone(),
        settings: BTreeMap::new(),
        score_references: false,
        metadata,
        llm_base_url: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::dist::equivalence::{dataset, tiny_model};

    /// A training its user did not stop (the server's full-disk stop sets the cancel flag and
    /// gives a reason) ends failed with the reason in its one final write, never `cancelled`;
    /// without a reason the same stop is the user's cancel.
    #[test]
    fn a_stop_with_a_reason_ends_failed_and_one_without_cancelled() {
        let dir = tempfile::tempdir().unwrap();
        let (model, data) = (tiny_model(dir.path()), dataset(dir.path()));
        for reason in [Some("the disk is full"), None] {
            let store = Store::temporary().unwrap();
            let config = TrainConfig::load(
                None,
                &[
                    format!("model_name_or_path={}", model.display()),
                    format!("dataset={}", data.display()),
                    format!("output_dir={}", dir.path().join("out").display()),
                    "max_steps=4".into(),
                    "eval_strategy=no".into(),
                    "max_seq_length=64".into(),
                ],
            )
            .unwrap();
            let run = create_run(&store, &config, None).unwrap();
            let env = TrainEnv {
                cancel: Some(Arc::new(AtomicBool::new(true))),
                stopped_because: Some(Arc::new(move || reason.map(String::from))),
                ..Default::default()
            };
            let outcome = run_recorded(&store, &run.id, &config, env).unwrap();
            assert!(outcome.stopped_early);
            let stored = store.resolve_run(&run.id).unwrap();
            match reason {
                Some(why) => {
                    assert_eq!(stored.status, RunStatus::Failed);
                    assert_eq!(stored.error.as_deref(), Some(why));
                }
                None => assert_eq!((stored.status, stored.error), (RunStatus::Cancelled, None)),
            }
        }
    }
}
