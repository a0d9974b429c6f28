//! The job's whole process tree, not only its ranks: tprun is a child subreaper, so whatever a
//! rank leaves behind (a daemonized or `setsid` grandchild) is reparented to tprun instead of
//! init, and is killed and reaped when the job ends.
//!
//! Pids are only ever signalled while they are tprun's unreaped children: a child's pid cannot be
//! reused before its parent reaps it, so no unrelated process can be hit.

use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;

/// Makes orphaned descendants of the ranks tprun's children (PR_SET_CHILD_SUBREAPER).
pub(crate) fn become_subreaper() -> anyhow::Result<()> {
    // SAFETY: prctl with integer arguments only; it touches no memory of ours.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        anyhow::bail!("cannot become the reaper of the ranks' descendants: {e}");
    }
    Ok(())
}

/// Reaps exited orphans (descendants reparented to tprun) while ranks still run, without taking
/// a rank's exit status: stops at the first exited child that is one of `ranks`.
pub(crate) fn reap_orphans(ranks: &[i32]) {
    loop {
        // SAFETY: an all-zero siginfo_t is valid; waitid only writes into it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let flags = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
        // SAFETY: `info` is a valid, writable siginfo_t for the duration of the call.
        if unsafe { libc::waitid(libc::P_ALL, 0, &mut info, flags) } != 0 {
            return;
        }
        // SAFETY: waitid succeeded, so si_pid is the field it filled (0 when nothing exited).
        let pid = unsafe { info.si_pid() };
        if pid == 0 || ranks.contains(&pid) {
            return;
        }
        let _ = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
    }
}

/// Kills and reaps every child tprun still has until none is left or `limit` passes, and returns
/// how many it killed. Killing a child reparents its own children to tprun, so the loop walks
/// down the tree.
pub(crate) fn sweep(limit: Duration) -> usize {
    let me = std::process::id() as i32;
    let until = Instant::now() + limit;
    let mut killed = std::collections::HashSet::new();
    loop {
        let kids = children_of(me);
        if kids.is_empty() {
            break;
        }
        for &(pid, zombie) in &kids {
            if kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok() && !zombie {
                killed.insert(pid);
            }
        }
        while let Ok(st) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            if st == nix::sys::wait::WaitStatus::StillAlive {
                break;
            }
        }
        if Instant::now() >= until {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    killed.len()
}

/// `(pid, is a zombie)` of the processes whose parent is `ppid`, from /proc (zombies included:
/// they are still ours to reap).
fn children_of(ppid: i32) -> Vec<(i32, bool)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let (parent, state) = parent_and_state(pid)?;
            (parent == ppid).then_some((pid, state == "Z"))
        })
        .collect()
}

fn parent_and_state(pid: i32) -> Option<(i32, String)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut f = s[s.rfind(')')? + 1..].split_whitespace();
    let state = f.next()?.to_string();
    Some((f.next()?.parse().ok()?, state))
}
