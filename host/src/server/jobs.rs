//! The job queue, persisted in the store as runs with a status. Evaluations run in parallel
//! up to a bound; model jobs (train, generate) run one at a time, since they own the GPU.
//! On start, runs a dead process left `running` become `interrupted` (never silently
//! running) and can be resumed; `queued` runs are picked up again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};

use anyhow::{Context as _, Result, bail};

use crate::eval::pipeline::{self, EvalEnv, EvalRequest};
use crate::eval::services::EvalServices;
use crate::llm::{LlmClient, LlmConfig};
use crate::paths::DataDir;
use crate::plugin::Registry;
use crate::store::{RunEvent, RunKind, RunRecord, RunStatus, Store, now_rfc3339};

/// Evaluations allowed to run at once.
const EVAL_CONCURRENCY: usize = 2;

#[derive(Clone)]
pub struct Jobs {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    registry: Arc<RwLock<Registry>>,
    #[allow(dead_code)]
    data_dir: DataDir,
    cancels: Mutex<HashMap<String, Arc<AtomicBool>>>,
    eval_slots: (Mutex<usize>, Condvar),
    /// Serves the LLM client's async I/O for plugin calls made on worker threads. An `Option`
    /// so `Drop` can shut it down without blocking, since the last `Jobs` may be dropped
    /// inside the server's own runtime.
    io: Option<tokio::runtime::Runtime>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(io) = self.io.take() {
            io.shutdown_background();
        }
    }
}

impl Jobs {
    pub fn start(store: Store, registry: Arc<RwLock<Registry>>, data_dir: DataDir) -> Result<Self> {
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
                cancels: Mutex::new(HashMap::new()),
                eval_slots: (Mutex::new(EVAL_CONCURRENCY), Condvar::new()),
                io: Some(io),
            }),
        };
        jobs.reconcile()?;
        Ok(jobs)
    }

    /// The store is locked by one process at a time, so a run marked running when we open
    /// it belongs to a process that died.
    fn reconcile(&self) -> Result<()> {
        let store = &self.inner.store;
        for run in store.list_runs()? {
            match run.status {
                RunStatus::Running => {
                    store.update_run(&run.id, |r| {
                        r.status = RunStatus::Interrupted;
                        r.error = Some("the server stopped while this run was in progress; resume it to continue".into());
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

    fn dispatch(&self, run: RunRecord) -> Result<()> {
        match run.kind {
            RunKind::Eval => {
                let request: EvalRequest = self
                    .inner
                    .store
                    .request(&run.id)?
                    .with_context(|| format!("run {} has no stored request", run.id))?;
                let cancel = Arc::new(AtomicBool::new(false));
                self.inner
                    .cancels
                    .lock()
                    .unwrap()
                    .insert(run.id.clone(), cancel.clone());
                let this = self.clone();
                std::thread::Builder::new()
                    .name(format!("eval-{}", &run.id[..8.min(run.id.len())]))
                    .spawn(move || {
                        this.acquire_eval_slot();
                        if !cancel.load(Ordering::Relaxed) {
                            if let Err(e) = this.run_eval(&run.id, &request, cancel.clone()) {
                                tracing::warn!("eval run {} failed: {e:#}", run.id);
                            }
                        }
                        this.release_eval_slot();
                        this.inner.cancels.lock().unwrap().remove(&run.id);
                    })?;
                Ok(())
            }
            kind => bail!(
                "{} jobs are not available in this server yet",
                kind.as_str()
            ),
        }
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
            store: store.clone(),
            services: services.clone(),
            cancel,
            on_progress: Arc::new(|_, _| {}),
        };
        let result = pipeline::execute(&env, run_id, request, &plugins);
        services.record(&store, run_id)?;
        result.map(|_| ())
    }

    /// Cancel a queued or running job. A running evaluation stops after its current batch;
    /// what it stored stays.
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
