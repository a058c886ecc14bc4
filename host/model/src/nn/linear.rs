//! The linear layer every model uses: a frozen base weight (dense, or NF4 in 4 bits) with an
//! optional LoRA adapter on top. Models build their linears through [`LinearBuilder`], so the
//! choice of base format and where adapters go is made in one place.
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

use std::sync::Arc;

use candle_core::{DType, Device, Module, Result, Tensor};

use crate::lora::train_node::Input;
use crate::lora::{LoraConfig, LoraLayer, LoraRegistry};
use crate::ops::epilogue::Epilogue;
use crate::quant::bnb;
use crate::quant::nf4::Nf4Options;
use crate::quant::weight::{BaseWeight, DenseWeight, Nf4Weight};

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
        if let Some(y) = self.forward_train_node(x, train, Input::AsIs)? {
            return Ok(y);
        }
        // Decoding through an NF4 base: the adapter's product joins the GEMV's epilogue (a bias
        // would come between the two products, so a biased layer takes the path below).
        if let (Some(lora), Some(nf4), None) = (&self.lora, self.base.as_nf4(), &self.bias)
            && let Some(y) = crate::ops::profile::scope("lora.gemv", x.device(), || {
                lora.add_with_nf4_gemv(nf4, x, train, Epilogue::None)
            })?
        {
            return Ok(y);
        }
        let y = self.add_bias(self.base.forward(x)?)?;
        let Some(lora) = &self.lora else { return Ok(y) };
        if let Some(out) =
            crate::ops::profile::scope("lora.fused", x.device(), || lora.add_to(&y, x, train))?
        {
            return Ok(out);
        }
        let d = crate::ops::profile::scope("lora", x.device(), || lora.delta_y(x, train))?;
        // PEFT's `Linear` adds in the adapter's dtype (f32 under a 16-bit base) and casts the
        // sum back. Its 4-bit `Linear4bit` casts the product to the base's dtype first and adds
        // there, one rounding more, which no inference path here matches yet (BENCHMARKS.md,
        // 2026-12-06); the training node (`lora::train_node`) does round the product first, as
        // the reference trainer's autocast does.
        crate::ops::profile::scope("lora.add", x.device(), || {
            if d.dtype() == y.dtype() {
                y + d
            } else {
                (y.to_dtype(d.dtype())? + d)?.to_dtype(y.dtype())
            }
        })
    }

    /// `epilogue.apply(forward_t(x, train))`. Outside training, through an NF4 base without a
    /// bias or a merged adapter, the decoding kernel applies the epilogue to its output where
    /// one serves `x` and the epilogue's switch allows (the same bits; one launch fewer).
    pub fn forward_then(&self, x: &Tensor, train: bool, epilogue: Epilogue) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if !train
            && self.bias.is_none()
            && self.lora.as_ref().is_none_or(|l| l.merged().is_none())
            && let Some(nf4) = self.base.as_nf4()
            && epilogue.fusable()?
        {
            let fused = match &self.lora {
                Some(lora) => crate::ops::profile::scope("lora.gemv", x.device(), || {
                    lora.add_with_nf4_gemv(nf4, x, train, epilogue)
                })?,
                None => nf4.forward_epilogue(x, epilogue)?,
            };
            if let Some(y) = fused {
                return Ok(y);
            }
        }
        epilogue.apply(self.forward_t(x, train)?)
    }

    /// `forward_t(gelu_erf(u))`. In training the GELU goes into the layer's graph node, which
    /// then keeps `u` alone instead of `u` and the activation.
    pub fn forward_gelu_t(&self, u: &Tensor, train: bool) -> Result<Tensor> {
        match self.forward_train_node(u, train, Input::GeluErf)? {
            Some(y) => Ok(y),
            None => self.forward_t(&crate::ops::gelu::gelu_erf(u)?, train),
        }
    }

    /// Training through an adapter: the base and adapter products as one graph node
    /// ([`crate::lora::train_node`]), which keeps the input instead of the products. `None`
    /// where the op-by-op path runs (inference, no graph wanted, a merged adapter, unseeded
    /// dropout, mixed dtypes).
    fn forward_train_node(&self, x: &Tensor, train: bool, input: Input) -> Result<Option<Tensor>> {
        let Some(lora) = &self.lora else {
            return Ok(None);
        };
        if !train || lora.merged().is_some() || crate::ops::handover::no_grad() {
            return Ok(None);
        }
        let Some((adapter, dropout)) = lora.train_inputs(x.dtype()) else {
            return Ok(None);
        };
        let (out, k) = self.base.dims();
        let lead = x.dims()[..x.rank().saturating_sub(1)].to_vec();
        let m: usize = lead.iter().product();
        let y = crate::ops::profile::scope("lora.node", x.device(), || {
            crate::lora::train_node::lora_linear(
                self.base.clone(),
                self.bias.as_ref(),
                &x.reshape((m, k))?,
                adapter,
                dropout,
                input,
            )
        })?;
        let mut shape = lead;
        shape.push(out);
        y.reshape(shape).map(Some)
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

    /// Use a prepared registry (e.g. one holding a loaded PEFT adapter, see [`crate::lora::peft`]).
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
                    // The dense weight is only an input to quantization. With the GPU path
                    // chosen, a CUDA device gets it as stored (16 bits a weight straight from
                    // the mapped file) and quantizes it there; otherwise the CPU reads and
                    // quantizes it.
                    let on_gpu = device.is_cuda()
                        && crate::quant::weight::QuantizeOn::from_env()?
                            == crate::quant::weight::QuantizeOn::Gpu;
                    let read_on = if on_gpu { device.clone() } else { Device::Cpu };
                    let w = crate::ops::profile::scope("load.read", &read_on, || {
                        vb.clone()
                            .set_device(read_on.clone())
                            .get((out_dim, in_dim), "weight")
                    })?;
                    let q = crate::ops::profile::scope("load.nf4", &read_on, || {
                        Nf4Weight::quantize(&w, opts, cd, &device)
                    })?;
                    Arc::new(q)
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
    use crate::quant::nf4::Nf4Tensor;
    use crate::quant::weight::tests::{max_diff, randn};

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
