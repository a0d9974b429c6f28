//! End-to-end tests of issue 22's launcher half: built-in programs print their results plainly
//! on stdout (rank 0 only), and torchrun's habits work (scripts run with python, `-m`,
//! `--no-python`, `--max-restarts`, the torchelastic variables and error files, SIGUSR1/2).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::{finish, run_cmd, tprun, Finished, TempDir};

const LIMIT: Duration = Duration::from_secs(180);

fn run_in(dir: &Path, args: &[&str]) -> Finished {
    let mut c = tprun();
    c.current_dir(dir)
        .env("TMPDIR", dir)
        .env_remove("TPRUN_ROLE")
        .env_remove("TPRUN_MODEL")
        .args(args);
    run_cmd(&mut c, LIMIT)
}

fn ok(f: &Finished) {
    assert_eq!(f.code, 0, "stdout:\n{}\nstderr:\n{}", f.stdout, f.stderr);
}

/// What tprun left in the test's TMPDIR (must be nothing: its error files are memfds).
fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("tprun"))
        .collect()
}

#[test]
fn builtin_results_are_plain_on_stdout_from_rank_0_and_logs_on_stderr() {
    let d = TempDir::new("torchrun", "results");
    // --json: stdout is exactly one JSON object, for bench, perf and logits.
    for args in [
        &[
            "-n",
            "2",
            "bench",
            "--prompt-len",
            "4",
            "--new-tokens",
            "2",
            "--rounds",
            "1",
            "--json",
        ][..],
        &[
            "-n",
            "2",
            "perf",
            "--max-bytes",
            "1K",
            "--iters",
            "2",
            "--json",
        ],
        &[
            "-n",
            "2",
            "logits",
            "--input-ids",
            "1,2,3",
            "--out",
            "l.safetensors",
            "--json",
        ],
    ] {
        let f = run_in(d.path(), args);
        ok(&f);
        let v: serde_json::Value = serde_json::from_str(&f.stdout).unwrap_or_else(|e| {
            panic!(
                "{args:?}: stdout is not one JSON object ({e}):\n{}",
                f.stdout
            )
        });
        assert!(v.is_object(), "{args:?}");
        // The logs of two ranks are prefixed on stderr (bench prints its comm table there).
        if args[2] == "bench" {
            assert!(f.stderr.contains("[rank0]: "), "{args:?}: {}", f.stderr);
        }
    }
    // Generated text, as `> story.txt` gets it: no prefix, only rank 0's.
    let gen = [
        "generate",
        "--input-ids",
        "1,2,3",
        "--max-new-tokens",
        "6",
        "--ignore-eos",
    ];
    let two = run_in(d.path(), &[&["-n", "2"][..], &gen].concat());
    ok(&two);
    let one = run_in(d.path(), &[&["-n", "1"][..], &gen].concat());
    ok(&one);
    assert!(!two.stdout.contains("[rank"), "{:?}", two.stdout);
    assert!(!two.stdout.trim().is_empty());
    assert_eq!(
        two.stdout, one.stdout,
        "the text does not depend on the TP size"
    );
    // One rank: stderr is not prefixed either.
    assert!(!one.stderr.contains("[rank0]: "), "{}", one.stderr);
    // --only-rank filters the logs, never the result.
    let f = run_in(
        d.path(),
        &[
            "-n",
            "2",
            "--only-rank",
            "1",
            "perf",
            "--max-bytes",
            "64",
            "--iters",
            "2",
            "--json",
        ],
    );
    ok(&f);
    assert!(
        serde_json::from_str::<serde_json::Value>(&f.stdout).is_ok(),
        "{}",
        f.stdout
    );
    // The perf table goes to stdout unprefixed too.
    let f = run_in(
        d.path(),
        &["-n", "2", "perf", "--max-bytes", "64", "--iters", "2"],
    );
    ok(&f);
    assert!(
        f.stdout.contains("# Avg bus bandwidth") && !f.stdout.contains("[rank"),
        "{}",
        f.stdout
    );
    // `-- PROGRAM` keeps relaying with prefixes.
    let f = run_in(d.path(), &["-n", "2", "--", "sh", "-c", "echo out$RANK"]);
    ok(&f);
    assert!(
        f.stdout.contains("[rank0]: out0") && f.stdout.contains("[rank1]: out1"),
        "{}",
        f.stdout
    );
}

#[test]
fn scripts_run_with_python_modules_with_m_and_executables_with_no_python() {
    let d = TempDir::new("torchrun", "script");
    std::fs::write(
        d.join("train.py"),
        "import os, sys\nprint('py', os.environ['RANK'], os.environ['ROLE_RANK'], os.environ['ROLE_WORLD_SIZE'], os.environ['TORCHELASTIC_RUN_ID'], os.environ['TORCHELASTIC_RESTART_COUNT'], os.environ['TORCHELASTIC_MAX_RESTARTS'], os.access(os.environ['TORCHELASTIC_ERROR_FILE'], os.W_OK), sys.argv[1:])\n",
    )
    .unwrap();
    std::fs::create_dir(d.join("pkg")).unwrap();
    std::fs::write(d.join("pkg/__init__.py"), "").unwrap();
    std::fs::write(
        d.join("pkg/mod.py"),
        "import os\nprint('module', os.environ['RANK'])\n",
    )
    .unwrap();
    // The torchrun command line, without `--`; the script's own options stay its own.
    let f = run_in(
        d.path(),
        &[
            "--nproc-per-node",
            "2",
            "--run-id",
            "job7",
            "train.py",
            "--lr",
            "3",
            "-n",
            "5",
        ],
    );
    ok(&f);
    for r in 0..2 {
        let want = format!("[rank{r}]: py {r} {r} 2 job7 0 0 True ['--lr', '3', '-n', '5']");
        assert!(f.stdout.contains(&want), "{want}\n{}", f.stdout);
    }
    let f = run_in(d.path(), &["-n", "2", "-m", "pkg.mod"]);
    ok(&f);
    assert!(f.stdout.contains("[rank1]: module 1"), "{}", f.stdout);
    // --python: the interpreter to use (here a wrapper that says it was used).
    let wrapper = d.join("mypython");
    std::fs::write(&wrapper, "#!/bin/sh\necho wrapper \"$@\"\n").unwrap();
    Command::new("chmod")
        .arg("755")
        .arg(&wrapper)
        .status()
        .unwrap();
    let f = run_in(
        d.path(),
        &["--python", wrapper.to_str().unwrap(), "train.py", "x"],
    );
    ok(&f);
    assert!(
        f.stdout.contains("[rank0]: wrapper -u train.py x"),
        "{}",
        f.stdout
    );
    let f = run_in(d.path(), &["-n", "2", "--no-python", "echo", "plain"]);
    ok(&f);
    assert!(f.stdout.contains("[rank1]: plain"), "{}", f.stdout);
    // A built-in program's name wins over a script of that name.
    std::fs::copy(d.join("train.py"), d.join("perf")).unwrap();
    let f = run_in(d.path(), &["perf", "--help"]);
    ok(&f);
    assert!(f.stdout.contains("Usage: tprun perf"), "{}", f.stdout);
    // Neither a built-in nor a file: one line, exit 2; a missing script: exit 127.
    let f = run_in(d.path(), &["-n", "2", "foo"]);
    assert_eq!(f.code, 2, "{}", f.stderr);
    assert_eq!(f.stderr.lines().count(), 1, "{}", f.stderr);
    assert!(
        f.stderr.contains("'foo' is neither a built-in program"),
        "{}",
        f.stderr
    );
    let f = run_in(d.path(), &["missing.py"]);
    assert_eq!((f.code, f.stderr.lines().count()), (127, 1), "{}", f.stderr);
    assert!(f.stderr.contains("missing.py"), "{}", f.stderr);
    let f = run_in(d.path(), &["--no-python", "-m", "x"]);
    assert_eq!(f.code, 2, "{}", f.stderr);
    assert!(leftovers(d.path()).is_empty(), "{:?}", leftovers(d.path()));
}

/// A script that fails on rank 1 until restart `fail_until`, writing its error file the way
/// torch's `@record` does; rank 0 also leaves a daemon behind on the first attempt.
const FLAKY: &str = r#"
import json, os, subprocess, sys, time, traceback
r = int(os.environ["RANK"]); c = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
ino = os.fstat(int(os.environ["TPRUN_SHM_FD"])).st_ino
print(f"attempt {c} of {os.environ['TORCHELASTIC_MAX_RESTARTS']} segment {ino}", flush=True)
if r == 0 and c == 0:
    p = subprocess.Popen(["sleep", "60"], start_new_session=True)
    open("daemon.tmp", "w").write(str(p.pid))
    os.rename("daemon.tmp", "daemon.pid")
if r == 1 and c == 0:
    for _ in range(400):
        if os.path.exists("daemon.pid"):
            break
        time.sleep(0.05)
def step():
    raise ValueError(f"boom on attempt {c}")
if r == 1 and c < int(sys.argv[1]):
    try:
        step()
    except ValueError as e:
        with open(os.environ["TORCHELASTIC_ERROR_FILE"], "w") as f:
            json.dump({"message": {"message": f"{type(e).__name__}: {e}",
                "extraInfo": {"py_callstack": traceback.format_exc(), "timestamp": str(int(time.time()))}}}, f)
        raise
time.sleep(0.2)
"#;

#[test]
fn max_restarts_restarts_the_group_with_fresh_state_and_shows_the_error_file() {
    let d = TempDir::new("torchrun", "restart");
    std::fs::write(d.join("flaky.py"), FLAKY).unwrap();
    let f = run_in(
        d.path(),
        &["-n", "2", "--max-restarts", "3", "flaky.py", "1"],
    );
    ok(&f);
    assert!(
        f.stderr
            .contains("tprun: restarting the job (restart 1 of 3)"),
        "{}",
        f.stderr
    );
    assert!(!f.stderr.contains("restart 2 of"), "{}", f.stderr);
    assert!(
        f.stdout.contains("[rank0]: attempt 1 of 3")
            && f.stdout.contains("[rank1]: attempt 0 of 3"),
        "{}",
        f.stdout
    );
    // The error file's message and the frame it came from.
    assert!(
        f.stderr
            .contains("tprun: rank 1 error: ValueError: boom on attempt 0"),
        "{}",
        f.stderr
    );
    assert!(f.stderr.contains(", in step"), "{}", f.stderr);
    // Each attempt has its own shared-memory segment.
    let segs: Vec<&str> = f
        .stdout
        .lines()
        .filter(|l| l.starts_with("[rank1]: attempt"))
        .map(|l| l.rsplit(' ').next().unwrap())
        .collect();
    assert_eq!(segs.len(), 2, "{}", f.stdout);
    assert_ne!(segs[0], segs[1], "a restart must get a fresh segment");
    // Nothing leaks: the daemon of attempt 0 is gone, and so is the error files' directory.
    let pid = std::fs::read_to_string(d.join("daemon.pid")).unwrap();
    assert!(
        !Path::new(&format!("/proc/{}", pid.trim())).exists(),
        "daemon {pid} survived"
    );
    assert!(leftovers(d.path()).is_empty(), "{:?}", leftovers(d.path()));

    // Out of restarts: the last failure's code and error; no restarts without --max-restarts.
    let f = run_in(
        d.path(),
        &["-n", "2", "--max-restarts", "1", "flaky.py", "9"],
    );
    assert_eq!(f.code, 1, "{}", f.stderr);
    assert!(
        f.stderr.contains("restart 1 of 1") && f.stderr.contains("boom on attempt 1"),
        "{}",
        f.stderr
    );
    let f = run_in(d.path(), &["-n", "2", "flaky.py", "9"]);
    assert_eq!(f.code, 1);
    assert!(!f.stderr.contains("restarting"), "{}", f.stderr);
    assert!(leftovers(d.path()).is_empty(), "{:?}", leftovers(d.path()));
}

#[test]
fn without_an_error_file_the_summary_shows_the_last_lines_of_stderr() {
    let d = TempDir::new("torchrun", "tail");
    let script = "if [ $RANK = 1 ]; then i=0; while [ $i -lt 30 ]; do echo err$i >&2; i=$((i+1)); done; exit 3; fi; sleep 5";
    let f = run_in(d.path(), &["-n", "2", "--", "sh", "-c", script]);
    assert_eq!(f.code, 3);
    let tail = f
        .stderr
        .split("tprun: last lines of rank 1's stderr:\n")
        .nth(1)
        .unwrap_or_else(|| panic!("{}", f.stderr));
    let lines: Vec<&str> = tail.lines().map(str::trim).collect();
    assert_eq!(
        lines,
        (20..30).map(|i| format!("err{i}")).collect::<Vec<_>>(),
        "{}",
        f.stderr
    );
}

#[test]
fn sigusr1_and_sigusr2_are_forwarded_without_stopping_the_job() {
    let d = TempDir::new("torchrun", "usr");
    let script = format!(
        "trap 'echo usr1 $RANK; touch {0}/usr1-$RANK' USR1; trap 'echo usr2 $RANK; touch {0}/usr2-$RANK' USR2; \
         touch {0}/ready$RANK; \
         i=0; while [ ! -e {0}/go$RANK ] && [ $i -lt 300 ]; do sleep 0.05; i=$((i+1)); done; echo done $RANK",
        d.s()
    );
    let started = Instant::now();
    let child = tprun()
        .args(["-n", "2", "--", "sh", "-c", &script])
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    while !(d.join("ready0").exists() && d.join("ready1").exists()) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "ranks never got ready"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Each signal is sent once every rank ran the trap of the one before (its file is there).
    for (sig, name) in [(libc::SIGUSR1, "usr1"), (libc::SIGUSR2, "usr2")] {
        // SAFETY: kill(2) on the tprun this test started.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
        while !(0..2).all(|r| d.join(format!("{name}-{r}")).exists()) {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{name} never reached both ranks"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    for r in 0..2 {
        std::fs::write(d.join(format!("go{r}")), "").unwrap();
    }
    let f = finish(child, started, LIMIT);
    ok(&f);
    for w in ["usr1 0", "usr1 1", "usr2 0", "usr2 1", "done 0", "done 1"] {
        assert!(f.stdout.contains(w), "{w}: {}", f.stdout);
    }
    assert!(f.stderr.contains("got SIGUSR1: forwarding"), "{}", f.stderr);
}
