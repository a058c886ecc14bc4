//! The linear layer every model uses: a frozen base weight (dense, or NF4 in 4 bits) with an
//! optional LoRA adapter on top. Models build their linears through [`LinearBuilder`], so the
//! choice of base format and where adapters go is made in one place.
//!
//! **Architecture Invariant:** an NF4 base keeps only its 4-bit data between calls. Its forward
//! pass dequantizes inside the op and drops the 16-bit weight before returning; when the input
//! needs a gradient, the op's backward dequantizes again (QLoRA trades that recomputation for
//! memory). The autograd graph holds the input and the op, never a dequantized weight.
//!
//! **API Boundary:** `LinearBuilder::load(vb, in, out, bias)` is what model code calls; its
//! signature stays put. Everything about formats and adapters is configuration on the builder.
//!
//! How callers use it:
//! ```text
//! // QLoRA training: NF4 base (pre-quantized `*-bnb-4bit` layers are read as stored), bf16
//! // compute, fresh adapters on the PEFT-style targets.
//! let lora = LoraConfig { r: 16, lora_alpha: 32.0, lora_dropout: 0.1,
//!     target_modules: TargetModules::names(["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]),
//!     ..Default::default() };
//! let builder = LinearBuilder::nf4().with_compute_dtype(DType::BF16).with_lora(lora)?;
//! let model = Falcon::load(vb, &cfg, &builder)?;          // calls builder.load(...) per linear
//! let reg = builder.lora().unwrap();
//! reg.set_training(true);                                  // dropout on
//! let opt = AdamW::new(reg.varmap().all_vars(), params)?;  // only A and B train
//! peft::save_adapter(dir, reg, &SaveOptions::default())?;  // adapter_config.json + safetensors
//!
//! // Inference with a PEFT adapter from disk:
//! let builder = LinearBuilder::nf4().with_lora_registry(peft::load_adapter(dir)?.into_registry()?);
//! let model = Falcon::load(vb, &cfg, &builder)?;
//! builder.lora().unwrap().finish()?;                      // every adapter tensor found a layer
//! ```

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, DType, Device, Layout, Module, Result, Shape, Storage, Tensor,
};

use crate::bnb;
use crate::lora::{LoraConfig, LoraLayer, LoraRegistry};
use crate::nf4::{Nf4Options, Nf4Tensor};

/// A frozen base weight `W` of shape `[out, in]`.
pub trait BaseWeight: Send + Sync + std::fmt::Debug {
    /// `x @ W^T`, for `x` of shape `[.., in]`. Quantized formats dequantize inside this call
    /// only and keep nothing in 16 bits afterwards.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
    /// `W` materialised in `dtype`-less form (the compute dtype), for merging and checks.
    fn dequantize(&self) -> Result<Tensor>;
    /// `(out, in)`.
    fn dims(&self) -> (usize, usize);
    /// The NF4 data, when this base is NF4 (for saving in bitsandbytes' format).
    fn as_nf4(&self) -> Option<&Nf4Weight> {
        None
    }
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

impl Nf4Weight {
    /// Wrap quantized data; `compute_dtype` is the dtype of forward passes (bf16, f16 or f32).
    pub fn new(q: Nf4Tensor, compute_dtype: DType, device: &Device) -> Result<Self> {
        if !matches!(compute_dtype, DType::BF16 | DType::F16 | DType::F32) {
            return Err(candle_core::Error::msg(format!(
                "NF4 compute dtype must be bf16, f16 or f32, got {compute_dtype:?}"
            )));
        }
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

    /// Quantize a dense weight as bitsandbytes would.
    pub fn quantize(
        w: &Tensor,
        opts: Nf4Options,
        compute_dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::new(Nf4Tensor::from_tensor(w, opts)?, compute_dtype, device)
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

impl DeviceNf4 {
    fn upload(q: &Nf4Tensor, device: &Device) -> Result<Self> {
        let table: Vec<f32> = (0..256usize)
            .flat_map(|b| [crate::nf4::NF4_CODE[b >> 4], crate::nf4::NF4_CODE[b & 15]])
            .collect();
        let pairs = Tensor::from_vec(table, (256, 2), device)?;
        let codes = Tensor::from_slice(q.codes(), q.codes().len(), device)?;
        let absmax = match q.absmax() {
            crate::nf4::Absmax::Plain(a) => {
                DeviceAbsmax::Plain(Tensor::from_slice(a, a.len(), device)?)
            }
            crate::nf4::Absmax::Nested(n) => DeviceAbsmax::Nested {
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
    fn gpu<'a>(&'a self, q: &Nf4Tensor) -> crate::cuda_kernels::Nf4Gpu<'a> {
        use crate::cuda_kernels::AbsmaxGpu;
        crate::cuda_kernels::Nf4Gpu {
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
            return crate::cuda_kernels::dequantize(&self.gpu(q), dtype)?.reshape(q.shape());
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
        let y2 = match self.gemv(&x2, out_dim)? {
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

    fn as_nf4(&self) -> Option<&Nf4Weight> {
        Some(self)
    }
}

impl Nf4Weight {
    /// Decoding on a GPU: a few rows and no gradient, so reading the 4-bit data once beats
    /// writing out a 16-bit weight for cuBLAS.
    #[cfg(feature = "cuda")]
    fn gemv(&self, x2: &Tensor, out_dim: usize) -> Result<Option<Tensor>> {
        let small = x2.dims()[0] <= crate::cuda_kernels::GEMV_MAX_ROWS;
        match &self.inner.on_device {
            Some(d)
                if small
                    && !x2.track_op()
                    && x2.device().is_cuda()
                    && matches!(x2.dtype(), DType::BF16 | DType::F16) =>
            {
                crate::cuda_kernels::gemv(&d.gpu(&self.inner.q), out_dim, x2).map(Some)
            }
            _ => Ok(None),
        }
    }

    #[cfg(not(feature = "cuda"))]
    fn gemv(&self, _x2: &Tensor, _out_dim: usize) -> Result<Option<Tensor>> {
        Ok(None)
    }

    fn matmul_dequantized(&self, x2: &Tensor, cd: DType) -> Result<Tensor> {
        let w = crate::profile::scope("nf4.dequant", x2.device(), || {
            self.dequantize_to(cd, x2.device())
        })?;
        crate::profile::scope("nf4.matmul", x2.device(), || self.matmul_with(x2, w))
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
        let dev = grad_res.device();
        let w = crate::profile::scope("nf4.bwd.dequant", dev, || {
            self.weight.dequantize_to(grad_res.dtype(), dev)
        })?;
        crate::profile::scope("nf4.bwd.matmul", dev, || {
            Ok(Some(grad_res.contiguous()?.matmul(&w)?))
        })
    }
}

/// A linear layer: frozen base, optional bias, optional LoRA adapter.
#[derive(Debug, Clone)]
pub struct Linear {
    pub base: Arc<dyn BaseWeight>,
    pub bias: Option<Tensor>,
    /// The module path of this layer, e.g. `transformer.h.0.self_attention.query_key_value`,
    /// so adapters can be matched to it and saved under PEFT names.
    pub name: String,
    /// The adapter on this layer, if the builder's LoRA config targets it.
    pub lora: Option<Arc<LoraLayer>>,
}

impl Linear {
    pub fn new(base: Arc<dyn BaseWeight>, bias: Option<Tensor>, name: impl Into<String>) -> Self {
        Linear {
            base,
            bias,
            name: name.into(),
            lora: None,
        }
    }

    /// The forward pass; `train` turns the adapter's dropout on.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if let Some(w) = self.lora.as_ref().and_then(|l| l.merged()) {
            // The merged weight is in the base's compute dtype; answer in the input's.
            let xw = if x.dtype() != w.dtype() {
                x.to_dtype(w.dtype())?
            } else {
                x.clone()
            };
            let y = self.add_bias(xw.broadcast_matmul(&w.t()?)?)?;
            return if y.dtype() != x.dtype() {
                y.to_dtype(x.dtype())
            } else {
                Ok(y)
            };
        }
        let y = self.add_bias(self.base.forward(x)?)?;
        let Some(lora) = &self.lora else { return Ok(y) };
        if let Some(out) =
            crate::profile::scope("lora.fused", x.device(), || lora.add_to(&y, x, train))?
        {
            return Ok(out);
        }
        let d = crate::profile::scope("lora", x.device(), || lora.delta_y(x, train))?;
        // PEFT adds in the adapter's dtype (f32 under a 16-bit base) and casts the sum back.
        crate::profile::scope("lora.add", x.device(), || {
            if d.dtype() == y.dtype() {
                y + d
            } else {
                (y.to_dtype(d.dtype())? + d)?.to_dtype(y.dtype())
            }
        })
    }

    fn add_bias(&self, y: Tensor) -> Result<Tensor> {
        match &self.bias {
            // An NF4 base answers in the input's dtype, which may differ from the bias's.
            Some(b) if b.dtype() != y.dtype() => y.broadcast_add(&b.to_dtype(y.dtype())?),
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// Merge the adapter into a copy of the weight (for inference); no-op without an adapter.
    pub fn merge_lora(&self) -> Result<()> {
        match &self.lora {
            Some(l) => l.merge(self.base.as_ref()),
            None => Ok(()),
        }
    }

    pub fn unmerge_lora(&self) {
        if let Some(l) = &self.lora {
            l.unmerge();
        }
    }
}

impl Module for Linear {
    /// Dropout follows the builder's [`LoraRegistry::set_training`] switch.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let train = self.lora.as_ref().is_some_and(|l| l.training());
        self.forward_t(x, train)
    }
}

/// What to do with dense weights found in the checkpoint.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BaseFormat {
    /// Keep them dense (in the compute dtype, if one is set).
    Dense,
    /// Quantize them to NF4 while loading, as `BitsAndBytesConfig(load_in_4bit=True)` does.
    Nf4(Nf4Options),
}

/// Decides how each linear layer of a model is built: the base weight's format and whether a
/// LoRA adapter sits on it. Models call [`LinearBuilder::load`] for every linear layer.
///
/// Pre-quantized bitsandbytes NF4 tensors in the checkpoint (`*-bnb-4bit` models) are detected
/// per layer and stay NF4, whatever [`BaseFormat`] says; `BaseFormat::Dense` dequantizes them.
#[derive(Debug, Clone)]
pub struct LinearBuilder {
    format: BaseFormat,
    /// The dtype forward passes run in; `None` keeps the VarBuilder's dtype.
    compute_dtype: Option<DType>,
    /// Layers (matched by path suffix, as `llm_int8_skip_modules`) never quantized.
    keep_dense: Vec<String>,
    /// Whether a pre-quantized layer stays NF4 under `BaseFormat::Dense`.
    dequantize_prequantized: bool,
    lora: Option<Arc<LoraRegistry>>,
}

impl Default for LinearBuilder {
    fn default() -> Self {
        Self::dense()
    }
}

impl LinearBuilder {
    /// Plain dense layers in the checkpoint's dtype, no adapters.
    pub fn dense() -> Self {
        LinearBuilder {
            format: BaseFormat::Dense,
            compute_dtype: None,
            keep_dense: vec!["lm_head".into()],
            dequantize_prequantized: false,
            lora: None,
        }
    }

    /// QLoRA's base: every linear quantized to NF4 with double quantization (bitsandbytes'
    /// defaults), except `lm_head`.
    pub fn nf4() -> Self {
        LinearBuilder {
            format: BaseFormat::Nf4(Nf4Options::default()),
            ..Self::dense()
        }
    }

    pub fn with_format(mut self, format: BaseFormat) -> Self {
        self.format = format;
        self
    }

    pub fn with_compute_dtype(mut self, dtype: DType) -> Self {
        self.compute_dtype = Some(dtype);
        self
    }

    /// Module path suffixes to keep dense (replaces the default `["lm_head"]`).
    pub fn keep_dense<S: Into<String>>(mut self, modules: impl IntoIterator<Item = S>) -> Self {
        self.keep_dense = modules.into_iter().map(Into::into).collect();
        self
    }

    /// Dequantize pre-quantized NF4 layers to dense ones (e.g. to merge an adapter).
    pub fn dequantize_prequantized(mut self, on: bool) -> Self {
        self.dequantize_prequantized = on;
        self
    }

    /// Put fresh adapters on the layers `config` targets.
    pub fn with_lora(self, config: LoraConfig) -> Result<Self> {
        let reg = LoraRegistry::new(config).map_err(candle_core::Error::wrap)?;
        Ok(self.with_lora_registry(Arc::new(reg)))
    }

    /// Use a prepared registry (e.g. one holding a loaded PEFT adapter, see [`crate::peft`]).
    pub fn with_lora_registry(mut self, reg: Arc<LoraRegistry>) -> Self {
        self.lora = Some(reg);
        self
    }

    /// The adapters built so far: their [`candle_nn::VarMap`] for the optimizer, the training
    /// switch, saving.
    pub fn lora(&self) -> Option<&Arc<LoraRegistry>> {
        self.lora.as_ref()
    }

    fn keeps_dense(&self, module: &str) -> bool {
        self.keep_dense
            .iter()
            .any(|k| module == k || module.ends_with(&format!(".{k}")))
    }

    /// Load the linear layer whose tensors are `{vb.prefix()}.weight` (`[out, in]`) and,
    /// with `bias`, `{vb.prefix()}.bias`.
    pub fn load(
        &self,
        vb: candle_nn::VarBuilder,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> Result<Linear> {
        let name = vb.prefix();
        let device = vb.device().clone();
        let cd = self.compute_dtype.unwrap_or(vb.dtype());
        let base: Arc<dyn BaseWeight> = match bnb::detect(&vb) {
            Some(_) => {
                let q = bnb::read_nf4(&vb).map_err(candle_core::Error::wrap)?;
                if q.shape() != [out_dim, in_dim] {
                    return Err(candle_core::Error::msg(format!(
                        "checkpoint tensor {name}.weight: quant_state shape {:?}, but the model needs [{out_dim}, {in_dim}]",
                        q.shape()
                    )));
                }
                let w = Nf4Weight::new(q, cd, &device)?;
                if self.dequantize_prequantized {
                    Arc::new(DenseWeight {
                        weight: w.dequantize()?,
                    })
                } else {
                    Arc::new(w)
                }
            }
            None => match self.format {
                BaseFormat::Nf4(opts) if !self.keeps_dense(&name) => {
                    // Read on the CPU: the dense weight is only an input to quantization.
                    let w = vb
                        .clone()
                        .set_device(Device::Cpu)
                        .get((out_dim, in_dim), "weight")?;
                    Arc::new(Nf4Weight::quantize(&w, opts, cd, &device)?)
                }
                _ => {
                    let w = vb.get((out_dim, in_dim), "weight")?;
                    let w = if w.dtype() != cd { w.to_dtype(cd)? } else { w };
                    Arc::new(DenseWeight { weight: w })
                }
            },
        };
        let bias = if bias {
            let b = vb.get(out_dim, "bias")?;
            Some(if b.dtype() != cd { b.to_dtype(cd)? } else { b })
        } else {
            None
        };
        let lora = match &self.lora {
            Some(reg) => reg.layer_for(&name, in_dim, out_dim, &device)?,
            None => None,
        };
        if let Some(l) = &lora {
            l.attach_base(base.clone());
        }
        Ok(Linear {
            base,
            bias,
            name,
            lora,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::{IndexOp, Var};
    use candle_nn::VarBuilder;

    use super::*;
    use crate::lora::TargetModules;

    fn randn(shape: (usize, usize), scale: f32, seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let v: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| rng.random_range(-1.0f32..1.0) * scale)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
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
    fn nf4_forward_equals_dense_forward_on_dequantized_weight() {
        let w = randn((48, 64), 0.05, 1);
        let nf4 = Nf4Weight::quantize(&w, Nf4Options::default(), DType::F32, &Device::Cpu).unwrap();
        let dense = DenseWeight {
            weight: nf4.dequantize().unwrap(),
        };
        let x = randn((6, 64), 1.0, 2).reshape((2, 3, 64)).unwrap();
        let y = nf4.forward(&x).unwrap();
        assert_eq!(y.dims(), &[2, 3, 48]);
        assert!(max_diff(&y, &dense.forward(&x).unwrap()) < 1e-5);
        // 16-bit compute, f32 input: result comes back in f32.
        let nf4b = Nf4Weight::new(nf4.nf4().clone(), DType::BF16, &Device::Cpu).unwrap();
        let yb = nf4b.forward(&x).unwrap();
        assert_eq!(yb.dtype(), DType::F32);
        assert!(max_diff(&yb, &y) < 0.05);
    }

    #[test]
    fn tensor_op_dequantization_equals_cpu_tables() {
        // The GPU path, run on the CPU: must be bit-equal to the table path.
        let w = randn((33, 64), 0.03, 3);
        for double_quant in [true, false] {
            let nf4 = Nf4Weight::quantize(
                &w,
                Nf4Options {
                    double_quant,
                    ..Default::default()
                },
                DType::BF16,
                &Device::Cpu,
            )
            .unwrap();
            for dtype in [DType::BF16, DType::F16, DType::F32] {
                let a = nf4
                    .dequantize_to(dtype, &Device::Cpu)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let b = nf4
                    .dequantize_with_tensor_ops(dtype, &Device::Cpu)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let bad: Vec<(usize, f32, f32)> = a
                    .iter()
                    .zip(&b)
                    .enumerate()
                    .filter(|(_, (x, y))| x.to_bits() != y.to_bits())
                    .map(|(i, (x, y))| (i, *x, *y))
                    .take(5)
                    .collect();
                assert!(bad.is_empty(), "{dtype:?} dq={double_quant}: {bad:?}");
            }
        }
    }

    #[test]
    fn gradient_wrt_input_equals_dense_path() {
        let w = randn((40, 64), 0.05, 4);
        let nf4 = Nf4Weight::quantize(&w, Nf4Options::default(), DType::F32, &Device::Cpu).unwrap();
        let dense = DenseWeight {
            weight: nf4.dequantize().unwrap(),
        };
        let r = randn((10, 40), 1.0, 6).reshape((2, 5, 40)).unwrap();
        let grad_of = |base: &dyn BaseWeight| {
            let x =
                Var::from_tensor(&randn((10, 64), 1.0, 5).reshape((2, 5, 64)).unwrap()).unwrap();
            let loss = (base.forward(x.as_tensor()).unwrap() * &r)
                .unwrap()
                .sum_all()
                .unwrap();
            let grads = loss.backward().unwrap();
            grads.get(x.as_tensor()).unwrap().clone()
        };
        let g_nf4 = grad_of(&nf4);
        let g_dense = grad_of(&dense);
        assert_eq!(g_nf4.dims(), &[2, 5, 64]);
        assert!(
            max_diff(&g_nf4, &g_dense) < 1e-5,
            "{}",
            max_diff(&g_nf4, &g_dense)
        );
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

    fn vb_from(tensors: Vec<(String, Tensor)>, dtype: DType) -> VarBuilder<'static> {
        VarBuilder::from_tensors(
            tensors.into_iter().collect::<HashMap<_, _>>(),
            dtype,
            &Device::Cpu,
        )
    }

    #[test]
    fn builder_quantizes_detects_bnb_and_keeps_lm_head_dense() {
        let w = randn((32, 64), 0.05, 9).to_dtype(DType::BF16).unwrap();
        let q = Nf4Tensor::from_tensor(&w, Nf4Options::default()).unwrap();
        let mut tensors = bnb::nf4_tensors("model.layers.0.mlp.up_proj", &q).unwrap();
        tensors.push(("model.layers.0.mlp.down_proj.weight".into(), w.clone()));
        tensors.push(("lm_head.weight".into(), w.clone()));
        tensors.push((
            "lm_head.bias".into(),
            Tensor::zeros(32, DType::BF16, &Device::Cpu).unwrap(),
        ));
        let vb = vb_from(tensors, DType::BF16);

        let b = LinearBuilder::nf4();
        let up = b
            .load(vb.pp("model.layers.0.mlp.up_proj"), 64, 32, false)
            .unwrap();
        let down = b
            .load(vb.pp("model.layers.0.mlp.down_proj"), 64, 32, false)
            .unwrap();
        let head = b.load(vb.pp("lm_head"), 64, 32, true).unwrap();
        assert_eq!(
            up.base.as_nf4().unwrap().nf4(),
            &q,
            "pre-quantized layer read as stored"
        );
        assert_eq!(
            down.base.as_nf4().unwrap().nf4(),
            &q,
            "quantized on load, same as bitsandbytes would"
        );
        assert!(head.base.as_nf4().is_none());
        assert_eq!(up.name, "model.layers.0.mlp.up_proj");

        // Dense policy: the pre-quantized layer still loads (stays NF4), dense stays dense.
        let d = LinearBuilder::dense();
        assert!(
            d.load(vb.pp("model.layers.0.mlp.up_proj"), 64, 32, false)
                .unwrap()
                .base
                .as_nf4()
                .is_some()
        );
        assert!(
            d.load(vb.pp("model.layers.0.mlp.down_proj"), 64, 32, false)
                .unwrap()
                .base
                .as_nf4()
                .is_none()
        );
        let dq = LinearBuilder::dense().dequantize_prequantized(true);
        assert!(
            dq.load(vb.pp("model.layers.0.mlp.up_proj"), 64, 32, false)
                .unwrap()
                .base
                .as_nf4()
                .is_none()
        );

        let e = b
            .load(vb.pp("model.layers.0.mlp.up_proj"), 32, 64, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("model.layers.0.mlp.up_proj.weight") && e.contains("[32, 64]"),
            "{e}"
        );
    }

    #[test]
    fn lora_on_nf4_trains_only_the_adapter() {
        let w = randn((16, 32), 0.1, 10);
        let vb = vb_from(
            vec![
                ("blk.fc.weight".into(), w.clone()),
                (
                    "blk.fc.bias".into(),
                    Tensor::zeros(16, DType::F32, &Device::Cpu).unwrap(),
                ),
            ],
            DType::F32,
        );
        let cfg = LoraConfig {
            r: 4,
            lora_alpha: 8.0,
            target_modules: TargetModules::names(["fc"]),
            ..Default::default()
        };
        let b = LinearBuilder::nf4().with_lora(cfg).unwrap();
        let lin = b.load(vb.pp("blk.fc"), 32, 16, true).unwrap();
        let lora = lin.lora.clone().unwrap();
        // B = 0 at start: same output as the base alone.
        let x = Var::from_tensor(&randn((3, 32), 1.0, 11)).unwrap();
        let y = lin.forward(x.as_tensor()).unwrap();
        assert!(max_diff(&y, &lin.base.forward(x.as_tensor()).unwrap()) == 0.0);
        // Gradients reach A and B (and x), and the base has none to give.
        let target = randn((3, 16), 1.0, 12);
        let loss = (y - &target).unwrap().sqr().unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        assert!(grads.get(lora.b.as_tensor()).is_some());
        assert!(grads.get(x.as_tensor()).is_some());
        // One SGD step on the registry's VarMap lowers the loss.
        let vars = b.lora().unwrap().varmap().all_vars();
        assert_eq!(vars.len(), 2);
        let mut opt = candle_nn::SGD::new(vars, 1e-3).unwrap();
        use candle_nn::Optimizer;
        let step = |opt: &mut candle_nn::SGD| {
            let y = lin.forward(x.as_tensor()).unwrap();
            let loss = (y - &target).unwrap().sqr().unwrap().sum_all().unwrap();
            opt.backward_step(&loss).unwrap();
            loss.to_scalar::<f32>().unwrap()
        };
        let l0 = step(&mut opt);
        let _ = step(&mut opt);
        let l2 = step(&mut opt);
        assert!(l2 < l0, "{l0} -> {l2}");
        // Merge and unmerge change nothing observable but speed.
        let before = lin.forward(x.as_tensor()).unwrap();
        lin.merge_lora().unwrap();
        let merged = lin.forward(x.as_tensor()).unwrap();
        assert!(max_diff(&before, &merged) < 1e-4);
        lin.unmerge_lora();
        assert!(max_diff(&before, &lin.forward(x.as_tensor()).unwrap()) == 0.0);
    }

    #[test]
    fn mixed_dtypes_bf16_compute_f32_input_with_bias_and_merge() {
        let vb = vb_from(
            vec![
                ("fc.weight".into(), randn((8, 64), 0.1, 14)),
                ("fc.bias".into(), randn((1, 8), 0.1, 15).reshape(8).unwrap()),
            ],
            DType::F32,
        );
        let cfg = LoraConfig {
            r: 2,
            lora_alpha: 2.0,
            target_modules: TargetModules::names(["fc"]),
            ..Default::default()
        };
        let b = LinearBuilder::nf4()
            .with_compute_dtype(DType::BF16)
            .with_lora(cfg)
            .unwrap();
        let lin = b.load(vb.pp("fc"), 64, 8, true).unwrap();
        assert_eq!(lin.bias.as_ref().unwrap().dtype(), DType::BF16);
        lin.lora
            .as_ref()
            .unwrap()
            .b
            .set(&Tensor::ones((8, 2), DType::F32, &Device::Cpu).unwrap())
            .unwrap();
        let x = randn((3, 64), 1.0, 16);
        let y = lin.forward(&x).unwrap();
        assert_eq!((y.dtype(), y.dims()), (DType::F32, &[3usize, 8][..]));
        lin.merge_lora().unwrap();
        let ym = lin.forward(&x).unwrap();
        assert_eq!(ym.dtype(), DType::F32);
        assert!(max_diff(&y, &ym) < 0.1, "{}", max_diff(&y, &ym));
    }

    #[test]
    fn dropout_only_in_training() {
        let vb = vb_from(
            vec![("fc.weight".into(), randn((8, 8), 0.1, 13))],
            DType::F32,
        );
        let cfg = LoraConfig {
            r: 2,
            lora_alpha: 2.0,
            lora_dropout: 0.5,
            target_modules: TargetModules::names(["fc"]),
            ..Default::default()
        };
        let b = LinearBuilder::dense().with_lora(cfg).unwrap();
        let lin = b.load(vb.pp("fc"), 8, 8, false).unwrap();
        lin.lora
            .as_ref()
            .unwrap()
            .b
            .set(&Tensor::ones((8, 2), DType::F32, &Device::Cpu).unwrap())
            .unwrap();
        let x = Tensor::ones((64, 8), DType::F32, &Device::Cpu).unwrap();
        let eval1 = lin.forward(&x).unwrap();
        assert!(
            max_diff(&eval1, &lin.forward(&x).unwrap()) == 0.0,
            "deterministic in eval"
        );
        b.lora().unwrap().set_training(true);
        let t1 = lin.forward(&x).unwrap();
        assert!(max_diff(&t1, &eval1) > 0.0, "dropout active in training");
        assert_eq!(t1.i(0).unwrap().dims(), &[8]);
    }
}
