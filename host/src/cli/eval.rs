//! `adapterlab eval`: score a predictions file with metric plugins and store the run.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::{Context as _, Result};
use clap::Args;
use serde_json::json;

use crate::cli::output::{progress_bar, table};
use crate::cli::{Context, ExitCode};
use crate::eval::input::read_predictions;
use crate::eval::pipeline::{self, EvalEnv, EvalRequest};
use crate::store::{Estimate, RunRecord, RunStatus, SampleRecord};

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// JSON Lines file: one object a line with `id`, `prediction`, `reference` and optionally
    /// `source` (the dialogue).
    #[arg(long, value_name = "FILE.jsonl")]
    pub predictions: PathBuf,

    /// Metric plugins to run, comma-separated (see `adapterlab plugins list`).
    #[arg(long, value_delimiter = ',', required = true, value_name = "NAME,...")]
    pub metrics: Vec<String>,

    /// A plugin setting, PLUGIN.KEY=VALUE (repeatable), e.g. rouge.use_stemmer=false,
    /// judge.model=gpt-4o-mini. `PLUGIN.batch_size=N` sets how many samples a call gets,
    /// `PLUGIN.parallel=N` how many instances share a metric's samples (0.2.0 metrics with
    /// independent samples; default: the cores, up to 8, with 1000 samples or more each).
    #[arg(long = "set", value_name = "PLUGIN.KEY=VALUE")]
    pub settings: Vec<String>,

    /// A name for the run (default: the predictions file's name).
    #[arg(long)]
    pub name: Option<String>,

    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "OUT.json")]
    pub json: Option<PathBuf>,

    /// Also score each reference as if it were a prediction, to set the human summaries
    /// beside the model's.
    #[arg(long)]
    pub score_references: bool,

    /// Exit with code 4 when any sample has an error (by default only a metric that failed on
    /// every sample makes `eval` fail, with code 3).
    #[arg(long)]
    pub strict: bool,
}

/// `eval`'s exit code when a metric failed on every sample (the run is `failed`).
pub const EXIT_METRIC_FAILED: u8 = 3;
/// `eval --strict`'s exit code when some samples have errors.
pub const EXIT_SAMPLE_ERRORS: u8 = 4;

pub fn run(args: EvalArgs, ctx: &Context) -> Result<()> {
    // `-v` prints how long each phase took.
    let mut phase = Instant::now();
    let mut took = |what: &str| {
        tracing::debug!("eval: {what} took {:.1?}", phase.elapsed());
        phase = Instant::now();
    };
    let rows = read_predictions(&args.predictions)?;
    let request = EvalRequest {
        name: args.name.clone().unwrap_or_else(|| {
            args.predictions
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "eval".into())
        }),
        rows,
        metrics: args.metrics.clone(),
        settings: pipeline::parse_settings(&args.settings)?,
        score_references: args.score_references,
        metadata: BTreeMap::from([(
            "predictions".to_string(),
            args.predictions.display().to_string(),
        )]),
        llm_base_url: None,
    };
    took("reading the predictions");
    let registry = ctx.registry()?;
    let plugins = pipeline::validate(&registry, &request)?;
    took("loading the plugins");
    let store = ctx.store()?;
    took("opening the store");
    let run = pipeline::create_run(&store, &request, &plugins)?;
    took("creating the run");

    let runtime = tokio::runtime::Runtime::new().context("failed to start the async runtime")?;
    let services = Arc::new(ctx.eval_services(runtime.handle().clone(), &store)?);
    let bar = progress_bar(request.rows.len() as u64, "scoring");
    let bar2 = bar.clone();
    let env = EvalEnv {
        store: store.clone(),
        services: services.clone(),
        cancel: Arc::new(AtomicBool::new(false)),
        on_progress: Arc::new(move |done, _| bar2.set_position(done)),
        stopped_because: EvalEnv::user_stops(),
    };
    let result = pipeline::execute_with_samples(&env, &run.id, &request, &plugins);
    bar.finish_and_clear();
    took("the pipeline");
    services.record(&store, &run.id)?;
    let (run, samples) = result?;
    // Re-read: usage and encoders were recorded after the pipeline returned its copy.
    let run = store.get_run(&run.id)?.unwrap_or(run);
    took("reading the run back");

    print_summary(&run, &samples);
    if let Some(path) = &args.json {
        let doc = results_json(&run, &samples);
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("failed to write {}", path.display()))?;
    }
    took("printing and writing the results");
    if run.status == RunStatus::Failed {
        return Err(ExitCode::new(
            EXIT_METRIC_FAILED,
            format!(
                "run {} failed: {}",
                run.id,
                run.error.as_deref().unwrap_or("see `adapterlab runs show`")
            ),
        )
        .into());
    }
    let with_errors = samples.iter().filter(|s| !s.errors.is_empty()).count();
    if args.strict && with_errors > 0 {
        return Err(ExitCode::new(
            EXIT_SAMPLE_ERRORS,
            format!(
                "--strict: {with_errors} of {} samples have errors (run {})",
                samples.len(),
                run.id
            ),
        )
        .into());
    }
    Ok(())
}

/// The `--json` document: the contract scripts rely on.
pub fn results_json(run: &RunRecord, samples: &[SampleRecord]) -> serde_json::Value {
    let est = |e: &Estimate| json!({"mean": e.mean, "low": e.low, "high": e.high});
    let mut doc = json!({
        "run_id": run.id,
        "name": run.name,
        "status": run.status.as_str(),
        "aggregates": run.aggregates.iter().map(|(k, e)| (k.clone(), est(e))).collect::<serde_json::Map<_, _>>(),
        "corpus": run.corpus,
        "metric_errors": run.metric_errors,
        "plugins": run.plugins,
        "error": run.error,
        "samples": samples.iter().map(|s| {
            let mut v = json!({"id": s.id, "scores": s.scores, "errors": s.errors});
            if !s.reference_scores.is_empty() {
                v["reference_scores"] = json!(s.reference_scores);
            }
            v
        }).collect::<Vec<_>>(),
        "usage": run.usage,
        "metadata": run.metadata,
    });
    if !run.reference_aggregates.is_empty() {
        doc["reference_aggregates"] = run
            .reference_aggregates
            .iter()
            .map(|(k, e)| (k.clone(), est(e)))
            .collect::<serde_json::Map<_, _>>()
            .into();
    }
    doc
}

pub fn print_summary(run: &RunRecord, samples: &[SampleRecord]) {
    println!(
        "run {} ({}): {} samples, {}",
        run.id,
        run.name,
        samples.len(),
        run.status.as_str()
    );
    if let Some(encoder) = run.metadata.get("encoder") {
        println!("encoder: {encoder}");
    }
    let mut rows = Vec::new();
    for (score, e) in &run.aggregates {
        let reference = run
            .reference_aggregates
            .get(score)
            .map(|r| format!("{:.4} [{:.4}, {:.4}]", r.mean, r.low, r.high))
            .unwrap_or_default();
        let n = samples
            .iter()
            .filter(|s| s.scores.contains_key(score))
            .count();
        rows.push(vec![
            score.clone(),
            format!("{:.4}", e.mean),
            format!("[{:.4}, {:.4}]", e.low, e.high),
            n.to_string(),
            reference,
        ]);
    }
    let header = if run.reference_aggregates.is_empty() {
        vec!["SCORE", "MEAN", "95% CI", "N"]
    } else {
        vec!["SCORE", "MEAN", "95% CI", "N", "REFERENCE (HUMAN)"]
    };
    let rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|mut r| {
            r.truncate(header.len());
            r
        })
        .collect();
    print!("{}", table(&header, &rows));
    for (k, v) in &run.corpus {
        println!("corpus {k}: {v:.4}");
    }
    for (metric, e) in &run.metric_errors {
        eprintln!("error: {metric}: {e}");
    }
    let mut errors: BTreeMap<&str, usize> = BTreeMap::new();
    for s in samples {
        for plugin in s.errors.keys() {
            *errors.entry(plugin.as_str()).or_default() += 1;
        }
    }
    for (plugin, count) in errors {
        let example = samples
            .iter()
            .find_map(|s| s.errors.get(plugin).map(|e| (s.id.as_str(), e.as_str())));
        if let Some((id, e)) = example {
            eprintln!("warning: {plugin} failed on {count} sample(s), e.g. {id}: {e}");
        }
    }
    if run.usage.requests + run.usage.cached > 0 {
        let u = &run.usage;
        println!(
            "LLM: {} requests, {} from cache, {} prompt + {} completion tokens, ~${:.4}",
            u.requests, u.cached, u.prompt_tokens, u.completion_tokens, u.cost_usd
        );
    }
}
