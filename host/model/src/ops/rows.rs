//! Rows picked out of a `[n, h]` matrix for the loss: the positions whose hidden state predicts
//! a target, before the LM head. The backward puts each row's gradient back where it came from,
//! zeros elsewhere. candle's `index_select` differentiates through `index_add`, which on a GPU
//! runs one thread a column over every picked row (2.3 ms of an H100 training step at 8 x 512,
//! 2026-12-07); rows picked at most once each need no sums, so here the scatter is one kernel
//! moving 16 bytes a thread (`rows.cu`).

use candle_core::{Device, Result, Tensor};

/// Row indices, strictly increasing (so each row is picked at most once), on a device.
#[derive(Debug, Clone)]
pub struct PickedRows {
    index: Tensor,
}

impl PickedRows {
    /// `rows`, which must be strictly increasing (an error names the first that is not).
    pub fn new(rows: Vec<u32>, device: &Device) -> Result<Self> {
        if let Some(i) = rows.windows(2).position(|w| w[0] >= w[1]) {
            candle_core::bail!(
                "picked rows must be strictly increasing: row {} at {} follows {}",
                rows[i + 1],
                i + 1,
                rows[i]
            );
        }
        let n = rows.len();
        Ok(PickedRows {
            index: Tensor::from_vec(rows, n, device)?,
        })
    }

    /// The indices, `[k]` u32.
    pub fn tensor(&self) -> &Tensor {
        &self.index
    }

    pub fn len(&self) -> usize {
        self.index.elem_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `x[rows]` for `x` `[n, h]`: `[k, h]`, with a gradient that scatters back into `[n, h]`.
    pub fn gather(&self, x: &Tensor) -> Result<Tensor> {
        let (n, _) = x.dims2()?;
        let out = x.detach().index_select(&self.index, 0)?;
        if !x.track_op() || crate::ops::handover::no_grad() {
            return Ok(out);
        }
        let index = self.index.clone();
        crate::ops::handover::with_backward("pick-rows", x, out, move |_, grad| {
            scatter(grad, &index, n)
        })
    }
}

/// `[n, h]` zeros with row `index[i]` set to `grad[i]`.
fn scatter(grad: &Tensor, index: &Tensor, n: usize) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Some(out) = cuda::scatter(grad, index, n)? {
        return Ok(out);
    }
    let (_, h) = grad.dims2()?;
    Tensor::zeros((n, h), grad.dtype(), grad.device())?.index_add(index, grad, 0)
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::LaunchConfig;

    use candle_core::DType;

    use super::*;
    use crate::ops::kernels::{CudaInput, CudaModule, aligned, cuda_device, no_defines, wrap};

    pub(crate) static ROWS: CudaModule =
        CudaModule::new("adapterlab_rows", include_str!("rows.cu"), no_defines);

    /// The kernel's scatter, or `None` where it does not serve (not a GPU, rows not a whole
    /// number of 16-byte vectors).
    pub fn scatter(grad: &Tensor, index: &Tensor, n: usize) -> Result<Option<Tensor>> {
        let (k, h) = grad.dims2()?;
        let bytes = h * grad.dtype().size_in_bytes();
        if !grad.device().is_cuda() || !bytes.is_multiple_of(16) || index.elem_count() != k {
            return Ok(None);
        }
        // Read as 16-byte vectors from where it starts: a fresh compact copy where it does not
        // start on one, so the kernel asked for is the kernel that runs.
        let grad = aligned(grad, 16 / grad.dtype().size_in_bytes())?;
        let index = index.contiguous()?;
        let dev = cuda_device(&grad)?;
        let vectors_per_row = bytes / 16;
        let vectors = k * vectors_per_row;
        let (gs, is) = (CudaInput::of(&grad)?, CudaInput::of(&index)?);
        let iv = is.view::<u32>(k)?;
        let (vpr, total) = (vectors_per_row as i32, vectors as i64);
        let cfg = LaunchConfig::for_num_elems(vectors as u32);
        macro_rules! launch {
            ($t:ty) => {{
                let gv = gs.view::<$t>(k * h)?;
                let out = dev.alloc_zeros::<$t>(n * h)?;
                if vectors > 0 {
                    crate::run_kernel!(ROWS, dev, "scatter_rows_v16", cfg;
                        &gv, &iv, &out, &vpr, &total)?;
                }
                wrap(out, &dev, (n, h))
            }};
        }
        Ok(Some(match grad.dtype() {
            DType::BF16 => launch!(half::bf16),
            DType::F16 => launch!(half::f16),
            DType::F32 => launch!(f32),
            _ => return Ok(None),
        }))
    }
}

/// The module, for [`crate::ops::kernel_modules`].
#[cfg(feature = "cuda")]
pub(crate) fn cuda_module() -> &'static crate::ops::kernels::CudaModule {
    &cuda::ROWS
}

#[cfg(test)]
mod tests {
    use candle_core::Var;

    use super::*;

    #[test]
    fn rows_must_increase() {
        let dev = Device::Cpu;
        assert!(PickedRows::new(vec![0, 2, 5], &dev).is_ok());
        let err = PickedRows::new(vec![0, 3, 3], &dev)
            .unwrap_err()
            .to_string();
        assert!(err.contains("row 3 at 2 follows 3"), "{err}");
        assert!(PickedRows::new(vec![4, 1], &dev).is_err());
    }

    /// The picked rows' values, and a gradient that is the output's at the picked rows and
    /// zero at the others, as index_select's own backward gives.
    #[test]
    fn picked_rows_and_their_gradient_equal_index_select() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::arange(0f32, 6. * 4., &dev)?.reshape((6, 4))?)?;
        let rows = PickedRows::new(vec![1, 2, 5], &dev)?;
        let w = Tensor::arange(1f32, 13., &dev)?.reshape((3, 4))?;
        let picked = rows.gather(x.as_tensor())?;
        let plain = x.as_tensor().index_select(rows.tensor(), 0)?;
        assert_eq!(picked.to_vec2::<f32>()?, plain.to_vec2::<f32>()?);
        let ours = (&picked * &w)?.sum_all()?.backward()?;
        let theirs = (&plain * &w)?.sum_all()?.backward()?;
        let g = |s: &candle_core::backprop::GradStore| -> Result<Vec<Vec<f32>>> {
            s.get(x.as_tensor()).expect("a gradient").to_vec2::<f32>()
        };
        assert_eq!(g(&ours)?, g(&theirs)?);
        assert_eq!(g(&ours)?[0], vec![0.0; 4]);
        Ok(())
    }
}
