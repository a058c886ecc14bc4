//! QLoRA supervised fine-tuning: `config` (HF key names), `optim` (AdamW, clipping,
//! schedules), `setup` (the model and the rows a run trains on), `trainer` (the loop and its
//! logs), `evaluate` (evaluation during and after training), `checkpoint` (`checkpoint-N`
//! folders, `trainer_state.json`), `env` (what a run needs from its caller and how it reports
//! back), `dist` (data parallelism), `record` (a run in the store). Datasets to batches is [`crate::data`]'s, shared with generation.
//!
//! **API Boundary:** [`run`] is what the CLI and the server call.

pub mod checkpoint;
pub mod config;
pub mod dist;
pub mod env;
pub mod evaluate;
pub mod memory;
pub mod optim;
pub mod prepare;
pub mod record;
pub mod setup;
pub mod trainer;

pub use config::TrainConfig;
pub use trainer::{TrainEnv, TrainOutcome, run};
