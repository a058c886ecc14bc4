//! The forward value of a graph node that was computed without a graph (recomputed attention,
//! checkpointed layers): the op's `cpu_fwd`/`cuda_fwd` hand it over, once, as storage.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, Error, Result, Shape, Storage, Tensor};

pub(crate) struct Handover {
    what: &'static str,
    value: Mutex<Option<Tensor>>,
}

impl Handover {
    /// `what` names the op in errors.
    pub fn new(what: &'static str, value: Tensor) -> Self {
        Handover {
            what,
            value: Mutex::new(Some(value)),
        }
    }

    /// The value, dense from the start of its storage, so the storage can be handed over whole.
    fn take(&self) -> Result<Tensor> {
        let v = self
            .value
            .lock()
            .map_err(|_| Error::Msg(format!("{}: poisoned lock", self.what)))?
            .take()
            .ok_or_else(|| Error::Msg(format!("{}: forward ran twice", self.what)))?;
        if v.is_contiguous() && v.layout().start_offset() == 0 {
            Ok(v)
        } else {
            v.affine(1.0, 0.0)
        }
    }

    /// The value's storage: moved out where nothing else holds it (the usual case: a kernel's
    /// fresh output), else copied. Every node copied until 2026-12-06: one more read and write
    /// of each handed-over value (on Falcon-7B at 8 x 512 the 128 adapted linears' outputs alone
    /// are ~8 GB a step).
    fn storage(&self) -> Result<(Storage, Shape)> {
        let v = self.take()?;
        match v.into_storage() {
            Ok((storage, layout)) => Ok((storage, layout.shape().clone())),
            Err(v) => {
                let (s, l) = v.storage_and_layout();
                let copy = match &*s {
                    Storage::Cpu(c) => Storage::Cpu(c.try_clone(l)?),
                    Storage::Cuda(c) => Storage::Cuda(c.try_clone(l)?),
                    _ => return Err(self.elsewhere()),
                };
                Ok((copy, l.shape().clone()))
            }
        }
    }

    fn elsewhere(&self) -> Error {
        Error::Msg(format!("{}: value is not on the op's device", self.what))
    }

    pub fn cpu(&self) -> Result<(CpuStorage, Shape)> {
        match self.storage()? {
            (Storage::Cpu(c), shape) => Ok((c, shape)),
            _ => Err(self.elsewhere()),
        }
    }

    pub fn cuda(&self) -> Result<(CudaStorage, Shape)> {
        match self.storage()? {
            (Storage::Cuda(c), shape) => Ok((c, shape)),
            _ => Err(self.elsewhere()),
        }
    }
}

/// A node's input gradient from its input, output and output gradient.
type Backward = Box<dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync>;

/// `out`, computed from `x` without a graph by a fused kernel that candle cannot
/// differentiate, as a graph node whose backward is `bwd(x, grad_out)`. The graph keeps `x`
/// only, not the op-by-op intermediates (nor the zero-filled gradient buffers candle's
/// autograd allocates for each of them).
pub(crate) fn with_backward(
    name: &'static str,
    x: &Tensor,
    out: Tensor,
    bwd: impl Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    with_backward_out(name, x, out, move |x, _, grad| bwd(x, grad))
}

/// [`with_backward`] for a backward that reads the node's output too: `bwd(x, out, grad_out)`
/// (the graph keeps the output anyway, as every node's).
pub(crate) fn with_backward_out(
    name: &'static str,
    x: &Tensor,
    out: Tensor,
    bwd: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    x.apply_op1_arc(std::sync::Arc::new(Box::new(Node1 {
        name,
        out: Handover::new(name, out),
        bwd: Box::new(bwd),
    })))
}

struct Node1 {
    name: &'static str,
    out: Handover,
    bwd: Backward,
}

impl candle_core::CustomOp1 for Node1 {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &candle_core::Layout) -> Result<(CpuStorage, Shape)> {
        self.out.cpu()
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &candle_core::Layout) -> Result<(CudaStorage, Shape)> {
        self.out.cuda()
    }

    fn bwd(&self, x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        (self.bwd)(&x.detach(), &res.detach(), &grad.detach()).map(Some)
    }
}

/// The gradients of a three-input node, given its inputs (detached), output and output
/// gradient.
pub(crate) type Backward3 =
    Box<dyn Fn([&Tensor; 3], &Tensor, &Tensor) -> Result<[Option<Tensor>; 3]> + Send + Sync>;

/// [`with_backward`] for an op of three inputs (attention's `q`, `k`, `v`): `out` as a graph
/// node keeping the three inputs, whose backward is `bwd`.
pub(crate) fn with_backward3(
    name: &'static str,
    inputs: [&Tensor; 3],
    out: Tensor,
    bwd: Backward3,
) -> Result<Tensor> {
    let [a, b, c] = inputs;
    a.apply_op3_arc(
        b,
        c,
        std::sync::Arc::new(Box::new(Node3 {
            name,
            out: Handover::new(name, out),
            bwd,
        })),
    )
}

struct Node3 {
    name: &'static str,
    out: Handover,
    bwd: Backward3,
}

impl candle_core::CustomOp3 for Node3 {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &candle_core::Layout,
        _: &CpuStorage,
        _: &candle_core::Layout,
        _: &CpuStorage,
        _: &candle_core::Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.out.cpu()
    }

    // Not behind the `cuda` feature: without it candle's stand-in CudaStorage implements the
    // same trait, so this is type-checked in every build and never called.
    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &candle_core::Layout,
        _: &CudaStorage,
        _: &candle_core::Layout,
        _: &CudaStorage,
        _: &candle_core::Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.out.cuda()
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [ga, gb, gc] = (self.bwd)(
            [&a.detach(), &b.detach(), &c.detach()],
            &out.detach(),
            &grad.detach(),
        )?;
        Ok((ga, gb, gc))
    }
}

thread_local! {
    // Per thread, as checkpointing's switches: one training loop's forward pass.
    static NO_GRAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the current forward pass is a checkpointed layer's first, graph-free one: trainable
/// weights must then be read detached (set by `nn::checkpoint`, read by the LoRA layers).
pub fn no_grad() -> bool {
    NO_GRAD.with(std::cell::Cell::get)
}

/// Sets the graph-free switch for this thread, returning its previous value.
pub(crate) fn set_no_grad(on: bool) -> bool {
    NO_GRAD.with(|c| c.replace(on))
}
