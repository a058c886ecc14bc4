//! Data-parallel training: the collective operations the trainer needs, behind one trait, and
//! how the ranks find each other.
//!
//! - [`Communicator`]: all-reduce (sum) of one packed `f32` buffer, broadcast from rank 0, a
//!   barrier. Three implementations: [`local::InProcess`] (threads of one process: the CPU
//!   tests), [`tcp::TcpCommunicator`] (processes on the CPU, through rank 0), and, with the
//!   `nccl` feature, `nccl::NcclCommunicator` (GPUs, through NCCL).
//! - [`rendezvous`]: rank 0 serves a payload (the 128-byte NCCL id) to the other ranks over TCP.
//! - [`topology`]: who this process is (rank, world size, local rank, master address), parsed
//!   once from the launch flags or torchrun's / Slurm's environment.
//! - [`launch`]: `--nproc-per-node`: start one worker process per rank and supervise them.
//!
//! **Architecture Invariant:** the CPU communicators sum in rank order (rank 0 + rank 1 + …,
//! see [`add_into`]), so a reduction is bit-identical across runs whatever the threads'
//! timing, and equal to one process summing the same partial sums in the same order.

pub mod launch;
pub mod local;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod rendezvous;
pub mod tcp;
pub mod topology;

#[cfg(test)]
pub(crate) mod equivalence;

use std::sync::Arc;

use anyhow::Context as _;
use candle_core::{DType, Tensor, Var};

/// What a collective operation can fail with. Every variant names the rank at fault where one is.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    #[error("rendezvous on {addr}: rank(s) {missing:?} of {world} did not arrive within {secs} s")]
    Missing {
        addr: String,
        missing: Vec<usize>,
        world: usize,
        secs: u64,
    },
    #[error("rendezvous on {addr}: rank 0 could not be reached within {secs} s: {source}")]
    NoRoot {
        addr: String,
        secs: u64,
        source: std::io::Error,
    },
    #[error("rank {rank} left the group: {reason}")]
    PeerLeft { rank: usize, reason: String },
    #[error("rendezvous protocol: {0}")]
    Protocol(String),
    #[error("rank {rank}: buffer of {got} values, rank 0 has {want}")]
    Length {
        rank: usize,
        got: usize,
        want: usize,
    },
    #[error("{0}")]
    Backend(String),
}

/// The collective operations of data-parallel training. Every rank calls the same operations
/// in the same order with buffers of the same length; a rank that leaves makes the others'
/// calls fail (on the CPU communicators) instead of hanging.
pub trait Communicator: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Every rank's `buf` becomes the element-wise sum of all ranks' buffers.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), DistError>;
    /// Every rank's `buf` becomes rank 0's.
    fn broadcast(&self, buf: &mut [f32]) -> Result<(), DistError>;
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<(), DistError>;
    /// Which implementation this is, for the logs ("in-process", "tcp", "nccl").
    fn backend(&self) -> &'static str;
}

/// A communicator shared by the parts of a rank's trainer.
pub type Comm = Arc<dyn Communicator>;

/// The reduction step of the CPU communicators: `acc += next`, element by element. Summing
/// rank 0's buffer, then rank 1's, and so on fixes the rounding of every sum.
pub fn add_into(acc: &mut [f32], next: &[f32]) {
    for (a, b) in acc.iter_mut().zip(next) {
        *a += *b;
    }
}

/// Gradients (`None`: zero) or weights as one flat `f32` buffer in `vars` order: one copy to
/// the host, one collective.
pub fn pack(tensors: &[Option<Tensor>], vars: &[(String, Var)]) -> anyhow::Result<Vec<f32>> {
    let flat = tensors
        .iter()
        .zip(vars)
        .map(|(t, (_, v))| match t {
            Some(t) => t.flatten_all()?.to_dtype(DType::F32),
            None => Tensor::zeros(v.elem_count(), DType::F32, v.device()),
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    if flat.is_empty() {
        return Ok(Vec::new());
    }
    Ok(Tensor::cat(&flat, 0)?.to_vec1::<f32>()?)
}

/// [`pack`]'s inverse: one tensor per var, its shape, dtype and device.
pub fn unpack(buf: &[f32], vars: &[(String, Var)]) -> anyhow::Result<Vec<Tensor>> {
    let mut at = 0;
    vars.iter()
        .map(|(name, v)| {
            let n = v.elem_count();
            let part = buf
                .get(at..at + n)
                .with_context(|| format!("packed buffer too short for {name}"))?;
            at += n;
            Ok(Tensor::from_slice(part, v.shape(), v.device())?.to_dtype(v.dtype())?)
        })
        .collect()
}

/// A world of one: every operation is the identity (`WORLD_SIZE=1`, or a single process).
pub struct Solo;

impl Communicator for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _: &mut [f32]) -> Result<(), DistError> {
        Ok(())
    }
    fn broadcast(&self, _: &mut [f32]) -> Result<(), DistError> {
        Ok(())
    }
    fn barrier(&self) -> Result<(), DistError> {
        Ok(())
    }
    fn backend(&self) -> &'static str {
        "solo"
    }
}
