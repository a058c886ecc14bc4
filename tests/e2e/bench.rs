//! `adapterlab bench train|generate` on the tiny random Falcon-7B-shaped golden fixture: the
//! commands the GPU comparison runs (scripts/bench/gpu_qlora.sh) work end to end on the CPU,
//! print their JSON lines, save an adapter that `bench generate` loads, and checkpointing does
//! not change the loss, nor does flash attention.

use std::path::Path;

use serde_json::Value;

use crate::util::{run_ok, setup};

fn lines(out: &str) -> Vec<Value> {
    out.lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

fn find<'a>(v: &'a [Value], what: &str) -> Vec<&'a Value> {
    v.iter().filter(|l| l["what"] == what).collect()
}

#[test]
fn bench_train_and_generate_run_and_agree_with_checkpointing() {
    let t = setup("bench");
    let model =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("model/tests/fixtures/golden/falcon_7b_style");
    let model = model.to_str().unwrap();
    let adapter = t.path().join("adapter");
    let train = |extra: &[&str]| {
        let mut args = vec![
            "bench", "train", "--model", model, "--batch", "2", "--seq", "12", "--steps", "2",
            "--warmup", "1",
        ];
        args.extend_from_slice(extra);
        lines(&run_ok(&mut t.cmd(&args)))
    };
    let plain = train(&["--save", adapter.to_str().unwrap()]);
    let load = find(&plain, "load")[0];
    assert!(load["trainable"].as_u64().unwrap() > 0, "{load}");
    assert!(load["speed_switches"].is_array(), "{load}");
    let steps = find(&plain, "step");
    assert_eq!(steps.len(), 3);
    let summary = find(&plain, "train_step")[0];
    assert_eq!(summary["batch"], 2);
    assert!(summary["tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(adapter.join("adapter_config.json").is_file());
    assert!(adapter.join("adapter_model.safetensors").is_file());

    // Recomputing each layer in backward trains the same way: same losses step by step.
    let ckpt = train(&["--gradient-checkpointing"]);
    for (a, b) in find(&plain, "step").iter().zip(find(&ckpt, "step")) {
        let (la, lb) = (a["loss"].as_f64().unwrap(), b["loss"].as_f64().unwrap());
        assert!((la - lb).abs() < 1e-3, "plain {a} vs checkpointed {b}");
    }

    // Flash attention trains the same way too, and says so.
    let flash = train(&["--attn-implementation", "flash_attention_2"]);
    assert_eq!(
        find(&flash, "load")[0]["attn_implementation"],
        "flash_attention_2"
    );
    assert_eq!(load["attn_implementation"], "eager");
    for (a, b) in find(&plain, "step").iter().zip(find(&flash, "step")) {
        let (la, lb) = (a["loss"].as_f64().unwrap(), b["loss"].as_f64().unwrap());
        assert!((la - lb).abs() < 1e-3, "eager {a} vs flash {b}");
    }

    // Variable lengths, padded and packed: both report useful (non-pad) and padded tokens/s;
    // packing leaves less padding.
    let padded = train(&["--lengths", "2..10"]);
    let packed = train(&["--lengths", "2..10", "--packing"]);
    let (a, b) = (
        find(&padded, "train_step")[0],
        find(&packed, "train_step")[0],
    );
    for s in [a, b] {
        assert!(s["useful_tokens_per_s"].as_f64().unwrap() > 0.0, "{s}");
        assert!(
            s["padded_tokens_per_s"].as_f64().unwrap()
                >= s["useful_tokens_per_s"].as_f64().unwrap(),
            "{s}"
        );
    }
    assert_eq!(
        (a["packing"].clone(), b["packing"].clone()),
        (false.into(), true.into())
    );
    assert_eq!(b["lengths"], "2..10");
    // The trainer's length-grouped order, the padded baseline's best case, pads less too.
    let grouped = train(&["--lengths", "2..10", "--group-by-length"]);
    let g = find(&grouped, "train_step")[0];
    assert_eq!(g["group_by_length"], true);
    assert!(
        g["pad_fraction"].as_f64().unwrap() <= a["pad_fraction"].as_f64().unwrap(),
        "random order {a} vs grouped {g}"
    );
    assert!(
        b["pad_fraction"].as_f64().unwrap() < a["pad_fraction"].as_f64().unwrap(),
        "padded {a} vs packed {b}"
    );

    let generated = lines(&run_ok(&mut t.cmd(&[
        "bench",
        "generate",
        "--model",
        model,
        "--adapter",
        adapter.to_str().unwrap(),
        "--merged",
        "--batch",
        "1,2",
        "--prompt-tokens",
        "5",
        "--new-tokens",
        "3",
    ])));
    // The decoding switches in force come with the figures (on the CPU, the attention's only).
    let decoding = &find(&generated, "load")[0]["decoding"];
    assert_eq!(
        decoding["ADAPTERLAB_DECODE_ATTENTION"], "fused",
        "{decoding}"
    );
    let runs = find(&generated, "generate");
    assert_eq!(runs.len(), 4, "{generated:?}");
    for r in runs {
        assert!(r["tokens_per_s"].as_f64().unwrap() > 0.0, "{r}");
    }
    let flash = lines(&run_ok(&mut t.cmd(&[
        "bench",
        "generate",
        "--model",
        model,
        "--batch",
        "2",
        "--prompt-tokens",
        "5",
        "--new-tokens",
        "3",
        "--attn-implementation",
        "flash_attention_2",
    ])));
    assert_eq!(
        find(&flash, "load")[0]["attn_implementation"],
        "flash_attention_2"
    );
    assert_eq!(find(&flash, "generate").len(), 1, "{flash:?}");
    let refused = crate::util::run_fail(&mut t.cmd(&[
        "bench",
        "generate",
        "--model",
        model,
        "--attn-implementation",
        "flash",
    ]));
    assert!(refused.contains("flash_attention_2"), "{refused}");
}

/// `bench kernels` on the CPU: a header line, then dequantize + matmul timed for every shape and
/// row count asked (the GPU kernels need a CUDA device), each line with the copies of the weight
/// its calls cycled through, and a malformed shape refused by name.
#[test]
fn bench_kernels_times_each_product_and_refuses_a_bad_shape() {
    let t = setup("bench-kernels");
    let out = lines(&run_ok(&mut t.cmd(&[
        "bench",
        "kernels",
        "--shapes",
        "64x128,32x96",
        "--rows",
        "1,3",
        "--repeats",
        "2",
    ])));
    let header = find(&out, "kernels");
    assert_eq!(header.len(), 1, "{out:?}");
    assert_eq!(header[0]["nf4"]["double_quant"], true);
    let timed = find(&out, "kernel");
    assert_eq!(timed.len(), 4, "{out:?}");
    for (line, (shape, rows)) in
        timed
            .iter()
            .zip([([64, 128], 1), ([64, 128], 3), ([32, 96], 1), ([32, 96], 3)])
    {
        assert_eq!(line["kernel"], "dequantize", "{line}");
        assert_eq!(line["shape"], serde_json::json!(shape), "{line}");
        assert_eq!(line["rows"], rows, "{line}");
        assert!(line["us"].as_f64().unwrap() > 0.0, "{line}");
        // 256 MiB of codes by default: more copies than the cap for weights this small.
        assert_eq!(line["weight_copies"], 256, "{line}");
    }
    // One copy asked for: every call on the same weight.
    let one = lines(&run_ok(&mut t.cmd(&[
        "bench",
        "kernels",
        "--shapes",
        "64x128",
        "--rows",
        "1",
        "--repeats",
        "2",
        "--weight-bytes",
        "0",
    ])));
    assert_eq!(find(&one, "kernel")[0]["weight_copies"], 1, "{one:?}");
    let err = crate::util::run_fail(&mut t.cmd(&["bench", "kernels", "--shapes", "64y128"]));
    assert!(err.contains("\"64y128\" is not OUTxIN"), "{err}");
}

/// `bench attention` on the CPU: a header with the shape, then each implementation asked timed
/// forward and forward + backward; a head count the KV heads do not divide and an unknown
/// implementation refused by name.
#[test]
fn bench_attention_times_each_implementation_and_refuses_bad_shapes() {
    let t = setup("bench-attention");
    let out = lines(&run_ok(&mut t.cmd(&[
        "bench",
        "attention",
        "--batch",
        "2",
        "--seq",
        "40",
        "--heads",
        "4",
        "--kv-heads",
        "2",
        "--head-dim",
        "8",
        "--repeats",
        "1",
    ])));
    let header = find(&out, "attention");
    assert_eq!(header.len(), 1, "{out:?}");
    assert_eq!(header[0]["kv_heads"], 2);
    let timed = find(&out, "attention_pass");
    let got: Vec<(&str, &str)> = timed
        .iter()
        .map(|l| {
            assert!(l["us"].as_f64().unwrap() > 0.0, "{l}");
            (
                l["attn_implementation"].as_str().unwrap(),
                l["pass"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("eager", "forward"),
            ("eager", "forward+backward"),
            ("flash_attention_2", "forward"),
            ("flash_attention_2", "forward+backward"),
        ]
    );
    for (args, want) in [
        (
            &["--heads", "6", "--kv-heads", "4"][..],
            "--heads 6 is not a multiple of --kv-heads 4",
        ),
        (&["--attn-implementation", "flash"][..], "flash_attention_2"),
    ] {
        let err = crate::util::run_fail(t.cmd(&["bench", "attention", "--seq", "8"]).args(args));
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

/// `bench lora` on the CPU: a header with the rows and rank, then each shape's training node
/// timed forward and forward + backward (the kernels alone only on a GPU); a dropout outside
/// [0, 1) and a malformed shape refused by name.
#[test]
fn bench_lora_times_the_training_node_at_each_shape() {
    let t = setup("bench-lora");
    let args = [
        "bench",
        "lora",
        "--rows",
        "6",
        "--shapes",
        "16x32,24x64",
        "--rank",
        "4",
        "--repeats",
        "1",
    ];
    let out = lines(&run_ok(
        t.cmd(&args).env("ADAPTERLAB_LORA_TRAIN_KERNELS", "simt"),
    ));
    let header = find(&out, "lora");
    assert_eq!(header.len(), 1, "{out:?}");
    // The speed switches set are in the header with the figures; a misspelt one is refused.
    assert_eq!(
        header[0]["speed_switches"],
        serde_json::json!(["ADAPTERLAB_LORA_TRAIN_KERNELS=simt"])
    );
    let err = crate::util::run_fail(t.cmd(&args).env("ADAPTERLAB_LORA_TRAIN_KERNELS", "fast"));
    assert!(err.contains("ADAPTERLAB_LORA_TRAIN_KERNELS"), "{err}");
    assert_eq!(
        (header[0]["rows"].as_u64(), header[0]["rank"].as_u64()),
        (Some(6), Some(4))
    );
    assert_eq!(header[0]["dropout"], 0.1);
    let got: Vec<(String, &str)> = find(&out, "lora_pass")
        .iter()
        .map(|l| {
            assert!(l["us"].as_f64().unwrap() > 0.0, "{l}");
            (l["shape"].to_string(), l["pass"].as_str().unwrap())
        })
        .collect();
    let want: Vec<(String, &str)> = [
        ("[16,32]", "forward"),
        ("[16,32]", "forward+backward"),
        ("[24,64]", "forward"),
        ("[24,64]", "forward+backward"),
    ]
    .into_iter()
    .map(|(s, p)| (s.to_string(), p))
    .collect();
    assert_eq!(got, want);
    for (args, want) in [
        (&["--dropout", "1.5"][..], "--dropout 1.5 is not in [0, 1)"),
        (&["--shapes", "16by32"][..], "is not OUTxIN"),
    ] {
        let err = crate::util::run_fail(t.cmd(&["bench", "lora", "--rows", "2"]).args(args));
        assert!(err.contains(want), "{args:?}: {err}");
    }
}
