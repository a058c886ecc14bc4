//! Attention's output heads merged into the token rows the dense projection reads: `[b, h, s,
//! d]` to `[b, s, h * d]`, as `transpose(1, 2)` and `reshape` do, with a backward that moves the
//! gradient back. On a GPU in 16-bit types (head sizes a multiple of 8) one kernel each way
//! (`heads.cu`), which moves 16 bytes a thread where candle's strided copy moved two; the golden
//! test `heads_kernel_equals_candles_transpose` holds it to candle's copy.

#[cfg(feature = "cuda")]
use candle_core::DType;
use candle_core::{Result, Tensor};

/// `x` `[b, h, s, d]` as `[b, s, h * d]`, contiguous.
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, s, d) = x.dims4()?;
    // One token a row (decoding) or one head: `[b, h, s, d]` and `[b, s, h, d]` hold their
    // elements in the same order, so the merge is a reshape of the contiguous tensor. The kernel
    // copied it all the same, 32 launches a decoded token of Falcon-7B (~2.8 µs each on an
    // H100 by ncu, 2026-12-07).
    if s == 1 || h == 1 {
        return x.contiguous()?.reshape((b, s, h * d));
    }
    #[cfg(feature = "cuda")]
    if serves(x) {
        let out = cuda::swap(&x.detach().contiguous()?)?.reshape((b, s, h * d))?;
        if !x.track_op() {
            return Ok(out);
        }
        return crate::ops::handover::with_backward("merge-heads", x, out, move |_, grad| {
            cuda::swap(&grad.reshape((b, s, h, d))?.contiguous()?)
        });
    }
    x.transpose(1, 2)?.reshape((b, s, h * d))
}

/// Whether the kernel serves `x`: a GPU, a 16-bit type, heads a whole number of 16-byte vectors.
#[cfg(feature = "cuda")]
fn serves(x: &Tensor) -> bool {
    x.device().is_cuda()
        && matches!(x.dtype(), DType::BF16 | DType::F16)
        && x.dims().last().is_some_and(|d| d.is_multiple_of(8))
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::LaunchConfig;

    use super::*;
    use crate::ops::kernels::{CudaInput, CudaModule, cuda_device, no_defines, wrap};

    pub(crate) static HEADS: CudaModule =
        CudaModule::new("adapterlab_heads", include_str!("heads.cu"), no_defines);

    /// `x` `[z, n1, n2, d]` (contiguous, 16-bit, `d % 8 == 0`) as `[z, n2, n1, d]`.
    pub fn swap(x: &Tensor) -> Result<Tensor> {
        let (z, n1, n2, d) = x.dims4()?;
        let dev = cuda_device(x)?;
        let n = x.elem_count();
        let xs = CudaInput::of(x)?;
        if !x.layout().start_offset().is_multiple_of(8) {
            // The kernel reads 16-byte vectors from where the view starts.
            return x.transpose(1, 2)?.contiguous();
        }
        let vectors = n / 8;
        let (n1_i, n2_i, vd, n_i) = (n1 as i32, n2 as i32, (d / 8) as i32, vectors as i64);
        let cfg = LaunchConfig::for_num_elems(vectors as u32);
        macro_rules! launch {
            ($t:ty) => {{
                let xv = xs.view::<$t>(n)?;
                // SAFETY: every element is written by the kernel below.
                let out = unsafe { dev.alloc::<$t>(n)? };
                if vectors > 0 {
                    crate::run_kernel!(HEADS, dev, "swap_heads_u16", cfg;
                        &xv, &out, &n1_i, &n2_i, &vd, &n_i)?;
                }
                wrap(out, &dev, (z, n2, n1, d))
            }};
        }
        Ok(match x.dtype() {
            DType::BF16 => launch!(half::bf16),
            DType::F16 => launch!(half::f16),
            other => candle_core::bail!("merge heads on {other:?} is not supported"),
        })
    }
}

/// The module, for [`crate::ops::kernel_modules`].
#[cfg(feature = "cuda")]
pub(crate) fn cuda_module() -> &'static crate::ops::kernels::CudaModule {
    &cuda::HEADS
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    /// The CPU path: the values of transpose and reshape, and a gradient back to `[b, h, s, d]`.
    #[test]
    fn merged_heads_are_the_transposed_rows() -> Result<()> {
        let x = Var::from_tensor(
            &Tensor::arange(0f32, 2. * 3. * 4. * 8., &Device::Cpu)?.reshape((2, 3, 4, 8))?,
        )?;
        let out = merge_heads(x.as_tensor())?;
        assert_eq!(out.dims(), [2, 4, 24]);
        let want = x
            .as_tensor()
            .transpose(1, 2)?
            .contiguous()?
            .reshape((2, 4, 24))?;
        assert_eq!(
            out.flatten_all()?.to_vec1::<f32>()?,
            want.flatten_all()?.to_vec1::<f32>()?
        );
        let w = Tensor::arange(0f32, 2. * 4. * 24., &Device::Cpu)?.reshape((2, 4, 24))?;
        let grads = (&out * &w)?.sum_all()?.backward()?;
        let g = grads.get(x.as_tensor()).expect("a gradient");
        let want = w.reshape((2, 4, 3, 8))?.transpose(1, 2)?.contiguous()?;
        assert_eq!(
            g.flatten_all()?.to_vec1::<f32>()?,
            want.flatten_all()?.to_vec1::<f32>()?
        );
        Ok(())
    }

    /// One token a row, and one head: the same values and gradient as the transposing path,
    /// from a reshape.
    #[test]
    fn one_token_or_one_head_merges_without_a_copy() -> Result<()> {
        for (h, s) in [(3, 1), (1, 4), (1, 1)] {
            let n = (2 * h * s * 8) as f32;
            let x =
                Var::from_tensor(&Tensor::arange(0f32, n, &Device::Cpu)?.reshape((2, h, s, 8))?)?;
            let out = merge_heads(x.as_tensor())?;
            assert_eq!(out.dims(), [2, s, h * 8]);
            let want = x
                .as_tensor()
                .transpose(1, 2)?
                .contiguous()?
                .reshape((2, s, h * 8))?;
            assert_eq!(
                out.flatten_all()?.to_vec1::<f32>()?,
                want.flatten_all()?.to_vec1::<f32>()?,
                "h {h}, s {s}"
            );
            let w = Tensor::arange(0f32, n, &Device::Cpu)?.reshape((2, s, h * 8))?;
            let grads = (&out * &w)?.sum_all()?.backward()?;
            let g = grads.get(x.as_tensor()).expect("a gradient");
            let want = w.reshape((2, s, h, 8))?.transpose(1, 2)?.contiguous()?;
            assert_eq!(
                g.flatten_all()?.to_vec1::<f32>()?,
                want.flatten_all()?.to_vec1::<f32>()?,
                "h {h}, s {s}: gradient"
            );
        }
        Ok(())
    }
}
