//! Steps 1-4 of the protocol described in the [module docs](super): claiming a half, publishing,
//! and checking that a peer's half holds the same step of the same operation.

use std::sync::atomic::compiler_fence;
use std::sync::atomic::Ordering::{Relaxed, Release, SeqCst};

use super::layout::RING;
use super::{sys, wait, ShmComm};
use crate::stats::OpKind;
use crate::{CommError, DType, ReduceOp, Result};

/// What a step carries; peers must agree on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Desc {
    kind: OpKind,
    /// DType index, or 0xFF for untyped (broadcast, barrier).
    dtype: u8,
    redop: u8,
    root: u32,
    bytes: u64,
}

impl Desc {
    pub(super) fn new(
        kind: OpKind,
        dtype: Option<DType>,
        redop: Option<ReduceOp>,
        root: usize,
        bytes: usize,
    ) -> Desc {
        Desc {
            kind,
            dtype: dtype.map_or(0xFF, |d| d as u8),
            redop: redop.map_or(0xFF, |o| o.code() as u8),
            root: root as u32,
            bytes: bytes as u64,
        }
    }
    pub(super) fn code(&self) -> u32 {
        self.kind.index() as u32 | (self.dtype as u32) << 8 | (self.redop as u32) << 16
    }
    fn describe(code: u32, root: u32, bytes: u64) -> String {
        let kind = OpKind::ALL
            .get((code & 0xFF) as usize)
            .map_or("?", |k| k.name());
        let dtype = DType::ALL
            .get(((code >> 8) & 0xFF) as usize)
            .map_or(String::new(), |d| format!(" {}", d.name()));
        let redop = ReduceOp::ALL
            .into_iter()
            .find(|o| o.code() == (code >> 16) & 0xFF)
            .map_or(String::new(), |o| format!(" {}", o.name()));
        let rooted = [
            OpKind::Broadcast,
            OpKind::Reduce,
            OpKind::Gather,
            OpKind::Scatter,
        ];
        let root = if rooted.iter().any(|k| code & 0xFF == k.index() as u32) {
            format!(" root {root}")
        } else {
            String::new()
        };
        format!("{kind}({bytes} bytes{dtype}{redop}{root})")
    }
}

impl ShmComm {
    /// Steps 1-2 of the protocol: make sure our place for step `s` is free, then describe it.
    /// A half (`s % 2`) is free once every peer has published step s - 1 (so has finished
    /// reading step s - 2); a ring entry (`s % RING`, small steps) once every peer has published
    /// step s - RING + 1.
    pub(super) fn begin_step(&mut self, desc: &Desc) -> Result<(u64, usize)> {
        let s = self.step;
        let h = self.lay.place_for(s, desc.bytes);
        let small = h >= 2;
        let mut target = if small {
            (s + 2).saturating_sub(RING as u64)
        } else {
            s
        };
        // A root's unverified half is rewritten by its readers at their next step on that half,
        // which this step may let them take: check it now (as before the ring existed). An
        // unverified ring header stays until they reach step us + 2 RING, which waits for our
        // step us + RING + 1; our step us + RING - 1 at the latest covers it.
        for &(us, _, uh) in &self.unverified {
            if uh < 2 {
                target = target.max(us + 1);
            }
        }
        for p in 0..self.world {
            if p != self.rank {
                self.wait_seq(p, target as u32)?;
            }
        }
        self.verify_settled()?;
        self.small_step = small;
        let hd = self.slot_hdr(self.rank, h);
        hd.step.store(s, Relaxed);
        hd.op_seq.store(self.op_seq, Relaxed);
        hd.bytes.store(desc.bytes, Relaxed);
        hd.code.store(desc.code(), Relaxed);
        hd.root.store(desc.root, Relaxed);
        hd.addr.store(0, Relaxed);
        Ok((s, h))
    }

    /// Checks the peers' headers of the unverified steps every peer is known to have published.
    #[inline]
    fn verify_settled(&mut self) -> Result<()> {
        while let Some(&(us, ud, uh)) = self.unverified.front() {
            let t = (us + 1) as u32;
            let me = self.rank;
            if !(0..self.world).all(|p| p == me || wait::reached(self.known[p], t)) {
                return Ok(());
            }
            self.unverified.pop_front();
            for p in 0..self.world {
                if p != me {
                    self.check_hdr(p, uh, us, &ud)?;
                }
            }
        }
        Ok(())
    }

    /// After a step whose readers this rank does not wait for (a root's broadcast or scatter
    /// step): their headers are checked at a later step, before they can be rewritten.
    pub(super) fn verify_later(&mut self, s: u64, h: usize, desc: Desc) {
        self.unverified.push_back((s, desc, h));
    }

    /// Step 3: publish, waking sleepers only if there are any.
    #[inline]
    pub(super) fn publish(&mut self) {
        self.step += 1;
        let c = self.map.ctl(&self.lay, self.rank);
        c.cpu.store(sys::current_cpu(), Relaxed);
        // Either we see a sleeper in `waiters` or it sees the new value in its re-check: by a
        // SeqCst store + SeqCst load paired with its increment + re-check, or, registered for
        // membarrier, by a plain store and load paired with its membarrier (sys::fence_peers).
        // Only small steps (the ring's) publish light: measured at 2 ranks, it made small
        // broadcasts 0.65-0.75x as long, but steps of 4-16 KiB on the halves, where every rank
        // publishes and then waits for the others, 1.1-1.2x as long as the full fence did.
        let waiters = if self.light && self.small_step {
            c.seq.store(self.step as u32, Release);
            compiler_fence(SeqCst);
            c.waiters.load(Relaxed)
        } else {
            c.seq.store(self.step as u32, SeqCst);
            c.waiters.load(SeqCst)
        };
        if waiters != 0 {
            sys::futex_wake_all(&c.seq);
        }
    }

    /// Step 4 for one peer: waits until peer `p` published step `s` (in its place `h`) and
    /// checks its header.
    #[inline]
    pub(super) fn wait_step(&mut self, p: usize, h: usize, s: u64, desc: &Desc) -> Result<()> {
        self.wait_seq(p, (s + 1) as u32)?;
        self.check_hdr(p, h, s, desc)
    }

    /// Checks that peer `p`'s half holds step `s` of the same operation.
    pub(super) fn check_hdr(&self, p: usize, half: usize, s: u64, desc: &Desc) -> Result<()> {
        let mut h = self.slot_hdr(p, half);
        if h.step.load(Relaxed) != s {
            // A peer that called an operation of another size may have put step s in the other
            // kind of place (a half instead of a ring entry, or back): describe that call.
            let other = self.slot_hdr(p, self.lay.other_place(s, half));
            if other.step.load(Relaxed) == s {
                h = other;
            }
        }
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

    /// Step 4 for collectives that read every peer: wait for each, check its header.
    pub(super) fn wait_all(&mut self, s: u64, half: usize, desc: &Desc) -> Result<()> {
        for p in 0..self.world {
            if p != self.rank {
                self.wait_step(p, half, s, desc)?;
            }
        }
        // Everyone published step s: earlier root steps can be checked now, not RING steps on.
        self.verify_settled()
    }
}
