//! `adapterlab train` on a tiny random Llama (the `llama_tiny` fixture plus a character-level
//! tokenizer): the loss falls, the outputs have HF's and PEFT's shapes, the adapter loads back,
//! and a stopped-and-resumed run reproduces the uninterrupted one.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::util::{TestDir, read_json, run_fail, run_ok, setup};

/// The fixture checkpoint with a tokenizer: one token per ASCII character, `</s>` as EOS.
pub fn tiny_model(t: &TestDir) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("model/tests/fixtures/bnb/llama_tiny");
    let dir = t.path().join("tiny-llama");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("model.safetensors"), dir.join("model.safetensors")).unwrap();
    std::fs::copy(
        src.join("generation_config.json"),
        dir.join("generation_config.json"),
    )
    .unwrap();
    let mut config = read_json(&src.join("config.json"));
    config["max_position_embeddings"] = 1024.into();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let mut vocab = serde_json::Map::new();
    for (i, tok) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
        vocab.insert(tok.to_string(), i.into());
    }
    for (i, c) in std::iter::once('\n')
        .chain((32u8..127).map(char::from))
        .enumerate()
    {
        vocab.insert(c.to_string(), (i + 3).into());
    }
    let tokenizer = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [
            {"id": 2, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
        ],
        "normalizer": null,
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "[\\s\\S]"}, "behavior": "Isolated", "invert": false},
        "post_processor": null,
        "decoder": {"type": "Fuse"},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    dir
}

/// A learnable prompt-completion set: the completion repeats a word of the prompt.
pub fn dataset(t: &TestDir) -> PathBuf {
    let dir = t.path().join("ds");
    std::fs::create_dir_all(&dir).unwrap();
    let words = ["cat", "dog", "sun", "tree", "rain", "blue", "fish", "star"];
    let rows = |n: usize, offset: usize| -> String {
        (0..n)
            .map(|i| {
                let w = words[(i + offset) % words.len()];
                let v = words[(i * 3 + offset + 1) % words.len()];
                serde_json::json!({"prompt": format!("{v} {w} {v}. Echo {w}:"), "completion": format!(" {w} {w} {w}")}).to_string() + "\n"
            })
            .collect()
    };
    std::fs::write(dir.join("train.jsonl"), rows(24, 0)).unwrap();
    std::fs::write(dir.join("validation.jsonl"), rows(6, 3)).unwrap();
    dir
}

/// A dataset folder of `n` rows made by `row`, the same rows as train and validation splits.
fn rows_dataset(t: &TestDir, name: &str, n: usize, row: impl Fn(usize) -> Value) -> PathBuf {
    let dir = t.path().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let rows: String = (0..n).map(|i| row(i).to_string() + "\n").collect();
    std::fs::write(dir.join("train.jsonl"), &rows).unwrap();
    std::fs::write(dir.join("validation.jsonl"), &rows).unwrap();
    dir
}

fn train_args<'a>(model: &'a str, data: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<String> {
    let mut args: Vec<String> = vec!["train".into()];
    for kv in [
        format!("model_name_or_path={model}"),
        format!("dataset={data}"),
        format!("output_dir={out}"),
        "max_steps=8".into(),
        "per_device_train_batch_size=4".into(),
        "gradient_accumulation_steps=2".into(),
        "learning_rate=0.01".into(),
        "warmup_ratio=0.1".into(),
        "logging_steps=1".into(),
        "save_steps=4".into(),
        "eval_steps=4".into(),
        "max_seq_length=64".into(),
        "lora.r=4".into(),
        "lora.lora_alpha=8".into(),
    ] {
        args.push("--set".into());
        args.push(kv);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// `adapterlab train` of `model` on `data` into `out`: [`train_args`]' settings, then `sets`
/// (`KEY=VALUE`; a later one wins).
fn train_cmd(
    t: &TestDir,
    model: &str,
    data: &str,
    out: &Path,
    sets: &[&str],
) -> std::process::Command {
    let out = out.display().to_string();
    let mut args = train_args(model, data, &out, &[]);
    for kv in sets {
        args.push("--set".into());
        args.push(kv.to_string());
    }
    t.cmd(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn losses(state: &Value) -> Vec<(u64, f64, f64, f64)> {
    state["log_history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e.get("loss").is_some())
        .map(|e| {
            (
                e["step"].as_u64().unwrap(),
                e["loss"].as_f64().unwrap(),
                e["grad_norm"].as_f64().unwrap(),
                e["learning_rate"].as_f64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn trains_writes_peft_and_hf_outputs_and_resumes_exactly() {
    let t = setup("train");
    let model = tiny_model(&t);
    let data = dataset(&t);
    let (m, d) = (model.to_str().unwrap(), data.to_str().unwrap());

    // Uninterrupted.
    let straight = t.path().join("straight");
    let args = train_args(m, d, straight.to_str().unwrap(), &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_ok(&mut t.cmd(&args));
    let state = read_json(&straight.join("trainer_state.json"));
    assert_eq!(state["global_step"], 8);
    assert_eq!(state["max_steps"], 8);
    let curve = losses(&state);
    assert_eq!(curve.len(), 8, "{state}");
    let first = curve[0].1;
    let last = curve.last().unwrap().1;
    assert!(last < first * 0.8, "loss should fall: {curve:?}");
    let evals: Vec<f64> = state["log_history"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e.get("eval_loss")?.as_f64())
        .collect();
    assert_eq!(evals.len(), 2, "eval at step 4 and at the end: {state}");
    for ck in ["checkpoint-4", "checkpoint-8"] {
        for f in [
            "adapter_config.json",
            "adapter_model.safetensors",
            "optimizer.safetensors",
            "trainer_state.json",
            "training_state.json",
        ] {
            assert!(straight.join(ck).join(f).is_file(), "{ck}/{f}");
        }
    }
    let cfg = read_json(&straight.join("adapter_config.json"));
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["base_model_name_or_path"], m);
    let adapter = adapterlab_model::lora::peft::load_adapter(&straight).unwrap();
    let modules = adapter.modules().unwrap();
    // All linear layers of 2 blocks: q, k, v, o, gate, up, down.
    assert_eq!(
        modules.len(),
        14,
        "{:?}",
        modules.iter().map(|m| &m.0).collect::<Vec<_>>()
    );
    let b_sum: f32 = modules
        .iter()
        .map(|(_, _, b, _)| {
            b.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
        .sum();
    assert!(b_sum > 0.0, "B moved away from zero");
    // No temporary checkpoint folders are left behind.
    assert!(
        std::fs::read_dir(&straight).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with('.'))
    );

    // Stopped after 4 steps (the checkpoint at 4 is written), then resumed.
    let resumed = t.path().join("resumed");
    let args = train_args(
        m,
        d,
        resumed.to_str().unwrap(),
        &["--stop-after-steps", "4"],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_ok(&mut t.cmd(&args));
    assert!(resumed.join("checkpoint-4").is_dir());
    assert!(
        !resumed.join("trainer_state.json").exists(),
        "a stopped run writes no final state"
    );
    let args = train_args(
        m,
        d,
        resumed.to_str().unwrap(),
        &["--resume-from-checkpoint", "latest"],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_ok(&mut t.cmd(&args));
    let state2 = read_json(&resumed.join("trainer_state.json"));
    let curve2 = losses(&state2);
    assert_eq!(curve.len(), curve2.len());
    for (a, b) in curve.iter().zip(&curve2) {
        assert_eq!(a.0, b.0);
        assert!(
            (a.1 - b.1).abs() < 1e-6
                && (a.2 - b.2).abs() < 1e-6 * a.2.max(1.0)
                && (a.3 - b.3).abs() < 1e-12,
            "straight {a:?} vs resumed {b:?}"
        );
    }
    let wa = candle_core::safetensors::load(
        straight.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let wb = candle_core::safetensors::load(
        resumed.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    for (k, a) in &wa {
        let diff = (a - &wb[k])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-6, "{k}: {diff}");
    }

    // The store has the train run, its logged steps and the adapter.
    let store = adapterlab::store::Store::open(&t.data_dir().join("store")).unwrap();
    let runs = store.list_runs().unwrap();
    let done: Vec<_> = runs
        .iter()
        .filter(|r| {
            r.kind == adapterlab::store::RunKind::Train
                && r.status == adapterlab::store::RunStatus::Done
        })
        .collect();
    assert_eq!(done.len(), 2, "{runs:?}");
    let run = done
        .iter()
        .find(|r| r.metadata["output_dir"].ends_with("straight"))
        .unwrap();
    assert_eq!(run.metadata["global_step"], "8");
    let events = store.events_after(&run.id, None).unwrap();
    let logged = events
        .iter()
        .filter(|(_, e)| matches!(e, adapterlab::store::RunEvent::Loss { loss: Some(_), .. }))
        .count();
    assert_eq!(logged, 8);
    assert!(!store.list_adapters().unwrap().is_empty());
}

#[test]
fn dataset_problems_and_bad_keys_fail_before_the_model_loads() {
    let t = setup("train-bad");
    let bad = t.write(
        "bad.jsonl",
        "{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"a\", \"completion\": \"  \"}\n",
    );
    // The model does not exist: the error must be about the data.
    let err = run_fail(&mut t.cmd(&[
        "train",
        "--set",
        &format!("dataset={}", bad.display()),
        "--set",
        "model_name_or_path=/nonexistent/model",
    ]));
    assert!(err.contains("row 2") && !err.contains("row 1:"), "{err}");
    let err = run_fail(&mut t.cmd(&["train", "--set", "lerning_rate=1"]));
    assert!(err.contains("did you mean `learning_rate`"), "{err}");
}

#[test]
fn a_run_killed_mid_training_resumes_to_the_uninterrupted_curve() {
    let t = setup("train-kill");
    let model = tiny_model(&t);
    let data = dataset(&t);
    let (m, d) = (model.to_str().unwrap(), data.to_str().unwrap());
    let extra = [
        "--set",
        "max_steps=40",
        "--set",
        "save_steps=3",
        "--set",
        "eval_steps=0",
    ];

    let straight = t.path().join("straight");
    let args = train_args(m, d, straight.to_str().unwrap(), &extra);
    run_ok(&mut t.cmd(&args.iter().map(String::as_str).collect::<Vec<_>>()));

    let killed = t.path().join("killed");
    let args = train_args(m, d, killed.to_str().unwrap(), &extra);
    let mut child = t
        .cmd(&args.iter().map(String::as_str).collect::<Vec<_>>())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !killed.join("checkpoint-6").is_dir() {
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint-6 within 60 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        !killed.join("trainer_state.json").exists(),
        "the run was killed before it finished"
    );
    // Every checkpoint in place is whole; temporary folders may be left, never a partial checkpoint-N.
    for entry in std::fs::read_dir(&killed).unwrap() {
        let p = entry.unwrap().path();
        if p.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("checkpoint-")
        {
            for f in [
                "adapter_config.json",
                "adapter_model.safetensors",
                "optimizer.safetensors",
                "trainer_state.json",
            ] {
                assert!(p.join(f).is_file(), "{}/{f}", p.display());
            }
            let _: Value = read_json(&p.join("training_state.json"));
        }
    }
    let args = train_args(
        m,
        d,
        killed.to_str().unwrap(),
        &[&extra[..], &["--resume-from-checkpoint", "latest"]].concat(),
    );
    run_ok(&mut t.cmd(&args.iter().map(String::as_str).collect::<Vec<_>>()));
    let a = losses(&read_json(&straight.join("trainer_state.json")));
    let b = losses(&read_json(&killed.join("trainer_state.json")));
    assert_eq!(a.len(), 40);
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert!(
            (x.1 - y.1).abs() < 1e-6 && (x.2 - y.2).abs() < 1e-6 * x.2.max(1.0),
            "straight {x:?} vs killed+resumed {y:?}"
        );
    }
}

#[test]
fn eval_after_train_generates_and_records_an_eval_run_with_the_adapter() {
    let t = setup("train-eval");
    let model = tiny_model(&t);
    let data = dataset(&t);
    let out = t.path().join("out");
    let args = train_args(
        model.to_str().unwrap(),
        data.to_str().unwrap(),
        out.to_str().unwrap(),
        &["--set", "max_steps=2", "--set", "eval_after_train=rouge"],
    );
    let err = run_fail(
        t.cmd(&args.iter().map(String::as_str).collect::<Vec<_>>())
            .env("X", "1")
            .args(["--set", "eval_after_train=rogue"]),
    );
    assert!(err.contains("rogue"), "{err}");
    run_ok(&mut t.cmd(&args.iter().map(String::as_str).collect::<Vec<_>>()));
    let store = adapterlab::store::Store::open(&t.data_dir().join("store")).unwrap();
    let runs = store.list_runs().unwrap();
    let eval = runs
        .iter()
        .find(|r| r.kind == adapterlab::store::RunKind::Eval)
        .expect("an eval run");
    assert_eq!(eval.status, adapterlab::store::RunStatus::Done, "{eval:?}");
    assert!(
        eval.metadata["adapter"].ends_with("out"),
        "{:?}",
        eval.metadata
    );
    assert_eq!(eval.metadata["split"], "validation");
    // The name the adapter is stored under, which lists show (its folder may be a run id).
    let train = runs
        .iter()
        .find(|r| r.kind == adapterlab::store::RunKind::Train)
        .unwrap();
    assert_eq!(
        eval.metadata.get("adapter_name"),
        train.metadata.get("adapter_name"),
        "{:?}",
        eval.metadata
    );
    assert!(eval.metadata.contains_key("adapter_name"));
    assert!(
        eval.aggregates.keys().any(|k| k.contains("rouge")),
        "{:?}",
        eval.aggregates
    );
    assert_eq!(store.samples(&eval.id).unwrap().len(), 6);
}

/// The stored run whose `output_dir` is `dir`.
fn stored_run(store: &adapterlab::store::Store, dir: &Path) -> adapterlab::store::RunRecord {
    let runs = store.list_runs().unwrap();
    runs.iter()
        .find(|r| r.metadata.get("output_dir").map(String::as_str) == dir.to_str())
        .unwrap_or_else(|| panic!("no run for {}: {runs:?}", dir.display()))
        .clone()
}

/// `packing = true` (TRL's key): the run packs the examples into rows, trains, logs, and keeps
/// the setting with the run; the validation loss before training (the base model: B starts at
/// zero) equals the unpacked run's, since each packed example is attended to and positioned
/// as if alone.
#[test]
fn packing_trains_logs_and_is_stored_with_the_run() {
    let t = setup("train-packing");
    let model = tiny_model(&t);
    let data = dataset(&t);
    let (m, d) = (model.to_str().unwrap(), data.to_str().unwrap());
    let train = |out: &str, extra: &[&str]| {
        let mut extra = extra.to_vec();
        extra.extend(["--set", "max_steps=3", "--set", "eval_steps=0"]);
        let args = train_args(m, d, out, &extra);
        run_ok(&mut t.cmd(&args.iter().map(String::as_str).collect::<Vec<_>>()))
    };
    let packed_dir = t.path().join("packed");
    let out = train(
        packed_dir.to_str().unwrap(),
        &["--set", "packing=true", "--set", "packing_strategy=bfd"],
    );
    let state = read_json(&packed_dir.join("trainer_state.json"));
    assert_eq!(state["global_step"], 3);
    assert_eq!(losses(&state).len(), 3, "{state}");
    let plain_dir = t.path().join("plain");
    train(plain_dir.to_str().unwrap(), &[]);

    let store = adapterlab::store::Store::open(&t.data_dir().join("store")).unwrap();
    let (packed, plain) = (
        stored_run(&store, &packed_dir),
        stored_run(&store, &plain_dir),
    );
    let request: Value = store.request(&packed.id).unwrap().unwrap();
    assert_eq!(request["packing"], true, "{request}");
    assert_eq!(request["packing_strategy"], "bfd", "{request}");
    let request: Value = store.request(&plain.id).unwrap().unwrap();
    assert_eq!(request["packing"], false, "{request}");
    // The log line says how the rows were made (the run's events hold it too).
    let events = format!("{:?}", store.events_after(&packed.id, None).unwrap());
    assert!(
        events.contains("train: packed 24 examples into") || out.contains("packed 24 examples"),
        "{events}\n{out}"
    );
    let before = |r: &adapterlab::store::RunRecord| r.corpus["eval_loss_before"];
    let (a, b) = (before(&packed), before(&plain));
    assert!(
        (a - b).abs() < 1e-4,
        "eval loss before training: packed {a}, unpacked {b}"
    );

    // TRL's `bfd_split` on rows shorter than the examples: the long ones are split across
    // rows, not cut; `eval_packing = false` keeps the validation rows unpacked.
    drop(store); // the binary opens it next
    let split_dir = t.path().join("split");
    train(
        split_dir.to_str().unwrap(),
        &[
            "--set",
            "packing=true",
            "--set",
            "packing_strategy=bfd_split",
            "--set",
            "max_seq_length=12",
            "--set",
            "eval_packing=false",
        ],
    );
    let store = adapterlab::store::Store::open(&t.data_dir().join("store")).unwrap();
    let split = stored_run(&store, &split_dir);
    let request: Value = store.request(&split.id).unwrap().unwrap();
    let events = format!("{:?}", store.events_after(&split.id, None).unwrap());
    drop(store);
    assert!(
        events.contains(
            "are longer than max_seq_length = 12 tokens and are split across packed rows"
        ) && events.contains("(bfd_split,")
            && !events.contains("validation: packed"),
        "{events}"
    );
    assert_eq!(
        (&request["packing_strategy"], &request["eval_packing"]),
        (&Value::from("bfd_split"), &Value::from(false)),
        "{request}"
    );

    let refused = t.path().join("refused");
    let args = train_args(
        m,
        d,
        refused.to_str().unwrap(),
        &["--set", "packing=true", "--set", "packing_strategy=ffd"],
    );
    let err = run_fail(&mut t.cmd(&args.iter().map(String::as_str).collect::<Vec<_>>()));
    assert!(
        err.contains("packing_strategy") && err.contains("bfd, bfd_split"),
        "{err}"
    );
}

/// `attn_implementation = flash_attention_2` trains to the losses eager attention gives (on the
/// CPU the two differ only in summation order), packed rows included, and the setting is
/// stored with the run.
#[test]
fn flash_attention_trains_to_eager_losses_and_is_stored_with_the_run() {
    let t = setup("train-flash");
    let model = tiny_model(&t);
    let data = dataset(&t);
    let (m, d) = (model.to_str().unwrap(), data.to_str().unwrap());
    let train = |out: &Path, extra: &[&str]| {
        let mut extra = extra.to_vec();
        extra.extend(["--set", "max_steps=3", "--set", "eval_steps=0"]);
        let args = train_args(m, d, out.to_str().unwrap(), &extra);
        run_ok(&mut t.cmd(&args.iter().map(String::as_str).collect::<Vec<_>>()));
        losses(&read_json(&out.join("trainer_state.json")))
    };
    for packing in ["false", "true"] {
        let packing = format!("packing={packing}");
        let eager = train(
            &t.path().join(format!("eager-{packing}")),
            &["--set", &packing],
        );
        let flash_dir = t.path().join(format!("flash-{packing}"));
        let flash = train(
            &flash_dir,
            &[
                "--set",
                &packing,
                "--set",
                "attn_implementation=flash_attention_2",
            ],
        );
        assert_eq!(eager.len(), 3, "{eager:?}");
        for (a, b) in eager.iter().zip(&flash) {
            // Step, loss, gradient norm and learning rate.
            assert_eq!(a.0, b.0);
            assert!(
                (a.1 - b.1).abs() < 1e-4 && (a.2 - b.2).abs() < 1e-3 * a.2.max(1.0),
                "{packing}: eager {eager:?}, flash {flash:?}"
            );
        }
        let store = adapterlab::store::Store::open(&t.data_dir().join("store")).unwrap();
        let run = stored_run(&store, &flash_dir);
        let request: Value = store.request(&run.id).unwrap().unwrap();
        assert_eq!(
            request["attn_implementation"], "flash_attention_2",
            "{request}"
        );
    }
    let refused = t.path().join("refused");
    let args = train_args(
        m,
        d,
        refused.to_str().unwrap(),
        &["--set", "attn_implementation=flash"],
    );
    let err = run_fail(&mut t.cmd(&args.iter().map(String::as_str).collect::<Vec<_>>()));
    assert!(
        err.contains("attn_implementation") && err.contains("flash_attention_2"),
        "{err}"
    );
}

/// A speed switch set in the environment is stored with the run it ran (it changes rounding
/// only, but a curve is reproduced only with it), and so are the device and dtype it computed
/// in; a misspelt switch fails the run with the variable and its names, even on the CPU, where
/// the kernel it picks is never reached.
#[test]
fn speed_switches_and_compute_are_stored_with_the_run_and_a_misspelt_switch_fails_it() {
    let t = setup("train-switches");
    let model = tiny_model(&t);
    let data = dataset(&t);
    let (m, d) = (model.to_str().unwrap(), data.to_str().unwrap());
    let args = |out: &Path| {
        train_args(
            m,
            d,
            out.to_str().unwrap(),
            &["--set", "max_steps=1", "--set", "eval_steps=0"],
        )
    };
    let switched = t.path().join("switched");
    let a = args(&switched);
    run_ok(
        t.cmd(&a.iter().map(String::as_str).collect::<Vec<_>>())
            .env("ADAPTERLAB_LORA_TRAIN_KERNELS", "simt")
            .env("ADAPTERLAB_DECODE_ROPE", "split"),
    );
    let plain = t.path().join("plain");
    let a = args(&plain);
    run_ok(
        t.cmd(&a.iter().map(String::as_str).collect::<Vec<_>>())
            .env_remove("ADAPTERLAB_LORA_TRAIN_KERNELS"),
    );
    let misspelt = t.path().join("misspelt");
    let a = args(&misspelt);
    let err = run_fail(
        t.cmd(&a.iter().map(String::as_str).collect::<Vec<_>>())
            .env("ADAPTERLAB_LORA_TRAIN_KERNELS", "fast"),
    );
    assert!(
        err.contains(r#"ADAPTERLAB_LORA_TRAIN_KERNELS="fast": expected "mma" or "simt""#),
        "{err}"
    );

    let store = adapterlab::store::Store::open(&t.data_dir().join("store")).unwrap();
    let run = stored_run(&store, &switched);
    assert_eq!(
        run.metadata.get("speed_switches").map(String::as_str),
        Some("ADAPTERLAB_DECODE_ROPE=split ADAPTERLAB_LORA_TRAIN_KERNELS=simt"),
        "{:?}",
        run.metadata
    );
    assert!(
        !stored_run(&store, &plain)
            .metadata
            .contains_key("speed_switches")
    );
    // Where it computed, too: on the CPU f32, whatever bnb_4bit_compute_dtype says.
    assert_eq!(
        run.metadata.get("compute").map(String::as_str),
        Some("cpu f32"),
        "{:?}",
        run.metadata
    );
    let failed = stored_run(&store, &misspelt);
    assert_eq!(failed.status, adapterlab::store::RunStatus::Failed);
    assert!(
        failed
            .error
            .as_deref()
            .is_some_and(|e| e.contains("ADAPTERLAB_LORA_TRAIN_KERNELS")),
        "{failed:?}"
    );
}

/// The `checkpoint-N` steps in `out`, ascending.
fn checkpoint_steps(out: &Path) -> Vec<u64> {
    let mut steps: Vec<u64> = std::fs::read_dir(out)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().ok()?;
            name.strip_prefix("checkpoint-")?.parse().ok()
        })
        .collect();
    steps.sort();
    steps
}

#[test]
fn save_strategy_writes_checkpoints_by_steps_epochs_or_new_bests_or_never() {
    let t = setup("train-save-strategy");
    let model = tiny_model(&t);
    let data = dataset(&t);
    let (model, data) = (model.display().to_string(), data.display().to_string());
    let train = |name: &str, sets: &[&str]| -> PathBuf {
        let out = t.path().join(name);
        run_ok(&mut train_cmd(&t, &model, &data, &out, sets));
        out
    };
    // 24 rows, 4 a batch, 2 batches a step: 3 steps an epoch; 8 steps.
    let steps = train("steps", &["logging_steps=3", "logging_first_step=true"]);
    assert_eq!(checkpoint_steps(&steps), vec![4, 8]);
    // logging_first_step logs step 1 beside every logging_steps and the last.
    let logged: Vec<u64> = losses(&read_json(&steps.join("trainer_state.json")))
        .iter()
        .map(|l| l.0)
        .collect();
    assert_eq!(logged, vec![1, 3, 6, 8]);
    let epochs = train("epoch", &["save_strategy=epoch"]);
    assert_eq!(checkpoint_steps(&epochs), vec![3, 6]);
    let never = train("no", &["save_strategy=no"]);
    assert!(checkpoint_steps(&never).is_empty());
    assert!(never.join("adapter_model.safetensors").is_file());

    // `best`: a checkpoint after each evaluation that lowers eval_loss, none after the others.
    let best = train(
        "best",
        &[
            "save_strategy=best",
            "eval_steps=1",
            "learning_rate=0.05",
            "load_best_model_at_end=true",
        ],
    );
    let state = read_json(&best.join("trainer_state.json"));
    let evals: Vec<(u64, f64)> = state["log_history"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| Some((e["step"].as_u64()?, e.get("eval_loss")?.as_f64()?)))
        .collect();
    assert_eq!(evals.len(), 8, "{evals:?}");
    let mut lowest = f64::INFINITY;
    let mut bests = Vec::new();
    for &(step, loss) in &evals {
        if loss < lowest {
            lowest = loss;
            bests.push(step);
        }
    }
    assert_eq!(checkpoint_steps(&best), bests, "{evals:?}");
    let best_step = *bests.last().unwrap();
    assert_eq!(state["best_global_step"].as_u64(), Some(best_step));
    assert!(
        state["best_model_checkpoint"]
            .as_str()
            .unwrap()
            .ends_with(&format!("checkpoint-{best_step}"))
    );

    // The best evaluation must have a checkpoint: mismatched strategies are refused up front.
    let err = run_fail(&mut train_cmd(
        &t,
        &model,
        &data,
        &t.path().join("mismatch"),
        &["save_strategy=epoch", "load_best_model_at_end=true"],
    ));
    assert!(
        err.contains("load_best_model_at_end") && err.contains("save_strategy (epoch)"),
        "{err}"
    );
    let err = run_fail(&mut t.cmd(&["train", "--set", "save_strategy=sometimes"]));
    assert!(
        err.contains("`save_strategy`") && err.contains("steps, epoch, best, no"),
        "{err}"
    );
}

#[test]
fn a_text_dataset_trains_whole_with_dataset_text_field() {
    let t = setup("train-text-field");
    let model = tiny_model(&t).display().to_string();
    let dir = rows_dataset(
        &t,
        "text-ds",
        12,
        |i| serde_json::json!({"text": format!("### Dialogue: a{i} b{i}\n### Summary: a{i}")}),
    );
    let data = dir.display().to_string();
    let run = |name: &str, extra: &[&str]| {
        let out = t.path().join(name);
        let sets: Vec<&str> = ["max_steps=2", "eval_steps=2", "save_steps=2"]
            .iter()
            .chain(extra)
            .copied()
            .collect();
        (train_cmd(&t, &model, &data, &out, &sets), out)
    };
    let (mut cmd, out) = run("text", &["dataset_text_field=text"]);
    run_ok(&mut cmd);
    let state = read_json(&out.join("trainer_state.json"));
    assert_eq!(state["global_step"], 2);
    assert!(!losses(&state).is_empty());
    // TRL's eos_token: another token of the tokenizer ends the rows; a string that is not one
    // of its tokens is refused naming the key.
    let (mut cmd, _) = run("eos", &["dataset_text_field=text", "eos_token=<s>"]);
    run_ok(&mut cmd);
    let (mut cmd, _) = run("bad-eos", &["dataset_text_field=text", "eos_token=<end>"]);
    let err = run_fail(&mut cmd);
    assert!(err.contains("eos_token \"<end>\" is not a token"), "{err}");
    // Without the key the rows go to the formatter, which finds no dialogue in them.
    let (mut cmd, _) = run("no-field", &[]);
    let err = run_fail(&mut cmd);
    assert!(
        err.contains("row 1") && err.contains("dataset_text_field = \"text\""),
        "{err}"
    );
}

#[test]
fn conversational_rows_train_through_the_models_chat_template() {
    let t = setup("train-messages");
    let model = tiny_model(&t);
    let dir = rows_dataset(&t, "chat-ds", 12, |i| {
        serde_json::json!({"messages": [
            {"role": "user", "content": format!("echo a{i}")},
            {"role": "assistant", "content": format!("a{i}")},
        ]})
    });
    let (m, d) = (model.display().to_string(), dir.display().to_string());
    let sets = ["max_steps=2", "eval_steps=2", "save_steps=2"];
    // The fixture has no chat template: the rows are refused naming the row and the template.
    let err = run_fail(&mut train_cmd(&t, &m, &d, &t.path().join("none"), &sets));
    assert!(
        err.contains("row 1") && err.contains("chat template"),
        "{err}"
    );
    std::fs::write(
        model.join("tokenizer_config.json"),
        serde_json::json!({
            "eos_token": "</s>",
            "chat_template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}",
        })
        .to_string(),
    )
    .unwrap();
    let out = t.path().join("chat");
    run_ok(&mut train_cmd(&t, &m, &d, &out, &sets));
    let state = read_json(&out.join("trainer_state.json"));
    assert_eq!(state["global_step"], 2);
    assert!(!losses(&state).is_empty());
}
