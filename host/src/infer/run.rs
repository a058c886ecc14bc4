//! A generate run in the store: a model (and adapter) generates for a dataset split or given
//! inputs, the generations become the run's samples (prediction, reference, source), and with
//! metrics they are scored in place by the eval pipeline, so the run compares like any eval
//! run. Everything a caller can get wrong is checked by [`prepare`] before the run is queued.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use crate::data::{self, Split};
use crate::eval::input::PredictionRow;
use crate::eval::pipeline::{self, EvalEnv, EvalRequest};
use crate::infer::Models;
use crate::infer::predict::{self, PromptRow, Sampling};
use crate::plugin::registry::closest;
use crate::plugin::{PluginKind, Registry};
use crate::store::{RunEvent, RunKind, RunRecord, RunStatus, SampleRecord, Store, new_run_id};

/// The rows a request may generate for at most.
pub const MAX_ROWS: usize = 100_000;

/// What to generate (kept as the run's request, so an interrupted run can start again).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GenerateRequest {
    pub name: String,
    /// `smollm2`, a checkpoint folder, a `.gguf` file or a hub id. Default: the adapter's base,
    /// else the served model.
    pub model: Option<String>,
    /// A stored adapter's name (or the id of the train run that made it), or a PEFT folder.
    pub adapter: Option<String>,
    /// `bundled`, a local file or a folder of splits (see `train::data::load_splits`).
    /// Default: `bundled`, unless `inputs` are given.
    pub dataset: Option<String>,
    /// `train`, `validation` or `test` (default).
    pub split: Option<String>,
    /// Rows given inline instead of a dataset.
    pub inputs: Vec<InputRow>,
    pub formatter: String,
    /// Only the first this many rows.
    pub limit: Option<usize>,
    #[serde(flatten)]
    pub sampling: Sampling,
    pub metrics: Vec<String>,
    pub settings: BTreeMap<String, BTreeMap<String, String>>,
    pub score_references: bool,
    /// Filled by [`prepare`]: the adapter folder `adapter` names.
    pub adapter_dir: Option<String>,
    /// The OpenAI-compatible endpoint the metrics' `chat` talks to for this run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub llm_base_url: Option<String>,
}

impl Default for GenerateRequest {
    fn default() -> Self {
        GenerateRequest {
            name: String::new(),
            model: None,
            adapter: None,
            dataset: None,
            split: None,
            inputs: Vec::new(),
            formatter: "summarize".into(),
            limit: None,
            sampling: Sampling::default(),
            metrics: Vec::new(),
            settings: BTreeMap::new(),
            score_references: false,
            adapter_dir: None,
            llm_base_url: None,
        }
    }
}

/// One inline input: the text to summarize and, optionally, the reference summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputRow {
    pub id: String,
    pub source: String,
    #[serde(default)]
    pub reference: Option<String>,
}

/// An adapter a request names, found.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterRef {
    pub name: String,
    pub dir: PathBuf,
    /// The base it was trained on, when the store knows it.
    pub base_model: Option<String>,
}

/// A stored adapter by name (or by the id of the train run that made it), else a PEFT folder.
pub fn resolve_adapter(store: &Store, spec: &str) -> Result<AdapterRef> {
    let adapters = store.list_adapters()?;
    let found = adapters
        .iter()
        .find(|a| a.name == spec)
        .or_else(|| adapters.iter().find(|a| a.run_id.as_deref() == Some(spec)));
    if let Some(a) = found {
        return Ok(AdapterRef {
            name: a.name.clone(),
            dir: PathBuf::from(&a.path),
            base_model: Some(a.base_model.clone()),
        });
    }
    let dir = Path::new(spec);
    if dir.join("adapter_config.json").is_file() {
        return Ok(AdapterRef {
            name: spec.to_string(),
            dir: dir.to_path_buf(),
            base_model: None,
        });
    }
    let names: Vec<&str> = adapters.iter().map(|a| a.name.as_str()).collect();
    let hint = match closest(spec, &names) {
        Some(c) => format!("; did you mean {c:?}?"),
        None if names.is_empty() => "; no adapters are stored yet".to_string(),
        None => format!(" (stored: {})", names.join(", ")),
    };
    bail!("`adapter`: {spec:?} is neither a stored adapter nor a PEFT folder{hint}")
}

/// Checks that `model` can name a model: the default alias, an existing path, or a hub id.
pub fn check_model(model: &str, field: &str) -> Result<()> {
    let path = Path::new(model);
    let hub_id = {
        let parts: Vec<&str> = model.split('/').collect();
        parts.len() == 2
            && parts.iter().all(|p| {
                !p.is_empty()
                    && p.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            })
            && !model.starts_with('.')
    };
    if model == adapterlab_model::engine::DEFAULT_MODEL || path.exists() || hub_id {
        return Ok(());
    }
    bail!(
        "`{field}`: {model:?} is not `smollm2`, an existing checkpoint folder or .gguf file, nor a hub id (owner/name)"
    )
}

/// Validates `request` against the plugins, the store and the files it names, and resolves it
/// (model, adapter folder). Returns it with the metric plugins it needs.
pub fn prepare(
    mut request: GenerateRequest,
    registry: &Registry,
    store: &Store,
    served_model: &str,
) -> Result<(GenerateRequest, Vec<crate::plugin::Plugin>)> {
    request.sampling.validate()?;
    let plugins = if request.metrics.is_empty() {
        if let Some(plugin) = request.settings.keys().next() {
            bail!("`settings` for {plugin:?}, but no `metrics` are requested");
        }
        Vec::new()
    } else {
        pipeline::validate_metrics(registry, &request.metrics, &request.settings)?
    };
    registry
        .get(&request.formatter, PluginKind::Formatter)
        .context("`formatter`")?;
    let adapter = request
        .adapter
        .as_deref()
        .map(|spec| resolve_adapter(store, spec))
        .transpose()?;
    let model = request
        .model
        .clone()
        .or_else(|| adapter.as_ref().and_then(|a| a.base_model.clone()))
        .unwrap_or_else(|| served_model.to_string());
    check_model(&model, "model")?;
    request.model = Some(model);
    if let Some(a) = &adapter {
        request.adapter = Some(a.name.clone());
        request.adapter_dir = Some(a.dir.display().to_string());
    }
    if request.limit == Some(0) {
        bail!("`limit` must be at least 1");
    }
    // Dataset problems are reported now, with row numbers, not after a model load.
    let rows = prompt_rows(&request, registry)?;
    if request.name.trim().is_empty() {
        request.name = match &request.adapter {
            Some(a) => format!("generate {a}"),
            None => format!("generate {}", request.model.as_deref().unwrap_or("?")),
        };
    }
    tracing::debug!("generate request for {} rows", rows.len());
    Ok((request, plugins))
}

/// The rows to generate for: the inline inputs, or the dataset's split; at most `limit`.
pub fn prompt_rows(request: &GenerateRequest, registry: &Registry) -> Result<Vec<PromptRow>> {
    if !request.inputs.is_empty() && (request.dataset.is_some() || request.split.is_some()) {
        bail!("give either `inputs` or `dataset`/`split`, not both");
    }
    let split = if request.inputs.is_empty() {
        let dataset = request.dataset.as_deref().unwrap_or("bundled");
        let name = request.split.as_deref().unwrap_or("test");
        let splits = data::load_splits(dataset).map_err(|e| anyhow::anyhow!("`dataset`: {e:#}"))?;
        match name {
            "train" => splits.train,
            "validation" | "test" => {
                let split = if name == "test" {
                    splits.test
                } else {
                    splits.validation
                };
                split.with_context(|| format!("`split`: {dataset} has no {name} split"))?
            }
            other => bail!("`split`: {other:?} is not train, validation or test"),
        }
    } else {
        let mut seen = std::collections::HashSet::new();
        let mut rows = Vec::with_capacity(request.inputs.len());
        for (i, input) in request.inputs.iter().enumerate() {
            if !seen.insert(input.id.as_str()) {
                bail!("inputs[{i}]: duplicate id {:?}", input.id);
            }
            if input.source.trim().is_empty() {
                bail!("inputs[{i}]: `source` is empty");
            }
            let mut row = serde_json::Map::new();
            row.insert("id".into(), input.id.clone().into());
            // The reference formatter reads `dialogue` and `summary`; others may read these.
            row.insert("dialogue".into(), input.source.clone().into());
            row.insert("source".into(), input.source.clone().into());
            if let Some(r) = &input.reference {
                row.insert("summary".into(), r.clone().into());
                row.insert("reference".into(), r.clone().into());
            }
            rows.push(row);
        }
        Split {
            origin: "inputs".into(),
            rows,
        }
    };
    let mut split = split;
    split
        .rows
        .truncate(request.limit.unwrap_or(MAX_ROWS).min(MAX_ROWS));
    predict::prompt_rows(&split, &request.formatter, Some(registry))
}

/// Creates the queued run for a prepared request.
pub fn create_run(
    store: &Store,
    request: &GenerateRequest,
    plugins: &[crate::plugin::Plugin],
) -> Result<RunRecord> {
    let mut run = RunRecord::new(new_run_id(), request.name.clone(), RunKind::Generate);
    let mut metadata = BTreeMap::new();
    metadata.insert(
        "model".to_string(),
        request.model.clone().unwrap_or_default(),
    );
    if let Some(a) = &request.adapter {
        metadata.insert("adapter".to_string(), a.clone());
    }
    if request.inputs.is_empty() {
        metadata.insert(
            "dataset".to_string(),
            request.dataset.clone().unwrap_or_else(|| "bundled".into()),
        );
        metadata.insert(
            "split".to_string(),
            request.split.clone().unwrap_or_else(|| "test".into()),
        );
    } else {
        metadata.insert(
            "inputs".to_string(),
            format!("{} given rows", request.inputs.len()),
        );
    }
    // Every setting that shapes the generations is kept with the run: two runs that differ
    // only in decoding must be told apart (and a repetition penalty of 30 must not hide).
    metadata.insert("formatter".to_string(), request.formatter.clone());
    if let Some(limit) = request.limit {
        metadata.insert("limit".to_string(), limit.to_string());
    }
    for (key, value) in decoding_metadata(&request.sampling) {
        metadata.insert(key.to_string(), value);
    }
    run.metadata = metadata;
    if !request.metrics.is_empty() {
        pipeline::describe(&mut run, &eval_request(request, Vec::new()), plugins);
    }
    // The request first: a run is never without what it needs to be resumed.
    store.put_request(&run.id, request)?;
    store.put_run(&run)?;
    Ok(run)
}

/// The decoding settings as run metadata, under the request's field names.
pub fn decoding_metadata(s: &Sampling) -> Vec<(&'static str, String)> {
    let mut out = vec![
        (
            "decoding",
            if s.temperature == 0.0 {
                "greedy".to_string()
            } else {
                "sampling".to_string()
            },
        ),
        ("max_new_tokens", s.max_new_tokens.to_string()),
        ("temperature", s.temperature.to_string()),
        ("repetition_penalty", s.repetition_penalty.to_string()),
        ("seed", s.seed.to_string()),
        ("batch_size", s.batch_size.to_string()),
    ];
    if let Some(k) = s.top_k {
        out.push(("top_k", k.to_string()));
    }
    if let Some(p) = s.top_p {
        out.push(("top_p", p.to_string()));
    }
    out
}

fn eval_request(request: &GenerateRequest, rows: Vec<PredictionRow>) -> EvalRequest {
    EvalRequest {
        name: request.name.clone(),
        rows,
        metrics: request.metrics.clone(),
        settings: request.settings.clone(),
        score_references: request.score_references,
        metadata: BTreeMap::new(),
        llm_base_url: request.llm_base_url.clone(),
    }
}

/// What a generate run needs from its caller.
#[derive(Clone)]
pub struct GenerateEnv {
    pub store: Store,
    pub models: Arc<Models>,
    pub registry: Registry,
    /// For scoring; its `cancel` also stops the generation between batches.
    pub eval: EvalEnv,
}

/// Runs a created run: generate, store the samples, score them when metrics were asked for.
/// Returns the final record (done, failed or cancelled).
pub fn execute(env: &GenerateEnv, run_id: &str, request: &GenerateRequest) -> Result<RunRecord> {
    let store = &env.store;
    store.start_run(run_id)?;
    let log = |message: String| {
        let _ = store.push_event(
            run_id,
            &RunEvent::Log {
                level: "info".into(),
                message,
            },
        );
    };
    let cancel = env.eval.cancel.clone();
    let generated = (|| -> Result<Vec<PredictionRow>> {
        let switches =
            adapterlab_model::engine::switch::set_in_environment().map_err(anyhow::Error::msg)?;
        // ADAPTERLAB_DTYPE or the device's default: bf16 and f32 generations differ.
        let compute = env.models.runtime().compute();
        store.update_run(run_id, |r| {
            r.note_speed_switches(&switches);
            r.metadata
                .insert(RunRecord::COMPUTE.into(), compute.clone());
        })?;
        let rows = prompt_rows(request, &env.registry)?;
        let total = rows.len() as u64;
        store.update_run(run_id, |r| {
            r.progress.done = 0;
            r.progress.total = total;
            r.progress.unit = "generated".into();
        })?;
        let model = request.model.as_deref().unwrap_or(env.models.served());
        log(match &request.adapter {
            Some(a) => format!("loading {model} with adapter {a}"),
            None => format!("loading {model}"),
        });
        let loaded = env
            .models
            .get(model, request.adapter_dir.as_deref().map(Path::new))?;
        log(format!("generating for {total} rows"));
        let mut done = 0u64;
        predict::predict(
            &loaded,
            &rows,
            &request.sampling,
            Some(env.models.device()),
            |batch| {
                if cancel.load(Ordering::Relaxed) {
                    bail!("cancelled");
                }
                done += batch.len() as u64;
                store.update_run(run_id, |r| r.progress.done = done)?;
                store.push_event(
                    run_id,
                    &RunEvent::Progress {
                        done,
                        total,
                        unit: "generated".into(),
                    },
                )?;
                Ok(())
            },
        )
    })();
    let predictions = match generated {
        Ok(p) => p,
        Err(e) => {
            // A stop its user did not ask for (a full disk) is a failure, in this one write.
            let stop_failure = cancel
                .load(Ordering::Relaxed)
                .then(|| (env.eval.stopped_because)())
                .flatten();
            let status = if cancel.load(Ordering::Relaxed) && stop_failure.is_none() {
                RunStatus::Cancelled
            } else {
                RunStatus::Failed
            };
            let error = match stop_failure {
                Some(why) => Some(why),
                None => (status == RunStatus::Failed).then(|| format!("{e:#}")),
            };
            let run = store.end_run(run_id, status, error, |_| {})?;
            return if status == RunStatus::Failed {
                Err(e)
            } else {
                Ok(run)
            };
        }
    };
    // The generations are kept before any scoring, so a failing metric loses none of them.
    let samples: Vec<SampleRecord> = predictions
        .iter()
        .enumerate()
        .map(|(i, p)| SampleRecord {
            index: i as u32,
            id: p.id.clone(),
            prediction: p.prediction.clone(),
            reference: p.reference.clone(),
            references: p.references.clone(),
            source: p.source.clone(),
            ..Default::default()
        })
        .collect();
    store.put_samples(run_id, &samples)?;
    log(format!("generated {} predictions", samples.len()));
    if request.metrics.is_empty() {
        let run = store.end_run(run_id, RunStatus::Done, None, |_| {})?;
        return Ok(run);
    }
    let scoring = eval_request(request, predictions);
    let plugins =
        match pipeline::validate_metrics(&env.registry, &scoring.metrics, &scoring.settings) {
            Ok(p) => p,
            Err(e) => {
                store.end_run(run_id, RunStatus::Failed, Some(format!("{e:#}")), |_| {})?;
                return Err(e);
            }
        };
    log(format!("scoring with {}", scoring.metrics.join(", ")));
    let run = store.update_run(run_id, |r| pipeline::describe(r, &scoring, &plugins))?;
    let generation_started = run.started;
    let mut result = pipeline::execute(&env.eval, run_id, &scoring, &plugins);
    // The pipeline stamps `started` when scoring begins; the run started with the generation,
    // and its duration must count it (a 25 s run once read "Duration 2 s").
    if let Some(started) = generation_started {
        let run = store
            .update_run(run_id, |r| r.started = Some(started.clone()))
            .context("restoring the run's start time after scoring")?;
        if let Ok(done) = &mut result {
            done.started = run.started;
        }
    }
    result
}
