//! The host side of the unmerged LoRA inference kernels (`lora.cu`).

use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
use candle_core::{DType, Error, Result, Tensor};

use crate::ops::kernels::{
    CudaInput, CudaModule, aligned, cuda_device, no_defines, start_aligned, wrap,
};

/// This wing's kernel module, for [`crate::engine::device::compile_kernels`].
pub fn modules() -> [&'static CudaModule; 2] {
    [&LORA, &LORA_MMA]
}

pub(crate) static LORA: CudaModule = CudaModule::new(
    "adapterlab_lora",
    concat!(include_str!("../ops/dot16.cu"), include_str!("lora.cu")),
    no_defines,
);

/// The training node's `h` and `dA` on the tensor cores (`lora_mma.cu`), a module of its own
/// for the architecture its `mma.sync` needs.
pub(crate) static LORA_MMA: CudaModule = CudaModule::new(
    "adapterlab_lora_mma",
    concat!(include_str!("../ops/mma.cu"), include_str!("lora_mma.cu")),
    no_defines,
)
.for_arch("compute_80");

/// `ADAPTERLAB_DECODE_LORA_H`: where decoding through an unmerged adapter on an NF4 base
/// computes `h = x A^T`: `launch` (the default), in blocks of the decoding kernel's own launch
/// where it can (`quant::kernels::LoraH::FromA`), or `separate`, [`lora_h`]'s launch before it.
/// The same bits either way.
static DECODE_H: crate::ops::switch::Switch<bool> = crate::ops::switch::Switch::new(
    "ADAPTERLAB_DECODE_LORA_H",
    &[("launch", true), ("separate", false)],
);

/// Whether decoding computes an adapter's `h` in the product's launch ([`DECODE_H`]).
pub fn h_in_launch() -> Result<bool> {
    Ok(DECODE_H.in_force(true)?.0)
}

/// The `ADAPTERLAB_DECODE_LORA_H` in force, for reports.
pub fn h_setting() -> Result<&'static str> {
    Ok(DECODE_H.in_force(true)?.1)
}

/// `ADAPTERLAB_LORA_TRAIN_KERNELS`: where the training node's `h` and `dA` multiply, `mma` (the
/// tensor cores, the default from sm_80 on) or `simt` (lora.cu's, on the CUDA cores, the only
/// kind before sm_80). The same operands either way, summed in another order; a speed switch
/// to measure the two in one device call.
static TRAIN_KERNELS: crate::ops::switch::Switch<bool> = crate::ops::switch::Switch::new(
    "ADAPTERLAB_LORA_TRAIN_KERNELS",
    &[("mma", true), ("simt", false)],
);

/// Whether `h` and `dA` run on the tensor cores on `device` ([`TRAIN_KERNELS`]); asking for
/// them on a GPU without them is an error, not a quiet fallback.
fn tensor_cores(device: &candle_core::Device) -> Result<bool> {
    let capable = crate::ops::kernels::sm80_or_later(device)?;
    match TRAIN_KERNELS.get()? {
        Some(true) if !capable => Err(Error::Msg(
            "ADAPTERLAB_LORA_TRAIN_KERNELS=mma: the tensor-core kernels need sm_80 or later".into(),
        )),
        Some(choice) => Ok(choice),
        None => Ok(capable),
    }
}

/// Rows of `x` up to which [`lora_h`] takes a block a row and rank.
pub const LORA_H_MAX_ROWS: usize = 64;

/// Ranks `lora_h_rows` has an instance for (PEFT's default 8, and 16).
const LORA_H_ROWS_RANKS: [usize; 2] = [8, 16];

/// Ranks `lora_out` has an instance for, with B's row held in registers; other ranks take the
/// instance that reads it from memory.
const LORA_OUT_RANKS: [usize; 4] = [8, 16, 32, 64];

/// Rows one block of `lora_train_add` covers (`LORA_OUT_ROWS` in lora.cu), and the most one of
/// `lora_out` does.
const LORA_OUT_ROWS: usize = 32;

/// Blocks a launch splits its work into where it can choose (`lora_out`'s rows, `lora_h_rows`'
/// slices of k): two an H100 multiprocessor. A constant, not the card's count, where the split
/// decides an order of sums, so results do not depend on the card.
const FILL_BLOCKS: usize = 264;

/// Rows a block of `lora_out` takes for `m` rows and `n` columns (512 columns a block): enough
/// blocks to fill the GPU, at most [`LORA_OUT_ROWS`].
fn lora_out_rows(m: usize, n: usize) -> usize {
    let row_blocks = FILL_BLOCKS.div_ceil(n.div_ceil(512).max(1));
    m.div_ceil(row_blocks).clamp(1, LORA_OUT_ROWS)
}

/// `y + (x A^T)(B * scaling)^T` for an adapter at inference: `x` `[m, k]` and `y` `[m, n]` in
/// bf16 or f16 (both contiguous), `a` `[r, k]` and `b` `[n, r]` in f32. Two launches instead of
/// the eight of the op-by-op version, which dominated unmerged decoding, and no `[m, n]` f32
/// temporaries, which dominated a prefill's adapters (2026-12-06: 119 of a 218 ms prefill of 16
/// rows of 200 tokens).
pub fn lora_inference(
    y: &Tensor,
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scaling: f64,
) -> Result<Tensor> {
    let dev = cuda_device(y)?;
    let (m, k) = x.dims2()?;
    let (m2, n) = y.dims2()?;
    let (r, k2) = a.dims2()?;
    let (n2, r2) = b.dims2()?;
    if m != m2 || k != k2 || n != n2 || r != r2 || x.dtype() != y.dtype() {
        return Err(Error::Msg(format!(
            "lora inference: x {:?} {:?}, y {:?} {:?}, A {:?}, B {:?}",
            x.dims(),
            x.dtype(),
            y.dims(),
            y.dtype(),
            a.dims(),
            b.dims()
        )));
    }
    let h = lora_h(x, a)?;
    let ys = CudaInput::of(y)?;
    let (hs, b_in) = (CudaInput::of(&h)?, CudaInput::of(b)?);
    let (hv, bv) = (hs.view::<f32>(m * r)?, b_in.view::<f32>(n * r)?);
    let rows = lora_out_rows(m, n);
    let (r_i, n_i, m_i, rows_i) = (r as i32, n as i32, m as i32, rows as i32);
    let scale = scaling as f32;
    // Two columns a thread.
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(512) as u32, m.div_ceil(rows) as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let rank = if LORA_OUT_RANKS.contains(&r) { r } else { 0 };
    macro_rules! launch {
        ($dtype:literal, $t:ty) => {{
            let yv = ys.view::<$t>(m * n)?;
            // SAFETY: every element is written by the kernel below.
            let out = unsafe { dev.alloc::<$t>(m * n)? };
            let name = format!("lora_out_{}_r{rank}", $dtype);
            crate::ops::profile::scope("lora.out", y.device(), || {
                crate::run_kernel!(LORA, dev, &name, cfg;
                    &yv, &hv, &bv, &scale, &out, &n_i, &r_i, &m_i, &rows_i,
                )
            })?;
            Ok(wrap(out, &dev, (m, n)))
        }};
    }
    match y.dtype() {
        DType::BF16 => launch!("bf16", half::bf16),
        DType::F16 => launch!("f16", half::f16),
        other => Err(Error::Msg(format!(
            "lora inference on {other:?} is not supported"
        ))),
    }
}

/// `h = x A^T` in f32 (`[m, r]`), for `x` `[m, k]` bf16 or f16 and `a` `[r, k]` f32 (both
/// contiguous): the adapter's first product, which [`lora_inference`] or the NF4 GEMV's
/// epilogue (`quant::kernels::gemv_with`) finishes. Up to [`LORA_H_MAX_ROWS`] rows, a block a
/// row and rank (`lora_h`); a prefill's rows at ranks 8 and 16 (`lora_h_rows`: a block takes
/// `512 / r` rows); other prefills, or rows whose length is not a multiple of 8 or that do not
/// start 16-byte aligned, through cuBLAS on x converted to f32, as the op-by-op path computes
/// it. Timed as the profile's `lora.h`.
pub fn lora_h(x: &Tensor, a: &Tensor) -> Result<Tensor> {
    crate::ops::profile::scope("lora.h", x.device(), || adapter_product(x, a))
}

fn adapter_product(x: &Tensor, a: &Tensor) -> Result<Tensor> {
    let dev = cuda_device(x)?;
    let (m, k) = x.dims2()?;
    let (r, k2) = a.dims2()?;
    if k != k2 || a.dtype() != DType::F32 {
        return Err(Error::Msg(format!(
            "lora h: x {:?}, A {:?} {:?}",
            x.dims(),
            a.dims(),
            a.dtype()
        )));
    }
    let by_rows = m > LORA_H_MAX_ROWS;
    // lora_h_rows reads x 16 bytes and A 16 bytes at a time, from where their views start.
    let aligned = k.is_multiple_of(8)
        && x.layout().start_offset().is_multiple_of(8)
        && a.layout().start_offset().is_multiple_of(4);
    if by_rows && !(LORA_H_ROWS_RANKS.contains(&r) && aligned) {
        return x.to_dtype(DType::F32)?.matmul(&a.t()?)?.contiguous();
    }
    let (xs, a_in) = (CudaInput::of(x)?, CudaInput::of(a)?);
    let av = a_in.view::<f32>(r * k)?;
    // A prefill's rows leave most multiprocessors idle unless k is split too; the slices' sums
    // are added in order (lora_h_sum_f32).
    let row_blocks = m.div_ceil(512 / r);
    let (splits, k_per) = if by_rows {
        split_reduction(row_blocks, k, LH_KC)
    } else {
        (1, k)
    };
    // SAFETY: every element is written by the kernel below (each slice's, where k is split).
    let h = unsafe { dev.alloc::<f32>(splits * m * r)? };
    let (k_i, r_i, m_i, k_per_i) = (k as i32, r as i32, m as i32, k_per as i32);
    let cfg = if by_rows {
        LaunchConfig {
            grid_dim: (row_blocks as u32, splits as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    } else {
        // Any multiple of 32 gives the same bits (block_dot16); 256 as the decoding kernel's.
        LaunchConfig {
            grid_dim: ((m * r) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    };
    macro_rules! launch {
        ($dtype:literal, $t:ty) => {{
            let xv = xs.view::<$t>(m * k)?;
            if by_rows {
                let name = format!("lora_h_rows_{}_r{r}", $dtype);
                crate::run_kernel!(LORA, dev, &name, cfg; &xv, &av, &h, &k_i, &k_per_i, &m_i)?;
            } else {
                let name = format!("lora_h_{}", $dtype);
                crate::run_kernel!(LORA, dev, &name, cfg; &xv, &av, &h, &k_i, &r_i, &m_i)?;
            }
        }};
    }
    match x.dtype() {
        DType::BF16 => launch!("bf16", half::bf16),
        DType::F16 => launch!("f16", half::f16),
        other => {
            return Err(Error::Msg(format!(
                "lora inference on {other:?} is not supported"
            )));
        }
    }
    if splits == 1 {
        return Ok(wrap(h, &dev, (m, r)));
    }
    let n = m * r;
    // SAFETY: every element is written by the kernel below.
    let sum = unsafe { dev.alloc::<f32>(n)? };
    let (splits_i, n_i) = (splits as i32, n as i32);
    crate::run_kernel!(LORA, dev, "lora_h_sum_f32", LaunchConfig::for_num_elems(n as u32);
        &h, &sum, &splits_i, &n_i)?;
    Ok(wrap(sum, &dev, (m, r)))
}

/// Ranks the training node's kernels have instances for (`lora_train_h`, `lora_train_add`).
const TRAIN_RANKS: [usize; 2] = [8, 16];

/// Whether the training node's kernels serve an adapter of rank `r` on `x` (`[m, k]`): a GPU,
/// a 16-bit type, a rank with an instance, rows a whole number of 16-byte vectors starting on
/// one, and something to compute (an empty `x` would launch no blocks). Elsewhere the node runs
/// op by op.
pub fn trains(x: &Tensor, r: usize) -> bool {
    let k = x.dims().last().copied().unwrap_or(0);
    x.elem_count() > 0
        && x.device().is_cuda()
        && matches!(x.dtype(), DType::BF16 | DType::F16)
        && TRAIN_RANKS.contains(&r)
        && k.is_multiple_of(8)
        && x.is_contiguous()
        && x.layout().start_offset().is_multiple_of(8)
}

/// `(key, p)` of the seeded dropout a training kernel applies (`crate::ops::dropout`).
pub type Mask = Option<(u64, f32)>;

fn mask_args(mask: Mask) -> (u64, f32, f32) {
    match mask {
        Some((key, p)) if p > 0.0 => (key, p, 1.0 / (1.0 - p)),
        _ => (0, 0.0, 1.0),
    }
}

/// The training node's `h = dropout(z) A^T` (`[m, r]`, in z's type) for `z` `[m, k]` and `a`
/// `[r, k]` in one 16-bit type ([`trains`] must hold): the op-by-op graph's sums (z dropped and
/// rounded as the dropout op writes it, f32 sums rounded once), without the dropped copy of z.
/// k is split among blocks where the rows alone would leave the GPU's multiprocessors idle;
/// the slices' sums are added in order, so the value does not depend on the card.
pub fn train_h(z: &Tensor, a: &Tensor, mask: Mask) -> Result<Tensor> {
    train_h_keeping(z, a, mask, false).map(|(h, _)| h)
}

/// `ADAPTERLAB_LORA_MASK`: whether the training node's `h` kernel stores the dropout decisions
/// it draws (`stored`, the default: one bit an element, which `dA` reads instead of hashing
/// again) or `dA` draws them again (`drawn`). The same decisions either way; a speed switch to
/// measure the two in one device call.
static MASK: crate::ops::switch::Switch<bool> = crate::ops::switch::Switch::new(
    "ADAPTERLAB_LORA_MASK",
    &[("stored", true), ("drawn", false)],
);

/// [`train_h`], and where `keep` is set, dropout is on and the tensor-core kernel runs with
/// [`MASK`] at `stored`, the decisions it drew: one bit an element of `z` (bit `e % 8` of byte
/// `e / 8`, `e` the element's index), for [`train_da`].
pub fn train_h_keeping(
    z: &Tensor,
    a: &Tensor,
    mask: Mask,
    keep: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let dev = cuda_device(z)?;
    let (m, k) = z.dims2()?;
    let (r, k2) = a.dims2()?;
    if k != k2 || a.dtype() != z.dtype() || !trains(z, r) || !start_aligned(a, 8) {
        return Err(Error::Msg(format!(
            "lora training h: z {:?} {:?}, A {:?} {:?}",
            z.dims(),
            z.dtype(),
            a.dims(),
            a.dtype()
        )));
    }
    let mma = tensor_cores(z.device())?;
    // A block's rows and the chunk of k its warps walk together.
    let (rows, chunk, kernel, module) = if mma {
        (LHM_ROWS, LHM_CHUNK, "lora_train_h_mma", &LORA_MMA)
    } else {
        (512 / r, LH_KC, "lora_train_h", &LORA)
    };
    let row_blocks = m.div_ceil(rows);
    let (splits, k_per) = split_reduction(row_blocks, k, chunk);
    let (zs, as_) = (CudaInput::of(z)?, CudaInput::of(a)?);
    // SAFETY: each slice's block writes every element of its rows' partial sums.
    let part = unsafe { dev.alloc::<f32>(splits * m * r)? };
    let (k_i, k_per_i, m_i) = (k as i32, k_per as i32, m as i32);
    let (key, p, scale) = mask_args(mask);
    let store = keep && mma && p > 0.0 && MASK.get()?.unwrap_or(true);
    // SAFETY: with `store` the kernel writes every byte (each element of z is in one block's
    // words); without, the one byte is never read or written.
    let bits = unsafe { dev.alloc::<u8>(if store { (m * k).div_ceil(8) } else { 1 })? };
    let store_i = i32::from(store);
    let cfg = LaunchConfig {
        grid_dim: (row_blocks as u32, splits as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    macro_rules! launch {
        ($dtype:literal, $t:ty) => {{
            let (zv, av) = (zs.view::<$t>(m * k)?, as_.view::<$t>(r * k)?);
            let name = format!("{kernel}_{}_r{r}", $dtype);
            if mma {
                crate::run_kernel!(*module, dev, &name, cfg;
                    &zv, &av, &part, &k_i, &k_per_i, &m_i, &key, &p, &scale, &bits, &store_i)?;
            } else {
                crate::run_kernel!(*module, dev, &name, cfg;
                    &zv, &av, &part, &k_i, &k_per_i, &m_i, &key, &p, &scale)?;
            }
        }};
    }
    crate::ops::profile::scope("lora.train.h", z.device(), || {
        match z.dtype() {
            DType::BF16 => launch!("bf16", half::bf16),
            DType::F16 => launch!("f16", half::f16),
            other => return Err(unsupported(other)),
        }
        let h = sum_slices(&dev, z.dtype(), &part, splits, (m, r), GradOut::Half)?;
        let kept = store.then(|| wrap(bits, &dev, (m * k).div_ceil(8)));
        Ok((h, kept))
    })
}

/// The training node's `dA = gh^T dropout(z)` (`[r, k]`, in z's type) for `z` `[m, k]` and
/// `gh` `[m, r]` (the gradient of `h`) in one 16-bit type ([`trains`] must hold): the op-by-op
/// graph's operand (z dropped and rounded as the dropout op writes it) without its dropped
/// copy. With `gelu`, `z` is the pre-activation and the kernel takes `gelu_erf(z)` as candle's
/// op rounds it, so backward never writes the activation again. The rows are split into slabs
/// where the columns alone would leave multiprocessors idle; the slabs' sums are added in order
/// and go out as `to` says.
pub fn train_da(
    z: &Tensor,
    gh: &Tensor,
    mask: Mask,
    gelu: bool,
    to: GradOut,
    bits: Option<&Tensor>,
) -> Result<Tensor> {
    let dev = cuda_device(z)?;
    let (m, k) = z.dims2()?;
    let (m2, r) = gh.dims2()?;
    if m != m2 || gh.dtype() != z.dtype() || !trains(z, r) || !gh.is_contiguous() {
        return Err(Error::Msg(format!(
            "lora training dA: z {:?} {:?}, gh {:?} {:?}",
            z.dims(),
            z.dtype(),
            gh.dims(),
            gh.dtype()
        )));
    }
    // lora_mma.cu's kernel stages the same chunks (DAM_COLS, DAM_ROWS) as lora.cu's.
    let mma = tensor_cores(z.device())?;
    // The tensor-core kernel reads gh's rows as 16-byte vectors: a gh that does not start on
    // one is copied into a fresh buffer, so the kernel asked for is the kernel that runs.
    let gh = if mma { aligned(gh, 8)? } else { gh.clone() };
    let gh = &gh;
    let (kernel, module) = if mma {
        ("lora_train_da_mma", &LORA_MMA)
    } else {
        ("lora_train_da", &LORA)
    };
    let col_blocks = k.div_ceil(DA_COLS);
    let (slabs, rows_per) = split_reduction(col_blocks, m, DA_ROWS);
    let (zs, ghs) = (CudaInput::of(z)?, CudaInput::of(gh)?);
    // SAFETY: each slab's blocks write every element of its partial sums.
    let part = unsafe { dev.alloc::<f32>(slabs * r * k)? };
    let (k_i, rows_per_i, m_i) = (k as i32, rows_per as i32, m as i32);
    let (key, p, scale) = mask_args(mask);
    // The decisions h stored (one bit an element of z), read instead of drawn again; only the
    // tensor-core kernel reads them.
    let (bits_t, stored) = stored_bits(bits.filter(|_| mma), p, m * k, z.device())?;
    let bs_in = CudaInput::of(&bits_t)?;
    let bits_v = bs_in.view::<u8>(bits_t.elem_count())?;
    let stored_i = i32::from(stored);
    let cfg = LaunchConfig {
        grid_dim: (col_blocks as u32, slabs as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    macro_rules! launch {
        ($dtype:literal, $t:ty) => {{
            let (zv, gv) = (zs.view::<$t>(m * k)?, ghs.view::<$t>(m * r)?);
            let act = if gelu { "gelu_" } else { "" };
            let name = format!("{kernel}_{act}{}_r{r}", $dtype);
            if mma {
                crate::run_kernel!(*module, dev, &name, cfg;
                    &zv, &gv, &part, &k_i, &rows_per_i, &m_i, &key, &p, &scale, &bits_v,
                    &stored_i)?;
            } else {
                crate::run_kernel!(*module, dev, &name, cfg;
                    &zv, &gv, &part, &k_i, &rows_per_i, &m_i, &key, &p, &scale)?;
            }
        }};
    }
    crate::ops::profile::scope("lora.train.da", z.device(), || {
        match z.dtype() {
            DType::BF16 => launch!("bf16", half::bf16),
            DType::F16 => launch!("f16", half::f16),
            other => return Err(unsupported(other)),
        }
        sum_slices(&dev, z.dtype(), &part, slabs, (r, k), to)
    })
}

/// The training node's `gh = g bs` (`[m, r]`) and `dbs = g^T h` (`[n, r]`; out as `db_to` says), in g's type, from
/// one read of the output's gradient `g` (`[m, n]`; `bs` `[n, r]`, `h` `[m, r]`):
/// `lora_grad_hb` in lora_mma.cu, where two cuBLAS products read `g` once each. f32 sums in
/// another order than cuBLAS's, rounded once. `None` where it does not run (no tensor cores,
/// or `ADAPTERLAB_LORA_TRAIN_KERNELS=simt`; `g` not [`trains`]-shaped): the caller multiplies.
pub fn grad_hb(
    g: &Tensor,
    bs: &Tensor,
    h: &Tensor,
    db_to: GradOut,
) -> Result<Option<(Tensor, Tensor)>> {
    let (m, n) = g.dims2()?;
    let r = h.dim(1)?;
    if !trains(g, r) || !tensor_cores(g.device())? {
        return Ok(None);
    }
    if bs.dims() != [n, r]
        || h.dims() != [m, r]
        || bs.dtype() != g.dtype()
        || h.dtype() != g.dtype()
    {
        return Err(Error::Msg(format!(
            "lora training gh, dB: g {:?} {:?}, bs {:?} {:?}, h {:?} {:?}",
            g.dims(),
            g.dtype(),
            bs.dims(),
            bs.dtype(),
            h.dims(),
            h.dtype()
        )));
    }
    // bs and h are small: read as 16-byte rows, so fresh compact copies where they are not.
    let (bs, h) = (aligned(bs, 8)?, aligned(h, 8)?);
    let dev = cuda_device(g)?;
    let col_blocks = n.div_ceil(GB_COLS);
    let (slabs, rows_per) = split_reduction(col_blocks, m, GB_ROWS);
    let (gs, bss, hs) = (CudaInput::of(g)?, CudaInput::of(&bs)?, CudaInput::of(&h)?);
    // SAFETY: each column block writes gh's partial sums of every row of its slab, and each
    // slab dB's of every column of its block; the blocks cover every (slab, column block).
    let ghp = unsafe { dev.alloc::<f32>(col_blocks * m * r)? };
    let dbp = unsafe { dev.alloc::<f32>(slabs * n * r)? };
    let (m_i, n_i, rows_per_i) = (m as i32, n as i32, rows_per as i32);
    let cfg = LaunchConfig {
        grid_dim: (col_blocks as u32, slabs as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    macro_rules! launch {
        ($dtype:literal, $t:ty) => {{
            let (gv, bv, hv) = (
                gs.view::<$t>(m * n)?,
                bss.view::<$t>(n * r)?,
                hs.view::<$t>(m * r)?,
            );
            let name = format!("lora_grad_hb_{}_r{r}", $dtype);
            crate::run_kernel!(LORA_MMA, dev, &name, cfg;
                &gv, &bv, &hv, &ghp, &dbp, &m_i, &n_i, &rows_per_i)?;
        }};
    }
    crate::ops::profile::scope("lora.train.ghdb", g.device(), || {
        match g.dtype() {
            DType::BF16 => launch!("bf16", half::bf16),
            DType::F16 => launch!("f16", half::f16),
            other => return Err(unsupported(other)),
        }
        let gh = sum_slices(&dev, g.dtype(), &ghp, col_blocks, (m, r), GradOut::Half)?;
        let dbs = sum_slices(&dev, g.dtype(), &dbp, slabs, (n, r), db_to)?;
        Ok(Some((gh, dbs)))
    })
}

/// Columns and rows of one staged chunk of `lora_grad_hb` (`GB_COLS`, `GB_ROWS`).
const GB_COLS: usize = 256;
const GB_ROWS: usize = 32;

/// Columns (`DA_COLS`) and rows (`DA_ROWS`) of one staged chunk of `lora_train_da` (and of
/// `lora_train_da_mma`: `DAM_COLS`, `DAM_ROWS`).
const DA_COLS: usize = 128;
const DA_ROWS: usize = 32;

/// Columns of one staged chunk of `lora_h_rows` (`LH_KC` in lora.cu).
const LH_KC: usize = 128;

/// Rows of one block of `lora_train_h_mma` (16 * `LHM_MT` in lora_mma.cu), and the columns its
/// eight warps take at once (32 each).
const LHM_ROWS: usize = 32;
const LHM_CHUNK: usize = 256;

/// How a reduction over `len` (walked in chunks of `chunk`) is split among blocks when
/// `blocks` blocks already work apart: `(slices, length of a slice)`, enough slices for two
/// blocks a multiprocessor (an H100 has 132) where each slice keeps at least four chunks.
fn split_reduction(blocks: usize, len: usize, chunk: usize) -> (usize, usize) {
    let chunks = len.div_ceil(chunk).max(1);
    let slices = 264usize
        .div_ceil(blocks.max(1))
        .clamp(1, (chunks / 4).max(1));
    let per = chunks.div_ceil(slices) * chunk;
    (len.div_ceil(per), per)
}

fn unsupported(dtype: DType) -> Error {
    Error::Msg(format!("lora training on {dtype:?} is not supported"))
}

/// Where a training kernel's summed gradient goes: rounded to the 16-bit type it computes in
/// (the graph's own gradient of a 16-bit tensor), or on to an f32 weight as the graph that cast
/// that weight to 16 bits (and scaled it, for B) would hand it there (`lora_h_sum_to_f32`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GradOut {
    Half,
    F32 { scaling: Option<f64> },
}

/// `lora_h_sum`: `splits` slices of partial sums of a `shape` result added in order, rounded
/// to `dtype`, and for [`GradOut::F32`] scaled and widened as it says.
fn sum_slices(
    dev: &candle_core::CudaDevice,
    dtype: DType,
    part: &candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>,
    splits: usize,
    shape: (usize, usize),
    to: GradOut,
) -> Result<Tensor> {
    let n = shape.0 * shape.1;
    let (splits_i, n_i) = (splits as i32, n as i32);
    let cfg = LaunchConfig::for_num_elems(n as u32);
    let suffix = match dtype {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        other => return Err(unsupported(other)),
    };
    if let GradOut::F32 { scaling } = to {
        let (s, scaled) = (scaling.unwrap_or(1.0) as f32, i32::from(scaling.is_some()));
        // SAFETY: every element is written by the kernel below.
        let out = unsafe { dev.alloc::<f32>(n)? };
        crate::run_kernel!(LORA, dev, &format!("lora_h_sum_to_f32_{suffix}"), cfg;
            part, &out, &splits_i, &n_i, &s, &scaled)?;
        return Ok(wrap(out, dev, shape));
    }
    macro_rules! launch {
        ($t:ty) => {{
            // SAFETY: every element is written by the kernel below.
            let out = unsafe { dev.alloc::<$t>(n)? };
            crate::run_kernel!(LORA, dev, &format!("lora_h_sum_{suffix}"), cfg;
                part, &out, &splits_i, &n_i)?;
            Ok(wrap(out, dev, shape))
        }};
    }
    match dtype {
        DType::BF16 => launch!(half::bf16),
        _ => launch!(half::f16),
    }
}

/// The training node's 16-bit copies of an f32 adapter in one launch (`lora_weights16`): `A`
/// in `dtype` and `scaling * B` as candle's `to_dtype` and affine ops form them, bit for bit.
/// `None` where it does not serve (not f32 contiguous weights on a GPU, not a 16-bit `dtype`).
pub fn weights16(
    a: &Tensor,
    b: &Tensor,
    scaling: f64,
    dtype: DType,
) -> Result<Option<(Tensor, Tensor)>> {
    let serves = a.device().is_cuda()
        && a.dtype() == DType::F32
        && b.dtype() == DType::F32
        && matches!(dtype, DType::BF16 | DType::F16)
        && a.rank() == 2
        && b.rank() == 2;
    if !serves {
        return Ok(None);
    }
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    let (na, nb) = (a.elem_count(), b.elem_count());
    let dev = cuda_device(&a)?;
    let (av, bv) = (CudaInput::of(&a)?, CudaInput::of(&b)?);
    let (av, bv) = (av.view::<f32>(na)?, bv.view::<f32>(nb)?);
    let (na_i, nb_i, s) = (na as i32, nb as i32, scaling as f32);
    let cfg = LaunchConfig::for_num_elems((na + nb) as u32);
    macro_rules! launch {
        ($dtype:literal, $t:ty) => {{
            // SAFETY: every element of both is written by the kernel below.
            let a16 = unsafe { dev.alloc::<$t>(na)? };
            let bs16 = unsafe { dev.alloc::<$t>(nb)? };
            crate::run_kernel!(LORA, dev, concat!("lora_weights16_", $dtype), cfg;
                &av, &bv, &a16, &bs16, &na_i, &nb_i, &s)?;
            (wrap(a16, &dev, a.shape().clone()), wrap(bs16, &dev, b.shape().clone()))
        }};
    }
    Ok(Some(match dtype {
        DType::BF16 => launch!("bf16", half::bf16),
        _ => launch!("f16", half::f16),
    }))
}

/// The second factor of a training node's adapter term `h F^T`, as stored.
pub enum Factor<'a> {
    /// `[n, r]`: `scaling * B`, the forward's.
    OutByRank(&'a Tensor),
    /// `[r, n]`: `A`, whose transpose the input gradient's term multiplies.
    RankByOut(&'a Tensor),
}

/// How the kernels read a [`Factor`] at rank r: the stored tensor, the strides (per column, per
/// rank) at which they read `F(col, j)`, the width `n`, and the dims the tensor must have.
struct FactorLayout<'a> {
    t: &'a Tensor,
    strides: (i64, i64),
    n: usize,
    dims: [usize; 2],
}

impl<'a> Factor<'a> {
    fn layout(&self, r: usize) -> Result<FactorLayout<'a>> {
        Ok(match *self {
            Factor::OutByRank(t) => {
                let n = t.dim(0)?;
                FactorLayout {
                    t,
                    strides: (r as i64, 1),
                    n,
                    dims: [n, r],
                }
            }
            Factor::RankByOut(t) => {
                let n = t.dim(1)?;
                FactorLayout {
                    t,
                    strides: (1, n as i64),
                    n,
                    dims: [r, n],
                }
            }
        })
    }
}

/// `y + dropout(round(h F^T))` with every rounding of the op-by-op graph (the product rounded
/// to the 16-bit type as cuBLAS writes it, then dropped out, then added): the training node's
/// value (`h = dropout(z) A^T`, `F` = `scaling * B`, no mask) and its input gradient's two terms
/// (`y` the base's, `h` the gradient of h, `F` = `A^T`, the forward's mask). `y` `[m, n]`, `h`
/// `[m, r]` and `F` in one 16-bit type. One pass over `y` where the graph made the product,
/// its dropped copy and the sum.
///
/// With `gelu_input` (the pre-activation `x` of a node whose input went through the exact GELU,
/// `[m, n]` like `y`), GELU's backward follows on the rounded sum, as
/// `crate::ops::gelu::gelu_erf_backward` computes it: the term from [`train_term`]'s product,
/// then one pass (`lora_add_term_gelu`) reading y, the term and x.
pub fn train_add(
    y: &Tensor,
    h: &Tensor,
    f: Factor<'_>,
    mask: Mask,
    gelu_input: Option<&Tensor>,
    stored: Option<&Tensor>,
) -> Result<Tensor> {
    match gelu_input {
        Some(x) => {
            let term = train_term(h, f, None, None)?;
            crate::ops::profile::scope("lora.train.add", y.device(), || {
                add_term_gelu(y, &term, x, mask, stored)
            })
        }
        None => {
            crate::ops::profile::scope("lora.train.add", y.device(), || adapter_term(y, h, f, mask))
        }
    }
}

/// `gelu_grad(x, round(y + dropout(t)))` element by element, for `y`, `t` and `x` of one shape
/// and 16-bit type (see `lora_add_term_gelu`).
fn add_term_gelu(
    y: &Tensor,
    t: &Tensor,
    x: &Tensor,
    mask: Mask,
    stored: Option<&Tensor>,
) -> Result<Tensor> {
    let dev = cuda_device(y)?;
    let dtype = y.dtype();
    for (what, u) in [("term", t), ("GELU input", x)] {
        if u.dims() != y.dims() || u.dtype() != dtype || !u.is_contiguous() || !y.is_contiguous() {
            return Err(Error::Msg(format!(
                "lora training add: y {:?} {:?}, {what} {:?} {:?}",
                y.dims(),
                dtype,
                u.dims(),
                u.dtype()
            )));
        }
    }
    let n = y.elem_count();
    let vec = [y, t, x].iter().all(|u| start_aligned(u, 8)) as i32;
    let (ys, ts, xs) = (CudaInput::of(y)?, CudaInput::of(t)?, CudaInput::of(x)?);
    let (key, p, scale) = mask_args(mask);
    let drop = if p > 0.0 { "drop_" } else { "" };
    let stored = stored_bits(stored, p, n, y.device())?;
    let bits_in = CudaInput::of(&stored.0)?;
    let bits_v = bits_in.view::<u8>(stored.0.elem_count())?;
    let stored_i = i32::from(stored.1);
    let n_i = n as i64;
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(8 * 256) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    macro_rules! launch {
        ($dtype:literal, $t:ty) => {{
            let (yv, tv, xv) = (ys.view::<$t>(n)?, ts.view::<$t>(n)?, xs.view::<$t>(n)?);
            // SAFETY: every element is written by the kernel below.
            let out = unsafe { dev.alloc::<$t>(n)? };
            let name = format!("lora_add_term_gelu_{drop}{}", $dtype);
            crate::run_kernel!(LORA, dev, &name, cfg;
                &yv, &tv, &xv, &out, &n_i, &key, &p, &scale, &vec, &bits_v, &stored_i)?;
            Ok(wrap(out, &dev, y.shape().clone()))
        }};
    }
    match dtype {
        DType::BF16 => launch!("bf16", half::bf16),
        DType::F16 => launch!("f16", half::f16),
        other => Err(unsupported(other)),
    }
}

/// `dropout(round(h F^T))` alone (`[m, n]`, the factor's `n`), as [`train_add`] rounds it: the
/// term a base product then adds inside cuBLAS (`crate::ops::gemm::matmul_plus`). The product
/// is cuBLAS's too (a GEMM of depth r, one pass writing `[m, n]`), and the mask the dropout op's,
/// so the term is the op-by-op graph's bit for bit: `train_add`'s kernel, taking y as zeros,
/// spent 2r f32 multiply-adds an element on the CUDA cores and ran at ~1/4 of the bandwidth
/// (0.013 s of a 0.29 s H100 step forward, 0.007 backward, 2026-12-07). A tensor-core kernel
/// forming the product, rounding and mask in one pass (and a form fused with GELU's backward)
/// was right but made the step ~1% slower on an H100 and an H200 (2026-12-07), and went.
pub fn train_term(
    h: &Tensor,
    f: Factor<'_>,
    mask: Mask,
    stored: Option<&Tensor>,
) -> Result<Tensor> {
    crate::ops::profile::scope("lora.train.term", h.device(), || {
        let term = match f {
            Factor::OutByRank(t) => h.matmul(&t.t()?)?,
            Factor::RankByOut(t) => h.matmul(t)?,
        };
        match (mask, stored) {
            (Some((_, p)), Some(bits)) if p > 0.0 => apply_mask_bits(&term, bits, p),
            (Some((key, p)), None) if p > 0.0 => crate::ops::dropout::seeded_dropout(&term, key, p),
            _ => Ok(term),
        }
    })
}

/// The stored decisions checked against `n` elements (a whole number of bytes: trained inputs
/// have rows of a multiple of 8), or a one-byte stand-in, and whether they are to be read
/// (dropout on and bits given).
fn stored_bits(
    stored: Option<&Tensor>,
    p: f32,
    n: usize,
    device: &candle_core::Device,
) -> Result<(Tensor, bool)> {
    match stored {
        Some(b) if p > 0.0 => {
            if b.dtype() != DType::U8 || b.elem_count() != n.div_ceil(8) || !n.is_multiple_of(8) {
                return Err(Error::Msg(format!(
                    "lora training: {} stored mask bytes of {:?} for {n} elements",
                    b.elem_count(),
                    b.dtype()
                )));
            }
            Ok((b.contiguous()?, true))
        }
        _ => Ok((Tensor::zeros(1, DType::U8, device)?, false)),
    }
}

/// The dropout op's value of `t` from stored decisions (`lora_apply_mask_bits`): the same
/// roundings as `seeded_dropout` with the mask that drew them.
fn apply_mask_bits(t: &Tensor, bits: &Tensor, p: f32) -> Result<Tensor> {
    let n = t.elem_count();
    let t = aligned(&t.contiguous()?, 8)?;
    let (bits, _) = stored_bits(Some(bits), p, n, t.device())?;
    let dev = cuda_device(&t)?;
    let (ts, bs) = (CudaInput::of(&t)?, CudaInput::of(&bits)?);
    let bv = bs.view::<u8>(n / 8)?;
    let (words, scale) = ((n / 8) as i64, 1.0 / (1.0 - p));
    let cfg = LaunchConfig::for_num_elems((n / 8) as u32);
    macro_rules! launch {
        ($dtype:literal, $t:ty) => {{
            let tv = ts.view::<$t>(n)?;
            // SAFETY: every element is written by the kernel below.
            let out = unsafe { dev.alloc::<$t>(n)? };
            if words > 0 {
                crate::run_kernel!(LORA, dev, concat!("lora_apply_mask_bits_", $dtype), cfg;
                    &tv, &bv, &out, &words, &scale)?;
            }
            Ok(wrap(out, &dev, t.shape().clone()))
        }};
    }
    match t.dtype() {
        DType::BF16 => launch!("bf16", half::bf16),
        DType::F16 => launch!("f16", half::f16),
        other => Err(unsupported(other)),
    }
}

/// [`train_add`]'s launch without GELU.
fn adapter_term(y: &Tensor, h: &Tensor, f: Factor<'_>, mask: Mask) -> Result<Tensor> {
    let dev = cuda_device(h)?;
    let (m, r) = h.dims2()?;
    let FactorLayout {
        t: ft,
        strides: (fs_col, fs_j),
        n,
        dims: f_dims,
    } = f.layout(r)?;
    let dtype = h.dtype();
    let y_fits = y.dims() == [m, n] && y.dtype() == dtype && start_aligned(y, 2);
    if ft.dims() != f_dims
        || ft.dtype() != dtype
        || !TRAIN_RANKS.contains(&r)
        || !y_fits
        || !start_aligned(h, 8)
        || !ft.is_contiguous()
    {
        return Err(Error::Msg(format!(
            "lora training add: y {:?}, h {:?} {:?}, factor {:?} {:?}",
            (y.dims(), y.dtype()),
            h.dims(),
            h.dtype(),
            ft.dims(),
            ft.dtype(),
        )));
    }
    let (hs, fs, ys) = (CudaInput::of(h)?, CudaInput::of(ft)?, CudaInput::of(y)?);
    let (n_i, m_i) = (n as i32, m as i32);
    let (key, p, scale) = mask_args(mask);
    let drop = if p > 0.0 { "drop_" } else { "" };
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(512) as u32, m.div_ceil(LORA_OUT_ROWS) as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    macro_rules! launch {
        ($dtype:literal, $t:ty) => {{
            let hv = hs.view::<$t>(m * r)?;
            let fv = fs.view::<$t>(n * r)?;
            let yv = ys.view::<$t>(m * n)?;
            // SAFETY: every element is written by the kernel below.
            let out = unsafe { dev.alloc::<$t>(m * n)? };
            let name = format!("lora_train_add_{drop}{}_r{r}", $dtype);
            crate::run_kernel!(LORA, dev, &name, cfg;
                &yv, &hv, &fv, &fs_col, &fs_j, &out, &n_i, &m_i, &key, &p, &scale)?;
            Ok(wrap(out, &dev, (m, n)))
        }};
    }
    match dtype {
        DType::BF16 => launch!("bf16", half::bf16),
        DType::F16 => launch!("f16", half::f16),
        other => Err(unsupported(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_switch_names_are_the_tables() {
        DECODE_H.names_match().unwrap();
        TRAIN_KERNELS.names_match().unwrap();
        MASK.names_match().unwrap();
    }

    /// The splits of Falcon-7B's training shapes (8 x 512 rows) and the golden test's: slices
    /// cover the length, none is empty, each a whole number of chunks.
    #[test]
    fn reductions_split_into_whole_chunks_that_cover_the_length() {
        for (blocks, len, chunk, want) in [
            (128, 4544, LH_KC, (3, 1536)),
            (128, 18176, LH_KC, (3, 6144)),
            (36, 4096, DA_ROWS, (8, 512)),
            (142, 4096, DA_ROWS, (2, 2048)),
            (2, 1032, LH_KC, (2, 640)),
            (3, 256, LH_KC, (1, 256)),
            (1, 77, DA_ROWS, (1, 96)),
        ] {
            let (slices, per) = split_reduction(blocks, len, chunk);
            assert_eq!((slices, per), want, "{blocks} blocks, {len} by {chunk}");
            assert!(per % chunk == 0 && slices * per >= len && (slices - 1) * per < len);
        }
    }

    /// `lora_out` at a batch-1 prefill of 200 rows fills the GPU (Falcon-7B's widths), keeps at
    /// most 32 rows a block for thousands of rows, and takes one row a block for a few.
    #[test]
    fn lora_out_blocks_fill_the_gpu() {
        for (m, n, rows) in [
            (200, 4544, 7),
            (200, 4672, 8),
            (200, 18176, 25),
            (4096, 4544, 32),
            (16, 4544, 1),
            (1, 70, 1),
        ] {
            assert_eq!(lora_out_rows(m, n), rows, "{m} x {n}");
            let blocks = n.div_ceil(512) * m.div_ceil(rows);
            assert!(
                m < 100 || blocks >= FILL_BLOCKS.min(m * n / 512) * 9 / 10,
                "{m} x {n}: {blocks}"
            );
        }
    }
}
