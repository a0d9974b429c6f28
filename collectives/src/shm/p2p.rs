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

use std::sync::atomic::Ordering::{Acquire, Relaxed, Release, SeqCst};
use std::time::Instant;

use super::layout::Layout;
use super::segment::Mapping;
use super::wait::{reached, LIVENESS_PERIOD};
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
        // Transfers per (peer, direction), in the order given: only the first unfinished one of
        // each queue is active, so both sides match messages in the same order.
        let mut queues: Vec<Vec<Xfer>> = (0..2 * w).map(|_| Vec::new()).collect();
        for (i, op) in ops.iter().enumerate() {
            let (peer, send) = match op {
                P2p::Send { peer, .. } => (*peer, true),
                P2p::Recv { peer, .. } => (*peer, false),
            };
            if peer != me {
                queues[2 * peer + send as usize].push(Xfer {
                    op: i,
                    peer,
                    send,
                    off: 0,
                    done: false,
                    posted: false,
                });
            }
        }
        queues.retain(|q| !q.is_empty());
        let mut heads = vec![0usize; queues.len()];
        let mut left: usize = queues.iter().map(Vec::len).sum();
        while left > 0 {
            // Read the bell before polling: anything published after the poll rings it later.
            let bell = self.ctl(me).bell.load(SeqCst);
            let mut moved = false;
            for (q, head) in queues.iter_mut().zip(heads.iter_mut()) {
                while let Some(x) = q.get_mut(*head) {
                    let did = self.advance(x, &mut ops[x.op])?;
                    moved |= did;
                    if x.done {
                        *head += 1;
                        left -= 1;
                    } else if !did {
                        break;
                    }
                }
            }
            if left > 0 && !moved {
                let waiting: Vec<usize> = queues
                    .iter()
                    .zip(&heads)
                    .filter_map(|(q, &h)| q.get(h).map(|x| x.peer))
                    .collect();
                self.wait_bell(bell, &waiting)?;
            }
        }
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
            if !reached(ch.acked.load(Acquire), c.wrapping_sub(1)) {
                return Ok(false);
            }
            let h = (c % 2) as usize;
            let direct = x.off == 0 && buf.len() >= self.opts.direct_min;
            let n = if direct {
                // Single copy: wait until the receiver posted this message's buffer, then
                // write straight into it (unless the kernel refuses: then through the halves).
                let posted = ch.posted_msg.load(Acquire);
                if posted != self.p2p.sent_msgs[p] + 1 {
                    return Ok(false);
                }
                let (addr, len) = (ch.posted_addr.load(Relaxed), ch.posted_len.load(Relaxed));
                if len == buf.len() as u64 && self.may_write(p) {
                    let pid = self.ctl(p).pid.load(Relaxed);
                    match sys::peer_write(pid, addr, buf) {
                        Ok(()) => buf.len(),
                        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                            self.check_alive(p)?;
                            return Err(self.p2p_copy_failed(p, e));
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
            ch.sent.store(c1, Release);
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
                ch.posted_msg.store(self.p2p.recvd_msgs[p] + 1, Release);
                if buf.len() >= self.opts.direct_min {
                    self.ring(p);
                }
            }
            let c = self.p2p.recvd[p];
            if !reached(ch.sent.load(Acquire), c.wrapping_add(1)) {
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
            ch.acked.store(c1, Release);
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

    fn p2p_copy_failed(&self, p: usize, e: std::io::Error) -> CommError {
        CommError::PeerDied {
            op: self.op_name(),
            seq: self.op_seq,
            missing: p,
            how: format!("could not be copied to directly ({e})"),
        }
    }

    /// Tells rank `r` something it may wait for was published.
    fn ring(&self, r: usize) {
        let c = self.ctl(r);
        c.bell.fetch_add(1, SeqCst);
        if c.bell_waiters.load(SeqCst) != 0 {
            sys::futex_wake_all(&c.bell);
        }
    }

    /// Waits until this rank's bell moves past `seen`: spins, yields, then sleeps in slices,
    /// checking between them the abort flag, the `waiting` peers' liveness and the deadline.
    fn wait_bell(&mut self, seen: u32, waiting: &[usize]) -> Result<()> {
        let start = Instant::now();
        let ctl = self.map.clone();
        let bell = &ctl.ctl(&self.lay, self.rank).bell;
        let moved = || bell.load(SeqCst) != seen;
        let spin = self.spin_budget;
        let mut i = 0u32;
        while !spin.is_zero() {
            std::hint::spin_loop();
            if moved() {
                self.wait_s += start.elapsed().as_secs_f64();
                return Ok(());
            }
            i += 1;
            if i.is_multiple_of(64) && start.elapsed() >= spin {
                break;
            }
        }
        for _ in 0..self.opts.yields {
            std::thread::yield_now();
            if moved() {
                self.wait_s += start.elapsed().as_secs_f64();
                return Ok(());
            }
        }
        let deadline = start + self.opts.timeout;
        let waiters = &ctl.ctl(&self.lay, self.rank).bell_waiters;
        loop {
            // A peer that published for us and then left rang the bell first.
            if let Err(e) = waiting.iter().try_for_each(|&p| self.check_alive(p)) {
                if moved() {
                    break;
                }
                return Err(e);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(CommError::Timeout {
                    op: self.op_name(),
                    seq: self.op_seq,
                    missing: waiting.first().copied().unwrap_or(self.rank),
                    waited_s: (now - start).as_secs_f64(),
                });
            }
            waiters.fetch_add(1, SeqCst);
            if !moved() {
                sys::futex_wait(bell, seen, (deadline - now).min(LIVENESS_PERIOD));
            }
            waiters.fetch_sub(1, SeqCst);
            if moved() {
                break;
            }
        }
        self.wait_s += start.elapsed().as_secs_f64();
        Ok(())
    }
}
