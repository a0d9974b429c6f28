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

pub mod args;
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
pub mod meet;
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

/// One transfer of a grouped point-to-point call ([`Communicator::send_recv_raw`]), in bytes.
#[derive(Debug)]
pub enum P2p<'a> {
    /// Send `buf` to group rank `peer`.
    Send { buf: &'a [u8], peer: usize },
    /// Receive exactly `buf.len()` bytes from group rank `peer` into `buf`.
    Recv { buf: &'a mut [u8], peer: usize },
}

impl P2p<'_> {
    /// The other rank of this transfer.
    pub fn peer(&self) -> usize {
        match self {
            P2p::Send { peer, .. } | P2p::Recv { peer, .. } => *peer,
        }
    }
    /// Bytes this transfer moves.
    pub fn len(&self) -> usize {
        match self {
            P2p::Send { buf, .. } => buf.len(),
            P2p::Recv { buf, .. } => buf.len(),
        }
    }
    /// Whether it moves no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One rank's handle on a group's collectives (torch.distributed / NCCL / MPI semantics).
///
/// A communicator is a group of ranks numbered 0..world_size: the job's world ([`from_env`]) or
/// a group made from it by [`Communicator::split`]. Every rank of the group calls the same
/// collectives in the same order; point-to-point transfers involve only the two ranks.
///
/// The `*_raw` methods take byte buffers tagged with a [`DType`] so the trait stays object-safe;
/// the typed helpers of [`CommExt`] are what callers normally use. Reductions run in rank order
/// 0..N-1 with the kernels of [`reduce`], so every rank gets the same bits.
pub trait Communicator: Send {
    /// This rank's number in the group.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn world_size(&self) -> usize;

    /// In-place all-reduce of `buf` (every rank passes the same element count).
    fn all_reduce_raw(&mut self, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()>;
    /// Out-of-place all-reduce (NCCL's `sendbuff != recvbuff`): `output` gets the reduction of
    /// every rank's `input`, which stays as it was; same lengths. Transports that can read
    /// `input` where they would read `output` skip the copy this default makes.
    fn all_reduce_into_raw(
        &mut self,
        input: &[u8],
        output: &mut [u8],
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        args::same_len("all_reduce", input.len(), output.len())?;
        output.copy_from_slice(input);
        self.all_reduce_raw(output, dtype, op)
    }
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
    /// Returns once every rank of the group has entered it.
    fn barrier(&mut self) -> Result<()>;

    /// Reduction to one rank (MPI_Reduce, ncclReduce in place): `root`'s `buf` becomes the
    /// reduction of every rank's `buf`; the other ranks' `buf` is left as it was.
    ///
    /// The default runs an all-reduce on a copy (correct on any transport; the shared-memory
    /// one has its own).
    fn reduce_raw(
        &mut self,
        buf: &mut [u8],
        dtype: DType,
        op: ReduceOp,
        root: usize,
    ) -> Result<()> {
        args::root("reduce", root, self.world_size())?;
        let mut tmp = buf.to_vec();
        self.all_reduce_raw(&mut tmp, dtype, op)?;
        if self.rank() == root {
            buf.copy_from_slice(&tmp);
        }
        Ok(())
    }
    /// MPI_Gather: `root`'s `output` (`world_size * input.len()` bytes) = every rank's `input` in
    /// rank order; `output` is not touched on the other ranks (it may be empty there).
    ///
    /// The default is a grouped receive at the root.
    fn gather_raw(
        &mut self,
        input: &[u8],
        output: &mut [u8],
        dtype: DType,
        root: usize,
    ) -> Result<()> {
        let (n, me) = (self.world_size(), self.rank());
        args::root("gather", root, n)?;
        args::elements("gather", input.len(), dtype, "the input")?;
        if me != root {
            return self.send_recv_raw(
                &mut [P2p::Send {
                    buf: input,
                    peer: root,
                }],
                dtype,
            );
        }
        args::world_multiple("gather", output.len(), "output", input.len(), "input", n)?;
        // One receive per peer, empty ones too (`chunks_mut` would yield none of an empty
        // output, and the peers' empty sends would stay unmatched).
        let mut ops = Vec::with_capacity(n);
        let mut rest: &mut [u8] = output;
        for peer in 0..n {
            let (buf, tail) = std::mem::take(&mut rest).split_at_mut(input.len());
            rest = tail;
            if peer == me {
                buf.copy_from_slice(input);
            } else {
                ops.push(P2p::Recv { buf, peer });
            }
        }
        self.send_recv_raw(&mut ops, dtype)
    }
    /// MPI_Scatter: `output` = chunk `rank` of `root`'s `input` (`world_size * output.len()`
    /// bytes); `input` is not read on the other ranks (it may be empty there).
    ///
    /// The default is a grouped send from the root.
    fn scatter_raw(
        &mut self,
        input: &[u8],
        output: &mut [u8],
        dtype: DType,
        root: usize,
    ) -> Result<()> {
        let (n, me) = (self.world_size(), self.rank());
        args::root("scatter", root, n)?;
        args::elements("scatter", output.len(), dtype, "the output")?;
        if me != root {
            return self.send_recv_raw(
                &mut [P2p::Recv {
                    buf: output,
                    peer: root,
                }],
                dtype,
            );
        }
        args::world_multiple("scatter", input.len(), "input", output.len(), "output", n)?;
        let ob = output.len();
        // One send per peer, empty ones too (the peers wait for them).
        let mut ops: Vec<P2p> = (0..n)
            .filter(|&p| p != me)
            .map(|peer| P2p::Send {
                buf: &input[peer * ob..(peer + 1) * ob],
                peer,
            })
            .collect();
        self.send_recv_raw(&mut ops, dtype)?;
        output.copy_from_slice(&input[me * ob..(me + 1) * ob]);
        Ok(())
    }
    /// MPI_Alltoall: chunk `p` of `input` goes to rank `p`, chunk `p` of `output` comes from rank
    /// `p`; `input.len() == output.len()`, a multiple of `world_size` elements.
    fn all_to_all_raw(&mut self, input: &[u8], output: &mut [u8], dtype: DType) -> Result<()> {
        let n = self.world_size();
        args::same_len("all_to_all", input.len(), output.len())?;
        let per = args::elements("all_to_all", input.len(), dtype, "the input")?;
        if per % n != 0 {
            return Err(CommError::Invalid {
                op: "all_to_all",
                msg: format!(
                    "the input holds {per} {} elements, not a multiple of the group's {n} ranks",
                    dtype.name()
                ),
            });
        }
        let counts = vec![per / n; n];
        self.all_to_allv_raw(input, &counts, output, &counts, dtype)
    }
    /// MPI_Alltoallv with packed chunks: `input` holds `send_counts[p]` elements for each rank
    /// `p` in rank order, `output` receives `recv_counts[p]` elements from each rank `p` in rank
    /// order. Counts are in elements; `recv_counts[p]` must equal what rank `p` sends here.
    ///
    /// The default is one grouped call of pairwise sends and receives (NCCL's all-to-all).
    fn all_to_allv_raw(
        &mut self,
        input: &[u8],
        send_counts: &[usize],
        output: &mut [u8],
        recv_counts: &[usize],
        dtype: DType,
    ) -> Result<()> {
        let (n, me) = (self.world_size(), self.rank());
        let mut ops = args::all_to_allv_ops(input, send_counts, output, recv_counts, dtype, me, n)?;
        self.send_recv_raw(&mut ops, dtype)
    }
    /// Point-to-point transfers that progress together, like ncclSend/ncclRecv between
    /// ncclGroupStart and ncclGroupEnd (or MPI_Sendrecv): returns when every one is done, so a
    /// ring exchange or a pairwise all-to-all cannot deadlock. Transfers from one rank to another
    /// are matched in the order both sides issue them; a receive must expect exactly the bytes
    /// sent. `dtype` tags the transfers for statistics and traces.
    fn send_recv_raw(&mut self, ops: &mut [P2p<'_>], dtype: DType) -> Result<()>;
    /// MPI_Comm_split / ncclCommSplit: every rank of this group calls it; the ranks that pass the
    /// same `color` form a new group, numbered by `key`, then by their rank here. `None` opts out
    /// (and returns `None`). Groups nest, any number may be alive at once, each has its own
    /// sequence numbers and statistics, and dropping one frees its memory.
    fn split(&mut self, color: Option<u32>, key: i64) -> Result<Option<Box<dyn Communicator>>>;

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

/// `TPRUN_HIER_MODE`: how a multi-node communicator (feature `mpi`) all-reduces:
/// `reproducible` (the default: the flat path's bits) or `fast` (node partial sums; the same bits
/// on every rank but not the flat path's). See `hier.rs`.
pub const ENV_HIER_MODE: &str = "TPRUN_HIER_MODE";

/// The shape of a multi-node job: `nodes` nodes of `per_node` ranks, global rank
/// `node * per_node + local`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hierarchy {
    pub nodes: usize,
    pub per_node: usize,
    /// The fast all-reduce (`TPRUN_HIER_MODE=fast`): node partial sums, then the nodes' sums in
    /// node order, each rounded to the storage type; identical on every rank, not necessarily
    /// the flat path's bits. `false`: the reproducible mode (the flat path's bits).
    pub fast: bool,
}

/// The typed collectives, for every communicator including `&mut dyn Communicator`: each casts
/// its slice to bytes and tags it with the element's [`DType`], so no call site casts by hand.
pub trait CommExt: Communicator {
    /// In-place all-reduce.
    fn all_reduce<T: Element>(&mut self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        self.all_reduce_raw(bytemuck::cast_slice_mut(buf), T::DTYPE, op)
    }
    /// `output` = every rank's `input` in rank order.
    fn all_gather<T: Element>(&mut self, input: &[T], output: &mut [T]) -> Result<()> {
        self.all_gather_raw(
            bytemuck::cast_slice(input),
            bytemuck::cast_slice_mut(output),
            T::DTYPE,
        )
    }
    /// `output` = this rank's chunk of the reduction of every rank's `input`.
    fn reduce_scatter<T: Element>(
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
    /// Copies `root`'s `buf` into every other rank's `buf`.
    fn broadcast<T: Element>(&mut self, buf: &mut [T], root: usize) -> Result<()> {
        self.broadcast_raw(bytemuck::cast_slice_mut(buf), root)
    }
    /// `root`'s `buf` becomes the reduction of every rank's `buf`.
    fn reduce<T: Element>(&mut self, buf: &mut [T], op: ReduceOp, root: usize) -> Result<()> {
        self.reduce_raw(bytemuck::cast_slice_mut(buf), T::DTYPE, op, root)
    }
    /// `root`'s `output` = every rank's `input` in rank order.
    fn gather<T: Element>(&mut self, input: &[T], output: &mut [T], root: usize) -> Result<()> {
        self.gather_raw(
            bytemuck::cast_slice(input),
            bytemuck::cast_slice_mut(output),
            T::DTYPE,
            root,
        )
    }
    /// `output` = chunk `rank` of `root`'s `input`.
    fn scatter<T: Element>(&mut self, input: &[T], output: &mut [T], root: usize) -> Result<()> {
        self.scatter_raw(
            bytemuck::cast_slice(input),
            bytemuck::cast_slice_mut(output),
            T::DTYPE,
            root,
        )
    }
    /// Equal-chunk all-to-all.
    fn all_to_all<T: Element>(&mut self, input: &[T], output: &mut [T]) -> Result<()> {
        self.all_to_all_raw(
            bytemuck::cast_slice(input),
            bytemuck::cast_slice_mut(output),
            T::DTYPE,
        )
    }
    /// All-to-all with per-peer counts (elements).
    fn all_to_allv<T: Element>(
        &mut self,
        input: &[T],
        send_counts: &[usize],
        output: &mut [T],
        recv_counts: &[usize],
    ) -> Result<()> {
        self.all_to_allv_raw(
            bytemuck::cast_slice(input),
            send_counts,
            bytemuck::cast_slice_mut(output),
            recv_counts,
            T::DTYPE,
        )
    }
    /// Blocking send of `buf` to `peer`.
    fn send<T: Element>(&mut self, buf: &[T], peer: usize) -> Result<()> {
        let buf = bytemuck::cast_slice(buf);
        self.send_recv_raw(&mut [P2p::Send { buf, peer }], T::DTYPE)
    }
    /// Blocking receive of exactly `buf.len()` elements from `peer`.
    fn recv<T: Element>(&mut self, buf: &mut [T], peer: usize) -> Result<()> {
        let buf = bytemuck::cast_slice_mut(buf);
        self.send_recv_raw(&mut [P2p::Recv { buf, peer }], T::DTYPE)
    }
    /// MPI_Sendrecv: sends `send` to `dst` while receiving `recv` from `src`.
    fn send_recv<T: Element>(
        &mut self,
        send: &[T],
        dst: usize,
        recv: &mut [T],
        src: usize,
    ) -> Result<()> {
        let mut ops = [
            P2p::Send {
                buf: bytemuck::cast_slice(send),
                peer: dst,
            },
            P2p::Recv {
                buf: bytemuck::cast_slice_mut(recv),
                peer: src,
            },
        ];
        self.send_recv_raw(&mut ops, T::DTYPE)
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
    fn all_reduce_into_raw(
        &mut self,
        input: &[u8],
        output: &mut [u8],
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        (**self).all_reduce_into_raw(input, output, dtype, op)
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
    fn reduce_raw(
        &mut self,
        buf: &mut [u8],
        dtype: DType,
        op: ReduceOp,
        root: usize,
    ) -> Result<()> {
        (**self).reduce_raw(buf, dtype, op, root)
    }
    fn gather_raw(
        &mut self,
        input: &[u8],
        output: &mut [u8],
        dtype: DType,
        root: usize,
    ) -> Result<()> {
        (**self).gather_raw(input, output, dtype, root)
    }
    fn scatter_raw(
        &mut self,
        input: &[u8],
        output: &mut [u8],
        dtype: DType,
        root: usize,
    ) -> Result<()> {
        (**self).scatter_raw(input, output, dtype, root)
    }
    fn all_to_all_raw(&mut self, input: &[u8], output: &mut [u8], dtype: DType) -> Result<()> {
        (**self).all_to_all_raw(input, output, dtype)
    }
    fn all_to_allv_raw(
        &mut self,
        input: &[u8],
        send_counts: &[usize],
        output: &mut [u8],
        recv_counts: &[usize],
        dtype: DType,
    ) -> Result<()> {
        (**self).all_to_allv_raw(input, send_counts, output, recv_counts, dtype)
    }
    fn send_recv_raw(&mut self, ops: &mut [P2p<'_>], dtype: DType) -> Result<()> {
        (**self).send_recv_raw(ops, dtype)
    }
    fn split(&mut self, color: Option<u32>, key: i64) -> Result<Option<Box<dyn Communicator>>> {
        (**self).split(color, key)
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

/// Rank `rank` of a job of `world` ranks on this host whose processes meet by themselves, not
/// through a launcher (ncclCommInitRank with a shared name instead of an ncclUniqueId): every
/// rank passes the same `key`, rank 0 creates the named segment for it ([`from_env`]'s start-up
/// rendezvous), the others wait for it until the communicator timeout, and the last to arrive
/// removes the name. Unlike [`from_env`] any number may live in one process (distinct keys, or
/// distinct ranks of one key on different threads). A world of one needs no segment.
pub fn join(key: &str, world: usize, rank: usize) -> Result<Box<dyn Communicator>> {
    let invalid = |msg: String| CommError::Invalid { op: "join", msg };
    if key.is_empty() {
        return Err(invalid(
            "the job key is empty (every rank must pass the same non-empty name)".into(),
        ));
    }
    if world == 0 || rank >= world {
        return Err(invalid(format!(
            "rank {rank} out of range for world size {world}"
        )));
    }
    meet::shm_by_key(key, rank, world, None)
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
