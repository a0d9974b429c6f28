//! NCCL-free collectives between the rank processes of one tprun job.
//!
//! Every rank owns one [`Communicator`]. The shm transport ([`shm`]) moves data through one
//! shared-memory segment that the launcher creates before the ranks start; the CUDA IPC transport
//! (feature `cuda`) keeps the same trait. Reduction is always in rank order 0..N-1, in f32 for
//! the 16-bit floats, so every rank gets bit-identical results whatever the algorithm.
//!
//! A program launched by `tprun -n 4 -- PROGRAM` gets its rank's communicator from
//! [`from_env`] (a world of one when run on its own) and calls the typed methods of [`CommExt`]:
//!
//! ```no_run
//! use collectives::{CommExt, ReduceOp};
//!
//! fn main() -> anyhow::Result<()> {
//!     let mut comm = collectives::from_env()?;
//!     let mut x = vec![comm.rank() as f32; 4];
//!     comm.all_reduce(&mut x, ReduceOp::Sum)?;
//!     println!("rank {}/{}: {x:?}", comm.rank(), comm.world_size());
//!     Ok(())
//! }
//! ```
//!
//! # Every operation, runnable
//!
//! The examples below run their ranks as threads of one process with [`thread::run_world`]
//! (the in-process communicator, [`thread::ThreadComm`]): it calls the closure once per rank
//! with that rank's communicator and returns the results in rank order. The calls are the same
//! as over [`from_env`]'s shared memory, and so are the results, bit for bit.
//!
//! **all_reduce**: every rank ends with the reduction of every rank's buffer.
//! ```
//! use collectives::{thread::run_world, CommExt, ReduceOp};
//!
//! let out = run_world(4, |rank, comm| {
//!     let mut x = vec![rank as f32, 1.0];
//!     comm.all_reduce(&mut x, ReduceOp::Sum)?; // 0 + 1 + 2 + 3, 1 + 1 + 1 + 1
//!     Ok(x)
//! });
//! for x in out {
//!     assert_eq!(x.unwrap(), [6.0, 4.0]);
//! }
//! ```
//!
//! **all_gather**: every rank's input, concatenated in rank order, on every rank.
//! ```
//! use collectives::{thread::run_world, CommExt};
//!
//! let out = run_world(3, |rank, comm| {
//!     let mut all = vec![0i64; 3 * 2];
//!     comm.all_gather(&[rank as i64, 10 * rank as i64], &mut all)?;
//!     Ok(all)
//! });
//! for all in out {
//!     assert_eq!(all.unwrap(), [0, 0, 1, 10, 2, 20]);
//! }
//! ```
//!
//! **reduce_scatter**: the reduction of every rank's input, chunk `r` to rank `r`.
//! ```
//! use collectives::{thread::run_world, CommExt, ReduceOp};
//!
//! let out = run_world(2, |rank, comm| {
//!     let input = [1.0f32, 2.0, 3.0, 4.0].map(|v| v * (rank + 1) as f32);
//!     let mut mine = [0.0f32; 2];
//!     comm.reduce_scatter(&input, &mut mine, ReduceOp::Sum)?; // input * 1 + input * 2
//!     Ok(mine)
//! });
//! assert_eq!(out[0].as_ref().unwrap(), &[3.0, 6.0]);
//! assert_eq!(out[1].as_ref().unwrap(), &[9.0, 12.0]);
//! ```
//!
//! **broadcast**: the root's buffer, copied to every rank.
//! ```
//! use collectives::{thread::run_world, CommExt};
//!
//! let out = run_world(4, |rank, comm| {
//!     let mut x = if rank == 2 { vec![7u8, 8, 9] } else { vec![0u8; 3] };
//!     comm.broadcast(&mut x, 2)?;
//!     Ok(x)
//! });
//! for x in out {
//!     assert_eq!(x.unwrap(), [7, 8, 9]);
//! }
//! ```
//!
//! **reduce**: the reduction lands on the root only; the other ranks' buffers stay as they were.
//! ```
//! use collectives::{thread::run_world, CommExt, ReduceOp};
//!
//! let out = run_world(3, |rank, comm| {
//!     let mut x = [rank as i32 + 1];
//!     comm.reduce(&mut x, ReduceOp::Max, 0)?;
//!     Ok(x[0])
//! });
//! let out: Vec<i32> = out.into_iter().map(Result::unwrap).collect();
//! assert_eq!(out, [3, 2, 3]);
//! ```
//!
//! **gather**: every rank's input, in rank order, on the root (the others may pass an empty
//! output).
//! ```
//! use collectives::{thread::run_world, CommExt};
//!
//! let out = run_world(3, |rank, comm| {
//!     let mut all = if rank == 1 { vec![0u32; 3] } else { Vec::new() };
//!     comm.gather(&[rank as u32 * 100], &mut all, 1)?;
//!     Ok(all)
//! });
//! assert_eq!(out[1].as_ref().unwrap(), &[0, 100, 200]);
//! assert!(out[0].as_ref().unwrap().is_empty());
//! ```
//!
//! **scatter**: chunk `r` of the root's input to rank `r` (the others may pass an empty input).
//! ```
//! use collectives::{thread::run_world, CommExt};
//!
//! let out = run_world(3, |rank, comm| {
//!     let input: Vec<f64> = if rank == 0 { vec![0.5, 1.5, 2.5] } else { Vec::new() };
//!     let mut mine = [0.0f64];
//!     comm.scatter(&input, &mut mine, 0)?;
//!     Ok(mine[0])
//! });
//! let out: Vec<f64> = out.into_iter().map(Result::unwrap).collect();
//! assert_eq!(out, [0.5, 1.5, 2.5]);
//! ```
//!
//! **all_to_all**: chunk `p` of rank `r`'s input becomes chunk `r` of rank `p`'s output (a
//! transpose); [`CommExt::all_to_allv`] takes a count per peer instead.
//! ```
//! use collectives::{thread::run_world, CommExt};
//!
//! let out = run_world(3, |rank, comm| {
//!     let input: Vec<i32> = (0..3).map(|p| 10 * rank as i32 + p).collect();
//!     let mut output = vec![0i32; 3];
//!     comm.all_to_all(&input, &mut output)?;
//!     Ok(output)
//! });
//! assert_eq!(out[0].as_ref().unwrap(), &[0, 10, 20]);
//! assert_eq!(out[2].as_ref().unwrap(), &[2, 12, 22]);
//! ```
//!
//! **send / recv**: point to point between two ranks; [`CommExt::send_recv`] (or
//! [`Communicator::send_recv_raw`] with several [`P2p`] transfers) progresses both directions
//! together, so a ring exchange cannot deadlock.
//! ```
//! use collectives::{thread::run_world, CommExt};
//!
//! let out = run_world(4, |rank, comm| {
//!     if rank == 0 {
//!         comm.send(&[42u64], 3)?;
//!     } else if rank == 3 {
//!         let mut got = [0u64];
//!         comm.recv(&mut got, 0)?;
//!         assert_eq!(got, [42]);
//!     }
//!     // A ring: everyone sends right and receives from the left at once.
//!     let (right, left) = ((rank + 1) % 4, (rank + 3) % 4);
//!     let mut from_left = [0u64];
//!     comm.send_recv(&[rank as u64], right, &mut from_left, left)?;
//!     Ok(from_left[0])
//! });
//! let out: Vec<u64> = out.into_iter().map(Result::unwrap).collect();
//! assert_eq!(out, [3, 0, 1, 2]);
//! ```
//!
//! **barrier**: returns once every rank has entered it.
//! ```
//! use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
//! use collectives::thread::run_world;
//!
//! let arrived = AtomicUsize::new(0);
//! let out = run_world(4, |_rank, comm| {
//!     arrived.fetch_add(1, SeqCst);
//!     comm.barrier()?;
//!     Ok(arrived.load(SeqCst)) // nobody leaves before all four arrived
//! });
//! for seen in out {
//!     assert_eq!(seen.unwrap(), 4);
//! }
//! ```
//!
//! **split**: ranks with the same color form a new group (numbered by key, then by rank);
//! `None` opts out. A group is a [`Communicator`] like the world.
//! ```
//! use collectives::{thread::run_world, CommExt, ReduceOp};
//!
//! let out = run_world(4, |rank, comm| {
//!     // Even and odd ranks: two groups of two.
//!     let mut group = comm.split(Some(rank as u32 % 2), 0)?.expect("every rank has a color");
//!     let mut x = [rank as f32];
//!     group.all_reduce(&mut x, ReduceOp::Sum)?;
//!     Ok((group.rank(), group.world_size(), x[0]))
//! });
//! let out: Vec<_> = out.into_iter().map(Result::unwrap).collect();
//! assert_eq!(out, [(0, 2, 2.0), (0, 2, 4.0), (1, 2, 2.0), (1, 2, 4.0)]);
//! ```
//!
//! Errors are values, not hangs: a root or peer out of range, sizes that do not fit, or an
//! operator the type has no meaning for is a [`CommError::Invalid`] naming the argument, and a
//! rank that fails or dies ends its peers' waits with an error naming it.
//! ```
//! use collectives::{thread::run_world, CommExt, CommError};
//!
//! let out = run_world(2, |_rank, comm| {
//!     let mut x = [1.0f32];
//!     let e = comm.broadcast(&mut x, 5).unwrap_err(); // there is no rank 5
//!     assert!(matches!(e, CommError::Invalid { op: "broadcast", .. }), "{e}");
//!     Ok(())
//! });
//! assert!(out.iter().all(|r| r.is_ok()));
//! ```
//!
//! # Where to start reading
//!
//! [`Communicator`] (the collectives on byte buffers) and [`CommExt`] (the typed calls everyone
//! uses); [`from_env`] picks this rank's communicator, [`join`] meets ranks that no launcher
//! started. The communicators: [`ShmComm`] ([`shm`], the production transport:
//! [`shm::CommOptions`] for its settings, the protocol and algorithms in the module docs),
//! [`local::SoloComm`] (a world of one, a program run without tprun) and [`thread::ThreadComm`]
//! (test ranks as threads). [`JobSegment`] is the launcher's side of the segment; [`reduce`] the
//! rank-ordered reduction every communicator shares; [`stats`] and [`trace`] what a run reports.
//! The element types and operators are in [`types`]. The segment's bytes and the protocol are
//! described in docs/DESIGN.md, "Shared-memory protocol"; the user's guide is docs/collectives.md.

#![warn(missing_docs)]
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
    Send {
        /// The bytes to send.
        buf: &'a [u8],
        /// The receiving rank in this group.
        peer: usize,
    },
    /// Receive exactly `buf.len()` bytes from group rank `peer` into `buf`.
    Recv {
        /// Where the bytes land; its length is the size expected.
        buf: &'a mut [u8],
        /// The sending rank in this group.
        peer: usize,
    },
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
    /// Hosts in the job.
    pub nodes: usize,
    /// Ranks on each host.
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
