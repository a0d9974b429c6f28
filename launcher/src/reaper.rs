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
    let p = proc_of(pid)?;
    Some((p.ppid, p.state.to_string()))
}

/// One process as /proc/PID/stat shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Proc {
    pub pid: i32,
    pub ppid: i32,
    /// `R`, `S`, `D`, `T` (stopped by a signal), `t` (stopped by a debugger), `Z` (ended, not
    /// reaped yet), ...
    pub state: char,
    /// The command name (at most 15 bytes).
    pub comm: String,
    /// For a zombie: its status as waitpid(2) reports it (Linux 3.5+; 0 where unknown).
    pub exit_status: i32,
}

fn proc_of(pid: i32) -> Option<Proc> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (open, close) = (s.find('(')?, s.rfind(')')?);
    let f: Vec<&str> = s[close + 1..].split_whitespace().collect();
    Some(Proc {
        pid,
        ppid: f.get(1)?.parse().ok()?,
        state: f.first()?.chars().next()?,
        comm: s.get(open + 1..close)?.to_string(),
        // Field 52 of stat(5); the fields after ')' start at field 3.
        exit_status: f.get(49).and_then(|v| v.parse().ok()).unwrap_or(0),
    })
}

/// Every process /proc lists now (thread group leaders).
pub(crate) fn processes() -> Vec<Proc> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(proc_of)
        .collect()
}

/// Why a rank whose program has ended is still not reaped by tprun.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Held {
    /// The guard itself is stopped (SIGSTOP) above its ended program: resuming the guard lets it
    /// reap the program and exit with the program's status.
    Guard,
    /// Nothing under the guard runs any more: `stopped` (the program or a wrapper such as a
    /// shell between the guard and the real rank) is stopped, and `ended`, its child, has ended
    /// but cannot be reaped until someone resumes it.
    Stopped { stopped: Proc, ended: Proc },
}

/// Whether the tree under `guard` (the guard and its descendants in `procs`) has ended but is
/// held by a stopped process. `None` while anything in it still runs, sleeps or is traced, and
/// for a tree that is only stopped (a job paused with SIGSTOP, or a rank that hangs stopped: the
/// collectives' deadline and `--timeout` cover those).
pub(crate) fn held(guard: i32, procs: &[Proc]) -> Option<Held> {
    let g = procs.iter().find(|p| p.pid == guard)?;
    let mut tree = vec![g];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i].pid;
        tree.extend(procs.iter().filter(|p| p.ppid == parent && p.pid != parent));
        i += 1;
    }
    let below = &tree[1..];
    if g.state == 'Z' || below.iter().any(|p| !matches!(p.state, 'T' | 'Z')) {
        return None;
    }
    let stopped = |pid: i32| tree.iter().find(|p| p.pid == pid && p.state == 'T');
    if g.state == 'T'
        && (below.is_empty() || below.iter().any(|p| p.ppid == guard && p.state == 'Z'))
    {
        return Some(Held::Guard);
    }
    let ended = below
        .iter()
        .find(|p| p.state == 'Z' && stopped(p.ppid).is_some())?;
    let stopped = stopped(ended.ppid)?;
    Some(Held::Stopped {
        stopped: (*stopped).clone(),
        ended: (*ended).clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pid: i32, ppid: i32, state: char) -> Proc {
        Proc {
            pid,
            ppid,
            state,
            comm: format!("p{pid}"),
            exit_status: 0,
        }
    }

    #[test]
    fn a_stopped_process_above_an_ended_one_holds_the_rank() {
        // guard 10 > sh 11 (stopped) > prog 12 (ended); 99 is someone else's.
        let procs = [p(10, 1, 'S'), p(11, 10, 'T'), p(12, 11, 'Z'), p(99, 1, 'R')];
        let Some(Held::Stopped { stopped, ended }) = held(10, &procs) else {
            panic!("{:?}", held(10, &procs));
        };
        assert_eq!((stopped.pid, ended.pid), (11, 12));
        // The guard stopped above its ended program, with or without leftovers under it.
        assert_eq!(
            held(10, &[p(10, 1, 'T'), p(12, 10, 'Z')]),
            Some(Held::Guard)
        );
        assert_eq!(
            held(10, &[p(10, 1, 'T'), p(12, 10, 'Z'), p(13, 10, 'T')]),
            Some(Held::Guard)
        );
        assert_eq!(held(10, &[p(10, 1, 'T')]), Some(Held::Guard));
    }

    #[test]
    fn running_paused_or_traced_ranks_are_not_held() {
        for procs in [
            // The program still runs (or sleeps) under a stopped wrapper.
            vec![
                p(10, 1, 'S'),
                p(11, 10, 'T'),
                p(12, 11, 'S'),
                p(13, 11, 'Z'),
            ],
            // A rank stopped by itself (hung): nothing has ended.
            vec![p(10, 1, 'S'), p(11, 10, 'T')],
            // The whole rank paused with SIGSTOP.
            vec![p(10, 1, 'T'), p(11, 10, 'T'), p(12, 11, 'T')],
            // Under a debugger.
            vec![p(10, 1, 'S'), p(11, 10, 't'), p(12, 11, 'Z')],
            // The program just ended and its running guard is about to reap it.
            vec![p(10, 1, 'S'), p(11, 10, 'Z')],
            // The guard itself ended (tprun reaps it).
            vec![p(10, 1, 'Z')],
        ] {
            assert_eq!(held(10, &procs), None, "{procs:?}");
        }
        assert_eq!(held(10, &[]), None);
    }

    #[test]
    fn this_process_reads_back_from_proc() {
        let me = std::process::id() as i32;
        let procs = processes();
        let mine = procs.iter().find(|p| p.pid == me).expect("self in /proc");
        assert_eq!(mine.ppid, nix::unistd::getppid().as_raw());
        assert!(matches!(mine.state, 'R' | 'S'), "{mine:?}");
    }
}
