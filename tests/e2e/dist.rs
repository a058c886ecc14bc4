//! `adapterlab train --nproc-per-node N` on the CPU: worker processes that meet at the TCP
//! rendezvous and reduce through rank 0 (the path NCCL takes on GPUs, with another transport).
//! Two ranks with accumulation 3 train as one process with accumulation 6; only rank 0 writes;
//! a rank that never arrives fails the run by number.

use std::net::TcpListener;

use crate::train::{dataset, tiny_model};
use crate::util::{read_json, run_fail, run_ok, setup};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn args(model: &str, data: &str, out: &str, accum: usize) -> Vec<String> {
    let mut args: Vec<String> = vec!["train".into()];
    for kv in [
        format!("model_name_or_path={model}"),
        format!("dataset={data}"),
        format!("output_dir={out}"),
        "max_steps=4".into(),
        "per_device_train_batch_size=2".into(),
        format!("gradient_accumulation_steps={accum}"),
        "learning_rate=0.01".into(),
        "logging_steps=1".into(),
        "save_steps=2".into(),
        "eval_strategy=no".into(),
        "max_seq_length=64".into(),
        "lora.r=4".into(),
        "lora.lora_alpha=8".into(),
    ] {
        args.push("--set".into());
        args.push(kv);
    }
    args
}

#[test]
fn two_worker_processes_train_as_one_with_twice_the_accumulation() {
    let t = setup("dist");
    let model = tiny_model(&t);
    let data = dataset(&t);
    let (m, d) = (model.to_str().unwrap(), data.to_str().unwrap());

    let one = t.path().join("one");
    let a = args(m, d, one.to_str().unwrap(), 6);
    run_ok(&mut t.cmd(&a.iter().map(String::as_str).collect::<Vec<_>>()));

    let two = t.path().join("two");
    let port = free_port().to_string();
    let mut a = args(m, d, two.to_str().unwrap(), 3);
    a.extend([
        "--nproc-per-node".into(),
        "2".into(),
        "--master-port".into(),
        port,
    ]);
    let out = run_ok(&mut t.cmd(&a.iter().map(String::as_str).collect::<Vec<_>>()));
    assert_eq!(
        out.lines().filter(|l| l.contains("\"loss\"")).count(),
        4,
        "only rank 0 prints the log history: {out}"
    );

    let (s1, s2) = (
        read_json(&one.join("trainer_state.json")),
        read_json(&two.join("trainer_state.json")),
    );
    assert_eq!(s2["global_step"], 4);
    assert_eq!(s1["num_input_tokens_seen"], s2["num_input_tokens_seen"]);
    let losses = |s: &serde_json::Value| -> Vec<f64> {
        s["log_history"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e.get("loss")?.as_f64())
            .collect()
    };
    for (x, y) in losses(&s1).iter().zip(losses(&s2)) {
        assert!((x - y).abs() <= 1e-4, "{s1} vs {s2}");
    }
    // One process sums six micro-batches in one running sum, two ranks as (3) + (3): the
    // adapters agree to float rounding (bit for bit against a grouped reference: the unit
    // test `train::dist::equivalence`).
    let load = |dir: &std::path::Path| {
        candle_core::safetensors::load(
            dir.join("adapter_model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap()
    };
    let (w1, w2) = (load(&one), load(&two));
    for (k, a) in &w1 {
        let diff = (a - &w2[k])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-3, "{k}: {diff}");
    }

    // One run in the store, by rank 0, with its world size.
    let store = adapterlab::store::Store::open(&t.data_dir().join("store")).unwrap();
    let runs: Vec<_> = store
        .list_runs()
        .unwrap()
        .into_iter()
        .filter(|r| r.metadata["output_dir"].ends_with("two"))
        .collect();
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(runs[0].metadata["world_size"], "2");
    assert_eq!(runs[0].status, adapterlab::store::RunStatus::Done);
}

#[test]
fn a_rank_that_never_comes_is_named() {
    let t = setup("dist-missing");
    let model = tiny_model(&t);
    let data = dataset(&t);
    let out = t.path().join("out");
    let a = args(
        model.to_str().unwrap(),
        data.to_str().unwrap(),
        out.to_str().unwrap(),
        1,
    );
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let port = free_port().to_string();
    let env = [
        ("WORLD_SIZE", "3"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", port.as_str()),
        ("ADAPTERLAB_RENDEZVOUS_TIMEOUT", "1"),
    ];
    let err = run_fail(t.cmd(&a).envs(env).env("RANK", "0"));
    assert!(err.contains("rank(s) [1, 2] of 3 did not arrive"), "{err}");
    let err = run_fail(t.cmd(&a).envs(env).env("RANK", "2"));
    assert!(err.contains("rank 0 could not be reached"), "{err}");
    let err = run_fail(t.cmd(&a).env("SLURM_PROCID", "1").env("SLURM_NTASKS", "2"));
    assert!(err.contains("MASTER_ADDR is not set"), "{err}");
}
