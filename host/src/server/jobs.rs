//! The job queue, persisted in the store as runs with a status. Evaluations run in parallel
//! up to a bound; model jobs (train, generate) run one at a time, in the order they were
//! queued, since they own the GPU. On start, runs a dead process left `running` become
//! `interrupted` (never silently running) and can be resumed: evaluations and generations
//! start over, training continues from its last checkpoint. `queued` runs are picked up again.

use std::collections::{HashMap, HashSet};
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
use crate::plugin::Registry;
use crate::store::{
    RunEvent, RunKind, RunRecord, RunStatus, Store, StoreError, new_run_id, now_rfc3339,
};
use crate::train::config::TrainConfig;
use crate::train::{TrainEnv, checkpoint, prepare, record};

/// Evaluations allowed to run at once.
const EVAL_CONCURRENCY: usize = 2;

/// How long a graceful shutdown waits for running jobs to stop (a training step, an eval
/// batch); systemd's default stop timeout is 90 s.
const SHUTDOWN_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// What the operator allowed beyond the defaults (`serve --allow-path`).
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Folders outside the data directory whose files may be used as datasets.
    pub allow_paths: Vec<PathBuf>,
    /// Watch the data directory's free space (see `server::disk`).
    pub watch_disk: bool,
    /// Why the previous process of this server executed this one (its store had failed a
    /// write): the runs it left running are marked failed with this reason.
    pub restart_reason: Option<String>,
    /// Runs the previous process stopped because the disk was full: they end failed, also
    /// when the failure could not be written there and the store reads their stop as
    /// `cancelled`.
    pub restart_failed: Vec<String>,
}

/// A run refused or stopped because the data directory's disk is full.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DiskFull(pub String);

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
    /// Runs a person cancelled (as opposed to runs stopped by a shutdown).
    user_cancelled: Mutex<HashSet<String>>,
    /// Set once a shutdown has begun: no job starts any more, and stopped jobs are marked
    /// `interrupted` (resumable), not `cancelled`.
    shutting_down: AtomicBool,
    /// Read by training runs when they stop: write a checkpoint at the current step first.
    checkpoint_on_stop: Arc<AtomicBool>,
    /// Jobs executing now (not waiting for a slot), for the shutdown to wait on.
    active: (Mutex<usize>, Condvar),
    policy: Policy,
    disk: Arc<crate::server::disk::DiskState>,
    /// Runs stopped because the disk filled: they end `failed`, not `cancelled`.
    disk_failed: Mutex<HashSet<String>>,
    /// Every run this process stopped for a full disk, for a successor (see `disk_stopped`).
    disk_stopped: Mutex<HashSet<String>>,
    /// Notified when the store can no longer write although the disk has room: the server
    /// then reopens it (see `server::disk`).
    store_broken: Arc<tokio::sync::Notify>,
    store_broken_reason: Mutex<Option<String>>,
    /// Evaluations run up to `EVAL_CONCURRENCY` at once, started in the order they were
    /// queued (each takes a ticket when dispatched).
    eval_slots: (Mutex<EvalSlots>, Condvar),
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
        Self::start_with(store, registry, data_dir, models, Policy::default())
    }

    pub fn start_with(
        store: Store,
        registry: Arc<RwLock<Registry>>,
        data_dir: DataDir,
        models: Arc<Models>,
        policy: Policy,
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
                user_cancelled: Mutex::new(HashSet::new()),
                shutting_down: AtomicBool::new(false),
                checkpoint_on_stop: Arc::new(AtomicBool::new(false)),
                active: (Mutex::new(0), Condvar::new()),
                policy,
                disk: Default::default(),
                disk_failed: Mutex::new(HashSet::new()),
                disk_stopped: Mutex::new(HashSet::new()),
                store_broken: Arc::new(tokio::sync::Notify::new()),
                store_broken_reason: Mutex::new(None),
                eval_slots: (
                    Mutex::new(EvalSlots {
                        free: EVAL_CONCURRENCY,
                        ..Default::default()
                    }),
                    Condvar::new(),
                ),
                model_lane: (Mutex::new(Lane::default()), Condvar::new()),
                io: Some(io),
            }),
        };
        jobs.reconcile()?;
        if jobs.inner.policy.watch_disk {
            // A weak handle: the watcher must not keep the jobs alive.
            let weak = Arc::downgrade(&jobs.inner);
            let weak_probe = weak.clone();
            let weak_broken = weak.clone();
            let weak_room = weak.clone();
            crate::server::disk::watch(
                jobs.inner.data_dir.root().to_path_buf(),
                jobs.inner.disk.clone(),
                move |reason| {
                    if let Some(inner) = weak.upgrade() {
                        Jobs { inner }.stop_for_full_disk(reason);
                    }
                },
                move || {
                    if let Some(inner) = weak_room.upgrade() {
                        Jobs { inner }.settle_disk_stopped();
                    }
                },
                move || match weak_probe.upgrade() {
                    Some(inner) => inner.store.flush().map_err(|e| e.to_string()),
                    None => Ok(()),
                },
                move |reason| {
                    if let Some(inner) = weak_broken.upgrade() {
                        tracing::error!("the store cannot write any more ({reason}); reopening it");
                        *inner.store_broken_reason.lock().unwrap() = Some(reason.to_string());
                        inner.store_broken.notify_one();
                    }
                },
            );
        }
        Ok(jobs)
    }

    /// Resolves when the store has failed a write and must be reopened; returns why.
    pub async fn store_broken(&self) -> String {
        self.inner.store_broken.notified().await;
        self.inner
            .store_broken_reason
            .lock()
            .unwrap()
            .clone()
            .unwrap_or_default()
    }

    pub fn models(&self) -> &Arc<Models> {
        &self.inner.models
    }

    /// The store is locked by one process at a time, so a run marked running when we open
    /// it belongs to a process that died. One run that cannot be restored (its request file
    /// missing or damaged) is marked failed with the reason; it never keeps the server from
    /// starting.
    fn reconcile(&self) -> Result<()> {
        let store = &self.inner.store;
        // Oldest first, so re-queued model jobs keep their order.
        let mut runs = store.list_runs()?;
        runs.sort_by(|a, b| a.id.cmp(&b.id));
        for run in runs {
            let id = run.id.clone();
            if let Err(e) = self.reconcile_one(run) {
                tracing::warn!("run {id} cannot be restored: {e:#}");
                let reason = format!("the run could not be restored at server start: {e:#}");
                // A run that moved on meanwhile is left as it is.
                let _ = store.transition(
                    &id,
                    &[RunStatus::Queued, RunStatus::Running],
                    RunStatus::Failed,
                    |r| {
                        r.error = Some(reason.clone());
                        r.finished = Some(now_rfc3339());
                        r.owner_pid = None;
                    },
                );
            }
        }
        store.flush()?;
        Ok(())
    }

    fn reconcile_one(&self, run: RunRecord) -> Result<()> {
        let store = &self.inner.store;
        {
            match run.status {
                RunStatus::Cancelled if self.inner.policy.restart_failed.contains(&run.id) => {
                    let reason = self.inner.policy.restart_reason.clone().unwrap_or_default();
                    store.end_run(
                        &run.id,
                        RunStatus::Failed,
                        Some(format!(
                            "stopped because the data directory's disk was full ({reason}); resume it to run it again"
                        )),
                        |_| {},
                    )?;
                }
                RunStatus::Running if self.inner.policy.restart_reason.is_some() => {
                    let reason = self.inner.policy.restart_reason.clone().unwrap_or_default();
                    store.transition(&run.id, &[RunStatus::Running], RunStatus::Failed, |r| {
                        r.error = Some(format!(
                            "the store could not be written ({reason}); resume it to run it again"
                        ));
                        r.finished = Some(now_rfc3339());
                        r.owner_pid = None;
                    })?;
                }
                RunStatus::Running => {
                    let resume = match run.kind {
                        RunKind::Train => "resume it to continue from its last checkpoint",
                        _ => "resume it to run it again",
                    };
                    store.end_run(
                        &run.id,
                        RunStatus::Interrupted,
                        Some(format!(
                            "the server stopped while this run was in progress; {resume}"
                        )),
                        |_| {},
                    )?;
                }
                RunStatus::Queued => {
                    self.check_request(&run)?;
                    self.dispatch(run)?
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The run's stored request reads back as its kind's request: what a resume needs.
    fn check_request(&self, run: &RunRecord) -> Result<()> {
        let store = &self.inner.store;
        let missing = || format!("run {} has no stored request", run.id);
        match run.kind {
            RunKind::Eval => {
                store
                    .request::<EvalRequest>(&run.id)?
                    .with_context(missing)?;
            }
            RunKind::Train => {
                store
                    .request::<TrainConfig>(&run.id)?
                    .with_context(missing)?;
            }
            RunKind::Generate => {
                store
                    .request::<GenerateRequest>(&run.id)?
                    .with_context(missing)?;
            }
        }
        Ok(())
    }

    /// A dataset given as a path must lie inside the data directory or a folder allowed
    /// with `serve --allow-path`: otherwise any file the server can read would become
    /// samples served over HTTP. Bundled and hub datasets are not paths.
    fn check_dataset_path(&self, dataset: &str, field: &str) -> Result<()> {
        let path = Path::new(dataset);
        if dataset == "bundled" || !path.exists() {
            return Ok(());
        }
        let real = std::fs::canonicalize(path)
            .with_context(|| format!("`{field}`: cannot resolve {dataset:?}"))?;
        let root = std::fs::canonicalize(self.inner.data_dir.root())
            .unwrap_or_else(|_| self.inner.data_dir.root().to_path_buf());
        let allowed = std::iter::once(root).chain(
            self.inner
                .policy
                .allow_paths
                .iter()
                .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone())),
        );
        for dir in allowed {
            if real.starts_with(&dir) {
                return Ok(());
            }
        }
        bail!(
            "`{field}`: {dataset:?} is outside the data directory; start the server with `--allow-path DIR` to allow datasets under DIR"
        )
    }

    /// Validate and queue an evaluation.
    pub fn submit_eval(&self, request: EvalRequest) -> Result<RunRecord> {
        self.check_disk()?;
        let plugins = {
            let registry = self.inner.registry.read().unwrap();
            pipeline::validate(&registry, &request)?
        };
        let run = pipeline::create_run(&self.inner.store, &request, &plugins)?;
        // Acknowledged means on disk.
        self.inner.store.flush()?;
        self.dispatch(run.clone())?;
        Ok(run)
    }

    /// Validate and queue a training run. Everything checkable before the model loads is
    /// checked here: the keys, the values, the formatter, the dataset's rows, the metrics of
    /// `eval_after_train`, where the outputs go.
    pub fn submit_train(&self, submission: TrainSubmission) -> Result<RunRecord> {
        self.check_disk()?;
        let mut config = TrainConfig::from_json(&submission.config)?;
        let id = new_run_id();
        let given = submission.config.get("output_dir").and_then(|v| v.as_str());
        let output_dir = resolve_output_dir(&self.inner.data_dir, given, &id)?;
        config.output_dir = output_dir.display().to_string();
        generate::check_model(&config.model_name_or_path, "config.model_name_or_path")?;
        self.check_dataset_path(&config.dataset, "config.dataset")?;
        self.check_memory(&config)?;
        {
            let registry = self.inner.registry.read().unwrap();
            prepare::check(&config, &registry, &self.inner.data_dir.assets())?;
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
        self.inner.store.flush()?;
        self.dispatch(run.clone())?;
        Ok(run)
    }

    /// Validate and queue a generate run.
    pub fn submit_generate(&self, request: GenerateRequest) -> Result<RunRecord> {
        self.check_disk()?;
        if let Some(d) = &request.dataset {
            self.check_dataset_path(d, "dataset")?;
        }
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
        self.inner.store.flush()?;
        self.dispatch(run.clone())?;
        Ok(run)
    }

    /// Refuses a training run whose rough memory estimate exceeds what the machine has
    /// available (on the CPU; a GPU's memory is not known before the model loads).
    fn check_memory(&self, config: &TrainConfig) -> Result<()> {
        if !self.inner.models.runtime().device.is_cpu() {
            return Ok(());
        }
        let Some(available) = crate::train::memory::available_bytes() else {
            return Ok(());
        };
        let shape = crate::train::memory::shape_of(&config.model_name_or_path);
        crate::train::memory::check_fits(config, shape, available)
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
                let ticket = {
                    let mut slots = self.inner.eval_slots.0.lock().unwrap();
                    slots.next_ticket += 1;
                    let ticket = slots.next_ticket;
                    slots.waiting.push_back(ticket);
                    ticket
                };
                let slots = self.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("eval-{short}"))
                    .spawn(move || {
                        this.acquire_eval_slot(ticket);
                        if !cancel.load(Ordering::Relaxed) && this.begin_job(&run.id) {
                            let result =
                                contain_panic(|| this.run_eval(&run.id, &request, cancel.clone()));
                            if let Err(e) = result {
                                tracing::warn!("eval run {} failed: {e:#}", run.id);
                                this.fail_unfinished(&run.id, &e);
                            }
                            this.end_job(&run.id);
                        }
                        this.release_eval_slot();
                        this.forget_cancel(&run.id, &cancel);
                    });
                if let Err(e) = spawned {
                    // A ticket no thread holds would block every later evaluation.
                    let (lock, cv) = &slots.inner.eval_slots;
                    lock.lock().unwrap().waiting.retain(|t| *t != ticket);
                    cv.notify_all();
                    return Err(e.into());
                }
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
                        if still_queued
                            && !cancel.load(Ordering::Relaxed)
                            && this.begin_job(&run.id)
                        {
                            let result = contain_panic(|| match run.kind {
                                RunKind::Train => this.run_train(&run, cancel.clone()),
                                _ => this.run_generate(&run, cancel.clone()),
                            });
                            if let Err(e) = result {
                                tracing::warn!(
                                    "{} run {} failed: {e:#}",
                                    run.kind.as_str(),
                                    run.id
                                );
                                this.fail_unfinished(&run.id, &e);
                            }
                            this.end_job(&run.id);
                        }
                        drop(turn);
                        this.forget_cancel(&run.id, &cancel);
                    })?;
            }
        }
        Ok(())
    }

    /// A job that returned an error (a full disk, a store write that failed) is marked failed
    /// with the reason if it still reads as queued or running: the run fails, not the server.
    fn fail_unfinished(&self, run_id: &str, error: &anyhow::Error) {
        if self.inner.shutting_down.load(Ordering::SeqCst) {
            return;
        }
        let reason = format!("{error:#}");
        self.fail_run(run_id, &[RunStatus::Queued, RunStatus::Running], &reason);
    }

    /// Marks `run_id` failed with `reason` if it is still in one of `allowed_from`, and says so
    /// in its events; a run that moved on meanwhile is left as it is.
    fn fail_run(&self, run_id: &str, allowed_from: &[RunStatus], reason: &str) {
        let _ = self
            .inner
            .store
            .transition(run_id, allowed_from, RunStatus::Failed, |r| {
                r.error = Some(reason.to_string());
                r.finished = Some(now_rfc3339());
                r.owner_pid = None;
            });
    }

    /// `Err(reason)` while the data directory cannot be written (a full disk, a read-only
    /// mount): a small file is written, synced and removed, and the store flushed. Checked
    /// afresh at every call, so it reads `ok` again once space is freed.
    pub fn health(&self) -> std::result::Result<(), String> {
        if let Some(reason) = self.inner.disk.is_full().then(|| self.inner.disk.reason()) {
            return Err(reason.unwrap_or_else(|| "the data directory's disk is full".into()));
        }
        let probe = self.inner.data_dir.root().join(".health-probe");
        let write = || -> std::io::Result<()> {
            use std::io::Write as _;
            let mut f = std::fs::File::create(&probe)?;
            f.write_all(&[0u8; 4096])?;
            f.sync_all()
        };
        let written = write();
        let _ = std::fs::remove_file(&probe);
        written.map_err(|e| format!("cannot write to the data directory: {e}"))?;
        self.inner
            .store
            .flush()
            .map_err(|e| format!("the store cannot be written: {e}"))
    }

    /// Refuses new work while the disk is full.
    fn check_disk(&self) -> Result<()> {
        if self.inner.disk.is_full() {
            let reason = self
                .inner
                .disk
                .reason()
                .unwrap_or_else(|| "the disk is full".into());
            return Err(DiskFull(reason).into());
        }
        Ok(())
    }

    /// The disk has filled: every running job is stopped and will end `failed` with the
    /// reason; queued ones fail when their turn comes while it is still full.
    fn stop_for_full_disk(&self, reason: &str) {
        let running: Vec<String> = self
            .inner
            .store
            .list_runs()
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r.status == RunStatus::Running)
            .map(|r| r.id)
            .collect();
        let cancels = self.inner.cancels.lock().unwrap();
        let mut failed = self.inner.disk_failed.lock().unwrap();
        let mut stopped = self.inner.disk_stopped.lock().unwrap();
        for id in running {
            if let Some(flag) = cancels.get(&id) {
                failed.insert(id.clone());
                stopped.insert(id.clone());
                flag.store(true, Ordering::SeqCst);
                tracing::warn!("stopping run {id}: {reason}");
            }
        }
    }

    /// Once the disk has room again: a run the full disk stopped whose failure could not be
    /// written then (the store refused writes while the disk was full) still reads
    /// `cancelled`, or `running` with no job left; it ends failed now, with the reason, so a
    /// full disk never reads as a user's cancel. Runs whose job is still executing are left to
    /// that job's end.
    fn settle_disk_stopped(&self) {
        let stopped = self.disk_stopped();
        let executing: HashSet<String> =
            self.inner.cancels.lock().unwrap().keys().cloned().collect();
        for id in stopped {
            if executing.contains(&id) {
                continue;
            }
            self.fail_run(
                &id,
                &[RunStatus::Running, RunStatus::Cancelled],
                "stopped because the data directory's disk was full; resume it to run it again",
            );
        }
    }

    /// The runs this process stopped because the disk was full. A server that executes itself
    /// again to reopen its store hands them over, as their failure may not have reached the
    /// disk.
    pub fn disk_stopped(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .inner
            .disk_stopped
            .lock()
            .unwrap()
            .iter()
            .cloned()
            .collect();
        ids.sort();
        ids
    }

    /// Why runs stop or fail for the disk: the watcher's reason while it is full.
    fn disk_reason(&self) -> String {
        self.inner
            .disk
            .reason()
            .unwrap_or_else(|| "the data directory's disk is full".into())
    }

    fn fail_for_disk(&self, run_id: &str) {
        let reason = self.disk_reason();
        self.fail_run(
            run_id,
            &[RunStatus::Queued, RunStatus::Running, RunStatus::Cancelled],
            &reason,
        );
    }

    /// Counts a job as executing, unless a shutdown has begun (then it stays queued for the
    /// next start).
    fn begin_job(&self, run_id: &str) -> bool {
        let (lock, _) = &self.inner.active;
        let mut active = lock.lock().unwrap_or_else(|e| e.into_inner());
        if self.inner.shutting_down.load(Ordering::SeqCst) {
            return false;
        }
        if self.inner.disk.is_full() {
            self.fail_for_disk(run_id);
            return false;
        }
        *active += 1;
        true
    }

    /// A job has returned. When a shutdown stopped it, it is marked `interrupted` (its
    /// stored samples and checkpoint kept, resumable) rather than `cancelled` or `running`.
    fn end_job(&self, run_id: &str) {
        if self.inner.disk_failed.lock().unwrap().remove(run_id) {
            self.fail_for_disk(run_id);
        } else if self.inner.shutting_down.load(Ordering::SeqCst)
            && !self.inner.user_cancelled.lock().unwrap().contains(run_id)
        {
            self.mark_interrupted(run_id);
        }
        let (lock, cv) = &self.inner.active;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
        cv.notify_all();
    }

    fn mark_interrupted(&self, run_id: &str) {
        let store = &self.inner.store;
        // A run that ended meanwhile is left as it is.
        let _ = store.transition(
            run_id,
            &[RunStatus::Running, RunStatus::Cancelled],
            RunStatus::Interrupted,
            |r| {
                r.error = Some(
                    "the server was stopped while this run was in progress; resume it to continue"
                        .into(),
                );
                r.owner_pid = None;
            },
        );
    }

    /// Graceful shutdown: no job starts any more; running ones are asked to stop (an
    /// evaluation keeps the samples it finished, a training writes a checkpoint at its
    /// current step), waited for up to [`SHUTDOWN_WAIT`], and marked `interrupted`; queued
    /// ones stay queued. Then the store is flushed.
    pub fn shutdown(&self) -> Result<()> {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
        self.inner.checkpoint_on_stop.store(true, Ordering::SeqCst);
        for flag in self.inner.cancels.lock().unwrap().values() {
            flag.store(true, Ordering::SeqCst);
        }
        let (lock, cv) = &self.inner.active;
        let deadline = std::time::Instant::now() + SHUTDOWN_WAIT;
        let mut active = lock.lock().unwrap_or_else(|e| e.into_inner());
        while *active > 0 {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                tracing::warn!("{} job(s) did not stop in time", *active);
                break;
            }
            active = cv
                .wait_timeout(active, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        drop(active);
        // Whatever is still running (it did not stop in time) reads as interrupted.
        for run in self.inner.store.list_runs()? {
            if run.status == RunStatus::Running {
                self.mark_interrupted(&run.id);
            }
        }
        self.inner.store.flush()?;
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

    /// Waits until a slot is free and `ticket` is the oldest waiting one: evaluations start
    /// in the order they were queued, not in the order their threads happen to wake.
    fn acquire_eval_slot(&self, ticket: u64) {
        let (lock, cv) = &self.inner.eval_slots;
        let mut slots = lock.lock().unwrap();
        while slots.free == 0 || slots.waiting.front() != Some(&ticket) {
            slots = cv.wait(slots).unwrap();
        }
        slots.waiting.pop_front();
        slots.free -= 1;
        // The next in line may find a slot too.
        cv.notify_all();
    }

    fn release_eval_slot(&self) {
        let (lock, cv) = &self.inner.eval_slots;
        lock.lock().unwrap().free += 1;
        cv.notify_all();
    }

    /// The services behind `embed` and `chat` for one run's plugins, and its eval env.
    fn eval_env(
        &self,
        run_id: &str,
        cancel: Arc<AtomicBool>,
        llm_base_url: Option<&str>,
    ) -> Result<(EvalEnv, Arc<EvalServices>)> {
        let store = self.inner.store.clone();
        let config = match llm_base_url {
            Some(url) => LlmConfig::from_env().for_endpoint(url),
            None => LlmConfig::from_env(),
        };
        let llm = LlmClient::new(config, Some(store.clone()))?;
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
            stopped_because: self.stopped_because(run_id),
        };
        Ok((env, services))
    }

    /// Why a job's stop was not its user's: a run the full disk stopped ends failed with the
    /// reason (end_job then finds it failed already); it must not read `cancelled` in between.
    fn stopped_because(&self, run_id: &str) -> crate::eval::pipeline::StopReason {
        let (jobs, run) = (self.clone(), run_id.to_string());
        Arc::new(move || {
            let stopped = jobs.inner.disk_failed.lock().unwrap().contains(&run);
            stopped.then(|| jobs.disk_reason())
        })
    }

    fn run_eval(&self, run_id: &str, request: &EvalRequest, cancel: Arc<AtomicBool>) -> Result<()> {
        let store = self.inner.store.clone();
        let plugins = {
            let registry = self.inner.registry.read().unwrap();
            match pipeline::validate(&registry, request) {
                Ok(p) => p,
                Err(e) => {
                    store.end_run(run_id, RunStatus::Failed, Some(format!("{e:#}")), |_| {})?;
                    return Err(e);
                }
            }
        };
        let (env, services) = self.eval_env(run_id, cancel, request.llm_base_url.as_deref())?;
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
        let checkpoint = checkpoint::find_checkpoint(Path::new(&config.output_dir), "latest").ok();
        if started_before && checkpoint.is_none() {
            store.push_event(
                &run.id,
                &RunEvent::Log {
                    level: "info".into(),
                    message: "no checkpoint was saved before the run stopped; starting over".into(),
                },
            )?;
        }
        // Steps between the checkpoint and the interruption were recorded already; the
        // resumed run redoes them (identically) without recording them twice.
        let (mut loss_through, mut steps_through) = (None, None);
        for (_, e) in store.events_after(&run.id, None)? {
            match e {
                RunEvent::Loss { step, .. } => loss_through = loss_through.max(Some(step)),
                RunEvent::Step { step, .. } => steps_through = steps_through.max(Some(step)),
                _ => {}
            }
        }
        let env = TrainEnv {
            skip_loss_through: loss_through.filter(|_| started_before),
            skip_steps_through: steps_through.filter(|_| started_before),
            checkpoint_on_stop: Some(self.inner.checkpoint_on_stop.clone()),
            assets_dir: self.inner.data_dir.assets(),
            registry: Some(self.inner.registry.read().unwrap().clone()),
            resume_from_checkpoint: checkpoint
                .filter(|_| started_before)
                .map(|_| "latest".to_string()),
            cancel: Some(cancel),
            stopped_because: Some(self.stopped_because(&run.id)),
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
        let (eval, services) = self.eval_env(&run.id, cancel, request.llm_base_url.as_deref())?;
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
        self.inner
            .user_cancelled
            .lock()
            .unwrap()
            .insert(run.id.clone());
        if let Some(flag) = self.inner.cancels.lock().unwrap().get(&run.id) {
            flag.store(true, Ordering::Relaxed);
        }
        if run.status == RunStatus::Queued {
            // A compare-and-swap: if the job started meanwhile, its flag stops it instead.
            match self.inner.store.transition(
                &run.id,
                &[RunStatus::Queued],
                RunStatus::Cancelled,
                |r| r.finished = Some(now_rfc3339()),
            ) {
                Ok(run) => {
                    self.inner.store.flush()?;
                    return Ok(run);
                }
                Err(StoreError::Conflict { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.inner.store.flush()?;
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
        if self.inner.shutting_down.load(Ordering::SeqCst) {
            bail!("the server is shutting down");
        }
        // A run that cannot be resumed is left exactly as it was.
        self.check_request(&run)
            .context("the run cannot be resumed")?;
        // Of concurrent resumes, the compare-and-swap lets exactly one through.
        let previous = run.clone();
        let run = self.inner.store.transition(
            &run.id,
            &[
                RunStatus::Interrupted,
                RunStatus::Failed,
                RunStatus::Cancelled,
            ],
            RunStatus::Queued,
            |r| {
                r.error = None;
                r.finished = None;
            },
        )?;
        self.inner.user_cancelled.lock().unwrap().remove(&run.id);
        // Resumed, it is no longer a run the full disk stopped.
        self.inner.disk_stopped.lock().unwrap().remove(&run.id);
        if let Err(e) = self.dispatch(run.clone()) {
            // Put it back as it was rather than leave a queued run no worker will take.
            let _ =
                self.inner
                    .store
                    .transition(&run.id, &[RunStatus::Queued], previous.status, |r| {
                        *r = previous.clone()
                    });
            return Err(e);
        }
        self.inner.store.flush()?;
        Ok(run)
    }
}

/// The evaluation slots: how many are free and the tickets waiting for one, oldest first.
#[derive(Default)]
struct EvalSlots {
    free: usize,
    next_ticket: u64,
    waiting: std::collections::VecDeque<u64>,
}

/// Runs a job, turning a panic into its error: the run is then marked failed and the worker
/// goes on, instead of the run reading `running` for ever.
fn contain_panic(job: impl FnOnce() -> Result<()>) -> Result<()> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)) {
        Ok(result) => result,
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a panic".into());
            bail!("the job stopped on an internal error: {what}")
        }
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
    // `..` and symbolic links are resolved before the check: `<data>/runs/../store/x` is the
    // store's folder.
    let path = &real_path(path);
    let root = real_path(data_dir.root());
    let runs = real_path(&runs);
    if path.starts_with(&root) && !path.starts_with(&runs) {
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

/// `path` with `.` and `..` resolved lexically, then its longest existing prefix
/// canonicalised (symbolic links followed) and the rest appended.
fn real_path(path: &Path) -> PathBuf {
    let mut lexical = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                lexical.pop();
            }
            other => lexical.push(other),
        }
    }
    let mut existing = lexical.clone();
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = std::fs::canonicalize(&existing) {
            let mut out = real;
            for part in rest.iter().rev() {
                out.push(part);
            }
            return out;
        }
        match (
            existing.file_name().map(|n| n.to_os_string()),
            existing.parent(),
        ) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                existing = parent.to_path_buf();
            }
            _ => return lexical,
        }
    }
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
        let climbing = format!("{}/../store/x", runs.display());
        let e = resolve_output_dir(&data, Some(&climbing), "r1").unwrap_err();
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
