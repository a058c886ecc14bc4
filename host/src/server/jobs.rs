//! The job queue, persisted in the store as runs with a status. Evaluations run in parallel
//! up to a bound; model jobs (train, generate) run one at a time, in the order they were
//! queued, since they own the GPU. On start, runs a dead process left `running` become
//! `interrupted` (never silently running) and can be resumed: evaluations and generations
//! start over, training continues from its last checkpoint. `queued` runs are picked up again.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};

use anyhow::{Context as _, Result, bail};

use crate::eval::pipeline::{self, EvalEnv, EvalRequest};
use crate::eval::services::EvalServices;
use crate::infer::Models;
use crate::infer::run::{self as generate, GenerateEnv, GenerateRequest};
use crate::llm::{LlmClient, LlmConfig};
use crate::paths::DataDir;
use crate::plugin::{PluginKind, Registry};
use crate::store::{RunEvent, RunKind, RunRecord, RunStatus, Store, new_run_id, now_rfc3339};
use crate::train::config::TrainConfig;
use crate::train::{TrainEnv, data, record, trainer};

/// Evaluations allowed to run at once.
const EVAL_CONCURRENCY: usize = 2;

#[derive(Clone)]
pub struct Jobs {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    registry: Arc<RwLock<Registry>>,
    data_dir: DataDir,
    models: Arc<Models>,
    cancels: Mutex<HashMap<String, Arc<AtomicBool>>>,
    eval_slots: (Mutex<usize>, Condvar),
    /// Model jobs take a ticket and run when it is served: one at a time, first come first
    /// served.
    model_lane: (Mutex<Lane>, Condvar),
    /// Serves the LLM client's async I/O for plugin calls made on worker threads. An `Option`
    /// so `Drop` can shut it down without blocking, since the last `Jobs` may be dropped
    /// inside the server's own runtime.
    io: Option<tokio::runtime::Runtime>,
}

#[derive(Default)]
struct Lane {
    next_ticket: u64,
    serving: u64,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(io) = self.io.take() {
            io.shutdown_background();
        }
    }
}

/// A training request as the API takes it: the train keys, and an optional run name (also the
/// adapter's name).
pub struct TrainSubmission {
    pub name: Option<String>,
    pub config: serde_json::Value,
}

impl Jobs {
    pub fn start(
        store: Store,
        registry: Arc<RwLock<Registry>>,
        data_dir: DataDir,
        models: Arc<Models>,
    ) -> Result<Self> {
        let io = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("llm-io")
            .build()?;
        let jobs = Jobs {
            inner: Arc::new(Inner {
                store,
                registry,
                data_dir,
                models,
                cancels: Mutex::new(HashMap::new()),
                eval_slots: (Mutex::new(EVAL_CONCURRENCY), Condvar::new()),
                model_lane: (Mutex::new(Lane::default()), Condvar::new()),
                io: Some(io),
            }),
        };
        jobs.reconcile()?;
        Ok(jobs)
    }

    pub fn models(&self) -> &Arc<Models> {
        &self.inner.models
    }

    /// The store is locked by one process at a time, so a run marked running when we open
    /// it belongs to a process that died.
    fn reconcile(&self) -> Result<()> {
        let store = &self.inner.store;
        // Oldest first, so re-queued model jobs keep their order.
        let mut runs = store.list_runs()?;
        runs.sort_by(|a, b| a.id.cmp(&b.id));
        for run in runs {
            match run.status {
                RunStatus::Running => {
                    let resume = match run.kind {
                        RunKind::Train => "resume it to continue from its last checkpoint",
                        _ => "resume it to run it again",
                    };
                    store.update_run(&run.id, |r| {
                        r.status = RunStatus::Interrupted;
                        r.error = Some(format!(
                            "the server stopped while this run was in progress; {resume}"
                        ));
                        r.owner_pid = None;
                    })?;
                    store.push_event(
                        &run.id,
                        &RunEvent::Status {
                            status: RunStatus::Interrupted,
                        },
                    )?;
                }
                RunStatus::Queued => self.dispatch(run)?,
                _ => {}
            }
        }
        Ok(())
    }

    /// Validate and queue an evaluation.
    pub fn submit_eval(&self, request: EvalRequest) -> Result<RunRecord> {
        let plugins = {
            let registry = self.inner.registry.read().unwrap();
            pipeline::validate(&registry, &request)?
        };
        let run = pipeline::create_run(&self.inner.store, &request, &plugins)?;
        self.dispatch(run.clone())?;
        Ok(run)
    }

    /// Validate and queue a training run. Everything checkable before the model loads is
    /// checked here: the keys, the values, the formatter, the dataset's rows, the metrics of
    /// `eval_after_train`, where the outputs go.
    pub fn submit_train(&self, submission: TrainSubmission) -> Result<RunRecord> {
        let mut config = TrainConfig::from_json(&submission.config)?;
        let id = new_run_id();
        let given = submission.config.get("output_dir").and_then(|v| v.as_str());
        let output_dir = resolve_output_dir(&self.inner.data_dir, given, &id)?;
        config.output_dir = output_dir.display().to_string();
        generate::check_model(&config.model_name_or_path, "config.model_name_or_path")?;
        adapterlab_model::commands::check_target_modules(
            &config.model_name_or_path,
            &config.lora.target_modules,
            &adapterlab_model::commands::Runtime::cpu(self.inner.data_dir.assets()),
        )
        .context("config.lora.target_modules")?;
        {
            let registry = self.inner.registry.read().unwrap();
            registry
                .get(&config.formatter, PluginKind::Formatter)
                .context("config.formatter")?;
            let splits = data::load_splits(&config.dataset).context("config.dataset")?;
            data::render(&splits.train, &config.formatter, Some(&registry))
                .context("config.dataset")?;
            if let Some(v) = &splits.validation {
                data::render(v, &config.formatter, Some(&registry)).context("config.dataset")?;
            }
            if !config.eval_after_train.is_empty() {
                pipeline::validate_metrics(
                    &registry,
                    &config.eval_after_train,
                    &Default::default(),
                )
                .context("config.eval_after_train")?;
            }
        }
        let busy = self.inner.store.list_runs()?.into_iter().find(|r| {
            r.kind == RunKind::Train
                && matches!(r.status, RunStatus::Queued | RunStatus::Running)
                && r.metadata.get("output_dir") == Some(&config.output_dir)
        });
        if let Some(other) = busy {
            bail!(
                "config.output_dir: {} is the output folder of run {}, which is {}",
                config.output_dir,
                other.id,
                other.status.as_str()
            );
        }
        let name = submission
            .name
            .map(|n| n.trim().to_string())
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| {
                let model = Path::new(&config.model_name_or_path)
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| config.model_name_or_path.clone());
                format!("{model}-lora-{}", &id[id.len() - 6..])
            });
        let run = record::create_run_with_id(&self.inner.store, id, &config, Some(name))?;
        self.dispatch(run.clone())?;
        Ok(run)
    }

    /// Validate and queue a generate run.
    pub fn submit_generate(&self, request: GenerateRequest) -> Result<RunRecord> {
        let (request, plugins) = {
            let registry = self.inner.registry.read().unwrap();
            generate::prepare(
                request,
                &registry,
                &self.inner.store,
                self.inner.models.served(),
            )?
        };
        let run = generate::create_run(&self.inner.store, &request, &plugins)?;
        self.dispatch(run.clone())?;
        Ok(run)
    }

    fn dispatch(&self, run: RunRecord) -> Result<()> {
        let cancel = Arc::new(AtomicBool::new(false));
        self.inner
            .cancels
            .lock()
            .unwrap()
            .insert(run.id.clone(), cancel.clone());
        let this = self.clone();
        let short = &run.id[run.id.len().saturating_sub(8)..];
        match run.kind {
            RunKind::Eval => {
                let request: EvalRequest = self
                    .inner
                    .store
                    .request(&run.id)?
                    .with_context(|| format!("run {} has no stored request", run.id))?;
                std::thread::Builder::new()
                    .name(format!("eval-{short}"))
                    .spawn(move || {
                        this.acquire_eval_slot();
                        if !cancel.load(Ordering::Relaxed) {
                            if let Err(e) = this.run_eval(&run.id, &request, cancel.clone()) {
                                tracing::warn!("eval run {} failed: {e:#}", run.id);
                            }
                        }
                        this.release_eval_slot();
                        this.forget_cancel(&run.id, &cancel);
                    })?;
            }
            RunKind::Train | RunKind::Generate => {
                let ticket = {
                    let mut lane = self.inner.model_lane.0.lock().unwrap();
                    lane.next_ticket += 1;
                    lane.next_ticket - 1
                };
                std::thread::Builder::new()
                    .name(format!("{}-{short}", run.kind.as_str()))
                    .spawn(move || {
                        let turn = this.wait_for_turn(ticket);
                        let still_queued = this
                            .inner
                            .store
                            .get_run(&run.id)
                            .ok()
                            .flatten()
                            .is_some_and(|r| r.status == RunStatus::Queued);
                        if still_queued && !cancel.load(Ordering::Relaxed) {
                            let result = match run.kind {
                                RunKind::Train => this.run_train(&run, cancel.clone()),
                                _ => this.run_generate(&run, cancel.clone()),
                            };
                            if let Err(e) = result {
                                tracing::warn!(
                                    "{} run {} failed: {e:#}",
                                    run.kind.as_str(),
                                    run.id
                                );
                            }
                        }
                        drop(turn);
                        this.forget_cancel(&run.id, &cancel);
                    })?;
            }
        }
        Ok(())
    }

    /// Drops a finished job's cancel flag, unless a resumed run has put its own there since.
    fn forget_cancel(&self, run_id: &str, flag: &Arc<AtomicBool>) {
        let mut cancels = self.inner.cancels.lock().unwrap();
        if cancels.get(run_id).is_some_and(|f| Arc::ptr_eq(f, flag)) {
            cancels.remove(run_id);
        }
    }

    fn wait_for_turn(&self, ticket: u64) -> Turn {
        let (lock, cv) = &self.inner.model_lane;
        let mut lane = lock.lock().unwrap();
        while lane.serving != ticket {
            lane = cv.wait(lane).unwrap();
        }
        Turn { jobs: self.clone() }
    }

    fn acquire_eval_slot(&self) {
        let (lock, cv) = &self.inner.eval_slots;
        let mut free = lock.lock().unwrap();
        while *free == 0 {
            free = cv.wait(free).unwrap();
        }
        *free -= 1;
    }

    fn release_eval_slot(&self) {
        let (lock, cv) = &self.inner.eval_slots;
        *lock.lock().unwrap() += 1;
        cv.notify_one();
    }

    /// The services behind `embed` and `chat` for one run's plugins, and its eval env.
    fn eval_env(&self, cancel: Arc<AtomicBool>) -> Result<(EvalEnv, Arc<EvalServices>)> {
        let store = self.inner.store.clone();
        let llm = LlmClient::new(LlmConfig::from_env(), Some(store.clone()))?;
        let services = Arc::new(EvalServices::new(
            Some((
                llm,
                self.inner
                    .io
                    .as_ref()
                    .expect("present until drop")
                    .handle()
                    .clone(),
            )),
            crate::eval::services::default_encoders(&self.inner.data_dir),
        ));
        let env = EvalEnv {
            store,
            services: services.clone(),
            cancel,
            on_progress: Arc::new(|_, _| {}),
        };
        Ok((env, services))
    }

    fn run_eval(&self, run_id: &str, request: &EvalRequest, cancel: Arc<AtomicBool>) -> Result<()> {
        let store = self.inner.store.clone();
        let plugins = {
            let registry = self.inner.registry.read().unwrap();
            match pipeline::validate(&registry, request) {
                Ok(p) => p,
                Err(e) => {
                    store.update_run(run_id, |r| {
                        r.status = RunStatus::Failed;
                        r.error = Some(format!("{e:#}"));
                        r.finished = Some(now_rfc3339());
                    })?;
                    return Err(e);
                }
            }
        };
        let (env, services) = self.eval_env(cancel)?;
        let result = pipeline::execute(&env, run_id, request, &plugins);
        services.record(&store, run_id)?;
        result.map(|_| ())
    }

    /// Trains, recording steps and the adapter. A run that was started before (interrupted,
    /// cancelled, failed) continues from the newest checkpoint in its output folder.
    fn run_train(&self, run: &RunRecord, cancel: Arc<AtomicBool>) -> Result<()> {
        let store = &self.inner.store;
        let config: TrainConfig = store
            .request(&run.id)
            .context("the run's stored config is unreadable")?
            .with_context(|| format!("run {} has no stored config", run.id))?;
        let started_before = store.get_run(&run.id)?.is_some_and(|r| r.started.is_some());
        let checkpoint = trainer::find_checkpoint(Path::new(&config.output_dir), "latest").ok();
        if started_before && checkpoint.is_none() {
            store.push_event(
                &run.id,
                &RunEvent::Log {
                    level: "info".into(),
                    message: "no checkpoint was saved before the run stopped; starting over".into(),
                },
            )?;
        }
        let env = TrainEnv {
            assets_dir: self.inner.data_dir.assets(),
            registry: Some(self.inner.registry.read().unwrap().clone()),
            resume_from_checkpoint: checkpoint
                .filter(|_| started_before)
                .map(|_| "latest".to_string()),
            cancel: Some(cancel),
            ..Default::default()
        };
        let result = record::run_recorded(store, &run.id, &config, env);
        store.flush()?;
        result.map(|_| ())
    }

    fn run_generate(&self, run: &RunRecord, cancel: Arc<AtomicBool>) -> Result<()> {
        let request: GenerateRequest = self
            .inner
            .store
            .request(&run.id)
            .context("the run's stored request is unreadable")?
            .with_context(|| format!("run {} has no stored request", run.id))?;
        let (eval, services) = self.eval_env(cancel)?;
        let env = GenerateEnv {
            store: self.inner.store.clone(),
            models: self.inner.models.clone(),
            registry: self.inner.registry.read().unwrap().clone(),
            eval,
        };
        let result = generate::execute(&env, &run.id, &request);
        services.record(&self.inner.store, &run.id)?;
        result.map(|_| ())
    }

    /// Cancel a queued or running job. A running evaluation stops after its current batch,
    /// a generation after its current batch, a training after its current step (its last
    /// checkpoint stays, to resume from); what it stored stays.
    pub fn cancel(&self, id: &str) -> Result<RunRecord> {
        let run = self.inner.store.resolve_run(id)?;
        if run.status.is_finished() {
            return Ok(run);
        }
        if let Some(flag) = self.inner.cancels.lock().unwrap().get(&run.id) {
            flag.store(true, Ordering::Relaxed);
        }
        if run.status == RunStatus::Queued {
            let run = self.inner.store.update_run(&run.id, |r| {
                r.status = RunStatus::Cancelled;
                r.finished = Some(now_rfc3339());
            })?;
            self.inner.store.push_event(
                &run.id,
                &RunEvent::Status {
                    status: RunStatus::Cancelled,
                },
            )?;
            return Ok(run);
        }
        Ok(self.inner.store.resolve_run(id)?)
    }

    /// Queue an interrupted (or failed, or cancelled) run again from its stored request.
    pub fn resume(&self, id: &str) -> Result<RunRecord> {
        let run = self.inner.store.resolve_run(id)?;
        if matches!(
            run.status,
            RunStatus::Queued | RunStatus::Running | RunStatus::Done
        ) {
            bail!(
                "run {} is {}; only interrupted, failed or cancelled runs can be resumed",
                run.id,
                run.status.as_str()
            );
        }
        let run = self.inner.store.update_run(&run.id, |r| {
            r.status = RunStatus::Queued;
            r.error = None;
            r.finished = None;
        })?;
        self.inner.store.push_event(
            &run.id,
            &RunEvent::Status {
                status: RunStatus::Queued,
            },
        )?;
        self.dispatch(run.clone())?;
        Ok(run)
    }
}

/// A model job's turn on the lane; the next ticket is served when it ends, even by a panic.
struct Turn {
    jobs: Jobs,
}

impl Drop for Turn {
    fn drop(&mut self) {
        let (lock, cv) = &self.jobs.inner.model_lane;
        lock.lock().unwrap_or_else(|e| e.into_inner()).serving += 1;
        cv.notify_all();
    }
}

/// Where a server-launched training writes: `<data>/runs/<run id>` by default; a relative
/// `output_dir` goes under `<data>/runs/` and may not climb out of it; an absolute one is the
/// caller's explicit choice, but never inside the data directory's own folders (the store,
/// plugins, caches) nor into an existing folder that holds something other than training
/// outputs.
pub fn resolve_output_dir(
    data_dir: &DataDir,
    given: Option<&str>,
    run_id: &str,
) -> Result<PathBuf> {
    let runs = data_dir.runs();
    let Some(given) = given.map(str::trim).filter(|g| !g.is_empty()) else {
        return Ok(runs.join(run_id));
    };
    let path = Path::new(given);
    if path.is_relative() {
        if !path.components().all(|c| matches!(c, Component::Normal(_))) {
            bail!(
                "config.output_dir: {given:?} must stay inside the data directory's runs/ folder (no `..`), or be an absolute path"
            );
        }
        return Ok(runs.join(path));
    }
    let root = data_dir.root();
    if path.starts_with(root) && !path.starts_with(&runs) {
        bail!(
            "config.output_dir: {given:?} is inside the data directory but outside its runs/ folder"
        );
    }
    if path.is_file() {
        bail!("config.output_dir: {given:?} is a file");
    }
    if path.is_dir() {
        let mut entries = std::fs::read_dir(path)
            .with_context(|| format!("config.output_dir: cannot read {given}"))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned());
        let foreign = entries.find(|name| {
            !(name.starts_with("checkpoint-")
                || name.starts_with(".checkpoint-")
                || matches!(
                    name.as_str(),
                    "adapter_config.json"
                        | "adapter_model.safetensors"
                        | "trainer_state.json"
                        | "README.md"
                ))
        });
        if let Some(name) = foreign {
            bail!(
                "config.output_dir: {given:?} already holds {name:?}, which is not a training output; choose an empty or new folder"
            );
        }
    }
    Ok(path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_dirs_stay_where_they_are_allowed() {
        let tmp = tempfile::tempdir().unwrap();
        let data = DataDir::resolve(Some(&tmp.path().join("data"))).unwrap();
        let runs = data.runs();
        assert_eq!(
            resolve_output_dir(&data, None, "r1").unwrap(),
            runs.join("r1")
        );
        assert_eq!(
            resolve_output_dir(&data, Some(" "), "r1").unwrap(),
            runs.join("r1")
        );
        assert_eq!(
            resolve_output_dir(&data, Some("mine/v2"), "r1").unwrap(),
            runs.join("mine/v2")
        );
        let e = resolve_output_dir(&data, Some("../../etc"), "r1").unwrap_err();
        assert!(e.to_string().contains("runs/"), "{e}");
        let store = data.store();
        let e = resolve_output_dir(&data, Some(store.to_str().unwrap()), "r1").unwrap_err();
        assert!(e.to_string().contains("outside its runs/"), "{e}");
        let elsewhere = tmp.path().join("elsewhere");
        assert_eq!(
            resolve_output_dir(&data, Some(elsewhere.to_str().unwrap()), "r1").unwrap(),
            elsewhere
        );
        std::fs::create_dir_all(&elsewhere).unwrap();
        std::fs::create_dir_all(elsewhere.join("checkpoint-4")).unwrap();
        assert!(resolve_output_dir(&data, Some(elsewhere.to_str().unwrap()), "r1").is_ok());
        std::fs::write(elsewhere.join("notes.txt"), "mine").unwrap();
        let e = resolve_output_dir(&data, Some(elsewhere.to_str().unwrap()), "r1").unwrap_err();
        assert!(e.to_string().contains("notes.txt"), "{e}");
    }
}
