//! Frozen base weights `W` of shape `[out, in]` as linear layers use them: plain dense, or NF4
//! in 4 bits (bitsandbytes' layout), dequantized inside the matmul op.
//!
//! **Architecture Invariant:** an NF4 base keeps only its 4-bit data between calls. Its forward
//! pass dequantizes inside the op and drops the 16-bit weight before returning; when the input
//! needs a gradient, the op's backward dequantizes again (QLoRA trades that recomputation for
//! memory). The autograd graph holds the input and the op, never a dequantized weight.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Storage, Tensor};

use crate::quant::nf4::{Nf4Options, Nf4Tensor};

/// A frozen base weight `W` of shape `[out, in]`.
pub trait BaseWeight: Send + Sync + std::fmt::Debug {
    /// `x @ W^T`, for `x` of shape `[.., in]`. Quantized formats dequantize inside this call
    /// only and keep nothing in 16 bits afterwards.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
    /// `W` materialised in `dtype`-less form (the compute dtype), for merging and checks.
    fn dequantize(&self) -> Result<Tensor>;
    /// `(out, in)`.
    fn dims(&self) -> (usize, usize);
    /// The gradient with respect to the input of [`BaseWeight::forward`] on a 2-D `x`, given
    /// `grad` (`[m, out]`): `grad @ W`, in `grad`'s dtype. For graph nodes that hold the frozen
    /// weight's product themselves (`lora::train_node`).
    fn input_grad(&self, grad: &Tensor) -> Result<Tensor>;
    /// The NF4 data, when this base is NF4 (for saving in bitsandbytes' format).
    fn as_nf4(&self) -> Option<&Nf4Weight> {
        None
    }
    /// `x W^T + acc` for a 2-D `x` (`acc` `[m, out]` in x's dtype), `acc` consumed. A 16-bit
    /// product on a GPU adds `acc` inside cuBLAS's (one rounding of the f32 sum, `acc`'s buffer
    /// the result: `crate::ops::gemm`); elsewhere the product, then the sum.
    fn forward_plus(&self, x: &Tensor, acc: Tensor) -> Result<Tensor> {
        self.forward(x)? + acc
    }
    /// `grad W + acc`, as [`BaseWeight::forward_plus`] is to [`BaseWeight::forward`].
    fn input_grad_plus(&self, grad: &Tensor, acc: Tensor) -> Result<Tensor> {
        self.input_grad(grad)? + acc
    }
}

/// Whether `crate::ops::gemm::matmul_plus` serves `a` (one side of a product in `dtype`) and
/// `acc`: both on a GPU, both in `dtype`, 16 bits, `a` 2-D and outside any graph.
#[cfg(feature = "cuda")]
fn adds_in_product(a: &Tensor, acc: &Tensor, dtype: DType) -> bool {
    a.device().is_cuda()
        && a.rank() == 2
        && !a.track_op()
        && a.dtype() == dtype
        && acc.dtype() == dtype
        && matches!(dtype, DType::BF16 | DType::F16)
}

/// A plain dense weight.
#[derive(Debug, Clone)]
pub struct DenseWeight {
    pub weight: Tensor,
}

impl BaseWeight for DenseWeight {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.broadcast_matmul(&self.weight.t()?)
    }
    fn dequantize(&self) -> Result<Tensor> {
        Ok(self.weight.clone())
    }
    fn dims(&self) -> (usize, usize) {
        let d = self.weight.dims();
        (d[0], d[1])
    }
    fn input_grad(&self, grad: &Tensor) -> Result<Tensor> {
        grad.contiguous()?
            .matmul(&self.weight.to_dtype(grad.dtype())?)
    }
    fn forward_plus(&self, x: &Tensor, acc: Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if adds_in_product(x, &acc, self.weight.dtype()) {
            use crate::ops::gemm::{Rhs, matmul_plus};
            return matmul_plus(
                &x.contiguous()?,
                &self.weight.contiguous()?,
                Rhs::Transposed,
                acc,
            );
        }
        self.forward(x)? + acc
    }
    fn input_grad_plus(&self, grad: &Tensor, acc: Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if adds_in_product(grad, &acc, self.weight.dtype()) {
            use crate::ops::gemm::{Rhs, matmul_plus};
            return matmul_plus(
                &grad.contiguous()?,
                &self.weight.contiguous()?,
                Rhs::AsIs,
                acc,
            );
        }
        self.input_grad(grad)? + acc
    }
}

/// An NF4 weight (bitsandbytes layout), computed in `compute_dtype`.
///
/// The 4-bit data lives on the CPU (for saving and for CPU compute) and, when the model runs on
/// another device, also there (codes, scales and lookup tables, a little over 4 bits a weight),
/// where it is dequantized with tensor ops. Cloning is cheap.
#[derive(Debug, Clone)]
pub struct Nf4Weight {
    inner: Arc<Nf4Inner>,
}

#[derive(Debug)]
struct Nf4Inner {
    q: Nf4Tensor,
    compute_dtype: DType,
    device: Device,
    on_device: Option<DeviceNf4>,
}

/// NF4 data on a non-CPU device, laid out for dequantizing with index_select and a multiply.
#[derive(Debug)]
struct DeviceNf4 {
    /// `[256, 2]` f32: for each code byte, its two NF4 values (high nibble first).
    pairs: Tensor,
    /// `[bytes]` u8.
    codes: Tensor,
    absmax: DeviceAbsmax,
}

#[derive(Debug)]
enum DeviceAbsmax {
    Plain(Tensor),
    Nested {
        q: Tensor,
        code: Tensor,
        absmax: Tensor,
        offset: f32,
        blocksize: usize,
    },
}

/// Where a CUDA load quantizes a dense checkpoint's weights to NF4: `ADAPTERLAB_NF4_QUANTIZE`
/// = `gpu` (the default: upload the 16-bit weight, quantize with `nf4_quantize.cu`) or `cpu`.
/// Both give the same bits (`nf4_quantize_kernel_equals_the_cpu_path` in tests/golden.rs,
/// 126 cases bit-equal on an H100 on 2026-12-06), so the choice changes speed only: the 7B
/// load took 5.4 s on the GPU against 10.5 s on the CPU in that call (BENCHMARKS.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantizeOn {
    Cpu,
    Gpu,
}

impl QuantizeOn {
    pub const ENV: &'static str = "ADAPTERLAB_NF4_QUANTIZE";

    /// The environment's choice; an unknown value is an error naming the variable.
    pub fn from_env() -> Result<Self> {
        let chosen = crate::ops::switch::choice(Self::ENV, Self::NAMES);
        Ok(chosen
            .map_err(candle_core::Error::msg)?
            .unwrap_or(QuantizeOn::Gpu))
    }

    const NAMES: &'static [(&'static str, QuantizeOn)] =
        &[("cpu", QuantizeOn::Cpu), ("gpu", QuantizeOn::Gpu)];

    #[cfg(test)]
    fn parse(value: Option<&str>) -> Result<Self> {
        let chosen = crate::ops::switch::parse(Self::ENV, value, Self::NAMES);
        Ok(chosen
            .map_err(candle_core::Error::msg)?
            .unwrap_or(QuantizeOn::Gpu))
    }

    pub fn as_str(self) -> &'static str {
        match self {
            QuantizeOn::Cpu => "cpu",
            QuantizeOn::Gpu => "gpu",
        }
    }
}

impl Nf4Weight {
    /// Wrap quantized data; `compute_dtype` is the dtype of forward passes (bf16, f16 or f32).
    pub fn new(q: Nf4Tensor, compute_dtype: DType, device: &Device) -> Result<Self> {
        check_compute_dtype(compute_dtype)?;
        let on_device = if device.is_cpu() {
            None
        } else {
            Some(DeviceNf4::upload(&q, device)?)
        };
        Ok(Nf4Weight {
            inner: Arc::new(Nf4Inner {
                q,
                compute_dtype,
                device: device.clone(),
                on_device,
            }),
        })
    }

    /// Quantize a dense weight as bitsandbytes would. A weight already on `device`, a CUDA
    /// one, is quantized there (see [`Self::quantize_on_gpu`]); any other is quantized on the
    /// CPU and the result uploaded to `device`. Both give the same bits.
    pub fn quantize(
        w: &Tensor,
        opts: Nf4Options,
        compute_dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        #[cfg(feature = "cuda")]
        if w.device().is_cuda() && w.device().same_device(device) {
            return Self::quantize_on_gpu(w, opts, compute_dtype);
        }
        Self::new(Nf4Tensor::from_tensor(w, opts)?, compute_dtype, device)
    }

    /// Quantization at load on a GPU: the 16-bit weight went up as stored, the kernel writes
    /// codes and absmax there (kept as the device copy, not uploaded again), and the CPU copy
    /// that saving and merging read is downloaded (half a byte a weight instead of the CPU
    /// reading, widening and quantizing two bytes a weight).
    ///
    /// Double quantization stays on the CPU, over the downloaded absmax (1/64 of the elements):
    /// its offset is `nf4::mean_f32`, an f64 sum in index order that a parallel GPU reduction
    /// would not reproduce bit for bit, and the 8-bit step after it is the CPU path's own
    /// function; running the very same code keeps the bits equal by construction, for about a
    /// millisecond a weight.
    #[cfg(feature = "cuda")]
    fn quantize_on_gpu(w: &Tensor, opts: Nf4Options, compute_dtype: DType) -> Result<Self> {
        use crate::ops::profile::scope;
        use crate::quant::nf4::{Absmax, NestedAbsmax, check_float};
        let wrap = candle_core::Error::wrap;
        check_compute_dtype(compute_dtype)?;
        check_float(w.dtype()).map_err(wrap)?;
        let device = w.device();
        let (codes_gpu, absmax_gpu) = scope("load.nf4.quantize", device, || {
            crate::quant::kernels::quantize(w, opts.blocksize)
        })?;
        let (codes, absmax) = scope("load.nf4.download", device, || {
            Ok((codes_gpu.to_vec1::<u8>()?, absmax_gpu.to_vec1::<f32>()?))
        })?;
        let (absmax, plain_gpu) = if opts.double_quant {
            let nested = scope("load.nf4.nested", &Device::Cpu, || {
                Ok(NestedAbsmax::quantize(&absmax))
            })?;
            (Absmax::Nested(nested), None)
        } else {
            (Absmax::Plain(absmax), Some(absmax_gpu))
        };
        let q = Nf4Tensor::from_parts(w.dims().to_vec(), w.dtype(), opts.blocksize, codes, absmax)
            .map_err(wrap)?;
        let on_device = scope("load.nf4.upload", device, || {
            DeviceNf4::upload_with(&q, device, Some((codes_gpu, plain_gpu)))
        })?;
        Ok(Nf4Weight {
            inner: Arc::new(Nf4Inner {
                q,
                compute_dtype,
                device: device.clone(),
                on_device: Some(on_device),
            }),
        })
    }

    pub fn nf4(&self) -> &Nf4Tensor {
        &self.inner.q
    }
    pub fn compute_dtype(&self) -> DType {
        self.inner.compute_dtype
    }
    pub fn device(&self) -> &Device {
        &self.inner.device
    }

    /// `W` in `dtype` on `device`, bit-equal to bitsandbytes' `dequantize_4bit` in that dtype.
    pub fn dequantize_to(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        match (&self.inner.on_device, device.is_cpu()) {
            (Some(d), false) => d.dequantize(&self.inner.q, dtype),
            _ => self.inner.q.dequantize(dtype)?.to_device(device),
        }
    }

    /// The same dequantization with tensor ops, as it runs on a GPU (exposed to test it on the CPU).
    pub fn dequantize_with_tensor_ops(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        DeviceNf4::upload(&self.inner.q, device)?.dequantize(&self.inner.q, dtype)
    }
}

fn check_compute_dtype(compute_dtype: DType) -> Result<()> {
    if matches!(compute_dtype, DType::BF16 | DType::F16 | DType::F32) {
        Ok(())
    } else {
        Err(candle_core::Error::msg(format!(
            "NF4 compute dtype must be bf16, f16 or f32, got {compute_dtype:?}"
        )))
    }
}

/// The codes and, without double quantization, the absmax already on the device.
type OnDevice = (Tensor, Option<Tensor>);

impl DeviceNf4 {
    fn upload(q: &Nf4Tensor, device: &Device) -> Result<Self> {
        Self::upload_with(q, device, None)
    }

    /// [`Self::upload`], reusing what `on_device` already holds there (quantized on the GPU).
    fn upload_with(q: &Nf4Tensor, device: &Device, on_device: Option<OnDevice>) -> Result<Self> {
        let table: Vec<f32> = (0..256usize)
            .flat_map(|b| {
                [
                    crate::quant::nf4::NF4_CODE[b >> 4],
                    crate::quant::nf4::NF4_CODE[b & 15],
                ]
            })
            .collect();
        let pairs = Tensor::from_vec(table, (256, 2), device)?;
        let (codes, plain) = match on_device {
            Some((codes, plain)) => (codes, plain),
            None => (
                Tensor::from_slice(q.codes(), q.codes().len(), device)?,
                None,
            ),
        };
        let absmax = match q.absmax() {
            crate::quant::nf4::Absmax::Plain(a) => DeviceAbsmax::Plain(match plain {
                Some(t) => t,
                None => Tensor::from_slice(a, a.len(), device)?,
            }),
            crate::quant::nf4::Absmax::Nested(n) => DeviceAbsmax::Nested {
                q: Tensor::from_slice(&n.q, n.q.len(), device)?,
                code: Tensor::from_slice(&n.code, n.code.len(), device)?,
                absmax: Tensor::from_slice(&n.absmax, n.absmax.len(), device)?,
                offset: n.offset,
                blocksize: n.blocksize,
            },
        };
        Ok(DeviceNf4 {
            pairs,
            codes,
            absmax,
        })
    }

    #[cfg(feature = "cuda")]
    fn gpu<'a>(&'a self, q: &Nf4Tensor) -> crate::quant::kernels::Nf4Gpu<'a> {
        use crate::quant::kernels::AbsmaxGpu;
        crate::quant::kernels::Nf4Gpu {
            codes: &self.codes,
            absmax: match &self.absmax {
                DeviceAbsmax::Plain(a) => AbsmaxGpu::Plain(a),
                DeviceAbsmax::Nested {
                    q,
                    code,
                    absmax,
                    offset,
                    blocksize,
                } => AbsmaxGpu::Nested {
                    q,
                    code,
                    absmax,
                    offset: *offset,
                    blocksize: *blocksize,
                },
            },
            n: q.elem_count(),
            blocksize: q.blocksize(),
        }
    }

    /// Every step in f32 with the same operations bitsandbytes does (`code[q] * absmax`, then
    /// `+ offset`; `NF4[i] * absmax`), then one rounding to `dtype`.
    fn dequantize(&self, q: &Nf4Tensor, dtype: DType) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if self.codes.device().is_cuda() {
            return crate::quant::kernels::dequantize(&self.gpu(q), dtype)?.reshape(q.shape());
        }
        let n = q.elem_count();
        let bs = q.blocksize();
        let absmax = match &self.absmax {
            DeviceAbsmax::Plain(a) => a.clone(),
            DeviceAbsmax::Nested {
                q: aq,
                code,
                absmax,
                offset,
                blocksize,
            } => {
                let nb = aq.dims()[0];
                // candle's index_select treats the dtype's max id (255 for u8) as "padding" and
                // returns zeros for it, so the indices go in as u32.
                let vals = code.index_select(&aq.to_dtype(DType::U32)?, 0)?;
                let vals = pad_to(&vals, absmax.dims()[0] * blocksize)?;
                let vals = vals
                    .reshape((absmax.dims()[0], *blocksize))?
                    .broadcast_mul(&absmax.unsqueeze(1)?)?;
                vals.flatten_all()?
                    .narrow(0, 0, nb)?
                    .affine(1.0, f64::from(*offset))?
            }
        };
        let nb = absmax.dims()[0];
        let vals = self
            .pairs
            .index_select(&self.codes.to_dtype(DType::U32)?, 0)?
            .flatten_all()?;
        let vals = pad_to(&vals, nb * bs)?;
        let w = vals
            .reshape((nb, bs))?
            .broadcast_mul(&absmax.unsqueeze(1)?)?;
        w.flatten_all()?
            .narrow(0, 0, n)?
            .to_dtype(dtype)?
            .reshape(q.shape())
    }
}

fn pad_to(t: &Tensor, len: usize) -> Result<Tensor> {
    let have = t.dims()[0];
    if have >= len {
        t.narrow(0, 0, len)
    } else {
        t.pad_with_zeros(0, 0, len - have)
    }
}

impl BaseWeight for Nf4Weight {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (out_dim, in_dim) = self.dims();
        let cd = self.inner.compute_dtype;
        let in_dtype = x.dtype();
        let xc = if in_dtype != cd {
            x.to_dtype(cd)?
        } else {
            x.clone()
        };
        let lead = xc.dims()[..xc.rank().saturating_sub(1)].to_vec();
        let m: usize = lead.iter().product();
        let x2 = xc.reshape((m, in_dim))?;
        let y2 = match self.gemv(&x2)? {
            Some(y2) => y2,
            None => self.matmul_dequantized(&x2, cd)?,
        };
        let mut shape = lead;
        shape.push(out_dim);
        let y = y2.reshape(shape)?;
        if in_dtype != cd {
            y.to_dtype(in_dtype)
        } else {
            Ok(y)
        }
    }

    fn dequantize(&self) -> Result<Tensor> {
        self.dequantize_to(self.inner.compute_dtype, &self.inner.device)
    }

    fn dims(&self) -> (usize, usize) {
        let s = self.inner.q.shape();
        (s[0], s[1])
    }

    fn input_grad(&self, grad: &Tensor) -> Result<Tensor> {
        let dev = grad.device();
        let w = crate::ops::profile::scope("nf4.bwd.dequant", dev, || {
            self.dequantize_to(grad.dtype(), dev)
        })?;
        crate::ops::profile::scope("nf4.bwd.matmul", dev, || grad.contiguous()?.matmul(&w))
    }

    fn as_nf4(&self) -> Option<&Nf4Weight> {
        Some(self)
    }

    fn forward_plus(&self, x: &Tensor, acc: Tensor) -> Result<Tensor> {
        let cd = self.inner.compute_dtype;
        #[cfg(feature = "cuda")]
        if adds_in_product(x, &acc, cd) {
            use crate::ops::gemm::{Rhs, matmul_plus};
            let dev = x.device();
            let w = crate::ops::profile::scope("nf4.dequant", dev, || self.dequantize_to(cd, dev))?;
            return crate::ops::profile::scope("nf4.matmul", dev, || {
                matmul_plus(&x.contiguous()?, &w, Rhs::Transposed, acc)
            });
        }
        let _ = cd;
        self.forward(x)? + acc
    }

    fn input_grad_plus(&self, grad: &Tensor, acc: Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if adds_in_product(grad, &acc, grad.dtype()) {
            use crate::ops::gemm::{Rhs, matmul_plus};
            let dev = grad.device();
            let w = crate::ops::profile::scope("nf4.bwd.dequant", dev, || {
                self.dequantize_to(grad.dtype(), dev)
            })?;
            return crate::ops::profile::scope("nf4.bwd.matmul", dev, || {
                matmul_plus(&grad.contiguous()?, &w, Rhs::AsIs, acc)
            });
        }
        self.input_grad(grad)? + acc
    }
}

impl Nf4Weight {
    /// The decoding kernel for `x` (`[.., k]`) on a GPU: a few rows and no gradient, so reading
    /// the 4-bit data once beats writing out a 16-bit weight for cuBLAS; `None` where none
    /// serves.
    #[cfg(feature = "cuda")]
    pub fn decode_kernel(&self, x: &Tensor) -> Result<Option<crate::quant::kernels::DecodeKernel>> {
        let k = x.dim(candle_core::D::Minus1)?;
        let rows = x.elem_count() / k.max(1);
        if self.inner.on_device.is_none()
            || x.track_op()
            || !x.device().is_cuda()
            || !matches!(x.dtype(), DType::BF16 | DType::F16)
        {
            return Ok(None);
        }
        let n = self.inner.q.shape()[0];
        let mma = crate::quant::kernels::runs_mma(x.device())?;
        crate::quant::kernels::DecodeKernel::for_rows(rows, k, n, self.blocks(), mma)
    }

    /// The absmax blocks, as the decoding kernels need to know them.
    #[cfg(feature = "cuda")]
    pub fn blocks(&self) -> crate::quant::kernels::Blocks {
        let q = &self.inner.q;
        crate::quant::kernels::Blocks {
            size: q.blocksize(),
            nested: match q.absmax() {
                crate::quant::nf4::Absmax::Plain(_) => None,
                crate::quant::nf4::Absmax::Nested(na) => Some(na.blocksize),
            },
        }
    }

    #[cfg(feature = "cuda")]
    fn gemv(&self, x2: &Tensor) -> Result<Option<Tensor>> {
        match self.decode_kernel(x2)? {
            Some(kernel) => self
                .forward_from_nf4(x2, kernel, None, crate::ops::epilogue::Epilogue::None)
                .map(Some),
            None => Ok(None),
        }
    }

    /// `x2 [m, k] W^T` straight from the 4-bit data on the GPU with `kernel`, whatever the
    /// speed switches say (what the GPU tests hold against the CPU path), plus `lora`'s product,
    /// then `epilogue` (where the kernel [`applies_epilogue`]).
    ///
    /// [`applies_epilogue`]: crate::quant::kernels::DecodeKernel::applies_epilogue
    #[cfg(feature = "cuda")]
    pub fn forward_from_nf4(
        &self,
        x2: &Tensor,
        kernel: crate::quant::kernels::DecodeKernel,
        lora: Option<&crate::quant::kernels::LoraEpilogue>,
        epilogue: crate::ops::epilogue::Epilogue,
    ) -> Result<Tensor> {
        let (m, k) = x2.dims2()?;
        let tiling = crate::quant::kernels::MmaTiling::for_shape(m, k, self.dims().0)?;
        self.forward_tiled(x2, kernel, tiling, lora, epilogue)
    }

    /// `epilogue.apply(forward(x))` with the epilogue applied by the decoding kernel, where one
    /// that applies it serves `x` in the compute dtype; `None` otherwise.
    #[cfg(feature = "cuda")]
    pub fn forward_epilogue(
        &self,
        x: &Tensor,
        epilogue: crate::ops::epilogue::Epilogue,
    ) -> Result<Option<Tensor>> {
        if x.dtype() != self.inner.compute_dtype {
            return Ok(None);
        }
        let Some(kernel) = self.decode_kernel(x)?.filter(|k| k.applies_epilogue()) else {
            return Ok(None);
        };
        let (out_dim, in_dim) = self.dims();
        let mut shape = x.dims().to_vec();
        let x2 = x.reshape((x.elem_count() / in_dim.max(1), in_dim))?;
        let y = self.forward_from_nf4(&x2, kernel, None, epilogue)?;
        *shape.last_mut().expect("x has a feature dimension") = out_dim;
        y.reshape(shape).map(Some)
    }

    /// [`Self::forward_from_nf4`] with the tensor-core kernel and the `tiling` given, not the
    /// one decoding picks: how `bench kernels` and the GPU tests compare the tilings.
    #[cfg(feature = "cuda")]
    pub fn forward_mma_tiled(
        &self,
        x2: &Tensor,
        tiling: crate::quant::kernels::MmaTiling,
    ) -> Result<Tensor> {
        let mma = crate::quant::kernels::DecodeKernel::Mma;
        self.forward_tiled(x2, mma, tiling, None, crate::ops::epilogue::Epilogue::None)
    }

    #[cfg(feature = "cuda")]
    fn forward_tiled(
        &self,
        x2: &Tensor,
        kernel: crate::quant::kernels::DecodeKernel,
        tiling: crate::quant::kernels::MmaTiling,
        lora: Option<&crate::quant::kernels::LoraEpilogue>,
        epilogue: crate::ops::epilogue::Epilogue,
    ) -> Result<Tensor> {
        let Some(d) = &self.inner.on_device else {
            candle_core::bail!("NF4 weight is not on a GPU")
        };
        let n = self.inner.q.shape()[0];
        crate::quant::kernels::gemv_with(
            &d.gpu(&self.inner.q),
            n,
            x2,
            kernel,
            tiling,
            lora,
            epilogue,
        )
    }

    #[cfg(not(feature = "cuda"))]
    fn gemv(&self, _x2: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }

    fn matmul_dequantized(&self, x2: &Tensor, cd: DType) -> Result<Tensor> {
        let w = crate::ops::profile::scope("nf4.dequant", x2.device(), || {
            self.dequantize_to(cd, x2.device())
        })?;
        crate::ops::profile::scope("nf4.matmul", x2.device(), || self.matmul_with(x2, w))
    }

    fn matmul_with(&self, x2: &Tensor, w: Tensor) -> Result<Tensor> {
        if x2.track_op() {
            // Through the custom op, so the graph keeps the op (4-bit data) instead of `w`.
            x2.apply_op1(Nf4MatMul {
                weight: self.clone(),
                forward_weight: Mutex::new(Some(w)),
            })
        } else {
            // No gradient wanted: a plain matmul, and `w` is dropped when this returns.
            x2.matmul(&w.t()?)
        }
    }
}

/// `x @ W^T` for a 2-D `x`, with `W` dequantized outside and handed over for the forward pass
/// only. Backward dequantizes `W` again and returns `grad @ W`; `W` is never a graph input.
struct Nf4MatMul {
    weight: Nf4Weight,
    forward_weight: Mutex<Option<Tensor>>,
}

impl Nf4MatMul {
    fn take_weight(&self) -> Result<Tensor> {
        let w = self
            .forward_weight
            .lock()
            .map_err(|_| candle_core::Error::msg("nf4-matmul: poisoned lock"))?
            .take();
        w.ok_or_else(|| candle_core::Error::msg("nf4-matmul: forward ran twice"))
    }
}

/// `x [m, k] @ w^T`, where `w` is `[n, k]`, on any backend's storage.
fn matmul_xwt<S: BackendStorage>(x: &S, xl: &Layout, w: &S, wl: &Layout) -> Result<(S, Shape)> {
    let (m, k) = xl.shape().dims2()?;
    let (n, k2) = wl.shape().dims2()?;
    if k != k2 {
        return Err(candle_core::Error::msg(format!(
            "nf4-matmul: input has {k} features, weight {k2}"
        )));
    }
    let wt = wl.transpose(0, 1)?;
    let out = x.matmul(w, (1, m, n, k), xl, &wt)?;
    Ok((out, Shape::from((m, n))))
}

impl CustomOp1 for Nf4MatMul {
    fn name(&self) -> &'static str {
        "nf4-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let w = self.take_weight()?;
        let (ws, wl) = w.storage_and_layout();
        match &*ws {
            Storage::Cpu(wc) => matmul_xwt(s, l, wc, wl),
            _ => Err(candle_core::Error::msg(
                "nf4-matmul: weight is not on the CPU",
            )),
        }
    }

    // Not behind the `cuda` feature: without it candle's stand-in CudaStorage implements the
    // same trait, so this is type-checked in every build and never called.
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let w = self.take_weight()?;
        let (ws, wl) = w.storage_and_layout();
        match &*ws {
            Storage::Cuda(wc) => matmul_xwt(s, l, wc, wl),
            _ => Err(candle_core::Error::msg(
                "nf4-matmul: weight is not on the GPU",
            )),
        }
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        self.weight.input_grad(grad_res).map(Some)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #[test]
    fn quantize_on_reads_cpu_gpu_and_refuses_anything_else() {
        use super::QuantizeOn;
        assert_eq!(QuantizeOn::parse(None).unwrap(), QuantizeOn::Gpu);
        assert_eq!(QuantizeOn::parse(Some("cpu")).unwrap(), QuantizeOn::Cpu);
        assert_eq!(QuantizeOn::parse(Some("gpu")).unwrap(), QuantizeOn::Gpu);
        let err = QuantizeOn::parse(Some("GPU")).unwrap_err().to_string();
        assert!(
            err.contains("ADAPTERLAB_NF4_QUANTIZE") && err.contains("\"gpu\""),
            "{err}"
        );
    }

    use super::*;
    use candle_core::Var;

    use crate::quant::nf4::Nf4Options;

    /// A `[rows, cols]` f32 weight, uniform in `[-scale, scale)`, seeded (shared with
    /// `nn::linear`'s tests).
    pub(crate) fn randn(shape: (usize, usize), scale: f32, seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let v: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| rng.random_range(-1.0f32..1.0) * scale)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn nf4_op_keeps_only_the_4bit_data() {
        let w = randn((64, 64), 0.05, 7);
        let nf4 = Nf4Weight::quantize(&w, Nf4Options::default(), DType::F32, &Device::Cpu).unwrap();
        let x = Var::from_tensor(&randn((4, 64), 1.0, 8)).unwrap();
        // Run the op as forward does, keeping a handle on it next to the graph's.
        let op = Arc::new(Nf4MatMul {
            weight: nf4.clone(),
            forward_weight: Mutex::new(Some(nf4.dequantize().unwrap())),
        });
        let y = x
            .as_tensor()
            .apply_op1_arc(Arc::new(Box::new(OpRef(op.clone()))))
            .unwrap();
        assert!(
            op.forward_weight.lock().unwrap().is_none(),
            "forward took the dequantized weight and dropped it"
        );
        assert_eq!(max_diff(&y, &nf4.forward(x.as_tensor()).unwrap()), 0.0);
        // The op (kept alive by y's graph) shares the 4-bit data and owns nothing else.
        assert_eq!(Arc::strong_count(&nf4.inner), 2, "nf4 and the op");
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(x.as_tensor()).is_some());
        assert!(
            op.forward_weight.lock().unwrap().is_none(),
            "backward recomputes, keeps nothing"
        );
        drop((grads, y, op));
        assert_eq!(
            Arc::strong_count(&nf4.inner),
            1,
            "the graph's reference went with y"
        );
    }

    /// Lets the test keep a handle on an op that the graph also holds.
    struct OpRef(Arc<Nf4MatMul>);
    impl CustomOp1 for OpRef {
        fn name(&self) -> &'static str {
            "nf4-matmul-ref"
        }
        fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
            self.0.cpu_fwd(s, l)
        }
        fn bwd(&self, a: &Tensor, r: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
            self.0.bwd(a, r, g)
        }
    }
}
