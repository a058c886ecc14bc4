//! Inference for the host: the device models run on, predictions for dataset rows (generate
//! runs, `eval_after_train`, `adapterlab generate --data`), generate runs in the store, and
//! the models the server keeps loaded (a base once, adapters switched per request).
//!
//! The model work itself is in the model crate (`adapterlab_model::engine`); this module
//! joins it to plugins (the formatter), the store and the eval pipeline.

use std::path::PathBuf;

use adapterlab_model::engine::Engine;
use anyhow::{Result, bail};

pub mod models;
pub mod predict;
pub mod run;

pub use models::Models;

/// The device models run on: CUDA when built with it and a GPU is there (bf16), else the CPU
/// (f32). `ADAPTERLAB_DTYPE` (f32, bf16, f16) overrides the dtype.
pub fn model_runtime(assets_dir: PathBuf) -> Result<Engine> {
    let mut rt = Engine::cpu(assets_dir);
    #[cfg(feature = "cuda")]
    {
        if let Ok(device) = adapterlab_model::engine::device::cuda(0) {
            rt.device = device;
            rt.dtype = candle_core::DType::BF16;
        }
    }
    if let Ok(dtype) = std::env::var("ADAPTERLAB_DTYPE") {
        rt.dtype = match dtype.as_str() {
            "f32" => candle_core::DType::F32,
            "bf16" => candle_core::DType::BF16,
            "f16" => candle_core::DType::F16,
            other => bail!("ADAPTERLAB_DTYPE={other}: expected f32, bf16 or f16"),
        };
    }
    Ok(rt)
}
