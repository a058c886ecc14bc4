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

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, TensorId, Var};

static SINK: Mutex<Option<HashMap<TensorId, Tensor>>> = Mutex::new(None);

thread_local! {
    // Per thread, as a training loop runs forward and backward on one thread: another model
    // used elsewhere in the process (the server's evaluations) is not affected.
    static ENABLED: Cell<bool> = const { Cell::new(false) };
    static NO_GRAD: Cell<bool> = const { Cell::new(false) };
}

/// Turn checkpointing on or off for forward passes on this thread (the trainer's switch).
pub fn set_enabled(on: bool) {
    ENABLED.with(|c| c.set(on));
}

pub fn enabled() -> bool {
    ENABLED.with(Cell::get)
}

/// Whether the current forward pass is a checkpointed layer's first, graph-free one: trainable
/// weights must then be read detached.
pub fn no_grad() -> bool {
    NO_GRAD.with(Cell::get)
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

/// `f(x)` with `f`'s intermediates recomputed in backward. `trainable` are the weights inside
/// `f` that want gradients (they land in the sink).
pub fn checkpointed(x: &Tensor, trainable: Vec<Tensor>, f: LayerFn) -> Result<Tensor> {
    let out = {
        let was = NO_GRAD.with(|c| c.replace(true));
        let out = f(&x.detach());
        NO_GRAD.with(|c| c.set(was));
        out?
    };
    // The op must be in the graph even when nothing before it is (the first layer's input).
    let x = if x.track_op() {
        x.clone()
    } else {
        Var::from_tensor(x)?.as_tensor().clone()
    };
    x.apply_op1_arc(Arc::new(Box::new(Checkpoint {
        f,
        trainable,
        out: crate::handover::Handover::new("checkpoint", out),
    })))
}

struct Checkpoint {
    f: LayerFn,
    trainable: Vec<Tensor>,
    out: crate::handover::Handover,
}

impl CustomOp1 for Checkpoint {
    fn name(&self) -> &'static str {
        "checkpoint"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.out.cpu()
    }

    // Not behind the `cuda` feature: without it candle's stand-in CudaStorage implements the
    // same trait, so this is type-checked in every build and never called.
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.out.cuda()
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let leaf = Var::from_tensor(&x.detach())?;
        let out = (self.f)(leaf.as_tensor())?;
        // d/d(out) of sum(out * grad) is `grad`: one backward through the recomputed layer.
        let store = (out * grad.detach())?.sum_all()?.backward()?;
        for t in &self.trainable {
            if let Some(g) = store.get(t) {
                add_to_sink(t, g.clone())?;
            }
        }
        Ok(store.get(leaf.as_tensor()).cloned())
    }
}
