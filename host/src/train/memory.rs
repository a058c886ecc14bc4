//! A rough memory estimate for a training run, checked before it is queued: a config whose
//! tensors cannot fit is refused with a message instead of aborting the process (an
//! allocation failure in Rust aborts, taking every other job of the server with it).
//!
//! Also what a running training uses ([`in_use`]), for the live view and the run's record.
//!
//! The estimate is deliberately a lower bound (frozen 4-bit weights, the LoRA weights with
//! their gradients and AdamW moments, a few hidden-sized activations per layer and token, the
//! logits with their gradient), so that a run it refuses certainly could not have fit.

use std::path::Path;

use anyhow::{Result, bail};

use crate::train::TrainConfig;

/// The shape numbers of a model that the estimate needs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    pub hidden: u64,
    pub intermediate: u64,
    pub layers: u64,
    pub vocab: u64,
}

/// SmolLM2-135M, the default model, for models whose `config.json` is not at hand (a hub id
/// not fetched yet): the smallest model adapterlab ships with, so the bound stays a bound.
pub const DEFAULT_SHAPE: Shape = Shape {
    hidden: 576,
    intermediate: 1536,
    layers: 30,
    vocab: 49152,
};

/// The shape from a checkpoint folder's `config.json` (Llama and Falcon key names), else the
/// default model's.
pub fn shape_of(model: &str) -> Shape {
    let path = Path::new(model).join("config.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return DEFAULT_SHAPE;
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return DEFAULT_SHAPE;
    };
    let get = |keys: &[&str]| keys.iter().find_map(|k| v.get(*k).and_then(|x| x.as_u64()));
    let hidden = get(&["hidden_size", "n_embd", "d_model"]).unwrap_or(DEFAULT_SHAPE.hidden);
    Shape {
        hidden,
        intermediate: get(&["intermediate_size", "ffn_hidden_size"]).unwrap_or(4 * hidden),
        layers: get(&["num_hidden_layers", "n_layer", "num_layers"]).unwrap_or(1),
        vocab: get(&["vocab_size"]).unwrap_or(DEFAULT_SHAPE.vocab),
    }
}

/// Bytes a training run needs at least, computed in f64 so that absurd configs do not
/// overflow.
pub fn train_bytes(config: &TrainConfig, shape: Shape) -> f64 {
    let (h, i, l, v) = (
        shape.hidden as f64,
        shape.intermediate as f64,
        shape.layers as f64,
        shape.vocab as f64,
    );
    // 4-bit weights, the embeddings in f32 (on the CPU).
    let base = l * (4.0 * h * h + 3.0 * h * i) * 0.5 + v * h * 4.0;
    // LoRA A and B on every linear layer: r × (in + out) each; weight, gradient, two moments.
    let r = config.lora.r as f64;
    let lora = l * r * (4.0 * 2.0 * h + 3.0 * (h + i)) * 4.0 * 4.0;
    let tokens = config.per_device_train_batch_size as f64 * config.max_seq_length as f64;
    // Kept for backward: at least two hidden-sized values per token and layer.
    let activations = tokens * h * l * 2.0 * 4.0;
    // The logits and their gradient, f32.
    let logits = tokens * v * 4.0 * 2.0;
    base + lora + activations + logits
}

/// Memory the system can still give, from `/proc/meminfo` (`MemAvailable`); `None` where
/// that is unknown.
pub fn available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(|kib| kib * 1024)
}

/// Refuses a config whose estimate exceeds `available` bytes, naming the settings that drive
/// it.
pub fn check_fits(config: &TrainConfig, shape: Shape, available: u64) -> Result<()> {
    let need = train_bytes(config, shape);
    if need > available as f64 {
        bail!(
            "config: this run needs at least {} of memory (model {}, per_device_train_batch_size {} × max_seq_length {}, lora.r {}), but {} is available; lower per_device_train_batch_size, max_seq_length or lora.r",
            human(need),
            config.model_name_or_path,
            config.per_device_train_batch_size,
            config.max_seq_length,
            config.lora.r,
            human(available as f64)
        );
    }
    Ok(())
}

/// Memory a training step is using, sampled after the step (its loss has already been read,
/// so sampling adds no synchronization).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct InUse {
    /// The process's resident set size (`/proc/self/statm`): on the CPU, the model, its
    /// activations and everything else the process holds.
    pub rss_bytes: Option<u64>,
    /// On CUDA, the bytes allocated from the device's memory pool (what candle's tensors
    /// hold now; the pool keeps more mapped for reuse, as PyTorch's caching allocator does).
    pub gpu_bytes: Option<u64>,
}

impl InUse {
    /// The larger of each value: the peak so far.
    pub fn max_with(self, other: InUse) -> InUse {
        let max = |a: Option<u64>, b: Option<u64>| a.max(b);
        InUse {
            rss_bytes: max(self.rss_bytes, other.rss_bytes),
            gpu_bytes: max(self.gpu_bytes, other.gpu_bytes),
        }
    }
}

/// What the process, and the device the model runs on, are using now.
pub fn in_use(device: &candle_core::Device) -> InUse {
    InUse {
        rss_bytes: rss_bytes(),
        gpu_bytes: gpu_bytes(device),
    }
}

/// The resident set size from `/proc/self/statm` (pages); `None` off Linux.
fn rss_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = text.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf only reads a system constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    (page > 0).then(|| pages * page as u64)
}

/// The bytes in use in the CUDA device's default memory pool, which candle allocates from
/// (stream-ordered allocation). `cuMemPoolGetAttribute` reads a counter: no synchronization.
#[cfg(feature = "cuda")]
fn gpu_bytes(device: &candle_core::Device) -> Option<u64> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let candle_core::Device::Cuda(d) = device else {
        return None;
    };
    let ctx = d.cuda_stream().context().clone();
    ctx.bind_to_thread().ok()?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut used = 0u64;
    // SAFETY: `pool` is written by the driver for a valid device of a bound context; the
    // attribute writes a u64 through the pointer.
    unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device())
            .result()
            .ok()?;
        sys::cuMemPoolGetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT,
            &mut used as *mut u64 as *mut std::ffi::c_void,
        )
        .result()
        .ok()?;
    }
    Some(used)
}

#[cfg(not(feature = "cuda"))]
fn gpu_bytes(_: &candle_core::Device) -> Option<u64> {
    None
}

fn human(bytes: f64) -> String {
    let gib = bytes / (1u64 << 30) as f64;
    if gib >= 1024.0 * 1024.0 {
        format!("{:.1} PiB", gib / (1024.0 * 1024.0))
    } else if gib >= 1024.0 {
        format!("{:.1} TiB", gib / 1024.0)
    } else if gib >= 1.0 {
        format!("{gib:.1} GiB")
    } else {
        format!("{:.0} MiB", bytes / (1u64 << 20) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_running_process_has_a_resident_set_and_the_cpu_no_gpu_memory() {
        let used = in_use(&candle_core::Device::Cpu);
        if cfg!(target_os = "linux") {
            let rss = used.rss_bytes.expect("/proc/self/statm is readable");
            assert!(rss > (1 << 20) && rss < (1 << 40), "{rss}");
        }
        assert_eq!(used.gpu_bytes, None);
    }

    #[test]
    fn the_default_config_fits_and_an_absurd_batch_does_not() {
        let config = TrainConfig::default();
        let need = train_bytes(&config, DEFAULT_SHAPE);
        assert!(need < 8.0 * (1u64 << 30) as f64, "{need}");
        check_fits(&config, DEFAULT_SHAPE, 16 << 30).unwrap();
        let mut big = config.clone();
        big.per_device_train_batch_size = 4096;
        big.max_seq_length = 131_072;
        let e = check_fits(&big, DEFAULT_SHAPE, 16 << 30)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("per_device_train_batch_size") && e.contains("TiB"),
            "{e}"
        );
    }
}
