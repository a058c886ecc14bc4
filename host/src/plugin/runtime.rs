//! The wasmtime engine, the compiled-component cache, loading and validating components,
//! and calling into them under a deadline and a memory cap.
//!
//! **Architecture Invariant:** only this module (with `host` and `wit`) knows wasmtime.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use sha2::{Digest, Sha256};
use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine, OptLevel, Store, StoreContextMut, Trap, UpdateDeadline};

use crate::plugin::error::PluginError;
use crate::plugin::host::{CallContext, HostState};
use crate::plugin::limits::{self, MemoryBudget};
use crate::plugin::manifest::{self, PluginKind, PluginMeta, PluginSource};
use crate::plugin::wit::latest;
use crate::plugin::wit::types::{BatchResult, Document, Formatted, Report, Sample, SampleResult};

/// Resource limits applied to every plugin call.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Wall-clock time one call may take, time in host capabilities included.
    pub deadline: Duration,
    /// Linear memory one instance may grow to.
    pub memory_bytes: usize,
    /// Linear memory all live instances of this runtime may hold together.
    pub total_memory_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            deadline: limits::DEFAULT_DEADLINE,
            memory_bytes: limits::DEFAULT_MEMORY_BYTES,
            total_memory_bytes: limits::DEFAULT_TOTAL_MEMORY_BYTES,
        }
    }
}

impl Limits {
    /// The defaults, overridden by `ADAPTERLAB_PLUGIN_TIMEOUT_MS`,
    /// `ADAPTERLAB_PLUGIN_MEMORY_MIB` and `ADAPTERLAB_PLUGIN_MEMORY_TOTAL_MIB`.
    pub fn from_env() -> Self {
        let mut limits = Limits::default();
        let var = |k: &str| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .filter(|v| *v > 0)
        };
        if let Some(ms) = var("ADAPTERLAB_PLUGIN_TIMEOUT_MS") {
            limits.deadline = Duration::from_millis(ms);
        }
        if let Some(mib) = var("ADAPTERLAB_PLUGIN_MEMORY_MIB") {
            limits.memory_bytes = (mib.min(1 << 20) as usize) << 20;
        }
        if let Some(mib) = var("ADAPTERLAB_PLUGIN_MEMORY_TOTAL_MIB") {
            limits.total_memory_bytes = (mib.min(1 << 24) as usize) << 20;
        }
        limits
    }
}

/// How often the engine's epoch advances: the granularity of deadline checks.
const EPOCH_TICK: Duration = Duration::from_millis(5);

/// The plugin runtime: one engine, its linker, the component cache.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<RuntimeInner>,
}

struct RuntimeInner {
    engine: Engine,
    linker: Linker<HostState>,
    cache_dir: Option<PathBuf>,
    limits: Limits,
    memory_budget: MemoryBudget,
    stop_ticker: Arc<AtomicBool>,
}

impl Drop for RuntimeInner {
    fn drop(&mut self) {
        self.stop_ticker.store(true, Ordering::Relaxed);
    }
}

/// Where a compiled component came from, for the cache benchmark and `-v` output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompileSource {
    Compiled,
    Cache,
}

impl Runtime {
    /// A runtime caching compiled components in `cache_dir` (none: compile every time).
    pub fn new(cache_dir: Option<PathBuf>, limits: Limits) -> anyhow::Result<Self> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        config.cranelift_opt_level(OptLevel::Speed);
        config.parallel_compilation(true);
        let engine = Engine::new(&config)
            .map_err(anyhow::Error::from)
            .context("failed to create the wasmtime engine")?;

        let mut linker = Linker::<HostState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .map_err(anyhow::Error::from)
            .context("failed to link WASI")?;
        latest::imports::Imports::add_to_linker::<HostState, wasmtime::component::HasSelf<HostState>>(
            &mut linker,
            |state| state,
        )
        .map_err(anyhow::Error::from)
        .context("failed to link the host capabilities")?;

        let stop_ticker = Arc::new(AtomicBool::new(false));
        {
            let engine = engine.clone();
            let stop = stop_ticker.clone();
            std::thread::Builder::new()
                .name("plugin-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(EPOCH_TICK);
                        engine.increment_epoch();
                    }
                })
                .context("failed to start the epoch thread")?;
        }
        Ok(Runtime {
            inner: Arc::new(RuntimeInner {
                engine,
                linker,
                cache_dir,
                limits,
                memory_budget: MemoryBudget::new(limits.total_memory_bytes),
                stop_ticker,
            }),
        })
    }

    pub fn limits(&self) -> Limits {
        self.inner.limits
    }

    /// Compile (or load from the cache) and validate a component, calling its `info` export.
    pub fn load(&self, bytes: &[u8], source: PluginSource) -> Result<Plugin, PluginError> {
        let invalid = |reason: String| PluginError::Invalid {
            path: source.to_string(),
            reason,
        };
        check_is_component(bytes).map_err(invalid)?;
        let sha256 = hex::encode(Sha256::digest(bytes));
        let (component, compiled) = self
            .compile(bytes, &sha256)
            .map_err(|e| invalid(format!("{e:#}")))?;
        let kind = detect_kind(&self.inner.engine, &component).map_err(invalid)?;
        let instance_pre = self.inner.linker.instantiate_pre(&component).map_err(|e| {
            invalid(format!(
                "it imports something this host does not provide: {e:#}"
            ))
        })?;
        let pre = match kind {
            PluginKind::Metric => Pre::Metric(
                latest::metric::MetricPluginPre::new(instance_pre)
                    .map_err(|e| invalid(format!("{e:#}")))?,
            ),
            PluginKind::Formatter => Pre::Formatter(
                latest::formatter::FormatterPluginPre::new(instance_pre)
                    .map_err(|e| invalid(format!("{e:#}")))?,
            ),
            PluginKind::Reporter => Pre::Reporter(
                latest::reporter::ReporterPluginPre::new(instance_pre)
                    .map_err(|e| invalid(format!("{e:#}")))?,
            ),
        };
        let language = manifest::detect_language(bytes);
        let loaded = Arc::new(Loaded {
            runtime: self.inner.clone(),
            pre,
        });
        // The name is not known before `info` returns; errors meanwhile name the source.
        let label = source.to_string();
        let mut session = loaded.session(&label, CallContext::default())?;
        let info = session
            .info()
            .map_err(|e| invalid(format!("calling `info` failed: {e}")))?;
        let meta = PluginMeta::from_info(info, source.clone(), language, sha256, bytes.len())
            .map_err(|reason| invalid(reason))?;
        match compiled {
            CompileSource::Compiled => tracing::debug!("plugin {}: compiled", meta.name),
            CompileSource::Cache => {
                tracing::debug!("plugin {}: loaded from the component cache", meta.name)
            }
        }
        Ok(Plugin {
            meta: Arc::new(meta),
            loaded,
            compiled,
        })
    }

    fn compile(&self, bytes: &[u8], sha256: &str) -> anyhow::Result<(Component, CompileSource)> {
        let engine = &self.inner.engine;
        let Some(dir) = &self.inner.cache_dir else {
            return Ok((Component::new(engine, bytes)?, CompileSource::Compiled));
        };
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let path = dir.join(format!("{sha256}-{:016x}.cwasm", hasher.finish()));
        if path.exists() {
            // SAFETY: the file was written by `precompile_component` of an engine with the same
            // compatibility hash (it is in the file name), in a directory only we write to.
            match unsafe { Component::deserialize_file(engine, &path) } {
                Ok(c) => return Ok((c, CompileSource::Cache)),
                Err(e) => tracing::warn!(
                    "ignoring unreadable cached component {}: {e:#}",
                    path.display()
                ),
            }
        }
        let compiled = engine.precompile_component(bytes)?;
        write_atomically(&path, &compiled)
            .with_context(|| format!("failed to write the component cache {}", path.display()))?;
        // SAFETY: as above; we just wrote it.
        let component = unsafe { Component::deserialize(engine, &compiled)? };
        Ok((component, CompileSource::Compiled))
    }
}

/// Refuse what is not a binary component before wasmtime sees it: wasmtime would parse a
/// text file as WAT and answer with a parser error that says nothing of the real problem.
fn check_is_component(bytes: &[u8]) -> Result<(), String> {
    const MAGIC: &[u8] = b"\0asm";
    if bytes.len() < 8 || &bytes[..4] != MAGIC {
        return Err(
            "not a component: the file is not WebAssembly in binary form (a text or .wat file?). Build a component: `cargo build --target wasm32-wasip2` for Rust, `componentize-py` for Python, `componentize-js` or `jco componentize` for JavaScript; `adapterlab plugins new` writes a project that does"
                .into(),
        );
    }
    // The version field: 1 for a core module, 0x0d (layer 1) for a component.
    if bytes[4..8] == [1, 0, 0, 0] {
        return Err(
            "not a component: this is a core WebAssembly module. Wrap it into a component with `wasm-tools component new module.wasm -o plugin.wasm` (add `--adapt wasi_snapshot_preview1.reactor.wasm` if it imports WASI preview 1) or `jco new module.wasm --wasi-reactor -o plugin.wasm`"
                .into(),
        );
    }
    Ok(())
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// Which plugin world a component implements, from the interfaces it exports.
fn detect_kind(engine: &Engine, component: &Component) -> Result<PluginKind, String> {
    let ty = component.component_type();
    let exports: Vec<String> = ty
        .exports(engine)
        .map(|(name, _)| name.to_string())
        .collect();
    let version = latest::VERSION;
    let has = |iface: &str| {
        exports
            .iter()
            .any(|e| e == &format!("adapterlab:plugin/{iface}@{version}"))
    };
    let kinds: Vec<PluginKind> = [
        (has("metric"), PluginKind::Metric),
        (has("formatter"), PluginKind::Formatter),
        (has("reporter"), PluginKind::Reporter),
    ]
    .into_iter()
    .filter_map(|(present, k)| present.then_some(k))
    .collect();
    match kinds.as_slice() {
        [k] => Ok(*k),
        [] => Err(format!(
            "it exports none of adapterlab:plugin/{{metric,formatter,reporter}}@{version} (it exports: {})",
            if exports.is_empty() {
                "nothing".to_string()
            } else {
                exports.join(", ")
            }
        )),
        _ => Err("it exports more than one plugin interface; a component is one plugin".into()),
    }
}

enum Pre {
    Metric(latest::metric::MetricPluginPre<HostState>),
    Formatter(latest::formatter::FormatterPluginPre<HostState>),
    Reporter(latest::reporter::ReporterPluginPre<HostState>),
}

struct Loaded {
    runtime: Arc<RuntimeInner>,
    pre: Pre,
}

enum Instance {
    Metric(latest::metric::MetricPlugin),
    Formatter(latest::formatter::FormatterPlugin),
    Reporter(latest::reporter::ReporterPlugin),
}

impl Loaded {
    fn session(self: &Arc<Self>, plugin: &str, ctx: CallContext) -> Result<Session, PluginError> {
        let limits = self.runtime.limits;
        let mut store = Store::new(
            &self.runtime.engine,
            HostState::new(
                plugin,
                ctx,
                limits.memory_bytes,
                self.runtime.memory_budget.clone(),
                limits.deadline,
            ),
        );
        store.limiter(|state| state);
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(|ctx: StoreContextMut<'_, HostState>| {
            if ctx.data().must_stop() {
                Ok(UpdateDeadline::Interrupt)
            } else {
                Ok(UpdateDeadline::Continue(1))
            }
        });
        let host_err = |e: wasmtime::Error| PluginError::Trap {
            plugin: plugin.to_string(),
            message: format!("{e:#}"),
        };
        let instance = match &self.pre {
            Pre::Metric(pre) => Instance::Metric(pre.instantiate(&mut store).map_err(host_err)?),
            Pre::Formatter(pre) => {
                Instance::Formatter(pre.instantiate(&mut store).map_err(host_err)?)
            }
            Pre::Reporter(pre) => {
                Instance::Reporter(pre.instantiate(&mut store).map_err(host_err)?)
            }
        };
        Ok(Session {
            store,
            instance: Some(instance),
            loaded: self.clone(),
        })
    }
}

/// A loaded, validated plugin. Cheap to clone.
#[derive(Clone)]
pub struct Plugin {
    pub meta: Arc<PluginMeta>,
    loaded: Arc<Loaded>,
    compiled: CompileSource,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin").field("meta", &self.meta).finish()
    }
}

impl Plugin {
    pub fn name(&self) -> &str {
        &self.meta.name
    }

    /// Whether this load compiled the component or took it from the cache.
    pub fn compile_source(&self) -> CompileSource {
        self.compiled
    }

    /// A fresh instance for a series of calls with one context (one run). After a trap the
    /// session instantiates anew on its next call, so one bad sample does not end a run.
    pub fn session(&self, ctx: CallContext) -> Result<Session, PluginError> {
        let mut session = self.loaded.session(&self.meta.name, ctx)?;
        session.store.data_mut().granted = self.meta.capabilities.clone();
        Ok(session)
    }
}

/// One instance of a plugin and its store, reused across calls.
pub struct Session {
    store: Store<HostState>,
    instance: Option<Instance>,
    loaded: Arc<Loaded>,
}

impl Session {
    fn plugin(&self) -> String {
        self.store.data().plugin.clone()
    }

    /// Call into the guest with the deadline and memory cap armed; classify failures.
    fn call<R>(
        &mut self,
        f: impl FnOnce(&mut Store<HostState>, &Instance) -> wasmtime::Result<R>,
    ) -> Result<R, PluginError> {
        let plugin = self.plugin();
        if self.instance.is_none() {
            let granted = self.store.data().granted.clone();
            let fresh = self
                .loaded
                .session(&plugin, self.store.data().ctx_clone())?;
            *self = fresh;
            self.store.data_mut().granted = granted;
        }
        let instance = self.instance.take().expect("instance present");
        self.store.data_mut().begin_call();
        let started = Instant::now();
        let result = f(&mut self.store, &instance);
        self.store.data_mut().flush_stdio();
        match result {
            Ok(r) => {
                self.instance = Some(instance);
                tracing::trace!(plugin = %plugin, elapsed = ?started.elapsed(), "plugin call");
                Ok(r)
            }
            // After a trap the instance may be in any state: it is dropped and rebuilt.
            Err(e) => Err(self.classify(&plugin, e)),
        }
    }

    fn classify(&self, plugin: &str, e: wasmtime::Error) -> PluginError {
        let state = self.store.data();
        let plugin = plugin.to_string();
        if state.budget_exceeded {
            return PluginError::MemoryBudget {
                plugin,
                limit_mib: (self.loaded.runtime.limits.total_memory_bytes >> 20) as u64,
            };
        }
        if state.memory_exceeded {
            return PluginError::OutOfMemory {
                plugin,
                limit_mib: (self.loaded.runtime.limits.memory_bytes >> 20) as u64,
            };
        }
        if let Some(Trap::Interrupt) = e.downcast_ref::<Trap>() {
            if state.cancelled() {
                return PluginError::Cancelled { plugin };
            }
            return PluginError::Timeout {
                plugin,
                limit: state.deadline,
            };
        }
        PluginError::Trap {
            plugin,
            message: trap_message(&e, &state.call_stderr),
        }
    }

    fn wrong_kind(&self, expected: &'static str, instance: &Instance) -> PluginError {
        PluginError::WrongKind {
            plugin: self.plugin(),
            expected,
            actual: instance_kind(instance),
        }
    }

    /// The plugin's `info` export, whatever its kind.
    pub(crate) fn info(&mut self) -> Result<manifest::AnyInfo, PluginError> {
        self.call(|store, instance| {
            Ok(match instance {
                Instance::Metric(m) => {
                    manifest::AnyInfo::Metric(m.adapterlab_plugin_metric().call_info(store)?)
                }
                Instance::Formatter(m) => {
                    manifest::AnyInfo::Formatter(m.adapterlab_plugin_formatter().call_info(store)?)
                }
                Instance::Reporter(m) => {
                    manifest::AnyInfo::Reporter(m.adapterlab_plugin_reporter().call_info(store)?)
                }
            })
        })
    }

    /// Score a batch with a metric plugin. The result is checked: one entry per sample, only
    /// declared score names, finite values within their declared ranges. A sample whose
    /// scores break that contract gets an error instead; the others keep their scores.
    pub fn score(
        &mut self,
        samples: &[Sample],
        meta: &PluginMeta,
    ) -> Result<BatchResult, PluginError> {
        if let Some(i) = self
            .instance
            .as_ref()
            .filter(|i| !matches!(i, Instance::Metric(_)))
        {
            return Err(self.wrong_kind("metric", i));
        }
        let result = self.call(|store, instance| match instance {
            Instance::Metric(m) => m.adapterlab_plugin_metric().call_score(store, samples),
            _ => unreachable!("checked above"),
        })?;
        let plugin = self.plugin();
        let batch = result.map_err(|message| PluginError::Failed {
            plugin: plugin.clone(),
            message: limits::error_text(&message),
        })?;
        let state = self.store.data();
        check_batch(&plugin, meta, samples.len(), batch, |m| {
            state.note(m.to_string())
        })
    }

    pub fn format(
        &mut self,
        rows: &[Vec<(String, String)>],
    ) -> Result<Vec<Result<Formatted, String>>, PluginError> {
        if let Some(i) = self
            .instance
            .as_ref()
            .filter(|i| !matches!(i, Instance::Formatter(_)))
        {
            return Err(self.wrong_kind("formatter", i));
        }
        let out = self.call(|store, instance| match instance {
            Instance::Formatter(m) => m.adapterlab_plugin_formatter().call_format(store, rows),
            _ => unreachable!("checked above"),
        })?;
        if out.len() != rows.len() {
            return Err(PluginError::Malformed {
                plugin: self.plugin(),
                message: format!(
                    "format returned {} results for {} rows",
                    out.len(),
                    rows.len()
                ),
            });
        }
        Ok(out)
    }

    pub fn render(&mut self, report: &Report) -> Result<Document, PluginError> {
        if let Some(i) = self
            .instance
            .as_ref()
            .filter(|i| !matches!(i, Instance::Reporter(_)))
        {
            return Err(self.wrong_kind("reporter", i));
        }
        let out = self.call(|store, instance| match instance {
            Instance::Reporter(m) => m.adapterlab_plugin_reporter().call_render(store, report),
            _ => unreachable!("checked above"),
        })?;
        out.map_err(|message| PluginError::Failed {
            plugin: self.plugin(),
            message,
        })
    }
}

/// What a person needs from a trap: what the guest said before it died (a Rust panic's text,
/// a Python traceback, a JavaScript error are written to stderr), then wasmtime's reason. The
/// wasm backtrace alone names only function indices.
fn trap_message(e: &wasmtime::Error, stderr: &str) -> String {
    let reason = match e.downcast_ref::<Trap>() {
        Some(trap) => trap.to_string(),
        None => e.root_cause().to_string(),
    };
    let said = stderr.trim();
    let message = if said.is_empty() {
        format!("{e:#}")
    } else {
        format!("{said} ({reason})")
    };
    limits::error_text(&message)
}

fn instance_kind(i: &Instance) -> &'static str {
    match i {
        Instance::Metric(_) => "metric",
        Instance::Formatter(_) => "formatter",
        Instance::Reporter(_) => "reporter",
    }
}

/// Enforce the metric contract on a batch result.
fn check_batch(
    plugin: &str,
    meta: &PluginMeta,
    expected: usize,
    mut batch: BatchResult,
    warn: impl Fn(&str),
) -> Result<BatchResult, PluginError> {
    if batch.samples.len() != expected {
        return Err(PluginError::Malformed {
            plugin: plugin.to_string(),
            message: format!(
                "score returned {} results for {} samples",
                batch.samples.len(),
                expected
            ),
        });
    }
    for result in &mut batch.samples {
        match result {
            SampleResult::Scores(scores) => {
                if let Err(problem) = check_scores(meta, scores) {
                    *result = SampleResult::Error(format!("malformed output: {problem}"));
                }
            }
            SampleResult::Error(message) => *message = limits::error_text(message),
        }
    }
    for problem in check_corpus(meta, &mut batch.corpus) {
        warn(&format!("malformed output, dropped: {problem}"));
    }
    Ok(batch)
}

/// Corpus statistics are stored beside other metrics' under their names: a metric may only
/// write under the score names it declared, each once, with a finite value. The others are
/// dropped (the per-sample scores stay); what was dropped and why is returned.
fn check_corpus(meta: &PluginMeta, corpus: &mut Vec<(String, f64)>) -> Vec<String> {
    let mut seen = std::collections::BTreeSet::new();
    let mut problems = Vec::new();
    corpus.retain(|(name, value)| {
        let problem = if !meta.scores.iter().any(|s| &s.name == name) {
            format!(
                "corpus statistic {:?} is not among its declared scores ({})",
                limits::name_text(name),
                meta.scores
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        } else if !seen.insert(name.clone()) {
            format!("corpus statistic {name:?} appears twice")
        } else if !value.is_finite() {
            format!("corpus statistic {name:?} is {value}")
        } else {
            return true;
        };
        problems.push(problem);
        false
    });
    problems
}

fn check_scores(meta: &PluginMeta, scores: &[(String, f64)]) -> Result<(), String> {
    if scores.is_empty() {
        return Err("no scores for this sample (return an error instead of an empty list)".into());
    }
    let mut seen = std::collections::BTreeSet::new();
    for (name, value) in scores {
        let Some(spec) = meta.scores.iter().find(|s| &s.name == name) else {
            return Err(format!(
                "score {:?} is not among the declared scores",
                limits::name_text(name)
            ));
        };
        if !seen.insert(name) {
            return Err(format!("score {name:?} appears twice"));
        }
        if !value.is_finite() {
            return Err(format!("score {name:?} is {value}"));
        }
        let tolerance = 1e-9 * (spec.max - spec.min).abs().max(1.0);
        if *value < spec.min - tolerance || *value > spec.max + tolerance {
            return Err(format!(
                "score {name:?} = {value} is outside its declared range [{}, {}]",
                spec.min, spec.max
            ));
        }
    }
    Ok(())
}

impl Plugin {
    pub(crate) fn with_meta(mut self, meta: crate::plugin::manifest::PluginMeta) -> Self {
        self.meta = Arc::new(meta);
        self
    }
}
