//! A rank killed inside the new operations (issue 26, "Faults"): mid-send with the receiver
//! waiting, mid-all-to-all, and inside a sub-group's collective. The job must end (each run has a
//! hang limit; nothing asserts a duration), a surviving rank's error must name the operation, the
//! group and the peer, tprun must print its summary, and nothing may be left: no process of the
//! job, and no shared-memory name of the job in /dev/shm or in the `TPRUN_SHM_DIR` it was given
//! (under tprun the job's and the groups' segments are unnamed memfds, or O_TMPFILEs there).
//!
//! The rank program is collectives/examples/fault_ops.rs; ranks are killed from outside
//! (SIGKILL) once every rank has entered its loop.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::{
    assert_no_leftovers, env_of, finish, proc_stat, rank_programs_of, tprun, Finished, TempDir,
};

/// Hang limit of one run.
const LIMIT: Duration = Duration::from_secs(120);

/// Builds collectives/examples/fault_ops.rs and returns its path.
fn fault_ops() -> PathBuf {
    let st = Command::new(env!("CARGO"))
        .args([
            "build",
            "--quiet",
            "--example",
            "fault_ops",
            "-p",
            "collectives",
        ])
        .status()
        .unwrap();
    assert!(st.success());
    Path::new(env!("CARGO_BIN_EXE_tprun"))
        .parent()
        .unwrap()
        .join("examples/fault_ops")
}

/// Runs `tprun -n N -- fault_ops MODE DIR`, SIGKILLs rank `victim` once every rank is in its
/// loop, and checks what every case must: the job ends with the victim's failure and the summary,
/// nothing of it is left. Returns how it ended.
fn kill_inside(mode: &str, n: usize, victim: usize, shm_dir: Option<&Path>) -> Finished {
    let exe = fault_ops();
    let tmp = TempDir::new("faults-p2p", mode);
    let mut c = tprun();
    c.args(["-n", &n.to_string(), "--grace-period", "5", "--"])
        .arg(&exe)
        .arg(mode)
        .arg(tmp.path())
        .env("TPRUN_COMM_TIMEOUT_S", "30")
        .env_remove("TPRUN_SHM_DIR")
        .env_remove("TPRUN_RUN_ID")
        .env_remove("RANK")
        .env_remove("WORLD_SIZE");
    if let Some(d) = shm_dir {
        c.env("TPRUN_SHM_DIR", d);
    }
    let started = Instant::now();
    let mut child = c.spawn().expect("start tprun");
    let tprun_pid = child.id();
    let mut pids = vec![0u32; n];
    let t = Instant::now();
    while !(0..n).all(|r| tmp.join(format!("ready.{r}")).exists()) {
        if t.elapsed() > LIMIT || child.try_wait().unwrap().is_some() {
            let f = finish(child, started, Duration::from_secs(10));
            panic!(
                "{mode}: the ranks never all got into the loop:\n{}",
                f.stderr
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    for p in rank_programs_of(tprun_pid) {
        if let Some(r) = env_of(p)
            .lines()
            .find_map(|l| l.strip_prefix("RANK="))
            .and_then(|r| r.parse::<usize>().ok())
        {
            if r < n {
                pids[r] = p;
            }
        }
    }
    assert!(pids.iter().all(|&p| p != 0), "{mode}: rank pids {pids:?}");
    // SAFETY: kill(2) of a rank program this test's tprun started (still running: it loops).
    assert_eq!(unsafe { libc::kill(pids[victim] as i32, libc::SIGKILL) }, 0);
    let f = finish(child, started, LIMIT);
    let e = &f.stderr;
    assert_eq!(f.code, 128 + libc::SIGKILL, "{mode}: {e}");
    assert!(
        e.contains(&format!("tprun: rank {victim} failed: killed by SIGKILL")),
        "{mode}: no summary: {e}"
    );
    assert!(e.contains("rank  pid"), "{mode}: no summary table: {e}");
    assert!(!e.contains("panicked"), "{mode}: {e}");
    // No process of the job survives.
    let t = Instant::now();
    while pids.iter().any(|&p| proc_stat(p).is_some()) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{mode}: left running: {pids:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // No name of the job (its run id is tprun-<pid>-<time>) in /dev/shm or TPRUN_SHM_DIR, no
    // process with its memory; and the TPRUN_SHM_DIR is empty.
    let dirs: Vec<&Path> = shm_dir.into_iter().collect();
    let run_id = format!("tprun-{tprun_pid}-");
    assert_no_leftovers(&run_id, tprun_pid, &dirs, Duration::from_secs(10));
    if let Some(d) = shm_dir {
        let left: Vec<_> = std::fs::read_dir(d).unwrap().flatten().collect();
        assert!(left.is_empty(), "{mode}: left in {}: {left:?}", d.display());
    }
    f
}

/// The line a surviving rank printed (`[rankR]: fault_ops: rank R: error: ...`).
fn error_of(f: &Finished, rank: usize) -> String {
    let tag = format!("fault_ops: rank {rank}: error: ");
    f.stderr
        .lines()
        .find(|l| l.contains(&tag))
        .unwrap_or_else(|| panic!("rank {rank} reported no error:\n{}", f.stderr))
        .to_string()
}

/// Rank 0 killed while sending 4 MiB messages (4 slots each) to rank 1, which waits in recv:
/// rank 1's error names send_recv and rank 0 (dead, or the launcher's abort for it).
#[test]
fn a_rank_killed_mid_send_ends_the_job_and_the_receiver_names_it() {
    let f = kill_inside("send", 2, 0, None);
    let line = error_of(&f, 1);
    assert!(line.contains("send_recv #"), "{line}");
    assert!(
        line.contains("rank 0 died (process ")
            || line.contains("(rank 0 failed) while waiting for rank 0"),
        "{line}"
    );
    println!("CASE mid-send: {line}");
}

/// Rank 1 of 3 killed inside an all-to-all (1 MiB per peer): the others name all_to_all and
/// rank 1 (or the launcher's abort for it).
#[test]
fn a_rank_killed_mid_all_to_all_ends_the_job_and_the_others_name_it() {
    let f = kill_inside("all-to-all", 3, 1, None);
    for r in [0, 2] {
        let line = error_of(&f, r);
        assert!(line.contains("all_to_all #"), "{line}");
        assert!(
            line.contains("rank 1 died (process ")
                || line.contains("(rank 1 failed) while waiting for rank"),
            "{line}"
        );
        println!("CASE mid-all-to-all, rank {r}: {line}");
    }
}

/// Rank 3 killed inside its group's all-reduce (groups 0-1 and 2-3), segments in a
/// TPRUN_SHM_DIR: rank 2's error names all_reduce, the group (world ranks [2, 3]) and world rank
/// 3; the other group is stopped by the launcher; the directory is left empty.
#[test]
fn a_rank_killed_inside_a_group_collective_ends_the_job_naming_the_group() {
    let dir = TempDir::new("faults-p2p", "group-shm");
    let f = kill_inside("group", 4, 3, Some(dir.path()));
    let line = error_of(&f, 2);
    assert!(line.contains("all_reduce #"), "{line}");
    assert!(line.contains("world ranks [2, 3]"), "{line}");
    assert!(
        line.contains("rank 3 died (process ")
            || line.contains("(rank 3 failed) while waiting for rank 3"),
        "{line}"
    );
    println!("CASE in a group: {line}");
    // tprun's teardown reads the group's own flight recorder (its call numbers are the group's).
    let g = f
        .stderr
        .lines()
        .find(|l| l.starts_with("tprun: in group world/1 (world ranks 2,3): rank "))
        .unwrap_or_else(|| panic!("no flight line for the group:\n{}", f.stderr));
    assert!(g.contains(" is at all_reduce #"), "{g}");
    println!("CASE the group's flight line: {g}");
}
