//! QLoRA supervised fine-tuning: `config` (HF key names), `optim` (AdamW, clipping,
//! schedules), `trainer` (the loop, checkpoints, logs), `dist` (data parallelism), `record`
//! (a run in the store). Datasets to batches is [`crate::data`]'s, shared with generation.
//!
//! **API Boundary:** [`run`] is what the CLI and the server call.

pub mod config;
pub mod dist;
pub mod memory;
pub mod optim;
pub mod prepare;
pub mod record;
pub mod trainer;

pub use config::TrainConfig;
pub use trainer::{TrainEnv, TrainOutcome, run};
