//! Attention for decoding: one new query a row and head against the cached keys and values, the
//! eager path ([`crate::ops::attention::attend`]) in one launch (`decode_attention.cu`) instead
//! of its scores matmul, masked softmax, weighted-sum matmul and the copies of strided cache
//! views between them. It rounds where the eager path rounds (scores and probabilities to the
//! model's dtype), so the two agree to f32 summation order; the golden test
//! `decode_attention_kernel_equals_the_eager_path` holds it to that on a GPU.

use candle_core::{DType, Device, Result, Tensor};

/// Keys one launch takes: the scores of a (row, head) live in 48 KB of shared memory with the
/// query and the partial sums.
const MAX_KEYS: usize = 8192;

/// `softmax(q k^T * scale + mask) v` for `q` `[b, h, 1, d]` and `k`, `v` `[b, kv, t, d]` (rows
/// of `d` contiguous, as the cache's views are), `mask` `[b or 1, 1, 1, t]`: the output
/// `[b, h, 1, d]`. `None` where it does not apply, and the caller takes the eager path: a graph
/// wanted, the CPU, 32-bit inputs, heads wider than 256 or not a multiple of 8, more than
/// [`MAX_KEYS`] keys, unaligned views.
pub fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let (b, h, s, d) = q.dims4()?;
    let (kb, kv, t, kd) = k.dims4()?;
    let fits = s == 1
        && matches!(q.device(), Device::Cuda(_))
        && !(q.track_op() || k.track_op() || v.track_op())
        && matches!(q.dtype(), DType::BF16 | DType::F16)
        && k.dtype() == q.dtype()
        && v.dtype() == q.dtype()
        && (kb, kd) == (b, d)
        && v.dims() == k.dims()
        && kv > 0
        && h % kv == 0
        && d % 8 == 0
        && d <= 256
        && (1..=MAX_KEYS).contains(&t);
    if !fits || !fused()? {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    {
        cuda::attend(q, k, v, scale, mask)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (scale, mask);
        Ok(None)
    }
}

/// `ADAPTERLAB_DECODE_ATTENTION`: `fused` (the default) or `eager`, which keeps decoding on the
/// eager path. On an H100 (2026-12-06, BENCHMARKS.md) the first form of the kernel, its key
/// loops not yet unrolled, decoded batch 1 at 83.2 tokens/s against the eager path's 87.7; with
/// the unrolled kernel and the lookahead the two were within 1% (144.7 fused, 145.6 eager at
/// batch 1; 1,086.7 and 1,083.2 at batch 16, unmerged, on the same machine).
static FUSED: crate::ops::switch::Switch<bool> = crate::ops::switch::Switch::new(
    "ADAPTERLAB_DECODE_ATTENTION",
    &[("fused", true), ("eager", false)],
);

fn fused() -> Result<bool> {
    Ok(FUSED.get()?.unwrap_or(true))
}

/// The `ADAPTERLAB_DECODE_ATTENTION` in force (`fused` or `eager`), for reports.
pub fn setting() -> Result<&'static str> {
    Ok(if fused()? { "fused" } else { "eager" })
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::ops::kernels::{cuda_device, wrap};
    use candle_core::Storage;
    use candle_core::cuda_backend::cudarc::driver::LaunchConfig;

    const SOURCE: &str = concat!(include_str!("pdl.cu"), include_str!("decode_attention.cu"));

    // One of decoding's chain (ops/pdl.rs).
    crate::pdl_modules!(
        DECODE_ALL,
        DECODE,
        DECODE_PDL,
        DECODE_PDL_EARLY,
        "adapterlab_decode_attention",
        SOURCE
    );

    /// A view's element offset and its batch and head strides, where its rows of `d` are
    /// contiguous and 16-byte aligned; `None` otherwise.
    fn rows_of(t: &Tensor, d: usize) -> Option<(usize, i64, i64)> {
        let l = t.layout();
        let st = l.stride();
        let (dims, off) = (l.dims(), l.start_offset());
        let aligned = |x: usize| x.is_multiple_of(8);
        (st[3] == 1
            && (dims[2] == 1 || st[2] == d)
            && aligned(off)
            && aligned(st[0])
            && aligned(st[1]))
        .then_some((off, st[0] as i64, st[1] as i64))
    }

    pub fn attend(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f64,
        mask: Option<&Tensor>,
    ) -> Result<Option<Tensor>> {
        let (b, h, _, d) = q.dims4()?;
        let (_, kv, t, _) = k.dims4()?;
        let (Some((k_off, kb, kh)), Some((v_off, vb, vh))) = (rows_of(k, d), rows_of(v, d)) else {
            return Ok(None);
        };
        let q = q.contiguous()?;
        let threads = 256;
        // q, the scores, and the weighted sum's partial sums: 4 * threads / d groups of d.
        let shared = (d + t + (4 * threads / d) * d) * 4;
        let dev = cuda_device(&q)?;
        let (mask, mask_batch, has_mask) = match mask {
            Some(m) => {
                let (mb, one, ms, mt) = m.dims4()?;
                if one != 1 || ms != 1 || mt != t || !(mb == 1 || mb == b) {
                    candle_core::bail!(
                        "decoding attention: mask {:?} does not fit {t} keys of {b} rows",
                        m.dims()
                    );
                }
                (m.to_dtype(DType::F32)?.contiguous()?, mb as i32, 1i32)
            }
            None => (crate::ops::softmax::no_mask(q.device())?, 1, 0),
        };
        let cfg = LaunchConfig {
            grid_dim: ((b * h) as u32, 1, 1),
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: shared as u32,
        };
        let (h_i, group, t_i, d_i) = (h as i32, (h / kv) as i32, t as i32, d as i32);
        let scale = scale as f32;
        let (qs, _) = q.storage_and_layout();
        let (ks, _) = k.storage_and_layout();
        let (vs, _) = v.storage_and_layout();
        let (ms, ml) = mask.storage_and_layout();
        let (Storage::Cuda(qs), Storage::Cuda(ks), Storage::Cuda(vs), Storage::Cuda(ms)) =
            (&*qs, &*ks, &*vs, &*ms)
        else {
            candle_core::bail!("decoding attention: inputs not on the GPU");
        };
        let q_off = q.layout().start_offset();
        let m_off = ml.start_offset();
        let (module, pdl) = DECODE_ALL.pick(q.device())?;
        macro_rules! launch {
            ($name:literal, $t:ty) => {{
                let qv = qs.as_cuda_slice::<$t>()?.slice(q_off..);
                let kv_ = ks.as_cuda_slice::<$t>()?.slice(k_off..);
                let vv = vs.as_cuda_slice::<$t>()?.slice(v_off..);
                let mv = ms.as_cuda_slice::<f32>()?.slice(m_off..);
                // SAFETY: every element is written by the kernel below.
                let out = unsafe { dev.alloc::<$t>(b * h * d)? };
                crate::run_kernel_maybe_pdl!(pdl, module, dev, $name, cfg;
                    &qv, &kv_, &vv, &mv, &out, &h_i, &group, &t_i, &d_i, &kb, &kh, &vb, &vh,
                    &mask_batch, &has_mask, &scale,
                )?;
                wrap(out, &dev, (b, h, 1, d))
            }};
        }
        let out = match q.dtype() {
            DType::BF16 => launch!("decode_attn_bf16", half::bf16),
            DType::F16 => launch!("decode_attn_f16", half::f16),
            other => candle_core::bail!("decoding attention on {other:?} is not supported"),
        };
        Ok(Some(out))
    }
}

/// The module, for [`crate::ops::kernel_modules`].
#[cfg(feature = "cuda")]
pub(crate) fn cuda_modules() -> &'static crate::ops::pdl::PdlModules {
    &cuda::DECODE_ALL
}
