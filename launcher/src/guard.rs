//! The rank guard: each rank runs as `tprun` re-executed in guard mode, which starts the real
//! program as its only child and is a subreaper over it. When tprun dies, even by SIGKILL, the
//! guard gets PR_SET_PDEATHSIG (SIGUSR2) and sees its parent change, kills every process under
//! it and exits, so no descendant of a rank outlives the job. Otherwise it is invisible: it passes on signals that
//! did not come from tprun, and exits with the program's own status.

use std::ffi::OsString;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::{SigSet, Signal};

/// Set in a guard's environment to `TPRUN_PID:FD` (FD: where it writes the program's pid, so
/// tprun's summary names the program); never reaches the program.
pub(crate) const GUARD_VAR: &str = "TPRUN_GUARD";
/// What the guard gets when tprun dies.
pub(crate) const DEATH_SIGNAL: Signal = Signal::SIGUSR2;
/// How long the guard spends killing what is left.
const SWEEP: Duration = Duration::from_secs(5);

/// Runs the guard when this process is one (argv: `tprun-guard PATH ARG0 ARGS...`) and returns
/// its exit code; `None` in any other process. Call first thing in `main`.
pub fn main_if_guard() -> Option<i32> {
    let var = std::env::var(GUARD_VAR).ok()?;
    let (parent, fd) = var.split_once(':')?;
    let (parent, fd): (i32, i32) = (parent.parse().ok()?, fd.parse().ok()?);
    // SAFETY: tprun left this fd open for us alone (spawn.rs); we own it from here on.
    let report = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut argv = std::env::args_os().skip(1);
    let (Some(path), Some(arg0)) = (argv.next(), argv.next()) else {
        return Some(127);
    };
    Some(run(parent, report, path, arg0, argv.collect()))
}

/// Runs the program under the guard; returns the exit code (or dies by the program's signal).
fn run(parent: i32, report: OwnedFd, path: OsString, arg0: OsString, args: Vec<OsString>) -> i32 {
    // Keeps the report fd from the program.
    let _ = nix::fcntl::fcntl(
        report.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
    let mut set = SigSet::empty();
    for s in [
        DEATH_SIGNAL,
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGUSR1,
        Signal::SIGCHLD,
    ] {
        set.add(s);
    }
    // Blocked, then taken with sigtimedwait: a death signal from here on is never lost.
    if set.thread_block().is_err() || nix::unistd::getppid().as_raw() != parent {
        return 1;
    }
    if crate::reaper::become_subreaper().is_err() {
        return 1;
    }
    let me = std::process::id() as libc::pid_t;
    let mut cmd = Command::new(&path);
    cmd.arg0(&arg0).args(&args).env_remove(GUARD_VAR);
    let blocked: libc::sigset_t = *set.as_ref();
    // SAFETY: between fork and exec the closure makes three raw syscalls (sigprocmask, prctl,
    // getppid) on data prepared before the fork, and builds errors from raw errno values only.
    unsafe {
        cmd.pre_exec(move || {
            // The signal mask survives exec: the program must not start with ours blocked (a
            // program that cannot get SIGTERM would outlast tprun's teardown until SIGKILL).
            if libc::sigprocmask(libc::SIG_UNBLOCK, &blocked, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let sig = libc::SIGKILL as libc::c_ulong;
            if libc::prctl(libc::PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != me {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    let child = match cmd.spawn() {
        Ok(c) => {
            let _ = std::fs::File::from(report).write_all(&c.id().to_ne_bytes());
            c.id() as i32
        }
        Err(e) => {
            eprintln!("tprun: error: cannot run '{}': {e}", arg0.to_string_lossy());
            return 127;
        }
    };
    match watch(parent, child, &set) {
        Some(status) => {
            // What the program left (reparented to us) ends with it: a rank's leftovers must not
            // go back to tprun, where a later kill -9 of tprun would orphan them.
            crate::reaper::sweep(SWEEP);
            mirror(status)
        }
        None => {
            crate::reaper::sweep(SWEEP);
            1
        }
    }
}

/// Waits for the program; `Some(wait status)` when it ended, `None` when tprun died first.
fn watch(parent: i32, child: i32, set: &SigSet) -> Option<i32> {
    let tick = libc::timespec {
        tv_sec: 0,
        tv_nsec: 100_000_000,
    };
    loop {
        // SAFETY: an all-zero siginfo_t is valid; sigtimedwait only writes into it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set`, `info` and `tick` are valid for the duration of the call.
        let sig = unsafe { libc::sigtimedwait(set.as_ref(), &mut info, &tick) };
        // tprun's death reparents us before the death signal is sent, so the parent check alone
        // tells death from a SIGUSR2 that tprun forwarded (Slurm's pre-emption warning).
        if nix::unistd::getppid().as_raw() != parent {
            return None;
        }
        // SAFETY: si_pid is set for signals sent by kill(2); 0 otherwise.
        if sig > 0 && sig != libc::SIGCHLD && unsafe { info.si_pid() } != parent {
            // Not tprun's killpg (which reached the program too): pass it on.
            // SAFETY: `child` is our unreaped child, so its pid is still its own.
            unsafe { libc::kill(child, sig) };
        }
        loop {
            let mut status = 0;
            // SAFETY: waitpid writes only into `status`.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid == child {
                return Some(status);
            }
            if pid <= 0 {
                break;
            }
        }
    }
}

/// Ends the guard the way the program ended: its exit code, or death by its signal.
fn mirror(status: i32) -> i32 {
    if libc::WIFEXITED(status) {
        return libc::WEXITSTATUS(status);
    }
    let sig = libc::WTERMSIG(status);
    let no_core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on values of ours; the guard has nothing left to do.
    unsafe {
        libc::setrlimit(libc::RLIMIT_CORE, &no_core);
        libc::signal(sig, libc::SIG_DFL);
        let mut one: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut one);
        libc::sigaddset(&mut one, sig);
        libc::sigprocmask(libc::SIG_UNBLOCK, &one, std::ptr::null_mut());
        libc::kill(libc::getpid(), sig);
    }
    128 + sig
}
