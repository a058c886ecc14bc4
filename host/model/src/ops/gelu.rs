//! The exact (erf) GELU as one graph node: a fused forward kernel (candle's, or on the GPU in
//! 16-bit types this crate's with candle's roundings, vectorised), and a backward that
//! reads `x` and the incoming gradient once, `g * (Φ(x) + x φ(x))`, computed in f32. candle
//! differentiates `gelu_erf` with a dozen 16-bit ops over the `[tokens, ffn]` activation (the
//! largest of a Falcon layer), each with its own zero-filled gradient buffer.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use half::{bf16, f16};

/// `gelu_erf(x)`, differentiable through [`gelu_erf_backward`].
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    let out = forward(&x.detach())?;
    if !x.track_op() {
        return Ok(out);
    }
    crate::ops::handover::with_backward("gelu", x, out, gelu_erf_backward)
}

/// candle's `gelu_erf`; on the GPU in 16-bit types through this crate's kernel, which rounds as
/// candle's does (the golden test `gelu_forward_kernel_equals_candles`) and reads and writes 16
/// bytes a thread.
fn forward(x: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda()
        && let Some(y) = crate::ops::kernels::gelu_forward(x)?
    {
        return Ok(y);
    }
    x.gelu_erf()
}

/// `ADAPTERLAB_DECODE_GELU`: `fused` (the default), where a decoding kernel that computes an
/// MLP's up projection stores its exact GELU (the same bits as [`gelu_erf`] on its output; one
/// launch a layer fewer), or `separate`, the product and then this module's kernel.
static FUSED: crate::ops::switch::Switch<bool> = crate::ops::switch::Switch::new(
    "ADAPTERLAB_DECODE_GELU",
    &[("fused", true), ("separate", false)],
);

/// Whether decoding takes the GELU into the up projection's kernel (`ADAPTERLAB_DECODE_GELU`).
pub fn fused_in_product() -> Result<bool> {
    Ok(FUSED.in_force(true)?.0)
}

/// The `ADAPTERLAB_DECODE_GELU` in force (`fused` or `separate`), for reports.
pub fn setting() -> Result<&'static str> {
    Ok(FUSED.in_force(true)?.1)
}

/// `grad * d gelu_erf(x) / dx`, in `x`'s dtype.
pub fn gelu_erf_backward(x: &Tensor, grad: &Tensor) -> Result<Tensor> {
    if x.dims() != grad.dims() {
        candle_core::bail!(
            "gelu backward: x {:?}, gradient {:?}",
            x.dims(),
            grad.dims()
        );
    }
    let grad = grad.to_dtype(x.dtype())?;
    x.contiguous()?
        .apply_op2_no_bwd(&grad.contiguous()?, &GeluBackward)
}

/// The derivative times `g`, element by element (the CUDA kernel computes the same).
#[inline]
pub fn gelu_grad(x: f32, g: f32) -> f32 {
    const INV_SQRT2: f32 = std::f32::consts::FRAC_1_SQRT_2;
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    let cdf = 0.5 * (1.0 + candle_core::cpu::erf::erf_f32(x * INV_SQRT2));
    let pdf = INV_SQRT_2PI * (-0.5 * x * x).exp();
    g * (cdf + x * pdf)
}

struct GeluBackward;

impl CustomOp2 for GeluBackward {
    fn name(&self) -> &'static str {
        "gelu-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let span = |l: &Layout| {
            l.contiguous_offsets()
                .ok_or_else(|| candle_core::Error::Msg("gelu backward: not contiguous".into()))
        };
        let ((xs, xe), (gs, ge)) = (span(xl)?, span(gl)?);
        let out = match (x, g) {
            (CpuStorage::F32(x), CpuStorage::F32(g)) => CpuStorage::F32(
                x[xs..xe]
                    .iter()
                    .zip(&g[gs..ge])
                    .map(|(x, g)| gelu_grad(*x, *g))
                    .collect(),
            ),
            (CpuStorage::BF16(x), CpuStorage::BF16(g)) => CpuStorage::BF16(
                x[xs..xe]
                    .iter()
                    .zip(&g[gs..ge])
                    .map(|(x, g)| bf16::from_f32(gelu_grad(x.to_f32(), g.to_f32())))
                    .collect(),
            ),
            (CpuStorage::F16(x), CpuStorage::F16(g)) => CpuStorage::F16(
                x[xs..xe]
                    .iter()
                    .zip(&g[gs..ge])
                    .map(|(x, g)| f16::from_f32(gelu_grad(x.to_f32(), g.to_f32())))
                    .collect(),
            ),
            _ => candle_core::bail!("gelu backward on {:?} is not supported", x.dtype()),
        };
        Ok((out, xl.shape().clone()))
    }

    #[allow(unused_variables)]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        #[cfg(feature = "cuda")]
        {
            let start = |l: &Layout| {
                l.contiguous_offsets()
                    .map(|o| o.0)
                    .ok_or_else(|| candle_core::Error::Msg("gelu backward: not contiguous".into()))
            };
            let out = crate::ops::kernels::gelu_backward(
                (x, start(xl)?),
                (g, start(gl)?),
                xl.shape().elem_count(),
            )?;
            Ok((out, xl.shape().clone()))
        }
        #[cfg(not(feature = "cuda"))]
        candle_core::bail!("gelu backward: built without CUDA")
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Var};

    use super::*;

    #[test]
    fn backward_equals_candles_gradient_of_gelu_erf() -> Result<()> {
        let x: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) / 80.0).collect();
        let x = Var::from_tensor(&Tensor::from_vec(x, 1000, &Device::Cpu)?)?;
        let w: Vec<f32> = (0..1000).map(|i| ((i % 9) as f32 - 4.0) * 0.5).collect();
        let w = Tensor::from_vec(w, 1000, &Device::Cpu)?;
        let ours = (gelu_erf(x.as_tensor())? * &w)?.sum_all()?.backward()?;
        let theirs = (x.as_tensor().gelu_erf()? * &w)?.sum_all()?.backward()?;
        let d = (ours.get(&x).unwrap() - theirs.get(&x).unwrap())?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(d < 1e-5, "gelu gradient differs by {d}");
        let lo = gelu_erf_backward(
            &x.as_tensor().to_dtype(DType::BF16)?,
            &w.to_dtype(DType::BF16)?,
        )?;
        assert_eq!(lo.dtype(), DType::BF16);
        Ok(())
    }
}

#[cfg(test)]
mod switch_tests {
    #[test]
    fn the_switch_names_are_the_tables() {
        super::FUSED.names_match().unwrap();
    }
}
