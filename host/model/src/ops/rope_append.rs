//! Decoding's query, key and value heads in one launch (`rope_append.cu`): a fused
//! query_key_value output split into heads, the query and key heads rotated, the queries
//! written out and the keys and values appended to the KV cache. Op by op that is the head
//! split's copies, a `rope` launch for q and one for k and a cache write for k and one for v
//! ([`crate::ops::attention::Rotary::apply`], [`KvCache::append`]); the kernel rounds as
//! candle's `rope` does on sm_90 (see `rope_append.cu`), and the golden test
//! `rope_append_kernel_equals_the_op_by_op_path` holds it to the op-by-op path's bits.

use candle_core::{DType, Device, Result, Tensor};

use crate::ops::attention::KvCache;

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
    let (b, s, width) = fused.dims3()?;
    let d = groups.head_dim;
    if width != groups.slots() * d || !d.is_multiple_of(2) {
        candle_core::bail!(
            "rope_append: a fused row of {width} is not {} heads of {d}",
            groups.slots()
        );
    }
    let applies = matches!(fused.device(), Device::Cuda(_))
        && matches!(fused.dtype(), DType::BF16 | DType::F16)
        && !fused.track_op()
        && rope.is_none_or(|(c, s)| c.dtype() == fused.dtype() && s.dtype() == fused.dtype());
    if !applies || !switched_on()? {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    {
        // Its FMAs need sm_80 (see rope_append.cu).
        if !crate::ops::kernels::sm80_or_later(fused.device())? {
            return Ok(None);
        }
        cuda::run(cache, layer, fused, groups, rope, (b, s)).map(Some)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (cache, layer, b, s);
        Ok(None)
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::Mutex;

    use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
    use candle_core::{CudaStorage, Layout};

    use super::*;
    use crate::ops::kernels::{CudaInput, CudaModule, cuda_device, no_defines, wrap};

    pub(crate) static ROPE_APPEND: CudaModule = CudaModule::new(
        "adapterlab_rope_append",
        include_str!("rope_append.cu"),
        no_defines,
    )
    .for_arch("compute_80");

    pub fn run(
        cache: &mut KvCache,
        layer: usize,
        fused: &Tensor,
        groups: QkvGroups,
        rope: Option<(&Tensor, &Tensor)>,
        (b, s): (usize, usize),
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let d = groups.head_dim;
        if let Some((c, sn)) = rope {
            for t in [c, sn] {
                if t.dims() != [b, s, d / 2] {
                    candle_core::bail!(
                        "rope_append: cos/sin of {:?} for {b} rows of {s} tokens, heads of {d}",
                        t.dims()
                    );
                }
            }
        }
        let fused = fused.contiguous()?;
        let rope = match rope {
            Some((c, sn)) => Some((c.contiguous()?, sn.contiguous()?)),
            None => None,
        };
        let (buffer, len) = cache.reserve(
            layer,
            (b, groups.kv_heads, s, d),
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
            let pairs = b * s * g.slots() * (d / 2);
            let cfg = LaunchConfig::for_num_elems(pairs as u32);
            let fin = CudaInput::of(&self.fused)?;
            let (cos, sin) = match &self.rope {
                Some((c, sn)) => (Some(CudaInput::of(c)?), Some(CudaInput::of(sn)?)),
                None => (None, None),
            };
            let half_len = b * s * d / 2;
            let (b_i, s_i, kvh_i, r_i, d_i) = (
                b as i32,
                s as i32,
                g.kv_heads as i32,
                g.q_per_kv as i32,
                d as i32,
            );
            let (cap_i, len_i, vplane) = (cap as i64, self.len as i64, (b * kvh * cap * d) as i64);
            let has_rope = i32::from(self.rope.is_some());
            macro_rules! launch {
                ($name:literal, $t:ty) => {{
                    let fv = fin.view::<$t>(b * s * g.slots() * d)?;
                    // Without rotation the kernel never reads cos and sin: the input stands in.
                    let cv = match &cos {
                        Some(c) => c.view::<$t>(half_len)?,
                        None => fin.view::<$t>(b * s * g.slots() * d)?,
                    };
                    let sv = match &sin {
                        Some(c) => c.view::<$t>(half_len)?,
                        None => fin.view::<$t>(b * s * g.slots() * d)?,
                    };
                    let kv = buffer.as_cuda_slice_mut::<$t>()?;
                    // SAFETY: the kernel writes every query element.
                    let q = unsafe { dev.alloc::<$t>(b * n * s * d)? };
                    crate::run_kernel!(ROPE_APPEND, dev, $name, cfg;
                        &fv, &cv, &sv, &has_rope, &q, kv, &b_i, &s_i, &kvh_i, &r_i, &d_i, &cap_i,
                        &len_i, &vplane,
                    )?;
                    wrap(q, &dev, (b, n, s, d))
                }};
            }
            let q = match self.fused.dtype() {
                DType::BF16 => launch!("rope_append_bf16", half::bf16),
                DType::F16 => launch!("rope_append_f16", half::f16),
                other => candle_core::bail!("rope_append on {other:?} is not supported"),
            };
            *self.q.lock().unwrap() = Some(q);
            Ok(())
        }
    }
}

/// The module, for [`crate::ops::kernel_modules`].
#[cfg(feature = "cuda")]
pub(crate) fn cuda_module() -> &'static crate::ops::kernels::CudaModule {
    &cuda::ROPE_APPEND
}
