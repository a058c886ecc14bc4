//! What plugins can reach: the state of one plugin instance and the host capabilities
//! (log, config, embed, chat), each refused unless the plugin's manifest asks for it.
//!
//! **Architecture Invariant:** plugins reach the outside world only through these functions.
//! WASI is linked with no preopened directories, no environment, no arguments and no network.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::plugin::limits::{self, MemoryBudget};
use crate::plugin::stdio::CapturedPipe;

use crate::plugin::wit::latest::imports::adapterlab::plugin as caps;
use crate::plugin::wit::types::{
    Capability, ChatRequest, ChatResponse, EncoderInfo, Level, TokenEmbeddings,
};

/// Services behind the `embed` and `chat` capabilities. The evaluation pipeline provides the
/// real encoder and LLM client; tests provide fakes.
pub trait HostServices: Send + Sync {
    fn encoder_info(&self, model: Option<&str>, layer: Option<u32>) -> Result<EncoderInfo, String> {
        let _ = (model, layer);
        Err("no encoder is available in this host".to_string())
    }

    fn embed(
        &self,
        model: Option<&str>,
        layer: Option<u32>,
        texts: &[String],
    ) -> Result<Vec<TokenEmbeddings>, String> {
        let _ = (model, layer, texts);
        Err("no encoder is available in this host".to_string())
    }

    /// One chat completion. It must give up with an error once `stop` says so (the calling
    /// plugin's deadline passed, or its run was cancelled).
    fn chat(&self, request: &ChatRequest, stop: &Interrupt) -> Result<ChatResponse, String> {
        let _ = (request, stop);
        Err("no LLM client is available in this host".to_string())
    }

    /// Independent requests; implementations should send them concurrently.
    fn chat_many(
        &self,
        requests: &[ChatRequest],
        stop: &Interrupt,
    ) -> Vec<Result<ChatResponse, String>> {
        requests.iter().map(|r| self.chat(r, stop)).collect()
    }
}

/// When a host capability call must give up: at the calling plugin's deadline, or as soon as
/// its run is cancelled.
#[derive(Debug, Clone)]
pub struct Interrupt {
    pub deadline: Instant,
    pub cancel: Arc<AtomicBool>,
}

impl Interrupt {
    /// Why the call must stop now, if it must.
    pub fn reason(&self) -> Option<&'static str> {
        if self.cancel.load(Ordering::Relaxed) {
            Some("the run was cancelled")
        } else if Instant::now() >= self.deadline {
            Some("the plugin's deadline passed")
        } else {
            None
        }
    }
}

/// A host with neither encoder nor LLM client.
pub struct NoServices;
impl HostServices for NoServices {}

/// A line a plugin logged (through `log` or its stdout/stderr).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LogLine {
    pub plugin: String,
    pub level: String,
    pub message: String,
}

pub type LogSink = Arc<dyn Fn(&LogLine) + Send + Sync>;

/// What the caller supplies for a plugin's calls: the user's settings for it and the services
/// behind its capabilities.
#[derive(Clone)]
pub struct CallContext {
    pub config: BTreeMap<String, String>,
    pub services: Arc<dyn HostServices>,
    pub log: LogSink,
    /// Set when the run is cancelled: the guest is interrupted at its next epoch tick and any
    /// capability call in flight gives up.
    pub cancel: Arc<AtomicBool>,
    /// Overrides the runtime's per-call deadline (a metric's `timeout_ms` setting).
    pub deadline: Option<Duration>,
}

impl Default for CallContext {
    fn default() -> Self {
        CallContext {
            config: BTreeMap::new(),
            services: Arc::new(NoServices),
            log: Arc::new(|line: &LogLine| {
                tracing::info!(plugin = %line.plugin, "{}", line.message);
            }),
            cancel: Arc::default(),
            deadline: None,
        }
    }
}

impl CallContext {
    pub fn with_config(mut self, config: BTreeMap<String, String>) -> Self {
        self.config = config;
        self
    }

    pub fn with_services(mut self, services: Arc<dyn HostServices>) -> Self {
        self.services = services;
        self
    }

    pub fn with_log(mut self, log: LogSink) -> Self {
        self.log = log;
        self
    }

    pub fn with_cancel(mut self, cancel: Arc<AtomicBool>) -> Self {
        self.cancel = cancel;
        self
    }

    pub fn with_deadline(mut self, deadline: Option<Duration>) -> Self {
        self.deadline = deadline;
        self
    }
}

/// The data of one plugin's wasmtime `Store`.
pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    stdout: CapturedPipe,
    stderr: CapturedPipe,
    /// What the guest wrote to stderr during the current call: a trap's message (a Rust
    /// panic's text, a Python traceback) is there.
    pub(crate) call_stderr: String,
    pub(crate) plugin: String,
    /// Empty until the manifest is known: while `info` runs, only logging works.
    pub(crate) granted: Vec<Capability>,
    ctx: CallContext,
    log_lines: usize,
    log_bytes: usize,
    log_budget_noted: bool,
    log_refused: bool,
    /// Memory cap in bytes, and whether the plugin hit it.
    memory_limit: usize,
    pub(crate) memory_exceeded: bool,
    /// The budget shared by every live instance, what this one holds of it, and whether the
    /// shared budget (rather than this instance's cap) stopped a grow.
    memory_budget: MemoryBudget,
    memory_reserved: usize,
    pub(crate) budget_exceeded: bool,
    /// Wall-clock time one call may take, host capabilities included.
    pub(crate) deadline: Duration,
    call_started: Instant,
}

impl Drop for HostState {
    fn drop(&mut self) {
        self.memory_budget.release(self.memory_reserved);
    }
}

impl HostState {
    pub(crate) fn new(
        plugin: &str,
        ctx: CallContext,
        memory_limit: usize,
        memory_budget: MemoryBudget,
        deadline: Duration,
    ) -> Self {
        let deadline = ctx.deadline.unwrap_or(deadline);
        // One budget for both streams' bytes would let stdout starve a panic message on
        // stderr; each gets the per-call budget and the log budget caps what is kept.
        let stdout = CapturedPipe::new(limits::STDIO_BYTES_PER_CALL);
        let stderr = CapturedPipe::new(limits::STDIO_BYTES_PER_CALL);
        let wasi = WasiCtxBuilder::new()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        HostState {
            wasi,
            table: ResourceTable::new(),
            stdout,
            stderr,
            call_stderr: String::new(),
            plugin: plugin.to_string(),
            granted: Vec::new(),
            ctx,
            log_lines: 0,
            log_bytes: 0,
            log_budget_noted: false,
            log_refused: false,
            memory_limit,
            memory_exceeded: false,
            memory_budget,
            memory_reserved: 0,
            budget_exceeded: false,
            deadline,
            call_started: Instant::now(),
        }
    }

    pub(crate) fn ctx_clone(&self) -> CallContext {
        self.ctx.clone()
    }

    /// Reset the per-call clock and budgets before each call into the guest.
    pub(crate) fn begin_call(&mut self) {
        self.call_started = Instant::now();
        self.log_lines = 0;
        self.log_bytes = 0;
        self.log_budget_noted = false;
        self.call_stderr.clear();
        self.memory_exceeded = false;
        self.budget_exceeded = false;
    }

    /// Whether the current call must stop: its wall-clock deadline passed (time in host
    /// capabilities counts) or its run was cancelled.
    pub(crate) fn must_stop(&self) -> bool {
        self.call_started.elapsed() > self.deadline || self.ctx.cancel.load(Ordering::Relaxed)
    }

    pub(crate) fn cancelled(&self) -> bool {
        self.ctx.cancel.load(Ordering::Relaxed)
    }

    fn interrupt(&self) -> Interrupt {
        Interrupt {
            deadline: self.call_started + self.deadline,
            cancel: self.ctx.cancel.clone(),
        }
    }

    /// Forward what the guest wrote to stdout/stderr during the call as log lines, and keep
    /// this call's stderr for a trap's message.
    pub(crate) fn flush_stdio(&mut self) {
        for (pipe, level) in [(self.stdout.clone(), "info"), (self.stderr.clone(), "warn")] {
            let (bytes, dropped) = pipe.drain();
            let text = String::from_utf8_lossy(&bytes).into_owned();
            if level == "warn" {
                self.call_stderr = limits::error_text(text.trim());
            }
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                self.emit(level, line.to_string());
            }
            if dropped > 0 {
                self.note(format!(
                    "{dropped} bytes of {} over the budget of {} bytes per call were dropped",
                    if level == "info" { "stdout" } else { "stderr" },
                    limits::STDIO_BYTES_PER_CALL
                ));
            }
        }
    }

    /// A line from the host about the plugin, outside its budget.
    pub(crate) fn note(&self, message: String) {
        (self.ctx.log)(&LogLine {
            plugin: self.plugin.clone(),
            level: "warn".into(),
            message,
        });
    }

    fn emit(&mut self, level: &str, message: String) {
        if self.log_budget_noted {
            return;
        }
        let message = limits::truncate(&message, limits::MAX_LOG_LINE_BYTES);
        if self.log_lines >= limits::LOG_LINES_PER_CALL
            || self.log_bytes + message.len() > limits::LOG_BYTES_PER_CALL
        {
            self.log_budget_noted = true;
            self.note(format!(
                "log budget of {} lines or {} bytes per call reached; further lines of this call dropped",
                limits::LOG_LINES_PER_CALL,
                limits::LOG_BYTES_PER_CALL
            ));
            return;
        }
        self.log_lines += 1;
        self.log_bytes += message.len();
        (self.ctx.log)(&LogLine {
            plugin: self.plugin.clone(),
            level: level.to_string(),
            message,
        });
    }

    fn require(&self, capability: Capability) -> Result<(), String> {
        if self.granted.contains(&capability) {
            Ok(())
        } else {
            Err(format!(
                "capability `{}` is not granted to plugin {}: declare it in the plugin's manifest",
                capability_name(capability),
                self.plugin
            ))
        }
    }
}

pub fn capability_name(c: Capability) -> &'static str {
    match c {
        Capability::Log => "log",
        Capability::Config => "config",
        Capability::Embed => "embed",
        Capability::Chat => "chat",
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl wasmtime::ResourceLimiter for HostState {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // An error (rather than Ok(false)) traps, so every guest language fails the same
        // way instead of each handling a failed grow in its own fashion.
        if desired > self.memory_limit {
            self.memory_exceeded = true;
            wasmtime::bail!("memory limit of {} MiB reached", self.memory_limit >> 20);
        }
        let more = desired.saturating_sub(current);
        if !self.memory_budget.reserve(more) {
            self.memory_exceeded = true;
            self.budget_exceeded = true;
            wasmtime::bail!(
                "the host's memory budget for all running plugins ({} MiB) is spent",
                self.memory_budget.limit() >> 20
            );
        }
        self.memory_reserved += more;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}

impl caps::types::Host for HostState {}

impl caps::log::Host for HostState {
    fn log(&mut self, level: Level, message: String) {
        // While `info` runs the manifest is not known yet; a plugin that never declared `log`
        // has its lines dropped (the call has no result to refuse with), noted once.
        if !self.granted.is_empty() && !self.granted.contains(&Capability::Log) {
            if !self.log_refused {
                self.log_refused = true;
                tracing::warn!(
                    "plugin {} logs without the `log` capability in its manifest; its lines are dropped",
                    self.plugin
                );
            }
            return;
        }
        let level = match level {
            Level::Trace => "trace",
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        };
        self.emit(level, message);
    }
}

impl caps::config::Host for HostState {
    fn get(&mut self, key: String) -> Option<String> {
        self.require(Capability::Config).ok()?;
        self.ctx.config.get(&key).cloned()
    }

    fn all(&mut self) -> Vec<(String, String)> {
        if self.require(Capability::Config).is_err() {
            return Vec::new();
        }
        self.ctx
            .config
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

impl caps::embed::Host for HostState {
    fn info(&mut self, model: Option<String>, layer: Option<u32>) -> Result<EncoderInfo, String> {
        self.require(Capability::Embed)?;
        self.ctx.services.encoder_info(model.as_deref(), layer)
    }

    fn embed(
        &mut self,
        model: Option<String>,
        layer: Option<u32>,
        texts: Vec<String>,
    ) -> Result<Vec<TokenEmbeddings>, String> {
        self.require(Capability::Embed)?;
        if let Some(reason) = self.interrupt().reason() {
            return Err(format!("embed refused: {reason}"));
        }
        self.ctx.services.embed(model.as_deref(), layer, &texts)
    }
}

impl caps::chat::Host for HostState {
    fn complete(&mut self, request: ChatRequest) -> Result<ChatResponse, String> {
        self.require(Capability::Chat)?;
        let stop = self.interrupt();
        if let Some(reason) = stop.reason() {
            return Err(format!("chat refused: {reason}"));
        }
        self.ctx.services.chat(&request, &stop)
    }

    fn complete_many(&mut self, requests: Vec<ChatRequest>) -> Vec<Result<ChatResponse, String>> {
        if let Err(e) = self.require(Capability::Chat) {
            return requests.iter().map(|_| Err(e.clone())).collect();
        }
        let stop = self.interrupt();
        if let Some(reason) = stop.reason() {
            let e = format!("chat refused: {reason}");
            return requests.iter().map(|_| Err(e.clone())).collect();
        }
        self.ctx.services.chat_many(&requests, &stop)
    }
}
