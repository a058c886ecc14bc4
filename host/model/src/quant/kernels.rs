//! The host side of the NF4 kernels: quantization at load (`nf4_quantize.cu`, the GPU twin of
//! the CPU path, bit for bit), dequantization (`nf4.cu`) in one pass, every step in f32
//! with the operations bitsandbytes does and one rounding (the same bits as the CPU path; the
//! tensor-op version it replaced moved ~20 bytes per weight through five kernels, this one reads
//! half a byte and writes two), and the decoding GEMV `y = x W^T` straight from the 4-bit data
//! for up to [`GEMV_MAX_ROWS`] rows, so a token reads half a byte per weight.

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig};
use candle_core::{CudaStorage, DType, Error, Result, Storage, Tensor};

use crate::ops::kernels::{CudaInput, CudaModule, cuda_device, wrap};

/// Rows of `x` one GEMV launch handles; more rows go through dequantize + cuBLAS, or, opted
/// in, the small-batch GEMM.
pub const GEMV_MAX_ROWS: usize = 8;

/// Rows of `x` the small-batch GEMM (`nf4_gemm_small_*`) handles: batched decoding.
pub const GEMM_MAX_ROWS: usize = 32;

/// Whether batches of `GEMV_MAX_ROWS + 1 ..= GEMM_MAX_ROWS` rows multiply straight from the
/// 4-bit data (`ADAPTERLAB_NF4_SMALL_BATCH=tiled`) instead of dequantizing the weight for
/// cuBLAS (`dequantize`, the default). The tiled kernel is right (`nf4_kernels_equal_the_cpu_path`
/// passed on an H100 on 2026-12-06) but slower there: batch-16 decoding of the 7B shape ran at
/// 508 tokens/s against dequantize + cuBLAS's 825 (BENCHMARKS.md), so it stays opt-in.
pub fn small_batch_tiled() -> Result<bool> {
    const ENV: &str = "ADAPTERLAB_NF4_SMALL_BATCH";
    static CHOICE: std::sync::OnceLock<std::result::Result<bool, String>> =
        std::sync::OnceLock::new();
    CHOICE
        .get_or_init(|| {
            let chosen = crate::ops::switch::choice(ENV, &[("tiled", true), ("dequantize", false)]);
            chosen.map(|c| c.unwrap_or(false))
        })
        .clone()
        .map_err(Error::Msg)
}

pub(crate) static NF4: CudaModule =
    CudaModule::new("adapterlab_nf4", include_str!("nf4.cu"), nf4_defines);

/// Quantization at load, a module of its own so that the decoding kernels never depend on it.
pub(crate) static NF4_QUANTIZE: CudaModule = CudaModule::new(
    "adapterlab_nf4_quantize",
    include_str!("nf4_quantize.cu"),
    nf4_quantize_defines,
);

/// The GEMV's row count and the NF4 code book, as the source expects them.
fn nf4_defines() -> String {
    let table: Vec<String> = crate::quant::nf4::NF4_CODE
        .iter()
        .map(|v| format!("{v:?}f"))
        .collect();
    format!(
        "#define GEMV_MAX_ROWS {GEMV_MAX_ROWS}\n#define GEMM_MAX_ROWS {GEMM_MAX_ROWS}\n#define NF4_TABLE {}\n",
        table.join(", ")
    )
}

/// The quantization thresholds, as their f32 bits: a decimal literal would have to round to the
/// same f32 in NVRTC as in Rust, and seven of them are ties (see `NF4_THRESHOLDS`).
fn nf4_quantize_defines() -> String {
    let thresholds: Vec<String> = crate::quant::nf4::NF4_THRESHOLDS
        .iter()
        .map(|v| format!("0x{:08x}u", v.to_bits()))
        .collect();
    format!("#define NF4_THRESHOLD_BITS {}\n", thresholds.join(", "))
}

/// NF4 blocks one launch block quantizes (a warp each).
const QUANT_WARPS_PER_BLOCK: usize = 8;

/// Quantize `w` (on the GPU, bf16, f16 or f32, any shape) in blocks of `blocksize` elements of
/// its row-major order: returns the packed codes (`[ceil(n / 2)]` u8) and the per-block absmax
/// (`[ceil(n / blocksize)]` f32) on the GPU, bit-equal to `quant::nf4`'s CPU path.
pub fn quantize(w: &Tensor, blocksize: usize) -> Result<(Tensor, Tensor)> {
    crate::quant::nf4::check_blocksize(blocksize).map_err(Error::wrap)?;
    let dev = cuda_device(w)?;
    let w = w.contiguous()?;
    let n = w.elem_count();
    let nb = n.div_ceil(blocksize);
    if n == 0 {
        return Ok((
            Tensor::zeros(0, DType::U8, w.device())?,
            Tensor::zeros(0, DType::F32, w.device())?,
        ));
    }
    let input = CudaInput::of(&w)?;
    let cfg = LaunchConfig {
        grid_dim: (nb.div_ceil(QUANT_WARPS_PER_BLOCK) as u32, 1, 1),
        block_dim: (32 * QUANT_WARPS_PER_BLOCK as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let (n_i, bs) = (n as i64, blocksize as i32);
    // SAFETY: the kernel writes every byte of codes and every absmax.
    let (codes, absmax) = unsafe { (dev.alloc::<u8>(n.div_ceil(2))?, dev.alloc::<f32>(nb)?) };
    macro_rules! launch {
        ($name:literal, $t:ty) => {{
            let x = input.view::<$t>(n)?;
            crate::run_kernel!(NF4_QUANTIZE, dev, $name, cfg; &x, &n_i, &bs, &codes, &absmax)?;
        }};
    }
    match w.dtype() {
        DType::F32 => launch!("nf4_quantize_f32", f32),
        DType::BF16 => launch!("nf4_quantize_bf16", half::bf16),
        DType::F16 => launch!("nf4_quantize_f16", half::f16),
        other => return Err(Error::wrap(crate::quant::nf4::Nf4Error::BadDtype(other))),
    }
    Ok((wrap(codes, &dev, n.div_ceil(2)), wrap(absmax, &dev, nb)))
}

/// The 4-bit data of one weight on the GPU, as `linear::DeviceNf4` holds it.
pub struct Nf4Gpu<'a> {
    /// `[bytes]` u8, two codes a byte, high nibble first.
    pub codes: &'a Tensor,
    pub absmax: AbsmaxGpu<'a>,
    /// Elements of the weight.
    pub n: usize,
    /// Elements per absmax block (64).
    pub blocksize: usize,
}

pub enum AbsmaxGpu<'a> {
    /// One f32 per block.
    Plain(&'a Tensor),
    /// Double quantization: `code[q[i]] * absmax[i / blocksize] + offset`.
    Nested {
        q: &'a Tensor,
        code: &'a Tensor,
        absmax: &'a Tensor,
        offset: f32,
        blocksize: usize,
    },
}

/// Runs `f` with the CUDA slice of every input tensor (which must be fresh, offset-0 tensors of
/// the named dtype).
fn with_slices<R>(w: &Nf4Gpu, f: impl FnOnce(Slices) -> Result<R>) -> Result<R> {
    fn guard(t: &Tensor) -> Result<impl std::ops::Deref<Target = Storage> + '_> {
        if t.layout().start_offset() != 0 || !t.is_contiguous() {
            return Err(Error::Msg("NF4 CUDA kernel: input is a view".into()));
        }
        Ok(t.storage_and_layout().0)
    }
    fn cuda(s: &Storage) -> Result<&CudaStorage> {
        match s {
            Storage::Cuda(c) => Ok(c),
            _ => Err(Error::Msg(
                "NF4 CUDA kernel: input is not on the GPU".into(),
            )),
        }
    }
    let codes = guard(w.codes)?;
    match &w.absmax {
        AbsmaxGpu::Plain(a) => {
            let a = guard(a)?;
            let a = cuda(&a)?.as_cuda_slice::<f32>()?;
            let codes = cuda(&codes)?.as_cuda_slice::<u8>()?;
            f(Slices {
                codes,
                nested: 0,
                absmax: a,
                aq: codes,
                acode: a,
                offset: 0.0,
                nbs: 1,
            })
        }
        AbsmaxGpu::Nested {
            q,
            code,
            absmax,
            offset,
            blocksize,
        } => {
            let (q, code, absmax) = (guard(q)?, guard(code)?, guard(absmax)?);
            f(Slices {
                codes: cuda(&codes)?.as_cuda_slice::<u8>()?,
                nested: 1,
                absmax: cuda(&absmax)?.as_cuda_slice::<f32>()?,
                aq: cuda(&q)?.as_cuda_slice::<u8>()?,
                acode: cuda(&code)?.as_cuda_slice::<f32>()?,
                offset: *offset,
                nbs: *blocksize as i32,
            })
        }
    }
}

struct Slices<'a> {
    codes: &'a CudaSlice<u8>,
    nested: i32,
    absmax: &'a CudaSlice<f32>,
    aq: &'a CudaSlice<u8>,
    acode: &'a CudaSlice<f32>,
    offset: f32,
    nbs: i32,
}

/// The whole weight in `dtype` (bf16, f16 or f32), flat: the caller reshapes it.
pub fn dequantize(w: &Nf4Gpu, dtype: DType) -> Result<Tensor> {
    let dev = cuda_device(w.codes)?;
    let n = w.n as i64;
    let bs = w.blocksize as i32;
    let threads = 256u32;
    // Eight weights a thread where whole 4-byte words of codes share an absmax block.
    let by8 = w.n % 8 == 0 && w.blocksize % 8 == 0 && w.n <= u32::MAX as usize;
    let per_thread = if by8 { w.n / 8 } else { w.n.div_ceil(2) };
    let cfg = LaunchConfig {
        grid_dim: (per_thread.div_ceil(threads as usize) as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    with_slices(w, |s| {
        macro_rules! launch {
            ($name:literal, $name8:literal, $t:ty) => {{
                // SAFETY: every element is written by the kernel below.
                let out = unsafe { dev.alloc::<$t>(w.n)? };
                let name = if by8 { $name8 } else { $name };
                crate::run_kernel!(NF4, dev, name, cfg;
                    s.codes, &n, &bs, &s.nested, s.absmax, s.aq, s.acode, &s.offset, &s.nbs, &out,
                )?;
                Ok(wrap(out, &dev, w.n))
            }};
        }
        match dtype {
            DType::F32 => launch!("nf4_dequant_f32", "nf4_dequant8_f32", f32),
            DType::BF16 => launch!("nf4_dequant_bf16", "nf4_dequant8_bf16", half::bf16),
            DType::F16 => launch!("nf4_dequant_f16", "nf4_dequant8_f16", half::f16),
            other => Err(Error::Msg(format!(
                "NF4 dequantize to {other:?} is not supported"
            ))),
        }
    })
}

/// `x [m, k] @ W^T` for `W [n, k]` held as NF4, `x` bf16 or f16: the GEMV for
/// `m <= GEMV_MAX_ROWS` (its 16-byte-load form where `k` and the blocksize are multiples of
/// 32), else the small-batch GEMM for `m <= GEMM_MAX_ROWS` (which needs
/// `k` and the blocksize to be multiples of 8).
pub fn gemv(w: &Nf4Gpu, out_features: usize, x: &Tensor) -> Result<Tensor> {
    gemv_with(w, out_features, x, None)
}

/// An unmerged LoRA adapter's product for the GEMV to add to the base's: `h = x A^T`
/// (`[m, r]` f32, `lora::kernels::lora_h`), `b` (`[n, r]` f32) and the scaling.
pub struct LoraEpilogue<'a> {
    pub h: &'a Tensor,
    pub b: &'a Tensor,
    pub scaling: f32,
}

/// Whether [`gemv_with`] can add an adapter's product for `m` rows of `k` features: its
/// 16-byte-load GEMV serves them.
pub fn gemv_adds_lora(m: usize, k: usize, blocksize: usize) -> bool {
    (1..=GEMV_MAX_ROWS).contains(&m) && k % 32 == 0 && blocksize % 32 == 0
}

/// [`gemv`], and with `lora` the adapter's product added in the same launch (where
/// [`gemv_adds_lora`]; an error elsewhere).
pub fn gemv_with(
    w: &Nf4Gpu,
    out_features: usize,
    x: &Tensor,
    lora: Option<&LoraEpilogue>,
) -> Result<Tensor> {
    let (m, k) = x.dims2()?;
    let tiled = m > GEMV_MAX_ROWS;
    if m == 0
        || m > GEMM_MAX_ROWS
        || out_features * k != w.n
        || (tiled && (k % 8 != 0 || w.blocksize % 8 != 0))
    {
        return Err(Error::Msg(format!(
            "NF4 GEMV: {m} rows of {k} features against a weight of {} elements in blocks of {}",
            w.n, w.blocksize
        )));
    }
    let x = if x.is_contiguous() && x.layout().start_offset() == 0 {
        x.clone()
    } else {
        // A fresh, offset-0 copy; the round trip through f32 is exact for bf16 and f16.
        x.to_dtype(DType::F32)?.to_dtype(x.dtype())?
    };
    let dev = cuda_device(&x)?;
    // 16-byte loads of codes need rows (and so x's rows) on 16-byte boundaries and each load's
    // 32 weights in one absmax block.
    let by32 = k % 32 == 0 && w.blocksize % 32 == 0;
    let lora = match lora {
        None => None,
        Some(l) => {
            let (hm, r) = l.h.dims2()?;
            let (bn, br) = l.b.dims2()?;
            if !gemv_adds_lora(m, k, w.blocksize)
                || (hm, bn, br) != (m, out_features, r)
                || l.h.dtype() != DType::F32
                || l.b.dtype() != DType::F32
            {
                return Err(Error::Msg(format!(
                    "NF4 GEMV with LoRA: {m} rows of {k} features (blocks of {}), h {:?} {:?}, B {:?} {:?}, {out_features} outputs",
                    w.blocksize,
                    l.h.dims(),
                    l.h.dtype(),
                    l.b.dims(),
                    l.b.dtype()
                )));
            }
            Some((CudaInput::of(l.h)?, CudaInput::of(l.b)?, l.scaling, r))
        }
    };
    let (n_i, k_i, m_i, bs) = (out_features as i32, k as i32, m as i32, w.blocksize as i32);
    let warps_per_block = 8u32;
    let cfg = LaunchConfig {
        grid_dim: (out_features.div_ceil(warps_per_block as usize) as u32, 1, 1),
        block_dim: (32 * warps_per_block, 1, 1),
        shared_mem_bytes: 0,
    };
    let (xs, _) = x.storage_and_layout();
    let xs = match &*xs {
        Storage::Cuda(c) => c,
        _ => return Err(Error::Msg("NF4 GEMV: x is not on the GPU".into())),
    };
    with_slices(w, |s| {
        macro_rules! launch {
            ($name:literal, $t:ty) => {{
                let xv = xs.as_cuda_slice::<$t>()?;
                // SAFETY: every element is written by the kernel below.
                let out = unsafe { dev.alloc::<$t>(m * out_features)? };
                crate::run_kernel!(NF4, dev, $name, cfg;
                    s.codes, &n_i, &k_i, &bs, &s.nested, s.absmax, s.aq, s.acode, &s.offset,
                    &s.nbs, xv, &out, &m_i,
                )?;
                Ok(wrap(out, &dev, (m, out_features)))
            }};
        }
        // The 16-byte-load GEMV also takes the adapter's inputs (lr = 0: none; the absmax then
        // stands in for the pointers it never reads).
        macro_rules! launch32 {
            ($name:literal, $t:ty) => {{
                let xv = xs.as_cuda_slice::<$t>()?;
                // SAFETY: every element is written by the kernel below.
                let out = unsafe { dev.alloc::<$t>(m * out_features)? };
                match &lora {
                    Some((h, b, scaling, r)) => {
                        let (hv, bv) = (h.view::<f32>(m * r)?, b.view::<f32>(out_features * r)?);
                        let r_i = *r as i32;
                        crate::run_kernel!(NF4, dev, $name, cfg;
                            s.codes, &n_i, &k_i, &bs, &s.nested, s.absmax, s.aq, s.acode,
                            &s.offset, &s.nbs, xv, &out, &m_i, &hv, &bv, scaling, &r_i,
                        )?;
                    }
                    None => {
                        let (none, zero) = (0i32, 0f32);
                        crate::run_kernel!(NF4, dev, $name, cfg;
                            s.codes, &n_i, &k_i, &bs, &s.nested, s.absmax, s.aq, s.acode,
                            &s.offset, &s.nbs, xv, &out, &m_i, s.absmax, s.absmax, &zero, &none,
                        )?;
                    }
                }
                Ok(wrap(out, &dev, (m, out_features)))
            }};
        }
        match (x.dtype(), tiled) {
            (DType::BF16, false) if by32 => launch32!("nf4_gemv32_bf16", half::bf16),
            (DType::F16, false) if by32 => launch32!("nf4_gemv32_f16", half::f16),
            (DType::BF16, false) => launch!("nf4_gemv_bf16", half::bf16),
            (DType::F16, false) => launch!("nf4_gemv_f16", half::f16),
            (DType::BF16, true) => launch!("nf4_gemm_small_bf16", half::bf16),
            (DType::F16, true) => launch!("nf4_gemm_small_f16", half::f16),
            (other, _) => Err(Error::Msg(format!(
                "NF4 GEMV on {other:?} input is not supported"
            ))),
        }
    })
}
