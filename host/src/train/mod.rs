//! QLoRA supervised fine-tuning: `config` (HF key names), `data` (datasets to batches),
//! `optim` (AdamW, clipping, schedules), `trainer` (the loop, checkpoints, logs).
//!
//! **API Boundary:** [`run`] is what the CLI and the server call.

pub mod config;
pub mod data;
pub mod dist;
pub mod memory;
pub mod optim;
pub mod record;
pub mod trainer;

pub use config::TrainConfig;
pub use trainer::{TrainEnv, TrainOutcome, run};
