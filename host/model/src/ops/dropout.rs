//! Seeded inverted dropout as one graph op: the mask is a pure function of `(key, element
//! index)` (splitmix64, one hash for four elements), so this op never stores it — backward applies
//! the same op to the gradient — and the CPU and the GPU draw the same mask (the LoRA training
//! node's GPU kernels keep it as bits instead, where reading 1/16 of the bytes beats hashing again). A trainer keys it by `(seed, micro-batch, module)`
//! ([`crate::lora::LoraRegistry::set_dropout_key`]), which is what makes resumed runs repeat
//! uninterrupted ones.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use half::{bf16, f16};

/// The mask value of element `i`: 0 with probability `p`, else `scale` (`1 / (1 - p)`).
/// Elements `4j .. 4j + 3` share one splitmix64 value of `key + (j + 1) * golden ratio`; element
/// `4j + t` takes its 16 bits `48 - 16t .. 63 - 16t`, read as `u = bits * 2^-16` and dropped when
/// `u < p`, so an element is dropped with probability `p` rounded up to a multiple of 2^-16 (0.1
/// drops at 0.1000061). Four decisions a hash quarter the GPU kernels' work, which the hash,
/// not memory, bounded (prelude.cu draws the same mask).
#[inline]
pub fn keep_scale(key: u64, i: u64, p: f32, scale: f32) -> f32 {
    let mut z = key.wrapping_add(((i >> 2) + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let bits = (z >> (48 - 16 * (i & 3))) & 0xffff;
    let u = bits as f32 * (1.0 / 65_536.0);
    if u < p { 0.0 } else { scale }
}

/// `x` with elements zeroed with probability `p` and the rest scaled by `1 / (1 - p)`.
pub fn seeded_dropout(x: &Tensor, key: u64, p: f32) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    x.contiguous()?.apply_op1(SeededDropout {
        key,
        p,
        scale: 1.0 / (1.0 - p),
    })
}

struct SeededDropout {
    key: u64,
    p: f32,
    scale: f32,
}

impl CustomOp1 for SeededDropout {
    fn name(&self) -> &'static str {
        "seeded-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (start, end) = l.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("seeded-dropout: input is not contiguous".into())
        })?;
        let (key, p, scale) = (self.key, self.p, self.scale);
        let m = |i: usize| keep_scale(key, i as u64, p, scale);
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(
                v[start..end]
                    .iter()
                    .enumerate()
                    .map(|(i, x)| x * m(i))
                    .collect(),
            ),
            CpuStorage::BF16(v) => CpuStorage::BF16(
                v[start..end]
                    .iter()
                    .enumerate()
                    .map(|(i, x)| bf16::from_f32(x.to_f32() * m(i)))
                    .collect(),
            ),
            CpuStorage::F16(v) => CpuStorage::F16(
                v[start..end]
                    .iter()
                    .enumerate()
                    .map(|(i, x)| f16::from_f32(x.to_f32() * m(i)))
                    .collect(),
            ),
            other => {
                return Err(candle_core::Error::Msg(format!(
                    "seeded-dropout on {:?} is not supported",
                    other.dtype()
                )));
            }
        };
        Ok((out, l.shape().clone()))
    }

    // Not behind the `cuda` feature: without it candle's stand-in CudaStorage implements the
    // same trait, so this is type-checked in every build and never called.
    #[allow(unused_variables)]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        #[cfg(feature = "cuda")]
        {
            let (start, end) = l.contiguous_offsets().ok_or_else(|| {
                candle_core::Error::Msg("seeded-dropout: input is not contiguous".into())
            })?;
            let out = crate::ops::kernels::seeded_dropout(
                s,
                start,
                end - start,
                self.key,
                self.p,
                self.scale,
            )?;
            Ok((out, l.shape().clone()))
        }
        #[cfg(not(feature = "cuda"))]
        Err(candle_core::Error::Msg(
            "seeded-dropout: built without CUDA".into(),
        ))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        seeded_dropout(grad_res, self.key, self.p).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    #[test]
    fn drops_about_p_scales_the_rest_and_backward_uses_the_same_mask() -> Result<()> {
        let n = 20_000;
        let x = Var::from_tensor(&Tensor::ones(n, DType::F32, &Device::Cpu)?)?;
        let y = seeded_dropout(&x, 7, 0.1)?;
        let v = y.to_vec1::<f32>()?;
        let zeros = v.iter().filter(|&&a| a == 0.0).count() as f64 / n as f64;
        assert!((zeros - 0.1).abs() < 0.01, "dropped {zeros}");
        assert!(v.iter().all(|&a| a == 0.0 || (a - 1.0 / 0.9).abs() < 1e-6));
        // Same key, same mask; another key, another mask.
        assert_eq!(seeded_dropout(&x, 7, 0.1)?.to_vec1::<f32>()?, v);
        assert_ne!(seeded_dropout(&x, 8, 0.1)?.to_vec1::<f32>()?, v);
        let g = y.sum_all()?.backward()?;
        assert_eq!(g.get(&x).unwrap().to_vec1::<f32>()?, v);
        // bf16 in, bf16 out, the same mask.
        let yb = seeded_dropout(&x.to_dtype(DType::BF16)?, 7, 0.1)?;
        assert_eq!(yb.dtype(), DType::BF16);
        let vb = yb.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        assert!(v.iter().zip(&vb).all(|(a, b)| (*a == 0.0) == (*b == 0.0)));
        Ok(())
    }

    /// A quad's four decisions come from one hash: each position is dropped at `p` and any two
    /// positions independently (both dropped at `p^2`), for small and large `p`.
    #[test]
    fn the_four_elements_of_a_quad_are_dropped_independently() {
        let quads = 200_000u64;
        for p in [0.1f32, 0.5] {
            let drop = |i: u64| keep_scale(11, i, p, 2.0) == 0.0;
            let (mut alone, mut both) = ([0u64; 4], [[0u64; 4]; 4]);
            for j in 0..quads {
                let d: Vec<bool> = (0..4).map(|t| drop(4 * j + t)).collect();
                for t in 0..4 {
                    alone[t] += d[t] as u64;
                    for u in 0..4 {
                        both[t][u] += (d[t] && d[u]) as u64;
                    }
                }
            }
            let rate = |c: u64| c as f64 / quads as f64;
            let p = p as f64;
            // ~5 standard deviations of a binomial rate over 200,000 draws.
            let tol = |q: f64| 5.0 * (q * (1.0 - q) / quads as f64).sqrt();
            for t in 0..4 {
                let r = rate(alone[t]);
                assert!((r - p).abs() < tol(p), "p {p}: position {t} dropped at {r}");
                for (u, &count) in both[t].iter().enumerate().skip(t + 1) {
                    let r = rate(count);
                    assert!(
                        (r - p * p).abs() < tol(p * p),
                        "p {p}: positions {t} and {u} both dropped at {r}"
                    );
                }
            }
        }
    }

    /// The drop probability is `p` rounded up to 2^-16: every 16-bit value below
    /// `ceil(p * 2^16)` drops, none above.
    #[test]
    fn a_decision_is_u_below_p_at_sixteen_bits() {
        for p in [0.1f32, 0.25, 1.0 / 65_536.0, 0.999] {
            let below = (p * 65_536.0).ceil() as u64;
            for bits in [0, below.saturating_sub(1), below, below + 1, 65_535] {
                let u = bits as f32 * (1.0 / 65_536.0);
                assert_eq!(u < p, bits < below, "p {p}, bits {bits}");
            }
        }
    }
}
