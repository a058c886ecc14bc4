//! Where the time goes: wall-clock seconds per named phase of the model's work, switched on with
//! `ADAPTERLAB_PROFILE=1` (off, a scope costs one relaxed atomic load).
//!
//! A scope synchronizes the device before and after, so the GPU time of the kernels it queued is
//! counted in it rather than in whichever later call happens to wait. That removes the overlap
//! of CPU and GPU work, so a profiled step is slower than a normal one: the numbers are for
//! ranking phases against each other, never for headline speed.
//!
//! `ADAPTERLAB_PROFILE=host` times the same scopes without synchronizing: what each phase costs
//! the host to queue, while the device's time lands in whichever call waits for it. Set beside
//! the synchronized profile, it tells a phase bound by launches from one bound by the GPU.
//!
//! `ADAPTERLAB_PROFILE=events` (CUDA) times the scopes on the device, with an event recorded on
//! the stream before and after each and nothing synchronized until [`take`]. A scope's time also
//! holds any wait of the device for the host's next launch inside it, so it is the device's time
//! only where the host runs ahead; recording the events costs the host too, and in batch-1
//! decoding with the lookahead that was enough to make the host the bound (on an H100,
//! 2026-12-06: 98.5 tokens/s profiled against 144.7), which the host profile tells.
//!
//! Names nest by the caller's choice (`layer.mlp.up` inside `layer`); a pass label set with
//! [`pass`] (e.g. `forward`, `recompute`, `backward`) prefixes them, so the same layer code is
//! counted apart in each pass that runs it.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::Instant;

use candle_core::{Device, Result};

static ENABLED: LazyLock<AtomicBool> = LazyLock::new(|| {
    AtomicBool::new(std::env::var("ADAPTERLAB_PROFILE").is_ok_and(|v| !v.is_empty() && v != "0"))
});

/// How an enabled scope times its phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Clock {
    /// The device synchronized before and after (`ADAPTERLAB_PROFILE=1`).
    Synchronized,
    /// The host's time alone (`host`).
    Host,
    /// Device events, read at [`take`] (`events`; synchronized where the device is no GPU).
    Events,
}

static CLOCK: LazyLock<Clock> =
    LazyLock::new(|| match std::env::var("ADAPTERLAB_PROFILE").as_deref() {
        Ok("host") => Clock::Host,
        Ok("events") => Clock::Events,
        _ => Clock::Synchronized,
    });

/// Events recorded around scopes, not yet read: `(pass.name, start, end)`.
#[cfg(feature = "cuda")]
type PendingEvents = Vec<(
    String,
    candle_core::cuda_backend::cudarc::driver::CudaEvent,
    candle_core::cuda_backend::cudarc::driver::CudaEvent,
)>;
#[cfg(feature = "cuda")]
static PENDING: Mutex<PendingEvents> = Mutex::new(Vec::new());

/// Events kept before they are read (which waits for the device) to bound their memory.
#[cfg(feature = "cuda")]
const MAX_PENDING: usize = 16_384;

/// Seconds and calls per `pass.name`.
static TABLE: Mutex<BTreeMap<String, (f64, u64)>> = Mutex::new(BTreeMap::new());

thread_local! {
    static PASS: Cell<&'static str> = const { Cell::new("") };
}

pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Turns profiling on or off for the whole process (tests; the environment variable sets the
/// starting value).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Times candle's backward pass node by node, under `pass.op.NAME` (e.g. `backward.op.add`,
/// `backward.op.lora-linear`): the span from one node's start to the next's, the device
/// synchronized at each (`Synchronized` clock only), so the ops of candle's own autograd that no
/// scope wraps are counted too. A span also holds the host's work and the synchronization: for
/// heavy nodes that is noise (layer norm's 97 ms a step was real), for cheap ones most of it
/// (Falcon's q, k, v split showed 30 ms and a fix for it moved the unprofiled step by nothing
/// measurable, 2026-12-06). Installed at the first scope of an enabled profile.
fn observe_backward(device: &Device, op: &'static str) {
    thread_local! {
        static LAST: Cell<Option<(&'static str, Instant)>> = const { Cell::new(None) };
    }
    if !enabled() || *CLOCK != Clock::Synchronized {
        return;
    }
    // A failed synchronization shows in the next scope's; the observer cannot return it.
    let _ = device.synchronize();
    let now = Instant::now();
    if let Some((prev, start)) = LAST.with(|l| l.take()) {
        let key = match PASS.with(Cell::get) {
            "" => format!("op.{prev}"),
            p => format!("{p}.op.{prev}"),
        };
        add(key, now.duration_since(start).as_secs_f64());
    }
    if !op.is_empty() {
        LAST.with(|l| l.set(Some((op, now))));
    }
}

/// Runs `f` with `label` as this thread's pass label, restoring the previous one after.
pub fn pass<T>(label: &'static str, f: impl FnOnce() -> T) -> T {
    let was = PASS.with(|p| p.replace(label));
    let out = f();
    PASS.with(|p| p.set(was));
    out
}

/// Runs `f`, counting its time (device work included) under the current pass and `name`.
pub fn scope<T>(name: &'static str, device: &Device, f: impl FnOnce() -> Result<T>) -> Result<T> {
    scope_with(name, device, f)
}

/// [`scope`] for any error type a candle error converts into (e.g. `anyhow::Error`).
pub fn scope_with<T, E: From<candle_core::Error>>(
    name: &'static str,
    device: &Device,
    f: impl FnOnce() -> std::result::Result<T, E>,
) -> std::result::Result<T, E> {
    if !enabled() {
        return f();
    }
    static OBSERVER: std::sync::Once = std::sync::Once::new();
    OBSERVER.call_once(|| {
        candle_core::backprop::set_backward_observer(observe_backward);
    });
    let key = || match PASS.with(Cell::get) {
        "" => name.to_string(),
        p => format!("{p}.{name}"),
    };
    #[cfg(feature = "cuda")]
    if let (Clock::Events, Device::Cuda(d)) = (*CLOCK, device) {
        use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
        let stream = d.cuda_stream();
        let event = || {
            stream
                .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(candle_core::Error::wrap)
        };
        let start = event()?;
        let out = f()?;
        let end = event()?;
        let full = match PENDING.lock() {
            Ok(mut pending) => {
                pending.push((key(), start, end));
                pending.len() >= MAX_PENDING
            }
            Err(_) => false,
        };
        if full {
            read_events().map_err(E::from)?;
        }
        return Ok(out);
    }
    let sync = *CLOCK != Clock::Host;
    if sync {
        device.synchronize()?;
    }
    // With RUST_LOG=adapterlab_model=trace the last line names the phase a stall is in.
    tracing::trace!(name, "phase starts");
    let start = Instant::now();
    let out = f()?;
    if sync {
        device.synchronize()?;
    }
    add(key(), start.elapsed().as_secs_f64());
    Ok(out)
}

fn add(key: String, secs: f64) {
    if let Ok(mut table) = TABLE.lock() {
        let e = table.entry(key).or_insert((0.0, 0));
        e.0 += secs;
        e.1 += 1;
    }
}

/// Moves the pending events' times into the table (waiting for the device to reach them).
fn read_events() -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        let pending = match PENDING.lock() {
            Ok(mut p) => std::mem::take(&mut *p),
            Err(_) => Vec::new(),
        };
        for (key, start, end) in pending {
            let ms = start.elapsed_ms(&end).map_err(candle_core::Error::wrap)?;
            add(key, f64::from(ms) / 1e3);
        }
    }
    Ok(())
}

/// MiB of GPU memory in use (the whole card, as `cuMemGetInfo` counts it), for tracing where
/// memory goes; `None` off CUDA.
pub fn device_memory_used(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        use candle_core::cuda_backend::cudarc::driver::result::mem_get_info;
        let _ = d.cuda_stream().context().bind_to_thread();
        return mem_get_info()
            .ok()
            .map(|(free, total)| ((total - free) >> 20) as u64);
    }
    let _ = device;
    None
}

/// The table since the last call, sorted by name, and cleared; with device events, once the
/// device has reached the last one.
pub fn take() -> Result<Vec<(String, f64, u64)>> {
    read_events()?;
    Ok(match TABLE.lock() {
        Ok(mut t) => std::mem::take(&mut *t)
            .into_iter()
            .map(|(k, (s, n))| (k, s, n))
            .collect(),
        Err(_) => Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_count_per_pass_and_name() -> Result<()> {
        set_enabled(true);
        let dev = Device::Cpu;
        take()?;
        for _ in 0..2 {
            pass("forward", || scope("mlp", &dev, || Ok(())))?;
        }
        scope("loss", &dev, || Ok(()))?;
        let t = take()?;
        set_enabled(false);
        let names: Vec<(&str, u64)> = t.iter().map(|(k, _, n)| (k.as_str(), *n)).collect();
        assert!(names.contains(&("forward.mlp", 2)), "{names:?}");
        assert!(names.contains(&("loss", 1)), "{names:?}");
        Ok(())
    }
}
