//! The records the store keeps. Plain serde types: changing one means a schema migration.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunKind {
    Eval,
    Train,
    Generate,
}

impl RunKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RunKind::Eval => "eval",
            RunKind::Train => "train",
            RunKind::Generate => "generate",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    Queued,
    Running,
    Done,
    Failed,
    Interrupted,
    Cancelled,
    /// The stored record cannot be read; listed with the reason instead of failing the list.
    /// Never written: `adapterlab store check --repair` quarantines such records.
    Corrupt,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Queued => "queued",
            RunStatus::Running => "running",
            RunStatus::Done => "done",
            RunStatus::Failed => "failed",
            RunStatus::Interrupted => "interrupted",
            RunStatus::Cancelled => "cancelled",
            RunStatus::Corrupt => "corrupt",
        }
    }

    /// The run lifecycle, in one table: whether a run may move from this status to `to`.
    /// [`crate::store::Store::transition`] refuses every other move, so no code path can,
    /// say, bring a finished run back to `running` or turn a failure into success.
    ///
    /// - queued → running (a worker starts it), cancelled, failed (it could not start),
    ///   interrupted (put back after a resume that could not be dispatched);
    /// - running → done, failed, cancelled, interrupted (its process stopped);
    /// - cancelled → interrupted (the cancel was the server stopping: resumable), failed (the
    ///   disk filled under it);
    /// - interrupted, failed, cancelled → queued (resumed); interrupted → failed (the disk);
    /// - done and corrupt are final.
    pub fn may_become(self, to: RunStatus) -> bool {
        use RunStatus::*;
        matches!(
            (self, to),
            (Queued, Running | Cancelled | Failed | Interrupted)
                | (Running, Done | Failed | Cancelled | Interrupted)
                | (Cancelled, Interrupted | Failed)
                | (Interrupted, Failed)
                | (Interrupted | Failed | Cancelled, Queued)
        )
    }

    /// Every status a run may move to `to` from.
    pub fn sources_of(to: RunStatus) -> Vec<RunStatus> {
        use RunStatus::*;
        [
            Queued,
            Running,
            Done,
            Failed,
            Interrupted,
            Cancelled,
            Corrupt,
        ]
        .into_iter()
        .filter(|s| s.may_become(to))
        .collect()
    }

    pub fn is_finished(self) -> bool {
        matches!(
            self,
            RunStatus::Done
                | RunStatus::Failed
                | RunStatus::Cancelled
                | RunStatus::Interrupted
                | RunStatus::Corrupt
        )
    }
}

/// A mean with its 95% bootstrap interval. The pipeline stores only finite ones; a `null`
/// that an older version wrote for an overflowed mean reads back as NaN instead of making
/// the whole record unreadable.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    #[serde(deserialize_with = "number_or_nan")]
    pub mean: f64,
    #[serde(deserialize_with = "number_or_nan")]
    pub low: f64,
    #[serde(deserialize_with = "number_or_nan")]
    pub high: f64,
}

fn number_or_nan<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// Where a plugin that produced a run's results came from, so two runs that both say
/// `rouge 0.1.0` can still be told apart when one used a user's replacement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PluginProvenance {
    pub version: String,
    /// `built-in` or `user`.
    pub source: String,
    pub sha256: String,
}

/// A score a run produced, as its metric declared it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreInfo {
    pub name: String,
    pub metric: String,
    pub min: f64,
    pub max: f64,
    pub higher_is_better: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub done: u64,
    pub total: u64,
    /// What the numbers count: samples, steps, tokens.
    #[serde(default)]
    pub unit: String,
}

/// Requests made through the LLM client on behalf of a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub requests: u64,
    pub cached: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Estimated from the model's list price, when known.
    pub cost_usd: f64,
}

/// A run (evaluation, training, ...). The request that created it is kept apart, in
/// [`Store::request`](crate::store::Store::request).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// Time-ordered (UUIDv7, 32 hex digits), so listing the tree lists runs by age.
    pub id: String,
    pub name: String,
    pub kind: RunKind,
    pub status: RunStatus,
    pub created: String,
    #[serde(default)]
    pub started: Option<String>,
    #[serde(default)]
    pub finished: Option<String>,
    /// Model, adapter, dataset, metrics, settings: what a person needs to tell runs apart.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    #[serde(default)]
    pub scores: Vec<ScoreInfo>,
    #[serde(default)]
    pub aggregates: BTreeMap<String, Estimate>,
    /// Aggregates of the references scored as predictions (`--score-references`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub reference_aggregates: BTreeMap<String, Estimate>,
    /// Corpus-level statistics metrics returned (e.g. corpus BLEU).
    #[serde(default)]
    pub corpus: BTreeMap<String, f64>,
    /// Errors that concern a metric as a whole (a failed batch, stored once rather than in
    /// every sample; a mean that cannot be represented), by metric or score name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metric_errors: BTreeMap<String, String>,
    /// The plugins that produced the scores: plugin name → version, source, sha256.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub plugins: BTreeMap<String, PluginProvenance>,
    #[serde(default)]
    pub progress: Progress,
    #[serde(default)]
    pub usage: Usage,
    #[serde(default)]
    pub error: Option<String>,
    /// The process running it, so a restart can tell a dead job from a live one.
    #[serde(default)]
    pub owner_pid: Option<u32>,
    /// Labels a person gave the run (the dashboard filters by them); at most
    /// [`MAX_TAGS`] of at most [`MAX_TAG_LEN`] characters each.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Free text a person wrote about the run; at most [`MAX_NOTES_LEN`] characters.
    #[serde(default)]
    pub notes: String,
}

/// Bounds on [`RunRecord::tags`] and [`RunRecord::notes`]: every status change rewrites the
/// record and every listing reads it, so what people attach stays small.
pub const MAX_TAGS: usize = 32;
pub const MAX_TAG_LEN: usize = 64;
pub const MAX_NOTES_LEN: usize = 10_000;

impl RunRecord {
    /// Metadata key of the speed switches (`VAR=value`, space-separated) set in the process
    /// that ran the run; absent when none was.
    pub const SPEED_SWITCHES: &'static str = "speed_switches";

    /// Metadata key of the device and dtype a train or generate run computed in
    /// (`engine::Engine::compute`, e.g. `cpu f32`).
    pub const COMPUTE: &'static str = "compute";

    /// Records `switches` (`VAR=value`) as the ones the run runs with: they change nothing but
    /// rounding, yet a timing or a loss curve is only reproduced with them. A run resumed in a
    /// process without any loses the entry of the process before.
    pub fn note_speed_switches(&mut self, switches: &[String]) {
        if switches.is_empty() {
            self.metadata.remove(Self::SPEED_SWITCHES);
        } else {
            self.metadata
                .insert(Self::SPEED_SWITCHES.into(), switches.join(" "));
        }
    }

    pub fn new(id: String, name: String, kind: RunKind) -> Self {
        RunRecord {
            id,
            name,
            kind,
            status: RunStatus::Queued,
            created: now_rfc3339(),
            started: None,
            finished: None,
            metadata: BTreeMap::new(),
            scores: Vec::new(),
            aggregates: BTreeMap::new(),
            reference_aggregates: BTreeMap::new(),
            corpus: BTreeMap::new(),
            metric_errors: BTreeMap::new(),
            plugins: BTreeMap::new(),
            progress: Progress::default(),
            usage: Usage::default(),
            error: None,
            owner_pid: None,
            tags: Vec::new(),
            notes: String::new(),
        }
    }
}

/// One evaluated sample with every score and error it got.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SampleRecord {
    /// Position in the input, which orders samples.
    pub index: u32,
    pub id: String,
    pub prediction: String,
    /// The reference, or the first of several.
    pub reference: String,
    /// Every reference when there are several (`reference` is the first); empty when there
    /// is one. [`crate::eval::input::all_references`] reads the pair.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub references: Vec<String>,
    #[serde(default)]
    pub source: Option<String>,
    /// `reference` scored as a prediction (`--score-references`), when asked.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub reference_scores: BTreeMap<String, f64>,
    pub scores: BTreeMap<String, f64>,
    /// Plugin name → why it could not score this sample.
    pub errors: BTreeMap<String, String>,
}

/// Something that happened during a run, streamed to the dashboard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RunEvent {
    Status {
        status: RunStatus,
    },
    Progress {
        done: u64,
        total: u64,
        unit: String,
    },
    Log {
        level: String,
        message: String,
    },
    /// Every training step, with that step's own loss: the dashboard's charts and ETA follow
    /// each step, while trainer_state.json and the trackers keep HF's cadence (`Loss`, whose
    /// loss is the mean over the logging window, follows a logged step's `Step`).
    Step {
        step: u64,
        epoch: f64,
        loss: f64,
        learning_rate: f64,
        grad_norm: f64,
        #[serde(default)]
        eta_seconds: Option<f64>,
        /// Tokens per second since the last logged step.
        #[serde(default)]
        tokens_per_second: Option<f64>,
        /// The process's resident memory after the step.
        #[serde(default)]
        memory_bytes: Option<u64>,
        /// On CUDA, the device memory candle's tensors held after the step.
        #[serde(default)]
        gpu_memory_bytes: Option<u64>,
    },
    /// A logged training step, in HF Trainer's log_history shape.
    Loss {
        step: u64,
        epoch: f64,
        #[serde(default)]
        loss: Option<f64>,
        #[serde(default)]
        eval_loss: Option<f64>,
        #[serde(default)]
        learning_rate: Option<f64>,
        #[serde(default)]
        grad_norm: Option<f64>,
        #[serde(default)]
        tokens_per_second: Option<f64>,
        #[serde(default)]
        eta_seconds: Option<f64>,
        /// The process's resident memory after the step (none on evaluation events).
        #[serde(default)]
        memory_bytes: Option<u64>,
        /// On CUDA, the device memory candle's tensors held after the step.
        #[serde(default)]
        gpu_memory_bytes: Option<u64>,
        /// An evaluation's other values, as HF logs them: `eval_<score>` of the generation
        /// metrics, `eval_runtime`, `eval_samples_per_second`.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        eval_metrics: BTreeMap<String, f64>,
    },
}

/// A trained adapter known to the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterRecord {
    pub name: String,
    pub path: String,
    pub base_model: String,
    pub created: String,
    #[serde(default)]
    pub run_id: Option<String>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

/// A plugin installed into the data directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PluginRecord {
    pub name: String,
    pub version: String,
    pub kind: String,
    pub sha256: String,
    /// Where it was installed from.
    pub origin: String,
    /// Where it lives now.
    pub file: String,
    pub installed: String,
}

pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// A new run id: UUIDv7 as 32 lowercase hex digits.
pub fn new_run_id() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}
