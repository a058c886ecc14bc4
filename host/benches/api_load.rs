//! API load: 50 concurrent clients for 30 s against the real router (in-process server on a
//! loopback port, a temporary data directory holding evaluated runs), in two phases:
//! 1. reading the runs list, one run and its samples;
//! 2. the mixed read load with an evaluation of 40,000 samples running meanwhile: the
//!    runs list, one run, a page of samples, all samples, a page of a comparison and the
//!    whole comparison, as the dashboard reads them (gzip accepted, ETags revalidated).
//!
//! Reports requests/s and latency percentiles for each.
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
            references: Vec::new(),
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
        llm_base_url: None,
    };
    let run = state.jobs.submit_eval(request.clone()).unwrap();
    let other = state
        .jobs
        .submit_eval(EvalRequest {
            name: "load-b".into(),
            rows: request
                .rows
                .iter()
                .map(|r| PredictionRow {
                    prediction: format!("{} again", r.prediction),
                    ..r.clone()
                })
                .collect(),
            ..request.clone()
        })
        .unwrap();
    for id in [&run.id, &other.id] {
        while store.get_run(id).unwrap().unwrap().status != RunStatus::Done {
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let app = adapterlab::server::app(state.clone());
    rt.spawn(async move { axum::serve(listener, app).await.unwrap() });
    let base = format!("http://{addr}");
    let id = run.id.clone();

    let paths = vec![
        "/api/runs".to_string(),
        format!("/api/runs/{id}"),
        format!("/api/runs/{id}/samples"),
    ];
    load(
        &rt,
        &base,
        &paths,
        seconds,
        clients,
        false,
        &format!(
            "API load: {clients} clients, {seconds} s, GET /api/runs | /api/runs/ID | /api/runs/ID/samples (200 samples)"
        ),
    );

    // The mixed read load, with an evaluation of 40,000 samples running meanwhile.
    let busy = EvalRequest {
        name: "running".into(),
        rows: (0..40_000)
            .map(|i| PredictionRow {
                id: format!("r{i}"),
                prediction: format!("a longer prediction number {i} about the cat and the mat"),
                reference: "the cat sat on the mat".into(),
                references: Vec::new(),
                source: Some("A: where is the cat?\nB: on the mat".into()),
            })
            .collect(),
        ..request.clone()
    };
    let busy = state.jobs.submit_eval(busy).unwrap();
    let b = other.id.clone();
    let paths = vec![
        "/api/runs".to_string(),
        format!("/api/runs/{id}"),
        format!("/api/runs/{id}/samples?limit=50&offset=0"),
        format!("/api/runs/{id}/samples"),
        format!("/api/compare?runs={id},{b}&limit=50"),
        format!("/api/compare?runs={id},{b}"),
    ];
    load(
        &rt,
        &base,
        &paths,
        seconds,
        clients,
        true,
        &format!(
            "Mixed read load: {clients} clients, {seconds} s, an evaluation running, GET /api/runs | /api/runs/ID | samples page | all samples | comparison page | whole comparison"
        ),
    );
    let status = store.get_run(&busy.id).unwrap().unwrap();
    println!(
        "(the running evaluation scored {} of 40000 samples meanwhile)",
        status.progress.done
    );
}

/// `clients` concurrent clients reading `paths` in turn for `seconds`; prints a table row.
/// `browser`: accept gzip and revalidate with the ETags received, as a browser does.
fn load(
    rt: &tokio::runtime::Runtime,
    base: &str,
    paths: &[String],
    seconds: u64,
    clients: usize,
    browser: bool,
    title: &str,
) {
    let latencies = Arc::new(std::sync::Mutex::new(Vec::<Duration>::new()));
    let errors = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let until = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    rt.block_on(async {
        let client = reqwest::Client::new();
        let tasks: Vec<_> = (0..clients)
            .map(|i| {
                let (client, base, paths, latencies, errors) = (
                    client.clone(),
                    base.to_string(),
                    paths.to_vec(),
                    latencies.clone(),
                    errors.clone(),
                );
                tokio::spawn(async move {
                    let mut mine = Vec::new();
                    let mut etags = std::collections::HashMap::<String, String>::new();
                    let mut n = 0usize;
                    while Instant::now() < until {
                        let path = &paths[(i + n) % paths.len()];
                        let t = Instant::now();
                        // Reads need the token too (the state above was made with "t").
                        let mut req = client.get(format!("{base}{path}")).bearer_auth("t");
                        if browser {
                            req = req.header("accept-encoding", "gzip");
                            if let Some(tag) = etags.get(path) {
                                req = req.header("if-none-match", tag);
                            }
                        }
                        match req.send().await {
                            Ok(r) if r.status().is_success() || r.status().as_u16() == 304 => {
                                if let Some(tag) = r.headers().get("etag") {
                                    etags.insert(
                                        path.clone(),
                                        tag.to_str().unwrap_or("").to_string(),
                                    );
                                }
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
    println!("{title}");
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
