//! NCCL-free collectives between the rank processes of one tprun job.
//!
//! Every rank owns one [`Communicator`]. The shm transport ([`shm`]) moves data through one
//! shared-memory segment that the launcher creates before the ranks start; the CUDA IPC transport
//! (feature `cuda`) keeps the same trait. Reduction is always in rank order 0..N-1, in f32, so every
//! rank gets bit-identical results whatever the algorithm.
//!
//! **Where to start reading.** [`Communicator`] (the five collectives on byte buffers) and
//! [`CommExt`] (the typed calls everyone uses); [`from_env`] picks this rank's communicator.
//! The communicators: [`ShmComm`] ([`shm`], the production transport: [`shm::CommOptions`] for its
//! settings, the protocol and algorithms in the module docs), [`local::SoloComm`] (a world of
//! one, a program run without tprun) and [`thread::ThreadComm`] (test ranks as threads).
//! [`JobSegment`] is the launcher's side of the segment; [`reduce`] the rank-ordered f32
//! reduction every communicator shares; [`stats`] and [`trace`] what a run reports. The
//! segment's bytes and the protocol are described in docs/DESIGN.md, "Shared-memory protocol".

#![deny(unsafe_op_in_unsafe_fn)]

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod cuda_plan;
mod env;
pub mod error;
pub mod files;
#[cfg(feature = "mpi")]
pub mod hier;
pub mod hta;
pub mod identity;
pub mod local;
pub mod reduce;
pub mod shm;
pub mod stats;
pub mod thread;
pub mod trace;
pub mod types;
pub mod units;

pub use error::CommError;
pub use shm::{JobSegment, ShmComm};
pub use stats::{CommStats, OpKind, OpStats};
pub use types::{DType, Element, Float, ReduceOp};

/// Result of a collective.
pub type Result<T, E = CommError> = std::result::Result<T, E>;

/// One rank's handle on the job's collectives (torch.distributed / NCCL semantics).
///
/// The `*_raw` methods take byte buffers tagged with a [`DType`] so the trait stays object-safe;
/// the typed helpers below are what callers normally use. Counts are in elements.
pub trait Communicator: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;

    /// In-place all-reduce of `buf` (every rank passes the same element count).
    fn all_reduce_raw(&mut self, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()>;
    /// `output` = concatenation of every rank's `input` in rank order;
    /// `output.len() == world_size * input.len()`.
    fn all_gather_raw(&mut self, input: &[u8], output: &mut [u8], dtype: DType) -> Result<()>;
    /// `output` = rank `r`'s chunk of the reduction of every rank's `input`;
    /// `input.len() == world_size * output.len()`.
    fn reduce_scatter_raw(
        &mut self,
        input: &[u8],
        output: &mut [u8],
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()>;
    /// Copies `root`'s `buf` into every other rank's `buf`.
    fn broadcast_raw(&mut self, buf: &mut [u8], root: usize) -> Result<()>;
    fn barrier(&mut self) -> Result<()>;

    /// Per-operation totals (count, bytes, seconds, wait seconds) since the communicator was
    /// made. Transports without counters return zeros.
    fn stats(&self) -> CommStats {
        CommStats::default()
    }

    /// Nodes and ranks per node of a multi-node communicator (feature `mpi`); `None` for one
    /// host. Reports show it (perf's table header).
    fn hierarchy(&self) -> Option<Hierarchy> {
        None
    }
}

/// The shape of a multi-node job: `nodes` nodes of `per_node` ranks, global rank
/// `node * per_node + local`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hierarchy {
    pub nodes: usize,
    pub per_node: usize,
}

/// The typed collectives, for every communicator including `&mut dyn Communicator`: each casts
/// its slice to bytes and tags it with the element's [`DType`], so no call site casts by hand.
pub trait CommExt: Communicator {
    /// In-place all-reduce (float types: the reduction is computed in f32).
    fn all_reduce<T: Float>(&mut self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        self.all_reduce_raw(bytemuck::cast_slice_mut(buf), T::DTYPE, op)
    }
    /// `output` = every rank's `input` in rank order (any element type).
    fn all_gather<T: Element>(&mut self, input: &[T], output: &mut [T]) -> Result<()> {
        self.all_gather_raw(
            bytemuck::cast_slice(input),
            bytemuck::cast_slice_mut(output),
            T::DTYPE,
        )
    }
    /// `output` = this rank's chunk of the reduction of every rank's `input`.
    fn reduce_scatter<T: Float>(
        &mut self,
        input: &[T],
        output: &mut [T],
        op: ReduceOp,
    ) -> Result<()> {
        self.reduce_scatter_raw(
            bytemuck::cast_slice(input),
            bytemuck::cast_slice_mut(output),
            T::DTYPE,
            op,
        )
    }
    /// Copies `root`'s `buf` into every other rank's `buf` (any element type).
    fn broadcast<T: Element>(&mut self, buf: &mut [T], root: usize) -> Result<()> {
        self.broadcast_raw(bytemuck::cast_slice_mut(buf), root)
    }
}

impl<C: Communicator + ?Sized> CommExt for C {}

impl<C: Communicator + ?Sized> Communicator for Box<C> {
    fn rank(&self) -> usize {
        (**self).rank()
    }
    fn world_size(&self) -> usize {
        (**self).world_size()
    }
    fn all_reduce_raw(&mut self, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
        (**self).all_reduce_raw(buf, dtype, op)
    }
    fn all_gather_raw(&mut self, input: &[u8], output: &mut [u8], dtype: DType) -> Result<()> {
        (**self).all_gather_raw(input, output, dtype)
    }
    fn reduce_scatter_raw(
        &mut self,
        input: &[u8],
        output: &mut [u8],
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        (**self).reduce_scatter_raw(input, output, dtype, op)
    }
    fn broadcast_raw(&mut self, buf: &mut [u8], root: usize) -> Result<()> {
        (**self).broadcast_raw(buf, root)
    }
    fn barrier(&mut self) -> Result<()> {
        (**self).barrier()
    }
    fn stats(&self) -> CommStats {
        (**self).stats()
    }
    fn hierarchy(&self) -> Option<Hierarchy> {
        (**self).hierarchy()
    }
}

/// The communicator of this rank, from the environment tprun sets (world of one without it).
pub fn from_env() -> anyhow::Result<Box<dyn Communicator>> {
    shm::from_env()
}

/// Called once by a rank process when its program is done, after its communicator is dropped:
/// where MPI is in charge (feature `mpi`, a multi-node job) it finalizes MPI on success and
/// calls MPI_Abort on failure, so no other rank waits for this one. Nothing otherwise.
pub fn end_job(ok: bool) {
    #[cfg(feature = "mpi")]
    hier::end(ok);
    #[cfg(not(feature = "mpi"))]
    let _ = ok;
}
