//! The evaluation pipeline: run metric plugins over a set of predictions, store every sample
//! with all its scores as soon as every metric has covered it, then the aggregates.
//!
//! Metrics run concurrently, each in one thread and plugin instance, or, when its samples are
//! independent (contract 0.2.0's `independent-samples`), in several: the samples are cut into
//! contiguous chunks scored in parallel instances. A metric sees its samples in batches (by
//! default each chunk at once, so batch-level corpora such as idf cover the whole set;
//! plugins that call an LLM get batches of 16 so progress shows). Corpus scores come from the
//! batches' sufficient statistics, summed in sample order and finalized once, so they do not
//! depend on the split; a 0.1.0 metric's batch `corpus` is kept only when one batch covered
//! every sample. A batch that traps or returns malformed output is retried by halves, so only
//! the culprit samples get the error.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Instant;

use anyhow::{Context as _, Result, bail};

use crate::eval::input::PredictionRow;
use crate::eval::stats::bootstrap_means;
use crate::plugin::wit::types::{Capability, Sample, SampleResult, Statistic};
use crate::plugin::{
    CallContext, HostServices, LogLine, Plugin, PluginError, PluginKind, Registry,
};
use crate::store::{
    Estimate, Progress, RunEvent, RunKind, RunRecord, RunStatus, SampleRecord, ScoreInfo, Store,
    new_run_id,
};

/// Host-side settings of a metric, taken out of its `--set` keys before the plugin sees them.
pub const HOST_SETTING_BATCH_SIZE: &str = "batch_size";
/// The wall-clock deadline of one call of this metric, in milliseconds.
pub const HOST_SETTING_TIMEOUT_MS: &str = "timeout_ms";
/// How many instances score a metric's samples in parallel (independent samples only).
pub const HOST_SETTING_PARALLEL: &str = "parallel";
const LLM_BATCH: usize = 16;
/// The most parallel instances of one metric, by default and when asked.
const MAX_PARALLEL: usize = 64;
const DEFAULT_MAX_PARALLEL: usize = 8;
/// Below this many samples per instance, another instance costs more than it saves.
const MIN_CHUNK: usize = 1000;
const MAX_BATCH_SIZE: usize = 1_000_000;
/// An hour: longer than any sane call, short enough that a typo cannot disable the deadline.
const MAX_TIMEOUT_MS: u64 = 3_600_000;

/// The host's own settings of one metric, taken out of what the plugin sees.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HostSettings {
    pub batch_size: Option<usize>,
    pub timeout: Option<std::time::Duration>,
    pub parallel: Option<usize>,
}

impl HostSettings {
    /// Take the host's keys out of a metric's settings, checking their values.
    pub fn take(plugin: &str, settings: &mut BTreeMap<String, String>) -> Result<Self> {
        let mut host = HostSettings::default();
        if let Some(v) = settings.remove(HOST_SETTING_BATCH_SIZE) {
            host.batch_size = Some(
                v.trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|b| (1..=MAX_BATCH_SIZE).contains(b))
                    .with_context(|| {
                        format!(
                            "{plugin}.{HOST_SETTING_BATCH_SIZE} = {v:?}: must be an integer from 1 to {MAX_BATCH_SIZE}"
                        )
                    })?,
            );
        }
        if let Some(v) = settings.remove(HOST_SETTING_TIMEOUT_MS) {
            let ms = v
                .trim()
                .parse::<u64>()
                .ok()
                .filter(|ms| (1..=MAX_TIMEOUT_MS).contains(ms))
                .with_context(|| {
                    format!(
                        "{plugin}.{HOST_SETTING_TIMEOUT_MS} = {v:?}: must be an integer number of milliseconds from 1 to {MAX_TIMEOUT_MS}"
                    )
                })?;
            host.timeout = Some(std::time::Duration::from_millis(ms));
        }
        if let Some(v) = settings.remove(HOST_SETTING_PARALLEL) {
            host.parallel = Some(
                v.trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|p| (1..=MAX_PARALLEL).contains(p))
                    .with_context(|| {
                        format!(
                            "{plugin}.{HOST_SETTING_PARALLEL} = {v:?}: must be an integer from 1 to {MAX_PARALLEL}"
                        )
                    })?,
            );
        }
        Ok(host)
    }

    /// How many instances score `plugin`'s `n` samples: what was asked, else as many as the
    /// machine has cores (up to 8) with at least 1000 samples each. Only metrics that declare
    /// independent samples and call no LLM are split; asking to split another is an error.
    pub fn workers(&self, plugin: &Plugin, n: usize) -> Result<usize> {
        let splittable = plugin.meta.independent_samples
            && !plugin.meta.capabilities.contains(&Capability::Chat);
        match self.parallel {
            Some(p) if p > 1 && !splittable => bail!(
                "{}.{HOST_SETTING_PARALLEL} = {p}: {} cannot be split across instances (its samples are not declared independent{})",
                plugin.meta.name,
                plugin.meta.name,
                if plugin.meta.contract == crate::plugin::wit::since_v0_1_0::VERSION {
                    ": a contract 0.1.0 metric"
                } else {
                    ""
                }
            ),
            Some(p) => Ok(p.min(n.max(1))),
            None if !splittable => Ok(1),
            None => {
                let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
                Ok(cores.min(DEFAULT_MAX_PARALLEL).min(n / MIN_CHUNK).max(1))
            }
        }
    }
}

/// What to evaluate.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct EvalRequest {
    pub name: String,
    pub rows: Vec<PredictionRow>,
    pub metrics: Vec<String>,
    /// Plugin name → its settings.
    #[serde(default)]
    pub settings: BTreeMap<String, BTreeMap<String, String>>,
    /// Also score each reference as if it were a prediction (the human baseline).
    #[serde(default)]
    pub score_references: bool,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// The OpenAI-compatible endpoint this run's `chat` capability talks to, instead of the
    /// host's `OPENAI_BASE_URL` (see [`crate::llm::LlmConfig::for_endpoint`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub llm_base_url: Option<String>,
}

/// Parse `PLUGIN.KEY=VALUE` settings into per-plugin maps.
pub fn parse_settings(items: &[String]) -> Result<BTreeMap<String, BTreeMap<String, String>>> {
    let mut out: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for item in items {
        let Some((key, value)) = item.split_once('=') else {
            bail!("setting {item:?} must look like PLUGIN.KEY=VALUE");
        };
        let Some((plugin, key)) = key.split_once('.') else {
            bail!(
                "setting {item:?} must name its plugin: PLUGIN.KEY=VALUE (e.g. rouge.use_stemmer=false)"
            );
        };
        if plugin.is_empty() || key.is_empty() {
            bail!("setting {item:?} must look like PLUGIN.KEY=VALUE");
        }
        out.entry(plugin.to_string())
            .or_default()
            .insert(key.to_string(), value.to_string());
    }
    Ok(out)
}

/// Check a request against the registry before any work: metrics exist and are metrics,
/// settings name requested plugins, score names do not collide.
pub fn validate(registry: &Registry, request: &EvalRequest) -> Result<Vec<Plugin>> {
    let plugins = validate_metrics(registry, &request.metrics, &request.settings)?;
    if request.rows.is_empty() {
        bail!("no samples to evaluate");
    }
    Ok(plugins)
}

/// The metric plugins of `metrics`, checked as [`validate`] does, before there are samples.
pub fn validate_metrics(
    registry: &Registry,
    metrics: &[String],
    settings: &BTreeMap<String, BTreeMap<String, String>>,
) -> Result<Vec<Plugin>> {
    if metrics.is_empty() {
        bail!("no metrics requested");
    }
    let mut plugins = Vec::new();
    let mut owner: BTreeMap<String, String> = BTreeMap::new();
    for name in metrics {
        let plugin = registry.get(name, PluginKind::Metric)?.clone();
        for score in &plugin.meta.scores {
            if let Some(other) = owner.insert(score.name.clone(), name.clone()) {
                bail!(
                    "metrics {other} and {name} both produce the score {:?}; run them separately",
                    score.name
                );
            }
        }
        plugins.push(plugin);
    }
    for (plugin, keys) in settings {
        if !metrics.contains(plugin) {
            bail!(
                "setting for {plugin:?}, which is not among the requested metrics ({})",
                metrics.join(", ")
            );
        }
        let host = HostSettings::take(plugin, &mut keys.clone())?;
        if let Some(p) = plugins.iter().find(|p| &p.meta.name == plugin) {
            host.workers(p, usize::MAX)?;
        }
    }
    Ok(plugins)
}

/// Create the run record (queued) for a request.
pub fn create_run(store: &Store, request: &EvalRequest, plugins: &[Plugin]) -> Result<RunRecord> {
    let mut run = RunRecord::new(new_run_id(), request.name.clone(), RunKind::Eval);
    run.metadata = request.metadata.clone();
    describe(&mut run, request, plugins);
    // The request first: a run is never without what it needs to be resumed.
    store.put_request(&run.id, request)?;
    store.put_run(&run)?;
    Ok(run)
}

/// What a run scored by `request` shows before it starts: metrics and plugin versions in its
/// metadata, the scores it will have, its progress total. Also for runs of another kind that
/// get scored (generate runs).
pub fn describe(run: &mut RunRecord, request: &EvalRequest, plugins: &[Plugin]) {
    run.metadata
        .insert("metrics".into(), request.metrics.join(","));
    if let Some(url) = &request.llm_base_url {
        run.metadata
            .insert("llm_base_url".into(), crate::redact::redact(url));
    }
    run.metadata
        .insert("samples".into(), request.rows.len().to_string());
    for p in plugins {
        run.metadata
            .insert(format!("plugin.{}", p.meta.name), p.meta.version.clone());
        let mut settings = request
            .settings
            .get(&p.meta.name)
            .cloned()
            .unwrap_or_default();
        // Shown, though it changes no score: counts sum exactly however the samples are cut.
        if let Ok(workers) = HostSettings::take(&p.meta.name, &mut settings)
            .and_then(|h| h.workers(p, request.rows.len()))
        {
            run.metadata
                .insert(format!("parallel.{}", p.meta.name), workers.to_string());
        }
        run.plugins.insert(
            p.meta.name.clone(),
            crate::store::PluginProvenance {
                version: p.meta.version.clone(),
                source: p.meta.provenance().to_string(),
                sha256: p.meta.sha256.clone(),
            },
        );
    }
    run.scores = plugins
        .iter()
        .flat_map(|p| {
            p.meta.scores.iter().map(|s| ScoreInfo {
                name: s.name.clone(),
                metric: p.meta.name.clone(),
                min: s.min,
                max: s.max,
                higher_is_better: s.higher_is_better,
            })
        })
        .collect();
    run.progress = Progress {
        done: 0,
        total: request.rows.len() as u64,
        unit: "samples".into(),
    };
}

/// The services plugins of one run use, plus what reports progress.
#[derive(Clone)]
pub struct EvalEnv {
    pub store: Store,
    pub services: Arc<dyn HostServices>,
    pub cancel: Arc<AtomicBool>,
    /// Called after each stored batch of samples with (done, total).
    pub on_progress: Arc<dyn Fn(u64, u64) + Send + Sync>,
    /// Asked when the run was stopped through `cancel` (see [`StopReason`]).
    pub stopped_because: StopReason,
}

/// Asked when a run was stopped through its cancel flag: why, when its user did not stop it
/// (the server stops runs when the disk fills). With a reason the run ends `failed` with it,
/// never `cancelled`, not even for a moment. Evaluations, generations and trainings all ask.
pub type StopReason = Arc<dyn Fn() -> Option<String> + Send + Sync>;

impl EvalEnv {
    /// No reason: a stop is the user's cancel.
    pub fn user_stops() -> StopReason {
        Arc::new(|| None)
    }
}

/// One metric's results for a range of (possibly reference) samples.
struct BatchDone {
    metric: usize,
    /// Indices into the combined sample list (predictions, then references).
    indices: Vec<usize>,
    results: Vec<Result<Vec<(String, f64)>, String>>,
    /// The batch's sufficient statistics (contract 0.2.0).
    statistics: Vec<(String, Statistic)>,
    /// A 0.1.0 metric's corpus, sent only by a batch that covered every prediction.
    batch_corpus: Vec<(String, f64)>,
    /// An error the plugin gave for the batch as a whole: stored once in the run, while each
    /// of the batch's samples gets a short pointer to it.
    batch_error: Option<String>,
}

/// Run a created run to completion. Returns the final record (done, failed or cancelled).
pub fn execute(
    env: &EvalEnv,
    run_id: &str,
    request: &EvalRequest,
    plugins: &[Plugin],
) -> Result<RunRecord> {
    execute_with_samples(env, run_id, request, plugins).map(|(run, _)| run)
}

/// [`execute`], also returning the run's stored samples (those the aggregates cover), so that
/// a caller printing them need not read them again.
pub fn execute_with_samples(
    env: &EvalEnv,
    run_id: &str,
    request: &EvalRequest,
    plugins: &[Plugin],
) -> Result<(RunRecord, Vec<SampleRecord>)> {
    let store = &env.store;
    // A generate run scores its generations in place: it is already running.
    let running = store
        .get_run(run_id)?
        .is_some_and(|r| r.status == RunStatus::Running && r.owner_pid == Some(std::process::id()));
    if !running {
        store.start_run(run_id)?;
    }

    let n = request.rows.len();
    let mut samples: Vec<Sample> = request
        .rows
        .iter()
        .map(|r| Sample {
            id: r.id.clone(),
            prediction: r.prediction.clone(),
            references: r.all_references(),
            source: r.source.clone(),
        })
        .collect();
    if request.score_references {
        // The human baseline: the first reference scored against the others, or against
        // itself when it is the only one.
        samples.extend(request.rows.iter().map(|r| {
            let references = r.all_references();
            Sample {
                id: r.id.clone(),
                prediction: references[0].clone(),
                references: if references.len() > 1 {
                    references[1..].to_vec()
                } else {
                    references
                },
                source: r.source.clone(),
            }
        }));
    }
    let samples = Arc::new(samples);
    let views_per_sample = if request.score_references { 2 } else { 1 };
    let needed = plugins.len() * views_per_sample;

    let mut records: Vec<SampleRecord> = request
        .rows
        .iter()
        .enumerate()
        .map(|(i, r)| SampleRecord {
            index: i as u32,
            id: r.id.clone(),
            prediction: r.prediction.clone(),
            reference: r.reference.clone(),
            references: r.references.clone(),
            source: r.source.clone(),
            ..Default::default()
        })
        .collect();
    let mut covered = vec![0usize; n];
    let mut corpus: BTreeMap<String, f64> = BTreeMap::new();
    // Per metric: each prediction batch's statistics by its first sample, summed in that
    // order at the end, so float sums too come out the same however the work was scheduled.
    let mut statistics: Vec<BTreeMap<usize, Vec<(String, Statistic)>>> =
        vec![BTreeMap::new(); plugins.len()];
    let mut contexts: Vec<CallContext> = Vec::with_capacity(plugins.len());
    let mut metric_errors: BTreeMap<String, String> = BTreeMap::new();
    let mut done = 0u64;
    // What this execution stored, to aggregate without reading it back.
    let mut stored_here: Vec<SampleRecord> = Vec::with_capacity(n);

    let (tx, rx) = mpsc::channel::<BatchDone>();
    let log_store = store.clone();
    let log_run = run_id.to_string();
    let log: crate::plugin::host::LogSink = Arc::new(move |line: &LogLine| {
        let _ = log_store.push_event(
            &log_run,
            &RunEvent::Log {
                level: line.level.clone(),
                message: format!("[{}] {}", line.plugin, line.message),
            },
        );
    });

    let outcome: Result<()> = std::thread::scope(|scope| {
        for (m, plugin) in plugins.iter().enumerate() {
            let mut settings = request
                .settings
                .get(&plugin.meta.name)
                .cloned()
                .unwrap_or_default();
            let host = HostSettings::take(&plugin.meta.name, &mut settings)?;
            let workers = host.workers(plugin, n)?;
            let chunk = n.div_ceil(workers).max(1);
            let batch_size = match host.batch_size {
                Some(b) => b,
                None if plugin.meta.capabilities.contains(&Capability::Chat) => LLM_BATCH,
                None => chunk,
            };
            let ctx = CallContext::default()
                .with_config(settings)
                .with_services(env.services.clone())
                .with_log(log.clone())
                .with_cancel(env.cancel.clone())
                .with_deadline(host.timeout);
            contexts.push(ctx.clone());
            // Worker w scores chunk w of the predictions and, after them, of the references.
            let views = if request.score_references { 2 } else { 1 };
            for w in 0..workers {
                let ranges: Vec<std::ops::Range<usize>> = (0..views)
                    .map(|v| v * n + (w * chunk).min(n)..v * n + ((w + 1) * chunk).min(n))
                    .filter(|r| !r.is_empty())
                    .collect();
                if ranges.is_empty() {
                    continue;
                }
                let job = MetricJob {
                    metric: m,
                    plugin: plugin.clone(),
                    ctx: ctx.clone(),
                    samples: samples.clone(),
                    ranges,
                    batch_size,
                    whole_set: workers == 1 && batch_size >= n,
                    cancel: env.cancel.clone(),
                    tx: tx.clone(),
                };
                scope.spawn(move || job.run());
            }
        }
        drop(tx);

        for batch in rx {
            let plugin_name = &plugins[batch.metric].meta.name;
            if let Some(message) = &batch.batch_error {
                metric_errors
                    .entry(plugin_name.clone())
                    .or_insert_with(|| message.clone());
            }
            let mut ready = Vec::new();
            for (index, result) in batch.indices.iter().zip(batch.results) {
                let (sample, is_reference) = (index % n, *index >= n);
                let record = &mut records[sample];
                match result {
                    Ok(scores) if is_reference => record.reference_scores.extend(scores),
                    Ok(scores) => record.scores.extend(scores),
                    Err(e) => {
                        let key = if is_reference {
                            format!("{plugin_name} (reference)")
                        } else {
                            plugin_name.clone()
                        };
                        record.errors.insert(key, e);
                    }
                }
                covered[sample] += 1;
                if covered[sample] == needed {
                    ready.push(record.clone());
                }
            }
            corpus.extend(batch.batch_corpus);
            if batch.indices.first().is_some_and(|&i| i < n) && !batch.statistics.is_empty() {
                statistics[batch.metric].insert(batch.indices[0], batch.statistics);
            }
            if !ready.is_empty() {
                let started = Instant::now();
                store.put_samples(run_id, &ready)?;
                done += ready.len() as u64;
                let total = n as u64;
                store.update_run(run_id, |r| r.progress.done = done)?;
                store.push_event(
                    run_id,
                    &RunEvent::Progress {
                        done,
                        total,
                        unit: "samples".into(),
                    },
                )?;
                (env.on_progress)(done, total);
                tracing::debug!(
                    "eval: storing {} samples took {:.1?}",
                    ready.len(),
                    started.elapsed()
                );
                stored_here.extend(ready);
            }
        }
        Ok(())
    });

    let cancelled = env.cancel.load(Ordering::Relaxed);
    if outcome.is_ok() && !cancelled {
        for ((plugin, ctx), batches) in plugins.iter().zip(&contexts).zip(statistics) {
            let name = &plugin.meta.name;
            let result = sum_statistics(batches.into_values().flatten()).and_then(|summed| {
                if summed.is_empty() {
                    return Ok(Vec::new());
                }
                let mut session = plugin.session(ctx.clone())?;
                Ok(session.finalize(&summed, &plugin.meta)?)
            });
            match result {
                Ok(scores) => corpus.extend(scores),
                Err(e) => {
                    metric_errors.insert(name.clone(), format!("corpus scores: {e:#}"));
                }
            }
        }
    }
    let started = Instant::now();
    // The aggregates cover the run's stored samples. When this execution stored every one,
    // those are the records in hand (the store gives scores back bit for bit); otherwise an
    // earlier, interrupted execution may have stored some, so read them.
    let stored = if stored_here.len() == n {
        stored_here.sort_by_key(|s| s.index);
        stored_here
    } else {
        store.samples(run_id)?
    };
    let aggregates = aggregate(&stored, |s| &s.scores);
    let reference_aggregates = aggregate(&stored, |s| &s.reference_scores);
    let (aggregates, unrepresentable) = representable(aggregates);
    let (reference_aggregates, _) = representable(reference_aggregates);
    for score in unrepresentable {
        metric_errors.insert(
            score.clone(),
            format!("the mean of {score} over the run cannot be represented as a finite number"),
        );
    }
    tracing::debug!("eval: aggregates took {:.1?}", started.elapsed());
    // A metric that failed on every sample it was given is a failure of the run, not a
    // success with an empty column.
    let failed_everywhere = if cancelled {
        Vec::new()
    } else {
        failed_on_every_sample(plugins, &stored)
    };
    let stop_failure = if cancelled {
        (env.stopped_because)()
    } else {
        None
    };
    let final_status = match (&outcome, cancelled) {
        (Err(_), _) => RunStatus::Failed,
        (Ok(()), true) if stop_failure.is_some() => RunStatus::Failed,
        (Ok(()), true) => RunStatus::Cancelled,
        (Ok(()), false) if !failed_everywhere.is_empty() => RunStatus::Failed,
        (Ok(()), false) => RunStatus::Done,
    };
    let error = match &outcome {
        Err(e) => Some(format!("{e:#}")),
        Ok(()) if stop_failure.is_some() => stop_failure.clone(),
        Ok(()) if !failed_everywhere.is_empty() => Some(
            failed_everywhere
                .iter()
                .map(|(metric, example)| {
                    format!("metric {metric} failed on every sample: {example}")
                })
                .collect::<Vec<_>>()
                .join("; "),
        ),
        Ok(()) => None,
    };
    let started = Instant::now();
    let run = store.end_run(run_id, final_status, error, |r| {
        r.aggregates = aggregates.clone();
        r.reference_aggregates = reference_aggregates.clone();
        r.corpus = corpus.clone();
        r.metric_errors.extend(metric_errors.clone());
    })?;
    tracing::debug!("eval: finishing the run took {:.1?}", started.elapsed());
    outcome.map(|()| (run, stored))
}

/// Splits off the estimates that JSON and the store cannot hold (an overflowed mean).
fn representable(
    estimates: BTreeMap<String, Estimate>,
) -> (BTreeMap<String, Estimate>, Vec<String>) {
    let mut bad = Vec::new();
    let kept = estimates
        .into_iter()
        .filter(|(name, e)| {
            let ok = crate::eval::stats::is_representable(e);
            if !ok {
                bad.push(name.clone());
            }
            ok
        })
        .collect();
    (kept, bad)
}

/// The metrics (with one of their errors) that scored none of the stored samples.
fn failed_on_every_sample(plugins: &[Plugin], stored: &[SampleRecord]) -> Vec<(String, String)> {
    if stored.is_empty() {
        return Vec::new();
    }
    plugins
        .iter()
        .filter_map(|p| {
            let name = &p.meta.name;
            let example = stored.iter().find_map(|s| s.errors.get(name))?;
            stored
                .iter()
                .all(|s| s.errors.contains_key(name))
                .then(|| (name.clone(), example.clone()))
        })
        .collect()
}

/// Mean and bootstrap interval of every score over the samples that have it.
pub fn aggregate(
    samples: &[SampleRecord],
    scores: impl Fn(&SampleRecord) -> &BTreeMap<String, f64>,
) -> BTreeMap<String, Estimate> {
    let mut by_score: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for s in samples {
        for (name, v) in scores(s) {
            by_score.entry(name.clone()).or_default().push(*v);
        }
    }
    // Scores with as many values share their resample draws (see `bootstrap_means`).
    let mut by_count: BTreeMap<usize, Vec<(&String, &[f64])>> = BTreeMap::new();
    for (name, values) in &by_score {
        by_count
            .entry(values.len())
            .or_default()
            .push((name, values));
    }
    let mut out = BTreeMap::new();
    for columns in by_count.into_values() {
        let values: Vec<&[f64]> = columns.iter().map(|(_, v)| *v).collect();
        for ((name, _), estimate) in columns.iter().zip(bootstrap_means(&values)) {
            out.insert((*name).clone(), estimate);
        }
    }
    out
}

/// Sum statistics name by name: counts exactly (overflow is an error), float sums in the
/// order given. A name that changes kind between batches is an error.
pub fn sum_statistics(
    batches: impl IntoIterator<Item = (String, Statistic)>,
) -> Result<Vec<(String, Statistic)>> {
    let mut sums: BTreeMap<String, Statistic> = BTreeMap::new();
    for (name, value) in batches {
        let Some(sum) = sums.get_mut(&name) else {
            sums.insert(name, value);
            continue;
        };
        *sum = match (*sum, value) {
            (Statistic::Count(a), Statistic::Count(b)) => Statistic::Count(
                a.checked_add(b)
                    .with_context(|| format!("statistic {name:?} overflows a 64-bit count"))?,
            ),
            (Statistic::Sum(a), Statistic::Sum(b)) => Statistic::Sum(a + b),
            _ => bail!("statistic {name:?} is a count in one batch and a sum in another"),
        };
    }
    Ok(sums.into_iter().collect())
}

/// One instance's share of a metric: its ranges of samples, scored in batches.
struct MetricJob {
    metric: usize,
    plugin: Plugin,
    ctx: CallContext,
    samples: Arc<Vec<Sample>>,
    ranges: Vec<std::ops::Range<usize>>,
    batch_size: usize,
    /// One batch covers every prediction (a 0.1.0 metric's batch corpus then stands).
    whole_set: bool,
    cancel: Arc<AtomicBool>,
    tx: mpsc::Sender<BatchDone>,
}

impl MetricJob {
    fn run(self) {
        let MetricJob {
            metric,
            plugin,
            ctx,
            samples,
            ranges,
            batch_size,
            whole_set,
            cancel,
            tx,
        } = self;
        let mut session = match plugin.session(ctx) {
            Ok(s) => s,
            Err(e) => {
                let message = e.to_string();
                let indices: Vec<usize> = ranges.iter().flat_map(|r| r.clone()).collect();
                let _ = tx.send(BatchDone {
                    metric,
                    results: indices.iter().map(|_| Err(pointer_to(&message))).collect(),
                    indices,
                    statistics: vec![],
                    batch_corpus: vec![],
                    batch_error: Some(message),
                });
                return;
            }
        };
        for range in ranges {
            let mut start = range.start;
            while start < range.end {
                let end = (start + batch_size).min(range.end);
                if cancel.load(Ordering::Relaxed) {
                    // Unscored samples of a cancelled run keep the reason instead of vanishing.
                    let _ = tx.send(BatchDone {
                        metric,
                        results: (start..end).map(|_| Err("run cancelled".into())).collect(),
                        indices: (start..end).collect(),
                        statistics: vec![],
                        batch_corpus: vec![],
                        batch_error: None,
                    });
                    start = end;
                    continue;
                }
                let started = Instant::now();
                let mut scorer = Scorer {
                    metric,
                    plugin: &plugin,
                    session: &mut session,
                    samples: &samples,
                    whole_set: whole_set && start == 0,
                    tx: &tx,
                };
                if !scorer.score(start, end, true) {
                    return;
                }
                tracing::debug!(
                    "eval: {} scored {} samples in {:.1?}",
                    plugin.meta.name,
                    end - start,
                    started.elapsed()
                );
                start = end;
            }
        }
    }
}

/// Scores ranges of samples with one metric, narrowing failures down to the samples that
/// cause them.
struct Scorer<'a> {
    metric: usize,
    plugin: &'a Plugin,
    session: &'a mut crate::plugin::Session,
    samples: &'a [Sample],
    whole_set: bool,
    tx: &'a mpsc::Sender<BatchDone>,
}

impl Scorer<'_> {
    /// Score `samples[start..end]` and send what came of each sample. When the batch traps,
    /// times out, runs out of memory or returns malformed output, its halves are scored
    /// apart, down to single samples, so only the culprits carry the error and every other
    /// sample keeps its score. Returns false once nobody listens any more.
    fn score(&mut self, start: usize, end: usize, top: bool) -> bool {
        let batch = &self.samples[start..end];
        let (results, statistics, batch_corpus, batch_error) =
            match self.session.score(batch, &self.plugin.meta) {
                Ok(b) => (
                    b.samples.into_iter().map(from_sample_result).collect(),
                    b.statistics,
                    if top && self.whole_set {
                        b.batch_corpus
                    } else {
                        Vec::new()
                    },
                    None,
                ),
                Err(e) if batch.len() > 1 && is_isolatable(&e) => {
                    tracing::warn!("{e}; scoring its batch in halves to find the failing samples");
                    let mid = start + batch.len() / 2;
                    return self.score(start, mid, false) && self.score(mid, end, false);
                }
                Err(PluginError::Failed { message, .. }) if batch.len() > 1 => {
                    let results = batch.iter().map(|_| Err(pointer_to(&message))).collect();
                    (results, Vec::new(), Vec::new(), Some(message))
                }
                Err(e) => {
                    let message = e.to_string();
                    (
                        batch.iter().map(|_| Err(message.clone())).collect(),
                        Vec::new(),
                        Vec::new(),
                        None,
                    )
                }
            };
        self.tx
            .send(BatchDone {
                metric: self.metric,
                indices: (start..end).collect(),
                results,
                statistics,
                batch_corpus,
                batch_error,
            })
            .is_ok()
    }
}

/// Failures that may come from one sample of the batch rather than from the batch.
fn is_isolatable(e: &PluginError) -> bool {
    matches!(
        e,
        PluginError::Trap { .. }
            | PluginError::Malformed { .. }
            | PluginError::Timeout { .. }
            | PluginError::OutOfMemory { .. }
            | PluginError::MemoryBudget { .. }
    )
}

/// What each sample of a failed batch says: the start of the batch's error, which is stored
/// once, whole, in the run's `metric_errors`.
fn pointer_to(message: &str) -> String {
    format!(
        "the whole batch failed (the run's metric errors hold the full message): {}",
        crate::plugin::limits::truncate(message, 200)
    )
}

fn from_sample_result(r: SampleResult) -> Result<Vec<(String, f64)>, String> {
    match r {
        SampleResult::Scores(s) => Ok(s),
        SampleResult::Error(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_per_plugin() {
        let s = parse_settings(&[
            "rouge.use_stemmer=false".into(),
            "judge.model=gpt-4o=x".into(),
        ])
        .unwrap();
        assert_eq!(s["rouge"]["use_stemmer"], "false");
        assert_eq!(s["judge"]["model"], "gpt-4o=x");
        assert!(parse_settings(&["use_stemmer=false".into()]).is_err());
        assert!(parse_settings(&["rouge.x".into()]).is_err());
    }
}
