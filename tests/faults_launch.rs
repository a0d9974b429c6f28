//! Launcher faults beyond a rank's own death (issue 26): a stopped process between tprun and a
//! rank, and another local user who takes the shared-memory name of hand-started ranks first.
//!
//! Each run has a hang limit (a run past it is killed and the test fails); nothing asserts a
//! duration. Every case checks that no process of the job and no segment name is left.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

mod common;
use common::{children_of, env_of, finish, proc_stat, tprun, Finished, TempDir};

/// Hang limit of one run (far above a normal one; the `--timeout` given is above this, so a job
/// held until `--timeout` fails the test instead of passing).
const LIMIT: Duration = Duration::from_secs(90);
/// `--timeout` of the held-job runs: ending there would mean the fix did not work.
const TIMEOUT: &str = "600";

fn clean(mut c: Command) -> Command {
    for v in [
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "TPRUN_SHM_FD",
        "TPRUN_SHM_DIR",
        "TPRUN_RUN_ID",
        "TPRUN_ROLE",
        "TPRUN_PRETEND_NODES",
        "MASTER_PORT",
        "XDG_RUNTIME_DIR",
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "PMIX_RANK",
        "PMI_RANK",
        "SLURM_PROCID",
        "SLURM_NTASKS",
        "SLURM_JOB_ID",
    ] {
        c.env_remove(v);
    }
    c
}

/// Polls `f` until it returns something (failing the test past [`LIMIT`]).
fn until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let t = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(t.elapsed() < LIMIT, "never: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The RANK of process `pid`, from its environment.
fn rank_of(pid: u32) -> Option<usize> {
    env_of(pid)
        .lines()
        .find_map(|l| l.strip_prefix("RANK="))?
        .parse()
        .ok()
}

/// A running `tprun -n N -- sh -c 'sleep 600; exit 0'`: per rank its guard, the shell (the
/// program, between the guard and the sleep) and the sleep.
struct Held {
    child: Child,
    started: Instant,
    /// `[guard, sh, sleep]` of each rank.
    pids: Vec<[u32; 3]>,
}

impl Held {
    fn start(n: usize) -> Held {
        let started = Instant::now();
        let n_s = n.to_string();
        let child = clean(tprun())
            .args(["-n", &n_s, "--timeout", TIMEOUT, "--grace-period", "1"])
            .args(["--", "sh", "-c", "sleep 600; exit 0"])
            .spawn()
            .expect("start tprun");
        let tprun_pid = child.id();
        let pids = until("every rank's guard, shell and sleep run", || {
            let mut found = vec![None; n];
            for g in children_of(tprun_pid) {
                let r = rank_of(g).filter(|&r| r < n)?;
                let sh = *children_of(g).first()?;
                let sleep = *children_of(sh).first()?;
                found[r] = Some([g, sh, sleep]);
            }
            found.into_iter().collect::<Option<Vec<_>>>()
        });
        Held {
            child,
            started,
            pids,
        }
    }

    fn finish(self) -> (Finished, Vec<[u32; 3]>) {
        let f = finish(self.child, self.started, LIMIT);
        let every: Vec<u32> = self.pids.iter().flatten().copied().collect();
        until("every process of the job is gone", || {
            every.iter().all(|&p| proc_stat(p).is_none()).then_some(())
        });
        (f, self.pids)
    }
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) with plain integers.
    assert_eq!(
        unsafe { libc::kill(pid as i32, sig) },
        0,
        "kill {pid} {sig}"
    );
}

/// Waits until `pid` shows state `state` in /proc.
fn wait_state(pid: u32, state: char) {
    until(&format!("process {pid} in state {state}"), || {
        proc_stat(pid)
            .is_some_and(|(_, s)| s == state)
            .then_some(())
    });
}

/// The guard of rank 1 stopped (SIGSTOP) while its program runs: when the program ends, tprun
/// resumes the guard, which reports the program's status, and the job succeeds.
#[test]
fn a_stopped_guard_does_not_hold_a_finished_job() {
    let job = Held::start(2);
    let [guard, _, _] = job.pids[1];
    signal(guard, libc::SIGSTOP);
    wait_state(guard, 'T');
    // Both programs end (their sleep is killed; the shells go on to `exit 0`).
    for [_, _, sleep] in &job.pids {
        signal(*sleep, libc::SIGTERM);
    }
    let (f, _) = job.finish();
    assert_eq!(f.code, 0, "{}", f.stderr);
    assert!(
        f.stderr.contains(&format!(
            "tprun: rank 1's guard (pid {guard}) was stopped after its program ended; resuming it"
        )),
        "{}",
        f.stderr
    );
}

/// A shell between the guard and the rank's real work is stopped and its child ends: once every
/// rank has ended (rank 0 normally, rank 1 under the stopped shell), tprun ends the job with a
/// summary naming the stopped and the ended process, and kills what is left.
#[test]
fn a_stopped_process_between_tprun_and_a_rank_does_not_hold_the_job() {
    let job = Held::start(2);
    let [_, sh, sleep] = job.pids[1];
    signal(sh, libc::SIGSTOP);
    wait_state(sh, 'T');
    signal(sleep, libc::SIGTERM);
    wait_state(sleep, 'Z');
    // Rank 0 ends by itself (exit 0); the job is then held only by rank 1's stopped shell.
    signal(job.pids[0][2], libc::SIGTERM);
    let (f, _) = job.finish();
    assert_eq!(f.code, 1, "{}", f.stderr);
    let e = &f.stderr;
    assert!(
        e.contains(
            "tprun: every rank has ended, but stopped processes hold the job; killing what is left"
        ),
        "{e}"
    );
    assert!(
        e.contains(
            "tprun: every rank had ended, but stopped processes held the job (exit code 1):"
        ),
        "{e}"
    );
    assert!(
        e.contains(&format!(
            "tprun:   rank 1: pid {sh} (sh) is stopped and cannot reap pid {sleep} (sleep), which ended with killed by SIGTERM"
        )),
        "{e}"
    );
    // The summary table: rank 0 exited by itself, rank 1 was killed.
    let row = |r: usize| {
        e.lines()
            .find(|l| l.split_whitespace().next() == Some(&r.to_string()) && l.contains("  "))
            .unwrap_or_default()
            .to_string()
    };
    assert!(row(0).contains("exit 0"), "{e}");
    assert!(row(1).contains("SIGKILL"), "{e}");
    assert!(!e.contains("timed out"), "{e}");
}

/// The control: a rank that stopped itself, with nothing under it ended, is a hang (a paused
/// job looks the same) and is not ended early; `--timeout` ends it.
#[test]
fn a_stopped_rank_with_nothing_ended_is_left_to_the_timeout() {
    let started = Instant::now();
    let child = clean(tprun())
        .args(["-n", "2", "--timeout", "2", "--grace-period", "1"])
        .args(["--", "sh", "-c", "kill -STOP $$"])
        .spawn()
        .unwrap();
    let f = finish(child, started, LIMIT);
    assert_eq!(f.code, 124, "{}", f.stderr);
    assert!(!f.stderr.contains("stopped processes"), "{}", f.stderr);
}

// ---------------------------------------------------------------------------------------------
// Hand-started ranks: the named segment lives in a directory of this user's.

/// `tprun rank perf` as rank `r` of 2 started by hand, meeting through key `key`.
fn hand_rank(r: usize, key: &str, env: &[(&str, &Path)]) -> Command {
    let mut c = clean(tprun());
    c.args([
        "rank",
        "perf",
        "--op",
        "all-reduce",
        "--check",
        "--max-bytes",
        "4K",
    ])
    .env("RANK", r.to_string())
    .env("WORLD_SIZE", "2")
    .env("LOCAL_WORLD_SIZE", "2")
    .env("TPRUN_RUN_ID", key)
    .env("TPRUN_COMM_TIMEOUT_S", "20");
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

fn run_pair(key: &str, env: &[(&str, &Path)]) -> Vec<Finished> {
    let started = Instant::now();
    let kids: Vec<Child> = (0..2)
        .map(|r| hand_rank(r, key, env).spawn().expect("start a rank"))
        .collect();
    kids.into_iter()
        .map(|c| finish(c, started, LIMIT))
        .collect()
}

fn chown(p: &Path, uid: u32) {
    std::os::unix::fs::chown(p, Some(uid), Some(uid)).unwrap();
}

const NOBODY: u32 = 65534;

/// Another user created the name the ranks used to meet at (`/dev/shm/tprun-<uid>-<key>`) first:
/// the job runs anyway, leaves that file alone, and leaves nothing of its own.
#[test]
fn another_users_file_at_the_old_segment_name_does_not_block_hand_started_ranks() {
    // SAFETY: getuid cannot fail.
    let me = unsafe { libc::getuid() };
    if me == NOBODY {
        eprintln!("skipped: running as nobody, no other user to simulate");
        return;
    }
    let key = format!("faults-launch-old-{}", std::process::id());
    let squat = PathBuf::from(format!("/dev/shm/tprun-{me}-{key}"));
    std::fs::write(&squat, [0u8; 64]).unwrap();
    std::fs::set_permissions(&squat, std::fs::Permissions::from_mode(0o600)).unwrap();
    chown(&squat, NOBODY);
    let runs = run_pair(&key, &[]);
    // Everything of the job's but the other user's file (which must stay).
    let squat_line = format!("file {}", squat.display());
    let left: Vec<String> = common::leftovers(&key, 0, &[])
        .into_iter()
        .filter(|l| *l != squat_line)
        .collect();
    let still = std::fs::metadata(&squat).map(|m| std::os::unix::fs::MetadataExt::uid(&m));
    let _ = std::fs::remove_file(&squat);
    for (r, run) in runs.iter().enumerate() {
        assert_eq!(run.code, 0, "rank {r}: {}", run.stderr);
    }
    assert!(
        runs[0].stdout.contains("Out of bounds values : 0 OK"),
        "{}",
        runs[0].stdout
    );
    assert_eq!(
        still.ok(),
        Some(NOBODY),
        "the other user's file was touched"
    );
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// The directory of this user's segments made by someone else (another owner) or open to
/// others (mode 777): every rank refuses it at once with an error naming it, its owner and
/// mode, and what to do; nothing is created in it.
#[test]
fn a_segment_directory_of_another_user_or_open_to_others_is_refused() {
    // SAFETY: getuid cannot fail.
    let me = unsafe { libc::getuid() };
    if me == NOBODY {
        eprintln!("skipped: running as nobody, no other user to simulate");
        return;
    }
    for (case, owner, mode) in [("owner", NOBODY, 0o700), ("mode", me, 0o777)] {
        let base = TempDir::new("faults-launch", case);
        let dir = base.join(format!("tprun-{me}"));
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).unwrap();
        chown(&dir, owner);
        let key = format!("faults-launch-dir-{}", std::process::id());
        let runs = run_pair(&key, &[("TPRUN_SHM_DIR", base.path())]);
        let expected = format!(
            "{} is a directory owned by uid {owner} with mode {mode:03o}, but the job's shared memory needs a directory of this user (uid {me}) with mode 700",
            dir.display()
        );
        for (r, run) in runs.iter().enumerate() {
            assert_eq!(run.code, 1, "{case}: rank {r}: {}", run.stderr);
            assert!(
                run.stderr.contains(&expected),
                "{case}: rank {r}: {}",
                run.stderr
            );
            assert!(run.stderr.contains("TPRUN_SHM_DIR"), "{}", run.stderr);
            assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
        }
        let inside: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().collect();
        assert!(inside.is_empty(), "{case}: {inside:?}");
    }
}

/// The normal case in a directory of ours: the ranks make `tprun-<uid>` with mode 700, meet in
/// it, and remove both the segment's name and the emptied directory.
#[test]
fn hand_started_ranks_meet_in_a_private_directory_and_leave_nothing() {
    // SAFETY: getuid cannot fail.
    let me = unsafe { libc::getuid() };
    let base = TempDir::new("faults-launch", "private");
    let key = format!("faults-launch-ok-{}", std::process::id());
    let runs = run_pair(&key, &[("TPRUN_SHM_DIR", base.path())]);
    for (r, run) in runs.iter().enumerate() {
        assert_eq!(run.code, 0, "rank {r}: {}", run.stderr);
    }
    let left: Vec<_> = std::fs::read_dir(base.path()).unwrap().flatten().collect();
    assert!(left.is_empty(), "left in {}: {left:?}", base.s());
    assert!(!base.join(format!("tprun-{me}")).exists());
}
