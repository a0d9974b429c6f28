//! End-to-end tests of `tprun -- PROGRAM`: the real binary launching `sh` ranks.
//!
//! Time bounds here are the generous ones the launcher promises (teardown "under 5 s", ranks gone
//! "within 2 s" of tprun's SIGKILL); nothing asserts a tighter timing.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

mod common;
use common::{code_of, run_cmd, tprun, wait_limited, Finished, TempDir};

/// Upper bound for any single tprun run in these tests, so a bug fails instead of hanging.
const RUN_LIMIT: Duration = Duration::from_secs(20);

/// Waits for `child`, killing it and failing the test past [`RUN_LIMIT`].
fn wait_run(child: &mut Child) -> ExitStatus {
    wait_limited(child, RUN_LIMIT)
        .unwrap_or_else(|| panic!("tprun did not finish within {RUN_LIMIT:?}"))
}

fn run(args: &[&str]) -> Finished {
    run_cmd(tprun().args(args), RUN_LIMIT)
}

/// Pids printed by ranks as `pid N` lines.
fn pids(stdout: &str) -> Vec<i32> {
    stdout
        .lines()
        .filter_map(|l| l.split_once("pid ").map(|(_, p)| p.trim().parse().unwrap()))
        .collect()
}

/// True while `pid` exists and is not a zombie (a zombie has already died; its reaper may be an
/// init that does not reap).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start());
            !matches!(state.and_then(|s| s.chars().next()), Some('Z' | 'X'))
        }
        Err(_) => false,
    }
}

/// Starts tprun and reads its stdout until `n` ranks have printed their pid.
fn start_and_collect_pids(cmd: &mut Command, n: usize) -> (Child, Vec<i32>, Instant) {
    let started = Instant::now();
    let mut child = cmd.spawn().expect("start tprun");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut found = Vec::new();
    while found.len() < n {
        let line = lines
            .next()
            .expect("tprun's stdout ended before every rank printed its pid")
            .unwrap();
        found.extend(pids(&line));
    }
    // Keep draining so tprun never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (child, found, started)
}

fn send(pid: u32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    assert_eq!(
        unsafe { libc::kill(pid as i32, sig) },
        0,
        "kill {pid} {sig}"
    );
}

#[test]
fn three_ranks_get_the_environment_prefixes_and_logs() {
    let dir = TempDir::new("test", "env");
    let logs = dir.path().join("logs");
    let script = r#"echo "env $RANK $LOCAL_RANK $WORLD_SIZE $LOCAL_WORLD_SIZE $GROUP_RANK $MASTER_ADDR $MASTER_PORT $TPRUN_RUN_ID $OMP_NUM_THREADS $TPRUN_DEVICE"; echo "err $RANK" >&2; printf "tail $RANK""#;
    let f = run(&[
        "-n",
        "3",
        "--log-dir",
        logs.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        script,
    ]);
    assert_eq!(f.code, 0, "stderr: {}", f.stderr);

    let mut ports = Vec::new();
    let mut run_ids = Vec::new();
    for r in 0..3 {
        let prefix = format!("[rank{r}]: ");
        let env_line = f
            .stdout
            .lines()
            .find(|l| l.starts_with(&format!("{prefix}env ")))
            .unwrap_or_else(|| panic!("no env line for rank {r}: {}", f.stdout));
        let fields: Vec<&str> = env_line[prefix.len()..].split(' ').collect();
        let rs = r.to_string();
        assert_eq!(
            fields[..7],
            ["env", &rs, &rs, "3", "3", "0", "127.0.0.1"],
            "{env_line}"
        );
        ports.push(fields[7].parse::<u16>().expect("MASTER_PORT is a port"));
        run_ids.push(fields[8].to_string());
        assert!(
            fields[9].parse::<usize>().unwrap() >= 1,
            "OMP_NUM_THREADS: {env_line}"
        );
        assert_eq!(fields[10], "cpu");
        // The last line has no newline but still reaches the console, whole and prefixed.
        assert!(
            f.stdout.lines().any(|l| l == format!("{prefix}tail {r}")),
            "{}",
            f.stdout
        );
        assert!(
            f.stderr.lines().any(|l| l == format!("{prefix}err {r}")),
            "{}",
            f.stderr
        );
        // Logs: each rank's own output, unprefixed and byte-exact.
        let out_log = std::fs::read_to_string(logs.join(format!("rank{r}/stdout.log"))).unwrap();
        assert_eq!(out_log, format!("{}\ntail {r}", &env_line[prefix.len()..]));
        let err_log = std::fs::read_to_string(logs.join(format!("rank{r}/stderr.log"))).unwrap();
        assert_eq!(err_log, format!("err {r}\n"));
    }
    assert!(ports.iter().all(|&p| p == ports[0] && p > 0), "{ports:?}");
    assert!(
        run_ids.iter().all(|id| id == &run_ids[0] && !id.is_empty()),
        "{run_ids:?}"
    );
    assert_eq!(f.stdout.lines().count(), 6, "{}", f.stdout);
    assert_eq!(f.stderr.lines().count(), 3, "{}", f.stderr);
}

#[test]
fn only_rank_and_no_prefix_and_a_user_omp_setting() {
    let f = run_cmd(
        tprun().env("OMP_NUM_THREADS", "3").args([
            "-n",
            "3",
            "--only-rank",
            "1",
            "--no-prefix",
            "--",
            "sh",
            "-c",
            r#"echo "hi $RANK $OMP_NUM_THREADS"; echo "e $RANK" >&2"#,
        ]),
        RUN_LIMIT,
    );
    assert_eq!(f.code, 0, "stderr: {}", f.stderr);
    assert_eq!(f.stdout, "hi 1 3\n");
    assert_eq!(f.stderr, "e 1\n");
}

#[test]
fn concurrent_lines_never_mix() {
    // Three ranks each write many short lines and one line far larger than a pipe buffer, all at
    // once; every console line must be one rank's line, whole, under that rank's prefix.
    let script = r#"i=0; while [ $i -lt 300 ]; do echo "$RANK$RANK$RANK$RANK$RANK$RANK$RANK$RANK"; i=$((i+1)); done
head -c 300000 /dev/zero | tr '\0' "$RANK"; echo
printf "$RANK$RANK""#;
    let f = run(&["-n", "3", "--", "sh", "-c", script]);
    assert_eq!(f.code, 0, "stderr: {}", f.stderr);
    let mut per_rank = [0usize; 3];
    let mut long = [false; 3];
    for line in f.stdout.lines() {
        let (r, body) = line
            .strip_prefix("[rank")
            .and_then(|l| l.split_once("]: "))
            .unwrap_or_else(|| panic!("line without prefix: {:.80}", line));
        let r: usize = r.parse().unwrap();
        let digit = char::from_digit(r as u32, 10).unwrap();
        assert!(
            !body.is_empty() && body.chars().all(|c| c == digit),
            "rank {r} line holds other output: {:.80}",
            body
        );
        per_rank[r] += 1;
        long[r] |= body.len() == 300_000;
    }
    assert_eq!(per_rank, [302; 3], "lines per rank");
    assert_eq!(long, [true; 3]);
}

#[test]
fn a_failing_rank_stops_the_others_and_is_reported() {
    let dir = TempDir::new("test", "fail");
    // Every rank prints its pid and checks in; rank 1 fails once all three have checked in.
    let script = r#"echo "pid $$"; touch "$D/up.$RANK"
if [ "$RANK" = 1 ]; then
  while [ "$(ls "$D" | wc -l)" -lt 3 ]; do sleep 0.05; done
  exit 7
fi
exec sleep 30"#;
    let f = run_cmd(
        tprun()
            .env("D", dir.path())
            .args(["-n", "3", "--", "sh", "-c", script]),
        RUN_LIMIT,
    );
    assert_eq!(f.code, 7, "stderr: {}", f.stderr);
    assert!(f.elapsed < Duration::from_secs(5), "took {:?}", f.elapsed);
    assert!(
        f.stderr.contains("tprun: rank 1 failed: exit code 7"),
        "{}",
        f.stderr
    );
    let table: Vec<&str> = f
        .stderr
        .lines()
        .skip_while(|l| !l.starts_with("rank "))
        .collect();
    assert_eq!(table.len(), 4, "{}", f.stderr);
    let pids = pids(&f.stdout);
    assert_eq!(pids.len(), 3, "{}", f.stdout);
    for row in &table[1..] {
        let cols: Vec<&str> = row.split_whitespace().collect();
        let rank: usize = cols[0].parse().unwrap();
        assert!(pids.contains(&cols[1].parse().unwrap()), "{row}");
        let want = if rank == 1 { "exit" } else { "SIGTERM" };
        assert_eq!(cols[2], want, "{row}");
    }
    for pid in pids {
        assert!(!alive(pid), "rank pid {pid} survived");
    }
}

#[test]
fn a_rank_killed_by_a_signal_gives_128_plus_n() {
    let f = run(&[
        "-n",
        "2",
        "--",
        "sh",
        "-c",
        r#"if [ "$RANK" = 1 ]; then kill -9 $$; fi; exec sleep 30"#,
    ]);
    assert_eq!(f.code, 137, "stderr: {}", f.stderr);
    assert!(
        f.stderr.contains("rank 1 failed: killed by SIGKILL"),
        "{}",
        f.stderr
    );
}

#[test]
fn sigterm_to_tprun_reaches_every_rank_and_the_grace_period_ends_stragglers() {
    // Rank 1 ignores SIGTERM, so only the SIGKILL after the 1 s grace period ends it.
    let script = r#"if [ "$RANK" = 1 ]; then trap "" TERM; fi; echo "pid $$"; exec sleep 30"#;
    let (mut child, pids, _) = start_and_collect_pids(
        tprun().args(["-n", "2", "--grace-period", "1", "--", "sh", "-c", script]),
        2,
    );
    let signalled = Instant::now();
    send(child.id(), libc::SIGTERM);
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let code = code_of(wait_run(&mut child));
    assert_eq!(code, 128 + libc::SIGTERM, "stderr: {stderr}");
    assert!(signalled.elapsed() < Duration::from_secs(5));
    for pid in pids {
        assert!(!alive(pid), "rank pid {pid} survived");
    }
    assert!(stderr.contains("tprun: stopped by SIGTERM"), "{stderr}");
    // Rank 0 died of the forwarded SIGTERM, rank 1 of the SIGKILL.
    let status = |r: &str| {
        stderr
            .lines()
            .find(|l| l.split_whitespace().next() == Some(r))
            .and_then(|l| l.split_whitespace().nth(2))
            .map(str::to_string)
    };
    assert_eq!(status("0").as_deref(), Some("SIGTERM"), "{stderr}");
    assert_eq!(status("1").as_deref(), Some("SIGKILL"), "{stderr}");
}

#[test]
fn a_second_sigint_kills_at_once() {
    let script = r#"trap "" INT; echo "pid $$"; exec sleep 30"#;
    let (mut child, pids, _) = start_and_collect_pids(
        tprun().args(["-n", "2", "--grace-period", "30", "--", "sh", "-c", script]),
        2,
    );
    send(child.id(), libc::SIGINT);
    // Two quick signals of one kind can merge into one delivery, so wait for the first to land.
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut stderr = String::new();
    while !stderr.contains("got SIGINT") {
        assert!(err.read_line(&mut stderr).unwrap() > 0, "{stderr}");
    }
    send(child.id(), libc::SIGINT);
    err.read_to_string(&mut stderr).unwrap();
    let code = code_of(wait_run(&mut child));
    assert_eq!(code, 128 + libc::SIGINT, "stderr: {stderr}");
    assert!(stderr.contains("second SIGINT"), "{stderr}");
    for pid in pids {
        assert!(!alive(pid), "rank pid {pid} survived");
    }
}

#[test]
fn ranks_die_with_a_sigkilled_tprun() {
    let (mut child, pids, _) = start_and_collect_pids(
        tprun().args([
            "-n",
            "3",
            "--",
            "sh",
            "-c",
            r#"echo "pid $$"; exec sleep 30"#,
        ]),
        3,
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let until = Instant::now() + Duration::from_secs(2);
    while pids.iter().any(|&p| alive(p)) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    let left: Vec<i32> = pids.into_iter().filter(|&p| alive(p)).collect();
    assert!(
        left.is_empty(),
        "ranks still alive 2 s after tprun died: {left:?}"
    );
}

#[test]
fn timeout_ends_the_job_with_124() {
    let f = run(&["-n", "2", "--timeout", "0.5", "--", "sleep", "30"]);
    assert_eq!(f.code, 124, "stderr: {}", f.stderr);
    assert!(f.stderr.contains("tprun: timeout:"), "{}", f.stderr);
    assert!(f.elapsed < Duration::from_secs(5), "took {:?}", f.elapsed);
}

#[test]
fn bad_input_gets_a_clear_error() {
    let dir = TempDir::new("test", "bad");
    let not_exec = dir.path().join("not-executable");
    std::fs::write(&not_exec, "#!/bin/sh\necho hi\n").unwrap();
    let not_exec = not_exec.to_str().unwrap();
    let log_under_file = format!("{not_exec}/logs");

    // (args, exit code, text the first stderr line must hold, whether it is tprun's own one-line
    // error rather than clap's usage message)
    let cases: &[(&[&str], i32, &str, bool)] = &[
        (
            &["-n", "0", "--", "true"],
            2,
            "'0' for '--nproc-per-node",
            false,
        ),
        (
            &["-n", "x", "--", "true"],
            2,
            "'x' for '--nproc-per-node",
            false,
        ),
        (
            &["--bogus", "--", "true"],
            2,
            "unexpected argument '--bogus'",
            false,
        ),
        (
            &["--grace-period=-1", "--", "true"],
            2,
            "--grace-period",
            false,
        ),
        (&["--timeout", "0", "--", "true"], 2, "--timeout", false),
        (
            &["--", "no-such-program-for-tprun"],
            127,
            "cannot run 'no-such-program-for-tprun': command not found",
            true,
        ),
        (&["-n", "2", "--", not_exec], 127, not_exec, true),
        (
            &["--log-dir", &log_under_file, "--", "true"],
            1,
            "--log-dir",
            true,
        ),
        (
            &["-n", "2", "--only-rank", "2", "--", "true"],
            2,
            "--only-rank 2 is out of range",
            true,
        ),
        (&[], 2, "nothing to run", true),
    ];
    for &(args, code, text, one_line) in cases {
        let f = run(args);
        assert_eq!(f.code, code, "{args:?}: {}", f.stderr);
        let first = f.stderr.lines().next().unwrap_or_default();
        assert!(first.contains(text), "{args:?}: {}", f.stderr);
        assert!(!f.stderr.contains("panicked"), "{args:?}: {}", f.stderr);
        if one_line {
            assert!(
                first.starts_with("tprun: error: "),
                "{args:?}: {}",
                f.stderr
            );
            assert_eq!(f.stderr.lines().count(), 1, "{args:?}: {}", f.stderr);
        }
        assert_eq!(f.stdout, "", "{args:?}");
    }
}

/// Parses a kernel CPU list such as `0-3,8`.
fn cpu_list(s: &str) -> Vec<usize> {
    s.trim()
        .split(',')
        .flat_map(|part| match part.split_once('-') {
            Some((a, b)) => (a.parse().unwrap()..=b.parse().unwrap()).collect::<Vec<usize>>(),
            None => vec![part.parse().unwrap()],
        })
        .collect()
}

fn own_cpus() -> Vec<usize> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap();
    cpu_list(line)
}

/// Each rank's `Cpus_allowed_list`, in rank order, and tprun's stderr.
fn rank_cpus(bind: &str, n: usize) -> (Vec<Vec<usize>>, String) {
    let f = run(&[
        "-n",
        &n.to_string(),
        "--cpu-bind",
        bind,
        "--",
        "grep",
        "Cpus_allowed_list",
        "/proc/self/status",
    ]);
    assert_eq!(f.code, 0, "{}", f.stderr);
    let mut lists = vec![Vec::new(); n];
    for line in f.stdout.lines() {
        let (r, rest) = line
            .strip_prefix("[rank")
            .and_then(|l| l.split_once("]: "))
            .unwrap();
        lists[r.parse::<usize>().unwrap()] = cpu_list(rest.split_once(':').unwrap().1);
    }
    (lists, f.stderr)
}

#[test]
fn cpu_binding_gives_ranks_disjoint_cores_or_leaves_them_alone() {
    let all = own_cpus();
    let (lists, _) = rank_cpus("none", 2);
    assert_eq!(lists, vec![all.clone(), all.clone()]);

    let (lists, stderr) = rank_cpus("cores", 2);
    if stderr.contains("share") {
        // Fewer than 2 physical cores: both ranks get the one core.
        assert_eq!(lists[0], lists[1]);
    } else {
        assert!(lists
            .iter()
            .all(|l| !l.is_empty() && l.iter().all(|c| all.contains(c))));
        assert!(
            lists[0].iter().all(|c| !lists[1].contains(c)),
            "overlapping shares {lists:?}"
        );
    }
}

/// The physical cores among `cpus`: distinct (package, core) pairs from /sys (a CPU whose
/// topology is unreadable counts as a core of its own).
fn physical_core_count(cpus: &[usize]) -> usize {
    let read = |c: usize, f: &str| {
        std::fs::read_to_string(format!("/sys/devices/system/cpu/cpu{c}/topology/{f}")).ok()
    };
    let cores: std::collections::HashSet<_> = cpus
        .iter()
        .map(
            |&c| match (read(c, "physical_package_id"), read(c, "core_id")) {
                (Some(p), Some(k)) => (p, k),
                _ => (format!("cpu{c}"), String::new()),
            },
        )
        .collect();
    cores.len()
}

/// `-n auto`: one rank per physical core tprun may run on (hyperthread siblings are one core),
/// and exactly one when tprun is pinned to a single CPU.
#[test]
fn auto_starts_one_rank_per_core() {
    let sizes = |f: &Finished| -> Vec<usize> {
        assert_eq!(f.code, 0, "{}", f.stderr);
        f.stdout.lines().map(|l| l.parse().unwrap()).collect()
    };
    let args = [
        "-n",
        "auto",
        "--no-prefix",
        "--",
        "sh",
        "-c",
        "echo $WORLD_SIZE",
    ];
    let want = physical_core_count(&own_cpus());
    let got = sizes(&run(&args));
    assert_eq!(got, vec![want; want], "{want} physical cores");

    let cpu = own_cpus()[0];
    let mut c = tprun();
    c.args(args);
    // SAFETY: sched_setaffinity on a local, initialised set is async-signal-safe.
    unsafe {
        c.pre_exec(move || {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            if libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    assert_eq!(
        sizes(&run_cmd(&mut c, RUN_LIMIT)),
        [1],
        "pinned to CPU {cpu}"
    );
}
