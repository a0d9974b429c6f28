//! Fault and bad-input suite (issue 9), through the real binary: ranks killed or stopped at random
//! points of `perf` and `generate`, tprun itself killed, many jobs back to back and at once, a full
//! shared-memory filesystem, and broken models and nonsense options for every command.
//!
//! Every case checks that tprun ends (each run has a deadline; a run past it is killed and the
//! test fails), exits non-zero with one clear line naming the file, field, value or rank (never a
//! panic or a backtrace hint), and leaves nothing behind: no process of the job (the pids from
//! /proc and from the launcher's summary are gone), no process holding its memory, no named
//! segment or temporary file (`common::leftovers`, proven on planted leaks at the end).
//!
//! Faults are injected from outside, so the product carries no test hook: the test finds rank r's
//! pid among tprun's children (RANK=r in /proc/PID/environ) and, after a random delay, sends it
//! SIGKILL, SIGSEGV or SIGTERM (a crash) or SIGSTOP (a rank that hangs outside the collectives).
//! The seed is printed; `TPRUN_FAULT_SEED=N` replays a run. `--nocapture` prints every case's
//! message (`CASE name: exit N: line`), which is the catalogue in the issue note.

use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::{
    code_of, drain, edit_header, edit_json, env_of, fixture, proc_stat, rank_programs_of,
    wait_limited, TempDir,
};

const BIN: &str = env!("CARGO_BIN_EXE_tprun");
/// Deadline of one tprun run in this suite (a hang detector, far above any normal run).
const RUN_LIMIT: Duration = Duration::from_secs(60);
/// Everything must be gone this long after a fault (docs/DESIGN.md, "Command line": teardown
/// starts within 1 s, plus the grace period).
const GONE_LIMIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Running tprun.

/// A running tprun whose stdout and stderr are collected by two threads (so a chatty job never
/// blocks on a full pipe).
struct Job {
    child: Child,
    out: Option<JoinHandle<String>>,
    err: Option<JoinHandle<String>>,
    /// Rank pids seen while it ran.
    seen: Vec<u32>,
}

struct Outcome {
    /// The exit code, or 128+N for signal N (what a shell reports).
    code: i32,
    stdout: String,
    stderr: String,
    /// tprun's pid (part of its run id, so of any name it could leave in /dev/shm).
    pid: u32,
    /// Rank pids seen while it ran and those in the summary table.
    rank_pids: Vec<u32>,
}

fn command(args: &[&str], env: &[(&str, &str)]) -> Command {
    // `ulimit -c 0`: a rank killed by SIGSEGV must not leave a core file in the checkout.
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "ulimit -c 0; exec \"$0\" \"$@\"", BIN])
        .args(args)
        .env_remove("TPRUN_ROLE")
        .env_remove("TPRUN_MODEL")
        .env_remove("TPRUN_SHM_DIR")
        .env_remove("TPRUN_SHM_SLOT_BYTES")
        .env_remove("TPRUN_COMM_TIMEOUT_S")
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

impl Job {
    fn start(args: &[&str], env: &[(&str, &str)]) -> Job {
        Job::start_cmd(command(args, env))
    }

    fn start_cmd(mut cmd: Command) -> Job {
        let mut child = cmd.spawn().expect("cannot start tprun");
        let out = drain(child.stdout.take().unwrap());
        let err = drain(child.stderr.take().unwrap());
        Job {
            child,
            out: Some(out),
            err: Some(err),
            seen: Vec::new(),
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The pids of ranks 0..n, once every one of them runs (they are found by RANK=r among
    /// tprun's children, under their guards).
    fn rank_pids(&mut self, n: usize) -> Vec<u32> {
        let t = Instant::now();
        loop {
            let mut found = vec![None; n];
            for p in rank_programs_of(self.pid()) {
                let env = env_of(p);
                if let Some(r) = env
                    .lines()
                    .find_map(|l| l.strip_prefix("RANK="))
                    .and_then(|r| r.parse::<usize>().ok())
                {
                    if r < n {
                        found[r] = Some(p);
                    }
                }
            }
            if found.iter().all(Option::is_some) {
                let pids: Vec<u32> = found.into_iter().flatten().collect();
                self.seen.extend(&pids);
                return pids;
            }
            if t.elapsed() > RUN_LIMIT || self.child.try_wait().unwrap().is_some() {
                let o = self.finish(Duration::from_secs(5));
                panic!(
                    "the {n} ranks never all appeared (exit {})\n{}",
                    o.code, o.stderr
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for tprun (killing it and failing the test past `limit`) and collects its output.
    fn finish(&mut self, limit: Duration) -> Outcome {
        let Some(status) = wait_limited(&mut self.child, limit) else {
            let err = self
                .err
                .take()
                .map(|h| h.join().unwrap())
                .unwrap_or_default();
            panic!("tprun did not end within {limit:?}: a hang\n{err}");
        };
        let stdout = self
            .out
            .take()
            .map(|h| h.join().unwrap())
            .unwrap_or_default();
        let stderr = self
            .err
            .take()
            .map(|h| h.join().unwrap())
            .unwrap_or_default();
        let mut rank_pids = self.seen.clone();
        rank_pids.extend(summary_pids(&stderr));
        Outcome {
            code: code_of(status),
            stdout,
            stderr,
            pid: self.pid(),
            rank_pids,
        }
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        // A failed test must not leave its job running: the ranks die with tprun (PDEATHSIG).
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs tprun to the end (within [`RUN_LIMIT`]) and checks that it left nothing behind.
fn run(args: &[&str], env: &[(&str, &str)]) -> Outcome {
    let o = Job::start(args, env).finish(RUN_LIMIT);
    assert_clean(&o);
    o
}

/// Pids in the launcher's summary table (the rows under `rank  pid  status  time_s  log`).
fn summary_pids(stderr: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    let mut in_table = false;
    for l in stderr.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() >= 3 && f[0] == "rank" && f[1] == "pid" && f[2] == "status" {
            in_table = true;
            continue;
        }
        if in_table {
            match (
                f.first().and_then(|s| s.parse::<usize>().ok()),
                f.get(1).and_then(|s| s.parse::<u32>().ok()),
            ) {
                (Some(_), Some(p)) => pids.push(p),
                _ => in_table = false,
            }
        }
    }
    pids
}

/// The summary row of rank `r`: `[rank, pid, status...]`.
fn summary_row(stderr: &str, r: usize) -> String {
    let mut in_table = false;
    for l in stderr.lines() {
        if l.starts_with("rank ") && l.contains(" pid ") && l.contains(" status ") {
            in_table = true;
            continue;
        }
        if in_table && l.split_whitespace().next() == Some(&r.to_string()) {
            return l.to_string();
        }
    }
    panic!("no summary row for rank {r} in:\n{stderr}");
}

// ---------------------------------------------------------------------------------------------
// /proc and /dev/shm.

/// Alive = exists and is not a zombie (a zombie has released everything but its pid).
fn alive(pid: u32) -> bool {
    proc_stat(pid).is_some_and(|(_, st)| !matches!(st, 'Z' | 'X' | 'x'))
}

/// Nothing of the job is left: every rank pid is gone (within [`GONE_LIMIT`]), and no named
/// segment, no process of the job holding its memory, no temporary file (`common::leftovers`:
/// the names the code gives them; the run id of tprun `pid` is `tprun-<pid>-<time>`).
fn assert_gone(tprun_pid: u32, pids: &[u32], stderr: &str) {
    let t = Instant::now();
    while pids.iter().any(|&p| alive(p)) {
        if t.elapsed() > GONE_LIMIT {
            let left: Vec<u32> = pids.iter().copied().filter(|&p| alive(p)).collect();
            for &p in &left {
                // SAFETY: kill(2) with a pid and a signal number has no memory effects.
                unsafe { libc::kill(p as i32, libc::SIGKILL) };
            }
            panic!("rank processes {left:?} still alive {GONE_LIMIT:?} later\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let run_id = format!("tprun-{tprun_pid}-");
    let left = common::leftovers(&run_id, tprun_pid, &[]);
    if !left.is_empty() {
        eprintln!("{stderr}");
        common::assert_no_leftovers(&run_id, tprun_pid, &[], GONE_LIMIT);
    }
}

fn assert_clean(o: &Outcome) {
    assert_gone(o.pid, &o.rank_pids, &o.stderr);
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) with a pid and a signal number has no memory effects.
    let rc = unsafe { libc::kill(pid as i32, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig}) failed");
}

/// Sends `sig` to a rank. Rust's runtime catches the first SIGSEGV (its stack-overflow check),
/// puts back the default action and returns: a real fault then happens again and kills, but a
/// SIGSEGV sent with kill(2) does not, so that one is sent until the rank dies.
fn kill_rank(pid: u32, sig: i32) {
    signal(pid, sig);
    for _ in 0..50 {
        if sig != libc::SIGSEGV || !alive(pid) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
        // SAFETY: kill(2) with a pid and a signal number has no memory effects.
        unsafe { libc::kill(pid as i32, sig) };
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGTERM => "SIGTERM",
        _ => "?",
    }
}

// ---------------------------------------------------------------------------------------------
// Error checks.

/// Strips the launcher's `[rankN]: ` prefix.
fn unprefixed(l: &str) -> &str {
    match l.strip_prefix("[rank").and_then(|r| r.split_once("]: ")) {
        Some((_, rest)) => rest,
        None => l,
    }
}

/// A failed run with a clean error: non-zero exit, no panic or backtrace hint, at most one error
/// line per rank, and one line holding every fragment of `want`. Returns that line.
fn clear_error(case: &str, o: &Outcome, want: &[&str]) -> String {
    assert_ne!(o.code, 0, "{case}: expected a failure\n{}", o.stderr);
    assert!(
        !o.stderr.contains("panicked") && !o.stderr.contains("RUST_BACKTRACE"),
        "{case}: a panic, not a clear error:\n{}",
        o.stderr
    );
    for r in 0..8 {
        let n = o
            .stderr
            .lines()
            .filter(|l| l.starts_with(&format!("[rank{r}]: ")) && l.contains("error"))
            .count();
        assert!(
            n <= 1,
            "{case}: rank {r} printed {n} error lines:\n{}",
            o.stderr
        );
    }
    let line = o
        .stderr
        .lines()
        .find(|l| want.iter().all(|w| l.contains(w)))
        .unwrap_or_else(|| panic!("{case}: {want:?} not on one line of:\n{}", o.stderr));
    let line = unprefixed(line).to_string();
    println!("CASE {case}: exit {}: {line}", o.code);
    line
}

/// [`clear_error`] for a job that started ranks: the summary names the failing rank too.
fn clear_rank_error(case: &str, o: &Outcome, want: &[&str]) -> String {
    let line = clear_error(case, o, want);
    assert!(
        o.stderr.contains("tprun: rank ") && o.stderr.contains(" failed: "),
        "{case}: no launcher summary:\n{}",
        o.stderr
    );
    line
}

// ---------------------------------------------------------------------------------------------
// Random points.

/// xorshift64*: enough randomness to pick kill points, and replayable from the printed seed.
struct Rng(u64);

impl Rng {
    fn new(test: &str) -> Rng {
        let seed = std::env::var("TPRUN_FAULT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        println!("{test}: TPRUN_FAULT_SEED={seed}");
        Rng(seed | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A long `perf` run on `n` ranks in a random collective at a random size.
fn long_perf_args(rng: &mut Rng, n: usize) -> Vec<String> {
    let op = ["all-reduce", "all-gather", "reduce-scatter", "broadcast"][rng.below(4) as usize];
    let size = ["64", "4K", "256K", "2M"][rng.below(4) as usize];
    let mut a = vec!["-n".to_string(), n.to_string()];
    a.extend(
        [
            "perf",
            "--op",
            op,
            "--min-bytes",
            size,
            "--max-bytes",
            size,
            "--iters",
            "1000000000",
            "--warmup",
            "0",
        ]
        .map(String::from),
    );
    a
}

/// A long greedy `generate` on `n` ranks (tiny model, 30000 new tokens: tens of seconds).
fn long_generate_args(n: usize) -> Vec<String> {
    let model = fixture("tiny-hub-bf16-tied");
    [
        "-n",
        &n.to_string(),
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--input-ids",
        "1,2,3",
        "--ignore-eos",
        "--max-new-tokens",
        "30000",
    ]
    .map(String::from)
    .to_vec()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

// ---------------------------------------------------------------------------------------------
// Crashes, hangs, a killed launcher.

/// A rank crashing (SIGKILL, SIGSEGV, SIGTERM) at a random point of perf and of generate: every
/// rank is gone within 10 s, tprun exits 128+signal and its summary names the rank.
#[test]
fn a_rank_crashing_at_a_random_point_is_reported() {
    let mut rng = Rng::new("crash");
    for program in ["perf", "generate"] {
        for sig in [libc::SIGKILL, libc::SIGSEGV, libc::SIGTERM] {
            let n = 2 + rng.below(2) as usize;
            let victim = rng.below(n as u64) as usize;
            let delay = Duration::from_millis(rng.below(800));
            let args = match program {
                "perf" => long_perf_args(&mut rng, n),
                _ => long_generate_args(n),
            };
            let case = format!(
                "{program} -n {n}: {} to rank {victim} after {delay:?}",
                signal_name(sig)
            );
            let mut job = Job::start(&strs(&args), &[]);
            let pids = job.rank_pids(n);
            std::thread::sleep(delay);
            assert!(
                job.child.try_wait().unwrap().is_none(),
                "{case}: the job ended before the fault"
            );
            kill_rank(pids[victim], sig);
            let o = job.finish(GONE_LIMIT);
            assert_clean(&o);
            assert_eq!(o.code, 128 + sig, "{case}: exit code\n{}", o.stderr);
            let name = signal_name(sig);
            let line = format!("tprun: rank {victim} failed: killed by {name}");
            assert!(
                o.stderr.contains(&line),
                "{case}: no `{line}` in\n{}",
                o.stderr
            );
            assert!(summary_row(&o.stderr, victim).contains(name), "{case}");
            assert!(
                !o.stderr.contains("panicked") && !o.stderr.contains("RUST_BACKTRACE"),
                "{case}\n{}",
                o.stderr
            );
            println!("CASE {case}: exit {}: {line}", o.code);
            // What the surviving ranks said, if they got to say anything before SIGTERM.
            for l in o.stderr.lines().filter(|l| l.contains("error:")) {
                println!("      {l}");
            }
        }
    }
}

/// A rank stopped (SIGSTOP) outside the collectives: the others' collective deadline fires with a
/// message naming it, and the launcher ends the job (SIGKILL after the grace period).
#[test]
fn a_rank_hanging_outside_collectives_trips_the_deadline() {
    let mut rng = Rng::new("hang");
    for (program, hung) in [("perf", 1usize), ("generate", 0)] {
        let args = match program {
            "perf" => long_perf_args(&mut rng, 2),
            _ => long_generate_args(2),
        };
        let mut args = strs(&args);
        args.splice(0..0, ["--grace-period", "1"]);
        let mut job = Job::start(&args, &[("TPRUN_COMM_TIMEOUT_S", "2")]);
        let pids = job.rank_pids(2);
        std::thread::sleep(Duration::from_millis(rng.below(500)));
        signal(pids[hung], libc::SIGSTOP);
        let o = job.finish(Duration::from_secs(30));
        assert_clean(&o);
        let other = 1 - hung;
        let case = format!("{program} -n 2: rank {hung} stopped (SIGSTOP)");
        let line = clear_rank_error(
            &case,
            &o,
            &[
                &format!("[rank{other}]: tprun: error:"),
                &format!("rank {hung} did not arrive within 2.0 s"),
                "TPRUN_COMM_TIMEOUT_S",
            ],
        );
        assert!(line.contains("#"), "{line}");
        assert_eq!(o.code, 1, "{case}\n{}", o.stderr);
        assert!(
            o.stderr
                .contains(&format!("tprun: rank {other} failed: exit code 1")),
            "{case}\n{}",
            o.stderr
        );
        assert!(
            summary_row(&o.stderr, hung).contains("SIGKILL"),
            "{}",
            o.stderr
        );
    }
}

/// The same hang with the default (60 s) collective deadline: `--timeout` ends the job, 124.
#[test]
fn timeout_ends_a_job_with_a_hung_rank() {
    let mut rng = Rng::new("timeout");
    let args = long_perf_args(&mut rng, 2);
    let mut args = strs(&args);
    args.splice(0..0, ["--timeout", "2", "--grace-period", "1"]);
    let mut job = Job::start(&args, &[]);
    let pids = job.rank_pids(2);
    signal(pids[1], libc::SIGSTOP);
    let o = job.finish(Duration::from_secs(30));
    assert_clean(&o);
    assert_eq!(o.code, 124, "{}", o.stderr);
    let line = clear_error(
        "perf -n 2 --timeout 2: rank 1 stopped",
        &o,
        &["tprun: timed out after 2s (exit code 124)"],
    );
    assert!(line.starts_with("tprun:"));
    assert!(
        summary_row(&o.stderr, 1).contains("SIGKILL"),
        "{}",
        o.stderr
    );
}

/// kill -9 of tprun in the middle of a run: every rank is gone (PR_SET_PDEATHSIG) and no segment
/// is left, in /dev/shm or in a TPRUN_SHM_DIR.
#[test]
fn killing_tprun_itself_leaves_nothing() {
    let mut rng = Rng::new("kill-tprun");
    let shm_dir = std::env::temp_dir().join(format!("tprun-faults-shm-{}", std::process::id()));
    std::fs::create_dir_all(&shm_dir).unwrap();
    let dir_s = shm_dir.to_str().unwrap().to_string();
    for (program, env) in [
        ("perf", vec![]),
        ("generate", vec![]),
        ("perf", vec![("TPRUN_SHM_DIR", dir_s.as_str())]),
    ] {
        let args = match program {
            "perf" => long_perf_args(&mut rng, 2),
            _ => long_generate_args(2),
        };
        let mut job = Job::start(&strs(&args), &env);
        let pids = job.rank_pids(2);
        std::thread::sleep(Duration::from_millis(rng.below(500)));
        signal(job.pid(), libc::SIGKILL);
        let o = job.finish(GONE_LIMIT);
        assert_eq!(o.code, 128 + libc::SIGKILL);
        assert_gone(o.pid, &pids, &o.stderr);
        let run_id = format!("tprun-{}-", o.pid);
        assert_eq!(
            common::leftovers(&run_id, o.pid, &[&shm_dir]),
            Vec::<String>::new()
        );
        let left: Vec<_> = std::fs::read_dir(&shm_dir).unwrap().flatten().collect();
        assert!(left.is_empty(), "left in TPRUN_SHM_DIR: {left:?}");
        println!("CASE kill -9 tprun during {program} {env:?}: ranks {pids:?} gone");
    }
    std::fs::remove_dir(&shm_dir).unwrap();
}

/// kill -9 of tprun during a `--trace` run: besides the ranks and their memory, nothing of the
/// trace is left in TMPDIR or beside the output (the ranks' events live in a memfd) and no trace
/// file is written.
#[test]
fn killing_tprun_during_a_trace_leaves_nothing() {
    let mut rng = Rng::new("kill-tprun-trace");
    let tmp = std::env::temp_dir().join(format!("tprun-faults-trace-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(tmp.join("tmp")).unwrap();
    let out = tmp.join("t.json");
    let mut args = long_generate_args(2);
    args.extend(["--trace".to_string(), out.to_str().unwrap().to_string()]);
    let mut job = Job::start(
        &strs(&args),
        &[("TMPDIR", tmp.join("tmp").to_str().unwrap())],
    );
    let pids = job.rank_pids(2);
    std::thread::sleep(Duration::from_millis(rng.below(500)));
    signal(job.pid(), libc::SIGKILL);
    let o = job.finish(GONE_LIMIT);
    assert_eq!(o.code, 128 + libc::SIGKILL);
    assert_gone(o.pid, &pids, &o.stderr);
    let mut left: Vec<_> = std::fs::read_dir(tmp.join("tmp"))
        .unwrap()
        .flatten()
        .collect();
    left.extend(
        std::fs::read_dir(&tmp)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name() != "tmp"),
    );
    assert!(left.is_empty(), "left behind: {left:?}\n{}", o.stderr);
    // The trace's temporary output (`.t.json.<pid>.<n>.tmp`) would be in `tmp`, empty above.
    assert!(common::leftovers(&format!("tprun-{}-", o.pid), o.pid, &[&tmp]).is_empty());
    std::fs::remove_dir_all(&tmp).unwrap();
    println!("CASE kill -9 tprun during generate --trace: ranks {pids:?} gone, nothing on disk");
}

// ---------------------------------------------------------------------------------------------
// Many jobs.

fn perf_check_args(max: &str) -> Vec<&str> {
    vec![
        "-n",
        "2",
        "--only-rank",
        "0",
        "--no-prefix",
        "perf",
        "--op",
        "all",
        "--max-bytes",
        max,
        "--iters",
        "3",
        "--warmup",
        "1",
        "--check",
        "--json",
    ]
}

/// Every row of a `perf --check --json` result has 0 wrong elements.
fn assert_perf_correct(o: &Outcome) {
    assert_eq!(o.code, 0, "{}", o.stderr);
    let j: Value = serde_json::from_str(o.stdout.trim())
        .unwrap_or_else(|e| panic!("perf --json output is not JSON ({e}):\n{}", o.stdout));
    let rows = j["rows"].as_array().unwrap();
    assert!(rows.len() >= 4, "{}", o.stdout);
    for r in rows {
        assert_eq!(r["wrong"], 0, "{r}");
    }
}

fn generate_ids_args() -> Vec<String> {
    let model = fixture("tiny-hub-bf16-tied");
    [
        "-n",
        "2",
        "--only-rank",
        "0",
        "--no-prefix",
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--input-ids",
        "1,2,3,4",
        "--ignore-eos",
        "--max-new-tokens",
        "200",
        "--json",
    ]
    .map(String::from)
    .to_vec()
}

fn output_ids(o: &Outcome) -> Value {
    assert_eq!(o.code, 0, "{}", o.stderr);
    let j: Value = serde_json::from_str(o.stdout.trim())
        .unwrap_or_else(|e| panic!("generate --json output is not JSON ({e}):\n{}", o.stdout));
    j["output_ids"].clone()
}

/// 20 jobs back to back, then 4 at once (2 perf --check, 2 generate): no name collisions, no
/// cross-talk: every result is correct.
#[test]
fn many_jobs_back_to_back_and_at_once() {
    for _ in 0..20 {
        assert_perf_correct(&run(&perf_check_args("16K"), &[]));
    }
    let solo = output_ids(&run(&strs(&generate_ids_args()), &[]));
    assert_eq!(solo.as_array().unwrap().len(), 200);

    let gen = generate_ids_args();
    let mut jobs = [
        Job::start(&perf_check_args("1M"), &[]),
        Job::start(&strs(&gen), &[]),
        Job::start(&perf_check_args("1M"), &[]),
        Job::start(&strs(&gen), &[]),
    ];
    let outs: Vec<Outcome> = jobs.iter_mut().map(|j| j.finish(RUN_LIMIT)).collect();
    for (i, o) in outs.iter().enumerate() {
        assert_clean(o);
        if i % 2 == 0 {
            assert_perf_correct(o);
        } else {
            assert_eq!(output_ids(o), solo, "concurrent generate {i}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Shared memory that cannot be had.

/// A TPRUN_SHM_DIR on a full (1 MiB) tmpfs: a clear error at start, before any rank runs. Needs a
/// private tmpfs, so user+mount namespaces (`unshare -Urm`); where those are not allowed that part
/// is logged as skipped (a failure on CI). A directory that does not exist and a bad slot size always run.
#[test]
fn shared_memory_that_cannot_be_had_is_a_clear_error_at_start() {
    let o = run(
        &["-n", "2", "perf", "--max-bytes", "8"],
        &[("TPRUN_SHM_DIR", "/nonexistent/tprun-shm")],
    );
    clear_error(
        "TPRUN_SHM_DIR missing",
        &o,
        &[
            "tprun: error: cannot set up the job's shared memory for 2 ranks",
            "/nonexistent/tprun-shm",
        ],
    );
    assert!(summary_pids(&o.stderr).is_empty(), "no rank may start");

    let o = run(
        &["-n", "2", "perf", "--max-bytes", "8"],
        &[("TPRUN_SHM_SLOT_BYTES", "5")],
    );
    clear_error("TPRUN_SHM_SLOT_BYTES=5", &o, &["TPRUN_SHM_SLOT_BYTES=5"]);

    let probe = Command::new("unshare").args(["-Urm", "true"]).output();
    if !probe.is_ok_and(|o| o.status.success()) {
        common::skip(
            "faults shared_memory_that_cannot_be_had (full tmpfs part)",
            "`unshare -Urm` is not available here",
        );
        return;
    }
    let dir = std::env::temp_dir().join(format!("tprun-faults-tmpfs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut cmd = Command::new("unshare");
    cmd.args([
        "-Urm",
        "sh",
        "-c",
        r#"mount -t tmpfs -o size=1m tmpfs "$D" && exec "$0" "$@""#,
        BIN,
        "-n",
        "2",
        "perf",
        "--max-bytes",
        "8",
    ])
    .env("D", &dir)
    .env("TPRUN_SHM_DIR", &dir)
    .env_remove("TPRUN_ROLE")
    .env_remove("TPRUN_SHM_SLOT_BYTES")
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let o = Job::start_cmd(cmd).finish(RUN_LIMIT);
    std::fs::remove_dir(&dir).unwrap();
    clear_error(
        "full TPRUN_SHM_DIR (1 MiB tmpfs)",
        &o,
        &[
            "tprun: error: cannot set up the job's shared memory for 2 ranks",
            "No space left on device",
        ],
    );
    assert!(summary_pids(&o.stderr).is_empty(), "no rank may start");
}

// ---------------------------------------------------------------------------------------------
// Bad models (tests/logits.rs covers the missing directory, unsupported and unknown dtypes, the
// truncated file, overlapping offsets, a wrong shape, a missing tensor, a missing config field,
// kv heads not dividing the heads and a missing shard for `logits`; these are the rest, and each
// runs for `generate` and `logits` on 2 ranks).

const TINY: &str = "tiny-hub-bf16-tied";

/// Runs `generate` and `logits` at TP 2 on the model `m` and checks both fail cleanly with `want`
/// on one line (plus the summary); `logits` only when `for_logits`.
fn bad_model(case: &str, m: &str, want: &[&str], for_logits: bool) {
    let o = run(
        &["-n", "2", "generate", "--model", m, "--prompt", "hi"],
        &[],
    );
    clear_rank_error(&format!("generate: {case}"), &o, want);
    assert!(o.stdout.is_empty(), "{case}: {}", o.stdout);
    if for_logits {
        let out = std::env::temp_dir().join(format!("tprun-faults-out-{}.st", std::process::id()));
        let o = run(
            &[
                "-n",
                "2",
                "logits",
                "--model",
                m,
                "--input-ids",
                "1,2",
                "--out",
                out.to_str().unwrap(),
            ],
            &[],
        );
        clear_rank_error(&format!("logits: {case}"), &o, want);
        assert!(!out.exists(), "{case}: logits wrote {}", out.display());
    }
}

/// Like [`bad_model`] for a model whose directory or config.json is bad: tprun reads config.json
/// before any rank starts (docs/DESIGN.md, "Command line"), so the error is one line from tprun
/// itself, exit 1, and no rank runs.
fn bad_config(case: &str, m: &str, want: &[&str]) {
    let out = std::env::temp_dir().join(format!("tprun-faults-cfg-{}.st", std::process::id()));
    let logits = [
        "-n",
        "2",
        "logits",
        "--model",
        m,
        "--input-ids",
        "1,2",
        "--out",
        out.to_str().unwrap(),
    ];
    let generate = ["-n", "2", "generate", "--model", m, "--prompt", "hi"];
    for (program, args) in [("generate", &generate[..]), ("logits", &logits[..])] {
        let case = format!("{program}: {case}");
        let o = run(args, &[]);
        clear_error(&case, &o, want);
        assert_eq!(o.code, 1, "{case}: {}", o.stderr);
        let lines: Vec<&str> = o.stderr.lines().collect();
        assert!(
            lines.len() == 1 && lines[0].starts_with("tprun: error: "),
            "{case}: not one line from tprun:\n{}",
            o.stderr
        );
        assert!(
            summary_pids(&o.stderr).is_empty(),
            "{case}: no rank may start"
        );
        assert!(o.stdout.is_empty(), "{case}: {}", o.stdout);
        assert!(!out.exists(), "{case}: logits wrote {}", out.display());
    }
}

#[test]
fn bad_model_directories_and_configs() {
    let file = fixture(TINY).join("config.json");
    let f = file.to_str().unwrap();
    bad_config(
        "model path is a file",
        f,
        &["model directory", f, "is not a directory"],
    );

    let m = TempDir::copy_of("faults", "nocfg", TINY, &[]);
    std::fs::remove_file(m.join("config.json")).unwrap();
    bad_config(
        "config.json missing",
        &m.s(),
        &["cannot read", "config.json", "No such file or directory"],
    );
    std::fs::create_dir(m.join("config.json")).unwrap();
    bad_config(
        "config.json unreadable (a directory)",
        &m.s(),
        &["cannot read", "config.json", "Is a directory"],
    );

    let m = TempDir::copy_of("faults", "cfg", TINY, &[]);
    let full = std::fs::read(m.join("config.json")).unwrap();
    std::fs::write(m.join("config.json"), &full[..full.len() / 2]).unwrap();
    bad_config(
        "config.json truncated",
        &m.s(),
        &["config.json", "not valid JSON"],
    );
    std::fs::write(m.join("config.json"), &full).unwrap();
    edit_json(&m.join("config.json"), |c| {
        c.insert("vocab_size".into(), "big".into());
    });
    bad_config(
        "config.json vocab_size a string",
        &m.s(),
        &["config.json", "vocab_size"],
    );
    edit_json(&m.join("config.json"), |c| {
        c.insert("vocab_size".into(), 448.into());
        c.insert("num_attention_heads".into(), 3.into());
        c.insert("num_key_value_heads".into(), 3.into());
    });
    bad_config(
        "config.json heads not dividing hidden_size",
        &m.s(),
        &[
            "config.json",
            "hidden_size (64) is not divisible by num_attention_heads (3)",
        ],
    );
    edit_json(&m.join("config.json"), |c| {
        c.insert("num_attention_heads".into(), 4.into());
        c.insert("num_key_value_heads".into(), 2.into());
        c.insert("intermediate_size".into(), 100.into());
    });
    bad_model(
        "config.json intermediate_size not the checkpoint's",
        &m.s(),
        &["model.safetensors", "mlp", "expected [", "100"],
        true,
    );
}

#[test]
fn bad_weights_indexes_and_tokenizers() {
    let m = TempDir::copy_of("faults", "st", TINY, &[]);
    let st = m.join("model.safetensors");
    let full = std::fs::read(&st).unwrap();
    std::fs::write(&st, b"abc").unwrap();
    bad_model(
        "model.safetensors of 3 bytes",
        &m.s(),
        &["model.safetensors", "truncated: 3 bytes"],
        true,
    );
    let mut junk = 16u64.to_le_bytes().to_vec();
    junk.extend_from_slice(b"not json at all!");
    std::fs::write(&st, junk).unwrap();
    bad_model(
        "header not JSON",
        &m.s(),
        &["model.safetensors", "header is not valid JSON"],
        true,
    );
    let mut huge = u64::MAX.to_le_bytes().to_vec();
    huge.extend_from_slice(&full[8..]);
    std::fs::write(&st, huge).unwrap();
    bad_model(
        "header length 2^64-1",
        &m.s(),
        &[
            "model.safetensors",
            "header length 18446744073709551615 runs past the end",
        ],
        true,
    );
    std::fs::write(&st, &full).unwrap();
    edit_header(&st, |h| {
        let o = h["model.norm.weight"]["data_offsets"].clone();
        h["model.norm.weight"]["data_offsets"] = serde_json::json!([o[1], o[0]]);
    });
    bad_model(
        "data_offsets reversed",
        &m.s(),
        &[
            "model.safetensors",
            "tensor model.norm.weight",
            "are reversed",
        ],
        true,
    );
    std::fs::write(&st, &full).unwrap();
    edit_header(&st, |h| {
        h["model.norm.weight"]["data_offsets"] = serde_json::json!([0, u64::MAX]);
    });
    bad_model(
        "data_offsets out of range",
        &m.s(),
        &[
            "model.safetensors",
            "tensor model.norm.weight",
            "run past the end of the data",
        ],
        true,
    );
    std::fs::write(&st, &full).unwrap();
    edit_header(&st, |h| {
        h["model.norm.weight"]["shape"] = serde_json::json!([3]);
    });
    bad_model(
        "shape and data_offsets disagree",
        &m.s(),
        &[
            "tensor model.norm.weight",
            "shape [3] of BF16 needs 6 bytes",
        ],
        true,
    );
    std::fs::write(&st, &full).unwrap();
    edit_header(&st, |h| {
        h["model.norm.weight"]["dtype"] = "F32".into();
    });
    bad_model(
        "dtype F32 for BF16 bytes",
        &m.s(),
        &["tensor model.norm.weight", "of F32 needs"],
        true,
    );
    std::fs::remove_file(&st).unwrap();
    bad_model(
        "no model.safetensors and no index",
        &m.s(),
        &["model.safetensors"],
        true,
    );

    let m = TempDir::copy_of("faults", "idx", "tiny-sharded", &[]);
    let idx = m.join("model.safetensors.index.json");
    let full = std::fs::read(&idx).unwrap();
    std::fs::write(&idx, &full[..full.len() / 2]).unwrap();
    bad_model(
        "index.json truncated",
        &m.s(),
        &["model.safetensors.index.json"],
        true,
    );
    std::fs::write(&idx, &full).unwrap();
    edit_json(&idx, |j| {
        j["weight_map"]["model.norm.weight"] = "model-00009-of-00003.safetensors".into();
    });
    bad_model(
        "index.json naming a missing shard (generate)",
        &m.s(),
        &["model-00009-of-00003.safetensors"],
        false,
    );
    std::fs::write(&idx, &full).unwrap();
    edit_json(&idx, |j| {
        let map = j["weight_map"].as_object_mut().unwrap();
        let shard = map["model.norm.weight"].as_str().unwrap().to_string();
        let other = map
            .values()
            .map(|v| v.as_str().unwrap().to_string())
            .find(|s| *s != shard)
            .unwrap();
        map.insert("model.norm.weight".into(), other.into());
    });
    bad_model(
        "index.json pointing a tensor at the wrong shard",
        &m.s(),
        &["model.norm.weight"],
        true,
    );

    // The tokenizer: absent at TP 2 (tests/generate.rs covers one rank) and broken.
    let m = TempDir::copy_of("faults", "tok", TINY, &[]);
    std::fs::remove_file(m.join("tokenizer.json")).unwrap();
    bad_model(
        "tokenizer.json absent",
        &m.s(),
        &["missing tokenizer", "tokenizer.json does not exist"],
        false,
    );
    std::fs::write(
        m.join("tokenizer.json"),
        "{\"version\": \"1.0\", \"model\": 3",
    )
    .unwrap();
    bad_model("tokenizer.json broken", &m.s(), &["tokenizer.json"], false);
    let out = m.join("out.safetensors");
    let o = run(
        &[
            "-n",
            "2",
            "logits",
            "--model",
            &m.s(),
            "--text",
            "hi",
            "--out",
            out.to_str().unwrap(),
        ],
        &[],
    );
    clear_rank_error(
        "logits --text: tokenizer.json broken",
        &o,
        &["tokenizer.json"],
    );
}

// ---------------------------------------------------------------------------------------------
// Bad inputs and options, per command.

/// Runs tprun with `args` (and `env`) and checks a clean failure with `want` on one line. Option
/// values clap rejects fail in tprun before any rank starts; the rest go through the ranks and
/// the summary.
fn bad(case: &str, args: &[&str], want: &[&str]) -> Outcome {
    let o = run(args, &[]);
    clear_error(case, &o, want);
    o
}

#[test]
fn bad_inputs_for_generate_and_logits() {
    let tiny = fixture(TINY);
    let t = tiny.to_str().unwrap();
    let gen = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = ["-n", "2", "generate", "--model", t]
            .map(String::from)
            .to_vec();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let o = bad(
        "generate: token id out of range",
        &strs(&gen(&["--input-ids", "1,448"])),
        &["token id 448 (position 1) is outside the vocabulary (vocab_size 448)"],
    );
    assert!(o.stderr.contains("tprun: rank "), "{}", o.stderr);
    let t5 = fixture("tiny-t5-f32-untied");
    let long: Vec<String> = (0..200).map(|i| (i % 300).to_string()).collect();
    let long = long.join(",");
    bad(
        "generate: prompt past the context",
        &[
            "-n",
            "2",
            "generate",
            "--model",
            t5.to_str().unwrap(),
            "--input-ids",
            &long,
        ],
        &["200", "128"],
    );
    // (option, value, the part of the value clap quotes)
    for (opt, val, shown) in [
        ("--input-ids", "", ""),
        ("--input-ids", "1,x", "x"),
        ("--input-ids", "1,-1", "-1"),
        ("--input-ids", "1,99999999999", "99999999999"),
        ("--max-new-tokens", "0", "0"),
        ("--max-new-tokens", "many", "many"),
        ("--temperature", "nan", "nan"),
        ("--top-k", "abc", "abc"),
        ("--seed", "-1", "-1"),
        ("--dtype", "f64", "f64"),
    ] {
        let o = bad(
            &format!("generate {opt} {val:?}"),
            &strs(&gen(&["--prompt", "hi", &format!("{opt}={val}")])),
            &[opt, &format!("'{shown}'")],
        );
        assert_eq!(o.code, 2, "a usage error: {}", o.stderr);
    }
    bad(
        "generate without a prompt",
        &strs(&gen(&[])),
        &["--prompt", "--input-ids"],
    );

    let out = std::env::temp_dir().join(format!("tprun-faults-o-{}.st", std::process::id()));
    let o = out.to_str().unwrap();
    bad(
        "logits --out in a missing directory",
        &[
            "-n",
            "2",
            "logits",
            "--model",
            t,
            "--input-ids",
            "1",
            "--out",
            "/nonexistent/o.st",
        ],
        &["--out /nonexistent/o.st: directory /nonexistent does not exist"],
    );
    bad(
        "logits --dtype f64",
        &[
            "-n",
            "2",
            "logits",
            "--model",
            t,
            "--input-ids",
            "1",
            "--dtype",
            "f64",
            "--out",
            o,
        ],
        &["--dtype", "'f64'"],
    );
    bad(
        "logits without ids or text",
        &["-n", "2", "logits", "--model", t, "--out", o],
        &["error: the following required arguments were not provided"],
    );
    bad(
        "logits without --out",
        &["-n", "2", "logits", "--model", t, "--input-ids", "1"],
        &["--out"],
    );
    assert!(!out.exists());
}

#[test]
fn bad_inputs_for_bench_perf_and_compare() {
    // bench: the flag or value is named whether bench refuses the option or the model.
    let o = run(&["-n", "2", "bench", "--bogus-flag"], &[]);
    clear_error("bench --bogus-flag", &o, &["--bogus-flag"]);
    let o = run(&["-n", "2", "bench", "--model", "/nonexistent/m"], &[]);
    let line = clear_error("bench --model /nonexistent/m", &o, &["error"]);
    assert!(
        line.contains("--model") || line.contains("/nonexistent/m"),
        "{line}"
    );

    for (args, want) in [
        (&["--op", "foo"][..], &["--op", "'foo'"][..]),
        (
            &["--max-bytes", "banana"],
            &["--max-bytes", "'banana'", "not a size"],
        ),
        (&["--max-bytes", "5T"], &["--max-bytes", "'5T'"]),
        (&["--dtype", "q4"], &["--dtype", "'q4'"]),
        (&["--iters", "0"], &["--iters must be at least 1"]),
        (
            &["--min-bytes", "1M", "--max-bytes", "1K"],
            &["--min-bytes 1048576 is larger than --max-bytes 1024"],
        ),
        (&["--root", "5"], &["--root 5 is out of range for 2 ranks"]),
        (
            &["--max-bytes", "900G", "--iters", "1"],
            &["--max-bytes 966367641600", "more than this machine's"],
        ),
    ] {
        let mut a = vec!["-n", "2", "perf"];
        a.extend_from_slice(args);
        bad(&format!("perf {}", args.join(" ")), &a, want);
    }

    // compare runs in tprun itself: one line, no ranks.
    let d = TempDir::copy_of("faults", "cmp", TINY, &[]);
    let good = fixture(TINY).join("model.safetensors");
    let g = good.to_str().unwrap();
    let st = d.join("model.safetensors");
    let s = st.to_str().unwrap();
    let full = std::fs::read(&st).unwrap();
    let check = |case: &str, want: &[&str]| {
        let o = run(&["compare", g, s], &[]);
        clear_error(&format!("compare: {case}"), &o, want);
        assert_eq!(o.stderr.lines().count(), 1, "{}", o.stderr);
    };
    std::fs::write(&st, "not a safetensors file\n").unwrap();
    check(
        "a text file",
        &[
            s,
            "is not a valid safetensors file: header length",
            "runs past the end of the file (23 bytes)",
        ],
    );
    std::fs::write(&st, &full[..100]).unwrap();
    check(
        "truncated",
        &[
            s,
            "is not a valid safetensors file: header length",
            "(100 bytes)",
        ],
    );
    let text = b"{\"x\": {\"dtype\"";
    let mut junk = (text.len() as u64).to_le_bytes().to_vec();
    junk.extend_from_slice(text);
    std::fs::write(&st, junk).unwrap();
    check("header not JSON", &[s, "header is not valid JSON"]);
    std::fs::write(&st, &full).unwrap();
    edit_header(&st, |h| {
        h["model.norm.weight"]["dtype"] = "I16".into();
    });
    check(
        "an I16 tensor",
        &["model.norm.weight", s, "unsupported dtype"],
    );
    let o = run(&["compare", g, g, "--tol", "abc"], &[]);
    clear_error("compare --tol abc", &o, &["--tol", "'abc'"]);
}

// ---------------------------------------------------------------------------------------------
// The leftover check itself: each kind of leftover, planted on purpose, is reported.

/// A run id no job of this suite has (tprun's are `tprun-<its pid>-<time>`; this pid is the
/// test binary's).
fn planted_run_id(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("tprun-{}-planted-{tag}-{nanos}", std::process::id())
}

/// A named segment leaked the way the code can leak one: rank 0 of a job started by hand creates
/// `/dev/shm/tprun-<uid>-<run id>` and is killed with SIGKILL before rank 1 came to unlink it.
#[test]
fn the_leftover_check_reports_a_leaked_named_segment() {
    let id = planted_run_id("named");
    // SAFETY: getuid cannot fail.
    let path =
        std::path::PathBuf::from(format!("/dev/shm/tprun-{}-{id}", unsafe { libc::getuid() }));
    let mut rank0 = Command::new(BIN)
        .args(["perf", "--max-bytes", "8"])
        .env("TPRUN_ROLE", "rank")
        .env("RANK", "0")
        .env("WORLD_SIZE", "2")
        .env("TPRUN_RUN_ID", &id)
        .env("TPRUN_COMM_TIMEOUT_S", "60")
        .env_remove("TPRUN_SHM_FD")
        .env_remove("TPRUN_SHM_DIR")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !path.exists() {
        assert!(
            t.elapsed() < RUN_LIMIT,
            "rank 0 never created {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    rank0.kill().unwrap();
    rank0.wait().unwrap();
    let left = common::leftovers(&id, rank0.id(), &[]);
    let _ = std::fs::remove_file(&path);
    assert_eq!(left, [format!("file {}", path.display())]);
    assert!(common::leftovers(&id, rank0.id(), &[]).is_empty());
}

/// A process of the job still holding the job's memfd (planted: `sleep` with the run id in its
/// environment and a memfd named as tprun names the segment's) is reported, with what it holds.
#[test]
fn the_leftover_check_reports_a_process_holding_the_job_memory() {
    use std::os::unix::process::CommandExt;
    let id = planted_run_id("memfd");
    let mut cmd = Command::new("sleep");
    cmd.arg("300").env("TPRUN_RUN_ID", &id);
    // SAFETY: memfd_create is a system call (async-signal-safe); the fd is left open on
    // purpose for `sleep` to inherit.
    unsafe {
        cmd.pre_exec(|| {
            if libc::memfd_create(c"tprun-shm".as_ptr(), 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut leak = cmd.spawn().unwrap();
    let pid = leak.id();
    let t = Instant::now();
    let left = loop {
        let left = common::leftovers(&id, pid, &[]);
        // The environment and fds are there once `sleep` runs (after exec).
        if !left.is_empty() || t.elapsed() > RUN_LIMIT {
            break left;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    leak.kill().unwrap();
    leak.wait().unwrap();
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(
        left[0].starts_with(&format!("process {pid} holding"))
            && left[0].contains("/memfd:tprun-shm"),
        "{left:?}"
    );
    assert!(common::leftovers(&id, pid, &[]).is_empty());
}

/// The unlinked-at-once file of a `TPRUN_SHM_DIR` without O_TMPFILE, and an output's temporary
/// file, left in the folders searched, are reported.
#[test]
fn the_leftover_check_reports_leftover_files_in_the_job_folders() {
    let d = TempDir::new("faults", "planted-files");
    let tprun_pid = 4_000_000; // above any pid_max: no real job's
    let id = format!("tprun-{tprun_pid}-");
    assert!(common::leftovers(&id, tprun_pid, &[d.path()]).is_empty());
    let seg = d.join(format!(".tprun-{tprun_pid}-123456789"));
    let tmp = d.join(".t.json.4321.0.tmp");
    for f in [&seg, &tmp] {
        std::fs::write(f, "").unwrap();
    }
    let mut left = common::leftovers(&id, tprun_pid, &[d.path()]);
    left.sort();
    assert_eq!(
        left,
        [
            format!("file {}", tmp.display()),
            format!("file {}", seg.display())
        ]
    );
}
