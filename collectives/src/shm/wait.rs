//! Waiting for a peer: spin, yield, then sleep on the peer's futex, with a deadline, the
//! launcher's abort flag, the peer's `gone` flag and a periodic check that its process exists.

use std::sync::atomic::Ordering::{Acquire, Relaxed, SeqCst};
use std::time::{Duration, Instant};

use super::{sys, ShmComm};
use crate::{CommError, Result};

/// After a spin that failed, the next budget is halved (down to this); a success doubles it back
/// up to the configured spin. Covers peers the CPU check misses (e.g. just woken onto our CPU).
pub(super) const SPIN_FLOOR: Duration = Duration::from_micros(10);
/// How long a rank that finds a peer dead waits for the launcher's abort before blaming the peer.
pub(super) const DEATH_GRACE: Duration = Duration::from_secs(1);
/// Untimed polls before a wait reads the clock (~1 µs: one pause, ~11 ns here, and a load each).
pub(super) const QUICK_POLLS: u32 = 64;
/// How often a sleeping waiter checks the peer's process and the deadline.
pub(super) const LIVENESS_PERIOD: Duration = Duration::from_millis(100);

/// Wrapping "has `v` reached `target`" for u32 step counters.
#[inline(always)]
pub(super) fn reached(v: u32, target: u32) -> bool {
    v.wrapping_sub(target) as i32 >= 0
}

impl ShmComm {
    /// Waits until peer `p` has published `target` steps.
    #[inline]
    pub(super) fn wait_seq(&mut self, p: usize, target: u32) -> Result<()> {
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

    /// The slow path of [`ShmComm::wait_seq`]: spin, yield, then sleep until the deadline.
    #[cold]
    #[inline(never)]
    pub(super) fn wait_slow(&mut self, p: usize, target: u32) -> Result<()> {
        if let Some(v) = self.poll_briefly(p, target) {
            self.known[p] = v;
            return Ok(());
        }
        let start = Instant::now();
        let v = match self.spin(p, target, start) {
            Some(v) => v,
            None => match self.yield_wait(p, target) {
                Some(v) => v,
                None => {
                    let v = match self.sleep_wait(p, target, start) {
                        Ok(v) => v,
                        Err(e) => return Err(self.unverified_mismatch().unwrap_or(e)),
                    };
                    // The spin gave up, but the peer came within the full budget: spinning
                    // would have paid off, so the budget goes back up. Without this a few
                    // unlucky waits halve it down to SPIN_FLOOR, after which every wait of a
                    // large message outlasts the spin, sleeps and pays a futex wake-up, and
                    // never doubles it again.
                    if start.elapsed() <= self.opts.spin {
                        self.spin_budget = self.opts.spin;
                    }
                    v
                }
            },
        };
        self.known[p] = v;
        self.wait_s += start.elapsed().as_secs_f64();
        Ok(())
    }

    /// A wait failed (a peer left, died or timed out). If it left after calling something else
    /// than a step this rank sent as a root without waiting, that is the error to report: finds
    /// the first unverified step that every peer has published and checks their headers.
    fn unverified_mismatch(&self) -> Option<CommError> {
        let published = |us: u64| {
            (0..self.world)
                .filter(|&q| q != self.rank)
                .all(|q| reached(self.ctl(q).seq.load(Acquire), (us + 1) as u32))
        };
        self.unverified
            .iter()
            .filter(|&&(us, _, _)| published(us))
            .find_map(|&(us, ud, uh)| {
                (0..self.world)
                    .filter(|&q| q != self.rank)
                    .find_map(|q| self.check_hdr(q, uh, us, &ud).err())
            })
    }

    /// Polls the peer's `seq` [`QUICK_POLLS`] times without reading the clock. Most waits of
    /// small steps end here, within a few hundred nanoseconds, where the two clock reads that
    /// time a wait (~20 ns each on a VM) would cost a third of the step; such waits are not
    /// counted in the wait time. Skipped when the peer last ran on this CPU.
    #[inline]
    fn poll_briefly(&self, p: usize, target: u32) -> Option<u32> {
        let ctl = self.ctl(p);
        let peer_cpu = ctl.cpu.load(Relaxed);
        if self.spin_budget.is_zero() || (peer_cpu != 0 && peer_cpu == sys::current_cpu()) {
            return None;
        }
        for _ in 0..QUICK_POLLS {
            std::hint::spin_loop();
            let v = ctl.seq.load(Acquire);
            if reached(v, target) {
                return Some(v);
            }
        }
        None
    }

    /// Busy-waits for up to the spin budget; adapts the budget to whether that paid off.
    fn spin(&mut self, p: usize, target: u32, start: Instant) -> Option<u32> {
        let map = self.map.clone();
        let ctl = map.ctl(&self.lay, p);
        // Spinning only helps if the peer can run meanwhile: not if it last ran on our CPU.
        let peer_cpu = ctl.cpu.load(Relaxed);
        let budget = if peer_cpu != 0 && peer_cpu == sys::current_cpu() {
            Duration::ZERO
        } else {
            self.spin_budget
        };
        if budget.is_zero() {
            return None;
        }
        let mut i = 0u32;
        loop {
            // A few pauses between loads: the load hits L1 until the peer writes the line.
            for _ in 0..4 {
                std::hint::spin_loop();
            }
            let v = ctl.seq.load(Acquire);
            if reached(v, target) {
                self.spin_budget = (self.spin_budget * 2).min(self.opts.spin);
                return Some(v);
            }
            i += 1;
            if i.is_multiple_of(32) && start.elapsed() >= budget {
                break;
            }
        }
        self.spin_budget = (self.spin_budget / 2).max(SPIN_FLOOR.min(self.opts.spin));
        None
    }

    /// `sched_yield`s up to `opts.yields` times.
    fn yield_wait(&self, p: usize, target: u32) -> Option<u32> {
        let ctl = self.ctl(p);
        for _ in 0..self.opts.yields {
            std::thread::yield_now();
            let v = ctl.seq.load(Acquire);
            if reached(v, target) {
                return Some(v);
            }
        }
        None
    }

    /// Sleeps on the peer's futex in slices of at most [`LIVENESS_PERIOD`], checking between
    /// slices for an abort, a peer that left or died, and the deadline.
    fn sleep_wait(&self, p: usize, target: u32, start: Instant) -> Result<u32> {
        let ctl = self.ctl(p);
        let deadline = start + self.opts.timeout;
        let mut next_liveness = start + LIVENESS_PERIOD;
        loop {
            let now = Instant::now();
            let check_pid = now >= next_liveness;
            if check_pid {
                next_liveness = now + LIVENESS_PERIOD;
            }
            if let Some(v) = self.check_peer(p, target, check_pid)? {
                return Ok(v);
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
            if self.light {
                sys::fence_peers();
            }
            let v = ctl.seq.load(SeqCst);
            if !reached(v, target) {
                let slice = (deadline - now).min(LIVENESS_PERIOD);
                sys::futex_wait(&ctl.seq, v, slice);
            }
            ctl.waiters.fetch_sub(1, SeqCst);
            let v = ctl.seq.load(Acquire);
            if reached(v, target) {
                return Ok(v);
            }
        }
    }

    /// Fails if the job was aborted, or peer `p` left the communicator or its process is gone
    /// (for waits that are not on `seq`: the point-to-point channels).
    pub(super) fn check_alive(&self, p: usize) -> Result<()> {
        let ctl = self.ctl(p);
        if let Some(e) = self.abort_error(p) {
            return Err(e);
        }
        let pid = ctl.pid.load(SeqCst);
        let how = if ctl.gone.load(SeqCst) != 0 {
            "left the job (dropped its communicator)".to_string()
        } else if ctl.pidns.load(SeqCst) == sys::pid_namespace() && !sys::pid_alive(pid) {
            if let Some(first) = self.abort_within_grace(p) {
                return Err(first);
            }
            format!("died (process {pid} is gone)")
        } else {
            return Ok(());
        };
        Err(CommError::PeerDied {
            op: self.op_name(),
            seq: self.op_seq,
            missing: p,
            how,
        })
    }

    /// The error of a call that finds the job aborted by the launcher (naming the rank that
    /// failed first) while it waited for peer `missing`; None while the job runs.
    pub(super) fn abort_error(&self, missing: usize) -> Option<CommError> {
        let a = self.aborted_by();
        (a != 0).then(|| CommError::Aborted {
            op: self.op_name(),
            seq: self.op_seq,
            failed: a as usize - 1,
            missing,
        })
    }

    /// A peer found dead may have left only because another rank failed first. Gives the
    /// launcher up to [`DEATH_GRACE`] to abort the job (it does within a few milliseconds of
    /// reaping the first failure), so the error names that rank; None if it did not.
    pub(super) fn abort_within_grace(&self, p: usize) -> Option<CommError> {
        let until = Instant::now() + DEATH_GRACE;
        loop {
            if let Some(e) = self.abort_error(p) {
                return Some(e);
            }
            if Instant::now() >= until {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Fails if the job was aborted or peer `p` is gone (its process too, with `check_pid`),
    /// unless it published `target` before leaving: then returns its `seq`.
    fn check_peer(&self, p: usize, target: u32, check_pid: bool) -> Result<Option<u32>> {
        let ctl = self.ctl(p);
        if let Some(e) = self.abort_error(p) {
            return Err(e);
        }
        let how = if ctl.gone.load(SeqCst) != 0 {
            "left the job (dropped its communicator)".to_string()
        } else {
            let pid = ctl.pid.load(SeqCst);
            if !(check_pid
                && ctl.pidns.load(SeqCst) == sys::pid_namespace()
                && !sys::pid_alive(pid))
            {
                return Ok(None);
            }
            if let Some(first) = self.abort_within_grace(p) {
                return Err(first);
            }
            format!("died (process {pid} is gone)")
        };
        // The peer may have published this step just before it left: its seq store happens
        // before its `gone` store (or its exit), so this load sees it.
        let v = ctl.seq.load(Acquire);
        if reached(v, target) {
            return Ok(Some(v));
        }
        Err(CommError::PeerDied {
            op: self.op_name(),
            seq: self.op_seq,
            missing: p,
            how,
        })
    }
}
