//! `adapterlab bench train|generate|kernels|attention|lora`: the workloads of the GPU
//! comparison, shaped exactly as `../shared/bench/hf_qlora_baseline.py` runs them on the Python
//! stack (random token ids, full causal-LM loss, LoRA r=16/alpha=32/dropout 0.1 on an NF4
//! double-quant base, clipping at 0.1, AdamW at 2e-4; greedy decoding of fixed-length outputs
//! from 200-token prompts), so `scripts/bench/gpu_qlora.sh` can put the two side by side. One
//! JSON line per measurement.
//!
//! The training step is the trainer's own ([`accumulate_micro_batch`], clipping, optimizer);
//! only the data (random ids instead of a formatted dataset) differs. `--lengths MIN..MAX`
//! draws each example's length uniformly (seeded) as real rows vary, and `--packing` packs them
//! as the trainer's `packing = true` does (`data::pack::pack_bfd` into rows of `--seq`), so
//! padded and packed training can be compared on useful (non-pad) tokens per second.
//!
//! `bench kernels` times the NF4 products of decoding alone, one kernel at a time, so a slow
//! decoding step can be split into its kernels' shares without a GPU profiler; `bench
//! attention` and `bench lora` do the same for a training step's attention and LoRA node.

use std::path::PathBuf;
use std::time::Instant;

use adapterlab_model::engine::CausalLm;
use adapterlab_model::engine::generate::{GenerationConfig, generate_ids};
use adapterlab_model::engine::loss::{Example, Packed};
use adapterlab_model::engine::peft::{self, SaveOptions};
use adapterlab_model::engine::{Quantize, linear_builder, load_model_with};
use anyhow::{Context as _, Result};
use candle_core::{Device, Tensor};
use clap::{Args, Subcommand};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::cli::Context;
use crate::cli::model::model_runtime;
use crate::data;
use crate::train::config::AttnImplementation;
use crate::train::config::{Sampling, TrainConfig};
use crate::train::setup::load_for_training;
use crate::train::trainer::{accumulate_micro_batch, adapter_optimizer, apply_gradients};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// QLoRA training steps on random tokens (batch x seq), median step time and tokens/s.
    Train(TrainBenchArgs),
    /// Greedy decoding from random prompts at several batch sizes, adapter unmerged or merged.
    Generate(GenerateBenchArgs),
    /// The NF4 products of decoding one kernel at a time, on random weights of a model's
    /// linear shapes: microseconds a call and the 4-bit data's GB/s, for dequantize + matmul
    /// (any device) and each GPU decoding kernel that serves the rows.
    Kernels(KernelBenchArgs),
    /// Attention alone at one layer's shape, for each `attn_implementation`: the forward pass,
    /// and forward + backward, on random queries, keys and values (causal, no padding):
    /// microseconds a call and GFLOP/s of the causal products (2 forward, 5 more backward).
    Attention(AttentionBenchArgs),
    /// The LoRA training node (NF4 base + adapter, dropout drawn from a key) alone at a model's
    /// linear shapes: forward and forward + backward, and on a GPU each adapter kernel
    /// (`h = dropout(x) A^T`, `dA`) on its own; microseconds a call.
    Lora(LoraBenchArgs),
}

#[derive(Debug, Args)]
pub struct TrainBenchArgs {
    /// A local checkpoint folder (config.json + safetensors).
    #[arg(long)]
    pub model: String,
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[arg(long, default_value_t = 512)]
    pub seq: usize,
    /// Timed steps, after `--warmup` untimed ones.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Comma-separated LoRA target modules (default: every linear layer but the head).
    #[arg(long, value_delimiter = ',')]
    pub target_modules: Vec<String>,
    /// Recompute each layer's activations in backward (HF's `gradient_checkpointing`).
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// With --gradient-checkpointing, checkpoint every this many layers (1: all).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub checkpoint_every: u64,
    /// Save the trained adapter here (PEFT format), e.g. for `bench generate --adapter`.
    #[arg(long)]
    pub save: Option<PathBuf>,
    /// Examples of lengths drawn uniformly from MIN..MAX (inclusive, seeded) instead of
    /// `--seq` each; a batch is padded to its longest example.
    #[arg(long, value_parser = parse_lengths)]
    pub lengths: Option<(usize, usize)>,
    /// With --lengths: pack the examples into rows of up to `--seq` tokens (best-fit
    /// decreasing, as `packing = true`); `--batch` then counts packed rows.
    #[arg(long, requires = "lengths")]
    pub packing: bool,
    /// With --lengths: order the rows as the trainer's default `group_by_length` sampler does
    /// (HF's `LengthGroupedSampler`), so padded batches hold similar lengths: the fair
    /// baseline for packing.
    #[arg(long, requires = "lengths")]
    pub group_by_length: bool,
    /// The attention the model runs, transformers' `attn_implementation` (`eager`,
    /// `flash_attention_2`).
    #[arg(long, default_value = "eager", value_parser = parse_attention)]
    pub attn_implementation: AttnImplementation,
}

/// An `attn_implementation` name, as the training config reads it.
fn parse_attention(s: &str) -> std::result::Result<AttnImplementation, String> {
    serde_json::from_value(serde_json::Value::from(s)).map_err(|_| {
        format!(
            "{s:?} is not an attention implementation: expected one of {}",
            AttnImplementation::NAMES.join(", ")
        )
    })
}

/// `MIN..MAX` (or `MIN..=MAX`), both at least 1.
fn parse_lengths(s: &str) -> std::result::Result<(usize, usize), String> {
    let (a, b) = s
        .split_once("..=")
        .or_else(|| s.split_once(".."))
        .ok_or_else(|| format!("{s:?} is not MIN..MAX"))?;
    let parse = |x: &str| {
        x.trim()
            .parse::<usize>()
            .map_err(|e| format!("{x:?} in {s:?}: {e}"))
    };
    let (min, max) = (parse(a)?, parse(b)?);
    if min == 0 || min > max {
        return Err(format!("{s:?}: need 1 <= MIN <= MAX"));
    }
    Ok((min, max))
}

#[derive(Debug, Args)]
pub struct GenerateBenchArgs {
    /// A local checkpoint folder (config.json + safetensors).
    #[arg(long)]
    pub model: String,
    /// A PEFT adapter folder.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Also measure with the adapter merged into the weights.
    #[arg(long, requires = "adapter")]
    pub merged: bool,
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    pub batch: Vec<usize>,
    #[arg(long, default_value_t = 200)]
    pub prompt_tokens: usize,
    #[arg(long, default_value_t = 50)]
    pub new_tokens: usize,
    /// The attention the model runs, transformers' `attn_implementation` (`eager`,
    /// `flash_attention_2`).
    #[arg(long, default_value = "eager", value_parser = parse_attention)]
    pub attn_implementation: AttnImplementation,
}

#[derive(Debug, Args)]
pub struct KernelBenchArgs {
    /// `OUTxIN` shapes of the linear layers (default: Falcon-7B's query_key_value, dense,
    /// dense_h_to_4h and dense_4h_to_h).
    #[arg(long, value_delimiter = ',', value_parser = parse_shape,
        default_value = FALCON_7B_LINEARS)]
    pub shapes: Vec<(usize, usize)>,
    /// Rows of the input (the decoding batch).
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    pub rows: Vec<usize>,
    /// Timed calls of each, after 3 untimed ones.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..))]
    pub repeats: u64,
    /// Bytes of NF4 codes each shape's calls cycle through, in copies of the weight (at most
    /// 256), so that a call does not find its weight where the call before left it: an H100's L2
    /// holds 50 MB, more than Falcon-7B's QKV or attention output (10.6 and 10.3 MB), which
    /// decoding reads from memory, 31 other layers having passed through the L2 since. 0: one
    /// copy, every call on the same weight (what this bench did before 2026-12-07).
    #[arg(long, default_value_t = 256 << 20)]
    pub weight_bytes: u64,
}

#[derive(Debug, Args)]
pub struct AttentionBenchArgs {
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..))]
    pub batch: u64,
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..))]
    pub seq: u64,
    /// Query heads (default: Falcon-7B's).
    #[arg(long, default_value_t = 71, value_parser = clap::value_parser!(u64).range(1..))]
    pub heads: u64,
    /// Key/value heads, dividing `heads` (1: multi-query, as Falcon-7B).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub kv_heads: u64,
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    pub head_dim: u64,
    /// The `attn_implementation`s to time, in order.
    #[arg(long, value_delimiter = ',', value_parser = parse_attention,
        default_value = "eager,flash_attention_2")]
    pub attn_implementation: Vec<AttnImplementation>,
    /// Timed calls of each, after 2 untimed ones.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    pub repeats: u64,
}

#[derive(Debug, Args)]
pub struct LoraBenchArgs {
    /// `OUTxIN` shapes of the adapted linear layers (default: Falcon-7B's query_key_value,
    /// dense, dense_h_to_4h and dense_4h_to_h).
    #[arg(long, value_delimiter = ',', value_parser = parse_shape,
        default_value = FALCON_7B_LINEARS)]
    pub shapes: Vec<(usize, usize)>,
    /// Rows of the input (batch x sequence of a training step: 8 x 512).
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..))]
    pub rows: u64,
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..))]
    pub rank: u64,
    /// The adapter's dropout probability (the key is fixed).
    #[arg(long, default_value_t = 0.1)]
    pub dropout: f32,
    /// Timed calls of each, after 2 untimed ones.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    pub repeats: u64,
}

/// Copies of a weight of `codes` bytes of NF4 codes that `bench kernels` cycles through to read
/// `bytes` (at least 1, at most 256).
fn weight_copies(bytes: u64, codes: usize) -> usize {
    (bytes as usize).div_ceil(codes.max(1)).clamp(1, 256)
}

/// Falcon-7B's query_key_value, dense, dense_h_to_4h and dense_4h_to_h, as `OUTxIN`.
const FALCON_7B_LINEARS: &str = "4672x4544,4544x4544,18176x4544,4544x18176";

/// `OUTxIN`, both at least 1.
fn parse_shape(s: &str) -> std::result::Result<(usize, usize), String> {
    let (a, b) = s
        .split_once('x')
        .ok_or_else(|| format!("{s:?} is not OUTxIN"))?;
    let parse = |x: &str| match x.trim().parse::<usize>() {
        Ok(0) => Err(format!("{s:?}: a dimension of 0")),
        Ok(v) => Ok(v),
        Err(e) => Err(format!("{x:?} in {s:?}: {e}")),
    };
    Ok((parse(a)?, parse(b)?))
}

pub fn run(cmd: BenchCommand, ctx: &Context) -> Result<()> {
    match cmd {
        BenchCommand::Train(args) => train(args, ctx),
        BenchCommand::Generate(args) => generate(args, ctx),
        BenchCommand::Kernels(args) => kernels(args, ctx),
        BenchCommand::Attention(args) => attention(args, ctx),
        BenchCommand::Lora(args) => lora(args, ctx),
    }
}

/// Each product `x W^T` of `bench kernels`, timed on its own with the device synchronized
/// around the repeats.
fn kernels(args: KernelBenchArgs, ctx: &Context) -> Result<()> {
    use adapterlab_model::engine::Nf4Weight;
    let device = model_runtime(ctx)?.device;
    let dtype = bench_dtype(&device);
    let opts = adapterlab_model::engine::Nf4Options {
        double_quant: true,
        ..Default::default()
    };
    emit(
        json!({"what": "kernels", "speed_switches": speed_switches()?, "device": gpu_name(&device), "dtype": format!("{dtype:?}"),
        "nf4": {"blocksize": opts.blocksize, "double_quant": opts.double_quant},
        "decoding": decoding_settings(&device)?}),
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    for &(out, inp) in &args.shapes {
        let codes = (out * inp).div_ceil(2);
        let copies = weight_copies(args.weight_bytes, codes);
        // On the device, so a GPU quantizes them there, as a load does.
        let weights = (0..copies)
            .map(|_| {
                let w = uniform(&mut rng, (out, inp), 0.05, &device)?;
                Nf4Weight::quantize(&w, opts, dtype, &device)
                    .with_context(|| format!("quantizing a {out}x{inp} weight"))
            })
            .collect::<Result<Vec<_>>>()?;
        for &m in &args.rows {
            let x = uniform(&mut rng, (m, inp), 1.0, &device)?.to_dtype(dtype)?;
            let time =
                |name: &str, f: &dyn Fn(&Nf4Weight) -> candle_core::Result<Tensor>| -> Result<()> {
                    let next = std::cell::Cell::new(0usize);
                    let s = seconds_per_call(&device, 3, args.repeats, &|| {
                        let i = next.get();
                        next.set((i + 1) % weights.len());
                        f(&weights[i])?;
                        Ok(())
                    })?;
                    emit(
                        json!({"what": "kernel", "shape": [out, inp], "rows": m, "kernel": name,
                    "weight_copies": copies,
                    "us": round(s * 1e6, 1), "codes_gb_per_s": round(codes as f64 / s / 1e9, 1)}),
                    );
                    Ok(())
                };
            // What more rows than the kernels serve take: the weight dequantized, then a matmul.
            time("dequantize", &|q| {
                x.matmul(&q.dequantize_to(dtype, &device)?.t()?)
            })?;
            #[cfg(feature = "cuda")]
            {
                use adapterlab_model::engine::{DecodeKernel, Epilogue, MmaTiling, runs_mma};
                // Which kernels serve a shape is the same for every copy.
                let q = &weights[0];
                let mma = runs_mma(&device)?;
                for kernel in DecodeKernel::ALL {
                    if device.is_cuda() && kernel.serves_on(m, inp, out, q.blocks(), mma) {
                        time(kernel.name(), &|q| {
                            q.forward_from_nf4(&x, kernel, None, Epilogue::None)
                        })?;
                    }
                }
                // The tensor-core kernel's other tilings, named `mma/w8u2t1` and so on.
                let mma_serves =
                    device.is_cuda() && DecodeKernel::Mma.serves_on(m, inp, out, q.blocks(), mma);
                let decoding = MmaTiling::for_shape(m, inp, out)?;
                for tiling in MmaTiling::ALL {
                    if mma_serves && tiling != decoding && tiling.serves_rows(m) {
                        let name = format!("mma/{}", tiling.name());
                        time(&name, &|q| q.forward_mma_tiled(&x, tiling))?;
                    }
                }
            }
        }
    }
    Ok(())
}

fn attention(args: AttentionBenchArgs, ctx: &Context) -> Result<()> {
    use adapterlab_model::engine::{AttentionContext, attend_in};
    use candle_core::Var;
    let device = model_runtime(ctx)?.device;
    let [b, s, h, kv, d] = [
        args.batch,
        args.seq,
        args.heads,
        args.kv_heads,
        args.head_dim,
    ]
    .map(|x| x as usize);
    if h % kv != 0 {
        anyhow::bail!("--heads {h} is not a multiple of --kv-heads {kv}");
    }
    let dtype = bench_dtype(&device);
    emit(
        json!({"what": "attention", "speed_switches": speed_switches()?, "device": gpu_name(&device), "dtype": format!("{dtype:?}"),
        "batch": b, "seq": s, "heads": h, "kv_heads": kv, "head_dim": d}),
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let mut random = |shape: (usize, usize, usize, usize)| -> Result<Tensor> {
        Ok(uniform(&mut rng, shape, 1.0, &device)?.to_dtype(dtype)?)
    };
    let (q, k, v, g) = (
        random((b, h, s, d))?,
        random((b, kv, s, d))?,
        random((b, kv, s, d))?,
        random((b, h, s, d))?,
    );
    let scale = 1.0 / (d as f64).sqrt();
    // One causal product (s x s x d over the visible half) of every head, in FLOPs.
    let product = (2 * b * h * d) as f64 * (s * (s + 1) / 2) as f64;
    for attn in &args.attn_implementation {
        let actx = AttentionContext::new(None, b, s, 0, &device)?.with_kernel(attn.kernel());
        let time = |pass: &str, products: f64, f: &dyn Fn() -> Result<()>| -> Result<()> {
            let secs = seconds_per_call(&device, 2, args.repeats, f)?;
            emit(
                json!({"what": "attention_pass", "attn_implementation": attn.as_str(),
                "pass": pass, "us": round(secs * 1e6, 1),
                "gflop_per_s": round(products * product / secs / 1e9, 1)}),
            );
            Ok(())
        };
        time("forward", 2.0, &|| {
            attend_in(&actx, &q, &k, &v, scale, None)?;
            Ok(())
        })?;
        let (qv, kvv, vv) = (
            Var::from_tensor(&q)?,
            Var::from_tensor(&k)?,
            Var::from_tensor(&v)?,
        );
        time("forward+backward", 7.0, &|| {
            let out = attend_in(&actx, &qv, &kvv, &vv, scale, None)?;
            let grads = (out * &g)?.sum_all()?.backward()?;
            every_gradient(&grads, &[&qv, &kvv, &vv], "attention")
        })?;
    }
    Ok(())
}

/// Each adapted layer of `bench lora`: the training node's forward pass, forward + backward,
/// and on a GPU in a 16-bit type the adapter's `h` and `dA` kernels alone.
fn lora(args: LoraBenchArgs, ctx: &Context) -> Result<()> {
    use adapterlab_model::engine::{
        Adapter, BaseWeight, Dropout, Input, Nf4Options, Nf4Weight, lora_linear,
    };
    use candle_core::Var;
    use std::sync::Arc;
    if !(0.0..1.0).contains(&args.dropout) {
        anyhow::bail!("--dropout {} is not in [0, 1)", args.dropout);
    }
    let device = model_runtime(ctx)?.device;
    let (m, r) = (args.rows as usize, args.rank as usize);
    let dtype = bench_dtype(&device);
    emit(
        json!({"what": "lora", "speed_switches": speed_switches()?, "device": gpu_name(&device), "dtype": format!("{dtype:?}"),
        "rows": m, "rank": r, "dropout": round(args.dropout as f64, 6)}),
    );
    let dropout = (args.dropout > 0.0).then_some(Dropout {
        key: 7,
        p: args.dropout,
    });
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let mut random = |shape: (usize, usize), scale: f32| uniform(&mut rng, shape, scale, &device);
    for &(n, k) in &args.shapes {
        let w = random((n, k), 0.05)?;
        let base: Arc<dyn BaseWeight> = Arc::new(Nf4Weight::quantize(
            &w,
            Nf4Options::default(),
            dtype,
            &device,
        )?);
        drop(w);
        let x = Var::from_tensor(&random((m, k), 1.0)?.to_dtype(dtype)?)?;
        // A and B in f32 as a training holds them, B scaled by alpha / r = 2 (alpha 32, r 16).
        let a = Var::from_tensor(&random((r, k), 0.02)?)?;
        let b = Var::from_tensor(&random((n, r), 0.02)?)?;
        let g = random((m, n), 1.0)?.to_dtype(dtype)?;
        let time = |pass: &str, f: &dyn Fn() -> Result<()>| -> Result<()> {
            let secs = seconds_per_call(&device, 2, args.repeats, f)?;
            emit(json!({"what": "lora_pass", "shape": [n, k], "pass": pass,
                "us": round(secs * 1e6, 1)}));
            Ok(())
        };
        let adapter = Adapter {
            a: a.as_tensor(),
            b: b.as_tensor(),
            scaling: 2.0,
        };
        let node = || lora_linear(base.clone(), None, &x, adapter, dropout, Input::AsIs);
        time("forward", &|| {
            node()?;
            Ok(())
        })?;
        time("forward+backward", &|| {
            let grads = (node()? * &g)?.sum_all()?.backward()?;
            every_gradient(&grads, &[&x, &a, &b], "lora")
        })?;
        #[cfg(feature = "cuda")]
        if adapterlab_model::engine::trains(&x, r) {
            use adapterlab_model::engine::{GradOut, train_da, train_h, train_h_keeping};
            let mask = dropout.map(|d| (d.key, d.p));
            let gh = random((m, r), 1.0)?.to_dtype(dtype)?;
            let a16 = a.as_tensor().to_dtype(dtype)?;
            time("h", &|| {
                train_h(&x, &a16, mask)?;
                Ok(())
            })?;
            time("dA", &|| {
                train_da(&x, &gh, mask, false, GradOut::Half, None)?;
                Ok(())
            })?;
            // dA reading the decisions h stored, where it stores them (ADAPTERLAB_LORA_MASK).
            if let (_, Some(bits)) = train_h_keeping(&x, &a16, mask, true)? {
                time("h+store", &|| {
                    train_h_keeping(&x, &a16, mask, true)?;
                    Ok(())
                })?;
                time("dA stored", &|| {
                    train_da(&x, &gh, mask, false, GradOut::Half, Some(&bits))?;
                    Ok(())
                })?;
            }
        } else if device.is_cuda() {
            // Said, so a missing line never reads as a kernel that was not slow enough to show.
            eprintln!(
                "bench lora {n}x{k}: the adapter kernels do not serve rank {r} in {dtype:?}; \
                 only the node was timed"
            );
        }
    }
    Ok(())
}

/// The type the benches compute in: 16-bit on a GPU, as training and decoding run there; f32
/// on the CPU, whose matmul is made for it.
fn bench_dtype(device: &Device) -> candle_core::DType {
    if device.is_cuda() {
        candle_core::DType::BF16
    } else {
        candle_core::DType::F32
    }
}

/// A seeded f32 tensor of `shape` on `device`, uniform in `[-scale, scale)`.
fn uniform(
    rng: &mut rand::rngs::StdRng,
    shape: impl Into<candle_core::Shape>,
    scale: f32,
    device: &Device,
) -> Result<Tensor> {
    let shape = shape.into();
    let v: Vec<f32> = (0..shape.elem_count())
        .map(|_| rng.random_range(-scale..scale))
        .collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?.to_device(device)?)
}

/// That backward reached each of `vars` (a bench timing backward must time all of it).
fn every_gradient(
    grads: &candle_core::backprop::GradStore,
    vars: &[&candle_core::Var],
    what: &str,
) -> Result<()> {
    for v in vars {
        grads
            .get(v.as_tensor())
            .with_context(|| format!("{what}: a gradient is missing"))?;
    }
    Ok(())
}

/// Seconds a call of `f` takes on `device`: `warmup` untimed calls, then `repeats` timed ones
/// between two synchronizations (a GPU's work is queued, so the clock waits for it).
fn seconds_per_call(
    device: &Device,
    warmup: u64,
    repeats: u64,
    f: &dyn Fn() -> Result<()>,
) -> Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    device.synchronize()?;
    let t = Instant::now();
    for _ in 0..repeats {
        f()?;
    }
    device.synchronize()?;
    Ok(t.elapsed().as_secs_f64() / repeats as f64)
}

fn emit(v: serde_json::Value) {
    println!("{v}");
}

/// The speed switches set for this process (`VAR=value`), in every figure's header line: a
/// timing is reproduced only with them. A misspelt one fails the bench before it times anything.
fn speed_switches() -> Result<Vec<String>> {
    adapterlab_model::engine::switch::set_in_environment().map_err(anyhow::Error::msg)
}

fn gpu_name(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        other => format!("{:?}", other.location()),
    }
}

fn random_ids(rng: &mut rand::rngs::StdRng, n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|_| rng.random_range(0..vocab as u32)).collect()
}

fn train(args: TrainBenchArgs, ctx: &Context) -> Result<()> {
    let config = TrainConfig {
        model_name_or_path: args.model.clone(),
        lora: crate::train::config::LoraSection {
            target_modules: args.target_modules.clone(),
            ..Default::default()
        },
        gradient_checkpointing: args.gradient_checkpointing,
        gradient_checkpointing_every: args.checkpoint_every as usize,
        attn_implementation: args.attn_implementation,
        ..Default::default()
    };
    let t = Instant::now();
    let (loaded, registry, _) = load_for_training(&config, &ctx.data_dir.assets())?;
    let model: &dyn CausalLm = &loaded.model;
    let device = model.device().clone();
    let mut opt = adapter_optimizer(&config, &registry)?;
    let trainable: usize = opt.vars().iter().map(|(_, v)| v.elem_count()).sum();
    emit(
        json!({"what": "load", "s": round(t.elapsed().as_secs_f64(), 1), "trainable": trainable,
        "device": gpu_name(&device), "lora_layers": registry.layers().len(),
        "gradient_checkpointing": args.gradient_checkpointing, "checkpoint_every": args.checkpoint_every,
        "attn_implementation": args.attn_implementation.as_str(),
        "nf4_quantize": nf4_quantize_on(&device)?, "phases": load_phases()?,
        "speed_switches": speed_switches()?}),
    );
    registry.set_training(true);
    let vocab = model.vocab_size();
    if let Some((_, max)) = args.lengths
        && max > args.seq
    {
        anyhow::bail!("--lengths: MAX {max} is longer than --seq {}", args.seq);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let rows = bench_rows(&args, &mut rng, vocab);
    let mut times = Vec::new();
    let mut last_loss = 0.0;
    let (mut useful, mut padded, mut examples_seen, mut timed_s) = (0usize, 0usize, 0usize, 0.0);
    for (step, rows) in rows.chunks(args.batch).enumerate() {
        let refs: Vec<&Packed> = rows.iter().collect();
        let batch = data::collate_packed(&refs, 0, &device)?;
        device.synchronize()?;
        if step == args.warmup {
            // The profile counts timed steps only.
            adapterlab_model::engine::profile::take()?;
        }
        let t = Instant::now();
        registry.set_dropout_key(config.seed, step as u64);
        let mut grads: Vec<Option<Tensor>> = vec![None; opt.vars().len()];
        last_loss = accumulate_micro_batch(model, &batch, batch.n_targets, opt.vars(), &mut grads)?;
        let grad_norm =
            apply_gradients(&mut opt, grads, config.max_grad_norm, config.learning_rate)?;
        device.synchronize()?;
        let s = t.elapsed().as_secs_f64();
        emit(
            json!({"what": "step", "step": step, "s": round(s, 4), "loss": round(last_loss, 4),
            "grad_norm": round(grad_norm, 4), "timed": step >= args.warmup}),
        );
        if step >= args.warmup {
            times.push(s);
            timed_s += s;
            useful += batch.n_tokens;
            padded += batch.rows * batch.width;
            examples_seen += rows.iter().map(|r| r.seq_lengths.len()).sum::<usize>();
        }
    }
    times.sort_by(f64::total_cmp);
    if let Some(&median) = times.get(times.len() / 2) {
        // Fixed lengths keep `tokens_per_s` as it was (batch × seq over the median step); with
        // --lengths steps differ in size, so it is the padded tokens over the timed steps' time.
        let tokens_per_s = match args.lengths {
            None => (args.batch * args.seq) as f64 / median,
            Some(_) => padded as f64 / timed_s,
        };
        emit(
            json!({"what": "train_step", "batch": args.batch, "seq": args.seq, "gradient_checkpointing": args.gradient_checkpointing, "checkpoint_every": args.checkpoint_every,
            "median_s": round(median, 4), "tokens_per_s": round(tokens_per_s, 1),
            "loss": round(last_loss, 4),
            "lengths": args.lengths.map(|(a, b)| format!("{a}..{b}")), "packing": args.packing,
            "packed_attention": packed_attention(&args, &device)?,
            "group_by_length": args.group_by_length,
            "useful_tokens_per_s": round(useful as f64 / timed_s, 1),
            "padded_tokens_per_s": round(padded as f64 / timed_s, 1),
            "examples_per_s": round(examples_seen as f64 / timed_s, 2),
            "pad_fraction": round(1.0 - useful as f64 / padded.max(1) as f64, 4)}),
        );
    }
    emit_profile(args.steps)?;
    if let Some(dir) = &args.save {
        let opts = SaveOptions {
            base_model_name_or_path: Some(args.model.clone()),
            ..Default::default()
        };
        peft::save_adapter(dir, &registry, &opts)
            .with_context(|| format!("saving the adapter to {}", dir.display()))?;
        emit(json!({"what": "saved", "adapter": dir}));
    }
    Ok(())
}

fn generate(args: GenerateBenchArgs, ctx: &Context) -> Result<()> {
    let rt = model_runtime(ctx)?;
    let builder = linear_builder(Quantize::Nf4, args.adapter.as_deref())?;
    let registry = builder.lora().cloned();
    let t = Instant::now();
    let mut loaded = load_model_with(&args.model, builder, &rt)?;
    loaded
        .model
        .set_attention(args.attn_implementation.kernel())?;
    let model: &dyn CausalLm = &loaded.model;
    let device = model.device().clone();
    emit(
        json!({"what": "load", "s": round(t.elapsed().as_secs_f64(), 1),
        "device": gpu_name(&device), "adapter": args.adapter,
        "attn_implementation": args.attn_implementation.as_str(),
        "nf4_quantize": nf4_quantize_on(&device)?, "decoding": decoding_settings(&device)?,
        "phases": load_phases()?, "speed_switches": speed_switches()?}),
    );
    let vocab = model.vocab_size();
    let mut modes = vec![false];
    if args.merged {
        modes.push(true);
    }
    for merged in modes {
        if let Some(reg) = &registry {
            if merged {
                reg.merge_all()?;
            } else {
                reg.unmerge_all();
            }
        }
        for &b in &args.batch {
            let mut rng = rand::rngs::StdRng::seed_from_u64(b as u64);
            let prompts: Vec<Vec<u32>> = (0..b)
                .map(|_| random_ids(&mut rng, args.prompt_tokens, vocab))
                .collect();
            // No EOS: every row produces exactly `new_tokens`, as `min_new_tokens` does there.
            let warm = GenerationConfig::greedy(4, vec![], 0);
            tracing::info!(batch = b, merged, "warm-up");
            generate_ids(model, &prompts, &warm)?;
            tracing::info!(batch = b, merged, "measuring");
            device.synchronize()?;
            // The prompt pass alone, to tell prefill from decoding.
            let prefill = GenerationConfig::greedy(1, vec![], 0);
            let t = Instant::now();
            generate_ids(model, &prompts, &prefill)?;
            device.synchronize()?;
            let prefill_s = t.elapsed().as_secs_f64();
            let cfg = GenerationConfig::greedy(args.new_tokens, vec![], 0);
            adapterlab_model::engine::profile::take()?;
            let t = Instant::now();
            let out = generate_ids(model, &prompts, &cfg)?;
            device.synchronize()?;
            let s = t.elapsed().as_secs_f64();
            let n: usize = out.tokens.iter().map(Vec::len).sum();
            // The ids chosen, as one FNV-1a hash: builds and switches that must give the same
            // tokens can be compared from their reports.
            let ids_fnv = out
                .tokens
                .iter()
                .flatten()
                .flat_map(|id| id.to_le_bytes())
                .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                    (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
                });
            emit(
                json!({"what": "generate", "batch": b, "prompt": args.prompt_tokens,
                "new": args.new_tokens, "merged": merged, "adapter": registry.is_some(),
                "s": round(s, 3), "prefill_s": round(prefill_s, 3), "tokens_per_s": round(n as f64 / s, 1),
                "ids_fnv": format!("{ids_fnv:016x}")}),
            );
            emit_profile(1)?;
        }
    }
    Ok(())
}

/// With `ADAPTERLAB_PROFILE=1`: where the load's time went, seconds per profiled phase
/// (`load.read`: the weights to be quantized, from the files to the device; `load.nf4`:
/// quantizing them, with `load.nf4.*` its parts; the rest of the load's `s` is everything
/// else: dense weights, adapters, tokenizer); `null` without it.
fn load_phases() -> Result<serde_json::Value> {
    if !adapterlab_model::engine::profile::enabled() {
        return Ok(serde_json::Value::Null);
    }
    let phases: serde_json::Map<String, serde_json::Value> =
        adapterlab_model::engine::profile::take()?
            .into_iter()
            .map(|(name, s, calls)| (name, json!({"s": round(s, 3), "calls": calls})))
            .collect();
    Ok(serde_json::Value::Object(phases))
}

/// Where the load quantized to NF4 (`ADAPTERLAB_NF4_QUANTIZE`): "gpu" or "cpu" on a CUDA
/// device; the CPU device always quantizes on the CPU.
/// The decoding speed switches in force, as `{variable: value}`.
fn decoding_settings(device: &Device) -> Result<serde_json::Value> {
    let settings = adapterlab_model::engine::decoding_settings(device)?;
    Ok(settings
        .into_iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::from(v)))
        .collect::<serde_json::Map<_, _>>()
        .into())
}

fn nf4_quantize_on(device: &Device) -> Result<&'static str> {
    use adapterlab_model::engine::QuantizeOn;
    Ok(if device.is_cuda() {
        QuantizeOn::from_env()?.as_str()
    } else {
        QuantizeOn::Cpu.as_str()
    })
}

/// The packed-row attention eager attention is set to on `device` (`ADAPTERLAB_PACKED_ATTENTION`,
/// else the device's default); null unpacked or with flash attention, which reads packed rows
/// directly. `regroup` still masks a batch where regrouping would save no scores, or where the
/// model adds ALiBi (`attention::attend_in`).
fn packed_attention(args: &TrainBenchArgs, device: &Device) -> Result<Option<&'static str>> {
    use adapterlab_model::engine::{AttentionKernel, PackedAttention};
    if !args.packing || args.attn_implementation.kernel() == AttentionKernel::Flash {
        return Ok(None);
    }
    Ok(Some(PackedAttention::for_device(device)?.as_str()))
}

/// With `ADAPTERLAB_PROFILE=1`: seconds per step in each profiled phase (see
/// `adapterlab_model::engine::profile`; scopes nest, so a parent includes its children).
fn emit_profile(per: usize) -> Result<()> {
    if !adapterlab_model::engine::profile::enabled() {
        return Ok(());
    }
    for (name, s, calls) in adapterlab_model::engine::profile::take()? {
        let per = per.max(1) as f64;
        emit(
            json!({"what": "profile", "phase": name, "s_per_step": round(s / per, 4),
            "calls_per_step": round(calls as f64 / per, 1)}),
        );
    }
    Ok(())
}

/// Every step's rows, `batch` a step: random ids with HF's `labels=input_ids` (every token but
/// the first predicted), each `--seq` long, or `--lengths` long, packed with `--packing`.
fn bench_rows(args: &TrainBenchArgs, rng: &mut rand::rngs::StdRng, vocab: usize) -> Vec<Packed> {
    let needed = (args.warmup + args.steps) * args.batch;
    let example = |rng: &mut rand::rngs::StdRng, n: usize| Example {
        input_ids: random_ids(rng, n, vocab),
        targets: (0..n).map(|t| t > 0).collect(),
    };
    let Some((min, max)) = args.lengths else {
        return (0..needed)
            .map(|_| Packed::single(example(rng, args.seq)))
            .collect();
    };
    if !args.packing {
        let rows: Vec<Packed> = (0..needed)
            .map(|_| {
                let n = rng.random_range(min..=max);
                Packed::single(example(rng, n))
            })
            .collect();
        return grouped(args, rows);
    }
    // As the trainer packs a dataset: a thousand examples at a time.
    let mut rows = Vec::new();
    while rows.len() < needed {
        let chunk: Vec<Example> = (0..data::pack::TRL_MAP_BATCH)
            .map(|_| {
                let n = rng.random_range(min..=max);
                example(rng, n)
            })
            .collect();
        rows.extend(data::pack::pack_bfd(&chunk, args.seq));
    }
    // The trainer samples rows in a seeded order, not in the order they were opened (the
    // first rows of a chunk are the fullest).
    rows.shuffle(rng);
    rows.truncate(needed);
    grouped(args, rows)
}

/// `rows` in the order of the trainer's length-grouped sampler with `--group-by-length`.
fn grouped(args: &TrainBenchArgs, rows: Vec<Packed>) -> Vec<Packed> {
    if !args.group_by_length {
        return rows;
    }
    let lengths: Vec<usize> = rows.iter().map(|r| r.row.input_ids.len()).collect();
    let order = data::epoch_batches(&lengths, args.batch, Sampling::GroupByLength, 42, 0);
    order
        .into_iter()
        .flatten()
        .map(|i| rows[i].clone())
        .collect()
}

fn round(v: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (v * p).round() / p
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Falcon-7B's QKV (10.6 MB of codes) in 26 copies to read 256 MiB; tiny weights at the cap;
    /// 0 bytes or a weight past them in one copy.
    #[test]
    fn bench_kernels_cycles_through_enough_copies() {
        let mib256 = 256 << 20;
        assert_eq!(weight_copies(mib256, 4672 * 4544 / 2), 26);
        assert_eq!(weight_copies(mib256, 4096), 256);
        assert_eq!(weight_copies(0, 4096), 1);
        assert_eq!(weight_copies(mib256, 1 << 30), 1);
    }
}
