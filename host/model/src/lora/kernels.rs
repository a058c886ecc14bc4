//! The host side of the unmerged LoRA inference kernels (`lora.cu`).

use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
use candle_core::{DType, Error, Result, Tensor};

use crate::ops::kernels::{CudaInput, CudaModule, cuda_device, no_defines, wrap};

pub(crate) static LORA: CudaModule = CudaModule::new("adapterlab_lora", include_str!("lora.cu"), no_defines);

/// Rows of `x` up to which [`lora_inference`] serves.
pub const LORA_INFERENCE_MAX_ROWS: usize = 64;

/// `y + (x A^T)(B * scaling)^T` for an adapter at inference: `x` `[m, k]` and `y` `[m, n]` in
/// bf16 or f16 (both contiguous), `a` `[r, k]` and `b` `[n, r]` in f32. Two launches instead of
/// the eight of the op-by-op version, which dominated unmerged decoding.
pub fn lora_inference(
    y: &Tensor,
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scaling: f64,
) -> Result<Tensor> {
    let dev = cuda_device(y)?;
    let (m, k) = x.dims2()?;
    let (m2, n) = y.dims2()?;
    let (r, k2) = a.dims2()?;
    let (n2, r2) = b.dims2()?;
    if m != m2 || k != k2 || n != n2 || r != r2 || x.dtype() != y.dtype() {
        return Err(Error::Msg(format!(
            "lora inference: x {:?} {:?}, y {:?} {:?}, A {:?}, B {:?}",
            x.dims(),
            x.dtype(),
            y.dims(),
            y.dtype(),
            a.dims(),
            b.dims()
        )));
    }
    let ys = CudaInput::of(y)?;
    let xs = CudaInput::of(x)?;
    let a_in = CudaInput::of(a)?;
    let b_in = CudaInput::of(b)?;
    let av = a_in.view::<f32>(r * k)?;
    let bv = b_in.view::<f32>(n * r)?;
    // SAFETY: every element is written by the first kernel below.
    let h = unsafe { dev.alloc::<f32>(m * r)? };
    let (k_i, r_i, n_i, total) = (k as i32, r as i32, n as i32, (m * n) as i64);
    let scale = scaling as f32;
    macro_rules! launch {
        ($hname:literal, $oname:literal, $t:ty) => {{
            let xv = xs.view::<$t>(m * k)?;
            let yv = ys.view::<$t>(m * n)?;
            let per_rank = LaunchConfig {
                grid_dim: ((m * r) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            crate::run_kernel!(LORA, dev, $hname, per_rank; &xv, &av, &h, &k_i, &r_i)?;
            // SAFETY: every element is written by the kernel below.
            let out = unsafe { dev.alloc::<$t>(m * n)? };
            crate::run_kernel!(LORA, dev, $oname, LaunchConfig::for_num_elems((m * n) as u32);
                &yv, &h, &bv, &scale, &out, &n_i, &r_i, &total,
            )?;
            Ok(wrap(out, &dev, (m, n)))
        }};
    }
    match y.dtype() {
        DType::BF16 => launch!("lora_h_bf16", "lora_out_bf16", half::bf16),
        DType::F16 => launch!("lora_h_f16", "lora_out_f16", half::f16),
        other => Err(Error::Msg(format!(
            "lora inference on {other:?} is not supported"
        ))),
    }
}
