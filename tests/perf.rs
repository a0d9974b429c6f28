//! End-to-end tests of the collectives through the real binary: `tprun perf --check` on 2, 3 and
//! 4 ranks (4 ranks also on a 2-core box), a rank killed in the middle of an all-reduce, a full
//! shared-memory filesystem, and no /dev/shm entry left behind.
//!
//! Two ways to start the ranks: through the launcher (`tprun -n N perf`), and by hand (N
//! processes with RANK / WORLD_SIZE / TPRUN_RUN_ID and TPRUN_ROLE=rank), which exercises the named
//! /dev/shm rendezvous.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

mod common;
use common::{drain, env_of, rank_programs_of, wait_limited};

const BIN: &str = env!("CARGO_BIN_EXE_tprun");

fn sigkill(pid: u32) {
    // SAFETY: kill(2) has no memory effects; `pid` is a rank process this test started.
    let rc = unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    assert_eq!(rc, 0, "kill {pid}");
}

/// A run id no other test (or concurrent test run) uses.
fn run_id(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("test-{tag}-{}-{nanos}", std::process::id())
}

/// /dev/shm entries that mention `id` (there must be none once a job is over).
fn shm_entries(id: &str) -> Vec<PathBuf> {
    std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.to_string_lossy().contains(id))
                .collect()
        })
        .unwrap_or_default()
}

/// Rank processes started by hand; killed if the test fails half-way.
struct Ranks {
    children: Vec<Option<Child>>,
}

impl Ranks {
    /// Named rendezvous: the ranks share the run id `id`.
    fn start(n: usize, id: &str, extra_env: &[(&str, &str)], args: &[&str]) -> Ranks {
        let mut env: Vec<(String, String)> = vec![("TPRUN_RUN_ID".into(), id.into())];
        env.extend(
            extra_env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        Ranks::start_env(n, &env, args)
    }

    fn start_env(n: usize, env: &[(String, String)], args: &[&str]) -> Ranks {
        let children = (0..n)
            .map(|r| {
                let mut cmd = Command::new(BIN);
                cmd.args(args)
                    .env("TPRUN_ROLE", "rank")
                    .env("RANK", r.to_string())
                    .env("LOCAL_RANK", r.to_string())
                    .env("WORLD_SIZE", n.to_string())
                    .env("LOCAL_WORLD_SIZE", n.to_string())
                    .env_remove("TPRUN_SHM_FD")
                    .env_remove("TPRUN_SHM_DIR")
                    .env_remove("TPRUN_RUN_ID")
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped());
                for (k, v) in env {
                    cmd.env(k, v);
                }
                Some(cmd.spawn().expect("start rank"))
            })
            .collect();
        Ranks { children }
    }

    fn pid(&self, r: usize) -> u32 {
        self.children[r].as_ref().unwrap().id()
    }

    /// Waits for rank `r` at most `limit`; returns (status, stdout, stderr).
    fn wait(&mut self, r: usize, limit: Duration) -> (ExitStatus, String, String) {
        let mut child = self.children[r].take().unwrap();
        let (status, out, err) = wait_with_limit(&mut child, limit);
        (
            status
                .unwrap_or_else(|| panic!("rank {r} did not exit within {limit:?}\nstderr: {err}")),
            out,
            err,
        )
    }
}

impl Drop for Ranks {
    fn drop(&mut self) {
        for c in self.children.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Reads a child's output while waiting for it, at most `limit` (then kills it: None).
fn wait_with_limit(child: &mut Child, limit: Duration) -> (Option<ExitStatus>, String, String) {
    let out_t = child.stdout.take().map(drain);
    let err_t = child.stderr.take().map(drain);
    let status = wait_limited(child, limit);
    let join = |t: Option<JoinHandle<String>>| t.map(|t| t.join().unwrap()).unwrap_or_default();
    (status, join(out_t), join(err_t))
}

/// Parses perf's --json and returns (rows, total wrong); asserts every row was checked.
fn rows_and_wrong(json: &str) -> (Vec<serde_json::Value>, u64) {
    // Through tprun or by hand, stdout is exactly one JSON object, unprefixed.
    let v: serde_json::Value = serde_json::from_str(json)
        .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}):\n{json}"));
    let rows = v["rows"].as_array().expect("rows").clone();
    let wrong = rows
        .iter()
        .map(|r| r["wrong"].as_u64().expect("wrong is a number with --check"))
        .sum();
    (rows, wrong)
}

const CHECK_ARGS: &[&str] = &[
    "perf",
    "--op",
    "all",
    "--check",
    "--json",
    "--min-bytes",
    "8",
    "--max-bytes",
    "128K",
    "--iters",
    "2",
    "--warmup",
    "1",
];

/// Ranks started by hand meet through the named segment; a 16 KiB slot makes the larger sizes
/// pipeline through many chunks. Every op, every size: 0 wrong elements, and nothing left in
/// /dev/shm.
#[test]
fn check_by_hand_2_3_4_ranks() {
    for n in [2usize, 3, 4] {
        let id = run_id(&format!("check{n}"));
        let mut ranks = Ranks::start(n, &id, &[("TPRUN_SHM_SLOT_BYTES", "16K")], CHECK_ARGS);
        let mut rank0_out = String::new();
        for r in 0..n {
            let (st, out, err) = ranks.wait(r, Duration::from_secs(120));
            assert!(st.success(), "{n} ranks: rank {r} failed: {st}\n{err}");
            if r == 0 {
                rank0_out = out;
            } else {
                assert!(out.is_empty(), "only rank 0 prints, rank {r} printed {out}");
            }
        }
        let (rows, wrong) = rows_and_wrong(&rank0_out);
        assert_eq!(wrong, 0, "{n} ranks: wrong elements\n{rank0_out}");
        for op in ["all_reduce", "all_gather", "reduce_scatter", "broadcast"] {
            let k = rows.iter().filter(|r| r["op"] == op).count();
            assert!(k >= 10, "{n} ranks: only {k} rows for {op}");
        }
        assert!(
            shm_entries(&id).is_empty(),
            "left in /dev/shm: {:?}",
            shm_entries(&id)
        );
    }
}

/// Every dtype through the table path (not JSON), 3 ranks; bf16/f16 round once after an f32 sum.
#[test]
fn check_by_hand_half_types_table() {
    for dtype in ["bf16", "f16"] {
        let id = run_id(dtype);
        let args = [
            "perf",
            "--op",
            "all",
            "--dtype",
            dtype,
            "--check",
            "--max-bytes",
            "64K",
            "--iters",
            "2",
            "--warmup",
            "0",
        ];
        let mut ranks = Ranks::start(3, &id, &[("TPRUN_SHM_SLOT_BYTES", "8K")], &args);
        let outs: Vec<_> = (0..3)
            .map(|r| ranks.wait(r, Duration::from_secs(120)))
            .collect();
        for (r, (st, _, err)) in outs.iter().enumerate() {
            assert!(st.success(), "{dtype}: rank {r} failed: {err}");
        }
        let table = &outs[0].1;
        assert_eq!(
            table.matches("# Out of bounds values : 0 OK").count(),
            4,
            "{table}"
        );
        assert!(table.contains("# Avg bus bandwidth"), "{table}");
        assert!(shm_entries(&id).is_empty());
    }
}

/// A rank killed with SIGKILL in the middle of an all-reduce loop: the survivors notice (the
/// dead process, or at worst the 5 s deadline), exit non-zero naming rank 1, and nothing is left
/// in /dev/shm.
#[test]
fn killed_rank_by_hand() {
    let id = run_id("kill");
    let args = [
        "perf",
        "--op",
        "all-reduce",
        "--min-bytes",
        "4K",
        "--max-bytes",
        "4K",
        "--iters",
        "1000000000",
        "--warmup",
        "0",
    ];
    let mut ranks = Ranks::start(3, &id, &[("TPRUN_COMM_TIMEOUT_S", "5")], &args);
    std::thread::sleep(Duration::from_millis(500));
    let victim = ranks.pid(1);
    sigkill(victim);
    let killed_at = Instant::now();
    let (st, _, _) = ranks.wait(1, Duration::from_secs(10));
    assert!(!st.success());
    for r in [0, 2] {
        let (st, _, err) = ranks.wait(
            r,
            Duration::from_secs(10).saturating_sub(killed_at.elapsed()),
        );
        assert!(!st.success(), "rank {r} should fail");
        assert!(
            err.contains("rank 1"),
            "rank {r} stderr does not name rank 1: {err}"
        );
        assert!(
            err.contains("all_reduce"),
            "rank {r} stderr does not name the op: {err}"
        );
        assert!(!err.contains("panicked"), "rank {r} panicked: {err}");
    }
    assert!(
        shm_entries(&id).is_empty(),
        "left in /dev/shm: {:?}",
        shm_entries(&id)
    );
}

/// The launcher's path, with this test playing the launcher: one memfd made by
/// `JobSegment::create_with`, inherited by the ranks through TPRUN_SHM_FD.
#[test]
fn check_with_inherited_memfd() {
    let n = 3;
    let seg = collectives::JobSegment::create_with(
        n,
        &collectives::shm::SegmentOptions {
            dir: None,
            slot_bytes: 16 << 10,
        },
    )
    .unwrap();
    let mut ranks = Ranks::start_env(n, &seg.env(), CHECK_ARGS);
    let outs: Vec<_> = (0..n)
        .map(|r| ranks.wait(r, Duration::from_secs(120)))
        .collect();
    for (r, (st, _, err)) in outs.iter().enumerate() {
        assert!(st.success(), "rank {r} failed: {st}\n{err}");
    }
    let (_, wrong) = rows_and_wrong(&outs[0].1);
    assert_eq!(wrong, 0);
    assert_eq!(seg.aborted(), None);
}

/// The launcher's abort after a rank died: the others stop waiting and name that rank.
#[test]
fn abort_with_inherited_memfd() {
    let n = 3;
    let seg = collectives::JobSegment::create_with(n, &Default::default()).unwrap();
    let args = [
        "perf",
        "--op",
        "all-reduce",
        "--min-bytes",
        "64K",
        "--max-bytes",
        "64K",
        "--iters",
        "1000000000",
        "--warmup",
        "0",
    ];
    let mut ranks = Ranks::start_env(n, &seg.env(), &args);
    std::thread::sleep(Duration::from_millis(500));
    sigkill(ranks.pid(2));
    let _ = ranks.wait(2, Duration::from_secs(10));
    seg.abort(2);
    for r in [0, 1] {
        let (st, _, err) = ranks.wait(r, Duration::from_secs(10));
        assert!(!st.success(), "rank {r} should fail");
        assert!(err.contains("rank 2"), "rank {r}: {err}");
        assert!(!err.contains("panicked"), "rank {r} panicked: {err}");
    }
}

/// Set-up mistakes give one clear line, not a hang.
#[test]
fn setup_errors_by_hand() {
    // WORLD_SIZE > 1 with nothing to meet in.
    let out = Command::new(BIN)
        .args(["perf", "--max-bytes", "8"])
        .env("TPRUN_ROLE", "rank")
        .env("RANK", "0")
        .env("WORLD_SIZE", "2")
        .env_remove("TPRUN_RUN_ID")
        .env_remove("MASTER_PORT")
        .env_remove("TPRUN_SHM_FD")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("TPRUN_RUN_ID or MASTER_PORT"), "{err}");
    // A fd number that is not the segment.
    let out = Command::new(BIN)
        .args(["perf", "--max-bytes", "8"])
        .env("TPRUN_ROLE", "rank")
        .env("RANK", "0")
        .env("WORLD_SIZE", "2")
        .env("TPRUN_SHM_FD", "987")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("TPRUN_SHM_FD=987"), "{err}");
    // A world of one needs no shared memory at all.
    let out = Command::new(BIN)
        .args(["perf", "--max-bytes", "64", "--check"])
        .env("TPRUN_ROLE", "rank")
        .env_remove("WORLD_SIZE")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("all_reduce on 1 ranks"));
}

/// A shared-memory directory too small for the segment: a clear error at start-up, not a SIGBUS.
/// Needs a private tmpfs, which needs user+mount namespaces (`unshare -Urm`); where those are not
/// allowed the test says so and checks nothing.
#[test]
fn full_shm_dir_is_a_clear_error() {
    let probe = Command::new("unshare").args(["-Urm", "true"]).output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!("skipped: `unshare -Urm` is not available here");
        return;
    }
    let dir = std::env::temp_dir().join(run_id("tmpfs"));
    std::fs::create_dir_all(&dir).unwrap();
    let script = r#"mount -t tmpfs -o size=1m tmpfs "$D" && exec "$BIN" perf --max-bytes 8"#;
    let out = Command::new("unshare")
        .args(["-Urm", "sh", "-c", script])
        .env("D", &dir)
        .env("BIN", BIN)
        .env("TPRUN_SHM_DIR", &dir)
        .env("TPRUN_ROLE", "rank")
        .env("RANK", "0")
        .env("WORLD_SIZE", "2")
        .env("TPRUN_RUN_ID", run_id("full"))
        .env_remove("TPRUN_SHM_FD")
        .output()
        .unwrap();
    std::fs::remove_dir(&dir).ok();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("cannot reserve 6.0 MiB of shared memory in")
            && err.contains("No space left on device"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// Through the launcher.

fn tprun(args: &[&str], limit: Duration) -> (ExitStatus, String, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .env_remove("TPRUN_ROLE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (st, out, err) = wait_with_limit(&mut child, limit);
    (
        st.unwrap_or_else(|| panic!("tprun {args:?} did not finish within {limit:?}\n{err}")),
        out,
        err,
    )
}

/// `tprun -n N perf --check`: 0 wrong for every op on 2, 3 and 4 ranks (4 ranks on the CI's two
/// cores must finish too: waits sleep on a futex instead of spinning).
#[test]
fn tprun_perf_check_2_3_4_ranks() {
    for n in ["2", "3", "4"] {
        let mut args = vec!["-n", n];
        args.extend_from_slice(CHECK_ARGS);
        let (st, out, err) = tprun(&args, Duration::from_secs(180));
        assert!(st.success(), "tprun -n {n} perf failed: {st}\n{err}");
        let (rows, wrong) = rows_and_wrong(&out);
        assert_eq!(wrong, 0, "-n {n}: wrong elements\n{out}");
        assert!(rows.len() >= 40, "-n {n}: {} rows", rows.len());
    }
}

/// The nccl-tests table on stdout, one per op.
#[test]
fn tprun_perf_table() {
    let (st, out, err) = tprun(
        &[
            "-n",
            "2",
            "perf",
            "--op",
            "all",
            "--max-bytes",
            "1K",
            "--iters",
            "3",
            "--check",
        ],
        Duration::from_secs(120),
    );
    assert!(st.success(), "{err}");
    for op in ["all_reduce", "all_gather", "reduce_scatter", "broadcast"] {
        assert!(out.contains(&format!("perf: {op} on 2 ranks")), "{out}");
    }
    assert!(
        out.contains("algbw") && out.contains("busbw") && out.contains("#wrong"),
        "{out}"
    );
    assert_eq!(out.matches("# Avg bus bandwidth").count(), 4, "{out}");
}

/// `tprun -n 3 perf`, rank 1 killed mid-all-reduce: tprun ends within 10 s, non-zero, naming rank 1.
#[test]
fn tprun_killed_rank() {
    let mut child = Command::new(BIN)
        .args([
            "-n",
            "3",
            "perf",
            "--op",
            "all-reduce",
            "--min-bytes",
            "4K",
            "--max-bytes",
            "4K",
            "--iters",
            "1000000000",
            "--warmup",
            "0",
        ])
        .env_remove("TPRUN_ROLE")
        .env("TPRUN_COMM_TIMEOUT_S", "5")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Find rank 1 among tprun's children (under its guard).
    let start = Instant::now();
    let victim = loop {
        let found = rank_programs_of(child.id())
            .into_iter()
            .find(|&p| env_of(p).lines().any(|l| l == "RANK=1"));
        if let Some(p) = found {
            break p;
        }
        if start.elapsed() > Duration::from_secs(30) || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            let (_, _, err) = wait_with_limit(&mut child, Duration::from_secs(5));
            panic!("rank 1 never appeared\n{err}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    std::thread::sleep(Duration::from_millis(300));
    sigkill(victim);
    let (st, _, err) = wait_with_limit(&mut child, Duration::from_secs(10));
    let st = st.unwrap_or_else(|| panic!("tprun did not end within 10 s of the kill\n{err}"));
    assert!(!st.success());
    assert!(err.contains("rank 1"), "{err}");
}
