//! Attention's softmax as one pass over the scores, forward and backward.
//!
//! `softmax(scores * scale + mask)` over the last dimension, computed in f32 and written in the
//! scores' dtype, and its backward `dS = P * (dP - sum(P * dP)) * scale` with `P` recomputed
//! from the scores. Op by op, candle widens the `[b, h, s, t]` scores to f32 and makes five or
//! more passes over them (widen, scale, mask, softmax, narrow; twice that in backward); at
//! Falcon-7B's 71 heads and 8 x 512 tokens each pass moves 1.2 GB per layer. These read the
//! 16-bit scores once or twice and write once.
//!
//! `mask` is the additive `[mb, 1, s, t]` f32 mask of [`crate::ops::attention::AttentionContext`],
//! `mb` 1 or the batch. The CPU code is the reference the CUDA kernels are tested against.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use half::{bf16, f16};

/// `softmax(scores * scale + mask)` in f32, returned in `scores`' dtype. `scores`: `[b, h, s, t]`.
pub fn masked_softmax(scores: &Tensor, mask: Option<&Tensor>, scale: f32) -> Result<Tensor> {
    let scores = scores.contiguous()?;
    let (mask, has_mask) = mask_or_dummy(&scores, mask)?;
    scores.apply_op2_no_bwd(&mask, &Softmax { scale, has_mask })
}

/// The probabilities of [`masked_softmax`] and the gradient with respect to the scores given
/// `dp`, the gradient with respect to its output: `P * (dP - sum_t(P * dP)) * scale`. Attention's
/// backward needs both, so one pass recomputes `P` from `scores` and writes the two.
pub fn masked_softmax_backward(
    scores: &Tensor,
    mask: Option<&Tensor>,
    dp: &Tensor,
    scale: f32,
) -> Result<(Tensor, Tensor)> {
    let scores = scores.contiguous()?;
    let dp = dp.contiguous()?;
    if dp.dims() != scores.dims() || dp.dtype() != scores.dtype() {
        candle_core::bail!(
            "masked-softmax backward: dP {:?} {:?} against scores {:?} {:?}",
            dp.dims(),
            dp.dtype(),
            scores.dims(),
            scores.dtype()
        );
    }
    let (mask, has_mask) = mask_or_dummy(&scores, mask)?;
    // `[2, ..scores]`: the probabilities, then the gradient.
    let both = scores.apply_op3_no_bwd(&mask, &dp, &Softmax { scale, has_mask })?;
    Ok((both.get(0)?, both.get(1)?))
}

/// The mask, checked against the scores, or a one-element stand-in the kernels ignore.
fn mask_or_dummy(scores: &Tensor, mask: Option<&Tensor>) -> Result<(Tensor, bool)> {
    let (b, _, s, t) = scores.dims4()?;
    match mask {
        Some(m) => {
            let (mb, one, ms, mt) = m.dims4()?;
            if one != 1 || ms != s || mt != t || !(mb == 1 || mb == b) {
                candle_core::bail!(
                    "masked-softmax: mask {:?} does not fit scores {:?}",
                    m.dims(),
                    scores.dims()
                );
            }
            Ok((m.to_dtype(DType::F32)?.contiguous()?, true))
        }
        None => Ok((no_mask(scores.device())?, false)),
    }
}

/// The one-f32 stand-in for an absent mask or bias that a kernel takes but never reads, made
/// once per device: a fresh one cost an allocation and a launch per layer per decoded token.
pub(crate) fn no_mask(device: &candle_core::Device) -> Result<Tensor> {
    static MADE: std::sync::Mutex<Vec<Tensor>> = std::sync::Mutex::new(Vec::new());
    let mut made = MADE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(t) = made.iter().find(|t| t.device().same_device(device)) {
        return Ok(t.clone());
    }
    let t = Tensor::zeros(1, DType::F32, device)?;
    made.push(t.clone());
    Ok(t)
}

/// The forward pass as a two-input op (scores, mask), the backward as a three-input one
/// (scores, mask, dP) with a `[2, ..scores]` output: which one runs is the number of inputs.
struct Softmax {
    scale: f32,
    has_mask: bool,
}

/// The shape facts the kernels index by.
#[derive(Clone, Copy)]
struct Dims {
    rows: usize,
    t: usize,
    /// Rows per batch entry (`h * s`) and per head (`s`).
    per_batch: usize,
    s: usize,
    /// 1 when one mask serves every batch entry.
    mask_batch: usize,
}

impl Softmax {
    fn dims(&self, scores: &Layout, mask: &Layout) -> Result<Dims> {
        let (b, h, s, t) = scores.shape().dims4()?;
        Ok(Dims {
            rows: b * h * s,
            t,
            per_batch: h * s,
            s,
            mask_batch: if self.has_mask {
                mask.shape().dims()[0]
            } else {
                1
            },
        })
    }

    /// The output shape: the scores', or `[2, ..]` for the probabilities and the gradient.
    fn out_shape(scores: &Layout, backward: bool) -> Shape {
        let mut dims = scores.shape().dims().to_vec();
        if backward {
            dims.insert(0, 2);
        }
        Shape::from(dims)
    }

    /// One row on the CPU: `x` the scores, `m` the mask row, `dp` the output gradient (backward,
    /// where `out` gets the gradient and `probs` the probabilities).
    fn row(&self, x: &[f32], m: Option<&[f32]>, dp: Option<(&[f32], &mut [f32])>, out: &mut [f32]) {
        for (j, o) in out.iter_mut().enumerate() {
            let v = x[j] * self.scale;
            *o = match m {
                Some(m) => v + m[j],
                None => v,
            };
        }
        let max = out.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for o in out.iter_mut() {
            *o = (*o - max).exp();
            sum += *o;
        }
        for o in out.iter_mut() {
            *o /= sum;
        }
        if let Some((dp, probs)) = dp {
            probs.copy_from_slice(out);
            let dot: f32 = out.iter().zip(dp).map(|(p, d)| p * d).sum();
            for (o, d) in out.iter_mut().zip(dp) {
                *o = *o * (d - dot) * self.scale;
            }
        }
    }

    fn cpu(&self, inputs: &[(&CpuStorage, &Layout)]) -> Result<(CpuStorage, Shape)> {
        let (s, sl) = inputs[0];
        let (m, ml) = inputs[1];
        let d = self.dims(sl, ml)?;
        let x = to_f32(s, sl)?;
        let mask = if self.has_mask {
            Some(to_f32(m, ml)?)
        } else {
            None
        };
        let dp = match inputs.get(2) {
            Some((g, gl)) => Some(to_f32(g, gl)?),
            None => None,
        };
        let n = d.rows * d.t;
        let mut out = vec![0f32; if dp.is_some() { 2 * n } else { n }];
        // Backward: the probabilities first, then the gradient.
        let (probs, grad) = out.split_at_mut(if dp.is_some() { n } else { 0 });
        for r in 0..d.rows {
            let span = r * d.t..(r + 1) * d.t;
            let mrow = mask.as_ref().map(|m| {
                let bi = if d.mask_batch == 1 {
                    0
                } else {
                    r / d.per_batch
                };
                let start = (bi * d.s + r % d.s) * d.t;
                &m[start..start + d.t]
            });
            match &dp {
                Some(g) => self.row(
                    &x[span.clone()],
                    mrow,
                    Some((&g[span.clone()], &mut probs[span.clone()])),
                    &mut grad[span],
                ),
                None => self.row(&x[span.clone()], mrow, None, &mut grad[span]),
            }
        }
        Ok((from_f32(s.dtype(), out)?, Self::out_shape(sl, dp.is_some())))
    }
}

fn to_f32(s: &CpuStorage, l: &Layout) -> Result<Vec<f32>> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("masked-softmax: input is not contiguous".into()))?;
    Ok(match s {
        CpuStorage::F32(v) => v[start..end].to_vec(),
        CpuStorage::BF16(v) => v[start..end].iter().map(|x| x.to_f32()).collect(),
        CpuStorage::F16(v) => v[start..end].iter().map(|x| x.to_f32()).collect(),
        other => candle_core::bail!("masked-softmax on {:?} is not supported", other.dtype()),
    })
}

fn from_f32(dtype: DType, v: Vec<f32>) -> Result<CpuStorage> {
    Ok(match dtype {
        DType::F32 => CpuStorage::F32(v),
        DType::BF16 => CpuStorage::BF16(v.into_iter().map(bf16::from_f32).collect()),
        DType::F16 => CpuStorage::F16(v.into_iter().map(f16::from_f32).collect()),
        other => candle_core::bail!("masked-softmax on {other:?} is not supported"),
    })
}

#[cfg(feature = "cuda")]
impl Softmax {
    fn cuda(
        &self,
        inputs: &[(&candle_core::CudaStorage, &Layout)],
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (s, sl) = inputs[0];
        let (m, ml) = inputs[1];
        let d = self.dims(sl, ml)?;
        let offsets = |l: &Layout| {
            l.contiguous_offsets().ok_or_else(|| {
                candle_core::Error::Msg("masked-softmax: input is not contiguous".into())
            })
        };
        let args = crate::ops::kernels::SoftmaxArgs {
            rows: d.rows,
            t: d.t,
            per_batch: d.per_batch,
            s: d.s,
            mask_batch: d.mask_batch,
            scale: self.scale,
            has_mask: self.has_mask,
        };
        let dp = match inputs.get(2) {
            Some((g, gl)) => Some((*g, offsets(gl)?.0)),
            None => None,
        };
        let backward = dp.is_some();
        let out = crate::ops::kernels::masked_softmax(
            (s, offsets(sl)?.0),
            (m, offsets(ml)?.0),
            dp,
            &args,
        )?;
        Ok((out, Self::out_shape(sl, backward)))
    }
}

// The CUDA entry points exist in every build (candle's stand-in CudaStorage implements the
// same traits without the feature) and are never called without it.
impl CustomOp2 for Softmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        sl: &Layout,
        m: &CpuStorage,
        ml: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu(&[(s, sl), (m, ml)])
    }

    #[allow(unused_variables)]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        sl: &Layout,
        m: &candle_core::CudaStorage,
        ml: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        #[cfg(feature = "cuda")]
        return self.cuda(&[(s, sl), (m, ml)]);
        #[cfg(not(feature = "cuda"))]
        candle_core::bail!("masked-softmax: built without CUDA")
    }
}

impl CustomOp3 for Softmax {
    fn name(&self) -> &'static str {
        "masked-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        sl: &Layout,
        m: &CpuStorage,
        ml: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu(&[(s, sl), (m, ml), (g, gl)])
    }

    #[allow(unused_variables)]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        sl: &Layout,
        m: &candle_core::CudaStorage,
        ml: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        #[cfg(feature = "cuda")]
        return self.cuda(&[(s, sl), (m, ml), (g, gl)]);
        #[cfg(not(feature = "cuda"))]
        candle_core::bail!("masked-softmax: built without CUDA")
    }
}

/// Softmax over the last dimension, computed in f32 and returned in `out_dtype`.
pub fn softmax_last_dim(x: &Tensor, out_dtype: DType) -> Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    let p = if x.track_op() {
        candle_nn::ops::softmax(&x, candle_core::D::Minus1)?
    } else {
        candle_nn::ops::softmax_last_dim(&x.contiguous()?)?
    };
    p.to_dtype(out_dtype)
}

#[cfg(test)]
mod tests {
    use candle_core::{D, Device, Var};

    use super::*;

    /// The op-by-op graph these ops replace, differentiated by candle.
    fn reference(scores: &Tensor, mask: Option<&Tensor>, scale: f64) -> Result<Tensor> {
        let x = (scores.to_dtype(DType::F32)? * scale)?;
        let x = match mask {
            Some(m) => x.broadcast_add(m)?,
            None => x,
        };
        candle_nn::ops::softmax(&x, D::Minus1)
    }

    #[test]
    fn forward_and_backward_equal_the_op_by_op_graph() -> Result<()> {
        let dev = Device::Cpu;
        let (b, h, s, t) = (2, 3, 4, 6);
        let n = b * h * s * t;
        let scores: Vec<f32> = (0..n).map(|i| (i as f32 * 0.61).sin() * 3.0).collect();
        let scores = Var::from_tensor(&Tensor::from_vec(scores, (b, h, s, t), &dev)?)?;
        let m = f32::MIN;
        let mut mask = vec![0f32; b * s * t];
        for (i, v) in mask.iter_mut().enumerate() {
            let (bi, j) = (i / (s * t), i % t);
            if j > (i / t) % s + 2 || (bi == 0 && j == 0) {
                *v = m;
            }
        }
        let mask = Tensor::from_vec(mask, (b, 1, s, t), &dev)?;
        let w: Vec<f32> = (0..n).map(|i| ((i % 5) as f32 - 2.0) * 0.3).collect();
        let w = Tensor::from_vec(w, (b, h, s, t), &dev)?;
        for mask in [None, Some(&mask)] {
            let want = reference(&scores, mask, 0.35)?;
            let got = masked_softmax(&scores, mask, 0.35)?;
            let d = (&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d < 1e-6, "forward differs by {d}");
            let grads = (want * &w)?.sum_all()?.backward()?;
            let want_ds = grads.get(&scores).unwrap();
            let (got_p, got_ds) = masked_softmax_backward(&scores, mask, &w, 0.35)?;
            let d = (&got_ds - want_ds)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d < 1e-6, "backward differs by {d}");
            let d = (&got_p - &got)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d == 0.0, "backward's probabilities differ by {d}");
        }
        // 16-bit scores: computed in f32, rounded once.
        let lo = scores.to_dtype(DType::BF16)?;
        let got = masked_softmax(&lo, None, 0.35)?;
        assert_eq!(got.dtype(), DType::BF16);
        let want = reference(&lo, None, 0.35)?.to_dtype(DType::BF16)?;
        let d = (got.to_dtype(DType::F32)? - want.to_dtype(DType::F32)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(d == 0.0, "bf16 differs by {d}");
        Ok(())
    }
}
