//! SIGINT, SIGTERM, SIGHUP, SIGUSR1 and SIGUSR2 sent to tprun: the handler only counts them; the supervisor loop
//! polls the counters and does the forwarding (nothing else is safe inside a handler).

use std::sync::atomic::{AtomicUsize, Ordering};

use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

/// The signals tprun forwards to every rank. SIGUSR1 and SIGUSR2 are only passed on (Slurm
/// sends them before preemption, for the program to checkpoint); the others stop the job.
pub(crate) const FORWARDED: [Signal; 5] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

static COUNTS: [AtomicUsize; 5] = [const { AtomicUsize::new(0) }; 5];

extern "C" fn on_signal(sig: libc::c_int) {
    if let Some(i) = FORWARDED.iter().position(|&s| s as libc::c_int == sig) {
        COUNTS[i].fetch_add(1, Ordering::SeqCst);
    }
}

/// Handlers installed for the lifetime of the value; the previous ones come back on drop.
pub(crate) struct Handlers {
    old: Vec<(Signal, SigAction)>,
    /// Counter values at install time, and at the last poll.
    base: [usize; 5],
    seen: [usize; 5],
}

impl Handlers {
    pub fn install() -> anyhow::Result<Handlers> {
        // SA_RESTART: reader threads blocked in read() must not see EINTR.
        let action = SigAction::new(
            SigHandler::Handler(on_signal),
            SaFlags::SA_RESTART,
            SigSet::empty(),
        );
        let base = std::array::from_fn(|i| COUNTS[i].load(Ordering::SeqCst));
        let mut old = Vec::new();
        for sig in FORWARDED {
            // SAFETY: the handler only does an atomic increment, which is async-signal-safe.
            let prev = unsafe { sigaction(sig, &action) }
                .map_err(|e| anyhow::anyhow!("cannot install a {sig} handler: {e}"))?;
            if prev.handler() == SigHandler::SigIgn {
                // Started ignoring it (e.g. SIGHUP under nohup): keep ignoring, as shells expect.
                // SAFETY: puts back the disposition that was just replaced.
                let _ = unsafe { sigaction(sig, &prev) };
                continue;
            }
            old.push((sig, prev));
        }
        Ok(Handlers {
            old,
            base,
            seen: base,
        })
    }

    /// Signals received since the last call, one entry per arrival with its ordinal during this
    /// job (1 = first), so a second SIGINT is seen even when both land in one poll interval.
    pub fn poll(&mut self) -> Vec<(Signal, usize)> {
        let mut got = Vec::new();
        for (i, &sig) in FORWARDED.iter().enumerate() {
            let now = COUNTS[i].load(Ordering::SeqCst);
            for k in self.seen[i]..now {
                got.push((sig, k - self.base[i] + 1));
            }
            self.seen[i] = now;
        }
        got
    }
}

/// Undoes dispositions tprun may inherit that would break it: SIGCHLD ignored (children are then
/// reaped by the kernel and waiting for a rank fails with ECHILD), the forwarded signals or
/// SIGCHLD blocked (tprun would never see them). SIGXFSZ is ignored, so a file-size limit
/// (RLIMIT_FSIZE) hit by the shared-memory segment, a log or the trace fails the write with EFBIG,
/// which tprun reports, instead of killing tprun without a word. Ranks get SIGXFSZ's default back
/// (spawn's pre_exec).
pub(crate) fn reset_inherited() -> anyhow::Result<()> {
    let dfl = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    // SAFETY: the default disposition runs no code of ours.
    unsafe {
        sigaction(Signal::SIGCHLD, &dfl)
            .map_err(|e| anyhow::anyhow!("cannot reset SIGCHLD: {e}"))?;
    }
    ignore_sigxfsz()?;
    let mut set = SigSet::empty();
    for sig in FORWARDED.into_iter().chain([Signal::SIGCHLD]) {
        set.add(sig);
    }
    set.thread_unblock()
        .map_err(|e| anyhow::anyhow!("cannot unblock the forwarded signals: {e}"))
}

/// SIGXFSZ ignored: hitting RLIMIT_FSIZE is then a write error (EFBIG), not death.
pub(crate) fn ignore_sigxfsz() -> anyhow::Result<()> {
    let ign = SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty());
    // SAFETY: the ignore disposition runs no code of ours.
    unsafe { sigaction(Signal::SIGXFSZ, &ign) }
        .map(drop)
        .map_err(|e| anyhow::anyhow!("cannot ignore SIGXFSZ: {e}"))
}

impl Drop for Handlers {
    fn drop(&mut self) {
        for (sig, prev) in self.old.drain(..) {
            // SAFETY: restores the disposition that was in place before `install`.
            let _ = unsafe { sigaction(sig, &prev) };
        }
    }
}
