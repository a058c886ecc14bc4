//! The first index of the maximum, per row: greedy decoding's choice of token. The host's
//! [`first_max`] is `torch.argmax`'s rule; [`rows`] applies it to each row of a `[rows, n]`
//! tensor where the tensor is, so that on a GPU the chosen ids can feed the next forward pass
//! without the host reading the logits first (see `engine::generate`'s lookahead).

use candle_core::{DType, Result, Tensor};

/// The first index of the maximum: a NaN never wins, but a NaN first element does (each value
/// is compared with the best so far, and nothing is greater than NaN).
pub fn first_max(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// [`first_max`] of each row of `x` (`[rows, n]`, f32, bf16 or f16): `[rows]` u32 on `x`'s
/// device. On a GPU one kernel computes it there (`argmax.cu`); elsewhere the host does.
pub fn rows(x: &Tensor) -> Result<Tensor> {
    let (r, n) = x.dims2()?;
    if n == 0 {
        candle_core::bail!("argmax of rows with no columns");
    }
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return cuda::rows(x, r, n);
    }
    let ids: Vec<u32> = x
        .to_dtype(DType::F32)?
        .to_vec2::<f32>()?
        .iter()
        .map(|row| first_max(row))
        .collect();
    Tensor::from_vec(ids, r, x.device())
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::ops::kernels::{CudaInput, CudaModule, cuda_device, no_defines, wrap};
    use candle_core::cuda_backend::cudarc::driver::LaunchConfig;

    pub(crate) static ARGMAX: CudaModule =
        CudaModule::new("adapterlab_argmax", include_str!("argmax.cu"), no_defines);

    pub fn rows(x: &Tensor, r: usize, n: usize) -> Result<Tensor> {
        let dev = cuda_device(x)?;
        let x = x.contiguous()?;
        let input = CudaInput::of(&x)?;
        let n_i = i32::try_from(n).map_err(candle_core::Error::wrap)?;
        let cfg = LaunchConfig {
            grid_dim: (r as u32, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the kernel writes one id per row.
        let out = unsafe { dev.alloc::<u32>(r)? };
        macro_rules! launch {
            ($name:literal, $t:ty) => {{
                let xv = input.view::<$t>(r * n)?;
                crate::run_kernel!(ARGMAX, dev, $name, cfg; &xv, &out, &n_i)?;
            }};
        }
        match x.dtype() {
            DType::F32 => launch!("argmax_f32", f32),
            DType::BF16 => launch!("argmax_bf16", half::bf16),
            DType::F16 => launch!("argmax_f16", half::f16),
            other => candle_core::bail!("argmax of {other:?} rows is not supported"),
        }
        Ok(wrap(out, &dev, r))
    }
}

/// This op's kernel module, for [`crate::ops::kernel_modules`].
#[cfg(feature = "cuda")]
pub(crate) fn cuda_module() -> &'static crate::ops::kernels::CudaModule {
    &cuda::ARGMAX
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn first_max_takes_the_first_of_ties_and_skips_nans() {
        assert_eq!(first_max(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(first_max(&[f32::NEG_INFINITY; 3]), 0);
        assert_eq!(first_max(&[1.0, f32::NAN, 2.0]), 2);
        assert_eq!(first_max(&[f32::NAN, 5.0, 7.0]), 0);
    }

    #[test]
    fn rows_apply_first_max_to_each_row() -> Result<()> {
        let x = Tensor::new(&[[0.5f32, 2.0, 2.0], [-1.0, -3.0, -1.0]], &Device::Cpu)?;
        assert_eq!(rows(&x)?.to_vec1::<u32>()?, vec![1, 0]);
        assert_eq!(
            rows(&x.to_dtype(DType::BF16)?)?.to_vec1::<u32>()?,
            vec![1, 0]
        );
        Ok(())
    }
}
