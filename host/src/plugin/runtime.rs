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

use crate::plugin::compat::{self, convert};
use crate::plugin::error::PluginError;
use crate::plugin::host::{CallContext, HostState};
use crate::plugin::limits::{self, MemoryBudget};
use crate::plugin::manifest::{self, PluginKind, PluginMeta, PluginSource};
use crate::plugin::wit::types::{
    Document, Formatted, MetricInfo, Report, Sample, SampleResult, Statistic,
};
use crate::plugin::wit::{latest, since_v0_1_0 as v1};

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
        // Every contract version's capabilities: a component imports those of the version
        // it was built against.
        latest::imports::Imports::add_to_linker::<HostState, wasmtime::component::HasSelf<HostState>>(
            &mut linker,
            |state| state,
        )
        .map_err(anyhow::Error::from)
        .context("failed to link the host capabilities")?;
        v1::imports::Imports::add_to_linker::<HostState, wasmtime::component::HasSelf<HostState>>(
            &mut linker,
            |state| state,
        )
        .map_err(anyhow::Error::from)
        .context("failed to link the host capabilities of contract 0.1.0")?;

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
        let (kind, contract) = detect_kind(&self.inner.engine, &component).map_err(invalid)?;
        let instance_pre = self.inner.linker.instantiate_pre(&component).map_err(|e| {
            invalid(format!(
                "it imports something this host does not provide: {e:#}"
            ))
        })?;
        let bad = |e: wasmtime::Error| invalid(format!("{e:#}"));
        let pre = match (kind, contract) {
            (PluginKind::Metric, Contract::V2) => {
                Pre::Metric(latest::metric::MetricPluginPre::new(instance_pre).map_err(bad)?)
            }
            (PluginKind::Metric, Contract::V1) => {
                Pre::MetricV1(v1::metric::MetricPluginPre::new(instance_pre).map_err(bad)?)
            }
            (PluginKind::Formatter, Contract::V2) => Pre::Formatter(
                latest::formatter::FormatterPluginPre::new(instance_pre).map_err(bad)?,
            ),
            (PluginKind::Formatter, Contract::V1) => {
                Pre::FormatterV1(v1::formatter::FormatterPluginPre::new(instance_pre).map_err(bad)?)
            }
            (PluginKind::Reporter, Contract::V2) => {
                Pre::Reporter(latest::reporter::ReporterPluginPre::new(instance_pre).map_err(bad)?)
            }
            (PluginKind::Reporter, Contract::V1) => {
                Pre::ReporterV1(v1::reporter::ReporterPluginPre::new(instance_pre).map_err(bad)?)
            }
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
        let meta = PluginMeta::from_info(
            info,
            contract.version(),
            source.clone(),
            language,
            sha256,
            bytes.len(),
        )
        .map_err(invalid)?;
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

/// The contract versions this host serves, newest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Contract {
    V2,
    V1,
}

impl Contract {
    const ALL: [Contract; 2] = [Contract::V2, Contract::V1];

    fn version(self) -> &'static str {
        match self {
            Contract::V2 => latest::VERSION,
            Contract::V1 => v1::VERSION,
        }
    }
}

/// Which plugin world, of which contract version, a component implements, from the
/// interfaces it exports.
fn detect_kind(engine: &Engine, component: &Component) -> Result<(PluginKind, Contract), String> {
    let ty = component.component_type();
    let exports: Vec<String> = ty
        .exports(engine)
        .map(|(name, _)| name.to_string())
        .collect();
    let mut found = Vec::new();
    for contract in Contract::ALL {
        let version = contract.version();
        for (iface, kind) in [
            ("metric", PluginKind::Metric),
            ("formatter", PluginKind::Formatter),
            ("reporter", PluginKind::Reporter),
        ] {
            if exports
                .iter()
                .any(|e| e == &format!("adapterlab:plugin/{iface}@{version}"))
            {
                found.push((kind, contract));
            }
        }
    }
    match found.as_slice() {
        [one] => Ok(*one),
        [] => Err(format!(
            "it exports none of adapterlab:plugin/{{metric,formatter,reporter}}@{{{}}} (it exports: {})",
            Contract::ALL.map(Contract::version).join(","),
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
    MetricV1(v1::metric::MetricPluginPre<HostState>),
    Formatter(latest::formatter::FormatterPluginPre<HostState>),
    FormatterV1(v1::formatter::FormatterPluginPre<HostState>),
    Reporter(latest::reporter::ReporterPluginPre<HostState>),
    ReporterV1(v1::reporter::ReporterPluginPre<HostState>),
}

struct Loaded {
    runtime: Arc<RuntimeInner>,
    pre: Pre,
}

enum Instance {
    Metric(latest::metric::MetricPlugin),
    MetricV1(v1::metric::MetricPlugin),
    Formatter(latest::formatter::FormatterPlugin),
    FormatterV1(v1::formatter::FormatterPlugin),
    Reporter(latest::reporter::ReporterPlugin),
    ReporterV1(v1::reporter::ReporterPlugin),
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
        let s = &mut store;
        let instance = match &self.pre {
            Pre::Metric(pre) => Instance::Metric(pre.instantiate(s).map_err(host_err)?),
            Pre::MetricV1(pre) => Instance::MetricV1(pre.instantiate(s).map_err(host_err)?),
            Pre::Formatter(pre) => Instance::Formatter(pre.instantiate(s).map_err(host_err)?),
            Pre::FormatterV1(pre) => Instance::FormatterV1(pre.instantiate(s).map_err(host_err)?),
            Pre::Reporter(pre) => Instance::Reporter(pre.instantiate(s).map_err(host_err)?),
            Pre::ReporterV1(pre) => Instance::ReporterV1(pre.instantiate(s).map_err(host_err)?),
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

    /// The plugin's `info` export, whatever its kind, in the latest contract's types.
    pub(crate) fn info(&mut self) -> Result<manifest::AnyInfo, PluginError> {
        use manifest::AnyInfo;
        self.call(|store, instance| {
            Ok(match instance {
                Instance::Metric(m) => {
                    AnyInfo::Metric(m.adapterlab_plugin_metric().call_info(store)?)
                }
                Instance::MetricV1(m) => {
                    let info = m.adapterlab_plugin_metric().call_info(store)?;
                    AnyInfo::Metric(MetricInfo {
                        manifest: convert(&info.manifest),
                        scores: info.scores.into_iter().map(compat::score_spec).collect(),
                        // A 0.1.0 metric may use its batch as a corpus: never split it.
                        independent_samples: false,
                    })
                }
                Instance::Formatter(m) => {
                    AnyInfo::Formatter(m.adapterlab_plugin_formatter().call_info(store)?)
                }
                Instance::FormatterV1(m) => {
                    AnyInfo::Formatter(convert(&m.adapterlab_plugin_formatter().call_info(store)?))
                }
                Instance::Reporter(m) => {
                    AnyInfo::Reporter(m.adapterlab_plugin_reporter().call_info(store)?)
                }
                Instance::ReporterV1(m) => {
                    AnyInfo::Reporter(convert(&m.adapterlab_plugin_reporter().call_info(store)?))
                }
            })
        })
    }

    fn check_kind(&self, expected: &'static str) -> Result<(), PluginError> {
        match &self.instance {
            Some(i) if instance_kind(i) != expected => Err(self.wrong_kind(expected, i)),
            _ => Ok(()),
        }
    }

    /// Score a batch with a metric plugin. The result is checked: one entry per sample, only
    /// declared score names, finite values within their declared ranges. A sample whose
    /// scores break that contract gets an error instead; the others keep their scores.
    ///
    /// A 0.1.0 metric sees one reference per sample: a sample with several is scored once per
    /// reference and keeps, per score, the best value (see [`compat`]). Its batch-level
    /// `corpus` comes back in [`Scored::batch_corpus`], dropped when a sample had several
    /// references (it would describe the pairs, not the samples).
    pub fn score(&mut self, samples: &[Sample], meta: &PluginMeta) -> Result<Scored, PluginError> {
        self.check_kind("metric")?;
        let plugin = self.plugin();
        let failed = |message: String| PluginError::Failed {
            plugin: plugin.clone(),
            message: limits::error_text(&message),
        };
        // From the component, not the instance: after a trap there is none until `call`.
        let v1 = matches!(self.loaded.pre, Pre::MetricV1(_));
        let scored = if !v1 {
            let result = self.call(|store, instance| match instance {
                Instance::Metric(m) => m.adapterlab_plugin_metric().call_score(store, samples),
                _ => unreachable!("checked above"),
            })?;
            let batch = result.map_err(failed)?;
            Scored {
                samples: batch.samples,
                statistics: batch.statistics,
                batch_corpus: Vec::new(),
            }
        } else {
            // One 0.1.0 sample per (sample, reference) pair; `owner` maps each back.
            let mut pairs = Vec::with_capacity(samples.len());
            let mut owner = Vec::with_capacity(samples.len());
            for (i, s) in samples.iter().enumerate() {
                for reference in &s.references {
                    pairs.push(v1::metric::exports::adapterlab::plugin::metric::Sample {
                        id: s.id.clone(),
                        prediction: s.prediction.clone(),
                        reference: reference.clone(),
                        source: s.source.clone(),
                    });
                    owner.push(i);
                }
            }
            let result = self.call(|store, instance| match instance {
                Instance::MetricV1(m) => m.adapterlab_plugin_metric().call_score(store, &pairs),
                _ => unreachable!("checked above"),
            })?;
            let batch = result.map_err(failed)?;
            if batch.samples.len() != pairs.len() {
                return Err(PluginError::Malformed {
                    plugin,
                    message: format!(
                        "score returned {} results for {} samples",
                        batch.samples.len(),
                        pairs.len()
                    ),
                });
            }
            let results: Vec<SampleResult> = batch
                .samples
                .into_iter()
                .map(compat::sample_result)
                .collect();
            let multi = pairs.len() != samples.len();
            if multi && !batch.corpus.is_empty() {
                self.store.data().note(
                    "corpus statistics dropped: this 0.1.0 metric saw multi-reference samples one reference at a time, so its corpus values describe the pairs, not the samples".to_string(),
                );
            }
            Scored {
                samples: best_over_references(meta, samples.len(), &owner, results),
                statistics: Vec::new(),
                batch_corpus: if multi { Vec::new() } else { batch.corpus },
            }
        };
        let state = self.store.data();
        check_batch(&plugin, meta, samples.len(), scored, |m| {
            state.note(m.to_string())
        })
    }

    /// The corpus scores of a metric from its statistics summed over a run (contract 0.2.0;
    /// a 0.1.0 metric has none). Checked like a batch's corpus: only declared score names,
    /// each once, finite; what breaks that is dropped with a note.
    pub fn finalize(
        &mut self,
        statistics: &[(String, Statistic)],
        meta: &PluginMeta,
    ) -> Result<Vec<(String, f64)>, PluginError> {
        self.check_kind("metric")?;
        if matches!(self.loaded.pre, Pre::MetricV1(_)) {
            return Ok(Vec::new());
        }
        let result = self.call(|store, instance| match instance {
            Instance::Metric(m) => m
                .adapterlab_plugin_metric()
                .call_finalize(store, statistics),
            _ => unreachable!("checked above"),
        })?;
        let mut corpus = result.map_err(|message| PluginError::Failed {
            plugin: self.plugin(),
            message: limits::error_text(&message),
        })?;
        let state = self.store.data();
        for problem in check_corpus(meta, &mut corpus) {
            state.note(format!("malformed output, dropped: {problem}"));
        }
        Ok(corpus)
    }

    pub fn format(
        &mut self,
        rows: &[Vec<(String, String)>],
    ) -> Result<Vec<Result<Formatted, String>>, PluginError> {
        self.check_kind("formatter")?;
        let out = self.call(|store, instance| match instance {
            Instance::Formatter(m) => m.adapterlab_plugin_formatter().call_format(store, rows),
            Instance::FormatterV1(m) => m
                .adapterlab_plugin_formatter()
                .call_format(store, rows)
                .map(|out| {
                    out.iter()
                        .map(|r| {
                            r.as_ref()
                                .map(convert::<_, Formatted>)
                                .map_err(String::clone)
                        })
                        .collect()
                }),
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
        self.check_kind("reporter")?;
        let out = self.call(|store, instance| match instance {
            Instance::Reporter(m) => m.adapterlab_plugin_reporter().call_render(store, report),
            Instance::ReporterV1(m) => m
                .adapterlab_plugin_reporter()
                .call_render(store, &report_v1(report))
                .map(|r| r.map(|d| convert(&d))),
            _ => unreachable!("checked above"),
        })?;
        out.map_err(|message| PluginError::Failed {
            plugin: self.plugin(),
            message,
        })
    }
}

/// What a metric call returned, in the latest contract's terms.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    /// Aligned with the samples.
    pub samples: Vec<SampleResult>,
    /// The batch's sufficient statistics (contract 0.2.0).
    pub statistics: Vec<(String, Statistic)>,
    /// A 0.1.0 metric's corpus values for this batch alone.
    pub batch_corpus: Vec<(String, f64)>,
}

/// Fold a 0.1.0 metric's per-pair results back into one result per sample: per score, the
/// best value over the sample's references (by the score's declared direction); a sample
/// with a failed pair fails with that pair's error, naming the reference.
fn best_over_references(
    meta: &PluginMeta,
    n: usize,
    owner: &[usize],
    results: Vec<SampleResult>,
) -> Vec<SampleResult> {
    let mut out: Vec<Option<SampleResult>> = vec![None; n];
    let mut position = vec![0usize; n];
    for (&i, result) in owner.iter().zip(results) {
        let k = position[i];
        position[i] += 1;
        out[i] = Some(match (out[i].take(), result) {
            (None, r) => r,
            (Some(SampleResult::Error(e)), _) => SampleResult::Error(e),
            (Some(_), SampleResult::Error(e)) => {
                SampleResult::Error(format!("reference {}: {e}", k + 1))
            }
            (Some(SampleResult::Scores(mut best)), SampleResult::Scores(scores)) => {
                if best.len() != scores.len()
                    || best.iter().zip(&scores).any(|((a, _), (b, _))| a != b)
                {
                    SampleResult::Error(format!(
                        "malformed output: reference {} got other score names than reference 1",
                        k + 1
                    ))
                } else {
                    for ((name, value), (_, other)) in best.iter_mut().zip(scores) {
                        let spec = meta.scores.iter().find(|s| &s.name == name);
                        *value = compat::best(spec, *value, other);
                    }
                    SampleResult::Scores(best)
                }
            }
        });
    }
    out.into_iter()
        .map(|r| r.unwrap_or_else(|| SampleResult::Error("the sample has no reference".into())))
        .collect()
}

/// A report for a 0.1.0 reporter, whose samples have one `reference`: several references
/// are shown joined by blank lines.
fn report_v1(report: &Report) -> v1::reporter::exports::adapterlab::plugin::reporter::Report {
    let mut value = serde_json::to_value(report).expect("reports serialize");
    if let Some(samples) = value.get_mut("samples").and_then(|s| s.as_array_mut()) {
        for sample in samples {
            let Some(map) = sample.as_object_mut() else {
                continue;
            };
            let joined = match map.remove("references") {
                Some(serde_json::Value::Array(refs)) => refs
                    .iter()
                    .filter_map(|r| r.as_str())
                    .collect::<Vec<_>>()
                    .join("\n\n"),
                _ => String::new(),
            };
            map.insert("reference".into(), joined.into());
        }
    }
    serde_json::from_value(value).expect("a 0.2.0 report less its references is a 0.1.0 report")
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
        Instance::Metric(_) | Instance::MetricV1(_) => "metric",
        Instance::Formatter(_) | Instance::FormatterV1(_) => "formatter",
        Instance::Reporter(_) | Instance::ReporterV1(_) => "reporter",
    }
}

/// Enforce the metric contract on a batch result.
fn check_batch(
    plugin: &str,
    meta: &PluginMeta,
    expected: usize,
    mut batch: Scored,
    warn: impl Fn(&str),
) -> Result<Scored, PluginError> {
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
    for problem in check_corpus(meta, &mut batch.batch_corpus) {
        warn(&format!("malformed output, dropped: {problem}"));
    }
    check_statistics(plugin, &batch.statistics)?;
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

/// Statistics are summed by name across batches: each name once per batch, sums finite.
/// A batch that breaks this is malformed as a whole (its samples' scores may be fine, but the
/// corpus it feeds would be wrong).
fn check_statistics(plugin: &str, statistics: &[(String, Statistic)]) -> Result<(), PluginError> {
    let mut seen = std::collections::BTreeSet::new();
    for (name, value) in statistics {
        let problem = if name.is_empty() || name.len() > limits::MAX_NAME_BYTES {
            format!(
                "statistic name {:?} is empty or too long",
                limits::name_text(name)
            )
        } else if !seen.insert(name) {
            format!("statistic {name:?} appears twice")
        } else if matches!(value, Statistic::Sum(v) if !v.is_finite()) {
            format!("statistic {name:?} is not finite")
        } else {
            continue;
        };
        return Err(PluginError::Malformed {
            plugin: plugin.to_string(),
            message: problem,
        });
    }
    Ok(())
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
