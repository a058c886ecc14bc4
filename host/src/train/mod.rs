//! QLoRA supervised fine-tuning.

pub mod config;
