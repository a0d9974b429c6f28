//! More than one machine: `tprun rank PROGRAM` under an outside launcher. Slurm's variables are
//! set by hand (no Slurm here); with feature `mpi` the hierarchical communicator runs under Open
//! MPI's mpirun with `TPRUN_PRETEND_NODES` splitting this host into pretend nodes and the leaders'
//! traffic forced onto TCP (`--mca btl tcp,self`).

use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::{clean, finish, run_cmd, tprun, Finished};

const LIMIT: Duration = Duration::from_secs(180);

/// `tprun rank ARGS` as task `rank` of a hand-made srun job of `tasks` tasks on `nodes` nodes.
fn srun_task(rank: usize, tasks: usize, nodes: usize, job: &str, args: &[&str]) -> Command {
    let per = tasks / nodes;
    let mut c = clean(tprun());
    c.arg("rank").args(args);
    for (k, v) in [
        ("SLURM_PROCID", rank.to_string()),
        ("SLURM_NTASKS", tasks.to_string()),
        ("SLURM_LOCALID", (rank % per).to_string()),
        ("SLURM_NODEID", (rank / per).to_string()),
        ("SLURM_TASKS_PER_NODE", format!("{per}(x{nodes})")),
        ("SLURM_JOB_ID", job.to_string()),
        ("SLURM_STEP_ID", "0".to_string()),
    ] {
        c.env(k, v);
    }
    c
}

#[test]
fn srun_variables_set_by_hand_make_a_two_rank_job() {
    let job = format!("t{}", std::process::id());
    let args = ["perf", "--op", "all", "--check", "--max-bytes", "64K"];
    let children: Vec<_> = (0..2)
        .map(|r| {
            let started = Instant::now();
            (srun_task(r, 2, 1, &job, &args).spawn().unwrap(), started)
        })
        .collect();
    let runs: Vec<Finished> = children
        .into_iter()
        .map(|(c, t)| finish(c, t, LIMIT))
        .collect();
    for (r, run) in runs.iter().enumerate() {
        assert_eq!(run.code, 0, "task {r}: {}", run.stderr);
    }
    let out = &runs[0].stdout;
    assert_eq!(out.matches("on 2 ranks").count(), 4, "{out}");
    assert_eq!(
        out.matches("Out of bounds values : 0 OK").count(),
        4,
        "{out}"
    );
    assert!(
        runs[1].stdout.is_empty(),
        "only rank 0 prints: {}",
        runs[1].stdout
    );
}

#[test]
fn nesting_the_launcher_in_srun_is_refused_in_one_line() {
    let mut c = clean(tprun());
    c.args(["-n", "2", "--", "true"])
        .env("SLURM_PROCID", "0")
        .env("SLURM_NTASKS", "2");
    let r = run_cmd(&mut c, LIMIT);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("nesting") && r.stderr.contains("tprun rank"),
        "{}",
        r.stderr
    );
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
}

#[test]
fn tprun_rank_without_launcher_variables_says_what_to_do() {
    let mut c = clean(tprun());
    c.args(["rank", "perf"]);
    let r = run_cmd(&mut c, LIMIT);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("srun or mpirun"), "{}", r.stderr);
}

/// Without feature `mpi`, ranks on two nodes are one error naming the rebuild.
#[cfg(not(feature = "mpi"))]
#[test]
fn two_nodes_without_the_mpi_feature_is_one_clear_error() {
    let r = run_cmd(&mut srun_task(0, 2, 2, "nompi", &["perf"]), LIMIT);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("--features mpi"), "{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
}

/// The rank program of `collectives/examples/hier_ops.rs`, compiled into this test binary so the
/// test needs no separate build of the example.
#[cfg(feature = "mpi")]
#[path = "../collectives/examples/hier_ops.rs"]
mod hier_ops;

#[cfg(feature = "mpi")]
mod mpi {
    use super::*;
    use common::{tprun_bin, TempDir};
    use std::process::Stdio;

    /// `mpirun -np N` on pretend nodes, leaders over TCP, running `args` (a program and its
    /// arguments).
    fn mpirun(n: usize, nodes: usize, args: &[&str]) -> Command {
        let mut c = clean(Command::new("mpirun"));
        c.args([
            "--oversubscribe",
            "--allow-run-as-root",
            "--mca",
            "btl",
            "tcp,self",
        ])
        .args(["-np", &n.to_string()])
        .args(args)
        .env("TPRUN_PRETEND_NODES", nodes.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        c
    }

    use super::hier_ops;

    /// Set in the ranks that [`every_new_op_across_2_pretend_nodes`] starts.
    const HIER_OPS_RANK: &str = "TPRUN_TEST_HIER_OPS_RANK";

    /// One rank of [`every_new_op_across_2_pretend_nodes`] (this test binary re-run by mpirun
    /// with only this test selected); ignored in an ordinary run.
    #[test]
    #[ignore = "a rank program: every_new_op_across_2_pretend_nodes runs it under mpirun"]
    fn hier_ops_rank() {
        assert!(
            std::env::var_os(HIER_OPS_RANK).is_some(),
            "only meaningful under mpirun (every_new_op_across_2_pretend_nodes)"
        );
        let res = hier_ops::run();
        collectives::end_job(res.is_ok());
        println!("{}", res.unwrap());
    }

    /// Point-to-point (ring, in-order pairs, blocking), reduce, gather, scatter, all-to-all(v),
    /// f64/integer/premulsum all-reduce, split across the nodes (reversed keys), nested split
    /// with a rank opting out, and every collective inside the groups: 2 pretend nodes x 2 ranks,
    /// leaders over TCP, every value checked against the rank-order reference, bit for bit.
    #[test]
    fn every_new_op_across_2_pretend_nodes() {
        let me = std::env::current_exe().unwrap();
        let args = [
            me.to_str().unwrap(),
            "--exact",
            "mpi::hier_ops_rank",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ];
        let mut c = mpirun(4, 2, &args);
        c.env(HIER_OPS_RANK, "1");
        let r = run_cmd(&mut c, LIMIT);
        assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
        for rank in 0..4 {
            let line = format!("hier_ops: rank {rank} of 4: ");
            // mpirun interleaves the ranks' output, so the line may follow another rank's text
            // on the same line: read what comes right after the marker.
            let got = r.stdout.lines().find(|l| l.contains(&line));
            let checks = got
                .and_then(|l| {
                    let rest = &l[l.find(&line)? + line.len()..];
                    rest.split(' ').next()?.parse::<usize>().ok()
                })
                .unwrap_or(0);
            // 4 sizes x 16 checks (17 at a root) in the world (65) and in a group of 2 (66),
            // the world after the split and the nested split.
            assert_eq!(checks, 133, "rank {rank}: {got:?}\n{}", r.stdout);
        }
    }

    #[test]
    fn perf_check_every_op_at_4_and_6_ranks_on_2_and_3_pretend_nodes() {
        let bin = tprun_bin();
        let bin = bin.to_str().unwrap();
        for (n, k) in [(4, 2), (6, 3)] {
            let args = [
                bin,
                "rank",
                "perf",
                "--op",
                "all",
                "--check",
                "--max-bytes",
                "4M",
            ];
            let r = run_cmd(&mut mpirun(n, k, &args), LIMIT);
            assert_eq!(r.code, 0, "{n} ranks: {}\n{}", r.stdout, r.stderr);
            let hier = format!("hierarchy: {k} nodes x {} ranks per node", n / k);
            assert_eq!(r.stdout.matches(&hier).count(), 4, "{}", r.stdout);
            // perf --check compares every element of every rank with the flat rank-order result,
            // bit for bit: 0 wrong means the same bits on all ranks, and the flat path's bits.
            let ok = r.stdout.matches("Out of bounds values : 0 OK").count();
            assert_eq!(ok, 4, "{}", r.stdout);
        }
    }

    /// The fast hierarchy (`--hier-mode fast`): perf --check compares every all-reduce and
    /// reduce result on every rank, bit for bit, with the fast order's reference (node sums in
    /// local rank order, then the nodes in node order; perf's unit tests show it differs from
    /// the flat order for float sums): 0 wrong means the same bits on every rank. 2 and 3 nodes,
    /// odd sizes (padding), every kind of element and the reductions that take the fast path,
    /// and avg (which keeps the reproducible path).
    #[test]
    fn fast_hierarchy_gives_every_rank_the_same_bits() {
        let bin = tprun_bin();
        let bin = bin.to_str().unwrap();
        for (n, k, dtype, redop) in [
            (4, 2, "f32", "sum"),
            (4, 2, "bf16", "premulsum"),
            (4, 2, "f64", "avg"),
            (4, 2, "i32", "prod"),
            (6, 3, "f16", "sum"),
            (6, 3, "f32", "max"),
        ] {
            let args = [
                bin,
                "rank",
                "perf",
                "--hier-mode",
                "fast",
                "--op",
                "all-reduce,reduce",
                "--dtype",
                dtype,
                "--redop",
                redop,
                "--check",
                "--min-bytes",
                "4",
                "--max-bytes",
                "300K",
                "--iters",
                "2",
                "--warmup",
                "1",
            ];
            let r = run_cmd(&mut mpirun(n, k, &args), LIMIT);
            let what = format!("{n} ranks on {k} nodes, {dtype} {redop}");
            assert_eq!(r.code, 0, "{what}: {}\n{}", r.stdout, r.stderr);
            assert_eq!(
                r.stdout
                    .matches("all-reduce fast (node partial sums")
                    .count(),
                2,
                "{what}: {}",
                r.stdout
            );
            let ok = r.stdout.matches("Out of bounds values : 0 OK").count();
            assert_eq!(ok, 2, "{what}: {}", r.stdout);
        }
        // A mode that does not exist is one line naming the variable, on every rank's abort.
        let mut c = mpirun(2, 2, &[bin, "rank", "perf"]);
        c.env("TPRUN_HIER_MODE", "quick");
        let r = run_cmd(&mut c, LIMIT);
        assert_ne!(r.code, 0, "{}", r.stdout);
        assert!(
            r.stderr
                .contains("TPRUN_HIER_MODE=quick is not a hierarchy mode"),
            "{}",
            r.stderr
        );
    }

    fn logits(dir: &std::path::Path) -> Vec<f32> {
        let bytes = std::fs::read(dir).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let t = st.tensor("logits").unwrap();
        t.data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn logits_through_the_hierarchy_match_tp_1() {
        let tmp = TempDir::new("multinode", "logits");
        let model = common::fixture("tiny-hub-bf16-tied");
        let model = model.to_str().unwrap();
        let ids = "1,2,3,4,5,6,7,8,9,10,11,12";
        let (one, four) = (tmp.join("tp1.safetensors"), tmp.join("tp4.safetensors"));
        let mut c = clean(tprun());
        c.args([
            "-n",
            "1",
            "logits",
            "--model",
            model,
            "--input-ids",
            ids,
            "--out",
        ])
        .arg(&one);
        let r = run_cmd(&mut c, LIMIT);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let bin = tprun_bin();
        let (bin, out) = (bin.to_str().unwrap(), four.to_str().unwrap());
        let args = [
            bin,
            "rank",
            "logits",
            "--model",
            model,
            "--input-ids",
            ids,
            "--out",
            out,
        ];
        let r = run_cmd(&mut mpirun(4, 2, &args), LIMIT);
        assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
        let (a, b) = (logits(&one), logits(&four));
        assert_eq!(a.len(), b.len());
        let d = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(d <= 1e-4, "max |logits 2x2 - TP 1| = {d}");
    }

    #[test]
    fn a_killed_rank_ends_the_job_within_15_s_naming_it() {
        let tmp = TempDir::new("multinode", "kill");
        let script = format!(
            "echo $$ > {}/pid.$OMPI_COMM_WORLD_RANK.tmp && mv {0}/pid.$OMPI_COMM_WORLD_RANK.tmp {0}/pid.$OMPI_COMM_WORLD_RANK; exec \"$0\" rank perf --op all-reduce --min-bytes 64K --max-bytes 64K --iters 100000000",
            tmp.s()
        );
        let bin = tprun_bin();
        let args = ["sh", "-c", &script, bin.to_str().unwrap()];
        let child = mpirun(4, 2, &args).spawn().unwrap();
        let pid_file = tmp.join("pid.2");
        let t0 = Instant::now();
        while !pid_file.exists() {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "rank 2 never started"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // Let the ranks get into the all-reduce loop.
        std::thread::sleep(Duration::from_secs(3));
        let pid: i32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // SAFETY: kill(2) of a process this test's mpirun started.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
        let killed = Instant::now();
        let r = finish(child, killed, LIMIT);
        let all = format!("{}{}", r.stdout, r.stderr);
        assert_ne!(r.code, 0, "{all}");
        assert!(
            r.elapsed < Duration::from_secs(15),
            "took {:?}: {all}",
            r.elapsed
        );
        assert!(all.contains("rank 2"), "the killed rank is named: {all}");
    }
}
