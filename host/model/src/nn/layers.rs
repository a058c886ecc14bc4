//! Small building blocks shared by the models: layer norms and softmax that stay differentiable
//! when training, and the tied `lm_head`.
//!
//! candle's fused `layer_norm`, `rms_norm` and `softmax_last_dim` kernels have no backward pass,
//! so gradients to LoRA weights would stop at the first norm. Each block here takes the fused
//! kernel when nothing upstream tracks gradients (inference) and the op-by-op form, which candle
//! can differentiate, when something does (training).

use std::sync::Arc;

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::nn::linear::Linear;
use crate::quant::weight::DenseWeight;

/// `torch.nn.LayerNorm` with weight and bias.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// Loads `{prefix}.weight` and `{prefix}.bias`.
    pub fn load(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm {
            weight: vb.get(size, "weight")?,
            bias: vb.get(size, "bias")?,
            eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.weight.track_op() || self.bias.track_op() {
            // A trainable norm: op by op, so candle finds its weights' gradients.
            return candle_nn::ops::layer_norm_slow(x, &self.weight, &self.bias, self.eps as f32);
        }
        let out = crate::ops::layer_norm::value(&x.detach(), &self.weight, &self.bias, self.eps)?;
        if !x.track_op() {
            return Ok(out);
        }
        let (w, eps) = (self.weight.clone(), self.eps);
        crate::ops::handover::with_backward("layer-norm", x, out, move |x, grad| {
            crate::ops::layer_norm::input_grad(x, &w, eps, grad)
        })
    }
}

/// transformers' `LlamaRMSNorm`: normalise in f32, scale by `weight`.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn load(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Ok(RmsNorm {
            weight: vb.get(size, "weight")?,
            eps,
        })
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.track_op() || self.weight.track_op() || !x.is_contiguous() {
            candle_nn::ops::rms_norm_slow(x, &self.weight, self.eps as f32)
        } else {
            candle_nn::ops::rms_norm(x, &self.weight, self.eps as f32)
        }
    }
}

/// The output projection: a checkpoint's own `lm_head.weight` when the model does not tie it,
/// else the input embedding (transformers ties whenever `tie_word_embeddings`, and the saved
/// checkpoint then holds the matrix once, under the embedding's name).
///
/// The untied head goes through the model's `LinearBuilder` like any linear layer; the tied one
/// is a plain dense view of the embedding, as PEFT and bitsandbytes leave `lm_head` alone.
pub fn lm_head(
    vb: &VarBuilder,
    builder: &crate::nn::linear::LinearBuilder,
    embedding: &Tensor,
    tie: bool,
    hidden: usize,
    vocab: usize,
) -> Result<Linear> {
    if tie {
        return Ok(Linear::new(
            Arc::new(DenseWeight {
                weight: embedding.clone(),
            }),
            None,
            "lm_head",
        ));
    }
    if !vb.contains_tensor("lm_head.weight") {
        candle_core::bail!("cannot find tensor lm_head.weight (and tie_word_embeddings is false)");
    }
    builder.load(vb.pp("lm_head"), hidden, vocab, false)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;
    use candle_core::DType;

    #[test]
    fn fused_and_differentiable_norms_agree_and_train() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 3, 8), &dev)?;
        let w = Tensor::randn(1f32, 0.1, 8, &dev)?;
        let b = Tensor::randn(0f32, 0.1, 8, &dev)?;
        let ln = LayerNorm {
            weight: w.clone(),
            bias: b.clone(),
            eps: 1e-5,
        };
        let rms = RmsNorm {
            weight: w.clone(),
            eps: 1e-5,
        };
        let v = Var::from_tensor(&x)?;
        // The layer norm's own backward against candle's gradient of the op-by-op form.
        let g = Tensor::randn(0f32, 1., (2, 3, 8), &dev)?;
        let ours = (ln.forward(v.as_tensor())? * &g)?.sum_all()?.backward()?;
        let slow = candle_nn::ops::layer_norm_slow(v.as_tensor(), &w, &b, 1e-5)?;
        let theirs = (slow * &g)?.sum_all()?.backward()?;
        let d = (ours.get(&v).unwrap() - theirs.get(&v).unwrap())?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(d < 1e-5, "layer norm input gradient differs by {d}");
        for (fast, slow) in [
            (ln.forward(&x)?, ln.forward(v.as_tensor())?),
            (rms.forward(&x)?, rms.forward(v.as_tensor())?),
        ] {
            let d = (fast - &slow)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d < 1e-5, "{d}");
            let grads = slow.sum_all()?.backward()?;
            assert!(grads.get(v.as_tensor()).is_some());
        }
        let s1 = crate::ops::softmax::softmax_last_dim(&x, DType::F32)?;
        let s2 = crate::ops::softmax::softmax_last_dim(v.as_tensor(), DType::F32)?;
        assert!((s1 - s2)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-6);
        Ok(())
    }
}
