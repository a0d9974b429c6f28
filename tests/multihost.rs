//! Separate hosts on one machine (feature `mpi`, root): `tools/nshosts.sh` makes 2 hosts as
//! network + UTS + mount namespaces joined by veths (own host name, /dev/shm, /tmp), and Open
//! MPI's mpirun starts the ranks in them through a launch agent instead of ssh. The node-local
//! segment is then really per host and every inter-host byte crosses the veths over TCP; nothing
//! is pretended (no TPRUN_PRETEND_NODES: the nodes are what MPI finds). Where the machine refuses
//! namespaces each test logs a SKIPPED line (kernels::skips) instead.
//!
//! The harness's own tests (cleanup on failure and on a signal) need no MPI and run in every
//! build.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
#[cfg(feature = "mpi")]
use common::run_cmd;
use common::{clean, finish, tprun_bin, Finished};

const LIMIT: Duration = Duration::from_secs(300);

/// The rank program of `collectives/examples/hier_ops.rs` (as in tests/multinode.rs).
#[cfg(feature = "mpi")]
#[path = "../collectives/examples/hier_ops.rs"]
mod hier_ops;

#[cfg(feature = "mpi")]
/// Set in the ranks that [`groups_p2p_and_all_to_all_across_2_hosts`] starts.
const HIER_OPS_RANK: &str = "TPRUN_TEST_HIER_OPS_RANK";

/// `tools/nshosts.sh --hosts 2 --slots 2 -- bash -c SCRIPT`, not yet started.
fn nshosts(script: &str) -> Command {
    nshosts_with(&[], script)
}

/// [`nshosts`] with more of nshosts.sh's options (`--slurm`).
fn nshosts_with(options: &[&str], script: &str) -> Command {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut c = clean(Command::new("bash"));
    c.arg(root.join("tools/nshosts.sh"))
        .args(["--hosts", "2", "--slots", "2"])
        .args(options)
        .args(["--", "bash", "-c", script])
        .env("TPRUN", tprun_bin())
        .env("TEST_BIN", std::env::current_exe().unwrap())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// Whether a finished nshosts run was refused namespaces (then a SKIPPED line is logged).
fn refused(test: &str, r: &Finished) -> bool {
    if r.code != 77 {
        return false;
    }
    let why = r
        .stderr
        .lines()
        .find(|l| l.contains("nshosts: SKIP"))
        .unwrap_or("");
    common::skip(test, &format!("separate hosts need namespaces: {why}"));
    true
}

/// What run `pid` of nshosts.sh left: its namespaces (`tpn<pid>-*`) and its directory.
fn left_by(pid: u32) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output();
    let mut left: Vec<String> = out
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with(&format!("tpn{pid}-")))
        .map(str::to_string)
        .collect();
    let dir = format!("/run/tprun-nshosts.{pid}");
    if Path::new(&dir).exists() {
        left.push(dir);
    }
    left
}

#[test]
fn the_harness_removes_everything_after_a_failure_and_after_sigterm() {
    // A failing command: its status comes back, nothing stays.
    let mut c = nshosts("hostname; ls /run/netns >/dev/null; exit 3");
    let started = Instant::now();
    let child = c.spawn().unwrap();
    let pid = child.id();
    let r = finish(child, started, LIMIT);
    if refused("multihost harness cleanup", &r) {
        return;
    }
    assert_eq!((r.code, r.stdout.trim()), (3, "head"), "{}", r.stderr);
    assert_eq!(left_by(pid), Vec::<String>::new());
    // SIGTERM while a process runs on a host: the process is ended, nothing stays.
    let script = r#"$NSHOSTS_ENTER h2 sleep 300 & echo started; wait"#;
    let mut c = nshosts(script);
    let started = Instant::now();
    let mut child = c.spawn().unwrap();
    let pid = child.id();
    let mut out = child.stdout.take().unwrap();
    let mut first = [0u8; 8];
    std::io::Read::read_exact(&mut out, &mut first).unwrap();
    assert_eq!(&first, b"started\n");
    let sleeper = || {
        Command::new("ip")
            .args(["netns", "pids", &format!("tpn{pid}-h2")])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    while sleeper().is_empty() {
        assert!(started.elapsed() < LIMIT, "sleep never started on h2");
        std::thread::sleep(Duration::from_millis(50));
    }
    let on_h2: Vec<i32> = sleeper().lines().filter_map(|l| l.parse().ok()).collect();
    // SAFETY: kill(2) of the script this test started.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
    let st = common::wait_limited(&mut child, LIMIT).expect("nshosts did not end on SIGTERM");
    assert_eq!(common::code_of(st), 143);
    assert_eq!(left_by(pid), Vec::<String>::new());
    for p in on_h2 {
        assert!(
            !Path::new(&format!("/proc/{p}")).exists()
                || common::proc_stat(p as u32).is_some_and(|(_, s)| s == 'Z'),
            "process {p} on h2 outlived the harness"
        );
    }
}

/// `tools/nshosts.sh --hosts 2 --slots 2 -- bash -c SCRIPT` with `TPRUN` (the binary under test)
/// and `TEST_BIN` (this test binary) set; `None` (after a SKIPPED line) where the machine refuses
/// namespaces.
#[cfg(feature = "mpi")]
fn on_hosts(test: &str, script: &str) -> Option<Finished> {
    let r = run_cmd(&mut nshosts(script), LIMIT);
    (!refused(test, &r)).then_some(r)
}

/// The `Out of bounds values : N OK` lines of a perf --check run; panics unless there are `want`
/// and every one says 0.
#[cfg(feature = "mpi")]
fn all_checks_pass(out: &str, want: usize) {
    let lines: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("Out of bounds values"))
        .collect();
    assert_eq!(lines.len(), want, "{out}");
    assert!(
        lines
            .iter()
            .all(|l| l.contains("Out of bounds values : 0 OK")),
        "{out}"
    );
}

/// Every operation perf runs (`--op all` is the four collectives).
#[cfg(feature = "mpi")]
const ALL_OPS: &str =
    "all-reduce,all-gather,reduce-scatter,broadcast,reduce,gather,scatter,all-to-all,send-recv";

#[cfg(feature = "mpi")]
#[test]
fn perf_check_every_op_across_2_hosts_in_the_world_and_in_host_groups() {
    // Every op of perf (all-reduce ... all-to-all, send_recv) on the world of 2 hosts x 2 ranks,
    // then inside groups of 2 consecutive ranks (each group on one host), then all-reduce and
    // reduce in the fast hierarchy mode.
    let script = r#"
        set -e
        mpirun $NSHOSTS_MPIRUN -np 4 sh -c 'echo "rank $OMPI_COMM_WORLD_RANK on $(hostname)"' | sort
        mpirun $NSHOSTS_MPIRUN -np 4 "$TPRUN" rank perf --op $OPS --check --max-bytes 256K --iters 3 --warmup 1
        echo ==== groups
        mpirun $NSHOSTS_MPIRUN -np 4 "$TPRUN" rank perf --op $OPS --check --max-bytes 64K --group-size 2 --iters 3 --warmup 1
        echo ==== fast
        mpirun $NSHOSTS_MPIRUN -np 4 "$TPRUN" rank perf --op all-reduce,reduce --check --hier-mode fast --max-bytes 256K --iters 3 --warmup 1
    "#;
    let script = format!("OPS={ALL_OPS}\n{script}");
    let Some(r) = on_hosts("multihost perf_check", &script) else {
        return;
    };
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    for (rank, host) in [(0, "h1"), (1, "h1"), (2, "h2"), (3, "h2")] {
        let line = format!("rank {rank} on {host}");
        assert!(r.stdout.contains(&line), "{line}: {}", r.stdout);
    }
    let (world, rest) = r.stdout.split_once("==== groups").unwrap();
    let (groups, fast) = rest.split_once("==== fast").unwrap();
    assert!(
        world.contains("hierarchy: 2 nodes x 2 ranks per node"),
        "MPI must find 2 hosts of 2 ranks: {world}"
    );
    // perf --check compares every element on every rank with the flat rank-order result, bit for
    // bit: one line per op, 0 wrong on every rank.
    let ops = ALL_OPS.split(',').count();
    all_checks_pass(world, ops);
    all_checks_pass(groups, ops);
    // The fast hierarchy across the hosts: every rank has the fast order's bits.
    assert!(
        fast.contains("all-reduce fast (node partial sums"),
        "{fast}"
    );
    all_checks_pass(fast, 2);
}

/// One rank of [`groups_p2p_and_all_to_all_across_2_hosts`] (this test binary re-run by mpirun
/// with only this test selected); ignored in an ordinary run.
#[cfg(feature = "mpi")]
#[test]
#[ignore = "a rank program: groups_p2p_and_all_to_all_across_2_hosts runs it under mpirun"]
fn hier_ops_rank() {
    assert!(
        std::env::var_os(HIER_OPS_RANK).is_some(),
        "only meaningful under mpirun (groups_p2p_and_all_to_all_across_2_hosts)"
    );
    let res = hier_ops::run();
    collectives::end_job(res.is_ok());
    println!("{}", res.unwrap());
}

/// collectives/examples/hier_ops.rs on 2 hosts x 2 ranks: point-to-point (ring, in-order pairs),
/// reduce, gather, scatter, all-to-all(v), every reduction type, groups spanning both hosts
/// (even and odd ranks, reversed keys), a nested split with a rank opting out, every value
/// checked bit for bit against the rank-order reference on every rank.
#[cfg(feature = "mpi")]
#[test]
fn groups_p2p_and_all_to_all_across_2_hosts() {
    let script = format!(
        r#"mpirun $NSHOSTS_MPIRUN -np 4 -x {HIER_OPS_RANK}=1 "$TEST_BIN" --exact hier_ops_rank --ignored --nocapture --test-threads=1"#
    );
    let Some(r) = on_hosts("multihost hier_ops", &script) else {
        return;
    };
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    for rank in 0..4 {
        let line = format!("hier_ops: rank {rank} of 4: 133 checks passed");
        assert!(r.stdout.contains(&line), "{line}: {}", r.stdout);
    }
}

/// Runs a 2 x 2 all-reduce loop on the hosts, applies `fault` once every rank runs (`kill`:
/// SIGKILL of rank 2, on h2; `cut`: h2's link down), and returns the run's output, mpirun's exit
/// status, the seconds from the fault until mpirun had returned and both hosts were empty (or
/// 10 s after mpirun returned), and what was left on h1 and h2 then.
#[cfg(feature = "mpi")]
fn fault_run(test: &str, fault: &str) -> Option<(String, i32, f64, String)> {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("multihost-{fault}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // The pid files live outside /tmp (every host has its own /tmp).
    let script = format!(
        r#"PIDDIR={dir}
mpirun $NSHOSTS_MPIRUN -np 4 -x PIDDIR="$PIDDIR" sh -c 'echo $$ > "$PIDDIR/pid.$OMPI_COMM_WORLD_RANK.tmp" && mv "$PIDDIR/pid.$OMPI_COMM_WORLD_RANK.tmp" "$PIDDIR/pid.$OMPI_COMM_WORLD_RANK"; exec "$0" rank perf --op all-reduce --min-bytes 64K --max-bytes 64K --iters 1000000000' "$TPRUN" &
m=$!
for i in $(seq 1200); do [ -s "$PIDDIR/pid.2" ] && [ -s "$PIDDIR/pid.0" ] && break; sleep 0.1; done
sleep 3
t0=$(date +%s.%N)
case {fault} in
kill) kill -9 "$(cat "$PIDDIR/pid.2")" ;;
cut) $NSHOSTS_CUT h2 ;;
esac
wait $m
rc=$?
# The last processes (an orted, a rank being killed) may still be on their way out.
for i in $(seq 100); do
    [ -z "$(ip netns pids "$NSHOSTS_NS-h1")$(ip netns pids "$NSHOSTS_NS-h2")" ] && break
    sleep 0.1
done
t1=$(date +%s.%N)
echo "mpirun exit $rc, hosts empty after $(awk "BEGIN{{print $t1 - $t0}}") s"
for h in h1 h2; do echo "left on $h: $(ip netns pids "$NSHOSTS_NS-$h" | wc -l)"; done
"#,
        dir = dir.display()
    );
    let r = on_hosts(test, &script);
    let _ = std::fs::remove_dir_all(&dir);
    let r = r?;
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let all = format!("{}{}", r.stdout, r.stderr);
    let end = r
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("mpirun exit "))
        .unwrap_or_else(|| panic!("no end line: {all}"));
    let (code, secs) = end.split_once(", hosts empty after ").unwrap();
    let secs: f64 = secs.trim_end_matches(" s").parse().unwrap();
    let left: String = r
        .stdout
        .lines()
        .filter(|l| l.starts_with("left on"))
        .collect();
    Some((all, code.parse().unwrap(), secs, left))
}

/// A rank SIGKILLed on h2 ends every rank on both hosts (nothing left in either namespace when
/// mpirun returns), fails the job, and the output names the rank and its host.
#[cfg(feature = "mpi")]
#[test]
fn a_rank_killed_on_one_host_ends_the_ranks_on_every_host() {
    let Some((all, code, secs, left)) = fault_run("multihost kill", "kill") else {
        return;
    };
    assert_ne!(code, 0, "{all}");
    assert!(
        secs < 30.0,
        "the hosts emptied {secs} s after the kill: {all}"
    );
    // mpirun's own line, or (when a peer's abort reaches mpirun first) the peer's line.
    let mpirun_says = all.contains("process rank 2 with PID") && all.contains("on node h2");
    assert!(
        mpirun_says || all.contains("rank 2 (host h2, node 1) died"),
        "the killed rank and its host are named: {all}"
    );
    assert_eq!(left, "left on h1: 0left on h2: 0", "{all}");
}

/// A host whose link goes down mid-job (its veth cut) is reported by name and the job ends, on
/// every host, instead of waiting for it: mpirun's TCP keepalive (tools/nshosts.sh's
/// NSHOSTS_MPIRUN, docs/multihost.md) notices the lost daemon.
#[cfg(feature = "mpi")]
#[test]
fn a_host_whose_network_is_cut_is_reported_not_waited_for() {
    let Some((all, code, secs, left)) = fault_run("multihost cut", "cut") else {
        return;
    };
    assert_ne!(code, 0, "{all}");
    assert!(
        secs < 60.0,
        "the hosts emptied {secs} s after the cut: {all}"
    );
    assert!(
        all.contains("lost communication with a remote daemon") && all.contains("on node h2"),
        "the cut host is named: {all}"
    );
    assert_eq!(left, "left on h1: 0left on h2: 0", "{all}");
}

/// A real Slurm on the hosts (`tools/nshosts.sh --slurm`: slurmctld on head, a slurmd on h1 and
/// h2, munge; Debian's packages, installed when missing): `srun --mpi=pmix -N2 -n4` gives every
/// task PMIX_RANK and no PMI_SIZE (what used to fail), perf --check of every op passes on every
/// rank, generate across the hosts writes what `tprun -n 4` writes on one host (the same bits,
/// so the same tokens), and an `sbatch` job that runs srun succeeds.
#[cfg(feature = "mpi")]
#[test]
fn srun_and_sbatch_on_a_real_slurm_across_2_hosts() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("multihost-slurm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let model = common::fixture("tiny-hub-bf16-tied");
    // Open MPI ranks under srun take their MCA settings from the environment srun passes on.
    let script = format!(
        r#"set -e
export OMPI_MCA_btl=vader,tcp,self OMPI_MCA_btl_tcp_if_include=10.77.0.0/24
OUT={dir}
MODEL={model}
srun --mpi=pmix -N2 -n4 sh -c 'echo "task $SLURM_PROCID on $(hostname): PMIX_RANK=${{PMIX_RANK:-unset}} PMI_SIZE=${{PMI_SIZE:-unset}}"' | sort
echo ==== perf
srun --mpi=pmix -N2 -n4 "$TPRUN" rank perf --op {ALL_OPS} --check --max-bytes 64K --iters 2 --warmup 1
echo ==== generate
srun --mpi=pmix -N2 -n4 "$TPRUN" rank generate --model "$MODEL" --prompt Hello --max-new-tokens 8
echo ==== one host
"$TPRUN" -n 4 --only-rank 0 --no-prefix generate --model "$MODEL" --prompt Hello --max-new-tokens 8
echo ==== sbatch
printf '#!/bin/sh\nsrun --mpi=pmix "%s" rank perf --op all-reduce,send-recv --check --max-bytes 16K --iters 2 --warmup 1\n' "$TPRUN" > "$OUT/job.sh"
sbatch --wait -N2 -n4 -o "$OUT/job.out" "$OUT/job.sh"
echo "sbatch exit $?"
cat "$OUT/job.out"
"#,
        dir = dir.display(),
        model = model.display()
    );
    let r = run_cmd(&mut nshosts_with(&["--slurm"], &script), LIMIT);
    let _ = std::fs::remove_dir_all(&dir);
    if refused("multihost slurm", &r) {
        return;
    }
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let out = &r.stdout;
    for (task, host) in [(0, "h1"), (1, "h1"), (2, "h2"), (3, "h2")] {
        let line = format!("task {task} on {host}: PMIX_RANK={task} PMI_SIZE=unset");
        assert!(out.contains(&line), "{line}: {out}");
    }
    let (_, rest) = out.split_once("==== perf").unwrap();
    let (perf, rest) = rest.split_once("==== generate").unwrap();
    let (across, rest) = rest.split_once("==== one host").unwrap();
    let (one, batch) = rest.split_once("==== sbatch").unwrap();
    assert!(
        perf.contains("hierarchy: 2 nodes x 2 ranks per node"),
        "{perf}"
    );
    all_checks_pass(perf, ALL_OPS.split(',').count());
    assert!(!one.trim().is_empty(), "{}", r.stderr);
    assert_eq!(
        across.trim(),
        one.trim(),
        "generate on 2 Slurm hosts vs one host"
    );
    assert!(batch.contains("sbatch exit 0"), "{batch}");
    all_checks_pass(batch, 2);
}

#[cfg(feature = "mpi")]
fn read_logits(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("logits").unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::F32);
    t.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

#[cfg(feature = "mpi")]
fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// `tprun rank logits` at TP 4 on 2 hosts x 2 ranks, in both hierarchy modes, against TP 1 (within
/// 1e-4) and transformers' reference (within 1e-3, as tests/logits.rs holds every TP).
#[cfg(feature = "mpi")]
#[test]
fn logits_at_tp_4_across_2_hosts_match_tp_1_and_transformers() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("multihost-logits-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let model = common::fixture("tiny-hub-bf16-tied");
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("reference/cases.json")).unwrap())
            .unwrap();
    // The longest prompt.
    let case = &cases["logits"][2];
    let ids: Vec<String> = case["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.to_string())
        .collect();
    let ids = ids.join(",");
    let reference = read_logits(&model.join("reference").join(case["file"].as_str().unwrap()));
    let tp1 = dir.join("tp1.safetensors");
    let mut c = clean(common::tprun());
    c.args(["-n", "1", "logits", "--model"])
        .arg(&model)
        .args(["--input-ids", &ids, "--out"])
        .arg(&tp1);
    let r = run_cmd(&mut c, LIMIT);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let script = format!(
        r#"set -e
for mode in reproducible fast; do
    mpirun $NSHOSTS_MPIRUN -np 4 -x TPRUN_HIER_MODE=$mode "$TPRUN" rank logits --model {model} --input-ids {ids} --out {dir}/tp4-$mode.safetensors
done"#,
        model = model.display(),
        dir = dir.display()
    );
    let r = on_hosts("multihost logits", &script);
    let got = |mode: &str| read_logits(&dir.join(format!("tp4-{mode}.safetensors")));
    let res = r.map(|r| {
        assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
        let one = read_logits(&tp1);
        for mode in ["reproducible", "fast"] {
            let four = got(mode);
            let d = max_diff(&one, &four);
            assert!(d <= 1e-4, "{mode}: max |TP 4 on 2 hosts - TP 1| = {d}");
            let d = max_diff(&reference, &four);
            assert!(
                d <= 1e-3,
                "{mode}: max |TP 4 on 2 hosts - transformers| = {d}"
            );
        }
    });
    let _ = std::fs::remove_dir_all(&dir);
    res.unwrap_or(())
}

/// Under Slurm, a node whose link is cut mid-step: srun reports "Node failure on h2" and ends
/// the step instead of waiting (slurmctld marks the node down after nshosts.sh's
/// SlurmdTimeout=10; Slurm's default is 300 s), and no rank is left on h1.
#[cfg(feature = "mpi")]
#[test]
fn a_slurm_node_whose_network_is_cut_fails_the_step() {
    let script = r#"export OMPI_MCA_btl=vader,tcp,self OMPI_MCA_btl_tcp_if_include=10.77.0.0/24
srun --mpi=pmix -N2 -n4 "$TPRUN" rank perf --op all-reduce --min-bytes 64K --max-bytes 64K --iters 1000000000 &
m=$!
for i in $(seq 600); do [ "$(ip netns pids "$NSHOSTS_NS-h2" | xargs -r ps -o comm= -p | grep -c tprun)" = 2 ] && break; sleep 0.1; done
sleep 3
t0=$(date +%s.%N)
$NSHOSTS_CUT h2
wait $m
rc=$?
t1=$(date +%s.%N)
echo "srun exit $rc after $(awk "BEGIN{print $t1 - $t0}") s"
left() { ip netns pids "$NSHOSTS_NS-h1" | xargs -r ps -o comm= -p | grep -c tprun; }
for i in $(seq 100); do [ "$(left)" = 0 ] && break; sleep 0.1; done
echo "ranks left on h1: $(left)"
"#;
    let r = run_cmd(&mut nshosts_with(&["--slurm"], script), LIMIT);
    if refused("multihost slurm cut", &r) {
        return;
    }
    let all = format!("{}{}", r.stdout, r.stderr);
    assert_eq!(r.code, 0, "{all}");
    let end = r
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("srun exit "))
        .unwrap_or_else(|| panic!("no end line: {all}"));
    let (code, secs) = end.split_once(" after ").unwrap();
    let secs: f64 = secs.trim_end_matches(" s").parse().unwrap();
    assert_ne!(code, "0", "{all}");
    assert!(secs < 120.0, "srun ended {secs} s after the cut: {all}");
    assert!(all.contains("Node failure on h2"), "{all}");
    assert!(all.contains("ranks left on h1: 0"), "{all}");
}
