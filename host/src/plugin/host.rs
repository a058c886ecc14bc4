//! What plugins can reach: the state of one plugin instance and the host capabilities
//! (log, config, embed, chat), each refused unless the plugin's manifest asks for it.
//!
//! **Architecture Invariant:** plugins reach the outside world only through these functions.
//! WASI is linked with no preopened directories, no environment, no arguments and no network.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::ResourceTable;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

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

    fn chat(&self, request: &ChatRequest) -> Result<ChatResponse, String> {
        let _ = request;
        Err("no LLM client is available in this host".to_string())
    }

    /// Independent requests; implementations should send them concurrently.
    fn chat_many(&self, requests: &[ChatRequest]) -> Vec<Result<ChatResponse, String>> {
        requests.iter().map(|r| self.chat(r)).collect()
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
}

impl Default for CallContext {
    fn default() -> Self {
        CallContext {
            config: BTreeMap::new(),
            services: Arc::new(NoServices),
            log: Arc::new(|line: &LogLine| {
                tracing::info!(plugin = %line.plugin, "{}", line.message);
            }),
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
}

/// Most lines one call may log; more would let a plugin flood the store.
const LOG_LINES_PER_CALL: usize = 1000;
/// Most bytes of stdout and stderr an instance may write in its life; past that its writes
/// fail, which bounds what a chatty plugin costs.
const STDIO_CAPTURE_BYTES: usize = 1024 * 1024;

/// The data of one plugin's wasmtime `Store`.
pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    stdout: MemoryOutputPipe,
    stderr: MemoryOutputPipe,
    /// How much of stdout/stderr has already been forwarded to the log.
    stdio_seen: [usize; 2],
    pub(crate) plugin: String,
    /// Empty until the manifest is known: while `info` runs, only logging works.
    pub(crate) granted: Vec<Capability>,
    ctx: CallContext,
    log_lines: usize,
    log_refused: bool,
    /// Memory cap in bytes, and whether the plugin hit it.
    memory_limit: usize,
    pub(crate) memory_exceeded: bool,
    /// Time spent in host capabilities during the current call; the deadline counts only the
    /// rest (the guest's own time), so a slow LLM server does not kill the judge.
    host_time: Duration,
    call_started: Instant,
    pub(crate) deadline: Duration,
}

impl HostState {
    pub(crate) fn new(
        plugin: &str,
        ctx: CallContext,
        memory_limit: usize,
        deadline: Duration,
    ) -> Self {
        let stdout = MemoryOutputPipe::new(STDIO_CAPTURE_BYTES);
        let stderr = MemoryOutputPipe::new(STDIO_CAPTURE_BYTES);
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
            stdio_seen: [0, 0],
            plugin: plugin.to_string(),
            granted: Vec::new(),
            ctx,
            log_lines: 0,
            log_refused: false,
            memory_limit,
            memory_exceeded: false,
            host_time: Duration::ZERO,
            call_started: Instant::now(),
            deadline,
        }
    }

    pub(crate) fn ctx_clone(&self) -> CallContext {
        self.ctx.clone()
    }

    /// Reset the per-call clocks and budgets before each call into the guest.
    pub(crate) fn begin_call(&mut self) {
        self.host_time = Duration::ZERO;
        self.call_started = Instant::now();
        self.log_lines = 0;
    }

    /// Guest time used by the current call: wall time minus time spent in the host.
    pub(crate) fn guest_time(&self) -> Duration {
        self.call_started.elapsed().saturating_sub(self.host_time)
    }

    /// Forward what the guest wrote to stdout/stderr since the last flush as log lines.
    pub(crate) fn flush_stdio(&mut self) {
        for (i, level) in [(0, "info"), (1, "warn")] {
            let pipe = if i == 0 { &self.stdout } else { &self.stderr };
            let contents = pipe.contents();
            let fresh = contents
                .get(self.stdio_seen[i]..)
                .unwrap_or_default()
                .to_vec();
            self.stdio_seen[i] = contents.len();
            for line in String::from_utf8_lossy(&fresh)
                .lines()
                .filter(|l| !l.trim().is_empty())
            {
                self.emit(level, line.to_string());
            }
        }
    }

    fn emit(&mut self, level: &str, message: String) {
        if self.log_lines >= LOG_LINES_PER_CALL {
            return;
        }
        self.log_lines += 1;
        if self.log_lines == LOG_LINES_PER_CALL {
            let line = LogLine {
                plugin: self.plugin.clone(),
                level: "warn".into(),
                message: format!(
                    "log budget of {LOG_LINES_PER_CALL} lines per call reached; further lines dropped"
                ),
            };
            (self.ctx.log)(&line);
            return;
        }
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

    /// Run a host service, excluding its duration from the guest's deadline.
    fn timed<R>(&mut self, f: impl FnOnce(&CallContext) -> R) -> R {
        let start = Instant::now();
        let out = f(&self.ctx);
        self.host_time += start.elapsed();
        out
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
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_limit {
            self.memory_exceeded = true;
            // An error (rather than Ok(false)) traps, so every guest language fails the same
            // way instead of each handling a failed grow in its own fashion.
            wasmtime::bail!("memory limit of {} MiB reached", self.memory_limit >> 20);
        }
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
        self.timed(|ctx| ctx.services.encoder_info(model.as_deref(), layer))
    }

    fn embed(
        &mut self,
        model: Option<String>,
        layer: Option<u32>,
        texts: Vec<String>,
    ) -> Result<Vec<TokenEmbeddings>, String> {
        self.require(Capability::Embed)?;
        self.timed(|ctx| ctx.services.embed(model.as_deref(), layer, &texts))
    }
}

impl caps::chat::Host for HostState {
    fn complete(&mut self, request: ChatRequest) -> Result<ChatResponse, String> {
        self.require(Capability::Chat)?;
        self.timed(|ctx| ctx.services.chat(&request))
    }

    fn complete_many(&mut self, requests: Vec<ChatRequest>) -> Vec<Result<ChatResponse, String>> {
        if let Err(e) = self.require(Capability::Chat) {
            return requests.iter().map(|_| Err(e.clone())).collect();
        }
        self.timed(|ctx| ctx.services.chat_many(&requests))
    }
}
