//! The single-copy path of the copy-only collectives: a rank publishes the address of its own
//! buffer in its step header and its peers copy straight from it (or into it) with Linux's
//! cross-memory attach (`process_vm_readv` / `process_vm_writev`), one copy instead of two
//! through the segment's halves. The steps, headers, waits and checks are the protocol's own
//! ([`super::protocol`]); only where the bytes go differs. Open MPI's shared-memory transport
//! does the same for large messages (its "single-copy mechanism").
//!
//! Every rank must take the same steps, so whether the path is usable is agreed once per
//! communicator, on the first call that would use it: two steps in which every rank first tries
//! to read the segment's magic from every peer's address space (ptrace rules, a seccomp filter or
//! a sandbox such as gVisor may refuse), then publishes its verdict; the path is used only if
//! every rank could read every peer. A call uses it when the piece each rank moves is at least
//! [`CommOptions::direct_min`](super::CommOptions::direct_min) bytes (the same on every rank).
//! Each such call takes two steps whatever its size: step 1 publishes the buffers' addresses
//! and the copies follow; step 2 tells the owners their buffers are no longer read.

use std::sync::atomic::Ordering::{Relaxed, SeqCst};

use super::layout::MAGIC;
use super::protocol::Desc;
use super::{sys, ShmComm};
use crate::stats::OpKind;
use crate::{CommError, Result};

/// `root` of the agreement steps' descriptor, which no real operation uses.
const AGREE_ROOT: usize = u32::MAX as usize - 1;

impl ShmComm {
    /// Whether a call whose per-rank piece is `piece` bytes (at most `max`) takes the single-copy
    /// path; agrees on the path with every peer the first time (see the module docs).
    pub(super) fn use_direct(&mut self, piece: usize, max: usize) -> Result<bool> {
        if piece < self.opts.direct_min || piece > max || self.world == 1 {
            return Ok(false);
        }
        if let Some(ok) = self.direct {
            self.took_direct = ok;
            return Ok(ok);
        }
        let desc = Desc::new(OpKind::Barrier, None, None, AGREE_ROOT, 0);
        let (s, h) = self.begin_step(&desc)?;
        self.publish();
        self.wait_all(s, h, &desc)?;
        let me = self.rank;
        let mine = (0..self.world).all(|p| p == me || self.probe(p));
        let (s2, h2) = self.begin_step(&desc)?;
        // SAFETY: our half h2 is free (begin_step) and at least one byte long.
        unsafe { *self.data(me, h2) = mine as u8 };
        self.publish();
        self.wait_all(s2, h2, &desc)?;
        // SAFETY: every peer published its verdict byte for step s2 in its half h2.
        let all = (0..self.world).all(|p| unsafe { *self.data(p, h2) } == 1);
        self.direct = Some(all);
        self.took_direct = all;
        Ok(all)
    }

    /// Whether the ranks agreed to use the single-copy path (`None`: no call needed it yet).
    pub fn single_copy(&self) -> Option<bool> {
        self.direct
    }

    /// Whether this rank can read peer `p`'s memory: the segment's magic at the peer's mapping.
    pub(super) fn probe(&self, p: usize) -> bool {
        let c = self.ctl(p);
        if c.pidns.load(SeqCst) != sys::pid_namespace() {
            return false;
        }
        let mut magic = [0u8; 8];
        let read = sys::peer_read(c.pid.load(SeqCst), c.base.load(SeqCst), &mut magic);
        read.is_ok() && u64::from_le_bytes(magic) == MAGIC
    }

    /// Publishes `addr` as what our half `h` lends to peers in this step.
    pub(super) fn lend(&self, h: usize, addr: *const u8) {
        self.slot_hdr(self.rank, h).addr.store(addr as u64, Relaxed);
    }

    /// Step 1 of a single-copy call for a rank that lends `addr`: begins the step, puts the
    /// address in its header and publishes it.
    pub(super) fn lend_step(&mut self, desc: &Desc, addr: *const u8) -> Result<(u64, usize)> {
        let (s, h) = self.begin_step(desc)?;
        self.lend(h, addr);
        self.publish();
        Ok((s, h))
    }

    /// Copies `dst.len()` bytes from `off` bytes past the buffer peer `p` lent in half `h`.
    pub(super) fn read_lent(&self, p: usize, h: usize, off: usize, dst: &mut [u8]) -> Result<()> {
        let addr = self.slot_hdr(p, h).addr.load(Relaxed) + off as u64;
        let pid = self.ctl(p).pid.load(Relaxed);
        sys::peer_read(pid, addr, dst).map_err(|e| self.copy_failed(p, "from", e))
    }

    /// Copies `src` to `off` bytes past the buffer peer `p` lent in half `h`.
    pub(super) fn write_lent(&self, p: usize, h: usize, off: usize, src: &[u8]) -> Result<()> {
        let addr = self.slot_hdr(p, h).addr.load(Relaxed) + off as u64;
        let pid = self.ctl(p).pid.load(Relaxed);
        sys::peer_write(pid, addr, src).map_err(|e| self.copy_failed(p, "to", e))
    }

    /// A failed copy: the peer died (its pages went with it), else the kernel's reason.
    pub(super) fn copy_failed(&self, p: usize, what: &str, e: std::io::Error) -> CommError {
        if let Err(dead) = self.check_alive(p) {
            return dead;
        }
        if matches!(e.raw_os_error(), Some(libc::ESRCH | libc::EFAULT)) {
            // The peer may be exiting: its memory goes before /proc shows it dead.
            if let Some(first) = self.abort_within_grace(p) {
                return first;
            }
            if let Err(dead) = self.check_alive(p) {
                return dead;
            }
        }
        let how = if e.raw_os_error() == Some(libc::ESRCH) {
            // Its memory is gone before /proc shows it dead: the process is exiting.
            format!("died (process {} is gone)", self.ctl(p).pid.load(Relaxed))
        } else {
            format!(
                "could not be copied {what} directly ({e}; a buffer the kernel cannot pin, such \
                 as device memory? TPRUN_COMM_DIRECT_MIN=off copies through the segment instead)"
            )
        };
        CommError::PeerDied {
            op: self.op_name(),
            seq: self.op_seq,
            missing: p,
            how,
        }
    }

    /// Step 2 of a single-copy call: publish that we are done with the peers' buffers; owners
    /// of lent buffers (`wait`) then wait until every peer said so.
    pub(super) fn direct_done(&mut self, desc: &Desc, wait: bool) -> Result<()> {
        let (s, h) = self.begin_step(desc)?;
        self.publish();
        if wait {
            self.wait_all(s, h, desc)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::{CommOptions, SegmentOptions};
    use super::*;
    use crate::{CommExt, Communicator, DType};

    /// The ranks agree on the path only when a call needs it, and then on what the kernel
    /// allows here (threads of one process: reading our own memory); the data is right either way.
    #[test]
    fn the_ranks_agree_on_the_single_copy_path_when_a_call_first_needs_it() {
        let mut o = CommOptions::for_world(3);
        o.direct_min = 4096;
        let comms = ShmComm::new_group_with(3, &SegmentOptions::default(), &o).unwrap();
        let mut probe = [0u8; 8];
        let me = std::process::id();
        let base = comms[0].map.base() as u64;
        let allowed = sys::peer_read(me, base, &mut probe).is_ok();
        let got: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .into_iter()
                .map(|mut c| {
                    s.spawn(move || {
                        let small = [c.rank as u8; 100];
                        let mut out = vec![0u8; 300];
                        c.all_gather_raw(&small, &mut out, DType::U8).unwrap();
                        let before = c.single_copy();
                        let big: Vec<f32> = (0..2048).map(|i| (i * 3 + c.rank) as f32).collect();
                        let mut all = vec![0f32; 3 * 2048];
                        c.all_gather(&big, &mut all).unwrap();
                        (before, c.single_copy(), out, all)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (before, after, out, all) in got {
            assert_eq!(before, None);
            assert_eq!(after, Some(allowed));
            assert_eq!(out, [[0u8; 100], [1; 100], [2; 100]].concat());
            let want: Vec<f32> = (0..3)
                .flat_map(|r| (0..2048).map(move |i| (i * 3 + r) as f32))
                .collect();
            assert_eq!(all, want);
        }
    }
}
