//! The devices models run on, made one way for every command.
//!
//! On CUDA, candle allocates from the device's stream-ordered memory pool, whose default
//! release threshold is 0: every synchronization hands all freed memory back to the driver,
//! and the next allocations map it again. A training step synchronizes when it reads the loss
//! and the gradient norm, so every step re-mapped its tens of gigabytes of activations. The
//! pool here keeps what it has mapped, as PyTorch's caching allocator does; peak use is the same.
//!
//! cudarc also tracks every allocation with two CUDA events by default, so that work on several
//! streams can wait for each other. Everything here runs on the device's one stream (candle's
//! per-thread stream, which cuBLAS and cuRAND share), where stream order already orders it all;
//! the events only cost driver calls (two creations and two destructions a tensor, ~700 tensors
//! a decoded token of Falcon-7B), so the device here makes none.
//!
//! And candle's autograd sums a tensor's second gradient into the first through
//! `ops::residual::gradient_add` (one 16-byte-vectorized kernel with the bits of candle's add,
//! whose binary kernel reads two bytes a thread), installed here once a process.

use candle_core::{Device, Result};

/// The GPU at `ordinal`, with a pool that keeps freed memory for reuse.
pub fn cuda(ordinal: usize) -> Result<Device> {
    let device = Device::new_cuda(ordinal)?;
    keep_freed_memory(&device)?;
    one_stream_without_events(&device);
    // Once a process; a second device finds it set, which is the same function.
    candle_core::backprop::set_gradient_adder(crate::ops::residual::gradient_add);
    Ok(device)
}

/// CUDA when built with it and a GPU is there, else the CPU.
pub fn cuda_if_available(ordinal: usize) -> Result<Device> {
    if candle_core::utils::cuda_is_available() {
        cuda(ordinal)
    } else {
        Ok(Device::Cpu)
    }
}

#[cfg(feature = "cuda")]
fn keep_freed_memory(device: &Device) -> Result<()> {
    use candle_core::cuda_backend::WrapErr;
    use candle_core::cuda_backend::cudarc::driver::sys;
    let Device::Cuda(d) = device else {
        return Ok(());
    };
    let ctx = d.cuda_stream().context().clone();
    ctx.bind_to_thread().w()?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    // SAFETY: `pool` is written by the driver for a valid device of a bound context; the
    // attribute takes a pointer to a u64.
    unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device())
            .result()
            .w()?;
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut threshold as *mut u64 as *mut std::ffi::c_void,
        )
        .result()
        .w()?;
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn keep_freed_memory(_: &Device) -> Result<()> {
    Ok(())
}

/// Compiles every kernel module the crate launches with NVRTC, which needs no GPU: a CUDA build
/// can find a broken `.cu` source on the build machine (the golden test `cuda_kernels_compile`)
/// instead of on the lent GPU, where each module is otherwise first compiled when a kernel of
/// it runs. Returns the modules' names.
#[cfg(feature = "cuda")]
pub fn compile_kernels() -> Result<Vec<&'static str>> {
    let mut names = Vec::new();
    for m in kernel_modules() {
        m.ptx()?;
        names.push(m.name);
    }
    Ok(names)
}

/// Every kernel module the crate launches (each wing lists its own).
#[cfg(feature = "cuda")]
pub fn kernel_modules() -> Vec<&'static crate::ops::kernels::CudaModule> {
    crate::ops::kernel_modules()
        .into_iter()
        .chain(crate::quant::kernels::modules())
        .chain(crate::lora::kernels::modules())
        .collect()
}

#[cfg(feature = "cuda")]
fn one_stream_without_events(device: &Device) {
    if let Device::Cuda(d) = device {
        // SAFETY: no tensor exists on this device yet, and no other stream is ever made on it
        // (candle's device holds one; nothing here calls `new_stream`), so stream order is all
        // the synchronization its work needs.
        unsafe { d.disable_event_tracking() }
    }
}

#[cfg(not(feature = "cuda"))]
fn one_stream_without_events(_: &Device) {}
