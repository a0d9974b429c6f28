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
//! and no trailing barrier is needed. Waits spin for up to a millisecond while spinning pays off
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
//! Reductions always run in rank order 0..N-1 in f32 (see [`crate::reduce`]), so every rank gets
//! identical bits whatever the algorithm or chunking.

pub mod layout;
pub mod segment;
mod sys;

use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::{Acquire, Relaxed, SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::reduce::{reduce_raw, Simd};
use crate::stats::{CommStats, OpKind};
use crate::{CommError, Communicator, DType, ReduceOp, Result};
use layout::{Ctl, Layout, SlotHdr};
use segment::Mapping;
pub use segment::{JobSegment, SegmentOptions};

/// Environment variables a rank reads (besides RANK / WORLD_SIZE and the segment's).
pub const ENV_TIMEOUT: &str = "TPRUN_COMM_TIMEOUT_S";
pub const ENV_SPIN: &str = "TPRUN_COMM_SPIN_US";
pub const ENV_YIELDS: &str = "TPRUN_COMM_YIELDS";
pub const ENV_ONE_SHOT: &str = "TPRUN_COMM_ONESHOT_MAX";
pub const ENV_CHUNK: &str = "TPRUN_COMM_CHUNK_BYTES";

/// Default deadline of one wait. Dead peers are noticed much sooner (abort flag, pid check); this
/// only bounds a peer that is alive but never arrives.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Default busy-wait before sleeping, when every rank can have its own CPU. Long, because waking
/// a sleeping rank costs 5-20 us on an idle machine and milliseconds on a busy one, while ranks
/// doing equal work arrive within microseconds of each other. A waiter whose peer last ran on the
/// waiter's own CPU skips it: the peer cannot run while we spin.
pub const DEFAULT_SPIN: Duration = Duration::from_millis(1);
/// After a spin that failed, the next budget is halved (down to this); a success doubles it back
/// up to the configured spin. Covers peers the CPU check misses (e.g. just woken onto our CPU).
const SPIN_FLOOR: Duration = Duration::from_micros(10);
/// How often a sleeping waiter re-checks that the peer's process still exists.
const LIVENESS_PERIOD: Duration = Duration::from_millis(100);

/// How a rank waits and which algorithm it picks. Must be the same on every rank
/// (`one_shot_max` decides the number of steps).
#[derive(Clone, Debug)]
pub struct CommOptions {
    /// Deadline of each wait for a peer.
    pub timeout: Duration,
    /// Busy-wait this long before sleeping (0 when ranks outnumber CPUs).
    pub spin: Duration,
    /// sched_yield this many times between spinning and sleeping.
    pub yields: u32,
    /// All-reduces up to this many bytes use the one-shot algorithm.
    pub one_shot_max: usize,
    /// All-reduces are pipelined in chunks of at most this many bytes (and at most one slot).
    /// Measured on Zen 4: 1 MiB beats 256 KiB (peers then read our lines from the L3 victim cache
    /// instead of snooping our L2) and per-step costs stay amortised.
    pub chunk_bytes: usize,
}

impl CommOptions {
    /// Defaults for `world` ranks on this host.
    pub fn for_world(world: usize) -> CommOptions {
        let oversubscribed = world > sys::online_cpus();
        CommOptions {
            timeout: DEFAULT_TIMEOUT,
            spin: if oversubscribed {
                Duration::ZERO
            } else {
                DEFAULT_SPIN
            },
            yields: 0,
            one_shot_max: if world <= 2 {
                1 << 20
            } else if world <= 4 {
                256 << 10
            } else {
                64 << 10
            },
            chunk_bytes: 1 << 20,
        }
    }

    /// Defaults overridden by `TPRUN_COMM_TIMEOUT_S`, `TPRUN_COMM_SPIN_US`, `TPRUN_COMM_YIELDS`
    /// and `TPRUN_COMM_ONESHOT_MAX`.
    pub fn from_env(world: usize) -> Result<CommOptions> {
        let mut o = CommOptions::for_world(world);
        let bad =
            |var: &str, v: &str, want: &str| CommError::Setup(format!("{var}={v} is not {want}"));
        if let Ok(v) = std::env::var(ENV_TIMEOUT) {
            let s: f64 = v
                .trim()
                .parse()
                .map_err(|_| bad(ENV_TIMEOUT, &v, "a number of seconds"))?;
            if !(s > 0.0 && s.is_finite()) {
                return Err(bad(ENV_TIMEOUT, &v, "a positive number of seconds"));
            }
            o.timeout = Duration::from_secs_f64(s);
        }
        if let Ok(v) = std::env::var(ENV_SPIN) {
            let us: u64 = v
                .trim()
                .parse()
                .map_err(|_| bad(ENV_SPIN, &v, "whole microseconds"))?;
            o.spin = Duration::from_micros(us);
        }
        if let Ok(v) = std::env::var(ENV_YIELDS) {
            o.yields = v
                .trim()
                .parse()
                .map_err(|_| bad(ENV_YIELDS, &v, "a count"))?;
        }
        if let Ok(v) = std::env::var(ENV_ONE_SHOT) {
            o.one_shot_max = crate::units::parse_size(&v)
                .map_err(|e| bad(ENV_ONE_SHOT, &v, &format!("a size ({e})")))?
                as usize;
        }
        if let Ok(v) = std::env::var(ENV_CHUNK) {
            o.chunk_bytes = crate::units::parse_size(&v)
                .map_err(|e| bad(ENV_CHUNK, &v, &format!("a size ({e})")))?
                as usize;
        }
        Ok(o)
    }
}

/// What a step carries; peers must agree on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Desc {
    kind: OpKind,
    /// DType index, or 0xFF for untyped (broadcast, barrier).
    dtype: u8,
    redop: u8,
    root: u32,
    bytes: u64,
}

impl Desc {
    fn new(
        kind: OpKind,
        dtype: Option<DType>,
        redop: Option<ReduceOp>,
        root: usize,
        bytes: usize,
    ) -> Desc {
        Desc {
            kind,
            dtype: dtype.map_or(0xFF, |d| d as u8),
            redop: redop.map_or(0xFF, |o| o as u8),
            root: root as u32,
            bytes: bytes as u64,
        }
    }
    fn code(&self) -> u32 {
        self.kind.index() as u32 | (self.dtype as u32) << 8 | (self.redop as u32) << 16
    }
    fn describe(code: u32, root: u32, bytes: u64) -> String {
        let kind = OpKind::ALL
            .get((code & 0xFF) as usize)
            .map_or("?", |k| k.name());
        let dtype = match (code >> 8) & 0xFF {
            0 => " float",
            1 => " bfloat16",
            2 => " half",
            _ => "",
        };
        let redop = match (code >> 16) & 0xFF {
            0 => " sum",
            1 => " max",
            _ => "",
        };
        let root = if code & 0xFF == OpKind::Broadcast.index() as u32 {
            format!(" root {root}")
        } else {
            String::new()
        };
        format!("{kind}({bytes} bytes{dtype}{redop}{root})")
    }
}

/// Splits `m` elements into `n` slices on 64-byte boundaries; slice `k` is `[lo, hi)`.
fn slice_bounds(m: usize, n: usize, k: usize, elem: usize) -> (usize, usize) {
    let unit = (64 / elem).max(1);
    let units = m.div_ceil(unit);
    let lo = (k * units / n * unit).min(m);
    let hi = ((k + 1) * units / n * unit).min(m);
    (lo, hi)
}

/// Wrapping "has `v` reached `target`" for u32 step counters.
#[inline(always)]
fn reached(v: u32, target: u32) -> bool {
    v.wrapping_sub(target) as i32 >= 0
}

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
    /// A broadcast step this rank sent as root; its peers' headers are checked at the next step.
    unverified: Option<(u64, Desc)>,
    srcs: Vec<*const u8>,
    release_taken: bool,
    /// Current spin budget (adapted between SPIN_FLOOR and `opts.spin`).
    spin_budget: Duration,
}

// SAFETY: the raw pointers in `srcs` are scratch space pointing into the mapping that `map` (an
// Arc) keeps alive; nothing in ShmComm is tied to the creating thread.
unsafe impl Send for ShmComm {}

impl ShmComm {
    /// `n` communicators over one anonymous memfd, for ranks that are threads of this process.
    pub fn new_group(n: usize) -> Result<Vec<ShmComm>> {
        ShmComm::new_group_with(n, &SegmentOptions::default(), &CommOptions::for_world(n))
    }

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
        }
        let spin_budget = opts.spin;
        let step = map.ctl(&lay, rank).seq.load(SeqCst) as u64;
        let known = (0..world)
            .map(|p| map.ctl(&lay, p).seq.load(SeqCst))
            .collect();
        Ok(ShmComm {
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
            unverified: None,
            srcs: vec![std::ptr::null(); world],
            release_taken: false,
            spin_budget,
        })
    }

    /// Bytes per data half of this job's segment.
    pub fn slot_bytes(&self) -> usize {
        self.lay.slot
    }

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
        let t0 = Instant::now();
        let trace_start = crate::trace::enabled().then(crate::trace::now_us);
        let step0 = self.step;
        self.wait_s = 0.0;
        let a = self.map.header().abort.load(Relaxed);
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
        match &res {
            Ok(()) => {
                self.stats
                    .record(kind, bytes, t0.elapsed().as_secs_f64(), self.wait_s);
                if let Some(start) = trace_start {
                    self.trace(start, kind, bytes, dtype, self.step - step0);
                }
            }
            // Bad arguments are caught before any step, so the communicator stays usable.
            Err(CommError::Invalid { .. }) => {}
            Err(e) => self.failed = Some(e.to_string()),
        }
        res
    }

    /// Records a finished call in the trace (only called with tracing on).
    #[cold]
    fn trace(&self, start_us: f64, kind: OpKind, bytes: usize, dtype: Option<DType>, steps: u64) {
        let algorithm = match kind {
            _ if self.world == 1 => "local",
            OpKind::AllReduce if bytes <= self.opts.one_shot_max => "one_shot",
            OpKind::AllReduce => "reduce_scatter+all_gather",
            OpKind::AllGather => "copy_out",
            OpKind::ReduceScatter => "direct",
            OpKind::Broadcast => "copy_out",
            OpKind::Barrier => "flags",
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
            },
        );
    }

    /// Steps 1-2 of the protocol: make sure our half `s % 2` is free, then describe it.
    fn begin_step(&mut self, desc: &Desc) -> Result<(u64, usize)> {
        let s = self.step;
        for p in 0..self.world {
            if p != self.rank {
                self.wait_seq(p, s as u32)?;
            }
        }
        if let Some((us, ud)) = self.unverified.take() {
            for p in 0..self.world {
                if p != self.rank {
                    self.check_hdr(p, (us % 2) as usize, us, &ud)?;
                }
            }
        }
        let half = (s % 2) as usize;
        let h = self.slot_hdr(self.rank, half);
        h.step.store(s, Relaxed);
        h.op_seq.store(self.op_seq, Relaxed);
        h.bytes.store(desc.bytes, Relaxed);
        h.code.store(desc.code(), Relaxed);
        h.root.store(desc.root, Relaxed);
        Ok((s, half))
    }

    /// Step 3: publish, waking sleepers only if there are any.
    #[inline]
    fn publish(&mut self) {
        self.step += 1;
        let c = self.map.ctl(&self.lay, self.rank);
        c.cpu.store(sys::current_cpu(), Relaxed);
        // SeqCst store + SeqCst load of `waiters` pairs with the waiter's increment + re-check,
        // so either we see the sleeper or it sees the new value.
        c.seq.store(self.step as u32, SeqCst);
        if c.waiters.load(SeqCst) != 0 {
            sys::futex_wake_all(&c.seq);
        }
    }

    /// Checks that peer `p`'s half holds step `s` of the same operation.
    fn check_hdr(&self, p: usize, half: usize, s: u64, desc: &Desc) -> Result<()> {
        let h = self.slot_hdr(p, half);
        let step = h.step.load(Relaxed);
        let code = h.code.load(Relaxed);
        let bytes = h.bytes.load(Relaxed);
        let root = h.root.load(Relaxed);
        if step == s && code == desc.code() && bytes == desc.bytes && root == desc.root {
            return Ok(());
        }
        let mine = Desc::describe(desc.code(), desc.root, desc.bytes);
        let theirs = Desc::describe(code, root, bytes);
        let msg = if step != s {
            format!(
                "rank {p} is at step {step} but rank {} at step {s} (this rank called {mine}; rank {p}'s last was {theirs}): the ranks made different sequences of collective calls",
                self.rank
            )
        } else {
            format!(
                "rank {} called {mine} but rank {p} called {theirs} (call #{} there)",
                self.rank,
                h.op_seq.load(Relaxed)
            )
        };
        Err(CommError::Mismatch {
            op: self.op_name(),
            seq: self.op_seq,
            msg,
        })
    }

    /// Waits until peer `p` has published `target` steps.
    #[inline]
    fn wait_seq(&mut self, p: usize, target: u32) -> Result<()> {
        if reached(self.known[p], target) {
            return Ok(());
        }
        let v = self.ctl(p).seq.load(Acquire);
        if reached(v, target) {
            self.known[p] = v;
            return Ok(());
        }
        self.wait_slow(p, target)
    }

    #[cold]
    #[inline(never)]
    fn wait_slow(&mut self, p: usize, target: u32) -> Result<()> {
        let start = Instant::now();
        let map = self.map.clone();
        let ctl = map.ctl(&self.lay, p);
        let header = map.header();
        let done = |me: &mut ShmComm, v: u32| {
            me.known[p] = v;
            me.wait_s += start.elapsed().as_secs_f64();
            Ok(())
        };
        // Spinning only helps if the peer can run meanwhile: not if it last ran on our CPU.
        let peer_cpu = ctl.cpu.load(Relaxed);
        let budget = if peer_cpu != 0 && peer_cpu == sys::current_cpu() {
            Duration::ZERO
        } else {
            self.spin_budget
        };
        if !budget.is_zero() {
            let mut i = 0u32;
            loop {
                // A few pauses between loads: the load hits L1 until the peer writes the line.
                for _ in 0..4 {
                    std::hint::spin_loop();
                }
                let v = ctl.seq.load(Acquire);
                if reached(v, target) {
                    self.spin_budget = (self.spin_budget * 2).min(self.opts.spin);
                    return done(self, v);
                }
                i += 1;
                if i.is_multiple_of(32) && start.elapsed() >= budget {
                    break;
                }
            }
            self.spin_budget = (self.spin_budget / 2).max(SPIN_FLOOR.min(self.opts.spin));
        }
        for _ in 0..self.opts.yields {
            std::thread::yield_now();
            let v = ctl.seq.load(Acquire);
            if reached(v, target) {
                return done(self, v);
            }
        }
        let deadline = start + self.opts.timeout;
        let mut next_liveness = start + LIVENESS_PERIOD;
        loop {
            let a = header.abort.load(SeqCst);
            if a != 0 {
                return Err(CommError::Aborted {
                    op: self.op_name(),
                    seq: self.op_seq,
                    failed: a as usize - 1,
                    missing: p,
                });
            }
            let now = Instant::now();
            if ctl.gone.load(SeqCst) != 0 {
                // The peer may have published this step just before it left: its seq store
                // happens before its `gone` store, so this load sees it.
                let v = ctl.seq.load(Acquire);
                if reached(v, target) {
                    return done(self, v);
                }
                return Err(CommError::PeerDied {
                    op: self.op_name(),
                    seq: self.op_seq,
                    missing: p,
                    how: "left the job (dropped its communicator)".into(),
                });
            }
            if now >= next_liveness {
                next_liveness = now + LIVENESS_PERIOD;
                let pid = ctl.pid.load(SeqCst);
                if ctl.pidns.load(SeqCst) == sys::pid_namespace() && !sys::pid_alive(pid) {
                    let v = ctl.seq.load(Acquire);
                    if reached(v, target) {
                        return done(self, v);
                    }
                    return Err(CommError::PeerDied {
                        op: self.op_name(),
                        seq: self.op_seq,
                        missing: p,
                        how: format!("died (process {pid} is gone)"),
                    });
                }
            }
            if now >= deadline {
                return Err(CommError::Timeout {
                    op: self.op_name(),
                    seq: self.op_seq,
                    missing: p,
                    waited_s: (now - start).as_secs_f64(),
                });
            }
            ctl.waiters.fetch_add(1, SeqCst);
            let v = ctl.seq.load(SeqCst);
            if !reached(v, target) {
                let slice = (deadline - now).min(LIVENESS_PERIOD);
                sys::futex_wait(&ctl.seq, v, slice);
            }
            ctl.waiters.fetch_sub(1, SeqCst);
            let v = ctl.seq.load(Acquire);
            if reached(v, target) {
                return done(self, v);
            }
        }
    }

    /// Step 4 for collectives that read every peer: wait for each, check its header.
    fn wait_all(&mut self, s: u64, half: usize, desc: &Desc) -> Result<()> {
        for p in 0..self.world {
            if p != self.rank {
                self.wait_seq(p, (s + 1) as u32)?;
                self.check_hdr(p, half, s, desc)?;
            }
        }
        Ok(())
    }

    fn check_len(&self, len: usize, dtype: DType, what: &str) -> Result<usize> {
        if !len.is_multiple_of(dtype.size()) {
            return Err(self.invalid(format!(
                "{what} is {len} bytes, not a whole number of {} elements",
                dtype.name()
            )));
        }
        Ok(len / dtype.size())
    }

    fn all_reduce_impl(&mut self, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
        crate::types::check_reducible("all_reduce", dtype)?;
        let e = dtype.size();
        let count = self.check_len(buf.len(), dtype, "the buffer")?;
        if self.world == 1 || count == 0 {
            return Ok(());
        }
        let desc = Desc::new(OpKind::AllReduce, Some(dtype), Some(op), 0, buf.len());
        let unit = 64 / e;
        let chunk = (self.lay.slot.min(self.opts.chunk_bytes) / e / unit * unit).max(unit);
        let one_shot = buf.len() <= self.opts.one_shot_max;
        let base = buf.as_mut_ptr();
        let mut c0 = 0;
        while c0 < count {
            let m = chunk.min(count - c0);
            // SAFETY: c0 + m <= count, so the chunk is inside `buf`.
            let p = unsafe { base.add(c0 * e) };
            if one_shot {
                self.all_reduce_one_shot(p, m, dtype, op, &desc)?;
            } else {
                self.all_reduce_rs_ag(p, m, dtype, op, &desc)?;
            }
            c0 += m;
        }
        Ok(())
    }

    /// One step: copy in, wait for everyone, reduce all N slots in rank order into `buf`.
    fn all_reduce_one_shot(
        &mut self,
        buf: *mut u8,
        m: usize,
        dtype: DType,
        op: ReduceOp,
        desc: &Desc,
    ) -> Result<()> {
        let (s, h) = self.begin_step(desc)?;
        let me = self.rank;
        // SAFETY: `buf` holds m elements (caller); our half holds slot >= m * size bytes and no
        // peer reads it until we publish (begin_step waited for that).
        unsafe { std::ptr::copy_nonoverlapping(buf, self.data(me, h), m * dtype.size()) };
        self.publish();
        self.wait_all(s, h, desc)?;
        for p in 0..self.world {
            self.srcs[p] = if p == me { buf } else { self.data(p, h) };
        }
        // SAFETY: every source holds m elements: peers' halves were published for step s and stay
        // untouched until we publish step s + 2; dst == srcs[me] exactly, which reduce_raw allows.
        unsafe { reduce_raw(self.simd, dtype, op, buf, &self.srcs, m) };
        Ok(())
    }

    /// Two steps: reduce our 1/N of the chunk from every slot, then gather the others' slices.
    fn all_reduce_rs_ag(
        &mut self,
        buf: *mut u8,
        m: usize,
        dtype: DType,
        op: ReduceOp,
        desc: &Desc,
    ) -> Result<()> {
        let e = dtype.size();
        let me = self.rank;
        let (s, h) = self.begin_step(desc)?;
        // SAFETY: as in all_reduce_one_shot.
        unsafe { std::ptr::copy_nonoverlapping(buf, self.data(me, h), m * e) };
        self.publish();
        self.wait_all(s, h, desc)?;
        let (s2, h2) = self.begin_step(desc)?;
        let (lo, hi) = slice_bounds(m, self.world, me, e);
        if hi > lo {
            for p in 0..self.world {
                let src = if p == me { buf } else { self.data(p, h) };
                // SAFETY: lo < hi <= m, inside every chunk-sized source.
                self.srcs[p] = unsafe { src.add(lo * e) };
            }
            // SAFETY: sources as in all_reduce_one_shot; dst == srcs[me]. Our half h2 is free
            // (begin_step), and [lo, hi) fits in it.
            unsafe {
                let dst = buf.add(lo * e);
                reduce_raw(self.simd, dtype, op, dst, &self.srcs, hi - lo);
                std::ptr::copy_nonoverlapping(dst, self.data(me, h2).add(lo * e), (hi - lo) * e);
            }
        }
        self.publish();
        for k in 1..self.world {
            let p = (me + k) % self.world;
            self.wait_seq(p, (s2 + 1) as u32)?;
            self.check_hdr(p, h2, s2, desc)?;
            let (lo, hi) = slice_bounds(m, self.world, p, e);
            // SAFETY: peer p published its reduced [lo, hi) of step s2 in its half h2.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    self.data(p, h2).add(lo * e),
                    buf.add(lo * e),
                    (hi - lo) * e,
                )
            };
        }
        Ok(())
    }

    /// The gathered/scattered side must be `world` times the per-rank side.
    fn check_world_len(
        &self,
        big: &str,
        big_len: usize,
        small: &str,
        small_len: usize,
    ) -> Result<()> {
        if big_len != small_len * self.world {
            return Err(self.invalid(format!(
                "{big} is {big_len} bytes, expected world size {} x {small} {small_len} = {}",
                self.world,
                small_len * self.world
            )));
        }
        Ok(())
    }

    fn all_gather_impl(&mut self, input: &[u8], output: &mut [u8], dtype: DType) -> Result<()> {
        self.check_len(input.len(), dtype, "the input")?;
        let ib = input.len();
        self.check_world_len("output", output.len(), "input", ib)?;
        let me = self.rank;
        output[me * ib..(me + 1) * ib].copy_from_slice(input);
        if self.world == 1 || ib == 0 {
            return Ok(());
        }
        let desc = Desc::new(OpKind::AllGather, Some(dtype), None, 0, ib);
        let mut c0 = 0;
        while c0 < ib {
            let m = self.lay.slot.min(ib - c0);
            let (s, h) = self.begin_step(&desc)?;
            // SAFETY: [c0, c0+m) is inside `input`; our half is free and holds slot >= m bytes.
            unsafe { std::ptr::copy_nonoverlapping(input.as_ptr().add(c0), self.data(me, h), m) };
            self.publish();
            for k in 1..self.world {
                let p = (me + k) % self.world;
                self.wait_seq(p, (s + 1) as u32)?;
                self.check_hdr(p, h, s, &desc)?;
                let dst = &mut output[p * ib + c0..p * ib + c0 + m];
                // SAFETY: peer p published m bytes of step s in its half h.
                unsafe { std::ptr::copy_nonoverlapping(self.data(p, h), dst.as_mut_ptr(), m) };
            }
            c0 += m;
        }
        Ok(())
    }

    fn reduce_scatter_impl(
        &mut self,
        input: &[u8],
        output: &mut [u8],
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        crate::types::check_reducible("reduce_scatter", dtype)?;
        let e = dtype.size();
        let count = self.check_len(output.len(), dtype, "the output")?;
        let ob = output.len();
        self.check_world_len("input", input.len(), "output", ob)?;
        let me = self.rank;
        if self.world == 1 {
            output.copy_from_slice(input);
            return Ok(());
        }
        if count == 0 {
            return Ok(());
        }
        let desc = Desc::new(OpKind::ReduceScatter, Some(dtype), Some(op), 0, ob);
        let unit = 64 / e;
        let chunk = ((self.lay.slot / self.world / e) / unit * unit).max(1);
        let inp = input.as_ptr();
        let mut c0 = 0;
        while c0 < count {
            let m = chunk.min(count - c0);
            let (s, h) = self.begin_step(&desc)?;
            let mine = self.data(me, h);
            for q in 0..self.world {
                if q != me {
                    // SAFETY: segment q's [c0, c0+m) is inside `input`; slot piece q (m elements
                    // at q*m) fits because m <= slot / world / e.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            inp.add((q * count + c0) * e),
                            mine.add(q * m * e),
                            m * e,
                        )
                    };
                }
            }
            self.publish();
            self.wait_all(s, h, &desc)?;
            for p in 0..self.world {
                self.srcs[p] = if p == me {
                    // SAFETY: inside `input` (our own segment).
                    unsafe { inp.add((me * count + c0) * e) }
                } else {
                    // SAFETY: peer p's piece for us, published for step s.
                    unsafe { self.data(p, h).add(me * m * e) }
                };
            }
            // SAFETY: m elements in every source and in output[c0..]; output is a distinct &mut.
            unsafe {
                reduce_raw(
                    self.simd,
                    dtype,
                    op,
                    output.as_mut_ptr().add(c0 * e),
                    &self.srcs,
                    m,
                )
            };
            c0 += m;
        }
        Ok(())
    }

    fn broadcast_impl(&mut self, buf: &mut [u8], root: usize) -> Result<()> {
        if root >= self.world {
            return Err(self.invalid(format!(
                "root {root} out of range for world size {}",
                self.world
            )));
        }
        if self.world == 1 || buf.is_empty() {
            return Ok(());
        }
        let desc = Desc::new(OpKind::Broadcast, None, None, root, buf.len());
        let n = buf.len();
        let mut c0 = 0;
        while c0 < n {
            let m = self.lay.slot.min(n - c0);
            let (s, h) = self.begin_step(&desc)?;
            if self.rank == root {
                // SAFETY: [c0, c0+m) inside buf; our half is free.
                unsafe {
                    std::ptr::copy_nonoverlapping(buf.as_ptr().add(c0), self.data(root, h), m)
                };
                self.publish();
                self.unverified = Some((s, desc));
            } else {
                self.publish();
                self.wait_seq(root, (s + 1) as u32)?;
                self.check_hdr(root, h, s, &desc)?;
                // SAFETY: the root published m bytes of step s in its half h.
                unsafe {
                    std::ptr::copy_nonoverlapping(self.data(root, h), buf.as_mut_ptr().add(c0), m)
                };
            }
            c0 += m;
        }
        Ok(())
    }

    fn barrier_impl(&mut self) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        let desc = Desc::new(OpKind::Barrier, None, None, 0, 0);
        let (s, h) = self.begin_step(&desc)?;
        self.publish();
        self.wait_all(s, h, &desc)
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
            c.all_reduce_impl(buf, dtype, op)
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
    fn stats(&self) -> CommStats {
        self.stats.clone()
    }
}

impl Drop for ShmComm {
    fn drop(&mut self) {
        let c = self.map.ctl(&self.lay, self.rank);
        c.gone.store(1, SeqCst);
        sys::futex_wake_all(&c.seq);
        if self.release_taken {
            TAKEN.store(false, SeqCst);
        }
    }
}

fn env_usize(var: &str) -> anyhow::Result<Option<usize>> {
    match std::env::var(var) {
        Ok(v) => v
            .trim()
            .parse()
            .map(Some)
            .with_context(|| format!("{var}={v} is not a whole number")),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(e) => Err(anyhow::anyhow!("{var}: {e}")),
    }
}

/// This rank's communicator from the environment tprun sets; a [`crate::local::SoloComm`] when
/// WORLD_SIZE is unset or 1.
///
/// With `TPRUN_SHM_FD` (started by tprun) it maps the inherited segment; otherwise, with
/// WORLD_SIZE > 1 and a shared `TPRUN_RUN_ID` (or `MASTER_PORT`), it meets the other ranks
/// through a named segment in /dev/shm (or `TPRUN_SHM_DIR`) that exists only during start-up.
pub fn from_env() -> anyhow::Result<Box<dyn Communicator>> {
    let world = env_usize("WORLD_SIZE")?.unwrap_or(1);
    if world <= 1 {
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
    }
    let rank =
        env_usize("RANK")?.with_context(|| format!("WORLD_SIZE={world} but RANK is not set"))?;
    anyhow::ensure!(
        rank < world,
        "RANK={rank} is out of range for WORLD_SIZE={world}"
    );
    if let Some(local) = env_usize("LOCAL_WORLD_SIZE")? {
        anyhow::ensure!(
            local == world,
            "LOCAL_WORLD_SIZE={local} but WORLD_SIZE={world}: the shared-memory collectives need every rank on this host"
        );
    }
    let opts = CommOptions::from_env(world)?;
    anyhow::ensure!(
        !TAKEN.swap(true, SeqCst),
        "collectives::from_env() was already called in this process and its communicator is still alive"
    );
    let res = (|| -> anyhow::Result<ShmComm> {
        let (map, lay) = if let Ok(fd) = std::env::var(segment::ENV_FD) {
            segment::attach_fd(&fd, world)?
        } else {
            let key = match (std::env::var("TPRUN_RUN_ID"), std::env::var("MASTER_PORT")) {
                (Ok(id), _) if !id.is_empty() => id,
                (_, Ok(port)) if !port.is_empty() => format!("port{port}"),
                _ => anyhow::bail!(
                    "WORLD_SIZE={world} but no shared memory to meet in: start the ranks with tprun (TPRUN_SHM_FD), or give every rank the same TPRUN_RUN_ID or MASTER_PORT"
                ),
            };
            segment::attach_named(&key, world, rank, opts.timeout)?
        };
        let mut c = ShmComm::attach(map, lay, rank, opts)?;
        c.release_taken = true;
        Ok(c)
    })();
    if res.is_err() {
        TAKEN.store(false, SeqCst);
    }
    Ok(Box::new(res?))
}
