//! The one interface generation, loss and the host use for any causal language model here.

use candle_core::{DType, Device, Result, Tensor};

use crate::nn::linear::Linear;
use crate::ops::attention::{AttentionContext, KvCache};

/// A decoder-only language model with transformers' calling convention.
///
/// `input_ids`: `[batch, seq]` (u32). `attention_mask`: `[batch, past + seq]`, 1 for real tokens
/// and 0 for padding (left padding for batches), covering the cached tokens too, as in
/// transformers; `None` means no padding. `cache`: keys and values of earlier calls, extended by
/// this one; `None` runs without caching. Position ids are derived from the mask as
/// transformers' `generate` does (`cumsum(mask) - 1`).
pub trait CausalLm: Send + Sync {
    /// Final hidden states (after the last norm), `[batch, seq, hidden]`.
    fn hidden_states(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        let past = cache.as_ref().map_or(0, |c| c.seq_len());
        let ctx = AttentionContext::new(attention_mask, b, s, past, self.device())?;
        self.hidden_states_in(input_ids, ctx, cache)
    }

    /// [`CausalLm::hidden_states`] with the attention context made by the caller: packed rows
    /// ([`AttentionContext::packed`]) take this way. `ctx.past_len` must be the cache's length.
    fn hidden_states_in(
        &self,
        input_ids: &Tensor,
        ctx: AttentionContext,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor>;

    /// The output projection of [`CausalLm::hidden_states`]: logits `[.., vocab]`.
    fn lm_head(&self, hidden: &Tensor) -> Result<Tensor>;

    fn num_layers(&self) -> usize;
    fn vocab_size(&self) -> usize;
    fn device(&self) -> &Device;
    /// The compute dtype of the weights.
    fn dtype(&self) -> DType;

    /// Every linear layer with its module path, for adapters and parameter counts.
    fn linears(&self) -> Vec<&Linear>;

    /// The same layers, to attach or detach adapters (see [`crate::lora::peft::apply_adapter`]).
    fn linears_mut(&mut self) -> Vec<&mut Linear>;

    /// Logits at every position, `[batch, seq, vocab]`.
    fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let h = self.hidden_states(input_ids, attention_mask, cache)?;
        self.lm_head(&h)
    }

    /// Logits at the last position only, `[batch, vocab]`: what generation needs, without the
    /// cost of projecting every prompt position onto the vocabulary.
    fn forward_last(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let h = self.hidden_states(input_ids, attention_mask, cache)?;
        let s = h.dim(1)?;
        // Contiguous, so the head's matmul folds the batch into rows: on a strided `[b, 1, h]`
        // candle's broadcast_matmul copies the `[vocab, hidden]` head once per row (9.4 GB at
        // Falcon-7B's vocabulary and batch 16).
        self.lm_head(&h.narrow(1, s - 1, 1)?.contiguous()?)?
            .squeeze(1)
    }

    fn new_cache(&self) -> KvCache {
        KvCache::new(self.num_layers())
    }
}

/// Puts `registry`'s adapters on the layers of an already built model, replacing any there: the
/// frozen base weights stay shared with every other copy of the model, so one base serves
/// several adapters, each applied unmerged. Returns how many layers got one. Call
/// [`crate::lora::LoraRegistry::finish`] afterwards to check that a loaded adapter was used
/// whole.
pub fn attach_lora(
    registry: &crate::lora::LoraRegistry,
    model: &mut dyn CausalLm,
) -> Result<usize> {
    let device = model.device().clone();
    let mut attached = 0;
    for linear in model.linears_mut() {
        let (out_dim, in_dim) = linear.base.dims();
        linear.lora = registry.layer_for(&linear.name, in_dim, out_dim, &device)?;
        attached += usize::from(linear.lora.is_some());
    }
    Ok(attached)
}
