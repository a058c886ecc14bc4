//! A parallel decoder layer's residual, `x + (mlp + attn)`, in one launch on a GPU
//! (`residual.cu`) where it would take two, with the bits of the two adds; the golden test
//! `residual_kernel_equals_two_adds` holds it to them, value and gradients. And the sum of a
//! tensor's two gradients in backward ([`gradient_add`]), which candle's autograd calls through
//! the hook the CUDA device installs; `gradient_add_kernel_equals_candles_add` holds its bits.

use candle_core::{DType, Result, Tensor};

/// `x + (a + b)`, as transformers' Falcon adds its parallel branches (so f32 sums round the
/// same way). One kernel for 16-bit tensors of one shape on a GPU (with a gradient, one graph
/// node, whose backward hands the output's gradient to all three, as the adds' backward does);
/// two adds elsewhere.
pub fn add3(x: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let fused = x.device().is_cuda()
        && matches!(x.dtype(), DType::BF16 | DType::F16)
        && [a, b]
            .iter()
            .all(|t| t.dtype() == x.dtype() && t.dims() == x.dims());
    #[cfg(feature = "cuda")]
    if fused {
        let out = cuda::add3(&x.detach(), &a.detach(), &b.detach())?;
        if !(x.track_op() || a.track_op() || b.track_op()) {
            return Ok(out);
        }
        // Only to the inputs with a graph (the first layer's x, the embeddings, has none).
        let wants = [x, a, b].map(Tensor::track_op);
        return crate::ops::handover::with_backward3(
            "residual",
            [x, a, b],
            out,
            Box::new(move |_, _, grad| Ok(wants.map(|w| w.then(|| grad.clone())))),
        );
    }
    let _ = fused;
    x + (a + b)?
}

/// `ADAPTERLAB_DECODE_RESIDUAL`: `fused` (the default), where the decoding kernel of a parallel
/// layer's MLP down projection adds the residual in its epilogue ([`crate::ops::epilogue`]; the
/// same bits as [`add3`]; one launch a layer fewer), or `separate`, [`add3`]'s kernel after it.
static FUSED: crate::ops::switch::Switch<bool> = crate::ops::switch::Switch::new(
    "ADAPTERLAB_DECODE_RESIDUAL",
    &[("fused", true), ("separate", false)],
);

/// Whether decoding adds the residual in the down projection's kernel
/// (`ADAPTERLAB_DECODE_RESIDUAL`).
pub fn fused_in_product() -> Result<bool> {
    Ok(FUSED.in_force(true)?.0)
}

/// The `ADAPTERLAB_DECODE_RESIDUAL` in force (`fused` or `separate`), for reports.
pub fn setting() -> Result<&'static str> {
    Ok(FUSED.in_force(true)?.1)
}

/// `a + b` for the gradient store (`candle_core::backprop::set_gradient_adder`, installed by
/// [`crate::engine::device::cuda`]): one kernel where both are 16-bit tensors of one shape and
/// dtype on a GPU, `None` (candle's add) otherwise. A Falcon-7B layer's backward sums two such
/// pairs (the norm's output, read by the attention and the MLP; the layer's input, read by the
/// norm and the residual): 62 adds of `[4096, 4544]` a step at 8 x 512, ~88 µs each with
/// candle's binary kernel on an H100, which reads two bytes a thread (ncu, 2026-12-07).
pub fn gradient_add(a: &Tensor, b: &Tensor) -> Result<Option<Tensor>> {
    let fits = a.device().is_cuda()
        && matches!(a.dtype(), DType::BF16 | DType::F16)
        && b.dtype() == a.dtype()
        && b.dims() == a.dims()
        && a.device().same_device(b.device());
    #[cfg(feature = "cuda")]
    if fits {
        return cuda::add2(a, b).map(Some);
    }
    let _ = fits;
    Ok(None)
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::LaunchConfig;

    use super::*;
    use crate::ops::kernels::{CudaInput, CudaModule, cuda_device, no_defines, wrap};

    pub(crate) static RESIDUAL: CudaModule = CudaModule::new(
        "adapterlab_residual",
        include_str!("residual.cu"),
        no_defines,
    );

    pub fn add3(x: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let (x, a, b) = (x.contiguous()?, a.contiguous()?, b.contiguous()?);
        let dev = cuda_device(&x)?;
        let n = x.elem_count();
        let (xs, as_, bs) = (CudaInput::of(&x)?, CudaInput::of(&a)?, CudaInput::of(&b)?);
        let n_i = n as i64;
        let cfg = LaunchConfig::for_num_elems(n.div_ceil(8) as u32);
        // 16-byte vectors where every view starts on a 16-byte boundary (`out` is fresh).
        let vec = i32::from(
            [&x, &a, &b]
                .iter()
                .all(|t| t.layout().start_offset().is_multiple_of(8)),
        );
        macro_rules! launch {
            ($name:literal, $t:ty) => {{
                let (xv, av, bv) = (xs.view::<$t>(n)?, as_.view::<$t>(n)?, bs.view::<$t>(n)?);
                // SAFETY: every element is written by the kernel below.
                let out = unsafe { dev.alloc::<$t>(n)? };
                crate::run_kernel!(RESIDUAL, dev, $name, cfg; &xv, &av, &bv, &out, &n_i, &vec)?;
                wrap(out, &dev, x.shape().clone())
            }};
        }
        Ok(match x.dtype() {
            DType::BF16 => launch!("residual3_bf16", half::bf16),
            DType::F16 => launch!("residual3_f16", half::f16),
            other => candle_core::bail!("residual on {other:?} is not supported"),
        })
    }

    pub fn add2(a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let (a, b) = (a.contiguous()?, b.contiguous()?);
        let dev = cuda_device(&a)?;
        let n = a.elem_count();
        let (as_, bs) = (CudaInput::of(&a)?, CudaInput::of(&b)?);
        let n_i = n as i64;
        let cfg = LaunchConfig::for_num_elems(n.div_ceil(8) as u32);
        let vec = i32::from(
            [&a, &b]
                .iter()
                .all(|t| t.layout().start_offset().is_multiple_of(8)),
        );
        macro_rules! launch {
            ($name:literal, $t:ty) => {{
                let (av, bv) = (as_.view::<$t>(n)?, bs.view::<$t>(n)?);
                // SAFETY: every element is written by the kernel below.
                let out = unsafe { dev.alloc::<$t>(n)? };
                crate::run_kernel!(RESIDUAL, dev, $name, cfg; &av, &bv, &out, &n_i, &vec)?;
                wrap(out, &dev, a.shape().clone())
            }};
        }
        Ok(match a.dtype() {
            DType::BF16 => launch!("add2_bf16", half::bf16),
            DType::F16 => launch!("add2_f16", half::f16),
            other => candle_core::bail!("gradient add on {other:?} is not supported"),
        })
    }
}

/// The module, for [`crate::ops::kernel_modules`].
#[cfg(feature = "cuda")]
pub(crate) fn cuda_module() -> &'static crate::ops::kernels::CudaModule {
    &cuda::RESIDUAL
}

#[cfg(test)]
mod switch_tests {
    #[test]
    fn the_switch_names_are_the_tables() {
        super::FUSED.names_match().unwrap();
    }
}
