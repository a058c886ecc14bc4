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

    pub fn cpu(&self) -> Result<(CpuStorage, Shape)> {
        let v = self.take()?;
        let (s, l) = v.storage_and_layout();
        match &*s {
            Storage::Cpu(c) => Ok((c.try_clone(l)?, l.shape().clone())),
            _ => Err(Error::Msg(format!(
                "{}: value is not on the CPU",
                self.what
            ))),
        }
    }

    pub fn cuda(&self) -> Result<(CudaStorage, Shape)> {
        let v = self.take()?;
        let (s, l) = v.storage_and_layout();
        match &*s {
            Storage::Cuda(c) => Ok((c.try_clone(l)?, l.shape().clone())),
            _ => Err(Error::Msg(format!(
                "{}: value is not on the GPU",
                self.what
            ))),
        }
    }
}
