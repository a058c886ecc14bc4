//! A 16-bit product with a term added inside it: `a b^T + c` or `a b + c` on cuBLAS with
//! `beta = 1`, written over `c`'s buffer. The sum is formed in the product's f32 accumulator and
//! rounded once, where a product followed by an add kernel rounds twice and moves the `[m, n]`
//! result three more times (the product written, read back, the sum written); here `c` is read
//! once, by the product's epilogue, while the multiprocessors are busy multiplying.

use candle_core::cuda_backend::cudarc::cublas::sys;
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
use candle_core::{DType, Error, Result, Storage, Tensor};

use crate::ops::kernels::{CudaInput, cuda_device};

/// How `b` is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rhs {
    /// `[n, k]`: the product is `a b^T` (a linear layer's weight, `[out, in]`, forward).
    Transposed,
    /// `[k, n]`: the product is `a b` (the same weight in the input gradient, `grad W`).
    AsIs,
}

/// `a [m, k]` times `b` (as `rhs` says) plus `c [m, n]`, all contiguous in one 16-bit type on one
/// GPU. `c` is consumed: its buffer becomes the result where nothing else holds it (else it is
/// copied first).
pub fn matmul_plus(a: &Tensor, b: &Tensor, rhs: Rhs, c: Tensor) -> Result<Tensor> {
    let dev = cuda_device(a)?;
    let (m, k) = a.dims2()?;
    let (n, kb) = match rhs {
        Rhs::Transposed => b.dims2()?,
        Rhs::AsIs => {
            let (kb, n) = b.dims2()?;
            (n, kb)
        }
    };
    let dtype = a.dtype();
    if k != kb
        || c.dims() != [m, n]
        || b.dtype() != dtype
        || c.dtype() != dtype
        || !matches!(dtype, DType::BF16 | DType::F16)
        || !a.is_contiguous()
        || !b.is_contiguous()
        || !c.is_contiguous()
    {
        return Err(Error::Msg(format!(
            "matmul_plus: a {:?} {:?}, b {:?} ({rhs:?}) {:?}, c {:?} {:?}",
            a.dims(),
            dtype,
            b.dims(),
            b.dtype(),
            c.dims(),
            c.dtype()
        )));
    }
    // cuBLAS writes from the buffer's start: a term that starts further in is copied (candle's
    // `copy` keeps the layout and its offset; `force_contiguous` allocates afresh).
    let c = if c.layout().start_offset() == 0 {
        c
    } else {
        c.force_contiguous()?
    };
    let (storage, _) = match c.into_storage() {
        Ok(owned) => owned,
        Err(shared) => shared
            .force_contiguous()?
            .into_storage()
            .map_err(|_| Error::Msg("matmul_plus: a fresh copy of c is held elsewhere".into()))?,
    };
    let Storage::Cuda(mut out) = storage else {
        return Err(Error::Msg("matmul_plus: c is not on the GPU".into()));
    };
    // Row-major [m, n] is column-major [n, m]: cuBLAS computes out^T = op(b) a^T, b's buffer
    // its first operand (transposed where b is [n, k]), a's its second.
    let (transa, lda) = match rhs {
        Rhs::Transposed => (sys::cublasOperation_t::CUBLAS_OP_T, k),
        Rhs::AsIs => (sys::cublasOperation_t::CUBLAS_OP_N, n),
    };
    let (ai, bi) = (CudaInput::of(a)?, CudaInput::of(b)?);
    let blas = dev.cublas_handle();
    let stream = dev.cuda_stream();
    let (one, ty) = (
        1f32,
        match dtype {
            DType::BF16 => sys::cudaDataType_t::CUDA_R_16BF,
            _ => sys::cudaDataType_t::CUDA_R_16F,
        },
    );
    macro_rules! gemm {
        ($t:ty) => {{
            let (av, bv) = (ai.view::<$t>(m * k)?, bi.view::<$t>(n * k)?);
            let cs = out.as_cuda_slice_mut::<$t>()?;
            let (ap, _ga) = av.device_ptr(&stream);
            let (bp, _gb) = bv.device_ptr(&stream);
            let (cp, _gc) = cs.device_ptr_mut(&stream);
            // SAFETY: the three buffers hold the sizes the dimensions and leading dimensions
            // say (checked above), on the stream cuBLAS's handle is bound to.
            unsafe {
                candle_core::cuda_backend::cudarc::cublas::result::gemm_ex(
                    *blas.handle(),
                    transa,
                    sys::cublasOperation_t::CUBLAS_OP_N,
                    n as i32,
                    m as i32,
                    k as i32,
                    (&one) as *const f32 as *const _,
                    bp as *const _,
                    ty,
                    lda as i32,
                    ap as *const _,
                    ty,
                    k as i32,
                    (&one) as *const f32 as *const _,
                    cp as *mut _,
                    ty,
                    n as i32,
                    sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
                )
            }
            .map_err(Error::wrap)?;
        }};
    }
    match dtype {
        DType::BF16 => gemm!(half::bf16),
        _ => gemm!(half::f16),
    }
    Ok(Tensor::from_storage(
        Storage::Cuda(out),
        (m, n),
        candle_core::op::BackpropOp::none(),
        false,
    ))
}
