//! The linear layer every model uses: a frozen base weight (dense, or NF4 in 4 bits) with an
//! optional LoRA adapter on top. Models build their linears through [`LinearBuilder`], so the
//! choice of base format and where adapters go is made in one place.

use std::sync::Arc;

use candle_core::{Module, Result, Tensor};

/// A frozen base weight `W` of shape `[out, in]`.
pub trait BaseWeight: Send + Sync + std::fmt::Debug {
    /// `x @ W^T`, for `x` of shape `[.., in]`. Quantized formats dequantize inside this call
    /// only and keep nothing in 16 bits afterwards.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
    /// `W` materialised in `dtype`-less form (the compute dtype), for merging and checks.
    fn dequantize(&self) -> Result<Tensor>;
    /// `(out, in)`.
    fn dims(&self) -> (usize, usize);
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

/// A linear layer: frozen base, optional bias, optional LoRA adapter.
#[derive(Debug, Clone)]
pub struct Linear {
    pub base: Arc<dyn BaseWeight>,
    pub bias: Option<Tensor>,
    /// The module path of this layer, e.g. `transformer.h.0.self_attention.query_key_value`,
    /// so adapters can be matched to it and saved under PEFT names.
    pub name: String,
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.base.forward(x)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// Decides how each linear layer of a model is built: the base weight's format and whether a
/// LoRA adapter sits on it. Models call [`LinearBuilder::load`] for every linear layer.
#[derive(Debug, Clone, Default)]
pub struct LinearBuilder {}

impl LinearBuilder {
    /// Plain dense layers in the checkpoint's dtype, no adapters.
    pub fn dense() -> Self {
        LinearBuilder {}
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
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias { Some(vb.get(out_dim, "bias")?) } else { None };
        Ok(Linear { base: Arc::new(DenseWeight { weight }), bias, name: vb.prefix() })
    }
}
