//! Activation checkpointing, transformers' `gradient_checkpointing`: a decoder layer runs its
//! forward pass without a graph and keeps only its input; backward runs the layer again with a
//! graph and backpropagates through it. Trades one more forward pass for not holding every
//! layer's intermediates (candle's graph keeps every tensor an op read until backward).
//!
//! The adapters' gradients found while recomputing cannot be returned through the op (an op
//! only returns its inputs' gradients), so they go to a sink the trainer drains with
//! [`take_grad`] after `backward`. Seeded dropout makes the recomputed masks equal the first
//! ones (the dropout key does not change between a forward pass and its backward).

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{Result, Tensor, TensorId, Var};

use crate::nn::linear::Linear;
use crate::ops::attention::KvCache;

static SINK: Mutex<Option<HashMap<TensorId, Tensor>>> = Mutex::new(None);

thread_local! {
    // Per thread, as a training loop runs forward and backward on one thread: another model
    // used elsewhere in the process (the server's evaluations) is not affected.
    static ENABLED: Cell<bool> = const { Cell::new(false) };
    static EVERY: Cell<usize> = const { Cell::new(1) };
}

/// Turn checkpointing on or off for forward passes on this thread (the trainer's switch).
pub fn set_enabled(on: bool) {
    ENABLED.with(|c| c.set(on));
}

pub fn enabled() -> bool {
    ENABLED.with(Cell::get)
}

/// With checkpointing on, checkpoint only layers `0, every, 2 * every, ...` (1: all). Memory
/// falls with the share of layers checkpointed and so does the recomputation's cost, so this
/// picks a point between the two extremes transformers offers.
pub fn set_every(every: usize) {
    EVERY.with(|c| c.set(every.max(1)));
}

/// Whether the layer at `index` of the loop is checkpointed now.
pub fn checkpoints(index: usize) -> bool {
    enabled() && index.is_multiple_of(EVERY.with(Cell::get))
}

/// The gradient recomputation found for `t` (a trainable weight) since the last call.
pub fn take_grad(t: &Tensor) -> Option<Tensor> {
    SINK.lock().ok()?.as_mut()?.remove(&t.id())
}

fn add_to_sink(t: &Tensor, g: Tensor) -> Result<()> {
    let mut sink = SINK
        .lock()
        .map_err(|_| candle_core::Error::Msg("checkpoint: poisoned gradient sink".into()))?;
    let sink = sink.get_or_insert_with(HashMap::new);
    let g = match sink.remove(&t.id()) {
        Some(acc) => (acc + g)?,
        None => g,
    };
    sink.insert(t.id(), g);
    Ok(())
}

pub type LayerFn = Arc<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;

/// A decoder layer, as the models' layer loops run it.
pub trait DecoderLayer: Clone + Send + Sync + 'static {
    /// Its linear layers: their adapters' weights get gradients through the sink.
    fn linears(&self) -> Vec<&Linear>;
}

/// Step `index` of a model's layer loop, `run(layer, x, cache)`: checkpointed when
/// [`checkpoints`] says so and no KV cache is in use (training), else run as is. The one place
/// both models decide.
pub fn run_layer<L: DecoderLayer>(
    index: usize,
    layer: &L,
    x: &Tensor,
    cache: Option<&mut KvCache>,
    run: impl Fn(&L, &Tensor, Option<&mut KvCache>) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    if !checkpoints(index) || cache.is_some() {
        return run(layer, x, cache);
    }
    let trainable = layer
        .linears()
        .iter()
        .filter_map(|l| l.lora.as_ref())
        .flat_map(|l| [l.a.as_tensor().clone(), l.b.as_tensor().clone()])
        .collect();
    let layer = layer.clone();
    checkpointed(x, trainable, Arc::new(move |h| run(&layer, h, None)))
}

/// `f(x)` with `f`'s intermediates recomputed in backward. `trainable` are the weights inside
/// `f` that want gradients (they land in the sink).
pub fn checkpointed(x: &Tensor, trainable: Vec<Tensor>, f: LayerFn) -> Result<Tensor> {
    let out = {
        let was = crate::ops::handover::set_no_grad(true);
        let out = f(&x.detach());
        crate::ops::handover::set_no_grad(was);
        out?
    };
    // The op must be in the graph even when nothing before it is (the first layer's input).
    let x = if x.track_op() {
        x.clone()
    } else {
        Var::from_tensor(x)?.as_tensor().clone()
    };
    crate::ops::handover::with_backward("checkpoint", &x, out, move |x, grad| {
        let leaf = Var::from_tensor(x)?;
        let dev = x.device();
        let out = crate::ops::profile::pass("recompute", || {
            crate::ops::profile::scope("layer", dev, || f(leaf.as_tensor()))
        })?;
        // d/d(out) of sum(out * grad) is `grad`: one backward through the recomputed layer.
        let store = crate::ops::profile::pass("backward", || {
            crate::ops::profile::scope("layer", dev, || (out * grad)?.sum_all()?.backward())
        })?;
        for t in &trainable {
            if let Some(g) = store.get(t) {
                add_to_sink(t, g.clone())?;
            }
        }
        match store.get(leaf.as_tensor()) {
            Some(g) => Ok(g.clone()),
            // A layer whose output does not depend on its input passes no gradient back.
            None => x.zeros_like(),
        }
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use candle_core::{Device, Result, Tensor};

    use crate::lora::LoraRegistry;
    use crate::nn::causal_lm::CausalLm;
    use crate::nn::linear::LinearBuilder;

    /// Dense layers with r=4 adapters and dropout on, as a checkpointing test trains them.
    pub(crate) fn lora_builder() -> Result<LinearBuilder> {
        let lora = crate::lora::LoraConfig {
            r: 4,
            lora_alpha: 8.0,
            lora_dropout: 0.1,
            target_modules: crate::lora::TargetModules::AllLinear,
            ..Default::default()
        };
        LinearBuilder::dense().with_lora(lora)
    }

    /// Every adapter gradient of a checkpointed run equals the plain run's (dropout included:
    /// the recomputed masks must be the first pass's).
    pub(crate) fn assert_same_gradients(
        model: &dyn CausalLm,
        reg: &Arc<LoraRegistry>,
    ) -> Result<()> {
        let dev = Device::Cpu;
        assert!(!reg.layers().is_empty(), "the builder attached no adapter");
        // B starts at zero, which would leave A without a gradient.
        for l in reg.layers() {
            l.b.set(&(l.b.as_tensor().ones_like()? * 0.05)?)?;
        }
        reg.set_training(true);
        let ids = Tensor::new(&[[0u32, 5, 9, 3, 17], [4, 4, 8, 1, 2]], &dev)?;
        let mut runs = Vec::new();
        // Plain, every layer checkpointed, every other layer (a mix of both kinds of gradient).
        for (on, every) in [(false, 1), (true, 1), (true, 2)] {
            super::set_enabled(on);
            super::set_every(every);
            reg.set_dropout_key(1, 0);
            let h = model.hidden_states(&ids, None, None)?;
            let store = model.lm_head(&h)?.sqr()?.sum_all()?.backward()?;
            let mut grads = Vec::new();
            for l in reg.layers() {
                for v in [&l.a, &l.b] {
                    let g = match store.get(v.as_tensor()) {
                        Some(g) => g.clone(),
                        None => super::take_grad(v.as_tensor())
                            .expect("a checkpointed layer's gradient"),
                    };
                    grads.push(g.flatten_all()?.to_vec1::<f32>()?);
                }
            }
            runs.push(grads);
        }
        super::set_enabled(false);
        super::set_every(1);
        for (run, every) in runs[1..].iter().zip([1, 2]) {
            for (plain, ckpt) in runs[0].iter().zip(run) {
                let scale = plain.iter().fold(1e-6f32, |a, v| a.max(v.abs()));
                let d = plain
                    .iter()
                    .zip(ckpt)
                    .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
                assert!(
                    d <= 1e-5 * scale.max(1.0),
                    "every {every}: gradients differ by {d} (scale {scale})"
                );
            }
        }
        Ok(())
    }
}
