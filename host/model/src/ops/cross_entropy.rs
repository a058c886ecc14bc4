//! Summed token cross-entropy with a hand-written backward pass (and CUDA kernels for both),
//! the one loss training and evaluation compute.

use candle_core::{D, DType, Tensor};

/// Summed cross-entropy of `logits` (`[n, vocab]`, any float dtype, computed in f32) against
/// `labels` (`[n]`, u32), as a scalar f32 tensor. With a graph, one node whose backward is
/// `(softmax(logits) - onehot(labels)) * grad`: the `[n, vocab]` log-probabilities and the
/// intermediates of an op-by-op `log_softmax` are never kept (at Falcon-7B's vocabulary and
/// 4,096 tokens each is 1 GB in f32).
pub fn cross_entropy_sum(logits: &Tensor, labels: &Tensor) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if logits.device().is_cuda() {
        return cross_entropy_sum_cuda(logits, labels);
    }
    let lf = logits.detach().to_dtype(DType::F32)?;
    let labels = labels.reshape((labels.elem_count(), 1))?;
    let max = lf.max_keepdim(D::Minus1)?;
    let lse = (lf
        .broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        + &max)?;
    let nll = (lse - lf.gather(&labels, 1)?)?.sum_all()?;
    if !logits.track_op() {
        return Ok(nll);
    }
    crate::ops::handover::with_backward("cross-entropy", logits, nll, move |x, grad| {
        let p = candle_nn::ops::softmax_last_dim(&x.to_dtype(DType::F32)?)?;
        let minus_one = Tensor::full(-1f32, labels.dims(), x.device())?;
        p.scatter_add(&labels, &minus_one, 1)?
            .broadcast_mul(&grad.to_dtype(DType::F32)?)?
            .to_dtype(x.dtype())
    })
}

/// [`cross_entropy_sum`] on the GPU: one kernel reads the logits once for the per-row
/// log-sum-exp and loss, and backward writes the gradient in one more pass (the op-by-op version
/// moved ~17 GB a step at Falcon-7B's vocabulary and 4,096 tokens).
#[cfg(feature = "cuda")]
fn cross_entropy_sum_cuda(logits: &Tensor, labels: &Tensor) -> candle_core::Result<Tensor> {
    let x = logits.detach().contiguous()?;
    let labels = labels.flatten_all()?.to_dtype(DType::U32)?.contiguous()?;
    let (lse, nll) = crate::ops::kernels::cross_entropy_forward(&x, &labels)?;
    let nll = nll.sum_all()?;
    if !logits.track_op() {
        return Ok(nll);
    }
    crate::ops::handover::with_backward("cross-entropy", logits, nll, move |x, grad| {
        let grad = grad.to_dtype(DType::F32)?.flatten_all()?.contiguous()?;
        crate::ops::kernels::cross_entropy_backward(&x.contiguous()?, &labels, &lse, &grad)
    })
}
