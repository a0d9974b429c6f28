//! The hierarchical communicator (feature `mpi`): ranks on one host share a node-local
//! shared-memory segment ([`ShmComm`]); between hosts, MPI moves bytes only.
//!
//! **Layout.** K nodes of L ranks each, numbered in blocks: global rank `g = node * L + local`
//! (mpirun's and srun's default block placement; anything else is refused at start-up). Rail
//! `local` is the MPI communicator of the ranks with that local index, one per node, in node
//! order: each rail carries 1/L of the inter-node traffic, and its members are the "leaders" of
//! their shard.
//!
//! **Algorithms.** All-reduce: the buffer is cut into L shards of ceil(count / L) elements (the
//! last padded); a node-local all-gather gives local rank l shard l of every local input -> on
//! rail l an MPI_Allgather of those raw bytes gives shard l of all N inputs, which rail member
//! reduces with [`crate::reduce`] -> node-local all-gather of the reduced shards.
//! Reduce-scatter: likewise with an MPI_Alltoall (each rank receives only its own chunk of every
//! input). All-gather: rail MPI_Allgather, then node-local all-gather, then a reorder into global
//! rank order. Broadcast: the root's rail broadcasts from the root's node, then each node
//! broadcasts locally.
//!
//! **Reduction order.** Each element is reduced from the N raw inputs in global rank order
//! 0..N-1, in f32, rounded once to the storage type: exactly what the flat shm path computes, so
//! the bits are the same as `tprun -n N` on one host, and the same on every rank. MPI never adds
//! floats (MPI_Allreduce's order is not ours to fix). The price: raw inputs cross the network
//! instead of node partial sums, L times the inter-node bytes of a partial-sum scheme, which
//! pre-added sums would avoid only by giving up the flat path's bits.
//!
//! **Fast mode** (`TPRUN_HIER_MODE=fast`, perf's `--hier-mode fast`). All-reduce (and reduce,
//! which runs over it) as a partial-sum hierarchy: a node-local reduce-scatter gives local rank
//! l the node's sum of shard l; on rail l an MPI_Alltoall hands each rail member 1/K of that
//! shard from every node, which it reduces in node order, and an MPI_Allgather returns the
//! reduced pieces; a node-local all-gather completes the buffer. Each element is reduced once,
//! by one rank, from the same bytes, so every rank gets the same bits; but the node sums are
//! rounded to the storage type before the nodes are added, so floats differ from the flat
//! rank-order result (integers, max and min do not). Inter-node bytes per rank are 2 (K-1)/K of
//! a shard, against (K-1) L shards in the reproducible mode. `avg` keeps the reproducible path
//! (its division by N belongs to the flat order). The default stays reproducible: the same bits
//! whatever the host count or placement is what tprun's TP results promise (a model's logits do
//! not change when a job moves from one host to two); fast is the opt-in for large messages.
//!
//! **Point-to-point and groups.** Grouped send/recv is MPI_Isend/MPI_Irecv on the world
//! communicator (one tag, so MPI's non-overtaking rule matches each pair's transfers in the order
//! both sides issue them), all posted before any is waited for: a ring or a pairwise all-to-all
//! cannot deadlock. Gather, scatter, all-to-all(v) are the trait's defaults over it, reduce the
//! default over all-reduce. `split` is MPI_Comm_split of this group's communicator; the group
//! ([`MpiGroup`]) moves data with MPI only (a group may span nodes in any pattern, so the node
//! segment is not used there) and reduces the gathered raw inputs itself, in group rank order,
//! with [`crate::reduce`]: the same bits on every rank, and the same as a flat group of the same
//! ranks on one host.
//!
//! **Failures.** An error in any stage (a local peer died or timed out) prints one line naming
//! this rank's global number and host, the operation and the peer's global rank, then calls
//! MPI_Abort, so mpirun/srun ends every rank; a rank that dies is reported by mpirun itself
//! (rank, PID and node). A rank's program that fails calls [`crate::end_job`] with `false`.

use std::sync::Mutex;
use std::time::Instant;

use anyhow::Context;
use mpi::datatype::Equivalence as _;
use mpi::point_to_point::{Destination as _, Source as _};
use mpi::topology::{Color, SimpleCommunicator};
use mpi::traits::{Communicator as _, CommunicatorCollectives as _, Root as _};
use mpi::Threading;

use crate::identity::Identity;
use crate::reduce::{reduce_into, Simd};
use crate::shm::{ShmComm, ENV_PRETEND_NODES};
use crate::stats::{CommStats, OpKind};
use crate::{args, CommError, Communicator, DType, P2p, ReduceOp, Result};

use crate::ENV_HIER_MODE;

/// Whether `TPRUN_HIER_MODE` asks for the fast mode; an error names a value that is neither.
pub fn fast_mode_from_env() -> std::result::Result<bool, String> {
    match crate::env::var(ENV_HIER_MODE)?.as_deref().map(str::trim) {
        None | Some("") | Some("reproducible") => Ok(false),
        Some("fast") => Ok(true),
        Some(v) => Err(format!(
            "{ENV_HIER_MODE}={v} is not a hierarchy mode: expected reproducible (the default) or fast"
        )),
    }
}

/// MPI's universe, finalized by [`end`] (not when the communicator is dropped: a rank whose
/// program failed must abort the job instead of waiting in MPI_Finalize for ranks that wait
/// for it).
static UNIVERSE: Mutex<Option<mpi::environment::Universe>> = Mutex::new(None);

/// Ends MPI for this process: MPI_Finalize after success, MPI_Abort (the whole job) after a
/// failure. Nothing when MPI was never started.
pub fn end(ok: bool) {
    let mut u = UNIVERSE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(universe) = u.take() {
        if !ok {
            universe.world().abort(1);
        }
        drop(universe);
    }
}

/// One rank of a multi-node job (see the module docs).
pub struct HierComm {
    local: ShmComm,
    rail: SimpleCommunicator,
    world_comm: SimpleCommunicator,
    rank: usize,
    world: usize,
    nodes: usize,
    per_node: usize,
    node: usize,
    lr: usize,
    host: String,
    /// [`ENV_HIER_MODE`] is `fast`.
    fast: bool,
    simd: Simd,
    stats: CommStats,
    /// Scratch buffers, kept between calls.
    a: Vec<u8>,
    b: Vec<u8>,
    c: Vec<u8>,
}

// SAFETY: MPI is initialized with MPI_THREAD_SERIALIZED (checked in `from_env`), so MPI calls may
// come from any thread as long as no two run at once; `&mut self` on every collective ensures
// that, and the communicator handles are owned values, not tied to the creating thread.
unsafe impl Send for HierComm {}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown-host".into())
}

/// Prints `e` as this rank's error line and aborts the MPI job (never returns).
fn abort_with(world: &SimpleCommunicator, rank: usize, host: &str, e: &dyn std::fmt::Display) -> ! {
    let line = format!("tprun: error: global rank {rank} on host {host}: {e}\n");
    let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
    world.abort(1)
}

impl HierComm {
    /// Starts MPI and builds the node and rail communicators and the node-local segment. A
    /// failure after MPI started aborts the job (one line first), so no rank waits forever.
    pub(crate) fn from_env(id: &Identity) -> anyhow::Result<HierComm> {
        let (universe, level) = mpi::initialize_with_threading(Threading::Serialized)
            .context("MPI was already initialized in this process")?;
        let world = universe.world();
        *UNIVERSE.lock().unwrap_or_else(|e| e.into_inner()) = Some(universe);
        let host = host_name();
        let (g, n) = (world.rank() as usize, world.size() as usize);
        if (g, n) != (id.rank, id.world) {
            end(true);
            anyhow::bail!(
                "{} says rank {} of {}, but MPI says rank {g} of {n}: start the ranks with mpirun or srun (an MPI launcher), not by hand",
                id.source.name(),
                id.rank,
                id.world
            );
        }
        let setup = || -> anyhow::Result<HierComm> {
            anyhow::ensure!(
                level >= Threading::Serialized,
                "this MPI library offers no MPI_THREAD_SERIALIZED"
            );
            Self::build(world.duplicate(), g, n, host.clone())
        };
        setup().map_err(|e| abort_with(&world, g, &host, &format!("{e:#}")))
    }

    fn build(
        world: SimpleCommunicator,
        g: usize,
        n: usize,
        host: String,
    ) -> anyhow::Result<HierComm> {
        let fast = fast_mode_from_env().map_err(anyhow::Error::msg)?;
        let node_comm = match crate::env::var(ENV_PRETEND_NODES).map_err(anyhow::Error::msg)? {
            Some(k) => {
                let k = crate::env::parse_count(ENV_PRETEND_NODES, &k, "a node count", 1..=n as u64)
                    .map_err(anyhow::Error::msg)? as usize;
                anyhow::ensure!(
                    n.is_multiple_of(k),
                    "{ENV_PRETEND_NODES}={k} does not divide the {n} ranks into equal nodes"
                );
                world
                    .split_by_color(Color::with_value((g / (n / k)) as i32))
                    .context("MPI_Comm_split")?
            }
            None => world.split_shared(g as i32),
        };
        let (lr, l) = (node_comm.rank() as usize, node_comm.size() as usize);
        let mut leader = [g as u64];
        node_comm.process_at_rank(0).broadcast_into(&mut leader[..]);
        let mut sizes = vec![0u64; n];
        world.all_gather_into(&[l as u64][..], &mut sizes[..]);
        anyhow::ensure!(
            sizes.iter().all(|&s| s as usize == l) && leader[0] as usize + lr == g && g % l == lr,
            "the ranks are not placed in equal blocks of consecutive ranks per node (rank {g} is local rank {lr} of {l} on {host}); use block placement (mpirun --map-by slot, srun --distribution=block) with the same number of ranks on every node"
        );
        let node = g / l;
        let rail = world
            .split_by_color(Color::with_value(lr as i32))
            .context("MPI_Comm_split")?;
        let local = Self::node_segment(&node_comm, lr, l, node, &host)?;
        Ok(HierComm {
            local,
            rail,
            world_comm: world,
            rank: g,
            world: n,
            nodes: n / l,
            per_node: l,
            node,
            lr,
            host,
            fast,
            simd: Simd::detect(),
            stats: CommStats::default(),
            a: Vec::new(),
            b: Vec::new(),
            c: Vec::new(),
        })
    }

    /// The node-local segment: named by job id, host, node and the leader's pid (broadcast by
    /// the leader, so a stale segment of a crashed run never matches); created 0600 by local
    /// rank 0 before the others open it, unlinked by the last one to map it.
    fn node_segment(
        node_comm: &SimpleCommunicator,
        lr: usize,
        l: usize,
        node: usize,
        host: &str,
    ) -> anyhow::Result<ShmComm> {
        let mut name = [0u8; 200];
        if lr == 0 {
            let job = crate::shm::job_key().unwrap_or_else(|| "job".into());
            let host: String = host
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            let key = format!("{job}.{host}.n{node}.{}", std::process::id());
            let n = key.len().min(name.len());
            name[..n].copy_from_slice(&key.as_bytes()[..n]);
        }
        node_comm.process_at_rank(0).broadcast_into(&mut name[..]);
        let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        let key = String::from_utf8_lossy(&name[..end]).into_owned();
        crate::shm::attach_node_local(&key, l, lr, &|| node_comm.barrier())
            .map_err(anyhow::Error::from)
    }

    /// Runs one collective; an error other than bad arguments aborts the job (module docs).
    fn op(
        &mut self,
        kind: OpKind,
        bytes: usize,
        f: impl FnOnce(&mut HierComm) -> Result<()>,
    ) -> Result<()> {
        let t0 = Instant::now();
        match f(self) {
            Ok(()) => {
                self.stats
                    .record(kind, bytes, t0.elapsed().as_secs_f64(), 0.0);
                Ok(())
            }
            Err(e @ CommError::Invalid { .. }) => Err(e),
            Err(e) => {
                let e = self.globalize(e);
                abort_with(&self.world_comm, self.rank, &self.host, &e)
            }
        }
    }

    /// A node-local error with the peer's local rank replaced by its global rank and host.
    fn globalize(&self, e: CommError) -> CommError {
        let base = self.node * self.per_node;
        let on = format!("(host {}, node {})", self.host, self.node);
        match e {
            CommError::Timeout {
                op,
                seq,
                missing,
                waited_s,
            } => CommError::PeerDied {
                op,
                seq,
                missing: base + missing,
                how: format!("{on} did not arrive within {waited_s:.1} s (TPRUN_COMM_TIMEOUT_S)"),
            },
            CommError::PeerDied {
                op,
                seq,
                missing,
                how,
            } => CommError::PeerDied {
                op,
                seq,
                missing: base + missing,
                how: format!("{on} {how}"),
            },
            CommError::Aborted {
                op,
                seq,
                failed,
                missing,
            } => CommError::Aborted {
                op,
                seq,
                failed: base + failed,
                missing: base + missing,
            },
            other => other,
        }
    }

    fn invalid(op: OpKind, msg: String) -> CommError {
        CommError::Invalid { op: op.name(), msg }
    }
}

/// `buf` split into `k` equal pieces.
fn pieces(buf: &[u8], k: usize) -> Vec<&[u8]> {
    buf.chunks_exact(buf.len() / k.max(1)).collect()
}

impl HierComm {
    fn all_reduce_impl(&mut self, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
        let esz = dtype.size();
        if !buf.len().is_multiple_of(esz) {
            let msg = format!(
                "{} bytes is not a whole number of {}",
                buf.len(),
                dtype.name()
            );
            return Err(Self::invalid(OpKind::AllReduce, msg));
        }
        let (l, k, lr) = (self.per_node, self.nodes, self.lr);
        let shard = (buf.len() / esz).div_ceil(l) * esz;
        let mut pad = std::mem::take(&mut self.a);
        let mut all = std::mem::take(&mut self.b);
        let mut got = std::mem::take(&mut self.c);
        pad.clear();
        pad.extend_from_slice(buf);
        pad.resize(l * shard, 0);
        all.resize(l * l * shard, 0);
        got.resize(k * l * shard, 0);
        let res = (|| {
            // Every local rank's input; keep shard `lr` of each, in local rank order.
            self.local.all_gather_raw(&pad, &mut all, dtype)?;
            let mine: Vec<u8> = (0..l)
                .flat_map(|j| &all[(j * l + lr) * shard..][..shard])
                .copied()
                .collect();
            if shard > 0 {
                self.rail.all_gather_into(&mine[..], &mut got[..]);
                // got = shard `lr` of every rank, in global rank order: the flat path's order.
                reduce_into(
                    self.simd,
                    dtype,
                    op,
                    &mut pad[..shard],
                    &pieces(&got, k * l),
                );
            }
            let reduced = pad[..shard].to_vec();
            self.local.all_gather_raw(&reduced, &mut pad, dtype)
        })();
        buf.copy_from_slice(&pad[..buf.len()]);
        (self.a, self.b, self.c) = (pad, all, got);
        res
    }

    /// The fast mode's all-reduce (module docs): node reduce-scatter, rail all-to-all + reduce
    /// in node order + all-gather, node all-gather.
    fn fast_all_reduce_impl(&mut self, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
        let esz = dtype.size();
        if !buf.len().is_multiple_of(esz) {
            let msg = format!(
                "{} bytes is not a whole number of {}",
                buf.len(),
                dtype.name()
            );
            return Err(Self::invalid(OpKind::AllReduce, msg));
        }
        let (l, k) = (self.per_node, self.nodes);
        // Shard l of the buffer goes to local rank l; a whole number of elements per node.
        let piece = (buf.len() / esz).div_ceil(l).div_ceil(k) * esz;
        let shard = piece * k;
        let mut pad = std::mem::take(&mut self.a);
        let mut part = std::mem::take(&mut self.b);
        let mut got = std::mem::take(&mut self.c);
        pad.clear();
        pad.extend_from_slice(buf);
        pad.resize(l * shard, 0);
        part.resize(shard, 0);
        got.resize(shard, 0);
        let res = (|| {
            if shard == 0 {
                return Ok(());
            }
            // This node's sum of shard `lr`, in local rank order.
            self.local.reduce_scatter_raw(&pad, &mut part, dtype, op)?;
            // Piece `node` of every node's partial, in node order; reduced here, by this rank
            // alone, then every rail member gets every reduced piece.
            self.rail.all_to_all_into(&part[..], &mut got[..]);
            reduce_into(self.simd, dtype, op, &mut part[..piece], &pieces(&got, k));
            got[..piece].copy_from_slice(&part[..piece]);
            self.rail.all_gather_into(&got[..piece], &mut part[..]);
            self.local.all_gather_raw(&part, &mut pad, dtype)
        })();
        buf.copy_from_slice(&pad[..buf.len()]);
        (self.a, self.b, self.c) = (pad, part, got);
        res
    }

    fn all_gather_impl(&mut self, input: &[u8], output: &mut [u8], dtype: DType) -> Result<()> {
        let (l, k, len) = (self.per_node, self.nodes, input.len());
        if output.len() != self.world * len {
            return Err(Self::invalid(
                OpKind::AllGather,
                format!(
                    "output is {} bytes, want {} x {len}",
                    output.len(),
                    self.world
                ),
            ));
        }
        let (mut rail, mut node) = (std::mem::take(&mut self.a), std::mem::take(&mut self.b));
        rail.resize(k * len, 0);
        node.resize(l * k * len, 0);
        if len > 0 {
            self.rail.all_gather_into(input, &mut rail[..]);
        }
        let res = self.local.all_gather_raw(&rail, &mut node, dtype);
        // node holds, per local rank j, the inputs of ranks n * L + j for n in 0..K.
        for j in 0..l {
            for n in 0..k {
                let src = &node[(j * k + n) * len..][..len];
                output[(n * l + j) * len..][..len].copy_from_slice(src);
            }
        }
        (self.a, self.b) = (rail, node);
        res
    }

    fn reduce_scatter_impl(
        &mut self,
        input: &[u8],
        output: &mut [u8],
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        let (l, k, lr, len) = (self.per_node, self.nodes, self.lr, output.len());
        if input.len() != self.world * len || !len.is_multiple_of(dtype.size()) {
            let msg = format!(
                "input is {} bytes, want {} x {len} (whole {})",
                input.len(),
                self.world,
                dtype.name()
            );
            return Err(Self::invalid(OpKind::ReduceScatter, msg));
        }
        let mut all = std::mem::take(&mut self.a);
        let mut send = std::mem::take(&mut self.b);
        let mut got = std::mem::take(&mut self.c);
        all.resize(l * input.len(), 0);
        send.resize(k * l * len, 0);
        got.resize(k * l * len, 0);
        let res = (|| {
            self.local.all_gather_raw(input, &mut all, dtype)?;
            // For node m: local rank j's chunk of global rank m * L + lr, for j in 0..L.
            for m in 0..k {
                for j in 0..l {
                    let src = &all[j * input.len() + (m * l + lr) * len..][..len];
                    send[(m * l + j) * len..][..len].copy_from_slice(src);
                }
            }
            if len > 0 {
                self.rail.all_to_all_into(&send[..], &mut got[..]);
                // got = every rank's chunk for this rank, in global rank order.
                reduce_into(self.simd, dtype, op, output, &pieces(&got, k * l));
            }
            Ok(())
        })();
        (self.a, self.b, self.c) = (all, send, got);
        res
    }

    fn broadcast_impl(&mut self, buf: &mut [u8], root: usize) -> Result<()> {
        if root >= self.world {
            return Err(Self::invalid(
                OpKind::Broadcast,
                format!("root {root} out of range for {} ranks", self.world),
            ));
        }
        let (rn, rl) = (root / self.per_node, root % self.per_node);
        if self.lr == rl && !buf.is_empty() {
            self.rail.process_at_rank(rn as i32).broadcast_into(buf);
        }
        self.local.broadcast_raw(buf, rl)
    }
}

impl Communicator for HierComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_reduce_raw(&mut self, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
        crate::types::check_reducible("all_reduce", dtype, op)?;
        let n = buf.len();
        self.op(OpKind::AllReduce, n, |c| {
            let op = premul_in_place(dtype, op, buf);
            if c.fast && op != ReduceOp::Avg {
                c.fast_all_reduce_impl(buf, dtype, op)
            } else {
                c.all_reduce_impl(buf, dtype, op)
            }
        })
    }
    fn all_gather_raw(&mut self, input: &[u8], output: &mut [u8], dtype: DType) -> Result<()> {
        let n = output.len();
        self.op(OpKind::AllGather, n, |c| {
            c.all_gather_impl(input, output, dtype)
        })
    }
    fn reduce_scatter_raw(
        &mut self,
        input: &[u8],
        output: &mut [u8],
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        crate::types::check_reducible("reduce_scatter", dtype, op)?;
        let n = input.len();
        self.op(OpKind::ReduceScatter, n, |c| {
            let (input, op) = crate::reduce::premul_input(dtype, op, input);
            c.reduce_scatter_impl(&input, output, dtype, op)
        })
    }
    fn broadcast_raw(&mut self, buf: &mut [u8], root: usize) -> Result<()> {
        let n = buf.len();
        self.op(OpKind::Broadcast, n, |c| c.broadcast_impl(buf, root))
    }
    fn barrier(&mut self) -> Result<()> {
        self.op(OpKind::Barrier, 0, |c| {
            c.local.barrier()?;
            c.world_comm.barrier();
            Ok(())
        })
    }
    fn send_recv_raw(&mut self, ops: &mut [P2p<'_>], _dtype: DType) -> Result<()> {
        let n = ops.iter().map(P2p::len).sum();
        self.op(OpKind::SendRecv, n, |c| mpi_send_recv(&c.world_comm, ops))
    }
    fn split(&mut self, color: Option<u32>, key: i64) -> Result<Option<Box<dyn Communicator>>> {
        mpi_split(&self.world_comm, color, key)
    }
    fn stats(&self) -> CommStats {
        self.stats.clone()
    }
    fn hierarchy(&self) -> Option<crate::Hierarchy> {
        Some(crate::Hierarchy {
            nodes: self.nodes,
            per_node: self.per_node,
            fast: self.fast,
        })
    }
}

/// PreMulSum's local step on `buf` itself (an all-reduce's input is its output); the operator to
/// reduce with afterwards.
fn premul_in_place(dtype: DType, op: ReduceOp, buf: &mut [u8]) -> ReduceOp {
    match op {
        ReduceOp::PreMulSum(f) => {
            crate::reduce::scale_in_place(dtype, buf, f);
            ReduceOp::Sum
        }
        _ => op,
    }
}

/// MPI counts are C ints: a transfer of more bytes is refused (one message, no silent wrap).
fn mpi_bytes(op: &'static str, bytes: usize) -> Result<()> {
    if bytes > i32::MAX as usize {
        return Err(CommError::Invalid {
            op,
            msg: format!(
                "{bytes} bytes in one MPI transfer; at most {} fit MPI's count",
                i32::MAX
            ),
        });
    }
    Ok(())
}

/// Grouped point-to-point on `comm` (module docs): every transfer is posted, then all are
/// waited for. A receive that got fewer bytes than it expected is an error naming the peer (one
/// that would get more is MPI's truncation error, fatal to the job).
fn mpi_send_recv(comm: &SimpleCommunicator, ops: &mut [P2p<'_>]) -> Result<()> {
    let n = comm.size() as usize;
    for op in ops.iter() {
        args::peer("send_recv", op.peer(), n)?;
        mpi_bytes("send_recv", op.len())?;
    }
    let short = mpi::request::scope(|scope| {
        let reqs: Vec<_> = ops
            .iter_mut()
            .map(|op| match op {
                P2p::Send { buf, peer } => {
                    let to = comm.process_at_rank(*peer as i32);
                    (None, to.immediate_send(scope, *buf))
                }
                P2p::Recv { buf, peer } => {
                    let want = (buf.len(), *peer);
                    let from = comm.process_at_rank(*peer as i32);
                    (Some(want), from.immediate_receive_into(scope, &mut **buf))
                }
            })
            .collect();
        let mut short = None;
        for (want, req) in reqs {
            let status = req.wait();
            if let Some((len, peer)) = want {
                let got = status.count(u8::equivalent_datatype()) as usize;
                if got != len {
                    short.get_or_insert((peer, len, got));
                }
            }
        }
        short
    });
    match short {
        None => Ok(()),
        Some((peer, len, got)) => Err(CommError::Invalid {
            op: "send_recv",
            msg: format!(
                "a receive from rank {peer} expected {len} bytes but rank {peer} sent {got}"
            ),
        }),
    }
}

/// MPI_Comm_split of `comm` with the trait's semantics, as an [`MpiGroup`]. The trait's colors are u32 and keys i64,
/// MPI's both C ints: every rank's color and key are gathered first, each rank computes its new
/// number (key, then rank here) and the color's index, and passes those to MPI.
fn mpi_split(
    comm: &SimpleCommunicator,
    color: Option<u32>,
    key: i64,
) -> Result<Option<Box<dyn Communicator>>> {
    let (n, me) = (comm.size() as usize, comm.rank() as usize);
    let mine = [color.map_or(-1, i64::from), key];
    let mut all = vec![0i64; 2 * n];
    comm.all_gather_into(&mine[..], &mut all[..]);
    let Some(c) = color.map(i64::from) else {
        // Collective: the ranks that opt out take part too.
        let _ = comm.split_by_color(Color::undefined());
        return Ok(None);
    };
    let mut members: Vec<(i64, usize)> = (0..n)
        .filter(|&r| all[2 * r] == c)
        .map(|r| (all[2 * r + 1], r))
        .collect();
    members.sort_unstable();
    let new_rank = members.iter().position(|&(_, r)| r == me).unwrap_or(0);
    let mut colors: Vec<i64> = all
        .chunks_exact(2)
        .map(|p| p[0])
        .filter(|&c| c >= 0)
        .collect();
    colors.sort_unstable();
    colors.dedup();
    let index = colors.binary_search(&c).unwrap_or(0);
    comm.split_by_color_with_key(Color::with_value(index as i32), new_rank as i32)
        .map(|g| Some(Box::new(MpiGroup::new(g)) as Box<dyn Communicator>))
        .ok_or_else(|| {
            CommError::Setup(format!(
                "MPI_Comm_split gave rank {me} (color {c}) no communicator"
            ))
        })
}

/// A group made by [`HierComm::split`] (or by splitting a group): every operation moves data with
/// MPI on the group's communicator and reduces in group rank order itself (module docs).
pub struct MpiGroup {
    comm: SimpleCommunicator,
    rank: usize,
    world: usize,
    simd: Simd,
    stats: CommStats,
    /// Scratch for the gathered inputs, kept between calls.
    all: Vec<u8>,
}

// SAFETY: as for HierComm: MPI runs with MPI_THREAD_SERIALIZED, `&mut self` on every operation
// keeps two of this group's calls from running at once, and the handle is an owned value.
unsafe impl Send for MpiGroup {}

impl MpiGroup {
    fn new(comm: SimpleCommunicator) -> MpiGroup {
        MpiGroup {
            rank: comm.rank() as usize,
            world: comm.size() as usize,
            comm,
            simd: Simd::detect(),
            stats: CommStats::default(),
            all: Vec::new(),
        }
    }

    fn timed<T>(
        &mut self,
        kind: OpKind,
        bytes: usize,
        f: impl FnOnce(&mut Self) -> Result<T>,
    ) -> Result<T> {
        let t0 = Instant::now();
        let r = f(self)?;
        self.stats
            .record(kind, bytes, t0.elapsed().as_secs_f64(), 0.0);
        Ok(r)
    }
}

impl Communicator for MpiGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_reduce_raw(&mut self, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
        crate::types::check_reducible("all_reduce", dtype, op)?;
        args::elements("all_reduce", buf.len(), dtype, "the buffer")?;
        mpi_bytes("all_reduce", buf.len().saturating_mul(self.world))?;
        self.timed(OpKind::AllReduce, buf.len(), |g| {
            let op = premul_in_place(dtype, op, buf);
            if buf.is_empty() {
                return Ok(());
            }
            let mut all = std::mem::take(&mut g.all);
            all.resize(g.world * buf.len(), 0);
            g.comm.all_gather_into(&*buf, &mut all[..]);
            reduce_into(g.simd, dtype, op, buf, &pieces(&all, g.world));
            g.all = all;
            Ok(())
        })
    }
    fn all_gather_raw(&mut self, input: &[u8], output: &mut [u8], _dtype: DType) -> Result<()> {
        args::world_multiple(
            "all_gather",
            output.len(),
            "output",
            input.len(),
            "input",
            self.world,
        )?;
        mpi_bytes("all_gather", output.len())?;
        self.timed(OpKind::AllGather, output.len(), |g| {
            if !input.is_empty() {
                g.comm.all_gather_into(input, output);
            }
            Ok(())
        })
    }
    fn reduce_scatter_raw(
        &mut self,
        input: &[u8],
        output: &mut [u8],
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        crate::types::check_reducible("reduce_scatter", dtype, op)?;
        args::elements("reduce_scatter", output.len(), dtype, "the output")?;
        args::world_multiple(
            "reduce_scatter",
            input.len(),
            "input",
            output.len(),
            "output",
            self.world,
        )?;
        mpi_bytes("reduce_scatter", input.len())?;
        self.timed(OpKind::ReduceScatter, input.len(), |g| {
            let (input, op) = crate::reduce::premul_input(dtype, op, input);
            if output.is_empty() {
                return Ok(());
            }
            let mut all = std::mem::take(&mut g.all);
            all.resize(input.len(), 0);
            // Chunk `rank` of every rank's input, in rank order.
            g.comm.all_to_all_into(&input[..], &mut all[..]);
            reduce_into(g.simd, dtype, op, output, &pieces(&all, g.world));
            g.all = all;
            Ok(())
        })
    }
    fn broadcast_raw(&mut self, buf: &mut [u8], root: usize) -> Result<()> {
        args::root("broadcast", root, self.world)?;
        mpi_bytes("broadcast", buf.len())?;
        self.timed(OpKind::Broadcast, buf.len(), |g| {
            if !buf.is_empty() {
                g.comm.process_at_rank(root as i32).broadcast_into(buf);
            }
            Ok(())
        })
    }
    fn barrier(&mut self) -> Result<()> {
        self.timed(OpKind::Barrier, 0, |g| {
            g.comm.barrier();
            Ok(())
        })
    }
    fn send_recv_raw(&mut self, ops: &mut [P2p<'_>], _dtype: DType) -> Result<()> {
        let n = ops.iter().map(P2p::len).sum();
        self.timed(OpKind::SendRecv, n, |g| mpi_send_recv(&g.comm, ops))
    }
    fn split(&mut self, color: Option<u32>, key: i64) -> Result<Option<Box<dyn Communicator>>> {
        mpi_split(&self.comm, color, key)
    }
    fn stats(&self) -> CommStats {
        self.stats.clone()
    }
}
