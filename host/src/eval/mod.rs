//! Evaluation: predictions in, per-sample scores and aggregates with intervals out, and the
//! comparison of runs.

pub mod compare;
pub mod encoder;
pub mod input;
pub mod pipeline;
pub mod report;
pub mod services;
pub mod stats;
