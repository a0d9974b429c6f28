//! The shared-memory transport: one segment per job (see [`layout`] for the bytes and
//! [`segment`] for how it is created and found), one [`ShmComm`] per rank.
//!
//! **Protocol.** Every rank counts *steps*; all ranks perform the same steps, because the number
//! of steps of a call depends only on (operation, bytes, world size). In step `s` a rank
//! 1. waits until every peer's `seq >= s` (the peer finished step `s - 2`, the last step that read
//!    the half this step overwrites; normally already known from the previous step),
//! 2. writes its slot header and data into its own half `s % 2`,
//! 3. publishes `seq = s + 1` (release, then a futex wake only if someone sleeps),
//! 4. waits for the peers it needs to reach `s + 1`, checks their slot headers (same operation,
//!    dtype and size) and reads their half `s % 2`.
//!
//! A peer that published `s + 1` has finished every read of step `s - 1`, so two halves are enough
//! and no trailing barrier is needed. Small steps (at most 2 KiB written per rank: world x the
//! operation's bytes) use a ring of 8 entries instead of the halves, waiting in step 1 only for
//! `seq >= s - 6`, so a root of small broadcasts, scatters or reduces runs up to 7 calls ahead
//! of its readers instead of one (see [`layout`]). Waits spin for up to a millisecond while spinning pays off
//! (never when there are more ranks than CPUs), then sleep on a shared futex; each wait has a
//! deadline and watches the launcher's abort flag, the peer's `gone` flag and (every 100 ms)
//! whether the peer's process still exists.
//!
//! **Algorithms** (chosen from bytes and N only, so every rank takes the same steps).
//! All-reduce up to `one_shot_max` bytes (1 MiB for 2 ranks, 256 KiB up to 4, 64 KiB above): per
//! chunk of at most `chunk_bytes` (1 MiB) one step: every rank copies in, then reduces all N slots.
//! Larger: per chunk, reduce-scatter (each rank reduces its 1/N of the chunk, 64-byte aligned
//! slices) then all-gather, two steps, so each rank reads ~2x the chunk instead of N x.
//! All-gather: one step per slot-sized chunk, each peer copied out as soon as it arrives.
//! Reduce-scatter: one step per chunk of `slot / N` bytes of every segment. Broadcast: one step per
//! slot-sized chunk; only non-roots wait (the root checks its peers at its next call).
//! Copy-only operations (all-gather, all-to-all; broadcast, gather and scatter up to
//! `direct_rooted_max`, from `direct_rooted_min`, 16 KiB) whose per-rank piece is at least `direct_min` (8 KiB) take the single-copy
//! path (`shm/direct.rs`) where the kernel lets the ranks copy between their address spaces: two
//! steps whatever the size, one copy instead of two. All-reduces above `one_shot_max` (up to
//! `direct_all_reduce_max`) take it too (three steps: each rank reduces its slice reading the
//! peers' inputs, then copies the others' reduced slices out of their outputs), and so do reduces
//! from `direct_reduce_min` (256 KiB; two steps: the non-roots write their reduced slices
//! straight into the root's buffer). Point-to-point
//! messages from `direct_min` bytes go the same way (`shm/p2p.rs`): the sender writes straight into
//! the buffer the receiver posted on the channel.
//! Reductions always run in rank order 0..N-1 in f32 (see [`crate::reduce`]), so every rank gets
//! identical bits whatever the algorithm or chunking.

mod algorithms;
mod direct;
pub mod flight;
pub mod layout;
mod options;
mod p2p;
mod protocol;
pub mod segment;
mod split;
mod sys;
mod wait;

use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::reduce::Simd;
use crate::stats::{CommStats, OpKind};
use crate::{CommError, Communicator, DType, ReduceOp, Result};
use layout::{Ctl, Layout, SlotHdr};
pub use options::{
    CommOptions, DEFAULT_DIRECT_MIN, DEFAULT_DIRECT_ROOTED_MIN, DEFAULT_SPIN, DEFAULT_TIMEOUT,
    ENV_CHUNK, ENV_DIRECT_MIN, ENV_ONE_SHOT, ENV_SPIN, ENV_TIMEOUT, ENV_YIELDS,
};
use protocol::Desc;
use segment::Mapping;
pub use segment::{JobSegment, SegmentOptions};

/// Only one live communicator per process may take the inherited segment (a second one would
/// share this rank's slots).
static TAKEN: AtomicBool = AtomicBool::new(false);

/// One rank's communicator over the shared-memory segment.
pub struct ShmComm {
    map: Arc<Mapping>,
    lay: Layout,
    rank: usize,
    world: usize,
    /// Steps this rank has published (the low 32 bits are its `seq`).
    step: u64,
    /// Last `seq` seen per peer (saves reloading a peer's line we already know is far enough).
    known: Vec<u32>,
    op_seq: u64,
    kind: OpKind,
    opts: CommOptions,
    simd: Simd,
    stats: CommStats,
    wait_s: f64,
    /// Set after an error: the protocol state is then unknown, so later calls fail fast.
    failed: Option<String>,
    /// Steps this rank sent as a root without waiting for its readers (step, what, place);
    /// their headers are checked at a later step ([`ShmComm::begin_step`]). At most RING.
    unverified: std::collections::VecDeque<(u64, Desc, usize)>,
    srcs: Vec<*const u8>,
    release_taken: bool,
    /// Current spin budget (adapted between SPIN_FLOOR and `opts.spin`).
    spin_budget: Duration,
    /// This communicator started the trace recording (`from_env` under `tprun --trace`) and
    /// hands the events to tprun when dropped.
    trace_owner: bool,
    /// The job's segment, whose `abort` flag the launcher sets: `map` itself for the world, the
    /// world's mapping for a group made by [`Communicator::split`].
    job: Arc<Mapping>,
    /// Which group this is: `None` for the world, else its name and its ranks' world ranks.
    group: Option<split::Group>,
    /// Point-to-point counters per peer: chunks this rank sent to it / received from it (the
    /// channels' `sent` / `acked` words) and messages sent to it.
    p2p: p2p::Counters,
    /// Whether every rank may copy straight from / into every other rank's memory (single-copy
    /// path): `None` until the first call that would use it agrees on it (see `direct_ok`).
    direct: Option<bool>,
    /// Per peer: whether this rank may write straight into its memory (point-to-point's
    /// single-copy path, decided per pair by [`ShmComm::probe`] the first time it matters).
    writable: Vec<Option<bool>>,
    /// The current call moved data on the single-copy path (for the trace's algorithm name).
    took_direct: bool,
    /// The job registry slot of this group (its rank 0 registers it), freed on drop.
    registered: Option<usize>,
    /// Scratch of the single-copy all-reduce, kept between calls.
    scratch: Vec<u8>,
    /// Publish small steps with plain stores; peers about to sleep fence us with membarrier
    /// ([`sys::light_publish`]). Not when ranks outnumber CPUs (no spin): there every wait
    /// sleeps, and a membarrier per sleep (an interrupt on every CPU running a rank) made small
    /// calls at 6 ranks on 2 CPUs about 3x slower. The rule depends only on the
    /// options every rank shares, so all ranks of a host agree on it.
    light: bool,
    /// The step being published is a small one (the ring's), which may publish light.
    small_step: bool,
}

// SAFETY: the raw pointers in `srcs` are scratch space pointing into the mapping that `map` (an
// Arc) keeps alive; nothing in ShmComm is tied to the creating thread.
unsafe impl Send for ShmComm {}

impl ShmComm {
    /// `n` communicators over one anonymous memfd, for ranks that are threads of this process.
    pub fn new_group(n: usize) -> Result<Vec<ShmComm>> {
        ShmComm::new_group_with(n, &SegmentOptions::default(), &CommOptions::for_world(n))
    }

    /// [`ShmComm::new_group`] with explicit segment and wait settings (tests that tune them).
    pub fn new_group_with(
        n: usize,
        seg: &SegmentOptions,
        opts: &CommOptions,
    ) -> Result<Vec<ShmComm>> {
        JobSegment::create_with(n, seg)?.communicators(opts)
    }

    pub(crate) fn attach(
        map: Arc<Mapping>,
        lay: Layout,
        rank: usize,
        opts: CommOptions,
    ) -> Result<ShmComm> {
        let world = lay.world;
        if rank >= world {
            return Err(CommError::Setup(format!(
                "rank {rank} out of range for world size {world}"
            )));
        }
        let me = std::process::id();
        let ns = sys::pid_namespace();
        {
            let c = map.ctl(&lay, rank);
            let pid = c.pid.load(SeqCst);
            if pid != 0
                && pid != me
                && c.gone.load(SeqCst) == 0
                && c.pidns.load(SeqCst) == ns
                && sys::pid_alive(pid)
            {
                return Err(CommError::Setup(format!(
                    "rank {rank} is already attached by process {pid}"
                )));
            }
            c.pid.store(me, SeqCst);
            c.pidns.store(ns, SeqCst);
            c.gone.store(0, SeqCst);
            c.base.store(map.base() as u64, SeqCst);
        }
        if opts.direct_min != usize::MAX {
            sys::allow_peer_access();
        }
        // Everything this rank writes: the control blocks, headers, flight recorders and rings
        // (all ranks', a few pages each), its own two halves and its own sending channels.
        map.populate_write(0, lay.data_off);
        map.warm(lay.ring_off, lay.data_off - lay.ring_off);
        map.populate_write(lay.data(rank, 0), 2 * lay.slot);
        if world > 1 {
            let chans = lay.chan_off / layout::PAGE * layout::PAGE;
            map.populate_write(chans, lay.pdata_off - chans);
            let sends = 2 * (world - 1) * lay.pslot;
            map.populate_write(lay.pdata_off + rank * sends, sends);
        }
        let spin_budget = opts.spin;
        let light = !opts.spin.is_zero() && sys::light_publish();
        let step = map.ctl(&lay, rank).seq.load(SeqCst) as u64;
        let known = (0..world)
            .map(|p| map.ctl(&lay, p).seq.load(SeqCst))
            .collect();
        let p2p = p2p::Counters::load(&map, &lay, rank);
        Ok(ShmComm {
            job: map.clone(),
            group: None,
            p2p,
            map,
            lay,
            rank,
            world,
            step,
            known,
            op_seq: 0,
            kind: OpKind::Barrier,
            opts,
            simd: Simd::detect(),
            stats: CommStats::default(),
            wait_s: 0.0,
            failed: None,
            unverified: std::collections::VecDeque::with_capacity(layout::RING + 1),
            srcs: vec![std::ptr::null(); world],
            release_taken: false,
            spin_budget,
            trace_owner: false,
            direct: None,
            writable: vec![None; world],
            took_direct: false,
            registered: None,
            scratch: Vec::new(),
            light,
            small_step: false,
        })
    }

    /// Bytes per data half of this job's segment.
    pub fn slot_bytes(&self) -> usize {
        self.lay.slot
    }

    /// The wait and algorithm settings this rank runs with.
    pub fn options(&self) -> &CommOptions {
        &self.opts
    }

    fn ctl(&self, r: usize) -> &Ctl {
        self.map.ctl(&self.lay, r)
    }

    fn slot_hdr(&self, r: usize, half: usize) -> &SlotHdr {
        self.map.slot_hdr(&self.lay, r, half)
    }

    fn data(&self, r: usize, half: usize) -> *mut u8 {
        self.map.data(&self.lay, r, half)
    }

    fn op_name(&self) -> &'static str {
        self.kind.name()
    }

    fn invalid(&self, msg: String) -> CommError {
        CommError::Invalid {
            op: self.kind.name(),
            msg,
        }
    }

    /// Runs one collective: bookkeeping, abort check, stats, and poisoning on error.
    fn run_op(
        &mut self,
        kind: OpKind,
        bytes: usize,
        dtype: Option<DType>,
        f: impl FnOnce(&mut ShmComm) -> Result<()>,
    ) -> Result<()> {
        self.kind = kind;
        self.op_seq += 1;
        if let Some(first) = &self.failed {
            return Err(CommError::Invalid {
                op: kind.name(),
                msg: format!("this communicator failed earlier ({first}) and cannot be used again"),
            });
        }
        // One clock read serves the statistics, the trace and the flight recorder.
        let t0 = flight::now_ns();
        let trace_start = crate::trace::enabled().then_some(t0 as f64 / 1e3);
        let fr = self.map.flight(&self.lay, self.rank);
        flight::enter(fr, self.op_seq, kind, dtype, bytes, t0);
        let step0 = self.step;
        self.wait_s = 0.0;
        self.took_direct = false;
        let a = self.aborted_by();
        let res = if a != 0 {
            Err(CommError::Aborted {
                op: kind.name(),
                seq: self.op_seq,
                failed: a as usize - 1,
                missing: a as usize - 1,
            })
        } else {
            f(self)
        };
        let t1 = flight::now_ns();
        flight::exit(self.map.flight(&self.lay, self.rank), self.op_seq, t1);
        match &res {
            Ok(()) => {
                let secs = t1.saturating_sub(t0) as f64 / 1e9;
                self.stats.record(kind, bytes, secs, self.wait_s);
                if let Some(start) = trace_start {
                    self.trace(start, kind, bytes, dtype, self.step - step0);
                }
            }
            // Bad arguments are caught before any step, so the communicator stays usable.
            Err(CommError::Invalid { .. }) => {}
            Err(e) => self.failed = Some(e.to_string()),
        }
        match (res, &self.group) {
            (Err(e), Some(g)) if !matches!(e, CommError::Invalid { .. }) => Err(g.name_error(e)),
            (res, _) => res,
        }
    }

    /// The launcher's abort word (failed rank + 1, 0 while the job runs): the job segment's, or
    /// this group segment's if someone set that.
    pub(super) fn aborted_by(&self) -> u32 {
        let a = self.job.header().abort.load(Relaxed);
        if a != 0 {
            return a;
        }
        self.map.header().abort.load(Relaxed)
    }

    /// Records a finished call in the trace (only called with tracing on).
    #[cold]
    fn trace(&self, start_us: f64, kind: OpKind, bytes: usize, dtype: Option<DType>, steps: u64) {
        let algorithm = match kind {
            _ if self.world == 1 => "local",
            _ if self.took_direct => "single_copy",
            OpKind::AllReduce if bytes <= self.opts.one_shot_max => "one_shot",
            OpKind::AllReduce => "reduce_scatter+all_gather",
            OpKind::AllGather => "copy_out",
            OpKind::ReduceScatter => "direct",
            OpKind::Broadcast => "copy_out",
            OpKind::Barrier => "flags",
            OpKind::Reduce if bytes <= self.opts.one_shot_max => "one_shot",
            OpKind::Reduce => "reduce_scatter+gather",
            OpKind::Gather | OpKind::Scatter | OpKind::AllToAll => "direct",
            OpKind::SendRecv => "channels",
        };
        crate::trace::record_comm(
            start_us,
            crate::trace::CommEvent {
                op: kind,
                bytes: bytes as u64,
                dtype,
                algorithm,
                steps,
                wait_s: self.wait_s,
                group: self.group.as_ref().map(|g| g.name.clone()),
            },
        );
    }
}

impl Communicator for ShmComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_reduce_raw(&mut self, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
        let n = buf.len();
        self.run_op(OpKind::AllReduce, n, Some(dtype), |c| {
            c.all_reduce_impl(None, buf, dtype, op)
        })
    }
    fn all_reduce_into_raw(
        &mut self,
        input: &[u8],
        output: &mut [u8],
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        let n = output.len();
        self.run_op(OpKind::AllReduce, n, Some(dtype), |c| {
            c.all_reduce_impl(Some(input), output, dtype, op)
        })
    }
    fn all_gather_raw(&mut self, input: &[u8], output: &mut [u8], dtype: DType) -> Result<()> {
        let n = output.len();
        self.run_op(OpKind::AllGather, n, Some(dtype), |c| {
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
        let n = input.len();
        self.run_op(OpKind::ReduceScatter, n, Some(dtype), |c| {
            c.reduce_scatter_impl(input, output, dtype, op)
        })
    }
    fn broadcast_raw(&mut self, buf: &mut [u8], root: usize) -> Result<()> {
        let n = buf.len();
        self.run_op(OpKind::Broadcast, n, None, |c| c.broadcast_impl(buf, root))
    }
    fn barrier(&mut self) -> Result<()> {
        self.run_op(OpKind::Barrier, 0, None, |c| c.barrier_impl())
    }
    fn reduce_raw(
        &mut self,
        buf: &mut [u8],
        dtype: DType,
        op: ReduceOp,
        root: usize,
    ) -> Result<()> {
        let n = buf.len();
        self.run_op(OpKind::Reduce, n, Some(dtype), |c| {
            c.reduce_impl(buf, dtype, op, root)
        })
    }
    fn gather_raw(
        &mut self,
        input: &[u8],
        output: &mut [u8],
        dtype: DType,
        root: usize,
    ) -> Result<()> {
        let n = input.len() * self.world;
        self.run_op(OpKind::Gather, n, Some(dtype), |c| {
            c.gather_impl(input, output, dtype, root)
        })
    }
    fn scatter_raw(
        &mut self,
        input: &[u8],
        output: &mut [u8],
        dtype: DType,
        root: usize,
    ) -> Result<()> {
        let n = output.len() * self.world;
        self.run_op(OpKind::Scatter, n, Some(dtype), |c| {
            c.scatter_impl(input, output, dtype, root)
        })
    }
    fn all_to_all_raw(&mut self, input: &[u8], output: &mut [u8], dtype: DType) -> Result<()> {
        let n = input.len();
        self.run_op(OpKind::AllToAll, n, Some(dtype), |c| {
            c.all_to_all_impl(input, output, dtype)
        })
    }
    fn all_to_allv_raw(
        &mut self,
        input: &[u8],
        send_counts: &[usize],
        output: &mut [u8],
        recv_counts: &[usize],
        dtype: DType,
    ) -> Result<()> {
        let n = input.len();
        self.run_op(OpKind::AllToAll, n, Some(dtype), |c| {
            c.all_to_allv_impl(input, send_counts, output, recv_counts, dtype)
        })
    }
    fn send_recv_raw(&mut self, ops: &mut [crate::P2p<'_>], dtype: DType) -> Result<()> {
        let n = p2p::bytes(ops);
        self.run_op(OpKind::SendRecv, n, Some(dtype), |c| c.send_recv_impl(ops))
    }
    fn split(&mut self, color: Option<u32>, key: i64) -> Result<Option<Box<dyn Communicator>>> {
        Ok(self
            .split_impl(color, key)?
            .map(|c| Box::new(c) as Box<dyn Communicator>))
    }
    fn stats(&self) -> CommStats {
        self.stats.clone()
    }
}

impl Drop for ShmComm {
    fn drop(&mut self) {
        if self.trace_owner {
            // Nobody to tell from a destructor; tprun reports the rank's missing trace.
            let _ = crate::trace::finish_auto(self.rank);
        }
        if let Some(slot) = self.registered {
            flight::unregister_group(&self.job, slot);
        }
        let c = self.map.ctl(&self.lay, self.rank);
        c.gone.store(1, SeqCst);
        sys::futex_wake_all(&c.seq);
        if self.release_taken {
            TAKEN.store(false, SeqCst);
        }
    }
}

/// This rank's communicator from the launcher's environment; a [`crate::local::SoloComm`] when
/// no launcher variable is set or the world is one rank.
///
/// The identity comes from [`crate::identity`] (tprun/torchrun, Open MPI, PMI, Slurm, in that
/// order). With `TPRUN_SHM_FD` (started by tprun) it maps the inherited segment. Ranks on more
/// than one node (or `TPRUN_PRETEND_NODES`) get the hierarchical communicator of feature `mpi`.
/// Otherwise every rank must be on this host, and they meet through a named segment in /dev/shm
/// (or `TPRUN_SHM_DIR`) that exists only during start-up, keyed by a job id every rank shares:
/// `TPRUN_RUN_ID`, `MASTER_PORT`, Slurm's job and step id, Open MPI's job id or the PMIx namespace.
pub fn from_env() -> anyhow::Result<Box<dyn Communicator>> {
    let id = crate::identity::from_env().map_err(|e| anyhow::anyhow!(e))?;
    let Some(id) = id.filter(|id| id.world > 1) else {
        if let Ok(fd) = std::env::var(segment::ENV_FD) {
            if let Ok(fd) = fd.trim().parse::<i32>() {
                // Nothing this program starts needs the job's memory.
                let _ = nix::fcntl::fcntl(
                    fd,
                    nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
                );
            }
        }
        return Ok(Box::new(crate::local::SoloComm));
    };
    let (rank, world) = (id.rank, id.world);
    let inherited = std::env::var(segment::ENV_FD).ok();
    let many_nodes =
        id.local_world.is_some_and(|l| l < world) || std::env::var_os(ENV_PRETEND_NODES).is_some();
    if inherited.is_none() && many_nodes {
        return multi_node(&id);
    }
    if let Some(local) = id.local_world {
        anyhow::ensure!(
            local == world,
            "{}: {local} ranks on this host but {world} in the job: the shared-memory collectives need every rank on this host",
            id.source.name()
        );
    }
    let opts = CommOptions::from_env(world)?;
    anyhow::ensure!(
        !TAKEN.swap(true, SeqCst),
        "collectives::from_env() was already called in this process and its communicator is still alive"
    );
    let res = (|| -> anyhow::Result<ShmComm> {
        let (map, lay) = if let Some(fd) = inherited {
            segment::attach_fd(&fd, world)?
        } else {
            let key = job_key().with_context(|| format!(
                "WORLD_SIZE={world} but no shared memory to meet in: start the ranks with tprun (TPRUN_SHM_FD), or give every rank the same TPRUN_RUN_ID or MASTER_PORT"
            ))?;
            segment::attach_named(&key, world, rank, opts.timeout)?
        };
        let mut c = ShmComm::attach(map, lay, rank, opts)?;
        c.release_taken = true;
        c.trace_owner = crate::trace::start_from_env()?;
        Ok(c)
    })();
    if res.is_err() {
        TAKEN.store(false, SeqCst);
    }
    Ok(Box::new(res?))
}

/// `TPRUN_PRETEND_NODES=K`: split this host's ranks into K pretend nodes (feature `mpi`), so the
/// inter-node stage runs over MPI on one machine.
pub const ENV_PRETEND_NODES: &str = "TPRUN_PRETEND_NODES";

/// A name every rank of this job on this host agrees on without talking: the first of
/// `TPRUN_RUN_ID`, `MASTER_PORT`, `SLURM_JOB_ID.SLURM_STEP_ID`, `OMPI_MCA_ess_base_jobid`,
/// `PMIX_NAMESPACE` that is set.
pub(crate) fn job_key() -> Option<String> {
    let get = |v: &str| std::env::var(v).ok().filter(|s| !s.is_empty());
    if let Some(id) = get("TPRUN_RUN_ID") {
        return Some(id);
    }
    if let Some(port) = get("MASTER_PORT") {
        return Some(format!("port{port}"));
    }
    if let Some(job) = get("SLURM_JOB_ID") {
        let step = get("SLURM_STEP_ID").unwrap_or_default();
        return Some(format!("slurm{job}.{step}"));
    }
    let raw = get("OMPI_MCA_ess_base_jobid").or_else(|| get("PMIX_NAMESPACE"))?;
    // Only characters a file name can hold.
    Some(format!(
        "mpi{}",
        raw.replace(
            |c: char| !c.is_ascii_alphanumeric() && c != '-' && c != '.',
            "_"
        )
    ))
}

/// The node-local communicator of a multi-node job: local rank 0 creates the named segment
/// `key`, `barrier` (over MPI) lets the others open it only then, the last to map it unlinks it.
#[cfg(feature = "mpi")]
pub(crate) fn attach_node_local(
    key: &str,
    world: usize,
    rank: usize,
    barrier: &dyn Fn(),
) -> Result<ShmComm> {
    let opts = CommOptions::from_env(world).map_err(|e| CommError::Setup(format!("{e:#}")))?;
    if rank != 0 {
        barrier();
    }
    let (map, lay) = segment::attach_named(key, world, rank, opts.timeout)?;
    if rank == 0 {
        barrier();
    }
    let mut c = ShmComm::attach(map, lay, rank, opts)?;
    c.release_taken = true;
    Ok(c)
}

#[cfg(feature = "mpi")]
fn multi_node(id: &crate::identity::Identity) -> anyhow::Result<Box<dyn Communicator>> {
    anyhow::ensure!(
        !TAKEN.swap(true, SeqCst),
        "collectives::from_env() was already called in this process and its communicator is still alive"
    );
    let res = crate::hier::HierComm::from_env(id);
    if res.is_err() {
        TAKEN.store(false, SeqCst);
    }
    Ok(Box::new(res?))
}

#[cfg(not(feature = "mpi"))]
fn multi_node(id: &crate::identity::Identity) -> anyhow::Result<Box<dyn Communicator>> {
    anyhow::bail!(
        "{}: {} of the job's {} ranks run on this host (or {ENV_PRETEND_NODES} is set): ranks on more than one node need the hierarchical communicator, which this tprun was built without: rebuild with `cargo build --release --features mpi` (needs Open MPI and libclang) and start it with mpirun or srun",
        id.source.name(),
        id.local_world.map_or("some".to_string(), |l| l.to_string()),
        id.world
    )
}
