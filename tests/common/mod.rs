//! Helpers shared by the end-to-end tests (each test file has `mod common;`).
//!
//! Not every test file uses every helper, hence the module-wide `dead_code` allowance.
#![allow(dead_code)]

use std::ffi::OsString;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

/// A model fixture under tests/fixtures.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Builds example `name` of `package` (`cargo build --example`) and returns its path: the
/// integration tests run examples as rank programs, and `cargo test --test X` alone does not
/// build them.
pub fn example(package: &str, name: &str) -> String {
    let st = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "--example", name, "-p", package])
        .status()
        .unwrap();
    assert!(
        st.success(),
        "cargo build --example {name} -p {package} failed"
    );
    let exe = Path::new(env!("CARGO_BIN_EXE_tprun"));
    exe.parent()
        .unwrap()
        .join("examples")
        .join(name)
        .display()
        .to_string()
}

/// A scratch directory `<tmp>/tprun-<prefix>-<tag>-<pid>`, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// An empty directory (whatever a previous run left there is removed first).
    pub fn new(prefix: &str, tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("tprun-{prefix}-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    /// A copy of the files of fixture `from` (config, tokenizer, weights), minus `skip`, for
    /// breaking.
    pub fn copy_of(prefix: &str, tag: &str, from: &str, skip: &[&str]) -> TempDir {
        let t = TempDir::new(prefix, tag);
        for e in std::fs::read_dir(fixture(from)).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().into_string().unwrap();
            if e.file_type().unwrap().is_file() && !skip.contains(&name.as_str()) {
                std::fs::copy(e.path(), t.0.join(&name)).unwrap();
            }
        }
        t
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.0.join(name)
    }

    /// The path as a command-line argument.
    pub fn s(&self) -> String {
        self.0.to_str().unwrap().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Rewrites a JSON object file in place.
pub fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(v.as_object_mut().unwrap());
    std::fs::write(path, v.to_string()).unwrap();
}

/// Rewrites the JSON header of a safetensors file, keeping its data bytes.
pub fn edit_header(path: &Path, f: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let b = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let mut h: Value = serde_json::from_slice(&b[8..8 + n]).unwrap();
    f(h.as_object_mut().unwrap());
    let hs = h.to_string();
    let mut out = (hs.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(hs.as_bytes());
    out.extend_from_slice(&b[8 + n..]);
    std::fs::write(path, out).unwrap();
}

/// `(parent pid, state letter)` of a process from /proc/<pid>/stat; None once it is gone.
pub fn proc_stat(pid: u32) -> Option<(u32, char)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &s[s.rfind(')')? + 1..];
    let mut f = after.split_whitespace();
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    Some((ppid, state))
}

/// Pids of the processes whose parent is `ppid`.
pub fn children_of(ppid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() {
            if proc_stat(pid).is_some_and(|(pp, _)| pp == ppid) {
                out.push(pid);
            }
        }
    }
    out
}

/// The rank programs among tprun's children: each rank is a guard (TPRUN_GUARD in its
/// environment) with the program as its child, so this looks one level under a guard.
pub fn rank_programs_of(tprun: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for p in children_of(tprun) {
        if env_of(p).lines().any(|l| l.starts_with("TPRUN_GUARD=")) {
            out.extend(children_of(p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The environment of process `pid`, one `NAME=value` a line (empty once it is gone).
pub fn env_of(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', "\n"))
        .unwrap_or_default()
}

/// Collects everything `r` yields on a thread (so a chatty child never blocks on a full pipe).
pub fn drain(mut r: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = r.read_to_end(&mut b);
        String::from_utf8_lossy(&b).into_owned()
    })
}

/// Waits for `child` at most `limit`; past it kills and reaps it and returns None (the caller
/// fails the test, so a hang is a failure rather than a stuck suite).
pub fn wait_limited(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let t = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The exit code, or 128+N for signal N (what a shell reports).
pub fn code_of(st: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    st.code()
        .unwrap_or_else(|| 128 + st.signal().expect("exit code or signal"))
}

/// The tprun binary under test; `TPRUN_TEST_BIN` points the tests at another build (to show that
/// a test fails without a fix).
pub fn tprun_bin() -> OsString {
    std::env::var_os("TPRUN_TEST_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_tprun").into())
}

/// `tprun` with no stdin, piped output and the default disposition for the signals it forwards.
///
/// tprun keeps ignoring a forwarded signal it started with ignored (as a background job of a
/// non-interactive shell starts with SIGINT ignored, or a nohup job with SIGHUP), so the signal
/// tests start it with the defaults whatever context runs the test suite.
pub fn tprun() -> Command {
    let mut c = Command::new(tprun_bin());
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove("OMP_NUM_THREADS");
    // SAFETY: signal(2) is async-signal-safe, the only kind of call allowed between fork and exec.
    unsafe {
        c.pre_exec(|| {
            for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                libc::signal(sig, libc::SIG_DFL);
            }
            Ok(())
        });
    }
    c
}

/// How a tprun run ended.
pub struct Finished {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

/// Waits for `child` (started at `started`) while draining its stdout and stderr; kills it and
/// fails the test past `limit`.
pub fn finish(mut child: Child, started: Instant, limit: Duration) -> Finished {
    let out = drain(child.stdout.take().unwrap());
    let err = drain(child.stderr.take().unwrap());
    let status = wait_limited(&mut child, limit)
        .unwrap_or_else(|| panic!("tprun did not finish within {limit:?}"));
    Finished {
        code: code_of(status),
        elapsed: started.elapsed(),
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// Runs `cmd` to the end (at most `limit`).
pub fn run_cmd(cmd: &mut Command, limit: Duration) -> Finished {
    let started = Instant::now();
    finish(cmd.spawn().expect("start tprun"), started, limit)
}

/// A test that cannot run here for want of `why`, a prerequisite CI provides: fails under
/// `CI=true`, else logs `SKIPPED: <test>: <why>` (see `kernels::skips`).
pub fn skip(test: &str, why: &str) {
    kernels::skips::skip(test, why)
}

/// What a tprun job could leave behind, looked for under the names the code gives it:
/// - a named segment `tprun-<uid>/<key>` (or one of the older form `tprun-<uid>-<key>`) in
///   /dev/shm or a `TPRUN_SHM_DIR` (collectives' `named_path`; the key of a rank under tprun is
///   its run id), and the `.tprun-<pid>-<nanos>`
///   file `JobSegment::create` makes in a `TPRUN_SHM_DIR` without O_TMPFILE;
/// - in `dirs`, the temporary file `.<name>.<pid>.<n>.tmp` an output `<name>` is written
///   through (collectives' `files::create_temp`);
/// - a live process of the job (its environment carries the run id: ranks and everything they
///   start, `setsid` or not), with the job memory it holds: an fd or mapping of one of tprun's
///   memfds (`/memfd:tprun-shm`, `/memfd:tprun-trace`, `/memfd:tprun-error-file`) or of a named
///   segment.
///
/// `run_id` is the job's run id or a prefix of it (`tprun-<tprun pid>-` for a tprun job);
/// `tprun_pid` makes the `.tprun-<pid>-` names; `dirs` are searched besides /dev/shm (a
/// `TPRUN_SHM_DIR`, the folders of the job's outputs). Returns one line per leftover.
pub fn leftovers(run_id: &str, tprun_pid: u32, dirs: &[&Path]) -> Vec<String> {
    // SAFETY: getuid cannot fail and touches no memory of ours.
    let uid = unsafe { libc::getuid() };
    let named = format!("tprun-{uid}-{run_id}");
    let unnamed = format!(".tprun-{tprun_pid}-");
    let mut out = Vec::new();
    for (i, dir) in std::iter::once(Path::new("/dev/shm"))
        .chain(dirs.iter().copied())
        .enumerate()
    {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            let tmp_output = i > 0 && n.starts_with('.') && n.ends_with(".tmp");
            if n.starts_with(&named) || n.starts_with(&unnamed) || tmp_output {
                out.push(format!("file {}", e.path().display()));
            }
        }
        let private = dir.join(format!("tprun-{uid}"));
        for e in std::fs::read_dir(private).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().starts_with(run_id) {
                out.push(format!("file {}", e.path().display()));
            }
        }
    }
    let env_line = format!("TPRUN_RUN_ID={run_id}");
    for pid in all_pids() {
        if !proc_stat(pid).is_some_and(|(_, s)| !matches!(s, 'Z' | 'X' | 'x')) {
            continue;
        }
        if env_of(pid).lines().any(|l| l.starts_with(&env_line)) {
            let holds = job_memory_of(pid, uid);
            out.push(format!("process {pid} holding {holds:?}"));
        }
    }
    out
}

/// Every pid in /proc.
fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
        .collect()
}

/// The tprun memfds and named segments (of user `uid`) process `pid` has open or mapped.
fn job_memory_of(pid: u32, uid: u32) -> Vec<String> {
    let (dir, old) = (format!("/tprun-{uid}/"), format!("/tprun-{uid}-"));
    let is_job = |t: &str| t.starts_with("/memfd:tprun-") || t.contains(&dir) || t.contains(&old);
    let mut held: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|t| t.to_string_lossy().into_owned())
        .filter(|t| is_job(t))
        .collect();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    held.extend(
        maps.lines()
            .filter_map(|l| l.split_whitespace().nth(5))
            .filter(|t| is_job(t))
            .map(|t| format!("mapped {t}")),
    );
    held.sort();
    held.dedup();
    held
}

/// [`leftovers`] once the job's processes had `limit` to end (a killed job's guards take a
/// moment); panics with the list if anything is still there.
pub fn assert_no_leftovers(run_id: &str, tprun_pid: u32, dirs: &[&Path], limit: Duration) {
    let t = Instant::now();
    loop {
        let left = leftovers(run_id, tprun_pid, dirs);
        if left.is_empty() {
            return;
        }
        if t.elapsed() > limit {
            for l in &left {
                if let Some(pid) = l.strip_prefix("process ").and_then(|s| s.split(' ').next()) {
                    // SAFETY: kill(2) of a leftover process of the job (it has its run id).
                    unsafe { libc::kill(pid.parse().unwrap(), libc::SIGKILL) };
                }
            }
            panic!("the job left behind, {limit:?} after it ended: {left:#?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every launcher variable a test run might inherit (tests/multinode.rs, tests/multihost.rs),
/// removed so each test sets only its own.
pub const LAUNCHER_VARS: &[&str] = &[
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "TPRUN_SHM_FD",
    "TPRUN_RUN_ID",
    "TPRUN_ROLE",
    "MASTER_PORT",
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "PMIX_RANK",
    "PMI_RANK",
    "PMI_SIZE",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_JOB_ID",
    "SLURM_STEP_ID",
    "SLURM_LOCALID",
    "SLURM_NODEID",
    "SLURM_NTASKS_PER_NODE",
    "SLURM_TASKS_PER_NODE",
    "SLURM_STEP_TASKS_PER_NODE",
    "SLURM_STEP_NUM_TASKS",
    "PMIX_NAMESPACE",
    "TPRUN_PRETEND_NODES",
];

/// `c` without [`LAUNCHER_VARS`].
pub fn clean(mut c: Command) -> Command {
    for v in LAUNCHER_VARS {
        c.env_remove(v);
    }
    c
}
