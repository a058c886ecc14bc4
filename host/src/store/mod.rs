//! The store: sled in the data directory, with typed keyspaces for runs, per-sample results,
//! run events, adapters, plugins and the LLM response cache; beside it, one file per run
//! holding the request that created it. Values are JSON (serde), so a
//! record stays readable and migrations can rewrite it.
//!
//! **Architecture Invariant:** only this module knows sled. Callers see typed records.
//! **Architecture Invariant:** a sample and all its scores are written in one atomic batch,
//! and a run is marked `done` only after its last sample is written, so a crash never leaves
//! a run that reads as complete with results missing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde::de::DeserializeOwned;

mod check;
mod migrate;
pub mod records;

pub use check::{CheckReport, Problem};

pub use records::*;

/// The schema this build reads and writes.
pub const SCHEMA_VERSION: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "the store at {path} is in use by another adapterlab process (is `adapterlab serve` running with this data directory?)"
    )]
    Locked { path: String },
    #[error(
        "the store at {path} has schema version {found}, newer than this adapterlab understands ({supported}); upgrade adapterlab"
    )]
    TooNew {
        path: String,
        found: u32,
        supported: u32,
    },
    #[error("store record {key} in {tree} is corrupt: {source}")]
    Corrupt {
        tree: &'static str,
        key: String,
        source: serde_json::Error,
    },
    #[error("no run matches {0:?}")]
    NoSuchRun(String),
    #[error("{0:?} matches several runs: {1}; give more characters")]
    AmbiguousRun(String, String),
    #[error("store: {0}")]
    Sled(#[from] sled::Error),
    #[error("store: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("store: {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0:?} is not a run id")]
    InvalidRunId(String),
    #[error(
        "the store at {path} is damaged ({reason}); `adapterlab store check` reports what is wrong"
    )]
    Damaged { path: String, reason: String },
    /// A status change outside the lifecycle's functions (a bug, never the user's input).
    #[error(
        "run {id}: its status changes ({} to {}) only through Store::start_run, end_run or transition",
        from.as_str(),
        to.as_str()
    )]
    StatusByUpdate {
        id: String,
        from: RunStatus,
        to: RunStatus,
    },
    #[error("run {id} is {}, so it cannot become {}", found.as_str(), to.as_str())]
    Conflict {
        id: String,
        found: RunStatus,
        to: RunStatus,
    },
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The keyspaces (sled trees).
mod tree {
    pub const META: &str = "meta";
    pub const RUNS: &str = "runs";
    pub const SAMPLES: &str = "samples";
    pub const EVENTS: &str = "events";
    pub const ADAPTERS: &str = "adapters";
    pub const LLM_CACHE: &str = "llm_cache";
    pub const PLUGINS: &str = "plugins";
}

/// The opened store. Cheap to clone (sled handles are reference counted).
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    runs: sled::Tree,
    requests: Requests,
    samples: sled::Tree,
    events: sled::Tree,
    adapters: sled::Tree,
    llm_cache: sled::Tree,
    plugins: sled::Tree,
}

/// sled's page cache when none is given: its own default (1 GiB) made a server's RSS grow to
/// gigabytes; 64 MiB serves the dashboard's reads well.
pub const DEFAULT_CACHE_BYTES: u64 = 64 << 20;

impl Store {
    /// Open with a page cache of `cache_bytes`. A damaged store (a missing snapshot, a
    /// corrupt file: sled panics on some of these) is an error naming the path, never a
    /// panic.
    pub fn open_with_cache(path: &Path, cache_bytes: u64) -> Result<Self> {
        let config = sled::Config::new().path(path).cache_capacity(cache_bytes);
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let db = config.open().map_err(|e| open_error(path, e))?;
            Self::from_db(db, path, Requests::Files(path.join("requests")))
        }));
        std::panic::set_hook(previous);
        match opened {
            Ok(result) => result,
            Err(panic) => {
                let reason = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "sled failed to open it".into());
                Err(StoreError::Damaged {
                    path: path.display().to_string(),
                    reason,
                })
            }
        }
    }

    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with_cache(path, DEFAULT_CACHE_BYTES)
    }

    /// A store in a temporary directory, for tests.
    pub fn temporary() -> Result<Self> {
        let db = sled::Config::new().temporary(true).open()?;
        Self::from_db(
            db,
            Path::new("<temporary>"),
            Requests::Memory(Arc::default()),
        )
    }

    /// Migrate an opened database to the current schema and open its keyspaces.
    fn from_db(db: sled::Db, path: &Path, requests: Requests) -> Result<Self> {
        migrate::run(&db, path, &requests)?;
        Ok(Store {
            runs: db.open_tree(tree::RUNS)?,
            requests,
            samples: db.open_tree(tree::SAMPLES)?,
            events: db.open_tree(tree::EVENTS)?,
            adapters: db.open_tree(tree::ADAPTERS)?,
            llm_cache: db.open_tree(tree::LLM_CACHE)?,
            plugins: db.open_tree(tree::PLUGINS)?,
            db,
        })
    }

    pub fn flush(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }

    // ---- runs ----

    pub fn put_run(&self, run: &RunRecord) -> Result<()> {
        self.runs
            .insert(run.id.as_bytes(), encode(&redacted_run(run))?)?;
        Ok(())
    }

    /// The run `id`; an unreadable record comes back as a `corrupt` run with the reason.
    pub fn get_run(&self, id: &str) -> Result<Option<RunRecord>> {
        Ok(self.runs.get(id.as_bytes())?.map(|v| read_run(id, &v)))
    }

    /// Update a run in place; `f` sees the current record. Atomic with respect to other
    /// updates of the same run.
    pub fn update_run(&self, id: &str, mut f: impl FnMut(&mut RunRecord)) -> Result<RunRecord> {
        loop {
            let Some(old) = self.runs.get(id.as_bytes())? else {
                return Err(StoreError::NoSuchRun(id.to_string()));
            };
            let mut run: RunRecord = decode(tree::RUNS, id, &old)?;
            let status = run.status;
            f(&mut run);
            if run.status != status {
                return Err(StoreError::StatusByUpdate {
                    id: id.to_string(),
                    from: status,
                    to: run.status,
                });
            }
            let run = redacted_run(&run).into_owned();
            let new = encode(&run)?;
            if self
                .runs
                .compare_and_swap(id.as_bytes(), Some(&old), Some(new))?
                .is_ok()
            {
                return Ok(run);
            }
        }
    }

    /// A run starts executing in this process: `running`, its start time and owner, and the
    /// status event, flushed before this returns, so a crash right after never leaves the
    /// run reading as queued with its work begun.
    pub fn start_run(&self, id: &str) -> Result<RunRecord> {
        self.transition(id, &[RunStatus::Queued], RunStatus::Running, |r| {
            r.started = Some(now_rfc3339());
            r.owner_pid = Some(std::process::id());
            r.error = None;
        })
    }

    /// A run ends as `to` (done, failed, cancelled or interrupted) from whatever status the
    /// lifecycle allows ([`RunStatus::may_become`]): its finish time, no owner, `error` (kept
    /// as it was when `None`), `f` for the results, and the status event, flushed before this
    /// returns. A run that has already moved on is left as it is
    /// ([`StoreError::Conflict`]): the first end wins.
    pub fn end_run(
        &self,
        id: &str,
        to: RunStatus,
        error: Option<String>,
        mut f: impl FnMut(&mut RunRecord),
    ) -> Result<RunRecord> {
        self.transition(id, &RunStatus::sources_of(to), to, |r| {
            if to != RunStatus::Interrupted {
                r.finished = Some(now_rfc3339());
            }
            r.owner_pid = None;
            if error.is_some() {
                r.error = error.clone();
            }
            f(r);
        })
    }

    /// Move a run from one of `allowed_from` to `to`, applying `f` to the record, and write the
    /// run's status event, in one atomic write of both trees, flushed before this returns (so
    /// an acknowledged transition survives a crash). A reader that sees the new status finds
    /// its event too: written one after the other, a client polling a run could read `done`
    /// and then events ending in `running`. A move the lifecycle ([`RunStatus::may_become`])
    /// does not allow is refused whatever `allowed_from` says. Of concurrent transitions of
    /// one run, exactly one succeeds; the others get [`StoreError::Conflict`] naming the status
    /// they found.
    pub fn transition(
        &self,
        id: &str,
        allowed_from: &[RunStatus],
        to: RunStatus,
        f: impl FnMut(&mut RunRecord),
    ) -> Result<RunRecord> {
        use sled::Transactional;
        use sled::transaction::{ConflictableTransactionError as Abortable, TransactionError};
        let event = encode(&RunEvent::Status { status: to })?;
        // The event's sequence number, drawn before the transaction: sled's id generator
        // writes its own state, which inside the transaction's lock would wait for ever.
        let mut key = run_prefix(id);
        key.extend_from_slice(&self.db.generate_id()?.to_be_bytes());
        // sled may run the closure more than once (on a conflict); `f` only sets fields.
        let f = std::cell::RefCell::new(f);
        let result = (&self.runs, &self.events).transaction(|(runs, events)| {
            let abort = |e: StoreError| Abortable::Abort(e);
            let Some(old) = runs.get(id.as_bytes())? else {
                return Err(abort(StoreError::NoSuchRun(id.to_string())));
            };
            let run = moved(id, &old, allowed_from, to, &mut *f.borrow_mut()).map_err(abort)?;
            runs.insert(id.as_bytes(), encode(&run).map_err(abort)?)?;
            events.insert(key.as_slice(), event.clone())?;
            Ok(run)
        });
        match result {
            Ok(run) => {
                self.db.flush()?;
                Ok(run)
            }
            Err(TransactionError::Abort(e)) => Err(e),
            Err(TransactionError::Storage(e)) => Err(StoreError::Sled(e)),
        }
    }

    /// Marks every run still `running` as `interrupted`, returning their ids. Only for a
    /// store just opened by a command: the store is locked by one process at a time, so a run
    /// that reads as running then belongs to a process that died (`kill -9`, a crash) and
    /// would otherwise show `running` for ever.
    pub fn interrupt_orphans(&self) -> Result<Vec<String>> {
        let mut ids = Vec::new();
        for item in self.runs.iter() {
            let (k, v) = item?;
            let id = String::from_utf8_lossy(&k).into_owned();
            // An unreadable record is `adapterlab store check`'s business, not this one's.
            let Ok(run) = decode::<RunRecord>(tree::RUNS, &id, &v) else {
                continue;
            };
            if run.status != RunStatus::Running || run.owner_pid == Some(std::process::id()) {
                continue;
            }
            let moved = self.transition(&id, &[RunStatus::Running], RunStatus::Interrupted, |r| {
                r.error = Some(format!(
                    "the process running it ({}) stopped before it finished; resume it with `adapterlab serve`",
                    r.owner_pid
                        .map(|p| format!("pid {p}"))
                        .unwrap_or_else(|| "unknown".into())
                ));
                r.owner_pid = None;
            });
            if moved.is_ok() {
                ids.push(id);
            }
        }
        Ok(ids)
    }

    /// Every run, newest first. An unreadable record is listed as a `corrupt` run with the
    /// reason: one bad record never hides the others (nor stops a server from starting).
    pub fn list_runs(&self) -> Result<Vec<RunRecord>> {
        let mut runs = Vec::new();
        for item in self.runs.iter().rev() {
            let (k, v) = item?;
            runs.push(read_run(&String::from_utf8_lossy(&k), &v));
        }
        Ok(runs)
    }

    /// The run whose id is `id` or starts with it (as git resolves short hashes).
    pub fn resolve_run(&self, id: &str) -> Result<RunRecord> {
        if let Some(run) = self.get_run(id)? {
            return Ok(run);
        }
        let matches: Vec<RunRecord> = self
            .runs
            .scan_prefix(id.as_bytes())
            .map(|item| {
                let (k, v) = item?;
                Ok(read_run(&String::from_utf8_lossy(&k), &v))
            })
            .collect::<Result<_>>()?;
        match matches.len() {
            0 if id.is_empty() => Err(StoreError::NoSuchRun(id.to_string())),
            0 => {
                // Names are accepted too when unique.
                let by_name: Vec<RunRecord> = self
                    .list_runs()?
                    .into_iter()
                    .filter(|r| r.name == id)
                    .collect();
                match by_name.len() {
                    1 => Ok(by_name.into_iter().next().unwrap()),
                    0 => Err(StoreError::NoSuchRun(id.to_string())),
                    _ => Err(StoreError::AmbiguousRun(
                        id.to_string(),
                        by_name
                            .iter()
                            .map(|r| r.id.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                    )),
                }
            }
            1 => Ok(matches.into_iter().next().unwrap()),
            _ => Err(StoreError::AmbiguousRun(
                id.to_string(),
                matches
                    .iter()
                    .map(|r| r.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            )),
        }
    }

    pub fn delete_run(&self, id: &str) -> Result<()> {
        let mut batch = sled::Batch::default();
        for key in self.samples.scan_prefix(run_prefix(id)).keys() {
            batch.remove(key?);
        }
        self.samples.apply_batch(batch)?;
        let mut batch = sled::Batch::default();
        for key in self.events.scan_prefix(run_prefix(id)).keys() {
            batch.remove(key?);
        }
        self.events.apply_batch(batch)?;
        self.requests.remove(id)?;
        self.runs.remove(id.as_bytes())?;
        Ok(())
    }

    // ---- requests ----

    /// Keep what created a run (an evaluation's request, every row included; a training
    /// config), so that an interrupted job can be resumed. It lives apart from the run record,
    /// which is rewritten at every status and progress change and read by every listing.
    pub fn put_request<T: Serialize>(&self, run_id: &str, request: &T) -> Result<()> {
        self.requests.put(run_id, encode(request)?)
    }

    /// The request a run was created from, if it was kept.
    pub fn request<T: DeserializeOwned>(&self, run_id: &str) -> Result<Option<T>> {
        self.requests
            .get(run_id)?
            .map(|v| decode(REQUESTS, run_id, &v))
            .transpose()
    }

    // ---- samples ----

    /// Write finished samples of a run in one atomic batch, durably: once this returns, a
    /// crash (even `kill -9`) does not lose them.
    pub fn put_samples(&self, run_id: &str, samples: &[SampleRecord]) -> Result<()> {
        let mut batch = sled::Batch::default();
        for s in samples {
            let value = if s.errors.is_empty() {
                encode(s)?
            } else {
                let mut s = s.clone();
                for e in s.errors.values_mut() {
                    *e = crate::redact::redact(e);
                }
                encode(&s)?
            };
            batch.insert(sample_key(run_id, s.index), value);
        }
        self.samples.apply_batch(batch)?;
        self.db.flush()?;
        Ok(())
    }

    /// A run's samples in input order. An unreadable sample comes back with only its index
    /// and an error saying so, rather than failing the whole run's samples.
    pub fn samples(&self, run_id: &str) -> Result<Vec<SampleRecord>> {
        self.samples
            .scan_prefix(run_prefix(run_id))
            .map(|item| {
                let (k, v) = item?;
                Ok(read_sample(&k, &v))
            })
            .collect()
    }

    /// At most `limit` of a run's samples in input order, skipping the first `offset`: a
    /// page read without decoding the samples before it.
    pub fn samples_page(
        &self,
        run_id: &str,
        offset: usize,
        limit: usize,
    ) -> Result<Vec<SampleRecord>> {
        self.samples
            .scan_prefix(run_prefix(run_id))
            .skip(offset)
            .take(limit)
            .map(|item| {
                let (k, v) = item?;
                decode(tree::SAMPLES, &String::from_utf8_lossy(&k), &v)
            })
            .collect()
    }

    pub fn sample_count(&self, run_id: &str) -> usize {
        self.samples.scan_prefix(run_prefix(run_id)).count()
    }

    // ---- events (progress, log lines, loss points) ----

    /// Append an event to a run's log; returns its sequence number.
    pub fn push_event(&self, run_id: &str, event: &RunEvent) -> Result<u64> {
        let seq = self.db.generate_id()?;
        let mut key = run_prefix(run_id);
        key.extend_from_slice(&seq.to_be_bytes());
        let value = match event {
            RunEvent::Log { level, message } => encode(&RunEvent::Log {
                level: level.clone(),
                message: crate::redact::redact(message),
            })?,
            other => encode(other)?,
        };
        self.events.insert(key, value)?;
        Ok(seq)
    }

    /// A run's events with sequence number greater than `after`, oldest first.
    pub fn events_after(&self, run_id: &str, after: Option<u64>) -> Result<Vec<(u64, RunEvent)>> {
        let prefix = run_prefix(run_id);
        let start = match after {
            Some(seq) => {
                let mut k = prefix.clone();
                k.extend_from_slice(&(seq + 1).to_be_bytes());
                k
            }
            None => prefix.clone(),
        };
        let mut out = Vec::new();
        for item in self.events.range(start..) {
            let (k, v) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            let seq = u64::from_be_bytes(k[prefix.len()..].try_into().unwrap_or([0; 8]));
            match decode(tree::EVENTS, run_id, &v) {
                Ok(event) => out.push((seq, event)),
                // A damaged event must not end a run's event stream; `store check` reports it.
                Err(e) => tracing::warn!("skipping event {seq}: {e}"),
            }
        }
        Ok(out)
    }

    // ---- adapters ----

    pub fn put_adapter(&self, adapter: &AdapterRecord) -> Result<()> {
        self.adapters
            .insert(adapter.name.as_bytes(), encode(adapter)?)?;
        Ok(())
    }

    pub fn get_adapter(&self, name: &str) -> Result<Option<AdapterRecord>> {
        self.adapters
            .get(name.as_bytes())?
            .map(|v| decode(tree::ADAPTERS, name, &v))
            .transpose()
    }

    /// Every readable adapter record; unreadable ones are skipped with a warning (`store
    /// check` reports them).
    pub fn list_adapters(&self) -> Result<Vec<AdapterRecord>> {
        readable(&self.adapters, tree::ADAPTERS)
    }

    // ---- installed plugins ----

    /// Record a plugin installed into the data directory (what, from where, when).
    pub fn put_plugin(&self, record: &PluginRecord) -> Result<()> {
        self.plugins
            .insert(record.name.as_bytes(), encode(record)?)?;
        Ok(())
    }

    pub fn list_plugins(&self) -> Result<Vec<PluginRecord>> {
        readable(&self.plugins, tree::PLUGINS)
    }

    /// Forget an installed plugin's record; true if there was one. The value is not decoded,
    /// so that a record that no longer reads can still be removed.
    pub fn delete_plugin(&self, name: &str) -> Result<bool> {
        Ok(self.plugins.remove(name.as_bytes())?.is_some())
    }

    // ---- LLM response cache ----

    pub fn cached_response(&self, key: &str) -> Result<Option<serde_json::Value>> {
        self.llm_cache
            .get(key.as_bytes())?
            .map(|v| decode(tree::LLM_CACHE, key, &v))
            .transpose()
    }

    pub fn cache_response(&self, key: &str, response: &serde_json::Value) -> Result<()> {
        self.llm_cache.insert(key.as_bytes(), encode(response)?)?;
        Ok(())
    }
}

/// Names the requests in errors, as a tree name does.
const REQUESTS: &str = "requests";

/// Where requests are kept: a JSON file per run in the store's `requests/` folder, or memory
/// for a temporary store. Not in sled: a request is written once, read rarely, and can weigh
/// megabytes, and sled keeps values inside its tree nodes, which it reads and rewrites with
/// their neighbours (every request in a leaf, at every insert).
#[derive(Clone)]
enum Requests {
    Files(PathBuf),
    Memory(Arc<Mutex<HashMap<String, Vec<u8>>>>),
}

impl Requests {
    /// Run ids are hex digits; anything else must not reach a file name.
    fn check(run_id: &str) -> Result<()> {
        if run_id.is_empty()
            || !run_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(StoreError::InvalidRunId(run_id.to_string()));
        }
        Ok(())
    }

    fn path(dir: &Path, run_id: &str) -> PathBuf {
        dir.join(format!("{run_id}.json"))
    }

    /// Written to a temporary file and renamed, so a request is whole or absent.
    fn put(&self, run_id: &str, bytes: Vec<u8>) -> Result<()> {
        Self::check(run_id)?;
        let dir = match self {
            Requests::Memory(map) => {
                map.lock().unwrap().insert(run_id.to_string(), bytes);
                return Ok(());
            }
            Requests::Files(dir) => dir,
        };
        let path = Self::path(dir, run_id);
        let tmp = path.with_extension(format!("json.tmp{}", std::process::id()));
        let io = |source| StoreError::Io {
            path: path.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        std::fs::write(&tmp, bytes).map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)
    }

    fn get(&self, run_id: &str) -> Result<Option<Vec<u8>>> {
        Self::check(run_id)?;
        let dir = match self {
            Requests::Memory(map) => return Ok(map.lock().unwrap().get(run_id).cloned()),
            Requests::Files(dir) => dir,
        };
        let path = Self::path(dir, run_id);
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StoreError::Io {
                path: path.display().to_string(),
                source,
            }),
        }
    }

    fn remove(&self, run_id: &str) -> Result<()> {
        Self::check(run_id)?;
        let dir = match self {
            Requests::Memory(map) => {
                map.lock().unwrap().remove(run_id);
                return Ok(());
            }
            Requests::Files(dir) => dir,
        };
        let path = Self::path(dir, run_id);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(StoreError::Io {
                path: path.display().to_string(),
                source: e,
            }),
            _ => Ok(()),
        }
    }
}

/// A sled open error as the store's: a held lock reads as another process using the store.
fn open_error(path: &Path, e: sled::Error) -> StoreError {
    match e {
        sled::Error::Io(ref io)
            if io.kind() == std::io::ErrorKind::WouldBlock || io.to_string().contains("lock") =>
        {
            StoreError::Locked {
                path: path.display().to_string(),
            }
        }
        sled::Error::Corruption { .. } | sled::Error::ReportableBug(_) => StoreError::Damaged {
            path: path.display().to_string(),
            reason: e.to_string(),
        },
        other => StoreError::Sled(other),
    }
}

/// The record `old` moved to `to` with `f` applied, redacted as stored; a move from a status
/// not in `allowed_from`, or one the lifecycle does not allow, is a [`StoreError::Conflict`].
fn moved(
    id: &str,
    old: &[u8],
    allowed_from: &[RunStatus],
    to: RunStatus,
    f: &mut dyn FnMut(&mut RunRecord),
) -> Result<RunRecord> {
    let mut run: RunRecord = decode(tree::RUNS, id, old)?;
    if !allowed_from.contains(&run.status) || !run.status.may_become(to) {
        return Err(StoreError::Conflict {
            id: id.to_string(),
            found: run.status,
            to,
        });
    }
    run.status = to;
    f(&mut run);
    Ok(redacted_run(&run).into_owned())
}

fn run_prefix(run_id: &str) -> Vec<u8> {
    let mut k = run_id.as_bytes().to_vec();
    k.push(0);
    k
}

fn sample_key(run_id: &str, index: u32) -> Vec<u8> {
    let mut k = run_prefix(run_id);
    k.extend_from_slice(&index.to_be_bytes());
    k
}

/// Secrets never reach the store: a run's error strings are redacted on every write.
fn redacted_run(run: &RunRecord) -> std::borrow::Cow<'_, RunRecord> {
    if run.error.is_none() && run.metric_errors.is_empty() {
        return std::borrow::Cow::Borrowed(run);
    }
    let mut run = run.clone();
    if let Some(e) = &mut run.error {
        *e = crate::redact::redact(e);
    }
    for e in run.metric_errors.values_mut() {
        *e = crate::redact::redact(e);
    }
    std::borrow::Cow::Owned(run)
}

/// A stored run, or, when its record cannot be read, a `corrupt` placeholder that keeps what
/// can be salvaged (name, kind, creation time) and says why.
fn read_run(key: &str, bytes: &[u8]) -> RunRecord {
    match serde_json::from_slice::<RunRecord>(bytes) {
        Ok(run) => run,
        Err(e) => {
            let value: serde_json::Value = serde_json::from_slice(bytes).unwrap_or_default();
            let text = |field: &str| {
                value
                    .get(field)
                    .and_then(|v| v.as_str())
                    .map(str::to_string)
            };
            let kind = value
                .get("kind")
                .and_then(|k| serde_json::from_value(k.clone()).ok())
                .unwrap_or(RunKind::Eval);
            let mut run = RunRecord::new(
                key.to_string(),
                text("name").unwrap_or_else(|| "(unreadable)".into()),
                kind,
            );
            run.status = RunStatus::Corrupt;
            run.created = text("created").unwrap_or_default();
            run.error = Some(format!(
                "the stored record cannot be read ({e}); `adapterlab store check --repair` quarantines it"
            ));
            run
        }
    }
}

fn read_sample(key: &[u8], bytes: &[u8]) -> SampleRecord {
    match serde_json::from_slice::<SampleRecord>(bytes) {
        Ok(sample) => sample,
        Err(e) => {
            let index = key
                .len()
                .checked_sub(4)
                .and_then(|at| key[at..].try_into().ok())
                .map(u32::from_be_bytes)
                .unwrap_or(0);
            SampleRecord {
                index,
                id: format!("#{index}"),
                errors: [(
                    "store".to_string(),
                    format!("the stored sample cannot be read: {e}"),
                )]
                .into(),
                ..Default::default()
            }
        }
    }
}

fn readable<T: DeserializeOwned>(tree: &sled::Tree, name: &'static str) -> Result<Vec<T>> {
    let mut out = Vec::new();
    for item in tree.iter() {
        let (k, v) = item?;
        match decode(name, &String::from_utf8_lossy(&k), &v) {
            Ok(record) => out.push(record),
            Err(e) => tracing::warn!("{e}"),
        }
    }
    Ok(out)
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    Ok(serde_json::to_vec(value)?)
}

fn decode<T: DeserializeOwned>(tree: &'static str, key: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Corrupt {
        tree,
        key: key.to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(id: &str) -> RunRecord {
        RunRecord::new(id.to_string(), "test".into(), RunKind::Eval)
    }

    #[test]
    fn runs_resolve_by_prefix_and_name() {
        let store = Store::temporary().unwrap();
        store.put_run(&run("0001aaaa")).unwrap();
        let mut b = run("0001bbbb");
        b.name = "baseline".into();
        store.put_run(&b).unwrap();
        assert_eq!(store.resolve_run("0001a").unwrap().id, "0001aaaa");
        assert_eq!(store.resolve_run("baseline").unwrap().id, "0001bbbb");
        assert!(matches!(
            store.resolve_run("0001"),
            Err(StoreError::AmbiguousRun(..))
        ));
        assert!(matches!(
            store.resolve_run("zzz"),
            Err(StoreError::NoSuchRun(_))
        ));
    }

    #[test]
    fn samples_come_back_in_order_and_per_run() {
        let store = Store::temporary().unwrap();
        let mk = |i: u32| SampleRecord {
            index: i,
            id: format!("s{i}"),
            ..Default::default()
        };
        store.put_samples("a", &[mk(2), mk(0), mk(1)]).unwrap();
        store.put_samples("ab", &[mk(0)]).unwrap();
        let ids: Vec<String> = store
            .samples("a")
            .unwrap()
            .into_iter()
            .map(|s| s.id)
            .collect();
        assert_eq!(ids, ["s0", "s1", "s2"]);
        assert_eq!(store.sample_count("ab"), 1);
    }

    #[test]
    fn scores_read_back_bit_for_bit() {
        let store = Store::temporary().unwrap();
        // 1/11 is one of the values serde_json's default float parser reads back wrong.
        let values = [
            1.0 / 11.0,
            2.0 / 7.0,
            0.1 + 0.2,
            f64::MIN_POSITIVE,
            1e300 / 7.0,
        ];
        let sample = SampleRecord {
            scores: values
                .iter()
                .enumerate()
                .map(|(i, v)| (format!("s{i}"), *v))
                .collect(),
            ..Default::default()
        };
        store.put_samples("r", &[sample]).unwrap();
        let back = &store.samples("r").unwrap()[0];
        for (i, v) in values.iter().enumerate() {
            assert_eq!(back.scores[&format!("s{i}")].to_bits(), v.to_bits(), "{v}");
        }
    }

    #[test]
    fn events_resume_after_a_sequence_number() {
        let store = Store::temporary().unwrap();
        for i in 0..3 {
            store
                .push_event(
                    "r",
                    &RunEvent::Log {
                        level: "info".into(),
                        message: format!("{i}"),
                    },
                )
                .unwrap();
        }
        let all = store.events_after("r", None).unwrap();
        assert_eq!(all.len(), 3);
        let rest = store.events_after("r", Some(all[0].0)).unwrap();
        assert_eq!(rest.len(), 2);
    }

    #[test]
    fn requests_are_kept_apart_and_deleted_with_their_run() {
        let store = Store::temporary().unwrap();
        store.put_run(&run("r")).unwrap();
        store
            .put_request("r", &serde_json::json!({"rows": [1, 2]}))
            .unwrap();
        let request: Option<serde_json::Value> = store.request("r").unwrap();
        assert_eq!(request.unwrap()["rows"][1], 2);
        let raw = store.runs.get("r").unwrap().unwrap();
        assert!(!String::from_utf8_lossy(&raw).contains("rows"));
        store.delete_run("r").unwrap();
        assert_eq!(store.request::<serde_json::Value>("r").unwrap(), None);
        assert!(matches!(
            store.put_request("../x", &1),
            Err(StoreError::InvalidRunId(_))
        ));
    }

    #[test]
    fn one_of_concurrent_transitions_wins() {
        let store = Store::temporary().unwrap();
        let mut r = run("x");
        r.status = RunStatus::Interrupted;
        store.put_run(&r).unwrap();
        let wins = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..10 {
                s.spawn(|| {
                    let from = [RunStatus::Interrupted, RunStatus::Failed];
                    match store.transition("x", &from, RunStatus::Queued, |_| {}) {
                        Ok(_) => {
                            wins.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                        Err(StoreError::Conflict { found, .. }) => {
                            assert_eq!(found, RunStatus::Queued)
                        }
                        Err(e) => panic!("{e}"),
                    }
                });
            }
        });
        assert_eq!(wins.into_inner(), 1);
    }

    /// Every accepted status change leaves its status event in the same write; a refused one
    /// leaves none (and ten racing transitions, one event).
    #[test]
    fn each_transition_writes_its_status_event_and_a_refused_one_none() {
        let store = Store::temporary().unwrap();
        store.put_run(&run("x")).unwrap();
        let statuses = |store: &Store| -> Vec<RunStatus> {
            store
                .events_after("x", None)
                .unwrap()
                .into_iter()
                .filter_map(|(_, e)| match e {
                    RunEvent::Status { status } => Some(status),
                    _ => None,
                })
                .collect()
        };
        store.start_run("x").unwrap();
        store
            .transition("x", &[RunStatus::Running], RunStatus::Cancelled, |_| {})
            .unwrap();
        assert!(
            store
                .transition("x", &[RunStatus::Running], RunStatus::Failed, |_| {})
                .is_err()
        );
        store
            .transition("x", &[RunStatus::Cancelled], RunStatus::Queued, |_| {})
            .unwrap();
        std::thread::scope(|s| {
            for _ in 0..10 {
                s.spawn(|| store.start_run("x").ok());
            }
        });
        assert_eq!(
            statuses(&store),
            [
                RunStatus::Running,
                RunStatus::Cancelled,
                RunStatus::Queued,
                RunStatus::Running
            ]
        );
        assert_eq!(
            store.get_run("x").unwrap().unwrap().status,
            RunStatus::Running
        );
    }

    #[test]
    fn update_run_is_read_modify_write() {
        let store = Store::temporary().unwrap();
        store.put_run(&run("x")).unwrap();
        store.update_run("x", |r| r.notes = "kept".into()).unwrap();
        assert_eq!(store.get_run("x").unwrap().unwrap().notes, "kept");
        let e = store
            .update_run("x", |r| r.status = RunStatus::Done)
            .unwrap_err();
        assert!(matches!(e, StoreError::StatusByUpdate { .. }), "{e}");
    }

    #[test]
    fn the_lifecycle_table_is_the_only_way_between_statuses() {
        let store = Store::temporary().unwrap();
        store.put_run(&run("x")).unwrap();
        // queued -> done skips running: refused whatever the caller allows.
        let e = store
            .transition("x", &[RunStatus::Queued], RunStatus::Done, |_| {})
            .unwrap_err();
        assert!(matches!(e, StoreError::Conflict { .. }), "{e}");
        store.start_run("x").unwrap();
        let done = store.end_run("x", RunStatus::Done, None, |_| {}).unwrap();
        assert!(done.finished.is_some() && done.owner_pid.is_none());
        // Done is final: a late failure does not overwrite it.
        let e = store
            .end_run("x", RunStatus::Failed, Some("late".into()), |_| {})
            .unwrap_err();
        assert!(matches!(e, StoreError::Conflict { .. }), "{e}");
        assert_eq!(store.get_run("x").unwrap().unwrap().status, RunStatus::Done);
        for from in [RunStatus::Done, RunStatus::Corrupt] {
            assert!(
                RunStatus::sources_of(RunStatus::Queued)
                    .iter()
                    .all(|s| *s != from)
            );
        }
    }
}
