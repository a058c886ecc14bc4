//! API load: 50 concurrent clients for 30 s against the real router (in-process server on a
//! loopback port, a temporary data directory holding one evaluated run), reading the runs
//! list, one run and its samples. Reports requests/s and latency percentiles.
//! `cargo bench -p adapterlab --bench api_load [-- SECONDS CLIENTS]`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use adapterlab::eval::input::PredictionRow;
use adapterlab::eval::pipeline::EvalRequest;
use adapterlab::paths::DataDir;
use adapterlab::plugin::{Limits, Registry, Runtime};
use adapterlab::store::{RunStatus, Store};

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let seconds: u64 = args.first().and_then(|s| s.parse().ok()).unwrap_or(30);
    let clients: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(50);

    let tmp = tempfile::tempdir().unwrap();
    let data_dir = DataDir::resolve(Some(tmp.path())).unwrap();
    let store = Store::open(&data_dir.store()).unwrap();
    let runtime = Runtime::new(Some(data_dir.component_cache()), Limits::default()).unwrap();
    let registry = Registry::load(&runtime, &data_dir.plugins()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _guard = rt.enter();
    let state = adapterlab::server::state(
        data_dir,
        store.clone(),
        runtime,
        registry,
        "t".into(),
        "smollm2".into(),
    )
    .unwrap();

    // One evaluated run of 200 samples to read.
    let rows: Vec<PredictionRow> = (0..200)
        .map(|i| PredictionRow {
            id: format!("s{i}"),
            prediction: format!("the cat number {i} sat on the mat"),
            reference: "the cat sat on the mat".into(),
            source: Some("A: where is the cat?\nB: on the mat".into()),
        })
        .collect();
    let request = EvalRequest {
        name: "load".into(),
        rows,
        metrics: vec!["rouge".into(), "bleu".into()],
        settings: Default::default(),
        score_references: false,
        metadata: Default::default(),
    };
    let run = state.jobs.submit_eval(request).unwrap();
    while store.get_run(&run.id).unwrap().unwrap().status != RunStatus::Done {
        std::thread::sleep(Duration::from_millis(50));
    }

    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let app = adapterlab::server::app(state);
    rt.spawn(async move { axum::serve(listener, app).await.unwrap() });

    let base = format!("http://{addr}");
    let id = run.id.clone();
    let latencies = Arc::new(std::sync::Mutex::new(Vec::<Duration>::new()));
    let errors = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let until = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    rt.block_on(async {
        let client = reqwest::Client::new();
        let tasks: Vec<_> = (0..clients)
            .map(|i| {
                let (client, base, id, latencies, errors) = (
                    client.clone(),
                    base.clone(),
                    id.clone(),
                    latencies.clone(),
                    errors.clone(),
                );
                tokio::spawn(async move {
                    let mut mine = Vec::new();
                    let mut n = 0usize;
                    while Instant::now() < until {
                        let path = match (i + n) % 3 {
                            0 => "/api/runs".to_string(),
                            1 => format!("/api/runs/{id}"),
                            _ => format!("/api/runs/{id}/samples"),
                        };
                        let t = Instant::now();
                        match client.get(format!("{base}{path}")).send().await {
                            Ok(r) if r.status().is_success() => {
                                let _ = r.bytes().await;
                            }
                            _ => {
                                errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                        }
                        mine.push(t.elapsed());
                        n += 1;
                    }
                    latencies.lock().unwrap().extend(mine);
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    });
    let elapsed = started.elapsed();
    let mut l = latencies.lock().unwrap().clone();
    l.sort();
    let pct = |q: f64| l[((l.len() as f64 - 1.0) * q) as usize].as_secs_f64() * 1e3;
    println!(
        "API load: {clients} clients, {seconds} s, GET /api/runs | /api/runs/ID | /api/runs/ID/samples (200 samples)"
    );
    println!("| requests | errors | requests/s | p50 | p90 | p99 | max |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    println!(
        "| {} | {} | {:.0} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms |",
        l.len(),
        errors.load(std::sync::atomic::Ordering::Relaxed),
        l.len() as f64 / elapsed.as_secs_f64(),
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(1.0)
    );
}
