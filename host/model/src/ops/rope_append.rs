//! Decoding's query, key and value heads in one launch (`rope_append.cu`): a fused
//! query_key_value output split into heads, the query and key heads rotated, the queries
//! written out and the keys and values appended to the KV cache. Op by op that is the head
//! split's copies, a `rope` launch for q and one for k and a cache write for k and one for v
//! ([`crate::ops::attention::Rotary::apply`], [`KvCache::append`]); the kernel rounds as
//! candle's `rope` does on sm_90 (see `rope_append.cu`), and the golden test
//! `rope_append_kernel_equals_the_op_by_op_path` holds it to the op-by-op path's bits.

use candle_core::{DType, Device, Result, Tensor};

use crate::ops::attention::KvCache;
use crate::ops::flash::PackedHeads;

/// Where a fused query_key_value output keeps its heads: per token, `kv_heads` groups of
/// `q_per_kv` query heads, a key head and a value head, each `head_dim` wide. Falcon's three
/// layouts are all this: multi-query is one group of all the query heads, the per-head layout
/// `num_heads` groups of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QkvGroups {
    pub kv_heads: usize,
    pub q_per_kv: usize,
    pub head_dim: usize,
}

impl QkvGroups {
    /// Heads of one token in the fused row: every group's queries, key and value.
    fn slots(self) -> usize {
        self.kv_heads * (self.q_per_kv + 2)
    }
}

/// `ADAPTERLAB_DECODE_ROPE`: `fused` (the default) or `split`, which keeps the op-by-op path.
static FUSED: crate::ops::switch::Switch<bool> = crate::ops::switch::Switch::new(
    "ADAPTERLAB_DECODE_ROPE",
    &[("fused", true), ("split", false)],
);

fn switched_on() -> Result<bool> {
    Ok(FUSED.get()?.unwrap_or(true))
}

/// The `ADAPTERLAB_DECODE_ROPE` in force (`fused` or `split`), for reports.
pub fn setting() -> Result<&'static str> {
    Ok(if switched_on()? { "fused" } else { "split" })
}

/// For `fused` `[b, s, slots * d]`: the queries `[b, kv_heads * q_per_kv, s, d]`, and all of
/// `layer`'s keys and values after this step's are appended to `cache`, as
/// [`KvCache::append`] returns them; q and k rotated by `rope` (`(cos, sin)`, each `[b, s,
/// d / 2]`, as [`crate::ops::attention::Rotary::cos_sin`] makes them) where given. `None` where
/// the kernel does not apply (the CPU, 32-bit types, a graph wanted, a card before sm_80,
/// `ADAPTERLAB_DECODE_ROPE=split`): the caller then takes the op-by-op path.
pub fn split_rotate_append(
    cache: &mut KvCache,
    layer: usize,
    fused: &Tensor,
    groups: QkvGroups,
    rope: Option<(&Tensor, &Tensor)>,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    if fused.track_op() || !switched_on()? || !kernels_serve(fused, groups, rope)? {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    {
        let (b, s, _) = fused.dims3()?;
        cuda::run(cache, layer, fused, groups, rope, (b, s)).map(Some)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (cache, layer);
        Ok(None)
    }
}

/// Whether the kernels serve `fused` `[b, s, slots * d]` (an error where its width is not
/// `groups`' heads): a GPU of compute capability 8.0 or later (the FMAs of rope_append.cu), a
/// 16-bit type, and the rotation's tables in that type.
fn kernels_serve(
    fused: &Tensor,
    groups: QkvGroups,
    rope: Option<(&Tensor, &Tensor)>,
) -> Result<bool> {
    let (_, _, width) = fused.dims3()?;
    let d = groups.head_dim;
    if width != groups.slots() * d || !d.is_multiple_of(2) {
        candle_core::bail!(
            "rope_append: a fused row of {width} is not {} heads of {d}",
            groups.slots()
        );
    }
    let applies = matches!(fused.device(), Device::Cuda(_))
        && matches!(fused.dtype(), DType::BF16 | DType::F16)
        && rope.is_none_or(|(c, s)| c.dtype() == fused.dtype() && s.dtype() == fused.dtype());
    if !applies {
        return Ok(false);
    }
    #[cfg(feature = "cuda")]
    {
        crate::ops::kernels::sm80_or_later(fused.device())
    }
    #[cfg(not(feature = "cuda"))]
    Ok(false)
}

/// The training form (flash attention without a cache): for `fused` `[b, s, slots * d]`, the
/// query, key and value heads packed as flash attention reads them ([`PackedHeads`]), q and k
/// rotated by `rope` where given, in one launch; with a gradient, one graph node whose backward
/// (one launch) writes the fused gradient, rotated back, each element once. Op by op that is
/// three narrowed pieces made contiguous and two rotations forward, and backward two rotations,
/// three copies back to the narrowed layout and three zero-padded full-width gradients added.
/// `None` where the kernels do not apply (the CPU, 32-bit types, a card before sm_80): the
/// caller then takes the op-by-op path. The golden test `packed_heads_equal_the_op_by_op_path`
/// holds both directions to that path's values.
pub fn heads_for_flash(
    fused: &Tensor,
    groups: QkvGroups,
    rope: Option<(&Tensor, &Tensor)>,
) -> Result<Option<PackedHeads>> {
    if !kernels_serve(fused, groups, rope)? {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    {
        let (b, s, _) = fused.dims3()?;
        cuda::packed(fused, groups, rope, (b, s)).map(Some)
    }
    #[cfg(not(feature = "cuda"))]
    Ok(None)
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::Mutex;

    use candle_core::cuda_backend::CudaDType;
    use candle_core::cuda_backend::cudarc::driver::{CudaView, LaunchConfig};
    use candle_core::{CudaStorage, Layout};

    use super::*;
    use crate::ops::kernels::{CudaInput, cuda_device, wrap};

    const SOURCE: &str = concat!(include_str!("pdl.cu"), include_str!("rope_append.cu"));

    // The forward kernel is one of decoding's chain (ops/pdl.rs).
    crate::pdl_modules!(
        ROPE_APPEND_ALL,
        ROPE_APPEND,
        ROPE_APPEND_PDL,
        ROPE_APPEND_PDL_EARLY,
        "adapterlab_rope_append",
        SOURCE,
        "compute_80"
    );

    /// `fused` contiguous and its `(cos, sin)`, each `[b, s, d / 2]`, checked.
    fn inputs(
        fused: &Tensor,
        groups: QkvGroups,
        rope: Option<(&Tensor, &Tensor)>,
        (b, s): (usize, usize),
    ) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
        let d = groups.head_dim;
        let rope = match rope {
            Some((c, sn)) => {
                for t in [c, sn] {
                    if t.dims() != [b, s, d / 2] {
                        candle_core::bail!(
                            "rope_append: cos/sin of {:?} for {b} rows of {s} tokens, heads of {d}",
                            t.dims()
                        );
                    }
                }
                Some((c.contiguous()?, sn.contiguous()?))
            }
            None => None,
        };
        Ok((fused.contiguous()?, rope))
    }

    /// The kernels' launch: a block row per token (x), the token's `slots * d / 2` pairs across
    /// y, 256 threads a block.
    /// Never launched for no tokens (the kernel divides by the sequence length).
    fn token_rows(tokens: usize, groups: QkvGroups) -> Result<LaunchConfig> {
        const THREADS: usize = 256;
        let across = (groups.slots() * (groups.head_dim / 2)).div_ceil(THREADS);
        if tokens > i32::MAX as usize || across > 65_535 {
            candle_core::bail!(
                "rope_append: {tokens} tokens of {} pairs do not fit a launch",
                groups.slots() * (groups.head_dim / 2)
            );
        }
        Ok(LaunchConfig {
            grid_dim: (tokens.max(1) as u32, across.max(1) as u32, 1),
            block_dim: (THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        })
    }

    /// The kernels' shape arguments: `b, s, kv_heads, q_per_kv, d`.
    fn shape_args(groups: QkvGroups, (b, s): (usize, usize)) -> [i32; 5] {
        [b, s, groups.kv_heads, groups.q_per_kv, groups.head_dim].map(|x| x as i32)
    }

    fn kernel(dtype: DType, what: &str) -> Result<String> {
        Ok(match dtype {
            DType::BF16 => format!("{what}_bf16"),
            DType::F16 => format!("{what}_f16"),
            other => candle_core::bail!("{what} on {other:?} is not supported"),
        })
    }

    /// The rotation's `(cos, sin)` as kernel inputs.
    fn tables(rope: Option<&(Tensor, Tensor)>) -> Result<Option<(CudaInput<'_>, CudaInput<'_>)>> {
        rope.map(|(c, sn)| Ok((CudaInput::of(c)?, CudaInput::of(sn)?)))
            .transpose()
    }

    /// cos and sin as the kernels take them (`half` elements each); without rotation the kernels
    /// never read them, and `stand_in`, the launch's input, takes their place.
    fn table_views<'a, T: CudaDType>(
        tables: &'a Option<(CudaInput<'a>, CudaInput<'a>)>,
        stand_in: &CudaView<'a, T>,
        half: usize,
    ) -> Result<(CudaView<'a, T>, CudaView<'a, T>)> {
        Ok(match tables {
            Some((c, sn)) => (c.view::<T>(half)?, sn.view::<T>(half)?),
            None => (stand_in.slice(..), stand_in.slice(..)),
        })
    }

    /// `rope_append` from `fused` into `q` and `kv` (keys, then values `vplane` further, each
    /// `[b, kv_heads, cap, d]` from position `len`).
    #[allow(clippy::too_many_arguments)]
    fn split<T: CudaDType>(
        fused: &Tensor,
        rope: Option<&(Tensor, Tensor)>,
        groups: QkvGroups,
        (b, s): (usize, usize),
        q: &CudaView<'_, T>,
        kv: &CudaView<'_, T>,
        (cap, len, vplane): (usize, usize, usize),
    ) -> Result<()> {
        if b * s == 0 {
            return Ok(());
        }
        let dev = cuda_device(fused)?;
        let d = groups.head_dim;
        let cfg = token_rows(b * s, groups)?;
        let fin = CudaInput::of(fused)?;
        let fv = fin.view::<T>(b * s * groups.slots() * d)?;
        let tables = tables(rope)?;
        let (cv, sv) = table_views(&tables, &fv, b * s * d / 2)?;
        let has_rope = i32::from(rope.is_some());
        let [b_i, s_i, kvh_i, r_i, d_i] = shape_args(groups, (b, s));
        let (cap, len, vplane) = (cap as i64, len as i64, vplane as i64);
        let (module, pdl) = ROPE_APPEND_ALL.pick(fused.device())?;
        crate::run_kernel_maybe_pdl!(pdl, module, dev,
            &kernel(fused.dtype(), "rope_append")?, cfg;
            &fv, &cv, &sv, &has_rope, q, kv, &b_i, &s_i, &kvh_i, &r_i, &d_i, &cap, &len, &vplane,
        )?;
        Ok(())
    }

    pub fn run(
        cache: &mut KvCache,
        layer: usize,
        fused: &Tensor,
        groups: QkvGroups,
        rope: Option<(&Tensor, &Tensor)>,
        (b, s): (usize, usize),
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (fused, rope) = inputs(fused, groups, rope, (b, s))?;
        let (buffer, len) = cache.reserve(
            layer,
            (b, groups.kv_heads, s, groups.head_dim),
            fused.dtype(),
            fused.device(),
        )?;
        let op = Op {
            fused,
            rope,
            groups,
            len,
            q: Mutex::new(None),
        };
        buffer.inplace_op1(&op)?;
        let q = op.q.lock().unwrap().take();
        let q = q.ok_or_else(|| candle_core::Error::Msg("rope_append: no queries".into()))?;
        let (k, v) = cache.advance(layer, s)?;
        Ok((q, k, v))
    }

    /// The launch, run on the cache's buffer (`[2, b, kv_heads, capacity, d]`, keys then
    /// values), which it writes in place; the queries it makes are left in `q`.
    struct Op {
        fused: Tensor,
        rope: Option<(Tensor, Tensor)>,
        groups: QkvGroups,
        len: usize,
        q: Mutex<Option<Tensor>>,
    }

    impl candle_core::InplaceOp1 for Op {
        fn name(&self) -> &'static str {
            "rope_append"
        }

        fn cpu_fwd(&self, _: &mut candle_core::CpuStorage, _: &Layout) -> Result<()> {
            candle_core::bail!("rope_append runs on a GPU")
        }

        fn cuda_fwd(&self, buffer: &mut CudaStorage, layout: &Layout) -> Result<()> {
            let (two, b, kvh, cap, d) = layout.shape().dims5()?;
            let (_, s, _) = self.fused.dims3()?;
            let g = self.groups;
            if two != 2
                || (kvh, d) != (g.kv_heads, g.head_dim)
                || layout.start_offset() != 0
                || !layout.is_contiguous()
                || self.len + s > cap
            {
                candle_core::bail!(
                    "rope_append: a cache buffer of {:?} for {s} tokens after {}",
                    layout.dims(),
                    self.len
                );
            }
            let dev = cuda_device(&self.fused)?;
            let n = g.kv_heads * g.q_per_kv;
            let where_kv = (cap, self.len, b * kvh * cap * d);
            macro_rules! launch {
                ($t:ty) => {{
                    let kv = buffer.as_cuda_slice_mut::<$t>()?;
                    // SAFETY: the kernel writes every query element.
                    let q = unsafe { dev.alloc::<$t>(b * n * s * d)? };
                    let (qv, kvv) = (q.slice(..), kv.slice(..));
                    split(
                        &self.fused,
                        self.rope.as_ref(),
                        g,
                        (b, s),
                        &qv,
                        &kvv,
                        where_kv,
                    )?;
                    wrap(q, &dev, (b, n, s, d))
                }};
            }
            let q = match self.fused.dtype() {
                DType::BF16 => launch!(half::bf16),
                DType::F16 => launch!(half::f16),
                other => candle_core::bail!("rope_append on {other:?} is not supported"),
            };
            *self.q.lock().unwrap() = Some(q);
            Ok(())
        }
    }

    /// [`super::heads_for_flash`] on the GPU.
    pub fn packed(
        fused: &Tensor,
        groups: QkvGroups,
        rope: Option<(&Tensor, &Tensor)>,
        (b, s): (usize, usize),
    ) -> Result<PackedHeads> {
        let (x, rope) = inputs(fused, groups, rope, (b, s))?;
        let dev = cuda_device(&x)?;
        let d = groups.head_dim;
        let (h, kv) = (groups.kv_heads * groups.q_per_kv, groups.kv_heads);
        let (nq, nk) = (b * h * s * d, b * kv * s * d);
        // Keys at [b, kv, s, d] from position 0, values after them.
        let where_kv = (s, 0, nk);
        macro_rules! launch {
            ($t:ty) => {{
                // SAFETY: the kernel writes every element (each pair of each head of each token).
                let out = unsafe { dev.alloc::<$t>(nq + 2 * nk)? };
                let (qv, kvv) = (out.slice(..nq), out.slice(nq..));
                split(&x, rope.as_ref(), groups, (b, s), &qv, &kvv, where_kv)?;
                wrap(out, &dev, nq + 2 * nk)
            }};
        }
        let data = match x.dtype() {
            DType::BF16 => launch!(half::bf16),
            DType::F16 => launch!(half::f16),
            other => candle_core::bail!("qkv heads on {other:?} is not supported"),
        };
        let data = if fused.track_op() {
            crate::ops::handover::with_backward("qkv-heads", fused, data, move |_, grad| {
                merge(&grad.contiguous()?, rope.as_ref(), groups, (b, s))
            })?
        } else {
            data
        };
        Ok(PackedHeads {
            data,
            b,
            h,
            kv,
            s,
            d,
        })
    }

    /// `rope_merge`: the packed heads' gradient `grad` back into the fused row `[b, s, slots * d]`.
    fn merge(
        grad: &Tensor,
        rope: Option<&(Tensor, Tensor)>,
        groups: QkvGroups,
        (b, s): (usize, usize),
    ) -> Result<Tensor> {
        let dev = cuda_device(grad)?;
        let d = groups.head_dim;
        let n = b * s * groups.slots() * d;
        let h = groups.kv_heads * groups.q_per_kv;
        let (nq, nk) = (b * h * s * d, b * groups.kv_heads * s * d);
        let cfg = token_rows(b * s, groups)?;
        let gin = CudaInput::of(grad)?;
        let tables = tables(rope)?;
        let has_rope = i32::from(rope.is_some());
        let [b_i, s_i, kvh_i, r_i, d_i] = shape_args(groups, (b, s));
        let vplane = nk as i64;
        let name = kernel(grad.dtype(), "rope_merge")?;
        macro_rules! launch {
            ($t:ty) => {{
                let gv = gin.view::<$t>(nq + 2 * nk)?;
                let (gq, gkv) = (gv.slice(..nq), gv.slice(nq..));
                let (cv, sv) = table_views(&tables, &gv, b * s * d / 2)?;
                // SAFETY: the kernel writes every element of the fused row.
                let out = unsafe { dev.alloc::<$t>(n)? };
                if n > 0 {
                    crate::run_kernel!(ROPE_APPEND, dev, &name, cfg;
                        &gq, &gkv, &cv, &sv, &has_rope, &out, &b_i, &s_i, &kvh_i, &r_i, &d_i,
                        &vplane,
                    )?;
                }
                wrap(out, &dev, (b, s, groups.slots() * d))
            }};
        }
        Ok(match grad.dtype() {
            DType::BF16 => launch!(half::bf16),
            DType::F16 => launch!(half::f16),
            other => candle_core::bail!("qkv heads on {other:?} is not supported"),
        })
    }
}

/// The module, for [`crate::ops::kernel_modules`].
#[cfg(feature = "cuda")]
pub(crate) fn cuda_modules() -> &'static crate::ops::pdl::PdlModules {
    &cuda::ROPE_APPEND_ALL
}
