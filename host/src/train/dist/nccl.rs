//! The GPU communicator: NCCL through cudarc's bindings (candle-core's `nccl` feature), one
//! communicator per rank on the rank's device and candle's stream. The NCCL unique id comes
//! from rank 0 through [`crate::train::dist::rendezvous`], or, with `NCCL_COMM_ID` set, NCCL
//! makes it from that address on every rank.
//!
//! The packed buffer is host memory (the [`Communicator`] contract, shared with the CPU
//! communicators): each call copies it to the device, reduces there and copies it back. A
//! LoRA's gradients are tens of megabytes at most, copied once a step.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use candle_core::Device;
use candle_core::cuda_backend::cudarc::driver::CudaStream;
use candle_core::cuda_backend::cudarc::nccl::{Comm, Id, ReduceOp};

use crate::train::dist::topology::Topology;
use crate::train::dist::{Communicator, DistError, rendezvous};

pub struct NcclCommunicator {
    rank: usize,
    world: usize,
    stream: Arc<CudaStream>,
    comm: Mutex<Comm>,
}

// SAFETY: an NCCL communicator may be used from any thread, one call at a time; the mutex
// serialises the calls. cudarc leaves `Comm` !Send only because it holds a raw pointer.
unsafe impl Send for NcclCommunicator {}
unsafe impl Sync for NcclCommunicator {}

fn backend(what: &str, e: impl std::fmt::Debug) -> DistError {
    DistError::Backend(format!("NCCL {what}: {e:?}"))
}

impl NcclCommunicator {
    /// Joins the world `topo` describes on `device` (this rank's GPU).
    pub fn new(device: &Device, topo: &Topology, timeout: Duration) -> Result<Self, DistError> {
        let Device::Cuda(dev) = device else {
            return Err(DistError::Backend(
                "NCCL needs a CUDA device, and this rank runs on the CPU".into(),
            ));
        };
        let (rank, world) = (topo.rank, topo.world_size);
        let id = if std::env::var_os("NCCL_COMM_ID").is_some() {
            Id::new().map_err(|e| backend("ncclGetUniqueId (NCCL_COMM_ID)", e.0))?
        } else if rank == 0 {
            let id = Id::new().map_err(|e| backend("ncclGetUniqueId", e.0))?;
            let bytes: Vec<u8> = id.internal().iter().map(|c| *c as u8).collect();
            let listener = rendezvous::listen(topo.master_port)?;
            // The connections are not needed after the id is handed over: NCCL makes its own.
            rendezvous::serve(&listener, world, &bytes, timeout)?;
            id
        } else {
            let (bytes, _) = rendezvous::join(&topo.master(), rank, world, timeout)?;
            let mut internal = [0 as std::ffi::c_char; 128];
            if bytes.len() != internal.len() {
                return Err(DistError::Protocol(format!(
                    "rank 0 sent an NCCL id of {} bytes, not 128",
                    bytes.len()
                )));
            }
            for (i, b) in internal.iter_mut().zip(&bytes) {
                *i = *b as std::ffi::c_char;
            }
            Id::uninit(internal)
        };
        let stream = dev.cuda_stream();
        let comm = Comm::from_rank(stream.clone(), rank, world, id)
            .map_err(|e| backend(&format!("ncclCommInitRank (rank {rank} of {world})"), e.0))?;
        Ok(NcclCommunicator {
            rank,
            world,
            stream,
            comm: Mutex::new(comm),
        })
    }

    fn on_device(
        &self,
        buf: &mut [f32],
        op: impl FnOnce(
            &Comm,
            &mut candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>,
        ) -> Result<(), DistError>,
    ) -> Result<(), DistError> {
        if buf.is_empty() {
            return Ok(());
        }
        let comm = self.comm.lock().unwrap_or_else(|e| e.into_inner());
        let mut dev = self
            .stream
            .clone_htod(&*buf)
            .map_err(|e| backend("copy to the device", e))?;
        op(&comm, &mut dev)?;
        self.stream
            .memcpy_dtoh(&dev, buf)
            .map_err(|e| backend("copy to the host", e))?;
        self.stream
            .synchronize()
            .map_err(|e| backend("synchronize", e))
    }
}

impl Communicator for NcclCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), DistError> {
        self.on_device(buf, |comm, dev| {
            comm.all_reduce_in_place(dev, &ReduceOp::Sum)
                .map(|_| ())
                .map_err(|e| backend("ncclAllReduce", e.0))
        })
    }

    fn broadcast(&self, buf: &mut [f32]) -> Result<(), DistError> {
        self.on_device(buf, |comm, dev| {
            comm.broadcast_in_place(dev, 0)
                .map(|_| ())
                .map_err(|e| backend("ncclBroadcast", e.0))
        })
    }

    fn barrier(&self) -> Result<(), DistError> {
        self.all_reduce_sum(&mut [0.0])
    }

    fn backend(&self) -> &'static str {
        "nccl"
    }
}
