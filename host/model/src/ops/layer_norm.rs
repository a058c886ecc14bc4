//! Layer norm's value and input gradient, `d(layer_norm(x) * w + b)/dx` applied to `grad`, for
//! the norm's graph node (`nn::layers::LayerNorm`): one kernel a row each on a GPU
//! (`layer_norm.cu`), candle's `layer_norm` and the op-by-op f32 form elsewhere. All compute in
//! f32 and return `x`'s dtype; they differ by the order of the row sums. The golden tests
//! `layer_norm_input_grad_kernel_equals_the_op_by_op_form` and
//! `layer_norm_kernel_is_as_close_to_f32_as_candles` hold the kernels to their references.

use candle_core::{D, DType, Result, Tensor};

/// `rstd * (g - mean(g) - xhat * mean(g * xhat))` with `g = grad * w`, `xhat = (x - mean) *
/// rstd`, normalising over the last dimension.
pub fn input_grad(x: &Tensor, w: &Tensor, eps: f64, grad: &Tensor) -> Result<Tensor> {
    let fused = x.device().is_cuda()
        && x.elem_count() > 0
        && matches!(x.dtype(), DType::BF16 | DType::F16)
        && grad.dtype() == x.dtype()
        && grad.dims() == x.dims()
        && w.dims() == [x.dims().last().copied().unwrap_or(0)];
    #[cfg(feature = "cuda")]
    if fused {
        return cuda::input_grad(x, w, eps, grad);
    }
    let _ = fused;
    input_grad_op_by_op(x, w, eps, grad)
}

/// `layer_norm(x) * w + b` over the last dimension, without a graph: on a GPU in a 16-bit type
/// (`w` and `b` in it too) one kernel a row holding the row in registers (`layer_norm.cu`),
/// elsewhere candle's `layer_norm`. The two differ by the order of the row sums and the
/// variance's form (two passes here, `E[x^2] - mean^2` in candle's).
pub fn value(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Some(y) = cuda::value(x, w, b, eps)? {
        return Ok(y);
    }
    candle_nn::ops::layer_norm(&x.contiguous()?, w, b, eps as f32)
}

/// The op-by-op form, candle's ops in f32 (the CPU's path, and the GPU's reference).
pub fn input_grad_op_by_op(x: &Tensor, w: &Tensor, eps: f64, grad: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let xc = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let rstd = (xc.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    let xhat = xc.broadcast_mul(&rstd)?;
    let g = grad
        .to_dtype(DType::F32)?
        .broadcast_mul(&w.to_dtype(DType::F32)?)?;
    let m1 = g.mean_keepdim(D::Minus1)?;
    let m2 = (&g * &xhat)?.mean_keepdim(D::Minus1)?;
    let dx = (g.broadcast_sub(&m1)? - xhat.broadcast_mul(&m2)?)?.broadcast_mul(&rstd)?;
    dx.to_dtype(dtype)
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::LaunchConfig;

    use super::*;
    use crate::ops::kernels::{CudaInput, cuda_device, start_aligned, wrap};

    /// `LNV_THREADS` and `LNV_CHUNKS` in layer_norm.cu.
    const VEC_THREADS: usize = 256;
    const VEC_CHUNKS: usize = 4;

    const SOURCE: &str = concat!(include_str!("pdl.cu"), include_str!("layer_norm.cu"));

    // The forward kernel is one of decoding's chain (ops/pdl.rs).
    crate::pdl_modules!(
        LAYER_NORM_ALL,
        LAYER_NORM,
        LAYER_NORM_PDL,
        LAYER_NORM_PDL_EARLY,
        "adapterlab_layer_norm",
        SOURCE
    );

    /// [`super::value`]'s kernel, or `None` where it does not serve (not a GPU or a 16-bit
    /// type, weights in another, rows it does not take).
    pub fn value(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Option<Tensor>> {
        let n = x.dims().last().copied().unwrap_or(0);
        let serves = x.device().is_cuda()
            && matches!(x.dtype(), DType::BF16 | DType::F16)
            && w.dtype() == x.dtype()
            && b.dtype() == x.dtype()
            && w.dims() == [n]
            && b.dims() == [n]
            && n > 0
            && n.is_multiple_of(8)
            && n <= VEC_THREADS * 8 * VEC_CHUNKS;
        if !serves {
            return Ok(None);
        }
        let (x, w, b) = (x.contiguous()?, w.contiguous()?, b.contiguous()?);
        if !(start_aligned(&x, 8) && start_aligned(&w, 8) && start_aligned(&b, 8)) {
            return Ok(None);
        }
        let dev = cuda_device(&x)?;
        let (module, pdl) = LAYER_NORM_ALL.pick(x.device())?;
        let rows = x.elem_count() / n;
        let (xs, ws, bs) = (CudaInput::of(&x)?, CudaInput::of(&w)?, CudaInput::of(&b)?);
        let (n_i, eps_f) = (n as i32, eps as f32);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (VEC_THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        macro_rules! launch {
            ($dtype:literal, $t:ty) => {{
                let (xv, wv, bv) = (
                    xs.view::<$t>(rows * n)?,
                    ws.view::<$t>(n)?,
                    bs.view::<$t>(n)?,
                );
                // SAFETY: every element is written by the kernel below.
                let out = unsafe { dev.alloc::<$t>(rows * n)? };
                if rows > 0 {
                    crate::run_kernel_maybe_pdl!(pdl, module, dev, concat!("layer_norm_fwd_vec_", $dtype), cfg;
                        &xv, &wv, &bv, &out, &n_i, &eps_f)?;
                }
                wrap(out, &dev, x.shape().clone())
            }};
        }
        Ok(Some(match x.dtype() {
            DType::BF16 => launch!("bf16", half::bf16),
            _ => launch!("f16", half::f16),
        }))
    }

    pub fn input_grad(x: &Tensor, w: &Tensor, eps: f64, grad: &Tensor) -> Result<Tensor> {
        let (x, grad) = (x.contiguous()?, grad.contiguous()?);
        let w = w.to_dtype(DType::F32)?.contiguous()?;
        let dev = cuda_device(&x)?;
        let n = w.elem_count();
        let rows = x.elem_count() / n.max(1);
        let (xs, gs, ws) = (
            CudaInput::of(&x)?,
            CudaInput::of(&grad)?,
            CudaInput::of(&w)?,
        );
        let wv = ws.view::<f32>(n)?;
        let (n_i, eps_f) = (n as i32, eps as f32);
        // The kernel that holds the row in registers (`layer_norm_bwd_vec`) takes rows of
        // 8-element chunks, 16-byte aligned, up to VEC_THREADS * 8 * VEC_CHUNKS elements.
        let vec = n.is_multiple_of(8)
            && n <= VEC_THREADS * 8 * VEC_CHUNKS
            && start_aligned(&x, 8)
            && start_aligned(&grad, 8)
            && start_aligned(&w, 4);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (if vec { VEC_THREADS as u32 } else { 512 }, 1, 1),
            shared_mem_bytes: 0,
        };
        macro_rules! launch {
            ($dtype:literal, $t:ty) => {{
                let (xv, gv) = (xs.view::<$t>(rows * n)?, gs.view::<$t>(rows * n)?);
                // SAFETY: every element is written by the kernel below.
                let out = unsafe { dev.alloc::<$t>(rows * n)? };
                let name = format!("layer_norm_bwd_{}{}", if vec { "vec_" } else { "" }, $dtype);
                crate::run_kernel!(LAYER_NORM, dev, &name, cfg; &xv, &gv, &wv, &out, &n_i, &eps_f)?;
                wrap(out, &dev, x.shape().clone())
            }};
        }
        Ok(match x.dtype() {
            DType::BF16 => launch!("bf16", half::bf16),
            DType::F16 => launch!("f16", half::f16),
            other => candle_core::bail!("layer norm backward on {other:?} is not supported"),
        })
    }
}

/// The module, for [`crate::ops::kernel_modules`].
#[cfg(feature = "cuda")]
pub(crate) fn cuda_modules() -> &'static crate::ops::pdl::PdlModules {
    &cuda::LAYER_NORM_ALL
}
