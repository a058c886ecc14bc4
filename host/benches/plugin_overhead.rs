//! Plugin runtime overhead: compile (cold), load from the component cache, instantiate, and
//! the per-call cost of a trivial metric. Run with
//! `cargo bench -p adapterlab --bench plugin_overhead`; results go to BENCHMARKS.md.

use std::path::Path;
use std::time::{Duration, Instant};

use adapterlab::plugin::wit::types::Sample;
use adapterlab::plugin::{CallContext, Limits, PluginSource, Runtime};

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

fn main() {
    // The trivial metric is built with the host; a path argument overrides where to find it
    // (when the bench binary runs on another machine).
    let wasm = std::env::args()
        .skip(1)
        .find(|a| a.ends_with(".wasm"))
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(adapterlab::plugin::registry::WASM_BUILD_DIR)
                .join("adapterlab_test_misbehave.wasm")
        });
    let bytes =
        std::fs::read(&wasm).expect("build the host first: the trivial metric is built with it");
    let cache = tempfile::tempdir().unwrap();

    // Cold: compile with Cranelift, write the cache, instantiate, call `info`.
    let mut cold = Vec::new();
    for i in 0..3 {
        let dir = cache.path().join(format!("cold{i}"));
        let rt = Runtime::new(Some(dir), Limits::default()).unwrap();
        let t = Instant::now();
        rt.load(&bytes, PluginSource::Builtin).unwrap();
        cold.push(t.elapsed());
    }

    // Cached: a fresh runtime (a second start of the process) loading from the cache.
    let dir = cache.path().join("warm");
    Runtime::new(Some(dir.clone()), Limits::default())
        .unwrap()
        .load(&bytes, PluginSource::Builtin)
        .unwrap();
    let mut cached = Vec::new();
    for _ in 0..20 {
        let rt = Runtime::new(Some(dir.clone()), Limits::default()).unwrap();
        let t = Instant::now();
        rt.load(&bytes, PluginSource::Builtin).unwrap();
        cached.push(t.elapsed());
    }

    // Instantiate: a new instance (store + WASI context) from the pre-linked component.
    let rt = Runtime::new(Some(dir), Limits::default()).unwrap();
    let plugin = rt.load(&bytes, PluginSource::Builtin).unwrap();
    let mut inst = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        let s = plugin.session(CallContext::default()).unwrap();
        inst.push(t.elapsed());
        drop(s);
    }

    // Per call: one sample through `score` on a live instance, contract checks included.
    let sample = Sample {
        id: "1".into(),
        prediction: "hello".into(),
        references: vec!["world".into()],
        source: None,
    };
    let mut session = plugin.session(CallContext::default()).unwrap();
    for _ in 0..1000 {
        session
            .score(std::slice::from_ref(&sample), &plugin.meta)
            .unwrap();
    }
    let calls = 20_000;
    let t = Instant::now();
    for _ in 0..calls {
        session
            .score(std::slice::from_ref(&sample), &plugin.meta)
            .unwrap();
    }
    let per_call = t.elapsed() / calls;

    println!(
        "plugin runtime overhead (trivial metric, {} KiB component)",
        bytes.len() / 1024
    );
    println!("| what | median |");
    println!("| --- | --- |");
    println!(
        "| load, cold (compile + cache write + instantiate + info) | {:.2} ms |",
        median(cold).as_secs_f64() * 1e3
    );
    println!(
        "| load, cached (deserialize + instantiate + info) | {:.3} ms |",
        median(cached).as_secs_f64() * 1e3
    );
    println!(
        "| instantiate (new store + instance) | {:.1} µs |",
        median(inst).as_secs_f64() * 1e6
    );
    println!(
        "| call overhead (score, 1 sample) | {:.2} µs |",
        per_call.as_secs_f64() * 1e6
    );
}
