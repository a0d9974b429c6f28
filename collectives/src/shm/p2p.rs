//! Point-to-point transfers over the segment's channels (see [`super::layout`]): one channel per
//! ordered pair of ranks, with two halves of `pslot` bytes, the step protocol's double buffer
//! for two ranks. A message of B bytes goes as max(1, ceil(B / pslot)) chunks; chunk c of a
//! channel uses half c % 2:
//! 1. the sender waits until the receiver acknowledged chunk c - 2 (`acked >= c - 1`), copies the
//!    chunk in, notes the message's number and size beside the half, publishes `sent = c + 1`
//!    (release) and rings the receiver's bell;
//! 2. the receiver waits for `sent >= c + 1`, checks the size is what it expects, copies the chunk
//!    out, publishes `acked = c + 1` and rings the sender's bell.
//!
//! A grouped call ([`crate::Communicator::send_recv_raw`]) keeps one transfer per (peer,
//! direction) active, in the order given, and advances whichever can move; when none can, it
//! waits on its own bell (rung by every peer that publishes anything for it), spinning first as
//! the collectives do, with the same deadline, abort flag and liveness checks. So a ring exchange
//! or a pairwise all-to-all cannot deadlock, whatever the sizes.

use std::sync::atomic::Ordering::{Relaxed, Release, SeqCst};
use std::time::Instant;

use super::layout::{Layout, RING_BYTES};
use super::segment::Mapping;
use super::wait::{reached, LIVENESS_PERIOD, QUICK_POLLS};
use super::{sys, ShmComm};
use crate::{args, CommError, P2p, Result};

/// This rank's side of every channel, per peer.
pub(super) struct Counters {
    /// Chunks sent to each peer (mirrors that channel's `sent`).
    sent: Vec<u32>,
    /// Chunks received from each peer (mirrors that channel's `acked`).
    recvd: Vec<u32>,
    /// Messages sent to / received from each peer (for error messages).
    sent_msgs: Vec<u64>,
    recvd_msgs: Vec<u64>,
    /// Scratch of a grouped call, kept between calls.
    xfers: Vec<Xfer>,
    last: Vec<usize>,
}

impl Counters {
    /// Picks up where an earlier communicator of this rank left the channels.
    pub(super) fn load(map: &Mapping, lay: &Layout, me: usize) -> Counters {
        let w = lay.world;
        let word = |s: usize, d: usize, sent: bool| {
            if s == d {
                0
            } else if sent {
                map.chan(lay, s, d).sent.load(SeqCst)
            } else {
                map.chan(lay, s, d).acked.load(SeqCst)
            }
        };
        Counters {
            sent: (0..w).map(|d| word(me, d, true)).collect(),
            recvd: (0..w).map(|s| word(s, me, false)).collect(),
            sent_msgs: vec![0; w],
            recvd_msgs: vec![0; w],
            xfers: Vec::new(),
            last: Vec::new(),
        }
    }
}

/// The bytes a grouped call moves, as its statistics count them: what this rank sends, or what
/// it receives where it only receives.
pub(super) fn bytes(ops: &[P2p<'_>]) -> usize {
    let (mut sent, mut recvd) = (0, 0);
    for op in ops {
        match op {
            P2p::Send { buf, .. } => sent += buf.len(),
            P2p::Recv { buf, .. } => recvd += buf.len(),
        }
    }
    if sent > 0 {
        sent
    } else {
        recvd
    }
}

/// One transfer of the call, with how far it got.
struct Xfer {
    op: usize,
    /// Index of the previous transfer with the same (peer, direction), `usize::MAX` if none.
    after: usize,
    peer: usize,
    send: bool,
    off: usize,
    done: bool,
    /// A receive: whether its buffer was posted on the channel yet.
    posted: bool,
}

impl ShmComm {
    pub(super) fn send_recv_impl(&mut self, ops: &mut [P2p<'_>]) -> Result<()> {
        let (me, w) = (self.rank, self.world);
        for op in ops.iter() {
            args::peer("send_recv", op.peer(), w)?;
        }
        self.self_transfers(ops)?;
        // The transfers in the order given, each after the previous one with the same (peer,
        // direction): only the first unfinished one of such a queue is active, so both sides
        // match messages in the same order. Scratch vectors are reused: no allocation per call.
        let mut xs = std::mem::take(&mut self.p2p.xfers);
        let mut last = std::mem::take(&mut self.p2p.last);
        xs.clear();
        last.clear();
        last.resize(2 * w, usize::MAX);
        for (i, op) in ops.iter().enumerate() {
            let (peer, send) = (op.peer(), matches!(op, P2p::Send { .. }));
            if peer != me {
                let q = &mut last[2 * peer + send as usize];
                xs.push(Xfer {
                    op: i,
                    peer,
                    send,
                    off: 0,
                    done: false,
                    posted: false,
                    after: *q,
                });
                *q = xs.len() - 1;
            }
        }
        let r = self.run_transfers(&mut xs, ops);
        self.p2p.xfers = xs;
        self.p2p.last = last;
        r
    }

    /// Advances every active transfer until all are done: polling the channels while the spin
    /// budget lasts, then yielding, then sleeping on this rank's bell (peers ring it only when
    /// someone sleeps), with the deadline, abort flag and liveness checks of every wait.
    fn run_transfers(&mut self, xs: &mut [Xfer], ops: &mut [P2p<'_>]) -> Result<()> {
        let mut left = xs.len();
        // While idle: when it began, polls since, yields since the spin ran out.
        let mut idle: Option<(Instant, u32, Option<u32>)> = None;
        // Polls without a move before `idle` starts: most small transfers move within a few,
        // and are then not timed (as the collectives' waits, shm/wait.rs `poll_briefly`).
        let mut quick = 0;
        while left > 0 {
            if self.poll(xs, ops, &mut left)? {
                if let Some((start, ..)) = idle.take() {
                    self.wait_s += start.elapsed().as_secs_f64();
                }
                quick = 0;
                continue;
            }
            if left == 0 {
                break;
            }
            let budget = self.spin_budget;
            if idle.is_none() && quick < QUICK_POLLS && !budget.is_zero() {
                quick += 1;
                std::hint::spin_loop();
                continue;
            }
            let (start, polls, yields) = idle.get_or_insert((Instant::now(), 0, None));
            let start = *start;
            *polls += 1;
            if yields.is_none() {
                if !budget.is_zero() && (!polls.is_multiple_of(64) || start.elapsed() < budget) {
                    std::hint::spin_loop();
                    continue;
                }
                *yields = Some(0);
            }
            if let Some(y) = yields.as_mut().filter(|y| **y < self.opts.yields) {
                *y += 1;
                std::thread::yield_now();
                continue;
            }
            self.sleep_on_bell(xs, ops, &mut left, start)?;
        }
        if let Some((start, ..)) = idle {
            self.wait_s += start.elapsed().as_secs_f64();
        }
        Ok(())
    }

    /// One pass over the active transfers, receives first; returns whether any moved. A
    /// receive posts its buffer before any of our sends blocks in a single-copy write, so in a
    /// ring both ranks' writes run at once instead of one after the other.
    fn poll(&mut self, xs: &mut [Xfer], ops: &mut [P2p<'_>], left: &mut usize) -> Result<bool> {
        let mut moved = false;
        let n = xs.len();
        for k in 0..2 * n {
            // Receives in the first n turns, sends in the next n.
            let i = k % n;
            if xs[i].send != (k >= n) {
                continue;
            }
            let after = xs[i].after;
            if xs[i].done || (after != usize::MAX && !xs[after].done) {
                continue;
            }
            let x = &mut xs[i];
            loop {
                let did = self.advance(x, &mut ops[x.op])?;
                moved |= did;
                if x.done {
                    *left -= 1;
                    break;
                }
                if !did {
                    break;
                }
            }
        }
        Ok(moved)
    }

    /// Sleeps on this rank's bell for at most a liveness period, announced as a sleeper first
    /// (and polling once more after that, so a peer that published before seeing us rang).
    fn sleep_on_bell(
        &mut self,
        xs: &mut [Xfer],
        ops: &mut [P2p<'_>],
        left: &mut usize,
        start: Instant,
    ) -> Result<()> {
        let map = self.map.clone();
        let c = map.ctl(&self.lay, self.rank);
        let seen = c.bell.load(SeqCst);
        c.bell_waiters.fetch_add(1, SeqCst);
        if self.light {
            sys::fence_peers();
        }
        let r = self.sleep_announced(xs, ops, left, start, &c.bell, seen);
        c.bell_waiters.fetch_sub(1, SeqCst);
        r
    }

    fn sleep_announced(
        &mut self,
        xs: &mut [Xfer],
        ops: &mut [P2p<'_>],
        left: &mut usize,
        start: Instant,
        bell: &std::sync::atomic::AtomicU32,
        seen: u32,
    ) -> Result<()> {
        if self.poll(xs, ops, left)? || *left == 0 {
            return Ok(());
        }
        let active = |xs: &[Xfer]| -> Vec<usize> {
            xs.iter()
                .filter(|x| !x.done && (x.after == usize::MAX || xs[x.after].done))
                .map(|x| x.peer)
                .collect()
        };
        // A peer that published for us and then left is not an error: poll once more first.
        if let Err(e) = active(xs).into_iter().try_for_each(|p| self.check_alive(p)) {
            return if self.poll(xs, ops, left)? {
                Ok(())
            } else {
                Err(e)
            };
        }
        let now = Instant::now();
        let deadline = start + self.opts.timeout;
        if now >= deadline {
            return Err(CommError::Timeout {
                op: self.op_name(),
                seq: self.op_seq,
                missing: active(xs).first().copied().unwrap_or(self.rank),
                waited_s: (now - start).as_secs_f64(),
            });
        }
        sys::futex_wait(bell, seen, (deadline - now).min(LIVENESS_PERIOD));
        Ok(())
    }

    /// Sends to and receives from this rank itself: matched in order, copied directly.
    fn self_transfers(&mut self, ops: &mut [P2p<'_>]) -> Result<()> {
        let me = self.rank;
        let sends: Vec<usize> = (0..ops.len())
            .filter(|&i| matches!(ops[i], P2p::Send { peer, .. } if peer == me))
            .collect();
        let recvs: Vec<usize> = (0..ops.len())
            .filter(|&i| matches!(ops[i], P2p::Recv { peer, .. } if peer == me))
            .collect();
        if sends.len() != recvs.len() {
            return Err(self.invalid(format!(
                "{} sends to and {} receives from rank {me} itself in one call: they must pair up",
                sends.len(),
                recvs.len()
            )));
        }
        for (&si, &ri) in sends.iter().zip(&recvs) {
            if ops[si].len() != ops[ri].len() {
                return Err(self.invalid(format!(
                    "rank {me} sends itself {} bytes but receives {}",
                    ops[si].len(),
                    ops[ri].len()
                )));
            }
        }
        for (&si, &ri) in sends.iter().zip(&recvs) {
            let src: Vec<u8> = match &ops[si] {
                P2p::Send { buf, .. } => buf.to_vec(),
                P2p::Recv { .. } => unreachable!(),
            };
            if let P2p::Recv { buf, .. } = &mut ops[ri] {
                buf.copy_from_slice(&src);
            }
        }
        Ok(())
    }

    /// Moves one chunk of `x` if its channel allows; returns whether it did.
    fn advance(&mut self, x: &mut Xfer, op: &mut P2p<'_>) -> Result<bool> {
        let (me, p, ps) = (self.rank, x.peer, self.lay.pslot);
        if x.send {
            let P2p::Send { buf, .. } = op else {
                unreachable!()
            };
            let map = self.map.clone();
            let ch = map.chan(&self.lay, me, p);
            let c = self.p2p.sent[p];
            // Half c % 2 is free once the receiver acknowledged chunk c - 2.
            if !reached(ch.acked.load(SeqCst), c.wrapping_sub(1)) {
                return Ok(false);
            }
            let h = (c % 2) as usize;
            let direct = x.off == 0 && buf.len() >= self.opts.direct_min;
            let n = if direct {
                // Single copy: wait until the receiver posted this message's buffer, then
                // write straight into it (unless the kernel refuses: then through the halves).
                let posted = ch.posted_msg.load(SeqCst);
                if posted != self.p2p.sent_msgs[p] + 1 {
                    return Ok(false);
                }
                let (addr, len) = (ch.posted_addr.load(Relaxed), ch.posted_len.load(Relaxed));
                if len == buf.len() as u64 && self.may_write(p) {
                    let pid = self.ctl(p).pid.load(Relaxed);
                    match sys::peer_write(pid, addr, buf) {
                        Ok(()) => {
                            self.took_direct = true;
                            buf.len()
                        }
                        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                            return Err(self.copy_failed(p, "to", e));
                        }
                        Err(_) => {
                            self.writable[p] = Some(false);
                            0
                        }
                    }
                } else {
                    0
                }
            } else {
                0
            };
            ch.direct[h].store((n > 0) as u32, Relaxed);
            let n = if n > 0 {
                n
            } else {
                let n = ps.min(buf.len() - x.off);
                // SAFETY: [off, off + n) is inside `buf`; the half holds pslot >= n bytes and the
                // receiver does not read it until we publish `sent = c + 1` below.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        buf.as_ptr().add(x.off),
                        self.map.pdata(&self.lay, me, p, h),
                        n,
                    )
                };
                n
            };
            if x.off == 0 {
                self.p2p.sent_msgs[p] += 1;
            }
            ch.msg[h].store(self.p2p.sent_msgs[p], Relaxed);
            ch.total[h].store(buf.len() as u64, Relaxed);
            let c1 = c.wrapping_add(1);
            self.announce(&ch.sent, c1, n);
            self.p2p.sent[p] = c1;
            self.ring(p);
            x.off += n;
            x.done = x.off >= buf.len();
        } else {
            let P2p::Recv { buf, .. } = op else {
                unreachable!()
            };
            let ch = self.map.chan(&self.lay, p, me);
            if !x.posted {
                // Tell the sender where this message goes, so a large one can be written
                // straight into `buf`; only a sender that will do that is woken for it.
                x.posted = true;
                ch.posted_addr.store(buf.as_mut_ptr() as u64, Relaxed);
                ch.posted_len.store(buf.len() as u64, Relaxed);
                let msg = self.p2p.recvd_msgs[p] + 1;
                if buf.len() >= self.opts.direct_min {
                    // A sender may sleep waiting for this post: fence, then ring.
                    ch.posted_msg.store(msg, SeqCst);
                    self.ring(p);
                } else {
                    // Nobody waits for it: no fence.
                    ch.posted_msg.store(msg, Release);
                }
            }
            let c = self.p2p.recvd[p];
            if !reached(ch.sent.load(SeqCst), c.wrapping_add(1)) {
                return Ok(false);
            }
            let h = (c % 2) as usize;
            let total = ch.total[h].load(Relaxed);
            if total != buf.len() as u64 {
                return Err(CommError::Mismatch {
                    op: self.op_name(),
                    seq: self.op_seq,
                    msg: format!(
                        "rank {p} sends {total} bytes (its message #{} to rank {me}) but rank {me} receives {} bytes",
                        ch.msg[h].load(Relaxed),
                        buf.len()
                    ),
                });
            }
            let n = if ch.direct[h].load(Relaxed) != 0 {
                // The sender wrote the whole message into `buf` already.
                buf.len()
            } else {
                let n = ps.min(buf.len() - x.off);
                // SAFETY: the sender published this chunk (acquire above) and leaves the half
                // alone until we acknowledge it; [off, off + n) is inside `buf`.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        self.map.pdata(&self.lay, p, me, h),
                        buf.as_mut_ptr().add(x.off),
                        n,
                    )
                };
                n
            };
            if x.off == 0 {
                self.p2p.recvd_msgs[p] += 1;
            }
            let c1 = c.wrapping_add(1);
            self.announce(&ch.acked, c1, n);
            self.p2p.recvd[p] = c1;
            self.ring(p);
            x.off += n;
            x.done = x.off >= buf.len();
        }
        Ok(true)
    }

    /// Whether this rank may write into peer `p`'s memory (probed once per peer).
    fn may_write(&mut self, p: usize) -> bool {
        if self.writable[p].is_none() {
            self.writable[p] = Some(self.probe(p));
        }
        self.writable[p] == Some(true)
    }

    /// Publishes a channel word (`sent` or `acked`) for a chunk of `n` bytes, which `ring` then
    /// announces: a SeqCst store, or a release store where this process publishes light and the
    /// chunk is small (as [`ShmComm::publish`] does for small steps).
    fn announce(&self, word: &std::sync::atomic::AtomicU32, v: u32, n: usize) {
        if self.light && n <= RING_BYTES {
            word.store(v, Release);
            std::sync::atomic::compiler_fence(SeqCst);
        } else {
            word.store(v, SeqCst);
        }
    }

    /// Tells rank `r` something it may wait for was published (by `announce`): either we see
    /// the sleeper or its poll after announcing itself (and fencing us, sys::fence_peers) sees
    /// our store.
    fn ring(&self, r: usize) {
        let c = self.ctl(r);
        let sleepers = if self.light {
            c.bell_waiters.load(Relaxed)
        } else {
            c.bell_waiters.load(SeqCst)
        };
        if sleepers != 0 {
            c.bell.fetch_add(1, SeqCst);
            sys::futex_wake_all(&c.bell);
        }
    }
}
