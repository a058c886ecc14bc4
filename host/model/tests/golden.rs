//! Parity with transformers on the golden fixtures that `tests/fixtures/make_golden.py` wrote
//! (small random Falcon and Llama checkpoints, fp32): last-position logits within 1e-4, the same
//! greedy tokens with and without repetition penalty, alone and as left-padded batches, the
//! same per-row EOS stopping, and the same cross-entropy within 1e-4; all of it also with a random
//! PEFT adapter on top, applied unmerged and merged into the base weights; and every case again
//! with flash attention.

use std::path::{Path, PathBuf};

use adapterlab_model::CausalLm;
use adapterlab_model::engine::generate::{GenerationConfig, generate_ids};
use adapterlab_model::engine::loss::{Example, loss_on_examples};
use adapterlab_model::lora::peft::load_adapter;
use adapterlab_model::models::load::{LoadOptions, LoadedModel, load};
use adapterlab_model::nn::linear::LinearBuilder;
use adapterlab_model::ops::attention::AttentionKernel;
use candle_core::{Device, Tensor};
use serde_json::Value;

const TOL: f32 = 1e-4;

/// The fixtures; `ADAPTERLAB_GOLDEN_DIR` points elsewhere when the test binary runs on another
/// machine (the lent GPU) than the one that built it.
fn golden_dir() -> PathBuf {
    match std::env::var_os("ADAPTERLAB_GOLDEN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden"),
    }
}

/// The models these tests check. A fixture made with transformers' eager attention for the ALiBi
/// model is left to `falcon::tests::alibi_path_matches_transformers_eager_fixture` (eager adds
/// ALiBi twice; this crate, like the default SDPA path, once).
fn models() -> Vec<(String, PathBuf, Value)> {
    let mut out = Vec::new();
    let dir = golden_dir();
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{} is missing ({e}); run make_golden.py", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("expected.json").is_file())
        .collect();
    entries.sort();
    for p in entries {
        let expected: Value =
            serde_json::from_str(&std::fs::read_to_string(p.join("expected.json")).unwrap())
                .unwrap();
        out.push((
            p.file_name().unwrap().to_string_lossy().into_owned(),
            p,
            expected,
        ));
    }
    assert!(
        out.len() >= 5,
        "expected at least 5 golden models in {}",
        dir.display()
    );
    out.retain(|(name, _, e)| !(name == "falcon_rw_alibi" && e["attn_implementation"] == "eager"));
    out
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// Any tensor's values as f32 on the host, flattened.
fn host_f32s(t: &Tensor) -> Vec<f32> {
    t.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// [`host_f32s`] as bits, for tests that hold a kernel to another path bit for bit.
fn host_bits(t: &Tensor) -> Vec<u32> {
    host_f32s(t).iter().map(|v| v.to_bits()).collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// [`max_diff`] relative to the largest magnitude in `want`.
fn relative_diff(want: &[f32], got: &[f32]) -> f32 {
    let scale = want.iter().fold(1e-6f32, |a, v| a.max(v.abs()));
    max_diff(want, got) / scale
}

/// The device under test: the CPU, or the GPU with `ADAPTERLAB_TEST_DEVICE=cuda` in a build
/// with `--features cuda` (scripts/gpu/golden.sh runs them so on the lent machine).
fn device() -> Device {
    match std::env::var("ADAPTERLAB_TEST_DEVICE").as_deref() {
        Ok("cuda") => {
            Device::new_cuda(0).expect("ADAPTERLAB_TEST_DEVICE=cuda needs a CUDA build and a GPU")
        }
        _ => Device::Cpu,
    }
}

/// The GPU a GPU test runs on; `None`, said on stderr, where ADAPTERLAB_TEST_DEVICE is not cuda
/// (the test then passes having checked nothing, as CI's CPU run does).
fn gpu_device() -> Option<Device> {
    let dev = device();
    if dev.is_cpu() {
        eprintln!("skipped: a GPU test, and ADAPTERLAB_TEST_DEVICE is not cuda");
        return None;
    }
    Some(dev)
}

fn load_with(dir: &Path, builder: LinearBuilder) -> LoadedModel {
    load(
        dir.to_str().unwrap(),
        &LoadOptions {
            device: device(),
            builder,
            ..LoadOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("loading {}: {e:#}", dir.display()))
}

/// One model to hold against transformers: a golden checkpoint as is, or with its golden PEFT
/// adapter (`expected.json`'s `adapter` section) unmerged or merged into the base weights.
struct Case {
    name: String,
    model: LoadedModel,
    /// Holds `logits`, `generate` and `loss` as make_golden.py wrote them for this case.
    want: Value,
    prompts: Vec<Vec<u32>>,
    pad: u32,
    max_new: usize,
}

/// Every case of every golden model (the bf16 copies have only their `single_last` logits and
/// are checked by `bf16_checkpoints_widen_to_the_f32_logits`).
fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    for (name, dir, exp) in models() {
        if name.ends_with("_bf16") {
            continue;
        }
        let prompts: Vec<Vec<u32>> = exp["prompts"]
            .as_array()
            .unwrap()
            .iter()
            .map(u32s)
            .collect();
        let pad = exp["pad_token_id"].as_u64().unwrap() as u32;
        let max_new = exp["max_new_tokens"].as_u64().unwrap() as usize;
        let case = |name: String, model, want: &Value| Case {
            name,
            model,
            want: want.clone(),
            prompts: prompts.clone(),
            pad,
            max_new,
        };
        out.push(case(
            name.clone(),
            load_with(&dir, LinearBuilder::dense()),
            &exp,
        ));
        let Some(adapter) = exp.get("adapter") else {
            continue;
        };
        let adir = dir.join(adapter["dir"].as_str().unwrap());
        for merged in [false, true] {
            let registry = load_adapter(&adir)
                .and_then(|a| a.into_registry())
                .unwrap_or_else(|e| panic!("{}: {e}", adir.display()));
            let model = load_with(
                &dir,
                LinearBuilder::dense().with_lora_registry(registry.clone()),
            );
            registry.finish().unwrap();
            if merged {
                registry.merge_all().unwrap();
            }
            let label = if merged { "adapter merged" } else { "adapter" };
            out.push(case(format!("{name} + {label}"), model, adapter));
        }
    }
    // Each again with flash attention, held to the same numbers.
    let flash: Vec<Case> = out
        .iter()
        .map(|c| {
            let mut model = c.model.clone();
            model.model.set_attention(AttentionKernel::Flash).unwrap();
            Case {
                name: format!("{} [flash attention]", c.name),
                model,
                want: c.want.clone(),
                prompts: c.prompts.clone(),
                pad: c.pad,
                max_new: c.max_new,
            }
        })
        .collect();
    out.extend(flash);
    out
}

fn last_logits(m: &dyn CausalLm, ids: &[Vec<u32>], mask: Option<&[Vec<u32>]>) -> Vec<Vec<f32>> {
    let (b, s) = (ids.len(), ids[0].len());
    let t = Tensor::from_vec(ids.concat(), (b, s), &device()).unwrap();
    let mask = mask.map(|m| Tensor::from_vec(m.concat(), (b, s), &device()).unwrap());
    m.forward_last(&t, mask.as_ref(), None)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap()
}

#[test]
fn bf16_checkpoints_widen_to_the_f32_logits() {
    for (name, dir, exp) in models() {
        if !name.ends_with("_bf16") {
            continue;
        }
        let m = load_with(&dir, LinearBuilder::dense());
        // The first fixture run computed the bf16 copy's expectations with `.float()` on the
        // bf16 model, which also rounds the rotary inv_freq buffer to bf16 (about 4e-3 on these
        // logits); the second run reloads the checkpoint in f32 and is held to the full
        // tolerance. The second run is the one with `llama_untied_bias`.
        let second_run = golden_dir().join("llama_untied_bias").is_dir();
        let tol = if second_run { TOL } else { 1e-2 };
        for (i, p) in exp["prompts"].as_array().unwrap().iter().enumerate() {
            let got = &last_logits(&m.model, &[u32s(p)], None)[0];
            let d = max_diff(got, &f32s(&exp["single_last"][i]));
            assert!(d < tol, "{name}: prompt {i}: logits differ by {d}");
        }
    }
}

#[test]
fn logits_match_transformers() {
    let all = cases();
    assert!(
        all.iter().any(|c| c.name.ends_with("+ adapter")),
        "no golden adapter: fixtures older than make_golden.py v3"
    );
    for c in all {
        let (name, m, l) = (&c.name, &c.model.model, &c.want["logits"]);
        for (i, p) in c.prompts.iter().enumerate() {
            let got = &last_logits(m, std::slice::from_ref(p), None)[0];
            let d = max_diff(got, &f32s(&l["single_last"][i]));
            assert!(d < TOL, "{name}: prompt {i} alone: logits differ by {d}");
        }
        let ids: Vec<Vec<u32>> = l["batch_input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(u32s)
            .collect();
        let mask: Vec<Vec<u32>> = l["batch_attention_mask"]
            .as_array()
            .unwrap()
            .iter()
            .map(u32s)
            .collect();
        let got = last_logits(m, &ids, Some(&mask));
        for (i, row) in got.iter().enumerate() {
            let d = max_diff(row, &f32s(&l["batch_last"][i]));
            assert!(
                d < TOL,
                "{name}: left-padded batch row {i}: logits differ by {d}"
            );
        }
        let p0 = Tensor::new(c.prompts[0].as_slice(), &device())
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let all = m
            .forward(&p0, None, None)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (t, row) in all.iter().enumerate() {
            let d = max_diff(row, &f32s(&l["prompt0_all"][t]));
            assert!(
                d < TOL,
                "{name}: prompt 0 position {t}: logits differ by {d}"
            );
        }
    }
}

/// HF's new tokens of a row, cut after the EOS (HF pads finished rows).
fn hf_row(v: &Value, eos: u32) -> Vec<u32> {
    let row = u32s(v);
    match row.iter().position(|t| *t == eos) {
        Some(i) => row[..=i].to_vec(),
        None => row,
    }
}

fn check_generation(name: &str, case: &str, got: &[u32], want: &[u32], gaps: &Value) {
    if got == want {
        return;
    }
    let step = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    let gap = gaps.get(step).and_then(Value::as_f64);
    panic!(
        "{name} {case}: tokens differ at step {step} (HF's top-2 gap there: {gap:?})\n ours: {got:?}\n HF:   {want:?}"
    );
}

#[test]
fn greedy_generation_matches_transformers() {
    for c in cases() {
        let m = &c.model.model;
        for (case, g) in c.want["generate"].as_object().unwrap() {
            let eos = g["eos_token_id"].as_u64().unwrap() as u32;
            let cfg = GenerationConfig {
                repetition_penalty: g["repetition_penalty"].as_f64().unwrap() as f32,
                ..GenerationConfig::greedy(c.max_new, vec![eos], c.pad)
            };
            if case.ends_with("_single") {
                for (i, p) in c.prompts.iter().enumerate() {
                    let got = generate_ids(m, std::slice::from_ref(p), &cfg)
                        .unwrap()
                        .tokens
                        .remove(0);
                    check_generation(
                        &c.name,
                        &format!("{case} prompt {i}"),
                        &got,
                        &hf_row(&g["new_tokens"][i], eos),
                        &g["top2_gap"][i],
                    );
                }
            } else {
                let got = generate_ids(m, &c.prompts, &cfg).unwrap();
                for (i, row) in got.tokens.iter().enumerate() {
                    check_generation(
                        &c.name,
                        &format!("{case} row {i}"),
                        row,
                        &hf_row(&g["new_tokens"][i], eos),
                        &g["top2_gap"][i],
                    );
                }
            }
        }
    }
}

#[test]
fn loss_matches_transformers() {
    for c in cases() {
        let (name, l) = (&c.name, &c.want["loss"]);
        let (prompt, completion) = (u32s(&l["prompt"]), u32s(&l["completion"]));
        let ids: Vec<u32> = prompt.iter().chain(&completion).copied().collect();
        let only = Example {
            input_ids: ids.clone(),
            targets: (0..ids.len()).map(|t| t >= prompt.len()).collect(),
        };
        let all = Example {
            input_ids: ids.clone(),
            targets: (0..ids.len()).map(|t| t > 0).collect(),
        };
        for (ex, loss_key, n_key) in [
            (only, "loss_completion_only", "tokens_completion_only"),
            (all, "loss_all", "tokens_all"),
        ] {
            let got = loss_on_examples(&c.model.model, &[ex], 1).unwrap();
            let want = l[loss_key].as_f64().unwrap();
            assert_eq!(
                got.tokens as u64,
                l[n_key].as_u64().unwrap(),
                "{name} {n_key}"
            );
            assert!(
                (got.loss - want).abs() < TOL as f64,
                "{name} {loss_key}: {} vs HF {want}",
                got.loss
            );
        }
    }
}

/// Every CUDA kernel module compiles with NVRTC. It needs no GPU, so a CUDA build runs it on the
/// build machine (`scripts/gpu/build-carry.sh` does) before a device call finds a broken source.
#[cfg(feature = "cuda")]
#[test]
fn cuda_kernels_compile() {
    let names = adapterlab_model::engine::device::compile_kernels().unwrap();
    eprintln!("compiled {} modules: {}", names.len(), names.join(", "));
}

/// How many of two equally long runs of values differ in their bits.
fn differing_bits(a: &[f32], b: &[f32]) -> usize {
    a.iter()
        .zip(b)
        .filter(|(x, y)| x.to_bits() != y.to_bits())
        .count()
}

/// The NF4 CUDA kernels against the CPU path: dequantization bit for bit (bf16, f16, f32; with
/// and without double quantization; shapes that do and do not fill whole 4-byte words), and the
/// decoding GEMV and the small-batch GEMM (up to 32 rows) within 16-bit rounding of a matmul on
/// the dequantized weight. CPU: nothing to do.
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "a GPU test: needs --features cuda and ADAPTERLAB_TEST_DEVICE=cuda on a GPU"
)]
#[test]
fn nf4_kernels_equal_the_cpu_path() {
    use adapterlab_model::quant::nf4::Nf4Options;
    use adapterlab_model::quant::weight::{BaseWeight, Nf4Weight};
    use candle_core::DType;
    let Some(dev) = gpu_device() else { return };
    let cpu = Device::Cpu;
    let f32s_of = host_f32s;
    // Rows of 320, 1024 and 4544 columns (Falcon-7B's hidden size) take the 16-byte-load GEMV;
    // 4544 has more 16-byte words (142) than a warp's first round of loads covers (128).
    for (rows, cols, double_quant) in [
        (96, 200, true),
        (33, 70, true),
        (64, 136, false),
        (5, 9, true),
        (70, 320, true),
        (9, 1024, false),
        (20, 4544, true),
    ] {
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| (i as f32 * 0.731).sin() * 0.05)
            .collect();
        let w = Tensor::from_vec(w, (rows, cols), &cpu).unwrap();
        let opts = Nf4Options {
            double_quant,
            ..Nf4Options::default()
        };
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let case = format!("{rows}x{cols} double_quant={double_quant} {dtype:?}");
            let q = Nf4Weight::quantize(&w, opts, dtype, &dev).unwrap();
            let on_gpu = q.dequantize_to(dtype, &dev).unwrap();
            assert!(on_gpu.device().is_cuda(), "{case}");
            let (g, c) = (
                f32s_of(&on_gpu),
                f32s_of(&q.dequantize_to(dtype, &cpu).unwrap()),
            );
            let bad = differing_bits(&g, &c);
            assert_eq!(
                bad, 0,
                "{case}: {bad} dequantized values differ from the CPU path"
            );
            if dtype == DType::F32 {
                continue;
            }
            let wd = q.dequantize_to(DType::F32, &cpu).unwrap();
            // `forward` as a model calls it, and straight from the 4-bit data with each decoding
            // kernel, on every row count it serves.
            let mut runs: Vec<(usize, Option<Kernel>)> = [1, 3, 16, 20].map(|m| (m, None)).to_vec();
            for kernel in decode_kernels() {
                for m in [1, 3, 8, 9, 16, 31, 32] {
                    if kernel_serves(kernel, m, cols, rows, &q) {
                        runs.push((m, Some(kernel)));
                    }
                }
            }
            for (m, from_nf4) in runs {
                let x: Vec<f32> = (0..m * cols).map(|i| (i as f32 * 0.173).cos()).collect();
                let x = Tensor::from_vec(x, (m, cols), &cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let want = x
                    .to_dtype(DType::F32)
                    .unwrap()
                    .matmul(&wd.t().unwrap())
                    .unwrap();
                let x = x.to_device(&dev).unwrap();
                let got = match from_nf4 {
                    Some(kernel) => from_nf4_data(&q, &x, kernel),
                    None => q.forward(&x).unwrap(),
                };
                let case = format!("{case} m={m} kernel={from_nf4:?}");
                assert_eq!(got.dims(), &[m, rows], "{case}");
                let (got, want) = (f32s_of(&got), f32s_of(&want));
                let scale = want.iter().fold(0f32, |a, v| a.max(v.abs())).max(1e-3);
                let err = max_diff(&got, &want) / scale;
                assert!(err < 1e-2, "{case}: relative error {err}");
            }
        }
    }
}

/// Every tiling of the tensor-core kernel (`MmaTiling::ALL`) against the CPU path (the weights
/// rounded to the 16-bit type, as the kernel multiplies them), and tilings with the same warps
/// and form bit-equal (a feature's sum must not depend on `unroll` or `tiles`), on feature
/// counts that leave a block's last tiles empty (40 of 32 or 16 a block), a last chunk of columns
/// that is partly past k (320), both halves of the A operand (up to 8 rows, and more), and the
/// swapped form (W as the A operand, up to 8 rows) refusing more rows. The `pairs` form (one
/// row's weights as bitsandbytes' batch-1 GEMV forms them) against the CPU path with those
/// weights (`dequantize_gemv4bit`). Rows of x that are one 1.0 each (a product is then one
/// weight, exactly) show each form's weights bit for bit: the dequantized ones, or the pairs
/// form's. One shape has more groups of 16 features than the pairs form keeps blocks resident,
/// and one enough columns that one row's pairs form splits k (`quant::kernels::pairs_slices`).
#[cfg(feature = "cuda")]
#[test]
fn nf4_mma_tilings_equal_the_cpu_path() {
    use adapterlab_model::quant::kernels::MmaTiling;
    use adapterlab_model::quant::nf4::Nf4Options;
    use adapterlab_model::quant::weight::Nf4Weight;
    use candle_core::DType;
    let Some(dev) = gpu_device() else { return };
    let cpu = Device::Cpu;
    // 16,000 features are 1,000 groups of 16: more than the pairs form's resident blocks on any
    // card (3 a multiprocessor), so its blocks loop over groups. 18,176 columns (Falcon-7B's down
    // projection's) are 142 chunks of 128: one row's pairs form splits them into 4 slices.
    for (rows, cols, double_quant) in [
        (40, 320, true),
        (96, 4544, true),
        (64, 1024, false),
        (16_000, 320, true),
        (40, 18_176, true),
    ] {
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| (i as f32 * 0.377).sin() * 0.05)
            .collect();
        let w = Tensor::from_vec(w, (rows, cols), &cpu).unwrap();
        let opts = Nf4Options {
            double_quant,
            ..Nf4Options::default()
        };
        for dtype in [DType::BF16, DType::F16] {
            let q = Nf4Weight::quantize(&w, opts, dtype, &dev).unwrap();
            // The kernel rounds each weight to the 16-bit type, as dequantizing for cuBLAS does;
            // against unrounded weights, sums that cancel would show that rounding (3% on one
            // of these, 2026-12-06).
            let wd = q
                .dequantize_to(dtype, &cpu)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let wg = q
                .nf4()
                .dequantize_gemv4bit(dtype)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            for m in [1, 5, 9, 16] {
                let x: Vec<f32> = (0..m * cols).map(|i| (i as f32 * 0.291).cos()).collect();
                let x = Tensor::from_vec(x, (m, cols), &cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let want = f32s_of_matmul(&x, &wd);
                let want_gemv4bit = f32s_of_matmul(&x, &wg);
                let scale = want.iter().fold(0f32, |a, v| a.max(v.abs())).max(1e-3);
                // The two ways of forming the weights differ somewhere (else the bit-for-bit
                // checks below could not tell them apart).
                assert!(
                    host_f32s(&wd) != host_f32s(&wg),
                    "{dtype:?}: the dequantized and gemv4bit weights agree everywhere"
                );
                let x = x.to_device(&dev).unwrap();
                let mut by_warps: Vec<((u32, bool, bool), Vec<u32>)> = Vec::new();
                for tiling in MmaTiling::ALL {
                    if !tiling.serves_rows(m) {
                        assert!(q.forward_mma_tiled(&x, tiling).is_err(), "{m} rows");
                        continue;
                    }
                    let case = format!(
                        "{rows}x{cols} double_quant={double_quant} {dtype:?} m={m} {}",
                        tiling.name()
                    );
                    let got = q.forward_mma_tiled(&x, tiling).unwrap();
                    assert_eq!(got.dims(), &[m, rows], "{case}");
                    let got = host_f32s(&got);
                    let mine = match tiling.pairs {
                        true => &want_gemv4bit,
                        false => &want,
                    };
                    let err = max_diff(&got, mine) / scale;
                    assert!(err < 1e-2, "{case}: relative error {err}");
                    // Row r picks column (r * 37 + 101 s + 5) mod cols, that column of W
                    // exactly, for 4 values of s; among the weights picked some differ between
                    // the two ways of forming them, so the check tells the forms apart.
                    let (weights, others) = if tiling.pairs { (&wg, &wd) } else { (&wd, &wg) };
                    let mut told_apart = false;
                    for seed in 0..4 {
                        let one_hot: Vec<f32> = (0..m * cols)
                            .map(|i| {
                                f32::from(i % cols == ((i / cols) * 37 + 101 * seed + 5) % cols)
                            })
                            .collect();
                        let e = Tensor::from_vec(one_hot, (m, cols), &cpu)
                            .unwrap()
                            .to_dtype(dtype)
                            .unwrap();
                        let picked = host_f32s(
                            &q.forward_mma_tiled(&e.to_device(&dev).unwrap(), tiling)
                                .unwrap(),
                        );
                        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
                        let expect = bits(&f32s_of_matmul(&e, weights));
                        assert!(
                            bits(&picked) == expect,
                            "{case}: one-hot rows (s = {seed}) do not give its weights bit for bit"
                        );
                        told_apart |= bits(&f32s_of_matmul(&e, others)) != expect;
                    }
                    assert!(
                        told_apart,
                        "{case}: no picked weight differs between the two ways"
                    );
                    let bits: Vec<u32> = got.iter().map(|v| v.to_bits()).collect();
                    let form = (tiling.warps, tiling.swapped, tiling.pairs);
                    match by_warps.iter().find(|(w, _)| *w == form) {
                        Some((_, earlier)) => assert!(
                            *earlier == bits,
                            "{case}: differs from another tiling of {} warps",
                            tiling.warps
                        ),
                        None => {
                            // Whether the swapped form (W as the A operand) sums to the bits
                            // of the other: the same products in the same k slots, but the
                            // mma's operands exchanged; reported, not required.
                            if let Some((_, other)) = by_warps
                                .iter()
                                .find(|(w, _)| *w == (form.0, !form.1, false))
                            {
                                let same = other.iter().zip(&bits).filter(|(a, b)| a == b).count();
                                eprintln!(
                                    "{case}: {same} of {} outputs bit-equal to the other form of {} warps",
                                    bits.len(),
                                    form.0
                                );
                            }
                            by_warps.push((form, bits));
                        }
                    }
                }
            }
        }
    }
}

/// `x W^T` in f32 on the CPU, flat.
#[cfg(feature = "cuda")]
fn f32s_of_matmul(x: &Tensor, w: &Tensor) -> Vec<f32> {
    use candle_core::DType;
    host_f32s(
        &x.to_dtype(DType::F32)
            .unwrap()
            .matmul(&w.t().unwrap())
            .unwrap(),
    )
}

/// Falcon's op-by-op head split of a fused query_key_value output `[b, s, groups of (q_per_kv
/// queries, a key, a value) heads]`: q `[b, kv_heads * q_per_kv, s, d]`, k and v `[b, kv_heads,
/// s, d]`, contiguous, q and k rotated by candle's `rope` where `rope` is given: what the fused
/// head-split kernels replace.
#[cfg(feature = "cuda")]
fn op_by_op_heads(
    fused: &Tensor,
    (kv_heads, q_per_kv, head_dim): (usize, usize, usize),
    rope: Option<(&Tensor, &Tensor)>,
) -> (Tensor, Tensor, Tensor) {
    use adapterlab_model::ops::attention::Rotary;
    let (b, s, _) = fused.dims3().unwrap();
    let x = fused
        .reshape((b, s, kv_heads, q_per_kv + 2, head_dim))
        .unwrap();
    let piece = |start: usize, n: usize| {
        x.narrow(3, start, n)
            .unwrap()
            .reshape((b, s, kv_heads * n, head_dim))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
    };
    let (q, k, v) = (
        piece(0, q_per_kv),
        piece(q_per_kv, 1),
        piece(q_per_kv + 1, 1),
    );
    match rope {
        Some((cos, sin)) => (
            Rotary::apply(&q, cos, sin).unwrap(),
            Rotary::apply(&k, cos, sin).unwrap(),
            v,
        ),
        None => (q, k, v),
    }
}

/// Decoding's fused head split (`ops::rope_append`, one kernel) against the op-by-op path it
/// replaces (the head split, candle's `rope` for q and k, two cache writes), bit for bit: q, and
/// every key and value the cache returns, over three steps that append to the cache and grow it,
/// for Falcon's three layouts (multi-query, grouped, one KV head a query head), with and
/// without rotation, bf16 and f16, one row and several, one token and several.
#[cfg(feature = "cuda")]
#[test]
fn rope_append_kernel_equals_the_op_by_op_path() {
    use adapterlab_model::ops::attention::KvCache;
    use adapterlab_model::ops::rope_append::{QkvGroups, split_rotate_append};
    use candle_core::DType;
    let Some(dev) = gpu_device() else { return };
    let mut cases = 0;
    for (kv_heads, q_per_kv, head_dim) in [(1, 5, 64), (2, 3, 16), (3, 1, 8)] {
        let groups = QkvGroups {
            kv_heads,
            q_per_kv,
            head_dim,
        };
        for dtype in [DType::BF16, DType::F16] {
            for (b, steps) in [(1, [4, 1, 1]), (3, [2, 1, 3])] {
                for rotate in [true, false] {
                    let case = format!(
                        "{kv_heads} groups of {q_per_kv} heads of {head_dim}, {dtype:?}, {b} rows, rope {rotate}"
                    );
                    // Room for one token more than the first step, so the third grows the cache.
                    let (mut fused_cache, mut plain_cache) =
                        (KvCache::new(1).with_room(1), KvCache::new(1).with_room(1));
                    for (step, &s) in steps.iter().enumerate() {
                        let width = kv_heads * (q_per_kv + 2) * head_dim;
                        let unit = |n: usize, seed: usize| -> Tensor {
                            let v: Vec<f32> = (0..n)
                                .map(|i| ((i * 7 + seed * 13) as f32 * 0.37).sin() * 3.0)
                                .collect();
                            Tensor::from_vec(v, n, &Device::Cpu)
                                .unwrap()
                                .to_dtype(dtype)
                                .unwrap()
                                .to_device(&dev)
                                .unwrap()
                        };
                        let fused = unit(b * s * width, step).reshape((b, s, width)).unwrap();
                        let half = b * s * head_dim / 2;
                        let cos = unit(half, step + 10).reshape((b, s, head_dim / 2)).unwrap();
                        let sin = unit(half, step + 20).reshape((b, s, head_dim / 2)).unwrap();
                        let rope = rotate.then_some((&cos, &sin));
                        let (q, k, v) =
                            split_rotate_append(&mut fused_cache, 0, &fused, groups, rope)
                                .unwrap()
                                .unwrap_or_else(|| panic!("{case}: the kernel did not run"));
                        // The op-by-op path, as Falcon's attention takes it.
                        let (q2, k2, v2) =
                            op_by_op_heads(&fused, (kv_heads, q_per_kv, head_dim), rope);
                        let (k2, v2) = plain_cache.append(0, &k2, &v2).unwrap();
                        let case = format!("{case}, step {step}");
                        assert_eq!(q.dims(), q2.dims(), "{case}");
                        assert_eq!(k.dims(), k2.dims(), "{case}");
                        assert!(host_bits(&q) == host_bits(&q2), "{case}: q differs");
                        assert!(host_bits(&k) == host_bits(&k2), "{case}: keys differ");
                        assert!(host_bits(&v) == host_bits(&v2), "{case}: values differ");
                        cases += 1;
                    }
                }
            }
        }
    }
    eprintln!("rope_append: {cases} cases bit-equal");
}

/// Training's packed heads (`ops::rope_append::heads_for_flash`, then
/// `ops::flash::flash_attend_packed`: two graph nodes) against the op-by-op path they replace
/// (the head split's narrowed pieces made contiguous, candle's `rope` for q and k, then
/// `flash_attend` on the three): the attention output bit for bit, and the gradient of the fused
/// projection value for value (the op-by-op path adds the pieces' zero-padded gradients, which
/// may turn a -0 into a 0), for Falcon's three layouts and heads of 32, 64 and 128 (the SIMT
/// and tensor-core kernels), with and without rotation, bf16 and f16, causal over two rows of
/// which the second ends in padding.
#[cfg(feature = "cuda")]
#[test]
fn packed_heads_equal_the_op_by_op_path() {
    use adapterlab_model::ops::flash::{Visibility, flash_attend, flash_attend_packed};
    use adapterlab_model::ops::rope_append::{QkvGroups, heads_for_flash};
    use candle_core::{DType, Var};
    let Some(dev) = gpu_device() else { return };
    let (b, s) = (2, 80);
    let real = [vec![true; s], (0..s).map(|j| j < s - 11).collect()];
    let vis = Visibility::new(&real, None, 0, &dev).unwrap();
    let mut cases = 0;
    for (kv_heads, q_per_kv, head_dim) in
        [(1, 5, 64), (2, 3, 64), (4, 1, 64), (1, 3, 128), (2, 2, 32)]
    {
        let groups = QkvGroups {
            kv_heads,
            q_per_kv,
            head_dim,
        };
        let (h, width) = (kv_heads * q_per_kv, kv_heads * (q_per_kv + 2) * head_dim);
        let scale = 1.0 / (head_dim as f64).sqrt();
        for dtype in [DType::BF16, DType::F16] {
            let unit = |n: usize, seed: usize| -> Tensor {
                let v: Vec<f32> = (0..n)
                    .map(|i| ((i * 7 + seed * 13) as f32 * 0.37).sin() * 2.0)
                    .collect();
                Tensor::from_vec(v, n, &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
                    .to_device(&dev)
                    .unwrap()
            };
            let fused =
                Var::from_tensor(&unit(b * s * width, 1).reshape((b, s, width)).unwrap()).unwrap();
            let half = b * s * head_dim / 2;
            let cos = unit(half, 2).reshape((b, s, head_dim / 2)).unwrap();
            let sin = unit(half, 3).reshape((b, s, head_dim / 2)).unwrap();
            // The output's gradient, through a weighted sum.
            let w = unit(b * h * s * head_dim, 4)
                .reshape((b, h, s, head_dim))
                .unwrap();
            let grad_of = |out: &Tensor| {
                let grads = (out * &w).unwrap().sum_all().unwrap().backward().unwrap();
                host_f32s(
                    grads
                        .get(fused.as_tensor())
                        .expect("a gradient of the fused row"),
                )
            };
            for rotate in [true, false] {
                let case = format!(
                    "{kv_heads} groups of {q_per_kv} heads of {head_dim}, {dtype:?}, rope {rotate}"
                );
                let rope = rotate.then_some((&cos, &sin));
                let heads = heads_for_flash(fused.as_tensor(), groups, rope)
                    .unwrap()
                    .unwrap_or_else(|| panic!("{case}: the kernel did not run"));
                let packed = flash_attend_packed(&heads, scale, None, &vis).unwrap();
                let (q, k, v) =
                    op_by_op_heads(fused.as_tensor(), (kv_heads, q_per_kv, head_dim), rope);
                let split = flash_attend(&q, &k, &v, scale, None, &vis).unwrap();
                assert!(
                    host_bits(&packed) == host_bits(&split),
                    "{case}: outputs differ"
                );
                let (g_packed, g_split) = (grad_of(&packed), grad_of(&split));
                let differ = g_packed
                    .iter()
                    .zip(&g_split)
                    .filter(|(a, b)| a != b)
                    .count();
                assert_eq!(
                    differ, 0,
                    "{case}: {differ} of the fused gradient's elements differ"
                );
                assert!(
                    g_packed.iter().any(|v| *v != 0.0),
                    "{case}: a zero gradient"
                );
                cases += 1;
            }
        }
    }
    eprintln!("packed heads: {cases} cases equal");
}

/// A product with a term added inside cuBLAS's (`ops::gemm::matmul_plus`, what the LoRA
/// training node's value and input gradient go through) against the f32 product plus the term:
/// as close as the 16-bit product followed by the add (one rounding where that makes two), for
/// both layouts of the right side, bf16 and f16, shapes not a multiple of cuBLAS's tiles; and a
/// term still held elsewhere is copied, not written over.
#[cfg(feature = "cuda")]
#[test]
fn matmul_plus_is_the_product_plus_the_term() {
    use adapterlab_model::ops::gemm::{Rhs, matmul_plus};
    use candle_core::DType;
    let Some(dev) = gpu_device() else { return };
    for (m, k, n) in [(33, 72, 40), (130, 264, 96)] {
        for rhs in [Rhs::Transposed, Rhs::AsIs] {
            for dtype in [DType::BF16, DType::F16] {
                let case = format!("m {m} k {k} n {n} {rhs:?} {dtype:?}");
                let b_shape = match rhs {
                    Rhs::Transposed => (n, k),
                    Rhs::AsIs => (k, n),
                };
                // Rounded to the type first, so all three sums see the same operands.
                let typed = |t: Tensor| t.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
                let (a, b, c) = (
                    typed(waves((m, k), 1.0, 0.1, &Device::Cpu)),
                    typed(waves(b_shape, 0.1, 0.2, &Device::Cpu)),
                    typed(waves((m, n), 1.0, 0.3, &Device::Cpu)),
                );
                let bt = match rhs {
                    Rhs::Transposed => b.t().unwrap(),
                    Rhs::AsIs => b.clone(),
                };
                let exact = host_f32s(&(a.matmul(&bt).unwrap() + &c).unwrap());
                let on = |t: &Tensor| t.to_dtype(dtype).unwrap().to_device(&dev).unwrap();
                let (ad, bd, cd) = (on(&a), on(&b), on(&c));
                let bdt = match rhs {
                    Rhs::Transposed => bd.t().unwrap(),
                    Rhs::AsIs => bd.clone(),
                };
                let graph = host_f32s(&(ad.matmul(&bdt).unwrap() + &cd).unwrap());
                let held = host_f32s(&cd);
                let ours = host_f32s(&matmul_plus(&ad, &bd, rhs, cd.clone()).unwrap());
                assert_eq!(host_f32s(&cd), held, "{case}: a held term was written over");
                // A term that starts inside a larger buffer gives the same sum.
                let padded = Tensor::cat(
                    &[
                        &cd.flatten_all().unwrap().narrow(0, 0, 5).unwrap(),
                        &cd.flatten_all().unwrap(),
                    ],
                    0,
                )
                .unwrap();
                let offset = padded.narrow(0, 5, m * n).unwrap().reshape((m, n)).unwrap();
                assert_eq!(offset.layout().start_offset(), 5);
                let from_offset = host_f32s(&matmul_plus(&ad, &bd, rhs, offset).unwrap());
                assert_eq!(from_offset, ours, "{case}: a term at an offset");
                let (e_ours, e_graph) = (max_diff(&exact, &ours), max_diff(&exact, &graph));
                assert!(
                    e_ours <= 1.25 * e_graph + 1e-6,
                    "{case}: off the f32 sum by {e_ours}, the product then the add by {e_graph}"
                );
            }
        }
    }
}

/// Attention's heads merged into token rows (`ops::heads::merge_heads`, one kernel each way)
/// against candle's transpose and copy, bit for bit, forward and backward, bf16 and f16, heads
/// of 64 and 8.
#[cfg(feature = "cuda")]
#[test]
fn heads_kernel_equals_candles_transpose() {
    use adapterlab_model::ops::heads::merge_heads;
    use candle_core::{DType, Var};
    let Some(dev) = gpu_device() else { return };
    for (b, h, s, d) in [(2, 71, 37, 64), (3, 4, 5, 8)] {
        for dtype in [DType::BF16, DType::F16] {
            let n = b * h * s * d;
            let values = |seed: f32, len: usize| on_device(sines(len, seed), dtype, &dev);
            let case = format!("[{b}, {h}, {s}, {d}] {dtype:?}");
            let x = Var::from_tensor(&values(0.5, n).reshape((b, h, s, d)).unwrap()).unwrap();
            let w = values(1.5, n).reshape((b, s, h * d)).unwrap();
            let ours = merge_heads(x.as_tensor()).unwrap();
            let theirs = x
                .as_tensor()
                .transpose(1, 2)
                .unwrap()
                .reshape((b, s, h * d))
                .unwrap();
            assert_same_value_and_gradient(&x, &w, &ours, &theirs, &case);
        }
    }
}

/// The loss's picked rows (`ops::rows::PickedRows`): values and the scattered gradient on the
/// GPU against candle's index_select and its index_add backward, bit for bit (a gradient is
/// moved, never summed, so the two agree exactly), bf16, f16 and f32; rows of 4,544 (Falcon's
/// width) and of 8, and a row width the kernel does not take (candle's path then).
#[cfg(feature = "cuda")]
#[test]
fn picked_rows_kernel_equals_index_select() {
    use adapterlab_model::ops::rows::PickedRows;
    use candle_core::{DType, Var};
    let Some(dev) = gpu_device() else { return };
    for (n, h) in [(300, 4544), (9, 8), (7, 5)] {
        for dtype in [DType::BF16, DType::F16, DType::F32] {
            let values = |seed: f32, len: usize| on_device(sines(len, seed), dtype, &dev);
            let picked: Vec<u32> = (0..n as u32).filter(|i| i % 3 != 1).collect();
            let k = picked.len();
            let rows = PickedRows::new(picked, &dev).unwrap();
            let case = format!("[{n}, {h}] {dtype:?}");
            let x = Var::from_tensor(&values(0.5, n * h).reshape((n, h)).unwrap()).unwrap();
            let w = values(1.5, k * h).reshape((k, h)).unwrap();
            let ours = rows.gather(x.as_tensor()).unwrap();
            let theirs = x.as_tensor().index_select(rows.tensor(), 0).unwrap();
            assert_same_value_and_gradient(&x, &w, &ours, &theirs, &case);
        }
    }
}

/// `n` values whose 16-bit sums round: magnitudes over ~8 decades, signs alternating (so sums
/// cancel), large enough in places to overflow f16; `seed` and `scale` vary them.
#[cfg(feature = "cuda")]
fn rounding_values(n: usize, seed: f32, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let t = i as f32 * seed;
            t.sin() * scale * (1.0 + (t * 0.1).cos().abs() * 1e4f32.powf(t.cos()))
        })
        .collect()
}

/// `sin(0.7391 i + phase) * scale` for the elements of `shape`, f32 on `dev`: the GPU tests'
/// smooth inputs, with no two neighbours alike.
fn waves<S: Into<candle_core::Shape>>(shape: S, scale: f32, phase: f32, dev: &Device) -> Tensor {
    let shape = shape.into();
    let v: Vec<f32> = (0..shape.elem_count())
        .map(|i| (i as f32 * 0.7391 + phase).sin() * scale)
        .collect();
    Tensor::from_vec(v, shape, dev).unwrap()
}

/// `len` values `sin(0.37 i + seed)`.
#[cfg(feature = "cuda")]
fn sines(len: usize, seed: f32) -> Vec<f32> {
    (0..len).map(|i| (i as f32 * 0.37 + seed).sin()).collect()
}

/// `ours` and `theirs`, two computations of one value from `x`, bit for bit, and the gradient of
/// `sum(out * w)` they hand back to `x`.
#[cfg(feature = "cuda")]
fn assert_same_value_and_gradient(
    x: &candle_core::Var,
    w: &Tensor,
    ours: &Tensor,
    theirs: &Tensor,
    case: &str,
) {
    assert!(
        host_bits(ours) == host_bits(theirs),
        "{case}: values differ"
    );
    let grad = |out: &Tensor| {
        let g = (out * w).unwrap().sum_all().unwrap().backward().unwrap();
        host_bits(g.get(x.as_tensor()).unwrap())
    };
    assert!(grad(ours) == grad(theirs), "{case}: gradients differ");
}

/// `v` as a 1-d tensor of `dtype` on `dev`.
#[cfg(feature = "cuda")]
fn on_device(v: Vec<f32>, dtype: candle_core::DType, dev: &Device) -> Tensor {
    let n = v.len();
    Tensor::from_vec(v, n, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
        .to_device(dev)
        .unwrap()
}

/// A parallel layer's residual in one kernel (`ops::residual::add3`) against candle's two
/// adds on the GPU, bit for bit, in bf16 and f16, on values whose sums round (wide magnitude
/// ranges, cancellation, overflow to inf in f16), a length that leaves a tail; with a graph,
/// the gradients too.
#[cfg(feature = "cuda")]
#[test]
fn residual_kernel_equals_two_adds() {
    use adapterlab_model::ops::residual::add3;
    use candle_core::{DType, Var};
    let Some(dev) = gpu_device() else { return };
    let n = 3 * 4544 + 7;
    let mk = |seed: f32, scale: f32| rounding_values(n, seed, scale);
    for dtype in [DType::BF16, DType::F16] {
        let on = |v: Vec<f32>| on_device(v, dtype, &dev);
        let (x, a, b) = (on(mk(0.37, 1.0)), on(mk(0.11, 3.0)), on(mk(0.73, 0.5)));
        let fused = add3(&x, &a, &b).unwrap();
        let plain = (&x + (&a + &b).unwrap()).unwrap();
        let (f, p) = (host_bits(&fused), host_bits(&plain));
        let differ = f.iter().zip(&p).filter(|(a, b)| a != b).count();
        assert_eq!(
            differ, 0,
            "{dtype:?}: {differ} of {n} sums differ from two adds"
        );
        // With a graph: the same value, and each input's gradient the adds' (the output's).
        let vars = [&x, &a, &b].map(|t| Var::from_tensor(t).unwrap());
        let [xv, av, bv] = vars.each_ref().map(|v| v.as_tensor());
        let w = on(mk(0.29, 1.0));
        let grads = |out: &Tensor| {
            assert_eq!(host_bits(out), p, "{dtype:?}: the value with a graph");
            let g = (out * &w).unwrap().sum_all().unwrap().backward().unwrap();
            [xv, av, bv].map(|t| host_bits(g.get(t).unwrap()))
        };
        let ours = grads(&add3(xv, av, bv).unwrap());
        let theirs = grads(&(xv + (av + bv).unwrap()).unwrap());
        assert!(ours == theirs, "{dtype:?}: gradients differ from two adds'");
    }
}

/// The gradient store's sum of a tensor's two gradients on a GPU (`ops::residual::gradient_add`,
/// the hook the CUDA device installs in candle's autograd) against candle's add, bit for bit, in
/// bf16 and f16, on values whose sums round (wide magnitudes, cancellation, f16 overflow), a
/// length with a tail and views that start off a 16-byte boundary; other dtypes and shapes are
/// left to candle (`None`); and a tensor read twice gets the sum of both readers' gradients.
#[cfg(feature = "cuda")]
#[test]
fn gradient_add_kernel_equals_candles_add() {
    use adapterlab_model::ops::residual::gradient_add;
    use candle_core::{DType, Var};
    let Some(dev) = gpu_device() else { return };
    let n = 3 * 4544 + 7;
    let mk = |seed: f32, scale: f32| rounding_values(n, seed, scale);
    for dtype in [DType::BF16, DType::F16] {
        let on = |v: Vec<f32>| on_device(v, dtype, &dev);
        let (a, b) = (on(mk(0.37, 1.0)), on(mk(0.11, 3.0)));
        for (off, len) in [(0, n), (3, n - 3), (8, n - 9)] {
            let (a, b) = (a.narrow(0, off, len).unwrap(), b.narrow(0, 0, len).unwrap());
            let ours = gradient_add(&a, &b)
                .unwrap()
                .expect("a 16-bit pair on the GPU");
            let theirs = a.add(&b).unwrap();
            let (o, t) = (host_bits(&ours), host_bits(&theirs));
            let differ = o.iter().zip(&t).filter(|(x, y)| x != y).count();
            assert_eq!(
                differ, 0,
                "{dtype:?} offset {off}: {differ} of {len} sums differ"
            );
        }
        let short = a.narrow(0, 0, n - 1).unwrap();
        assert!(gradient_add(&short, &b).unwrap().is_none(), "shapes differ");
        let f32s = a.to_dtype(DType::F32).unwrap();
        assert!(
            gradient_add(&f32s, &f32s).unwrap().is_none(),
            "f32 is candle's"
        );
        // A tensor read twice: its gradient is the sum of the two readers', through the hook
        // (installed by the device the commands make; the tests' device is a plain one).
        candle_core::backprop::set_gradient_adder(gradient_add);
        let x = Var::from_tensor(&a).unwrap();
        let (w1, w2) = (on(mk(0.29, 1.0)), on(mk(0.53, 2.0)));
        let y = ((x.as_tensor() * &w1).unwrap() + (x.as_tensor() * &w2).unwrap()).unwrap();
        let g = y
            .to_dtype(DType::F32)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let got = host_bits(g.get(x.as_tensor()).unwrap());
        // Candle's mul backward hands each reader w as the gradient; which one the store
        // holds first does not change a commutative sum.
        let want = host_bits(&w1.add(&w2).unwrap());
        assert_eq!(got, want, "{dtype:?}: a tensor read twice");
    }
}

/// Greedy decoding's choice on the GPU (`ops::argmax::rows`, one kernel) against its host twin
/// (`ops::argmax::first_max`), id for id: rows of Falcon's vocabulary and odd lengths, ties
/// (the first wins), -inf everywhere, and NaNs (skipped, but a NaN first element wins).
#[cfg(feature = "cuda")]
#[test]
fn argmax_kernel_equals_the_host_twin() {
    use adapterlab_model::ops::argmax::{first_max, rows};
    use candle_core::DType;
    let Some(dev) = gpu_device() else { return };
    for (r, n) in [(1, 65024), (3, 1), (4, 1000), (16, 32000), (2, 1025)] {
        let mut x: Vec<f32> = (0..r * n)
            .map(|i| ((i as f32 * 0.618).sin() * 7.0).round() / 2.0)
            .collect();
        // Row 1: all -inf; row 2: a NaN first; row 3: NaNs scattered (where the rows exist).
        if r > 1 && n > 1 {
            x[n..2 * n].fill(f32::NEG_INFINITY);
        }
        if r > 2 {
            x[2 * n] = f32::NAN;
        }
        if r > 3 {
            for i in (3 * n..4 * n).step_by(7) {
                x[i] = f32::NAN;
            }
        }
        let t = Tensor::from_vec(x, (r, n), &Device::Cpu).unwrap();
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let host: Vec<u32> = t
                .to_dtype(dtype)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()
                .iter()
                .map(|row| first_max(row))
                .collect();
            let on_gpu = rows(&t.to_dtype(dtype).unwrap().to_device(&dev).unwrap()).unwrap();
            assert!(on_gpu.device().is_cuda());
            assert_eq!(on_gpu.to_vec1::<u32>().unwrap(), host, "{r}x{n} {dtype:?}");
        }
    }
}

/// Attention for decoding in one launch (`ops::decode_attention`) against the eager path it
/// replaces, on the GPU: multi-query, grouped and per-head keys, heads of 64 to 256, 1 to 300
/// keys, a padding mask, and keys read where a cache's strided views keep them; within 16-bit
/// rounding (the two round at the same points, and sum in different orders).
#[cfg(feature = "cuda")]
#[test]
fn decode_attention_kernel_equals_the_eager_path() {
    use adapterlab_model::ops::attention::attend;
    use adapterlab_model::ops::decode_attention;
    use candle_core::DType;
    let Some(dev) = gpu_device() else { return };
    let wave = |n: usize, f: f32| -> Vec<f32> { (0..n).map(|i| (i as f32 * f).sin()).collect() };
    // (batch, heads, kv heads, head dim, keys, room past the keys in the buffer, masked)
    for (b, h, kv, d, t, room, masked) in [
        (1, 71, 1, 64, 1, 0, false),
        (1, 71, 1, 64, 37, 0, false),
        (1, 71, 1, 64, 300, 256, false),
        (3, 8, 2, 128, 300, 17, true),
        (2, 4, 4, 80, 45, 3, true),
        (2, 4, 1, 256, 64, 0, false),
    ] {
        for dtype in [DType::BF16, DType::F16] {
            let case =
                format!("b={b} h={h} kv={kv} d={d} t={t} room={room} mask={masked} {dtype:?}");
            let make = |n: usize, f: f32, shape: (usize, usize, usize, usize)| {
                Tensor::from_vec(wave(n, f), shape, &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            };
            let q = make(b * h * d, 0.37, (b, h, 1, d));
            // The cache's buffers hold `room` more positions than the views show.
            let kbuf = make(b * kv * (t + room) * d, 0.11, (b, kv, t + room, d));
            let vbuf = make(b * kv * (t + room) * d, 0.23, (b, kv, t + room, d));
            let (k, v) = (kbuf.narrow(2, 0, t).unwrap(), vbuf.narrow(2, 0, t).unwrap());
            // Row r hides its first r keys, as left padding does.
            let mask = masked.then(|| {
                let m: Vec<f32> = (0..b * t)
                    .map(|i| if i % t < i / t { f32::MIN } else { 0.0 })
                    .collect();
                Tensor::from_vec(m, (b, 1, 1, t), &dev).unwrap()
            });
            let scale = 1.0 / (d as f64).sqrt();
            let got = decode_attention::attend(&q, &k, &v, scale, mask.as_ref())
                .unwrap()
                .unwrap_or_else(|| panic!("{case}: the kernel did not take it"));
            let want = attend(&q, &k, &v, scale, None, mask.as_ref()).unwrap();
            assert_eq!(got.dims(), want.dims(), "{case}");
            let (got, want) = (host_f32s(&got), host_f32s(&want));
            let scale = want.iter().fold(0f32, |a, v| a.max(v.abs())).max(1e-3);
            let err = max_diff(&got, &want) / scale;
            assert!(err < 2e-2, "{case}: relative error {err}");
        }
    }
}

/// Decoding through an unmerged adapter on an NF4 base: each decoding kernel that adds the
/// adapter's product in its epilogue gives the bits of that kernel followed by the two-kernel
/// LoRA path (`lora_inference`), and both are within 16-bit rounding of the product on the CPU.
/// A kernel that applies an epilogue to its output (an MLP's GELU, a layer's residual) gives the
/// bits of the epilogue's own op on that output, with the adapter and without; one that computes the adapter's h in
/// blocks of its own launch gives the bits of lora_h's launch.
#[cfg(feature = "cuda")]
#[test]
fn nf4_gemv_with_lora_equals_the_two_step_path() {
    use adapterlab_model::lora::kernels::{lora_h, lora_inference};
    use adapterlab_model::ops::epilogue::Epilogue;
    use adapterlab_model::quant::kernels::{LoraEpilogue, LoraH};
    use adapterlab_model::quant::nf4::Nf4Options;
    use adapterlab_model::quant::weight::Nf4Weight;
    use candle_core::DType;
    let Some(dev) = gpu_device() else { return };
    let cpu = Device::Cpu;
    let wave = |n: usize, f: f32, amp: f32| -> Vec<f32> {
        (0..n).map(|i| (i as f32 * f).sin() * amp).collect()
    };
    for (rows, cols, r) in [(72, 320, 16), (24, 4544, 8), (70, 200, 16)] {
        let w = Tensor::from_vec(wave(rows * cols, 0.731, 0.05), (rows, cols), &cpu).unwrap();
        let a = Tensor::from_vec(wave(r * cols, 0.377, 0.02), (r, cols), &cpu).unwrap();
        let b = Tensor::from_vec(wave(rows * r, 0.913, 0.03), (rows, r), &cpu).unwrap();
        let scaling = 2.0f64;
        for dtype in [DType::BF16, DType::F16] {
            let q = Nf4Weight::quantize(&w, Nf4Options::default(), dtype, &dev).unwrap();
            let wd = q.dequantize_to(DType::F32, &cpu).unwrap();
            for (m, kernel) in [1, 3, 8, 16]
                .into_iter()
                .flat_map(|m| decode_kernels().into_iter().map(move |kernel| (m, kernel)))
                .filter(|&(m, kernel)| {
                    kernel.adds_lora() && kernel_serves(kernel, m, cols, rows, &q)
                })
            {
                let case = format!("{rows}x{cols} r={r} {dtype:?} m={m} {kernel:?}");
                let x = Tensor::from_vec(wave(m * cols, 0.173, 1.0), (m, cols), &cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let xd = x.to_device(&dev).unwrap();
                let (ad, bd) = (a.to_device(&dev).unwrap(), b.to_device(&dev).unwrap());
                let h = lora_h(&xd, &ad).unwrap();
                let epilogue = LoraEpilogue {
                    h: LoraH::Given(&h),
                    b: &bd,
                    scaling: scaling as f32,
                };
                let fused = q
                    .forward_from_nf4(&xd, kernel, Some(&epilogue), Epilogue::None)
                    .unwrap();
                let base = q
                    .forward_from_nf4(&xd, kernel, None, Epilogue::None)
                    .unwrap();
                let two_step = lora_inference(&base, &xd, &ad, &bd, scaling).unwrap();
                let (fused, two_step) = (host_f32s(&fused), host_f32s(&two_step));
                let differ = differing_bits(&fused, &two_step);
                assert_eq!(
                    differ, 0,
                    "{case}: {differ} values differ from the two-step path"
                );
                // h computed in the kernel's own launch: the same bits (block_dot16 in both).
                if kernel.computes_lora_h(m, r) {
                    let in_launch = LoraEpilogue {
                        h: LoraH::FromA(&ad),
                        b: &bd,
                        scaling: scaling as f32,
                    };
                    // Twice: the second launch's flags start as the first left them.
                    for round in 0..2 {
                        let got = q
                            .forward_from_nf4(&xd, kernel, Some(&in_launch), Epilogue::None)
                            .unwrap();
                        let got = host_f32s(&got);
                        let differ = differing_bits(&got, &two_step);
                        assert_eq!(
                            differ, 0,
                            "{case}: h in the launch (round {round}): {differ} values differ from the two-step path"
                        );
                    }
                }
                // The epilogues applied by the kernel, with and without the adapter: the bits
                // of their own ops on the plain output.
                if kernel.applies_epilogue() {
                    let rx = Tensor::from_vec(wave(m * rows, 0.311, 2.0), (m, rows), &cpu)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap()
                        .to_device(&dev)
                        .unwrap();
                    let rb = Tensor::from_vec(wave(m * rows, 0.557, 1.5), (m, rows), &cpu)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap()
                        .to_device(&dev)
                        .unwrap();
                    for out in [Epilogue::Gelu, Epilogue::Residual { x: &rx, b: &rb }] {
                        for with_lora in [true, false] {
                            let lora = with_lora.then_some(&epilogue);
                            let got = q.forward_from_nf4(&xd, kernel, lora, out).unwrap();
                            let plain = q.forward_from_nf4(&xd, kernel, lora, Epilogue::None);
                            let got = host_f32s(&got);
                            let want = host_f32s(&out.apply(plain.unwrap()).unwrap());
                            let differ = differing_bits(&got, &want);
                            assert_eq!(
                                differ, 0,
                                "{case} {out:?} adapter={with_lora}: {differ} values differ from the op's"
                            );
                        }
                    }
                }
                let xf = x.to_dtype(DType::F32).unwrap();
                let want = (xf.matmul(&wd.t().unwrap()).unwrap()
                    + xf.matmul(&a.t().unwrap())
                        .unwrap()
                        .matmul(&(b.clone() * scaling).unwrap().t().unwrap())
                        .unwrap())
                .unwrap();
                let want = host_f32s(&want);
                let scale = want.iter().fold(0f32, |a, v| a.max(v.abs())).max(1e-3);
                let err = max_diff(&fused, &want) / scale;
                assert!(err < 1e-2, "{case}: relative error {err} against the CPU");
            }
        }
    }
}

/// The NF4 decoding kernels (none in a CPU build).
#[cfg(feature = "cuda")]
type Kernel = adapterlab_model::quant::kernels::DecodeKernel;
#[cfg(not(feature = "cuda"))]
type Kernel = ();

#[cfg(feature = "cuda")]
fn decode_kernels() -> Vec<Kernel> {
    adapterlab_model::quant::kernels::DecodeKernel::ALL.to_vec()
}
#[cfg(not(feature = "cuda"))]
fn decode_kernels() -> Vec<Kernel> {
    Vec::new()
}

/// Whether `kernel` serves `m` rows of `k` columns against `n` features in `q`'s blocks.
#[cfg(feature = "cuda")]
fn kernel_serves(
    kernel: Kernel,
    m: usize,
    k: usize,
    n: usize,
    q: &adapterlab_model::quant::weight::Nf4Weight,
) -> bool {
    kernel.serves(m, k, n, q.blocks())
}
#[cfg(not(feature = "cuda"))]
fn kernel_serves(
    _: Kernel,
    _: usize,
    _: usize,
    _: usize,
    _: &adapterlab_model::quant::weight::Nf4Weight,
) -> bool {
    false
}

/// `x W^T` straight from the 4-bit data on the GPU with `kernel`.
#[cfg(feature = "cuda")]
fn from_nf4_data(
    q: &adapterlab_model::quant::weight::Nf4Weight,
    x: &Tensor,
    kernel: Kernel,
) -> Tensor {
    q.forward_from_nf4(
        x,
        kernel,
        None,
        adapterlab_model::ops::epilogue::Epilogue::None,
    )
    .unwrap()
}

#[cfg(not(feature = "cuda"))]
fn from_nf4_data(_: &adapterlab_model::quant::weight::Nf4Weight, _: &Tensor, _: Kernel) -> Tensor {
    unreachable!("the runs from NF4 data are listed in CUDA builds only")
}

/// NF4 quantization on the GPU (how a CUDA load quantizes) against the CPU path, bit for bit:
/// codes, absmax and the double-quantized absmax (q, nested absmax, offset), for bf16, f16 and
/// f32 weights of awkward shapes (one element, odd counts, counts that are not a multiple of the
/// block, one large enough for the CPU's parallel paths), holding an all-zero block, subnormals,
/// tiny and huge magnitudes (overflowing to inf in f16) and, in one case, NaN and inf; and the
/// device copy the GPU path keeps dequantizes to the CPU path's bits. CPU: nothing to do.
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "a GPU test: needs --features cuda and ADAPTERLAB_TEST_DEVICE=cuda on a GPU"
)]
#[test]
fn nf4_quantize_kernel_equals_the_cpu_path() {
    use adapterlab_model::quant::nf4::{Nf4Options, Nf4Tensor};
    use adapterlab_model::quant::weight::Nf4Weight;
    use candle_core::DType;
    let Some(dev) = gpu_device() else { return };
    let cpu = Device::Cpu;
    // A seeded value in [-1, 1) per index (no rand dependency, the same on every machine).
    let unit = |i: usize, seed: u64| {
        let mut z = (i as u64)
            .wrapping_add(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z ^= z >> 31;
        z = z.wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 29;
        (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    };
    let values = |n: usize, seed: u64, specials: bool| -> Vec<f32> {
        let mut v: Vec<f32> = (0..n)
            .map(|i| {
                let u = unit(i, seed);
                // Blocks of 64 at different scales: ordinary, tiny (subnormal in f32 and
                // bf16), huge (inf in f16), all zero, and subnormals beside normal values.
                match (i / 64) % 6 {
                    0 | 1 => u * 0.05,
                    2 => u * 1e-39,
                    3 => u * 3e38,
                    4 => 0.0,
                    _ if i % 2 == 0 => u * 1e-40,
                    _ => u * 1e-3,
                }
            })
            .collect();
        if specials && n > 10 {
            v[1] = f32::NAN;
            v[5] = f32::INFINITY;
            v[n - 2] = f32::NEG_INFINITY;
            v[n / 2] = -0.0;
        }
        v
    };
    let shapes = [
        (1usize, 1usize),
        (3, 5),
        (7, 9),
        (1, 65),
        (33, 70),
        (17, 4099),
        (1024, 4099),
    ];
    let mut cases = 0;
    for (k, &(rows, cols)) in shapes.iter().enumerate() {
        for specials in [false, true] {
            let vals = values(rows * cols, k as u64 + 1, specials);
            let w = Tensor::from_vec(vals, (rows, cols), &cpu).unwrap();
            for dtype in [DType::BF16, DType::F16, DType::F32] {
                let w = w.to_dtype(dtype).unwrap();
                let w_gpu = w.to_device(&dev).unwrap();
                for (blocksize, double_quant) in [(64, true), (64, false), (256, true)] {
                    let case = format!(
                        "{rows}x{cols} {dtype:?} specials={specials} blocksize={blocksize} double_quant={double_quant}"
                    );
                    let opts = Nf4Options {
                        blocksize,
                        double_quant,
                    };
                    let want = Nf4Tensor::from_tensor(&w, opts).unwrap();
                    let got = Nf4Weight::quantize(&w_gpu, opts, dtype, &dev).unwrap();
                    let q = got.nf4();
                    assert_eq!(q.shape(), want.shape(), "{case}");
                    assert_eq!(q.dtype(), want.dtype(), "{case}");
                    let bad = q
                        .codes()
                        .iter()
                        .zip(want.codes())
                        .filter(|(a, b)| a != b)
                        .count();
                    assert_eq!(q.codes().len(), want.codes().len(), "{case}");
                    assert_eq!(bad, 0, "{case}: {bad} code bytes differ");
                    let bits = |a: &[f32]| a.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                    use adapterlab_model::quant::nf4::Absmax;
                    match (q.absmax(), want.absmax()) {
                        (Absmax::Plain(a), Absmax::Plain(b)) => {
                            assert_eq!(bits(a), bits(b), "{case}: absmax")
                        }
                        (Absmax::Nested(a), Absmax::Nested(b)) => {
                            assert_eq!(a.q, b.q, "{case}: quantized absmax");
                            assert_eq!(bits(&a.absmax), bits(&b.absmax), "{case}: nested absmax");
                            assert_eq!(a.offset.to_bits(), b.offset.to_bits(), "{case}: offset");
                            assert_eq!(bits(&a.code), bits(&b.code), "{case}: code map");
                            assert_eq!(a.blocksize, b.blocksize, "{case}");
                        }
                        _ => panic!("{case}: absmax kinds differ"),
                    }
                    // The device copy the GPU path kept (its own codes, its absmax without
                    // double quantization) dequantizes as the CPU data does. With inf among the
                    // weights some values are NaN (0 * inf), whose payload the CPU and the GPU
                    // choose differently: NaN equals NaN here.
                    let on_gpu = host_f32s(&got.dequantize_to(dtype, &dev).unwrap());
                    let on_cpu = host_f32s(&got.dequantize_to(dtype, &cpu).unwrap());
                    let bad = on_gpu
                        .iter()
                        .zip(&on_cpu)
                        .filter(|(a, b)| a.to_bits() != b.to_bits() && !(a.is_nan() && b.is_nan()))
                        .count();
                    assert_eq!(bad, 0, "{case}: {bad} dequantized values differ");
                    cases += 1;
                }
            }
        }
    }
    eprintln!("{cases} cases bit-equal");
}

/// Seeded dropout draws the same mask on the GPU as on the CPU (f32, bf16 and f16).
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "a GPU test: needs --features cuda and ADAPTERLAB_TEST_DEVICE=cuda on a GPU"
)]
#[test]
fn dropout_kernel_equals_the_cpu_path() {
    use adapterlab_model::ops::dropout::seeded_dropout;
    use candle_core::DType;
    let Some(dev) = gpu_device() else { return };
    let x: Vec<f32> = (0..10_001).map(|i| (i as f32 * 0.37).sin()).collect();
    let x = Tensor::from_vec(x, (73, 137), &Device::Cpu).unwrap();
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let x = x.to_dtype(dtype).unwrap();
        let cpu = seeded_dropout(&x, 42, 0.1).unwrap();
        let gpu = seeded_dropout(&x.to_device(&dev).unwrap(), 42, 0.1).unwrap();
        assert_eq!(host_bits(&cpu), host_bits(&gpu), "{dtype:?}");
        // A view starting at an odd element of its storage: the mask counts from the view's
        // start on both sides, so pairs are (0, 1), (2, 3)... of the view, not of the storage.
        let view = x.narrow(0, 1, 50).unwrap();
        let cpu = seeded_dropout(&view, 42, 0.1).unwrap();
        let on_gpu = x.to_device(&dev).unwrap().narrow(0, 1, 50).unwrap();
        let gpu = seeded_dropout(&on_gpu, 42, 0.1).unwrap();
        assert_eq!(
            host_bits(&cpu),
            host_bits(&gpu),
            "{dtype:?}, at an odd offset"
        );
    }
}

/// An adapted NF4 layer's training node (`lora::train_node`) on the GPU against the op-by-op
/// graph on the same device, with seeded dropout, with and without the GELU in front, at ranks
/// 16 and 8 (rows not a whole number of the kernels' blocks, and a row length that splits among
/// blocks and is not a whole number of their chunks; shapes where `h`'s row length and `dA`'s
/// rows split into slices whose partial sums are added). The 16-bit kernels are those the GPU
/// runs by default (`ADAPTERLAB_LORA_TRAIN_KERNELS` picks the others). In f32 (op by op inside the node too) the
/// value is the op-by-op sum's bit for bit and the gradients agree within 1e-4, and the CPU's
/// equal the GPU's. In bf16 and f16 the node's kernels sum `h = dropout(z) A^T` and its product
/// with B in another order than cuBLAS, so a rounding may flip: the value must be as close to
/// the f32 graph's as the 16-bit graph's is (within a quarter), and the gradients agree within
/// the type's rounding.
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "a GPU test: needs --features cuda and ADAPTERLAB_TEST_DEVICE=cuda on a GPU"
)]
#[test]
fn lora_train_node_equals_the_op_by_op_graph_on_the_gpu() {
    use adapterlab_model::lora::train_node::{Adapter, Dropout, Input, lora_linear};
    use adapterlab_model::ops::dropout::seeded_dropout;
    use adapterlab_model::ops::gelu::gelu_erf;
    use adapterlab_model::quant::nf4::Nf4Options;
    use adapterlab_model::quant::weight::{BaseWeight, Nf4Weight};
    use candle_core::{DType, Var};
    use std::sync::Arc;
    let Some(dev) = gpu_device() else { return };
    for (m, k, n, r) in [
        (96, 256, 192, 16),
        (77, 1032, 192, 8),
        (100, 2056, 64, 16),
        (1024, 256, 64, 8),
    ] {
        let w = waves((n, k), 0.05, 0.1, &Device::Cpu);
        let (x0, a0, b0, g0) = (
            waves((m, k), 1.0, 0.2, &Device::Cpu),
            waves((r, k), 0.1, 0.3, &Device::Cpu),
            waves((n, r), 0.1, 0.4, &Device::Cpu),
            waves((m, n), 1.0, 0.5, &Device::Cpu),
        );
        let dropout = Some(Dropout { key: 7, p: 0.1 });
        // (value, dx, dA, dB) of one forward and backward on `on`, in `dtype`.
        let run = |on: &Device, dtype: DType, fused: bool, input: Input| -> Vec<Vec<f32>> {
            let base: Arc<dyn BaseWeight> =
                Arc::new(Nf4Weight::quantize(&w, Nf4Options::default(), dtype, on).unwrap());
            let var = |t: &Tensor| Var::from_tensor(&t.to_device(on).unwrap()).unwrap();
            let (x, a, b) = (var(&x0), var(&a0), var(&b0));
            let xw = x.as_tensor().to_dtype(dtype).unwrap();
            let aw = a.as_tensor().to_dtype(dtype).unwrap();
            let bs = (b.as_tensor().to_dtype(dtype).unwrap() * 2.0).unwrap();
            let y = if fused {
                // The f32 weights themselves, as a training hands them to the node.
                let adapter = Adapter {
                    a: a.as_tensor(),
                    b: b.as_tensor(),
                    scaling: 2.0,
                };
                lora_linear(base, None, &xw, adapter, dropout, input).unwrap()
            } else {
                let z = match input {
                    Input::AsIs => xw.clone(),
                    Input::GeluErf => gelu_erf(&xw).unwrap(),
                };
                let zd = seeded_dropout(&z, 7, 0.1).unwrap();
                let delta = zd
                    .matmul(&aw.t().unwrap())
                    .unwrap()
                    .matmul(&bs.t().unwrap())
                    .unwrap();
                (base.forward(&z).unwrap() + delta).unwrap()
            };
            let g = g0.to_device(on).unwrap().to_dtype(dtype).unwrap();
            let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            [
                y,
                grads.get(&x).unwrap().clone(),
                grads.get(&a).unwrap().clone(),
                grads.get(&b).unwrap().clone(),
            ]
            .iter()
            .map(host_f32s)
            .collect()
        };
        for input in [Input::AsIs, Input::GeluErf] {
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                let case = format!("{input:?} {dtype:?} m {m} k {k} r {r}");
                let (fused, plain) = (
                    run(&dev, dtype, true, input),
                    run(&dev, dtype, false, input),
                );
                if dtype == DType::F32 {
                    assert_eq!(
                        fused[0], plain[0],
                        "{case}: the value is the op-by-op sum's"
                    );
                } else {
                    // The kernels sum in another order than cuBLAS, so a rounding of h, of the
                    // adapter's term or of the sum may flip, and on sums that cancel a flip of h
                    // moves the value by many units of its own last place. What must hold is
                    // that the node is as accurate as the graph: against the f32 graph (the same
                    // inputs, unrounded), its worst error is the graph's, within a quarter.
                    let exact = run(&dev, DType::F32, false, input);
                    let (ours, theirs) = (
                        max_diff(&exact[0], &fused[0]),
                        max_diff(&exact[0], &plain[0]),
                    );
                    assert!(
                        ours <= 1.25 * theirs + 1e-6,
                        "{case}: value off the f32 graph's by {ours}, the 16-bit graph by {theirs}"
                    );
                }
                for (what, (f, p)) in ["dx", "dA", "dB"]
                    .iter()
                    .zip(fused[1..].iter().zip(&plain[1..]))
                {
                    let rel = relative_diff(p, f);
                    let tol = if dtype == DType::F32 { 1e-4 } else { 2e-2 };
                    assert!(rel < tol, "{case} {what}: relative difference {rel}");
                }
            }
            let (gpu, cpu) = (
                run(&dev, DType::F32, true, input),
                run(&Device::Cpu, DType::F32, true, input),
            );
            for (what, (g, c)) in ["value", "dx", "dA", "dB"].iter().zip(gpu.iter().zip(&cpu)) {
                let rel = relative_diff(c, g);
                assert!(
                    rel < 1e-4,
                    "{input:?} f32 GPU against CPU, m {m} k {k} r {r}, {what}: relative difference {rel}"
                );
            }
        }
    }
}

/// Layer norm's input gradient: the GPU kernel (`ops/layer_norm.rs`) against the op-by-op f32
/// form on the same device, in bf16 and f16, at a width that is no multiple of the block or of
/// 8 (the kernel a row of 2-byte loads), Falcon-7B's, the widest the kernel that holds a row in
/// registers takes and one past it; f32 sums in another order, so within the 16-bit type's
/// rounding.
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "a GPU test: needs --features cuda and ADAPTERLAB_TEST_DEVICE=cuda on a GPU"
)]
#[test]
fn layer_norm_input_grad_kernel_equals_the_op_by_op_form() {
    use adapterlab_model::ops::layer_norm::{input_grad, input_grad_op_by_op};
    use candle_core::DType;
    let Some(dev) = gpu_device() else { return };
    for (rows, n) in [(37, 1001), (9, 4544), (5, 8192), (3, 8200)] {
        let host = |len: usize, scale: f32, phase: f32, offset: f32| {
            let v: Vec<f32> = (0..len)
                .map(|i| (i as f32 * 0.3217 + phase).sin() * scale + offset)
                .collect();
            v
        };
        let x = Tensor::from_vec(host(rows * n, 2.0, 0.1, 0.5), (rows, n), &dev).unwrap();
        let g = Tensor::from_vec(host(rows * n, 1.0, 0.7, 0.0), (rows, n), &dev).unwrap();
        let w = Tensor::from_vec(host(n, 0.5, 0.3, 1.0), n, &dev).unwrap();
        for dtype in [DType::BF16, DType::F16] {
            let (x, g) = (x.to_dtype(dtype).unwrap(), g.to_dtype(dtype).unwrap());
            let w16 = w.to_dtype(dtype).unwrap();
            let fused = host_f32s(&input_grad(&x, &w16, 1e-5, &g).unwrap());
            let plain = host_f32s(&input_grad_op_by_op(&x, &w16, 1e-5, &g).unwrap());
            let rel = relative_diff(&plain, &fused);
            let tol = if dtype == DType::BF16 { 1e-2 } else { 2e-3 };
            assert!(
                rel < tol,
                "{dtype:?} {rows} x {n}: relative difference {rel}"
            );
        }
    }
}

/// Layer norm's value from its kernel (`ops::layer_norm::value`) against candle's kernel, which
/// it replaces on the GPU: against the f32 norm of the same 16-bit inputs, its worst error is
/// candle's within a quarter (the two round the same f32 value; the sums' order and the
/// variance's form differ); rows the kernel does not take (1001 and 8200 wide) go to candle's.
#[cfg(feature = "cuda")]
#[test]
fn layer_norm_kernel_is_as_close_to_f32_as_candles() {
    use adapterlab_model::ops::layer_norm::value;
    use candle_core::DType;
    let Some(dev) = gpu_device() else { return };
    for (rows, n) in [
        (37, 1001),
        (9, 4544),
        (64, 4544),
        (5, 8192),
        (3, 8200),
        (2, 64),
    ] {
        let host = |len: usize, scale: f32, phase: f32, offset: f32| -> Vec<f32> {
            (0..len)
                .map(|i| (i as f32 * 0.3217 + phase).sin() * scale + offset)
                .collect()
        };
        let x = Tensor::from_vec(host(rows * n, 2.0, 0.1, 0.5), (rows, n), &dev).unwrap();
        let w = Tensor::from_vec(host(n, 0.5, 0.3, 1.0), n, &dev).unwrap();
        let b = Tensor::from_vec(host(n, 0.2, 0.9, 0.0), n, &dev).unwrap();
        for dtype in [DType::BF16, DType::F16] {
            let (x, w, b) = (
                x.to_dtype(dtype).unwrap(),
                w.to_dtype(dtype).unwrap(),
                b.to_dtype(dtype).unwrap(),
            );
            let f32s = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            let exact = host_f32s(
                &candle_nn::ops::layer_norm_slow(&f32s(&x), &f32s(&w), &f32s(&b), 1e-5).unwrap(),
            );
            let ours = host_f32s(&value(&x, &w, &b, 1e-5).unwrap());
            let theirs = host_f32s(&candle_nn::ops::layer_norm(&x, &w, &b, 1e-5).unwrap());
            let (o, t) = (max_diff(&exact, &ours), max_diff(&exact, &theirs));
            assert!(
                o <= 1.25 * t + 1e-6,
                "{dtype:?} {rows} x {n}: {o} off the f32 norm, candle's kernel {t}"
            );
        }
    }
}

/// The flash attention kernels against their CPU twin, output and the three gradients: f32
/// within summation order, bf16 and f16 within their rounding (the SIMT kernels, and the
/// tensor-core ones for heads of 64 and 128); every head size class (8 → 32, 64, 128),
/// multi-query, grouped and one-to-one heads, ALiBi, packed rows with padding, and queries
/// after a cache. CPU: nothing to do.
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "a GPU test: needs --features cuda and ADAPTERLAB_TEST_DEVICE=cuda on a GPU"
)]
#[test]
fn flash_attention_kernels_equal_the_cpu_twin() {
    use adapterlab_model::ops::flash::{Visibility, flash_attend};
    use candle_core::{DType, Var};
    let Some(dev) = gpu_device() else { return };
    // (batch, heads, kv heads, new tokens, cached, head dim, alibi, packed)
    let shapes = [
        (2, 6, 1, 70, 0, 8, false, false),
        (2, 8, 2, 100, 0, 64, false, true),
        (1, 4, 4, 33, 0, 128, true, false),
        (3, 4, 1, 5, 60, 64, true, false),
        (2, 71, 1, 130, 0, 64, false, false),
        (1, 8, 1, 200, 0, 128, false, true),
        // Enough key blocks that a dK/dV block of the tensor-core kernel sums two query heads
        // (the last chunk one).
        (2, 71, 1, 500, 0, 64, false, false),
        // Decoding: one or two new tokens after a cache (the warp-a-query forward kernel).
        (2, 71, 1, 1, 300, 64, false, false),
        (3, 4, 2, 2, 40, 128, true, false),
        (1, 6, 1, 1, 20, 8, false, false),
    ];
    for (b, h, kv, s, past, d, alibi, packed) in shapes {
        let t = past + s;
        let (q0, k0, v0, g0) = (
            waves((b, h, s, d), 1.0, 0.1, &Device::Cpu),
            waves((b, kv, t, d), 1.0, 0.2, &Device::Cpu),
            waves((b, kv, t, d), 1.0, 0.3, &Device::Cpu),
            waves((b, h, s, d), 1.0, 0.4, &Device::Cpu),
        );
        // Row 0 left-padded by 3; packed rows cut into examples of 17 tokens.
        let real: Vec<Vec<bool>> = (0..b)
            .map(|r| (0..t).map(|j| r != 0 || j >= 3).collect())
            .collect();
        let examples: Vec<Vec<u32>> = (0..b)
            .map(|_| (0..t).map(|j| (j / 17) as u32).collect())
            .collect();
        let slopes: Vec<f32> = (0..b * h * t)
            .map(|i| -((i % t) as f32) * 0.01 * ((i / t) % h + 1) as f32)
            .collect();
        let run = |on: &Device, dtype: DType| -> Vec<Vec<f32>> {
            let vis =
                Visibility::new(&real, packed.then_some(examples.as_slice()), past, on).unwrap();
            let var = |x: &Tensor| Var::from_tensor(&x.to_device(on).unwrap()).unwrap();
            let (q, k, v) = (var(&q0), var(&k0), var(&v0));
            let cast = |x: &Var| x.as_tensor().to_dtype(dtype).unwrap();
            let bias = alibi.then(|| {
                Tensor::from_vec(slopes.clone(), (b, h, 1, t), on)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            });
            let out =
                flash_attend(&cast(&q), &cast(&k), &cast(&v), 0.125, bias.as_ref(), &vis).unwrap();
            let g = g0.to_device(on).unwrap().to_dtype(dtype).unwrap();
            let grads = (&out * &g).unwrap().sum_all().unwrap().backward().unwrap();
            [
                out,
                grads.get(&q).unwrap().clone(),
                grads.get(&k).unwrap().clone(),
                grads.get(&v).unwrap().clone(),
            ]
            .iter()
            .map(host_f32s)
            .collect()
        };
        let want = run(&Device::Cpu, DType::F32);
        // In a 16-bit type every kernel (the tensor-core ones for heads of 64 and 128 and more
        // than a few queries) rounds probabilities and dS to the type before their products, as
        // the CPU twin does in that type. Where that rounding costs more than `tol` (dQ's terms
        // sum to nearly nothing: a row's dS sums to zero), the kernels must still be as close
        // to f32 as the twin, within a quarter.
        for (dtype, tol) in [
            (DType::F32, 1e-4f32),
            (DType::BF16, 3e-2),
            (DType::F16, 1e-2),
        ] {
            let got = run(&dev, dtype);
            let twin = (dtype != DType::F32).then(|| run(&Device::Cpu, dtype));
            for (i, (what, (g, w))) in ["output", "dq", "dk", "dv"]
                .iter()
                .zip(got.iter().zip(&want))
                .enumerate()
            {
                let diff = relative_diff(w, g);
                let bound = twin
                    .as_ref()
                    .map_or(tol, |t| tol.max(1.25 * relative_diff(w, &t[i])));
                assert!(
                    diff < bound,
                    "{dtype:?} [{b}, {h}/{kv}, {s} after {past}, {d}] alibi={alibi} packed={packed}: {what} differs by {diff} (relative; bound {bound})"
                );
            }
        }
    }
}

/// Attention's fused softmax and its backward on the GPU against the CPU path (f32, bf16, f16;
/// with and without a padding mask, one mask for the batch or one per row).
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "a GPU test: needs --features cuda and ADAPTERLAB_TEST_DEVICE=cuda on a GPU"
)]
#[test]
fn masked_softmax_kernels_equal_the_cpu_path() {
    let Some(dev) = gpu_device() else { return };
    let cpu = Device::Cpu;
    // 300: the block-per-row kernel; 200, 512 and 1000 (16-bit): the warp-per-row one in its
    // three register sizes, with whole and partly filled lanes.
    for t in [300, 512, 200, 1000] {
        masked_softmax_case(&dev, &cpu, t);
    }
}

fn masked_softmax_case(dev: &Device, cpu: &Device, t: usize) {
    use adapterlab_model::ops::softmax::{masked_softmax, masked_softmax_backward};
    use candle_core::DType;
    let (b, h, s) = (3, 5, 7);
    let n = b * h * s * t;
    let scores: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 4.0).collect();
    let scores = Tensor::from_vec(scores, (b, h, s, t), cpu).unwrap();
    let dp: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
    let dp = Tensor::from_vec(dp, (b, h, s, t), cpu).unwrap();
    let mask_of = |mb: usize| {
        let v: Vec<f32> = (0..mb * s * t)
            .map(|i| {
                let (row, j) = (i / t, i % t);
                if j > 250 + row % s || (i / (s * t) == 1 && j < 3) {
                    f32::MIN
                } else {
                    0.0
                }
            })
            .collect();
        Tensor::from_vec(v, (mb, 1, s, t), cpu).unwrap()
    };
    let f32s_of = host_f32s;
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let (sc, g) = (scores.to_dtype(dtype).unwrap(), dp.to_dtype(dtype).unwrap());
        for mask in [None, Some(mask_of(1)), Some(mask_of(b))] {
            let case = format!(
                "t {t} {dtype:?} mask {:?}",
                mask.as_ref().map(|m| m.dims()[0])
            );
            let on = |d: &Device| {
                let m = mask.as_ref().map(|m| m.to_device(d).unwrap());
                let (sc, g) = (sc.to_device(d).unwrap(), g.to_device(d).unwrap());
                let (p, ds) = masked_softmax_backward(&sc, m.as_ref(), &g, 0.125).unwrap();
                let fwd = masked_softmax(&sc, m.as_ref(), 0.125).unwrap();
                let gap = max_diff(&f32s_of(&fwd), &f32s_of(&p));
                assert!(
                    gap == 0.0,
                    "forward and backward probabilities differ by {gap}"
                );
                (fwd, ds)
            };
            let ((pc, dc), (pg, dg)) = (on(cpu), on(dev));
            assert!(pg.device().is_cuda(), "{case}");
            // expf differs by an ulp or so between the CPU and the GPU and the sums run in
            // another order (more so the longer the row); a 16-bit result may then round to its
            // neighbour.
            let tol = if dtype == DType::F32 { 4e-6 } else { 1e-2 };
            for (what, c, g) in [("probabilities", pc, pg), ("gradient", dc, dg)] {
                let err = relative_diff(&f32s_of(&c), &f32s_of(&g));
                assert!(err < tol, "{case} {what}: relative error {err}");
            }
        }
    }
}

/// The cross-entropy kernels (summed loss and its gradient) against the CPU path, for a
/// vocabulary that is not a multiple of the block size.
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "a GPU test: needs --features cuda and ADAPTERLAB_TEST_DEVICE=cuda on a GPU"
)]
#[test]
fn cross_entropy_kernels_equal_the_cpu_path() {
    use adapterlab_model::ops::cross_entropy::cross_entropy_sum;
    use candle_core::{DType, Var};
    let Some(dev) = gpu_device() else { return };
    let cpu = Device::Cpu;
    let (n, v) = (37, 3001);
    let logits: Vec<f32> = (0..n * v).map(|i| (i as f32 * 0.013).sin() * 8.0).collect();
    let logits = Tensor::from_vec(logits, (n, v), &cpu).unwrap();
    let labels: Vec<u32> = (0..n as u32).map(|i| (i * 977) % v as u32).collect();
    let labels = Tensor::from_vec(labels, n, &cpu).unwrap();
    for dtype in [DType::F32, DType::BF16] {
        let on = |d: &Device| {
            let x =
                Var::from_tensor(&logits.to_dtype(dtype).unwrap().to_device(d).unwrap()).unwrap();
            let loss = cross_entropy_sum(x.as_tensor(), &labels.to_device(d).unwrap()).unwrap();
            // A scale other than 1, so the kernel's use of the incoming gradient shows.
            let grads = (&loss * 0.25).unwrap().backward().unwrap();
            let g = grads.get(x.as_tensor()).unwrap().clone();
            (host_f32s(&loss)[0], host_f32s(&g))
        };
        let ((lc, gc), (lg, gg)) = (on(&cpu), on(&dev));
        assert!(
            (lc - lg).abs() <= 1e-5 * lc.abs(),
            "{dtype:?} loss: cpu {lc}, gpu {lg}"
        );
        let tol = if dtype == DType::F32 { 1e-6 } else { 4e-3 };
        let err = max_diff(&gc, &gg);
        assert!(err < tol, "{dtype:?} gradient differs by {err}");
    }
}

/// The training node given f32 weights (its 16-bit copies from one kernel, dA and dB widened
/// and scaled in the kernels' last sums) against the same node given the graph's own casts,
/// `to_dtype(A)` and `to_dtype(B) * scaling` (what a training ran before): the value and all
/// three gradients bit for bit, in bf16 and f16, ranks 8 and 16, with and without GELU, at
/// scalings 2 and 0.3 (not a power of two, so the affine op's rounding shows).
#[cfg(feature = "cuda")]
#[test]
fn lora_node_takes_f32_weights_as_the_graph_that_casts_them() {
    use adapterlab_model::lora::train_node::{Adapter, Dropout, Input, lora_linear};
    use adapterlab_model::quant::nf4::Nf4Options;
    use adapterlab_model::quant::weight::{BaseWeight, Nf4Weight};
    use candle_core::{DType, Var};
    use std::sync::Arc;
    let Some(dev) = gpu_device() else { return };
    for (m, k, n, r) in [(96, 256, 192, 16), (77, 1032, 200, 8)] {
        let w = waves((n, k), 0.05, 0.1, &dev);
        for dtype in [DType::BF16, DType::F16] {
            let base: Arc<dyn BaseWeight> =
                Arc::new(Nf4Weight::quantize(&w, Nf4Options::default(), dtype, &dev).unwrap());
            for input in [Input::AsIs, Input::GeluErf] {
                for scaling in [2.0, 0.3] {
                    let run = |cast_in_graph: bool| -> Vec<Vec<u32>> {
                        let x = Var::from_tensor(
                            &waves((m, k), 1.0, 0.2, &dev).to_dtype(dtype).unwrap(),
                        )
                        .unwrap();
                        let a = Var::from_tensor(&waves((r, k), 0.1, 0.3, &dev)).unwrap();
                        let b = Var::from_tensor(&waves((n, r), 0.1, 0.4, &dev)).unwrap();
                        let (a16, b16) = (
                            a.as_tensor().to_dtype(dtype).unwrap(),
                            b.as_tensor().to_dtype(dtype).unwrap(),
                        );
                        let adapter = if cast_in_graph {
                            Adapter {
                                a: &a16,
                                b: &b16,
                                scaling,
                            }
                        } else {
                            Adapter {
                                a: a.as_tensor(),
                                b: b.as_tensor(),
                                scaling,
                            }
                        };
                        let dropout = Some(Dropout { key: 9, p: 0.1 });
                        let y =
                            lora_linear(base.clone(), None, x.as_tensor(), adapter, dropout, input)
                                .unwrap();
                        let g = waves((m, n), 1.0, 0.5, &dev).to_dtype(dtype).unwrap();
                        let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
                        let da = grads.get(a.as_tensor()).expect("dA");
                        let db = grads.get(b.as_tensor()).expect("dB");
                        assert_eq!((da.dtype(), db.dtype()), (DType::F32, DType::F32));
                        [&y, grads.get(x.as_tensor()).expect("dx"), da, db]
                            .iter()
                            .map(|t| host_bits(t))
                            .collect()
                    };
                    let (ours, graphs) = (run(false), run(true));
                    for (what, (o, t)) in ["value", "dx", "dA", "dB"]
                        .iter()
                        .zip(ours.iter().zip(&graphs))
                    {
                        assert!(
                            o == t,
                            "{dtype:?} {input:?} scaling {scaling} m {m} k {k} r {r}: {what} differs"
                        );
                    }
                }
            }
        }
    }
}

/// The dropout decisions `h`'s kernel stores (one bit an element) against the mask drawn again:
/// `h` the same bits whether it stores them or not; `dA`, the input gradient's term and that term
/// through GELU's backward from the stored bits the same bits as drawing the mask themselves, with and without GELU, ranks 8 and 16, bf16 and f16, rows and
/// columns that fill no block; and every stored bit is the CPU mask's decision.
#[cfg(feature = "cuda")]
#[test]
fn lora_da_from_stored_mask_bits_equals_the_drawn_mask() {
    use adapterlab_model::lora::kernels::{
        Factor, GradOut, train_add, train_da, train_h_keeping, train_term,
    };
    use adapterlab_model::ops::dropout::keep_scale;
    use candle_core::DType;
    let Some(dev) = gpu_device() else { return };
    let (key, p) = (13u64, 0.1f32);
    for (m, k, r) in [(96, 256, 16), (77, 1032, 8), (1000, 4544, 16)] {
        for dtype in [DType::BF16, DType::F16] {
            let z = waves((m, k), 1.0, 0.2, &dev).to_dtype(dtype).unwrap();
            let a = waves((r, k), 0.1, 0.3, &dev).to_dtype(dtype).unwrap();
            let gh = waves((m, r), 1.0, 0.5, &dev).to_dtype(dtype).unwrap();
            let mask = Some((key, p));
            let (h_plain, none) = train_h_keeping(&z, &a, mask, false).unwrap();
            assert!(none.is_none());
            let (h, bits) = train_h_keeping(&z, &a, mask, true).unwrap();
            let bits = bits.expect("the tensor-core kernel stores the decisions");
            let case = format!("{dtype:?} m {m} k {k} r {r}");
            assert!(host_bits(&h) == host_bits(&h_plain), "{case}: h differs");
            let bytes = bits
                .to_device(&Device::Cpu)
                .unwrap()
                .to_vec1::<u8>()
                .unwrap();
            for e in 0..m * k {
                let dropped = keep_scale(key, e as u64, p, 1.0) == 0.0;
                assert_eq!(
                    (bytes[e / 8] >> (e % 8)) & 1 == 1,
                    dropped,
                    "{case}: element {e}'s stored decision"
                );
            }
            for gelu in [false, true] {
                let drawn = train_da(&z, &gh, mask, gelu, GradOut::Half, None).unwrap();
                let read = train_da(&z, &gh, mask, gelu, GradOut::Half, Some(&bits)).unwrap();
                assert!(
                    host_bits(&drawn) == host_bits(&read),
                    "{case} gelu {gelu}: dA differs"
                );
            }
            // The input gradient's adapter term, alone and added through GELU's backward.
            let f = || Factor::RankByOut(&a);
            let drawn = train_term(&gh, f(), mask, None).unwrap();
            let read = train_term(&gh, f(), mask, Some(&bits)).unwrap();
            assert!(
                host_bits(&drawn) == host_bits(&read),
                "{case}: the term differs"
            );
            let y = waves((m, k), 0.5, 0.9, &dev).to_dtype(dtype).unwrap();
            let drawn = train_add(&y, &gh, f(), mask, Some(&z), None).unwrap();
            let read = train_add(&y, &gh, f(), mask, Some(&z), Some(&bits)).unwrap();
            assert!(
                host_bits(&drawn) == host_bits(&read),
                "{case}: the term through GELU differs"
            );
        }
    }
}

/// `train_da` given a gradient that does not start on a 16-byte boundary (a view into a larger
/// buffer) runs the kernel asked for on a copy of it: the same bits as the aligned gradient.
#[cfg(feature = "cuda")]
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "a GPU test: needs --features cuda and ADAPTERLAB_TEST_DEVICE=cuda on a GPU"
)]
#[test]
fn train_da_takes_a_misaligned_gradient() {
    use adapterlab_model::lora::kernels::{GradOut, train_da};
    use candle_core::DType;
    let Some(dev) = gpu_device() else { return };
    let (m, k, r) = (200usize, 512usize, 16usize);
    let wave = |len: usize, phase: f32| -> Vec<f32> {
        (0..len).map(|i| (i as f32 * 0.37 + phase).sin()).collect()
    };
    let z = Tensor::from_vec(wave(m * k, 0.1), (m, k), &dev)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let flat = Tensor::from_vec(wave(m * r + 3, 0.2), m * r + 3, &dev)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let shifted = flat.narrow(0, 3, m * r).unwrap().reshape((m, r)).unwrap();
    assert_eq!(shifted.layout().start_offset(), 3);
    let aligned = shifted.force_contiguous().unwrap();
    assert_eq!(aligned.layout().start_offset(), 0);
    for gelu in [false, true] {
        let mask = Some((11u64, 0.1f32));
        let want = host_f32s(&train_da(&z, &aligned, mask, gelu, GradOut::Half, None).unwrap());
        let got = host_f32s(&train_da(&z, &shifted, mask, gelu, GradOut::Half, None).unwrap());
        assert!(
            max_diff(&want, &got) == 0.0,
            "gelu {gelu}: dA from the shifted gradient differs"
        );
    }
}

/// `grad_hb` (the node's `gh = g bs` and `dB = g^T h` from one read of g, lora_mma.cu) against
/// the f32 products of the same 16-bit operands: each value is that sum rounded once to the
/// 16-bit type, up to the f32 sums' order (rows and columns that do not fill a block or a
/// chunk, slabs of rows, ranks 8 and 16, both types); a `g` whose rows are no whole number of
/// 16-byte vectors is left to the caller (`None`).
#[cfg(feature = "cuda")]
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "a GPU test: needs --features cuda and ADAPTERLAB_TEST_DEVICE=cuda on a GPU"
)]
#[test]
fn lora_grad_hb_equals_the_f32_products() {
    use adapterlab_model::lora::kernels::{GradOut, grad_hb};
    use candle_core::DType;
    let Some(dev) = gpu_device() else { return };
    let wave = |len: usize, phase: f32, shape: (usize, usize), dtype: DType| {
        let v: Vec<f32> = (0..len).map(|i| (i as f32 * 0.613 + phase).sin()).collect();
        Tensor::from_vec(v, shape, &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    let f32s = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    for (m, n, r) in [
        (37, 72, 8),
        (100, 264, 16),
        (1000, 4672, 16),
        (16, 256, 8),
        (4096, 4544, 16),
    ] {
        for dtype in [DType::BF16, DType::F16] {
            let case = format!("m {m} n {n} r {r} {dtype:?}");
            let g = wave(m * n, 0.1, (m, n), dtype);
            let bs = (wave(n * r, 0.2, (n, r), dtype) * 0.05).unwrap();
            let h = wave(m * r, 0.3, (m, r), dtype);
            let (gh, db) = grad_hb(&g, &bs, &h, GradOut::Half)
                .unwrap()
                .expect("the kernel serves");
            assert_eq!(
                (gh.dims(), db.dims()),
                ([m, r].as_slice(), [n, r].as_slice())
            );
            assert_eq!((gh.dtype(), db.dtype()), (dtype, dtype));
            let ulp = if dtype == DType::BF16 {
                1.0 / 128.0
            } else {
                1.0 / 1024.0
            };
            let (g32, bs32, h32) = (f32s(&g), f32s(&bs), f32s(&h));
            for (what, got, want, mag) in [
                (
                    "gh",
                    &gh,
                    g32.matmul(&bs32).unwrap(),
                    g32.abs().unwrap().matmul(&bs32.abs().unwrap()).unwrap(),
                ),
                (
                    "dB",
                    &db,
                    g32.t().unwrap().matmul(&h32).unwrap(),
                    g32.abs()
                        .unwrap()
                        .t()
                        .unwrap()
                        .matmul(&h32.abs().unwrap())
                        .unwrap(),
                ),
            ] {
                let (got, want, mag) = (host_f32s(got), host_f32s(&want), host_f32s(&mag));
                for (i, ((x, y), s)) in got.iter().zip(&want).zip(&mag).enumerate() {
                    assert!(
                        (x - y).abs() <= ulp * y.abs() + 1e-5 * s,
                        "{case}: {what} element {i}: {x} against the f32 product's {y}"
                    );
                }
            }
        }
    }
    // Rows of 100 values (200 bytes) are no whole number of 16-byte vectors.
    let g = wave(16 * 100, 0.1, (16, 100), DType::BF16);
    let (bs, h) = (
        wave(100 * 16, 0.2, (100, 16), DType::BF16),
        wave(16 * 16, 0.3, (16, 16), DType::BF16),
    );
    assert!(grad_hb(&g, &bs, &h, GradOut::Half).unwrap().is_none());
}

/// The AdamW kernel against the trainer's op-by-op update (host/src/train/optim.rs, restated
/// here with the same candle ops) on the CPU: the same values, with and without weight decay,
/// with and without the gradient scaled first (clipping's coefficient).
#[cfg(feature = "cuda")]
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "a GPU test: needs --features cuda and ADAPTERLAB_TEST_DEVICE=cuda on a GPU"
)]
#[test]
fn adamw_kernel_equals_the_op_by_op_update() {
    use adapterlab_model::ops::kernels::{AdamWScalars, adamw_f32};
    let Some(dev) = gpu_device() else { return };
    let cpu = Device::Cpu;
    let n = 5000;
    let mk = |k: f32| {
        let v: Vec<f32> = (0..n).map(|i| (i as f32 * k).sin() * 0.3).collect();
        Tensor::from_vec(v, n, &cpu).unwrap()
    };
    let (p, g, m) = (mk(0.37), mk(0.11), mk(0.53));
    let v = mk(0.71).abs().unwrap();
    let (beta1, beta2, eps, lr, step) = (0.9f64, 0.999f64, 1e-8f64, 2e-4f64, 3i32);
    let bc1 = 1.0 - beta1.powi(step);
    let bc2_sqrt = (1.0 - beta2.powi(step)).sqrt();
    for (weight_decay, grad_scale) in [(0.0, None), (0.01, None), (0.01, Some(0.0371))] {
        let g = match grad_scale {
            Some(c) => (&g * c).unwrap(),
            None => g.clone(),
        };
        let m2 = ((&m * beta1).unwrap() + (&g * (1.0 - beta1)).unwrap()).unwrap();
        let v2 = ((&v * beta2).unwrap() + (g.sqr().unwrap() * (1.0 - beta2)).unwrap()).unwrap();
        let p1 = if weight_decay != 0.0 {
            (&p * (1.0 - lr * weight_decay)).unwrap()
        } else {
            p.clone()
        };
        let denom = ((v2.sqrt().unwrap() / bc2_sqrt).unwrap() + eps).unwrap();
        let p2 = (p1 - ((&m2 / denom).unwrap() * (lr / bc1)).unwrap()).unwrap();
        let scalars = AdamWScalars {
            beta1,
            beta2,
            eps,
            decay: (weight_decay != 0.0).then(|| 1.0 - lr * weight_decay),
            bc2_sqrt,
            step: lr / bc1,
            grad_scale,
        };
        let on = |t: &Tensor| t.to_device(&dev).unwrap();
        let unscaled = mk(0.11);
        let (pg, mg, vg) = adamw_f32(&on(&p), &on(&unscaled), &on(&m), &on(&v), &scalars).unwrap();
        for (what, want, got) in [("p", &p2, &pg), ("m", &m2, &mg), ("v", &v2, &vg)] {
            let err = max_diff(&host_f32s(want), &host_f32s(got));
            assert!(
                err == 0.0,
                "weight decay {weight_decay}, scale {grad_scale:?}: {what} differs by {err}"
            );
        }
    }
}

/// The multi-tensor step against the per-tensor kernel (checked above against the op-by-op
/// update): the same bits for every weight and moment, over tensors that fill no chunk, one
/// chunk exactly, one element past it and several chunks; and each gradient's norm within f32
/// summation error of the norm in f64.
#[cfg(feature = "cuda")]
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "a GPU test: needs --features cuda and ADAPTERLAB_TEST_DEVICE=cuda on a GPU"
)]
#[test]
fn multi_tensor_adamw_equals_the_per_tensor_kernel() {
    use adapterlab_model::ops::kernels::{AdamWScalars, MultiTensorStep, adamw_f32};
    let Some(dev) = gpu_device() else { return };
    let sizes = [5usize, 16384, 16385, 40000, 72704];
    let mk = |n: usize, k: f32, t: usize| {
        let v: Vec<f32> = (0..n)
            .map(|i| ((i + 7 * t) as f32 * k).sin() * 0.3)
            .collect();
        Tensor::from_vec(v, n, &dev).unwrap()
    };
    let group = |k: f32| -> Vec<Tensor> {
        sizes
            .iter()
            .enumerate()
            .map(|(t, &n)| mk(n, k, t))
            .collect()
    };
    let (p, g, m) = (group(0.37), group(0.11), group(0.53));
    let v: Vec<Tensor> = group(0.71).iter().map(|t| t.abs().unwrap()).collect();
    for grad_scale in [None, Some(0.0371)] {
        let scalars = AdamWScalars {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            decay: Some(1.0 - 2e-4 * 0.01),
            bc2_sqrt: (1.0 - 0.999f64.powi(3)).sqrt(),
            step: 2e-4 / (1.0 - 0.9f64.powi(3)),
            grad_scale,
        };
        let want: Vec<_> = (0..sizes.len())
            .map(|t| adamw_f32(&p[t], &g[t], &m[t], &v[t], &scalars).unwrap())
            .collect();
        // Fresh copies: the step overwrites them.
        let copy =
            |ts: &[Tensor]| -> Vec<Tensor> { ts.iter().map(|t| t.copy().unwrap()).collect() };
        let (p2, m2, v2) = (copy(&p), copy(&m), copy(&v));
        let step = MultiTensorStep::new(&p2, &g, &m2, &v2).unwrap();
        let norms = step.grad_norms().unwrap();
        for (t, gt) in g.iter().enumerate() {
            let exact = host_f32s(gt)
                .iter()
                .map(|&x| f64::from(x).powi(2))
                .sum::<f64>()
                .sqrt();
            let rel = (f64::from(norms[t]) - exact).abs() / exact;
            assert!(rel < 1e-5, "tensor {t}: norm {} against {exact}", norms[t]);
        }
        step.adamw(&scalars).unwrap();
        for t in 0..sizes.len() {
            for (what, want, got) in [
                ("p", &want[t].0, &p2[t]),
                ("m", &want[t].1, &m2[t]),
                ("v", &want[t].2, &v2[t]),
            ] {
                let err = max_diff(&host_f32s(want), &host_f32s(got));
                assert!(
                    err == 0.0,
                    "scale {grad_scale:?}, tensor {t} ({} elements): {what} differs by {err}",
                    sizes[t]
                );
            }
        }
    }
}

/// The fused unmerged-LoRA kernels of inference against PEFT's op-by-op math on the CPU
/// (`(y in f32 + (x A^T)(B * scaling)^T)` rounded once to bf16): a few rows (`h` from
/// `lora_h`) and a prefill's many (`h` from `lora_h_rows` at ranks 8 and 16, with rows and
/// columns that do not fill its blocks and chunks, k whole and split; from cuBLAS at rank 5), ranks with a
/// `lora_out` instance of their own and one without, columns that do not fill a block.
#[cfg(feature = "cuda")]
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "a GPU test: needs --features cuda and ADAPTERLAB_TEST_DEVICE=cuda on a GPU"
)]
#[test]
fn lora_inference_kernels_equal_the_op_by_op_path() {
    use adapterlab_model::lora::kernels::lora_inference;
    use candle_core::DType;
    let Some(dev) = gpu_device() else { return };
    let cpu = Device::Cpu;
    for (m, k, n, r, scaling) in [
        (5, 300, 70, 16, 2.0),
        (200, 320, 300, 16, 2.0),
        (65, 64, 257, 5, 0.5),
        (33, 128, 40, 8, 1.0),
        (100, 1000, 64, 8, 1.0),
        // A batch-1 prefill's shape at Falcon-7B's width: k split into 9 slices.
        (200, 4544, 300, 16, 2.0),
    ] {
        let mk = |len: usize, f: f32, shape: (usize, usize)| {
            let v: Vec<f32> = (0..len).map(|i| (i as f32 * f).sin()).collect();
            Tensor::from_vec(v, shape, &cpu).unwrap()
        };
        let x = mk(m * k, 0.37, (m, k)).to_dtype(DType::BF16).unwrap();
        let y = mk(m * n, 0.11, (m, n)).to_dtype(DType::BF16).unwrap();
        let a = (mk(r * k, 0.53, (r, k)) * 0.1).unwrap();
        let b = (mk(n * r, 0.71, (n, r)) * 0.1).unwrap();
        let h = x
            .to_dtype(DType::F32)
            .unwrap()
            .matmul(&a.t().unwrap())
            .unwrap();
        let d = h.matmul(&(&b * scaling).unwrap().t().unwrap()).unwrap();
        let want = (y.to_dtype(DType::F32).unwrap() + d)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let on = |t: &Tensor| t.to_device(&dev).unwrap();
        let got = lora_inference(&on(&y), &on(&x), &on(&a), &on(&b), scaling).unwrap();
        // Summation order differs from the CPU's; a sum on a rounding boundary may land on the
        // neighbouring bf16 value.
        let err = relative_diff(&host_f32s(&want), &host_f32s(&got));
        assert!(err < 1e-2, "{m} rows, rank {r}: relative error {err}");
    }
}

/// GELU's forward kernel (`ops::gelu::gelu_erf` on the GPU in 16-bit types) against candle's
/// `gelu_erf` kernel on the same GPU, bit for bit over every bf16 and f16 value (NaN for NaN),
/// with a length that leaves a tail of single elements; a view that does not start 16-byte
/// aligned goes to candle's kernel and agrees too; and the same values repeated past
/// `GELU_TABLE_MIN` elements, which go through the table.
#[cfg(feature = "cuda")]
#[test]
fn gelu_forward_kernel_equals_candles() {
    use adapterlab_model::ops::gelu::gelu_erf;
    use candle_core::DType;
    let Some(dev) = gpu_device() else { return };
    let bits: Vec<u16> = (0..=u16::MAX).chain(0..5).collect();
    for dtype in [DType::BF16, DType::F16] {
        let x: Vec<f32> = bits
            .iter()
            .map(|&b| match dtype {
                DType::BF16 => half::bf16::from_bits(b).to_f32(),
                _ => half::f16::from_bits(b).to_f32(),
            })
            .collect();
        let x = Tensor::from_vec(x, bits.len(), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
            .to_device(&dev)
            .unwrap();
        // Every value again, repeated past the length from which the table serves.
        let copies = adapterlab_model::ops::kernels::GELU_TABLE_MIN.div_ceil(bits.len()) + 1;
        let big = Tensor::cat(&vec![&x; copies], 0).unwrap();
        for (what, x) in [
            ("aligned", x.clone()),
            ("offset", x.narrow(0, 3, bits.len() - 3).unwrap()),
            ("table", big),
        ] {
            let (ours, theirs) = (
                host_f32s(&gelu_erf(&x).unwrap()),
                host_f32s(&x.gelu_erf().unwrap()),
            );
            let differ = ours
                .iter()
                .zip(&theirs)
                .filter(|(a, b)| a.to_bits() != b.to_bits() && !(a.is_nan() && b.is_nan()))
                .count();
            assert_eq!(differ, 0, "{dtype:?} {what}: {differ} values differ");
        }
    }
}

/// GELU's backward kernel against the CPU path.
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "a GPU test: needs --features cuda and ADAPTERLAB_TEST_DEVICE=cuda on a GPU"
)]
#[test]
fn gelu_backward_kernel_equals_the_cpu_path() {
    use adapterlab_model::ops::gelu::gelu_erf_backward;
    use candle_core::DType;
    let Some(dev) = gpu_device() else { return };
    let cpu = Device::Cpu;
    let x: Vec<f32> = (0..9999).map(|i| (i as f32 * 0.013).sin() * 6.0).collect();
    let g: Vec<f32> = (0..9999).map(|i| (i as f32 * 0.07).cos()).collect();
    let (x, g) = (
        Tensor::from_vec(x, 9999, &cpu).unwrap(),
        Tensor::from_vec(g, 9999, &cpu).unwrap(),
    );
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let (x, g) = (x.to_dtype(dtype).unwrap(), g.to_dtype(dtype).unwrap());
        let want = gelu_erf_backward(&x, &g).unwrap();
        let got =
            gelu_erf_backward(&x.to_device(&dev).unwrap(), &g.to_device(&dev).unwrap()).unwrap();
        let f = host_f32s;
        let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
        let d = max_diff(&f(&got), &f(&want));
        assert!(d < tol, "{dtype:?}: differs by {d}");
    }
}

/// A training step's adapter gradients on the GPU equal the CPU's (f32, dropout on, with and
/// without activation checkpointing): every op with a hand-written backward (attention, rope,
/// layer norm, GELU, NF4 matmul, dropout) runs its CUDA path here.
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "a GPU test: needs --features cuda and ADAPTERLAB_TEST_DEVICE=cuda on a GPU"
)]
#[test]
fn training_gradients_on_the_gpu_equal_the_cpu() {
    use adapterlab_model::nn::checkpoint;
    use candle_core::{D, DType};
    let Some(dev) = gpu_device() else { return };
    for name in ["falcon_7b_style", "llama_gqa"] {
        let dir = golden_dir().join(name);
        let ids: Vec<u32> = (0..24).map(|i| (i * 37 + 5) % 256).collect();
        let grads_on = |d: &Device, ckpt: bool| -> Vec<Vec<f32>> {
            let registry = load_adapter(&dir.join("adapter"))
                .and_then(|a| a.into_registry())
                .unwrap();
            let m = load(
                dir.to_str().unwrap(),
                &LoadOptions {
                    device: d.clone(),
                    builder: LinearBuilder::nf4().with_lora_registry(registry.clone()),
                    ..LoadOptions::default()
                },
            )
            .unwrap();
            registry.set_training(true);
            registry.set_dropout_key(7, 1);
            checkpoint::set_enabled(ckpt);
            let x = Tensor::new(ids.as_slice(), d)
                .unwrap()
                .reshape((2, 12))
                .unwrap();
            let h = m.model.hidden_states(&x, None, None).unwrap();
            let logp =
                candle_nn::ops::log_softmax(&m.model.lm_head(&h).unwrap(), D::Minus1).unwrap();
            let store = logp.mean_all().unwrap().neg().unwrap().backward().unwrap();
            checkpoint::set_enabled(false);
            registry
                .layers()
                .iter()
                .flat_map(|l| [l.a.as_tensor().clone(), l.b.as_tensor().clone()])
                .map(|t| {
                    let g = store
                        .get(&t)
                        .cloned()
                        .or_else(|| checkpoint::take_grad(&t))
                        .expect("every adapter weight has a gradient");
                    g.to_device(&Device::Cpu)
                        .unwrap()
                        .to_dtype(DType::F32)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                })
                .collect()
        };
        let want = grads_on(&Device::Cpu, false);
        for ckpt in [false, true] {
            let got = grads_on(&dev, ckpt);
            assert_eq!(got.len(), want.len());
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let d = relative_diff(w, g);
                assert!(
                    d < 1e-3,
                    "{name} checkpointing={ckpt}: gradient {i} differs by {d} (relative)"
                );
            }
        }
    }
}
