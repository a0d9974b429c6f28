//! The CUDA path end to end on tprun's CUDA emulator (feature `cuda-emulator`,
//! `TPRUN_CUDA_EMULATE=1`): the real binary, rank processes, cudarc, collectives::cuda with
//! comm.cu over emulated IPC (named shared memory between the rank processes) and host-staged,
//! rank::model::cuda with model.cu/attention.cu and the reference cuBLAS GEMM. What the emulator
//! cannot show (speed, the driver's real limits, PTX and driver versions, IPC permissions) still
//! waits for a GPU: tools/gpu-acceptance.sh.
#![cfg(feature = "cuda-emulator")]

use std::path::Path;
use std::process::Command;

mod common;
use common::{fixture, TempDir};

const TPRUN: &str = env!("CARGO_BIN_EXE_tprun");

/// `tprun -n N ARGS` on 4 emulated GPUs with `env`; (success, stdout, stderr).
fn tprun(n: &str, args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = Command::new(TPRUN);
    cmd.args(["-n", n]).args(args);
    cmd.env_remove("TPRUN_ROLE")
        .env_remove("CUDA_VISIBLE_DEVICES")
        .env_remove("TPRUN_CUDA_TRANSPORT")
        .env("TPRUN_CUDA_EMULATE", "1")
        .env("TPRUN_CUDA_EMULATE_GPUS", "4");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let o = cmd.output().unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    );
    (o.status.success(), out, err)
}

fn tprun_ok(n: &str, args: &[&str], env: &[(&str, &str)]) -> (String, String) {
    let (ok, out, err) = tprun(n, args, env);
    assert!(ok, "-n {n} {args:?} {env:?}:\n{out}\n{err}");
    (out, err)
}

/// perf --check of every device op, f32 and bf16, at 2 and 4 ranks, over emulated IPC (the
/// comm.cu kernels) and host-staged. A small one-shot limit and slab make the sweep run one-shot,
/// two-shot and a message cut into pieces.
#[test]
fn perf_checks_every_device_op_over_emulated_ipc_and_host_staged() {
    for transport in ["ipc", "host"] {
        for n in ["2", "4"] {
            for dtype in ["f32", "bf16"] {
                let args = [
                    "--device",
                    "cuda",
                    "perf",
                    "--op",
                    "all",
                    "--check",
                    "--dtype",
                    dtype,
                    "--max-bytes",
                    "256K",
                    "--iters",
                    "2",
                    "--warmup",
                    "1",
                ];
                let env = [
                    ("TPRUN_CUDA_TRANSPORT", transport),
                    ("TPRUN_CUDA_ONESHOT_MAX", "16K"),
                    ("TPRUN_CUDA_SLAB_BYTES", "64K"),
                ];
                let (out, err) = tprun_ok(n, &args, &env);
                let what = format!("{transport}, -n {n}, {dtype}");
                assert_eq!(
                    out.matches("Out of bounds values : 0 OK").count(),
                    4,
                    "{what}: every op checked\n{out}"
                );
                assert!(err.contains("the CUDA device is EMULATED"), "{what}: {err}");
                let staged = err.contains("staged through host memory");
                assert_eq!(staged, transport == "host", "{what}: {err}");
            }
        }
    }
}

/// Every f32 tensor of a safetensors file, in name order, as one list.
fn read_f32(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names = st.names();
    names.sort();
    names
        .iter()
        .flat_map(|n| st.tensor(n).unwrap().data().to_vec())
        .collect::<Vec<u8>>()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// `logits --hidden-states` of `model` at TP `n` on `device`: (logits, hidden states).
fn logits(model: &str, n: &str, device: &str, dir: &Path) -> (Vec<f32>, Vec<f32>) {
    let out = dir.join(format!("{device}{n}.safetensors"));
    let hidden = dir.join(format!("{device}{n}.hidden.safetensors"));
    let m = fixture(model).display().to_string();
    let args = [
        "--device",
        device,
        "logits",
        "--model",
        &m,
        "--input-ids",
        "1,5,9,2,7,3,11,4",
        "--out",
        out.to_str().unwrap(),
        "--hidden-states",
        hidden.to_str().unwrap(),
    ];
    tprun_ok(n, &args, &[]);
    (read_f32(&out), read_f32(&hidden))
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// logits and every layer's hidden states on the emulated device against the CPU path: the f32
/// fixture (6 query heads over 2 KV heads: TP 3 and 4 split heads unevenly and replicate KV
/// heads) within 1e-3 at TP 1-4, the bf16 fixture within 2e-2 at TP 1-2.
#[test]
fn logits_on_the_emulated_device_match_the_cpu_path() {
    let dir = TempDir::new("emulator", "logits");
    for (model, tps, tol) in [
        ("tiny-t5-f32-untied", &["1", "2", "3", "4"][..], 1e-3f32),
        ("tiny-hub-bf16-tied", &["1", "2"][..], 2e-2),
    ] {
        let cpu = logits(model, "1", "cpu", &dir.0);
        for n in tps {
            let gpu = logits(model, n, "cuda", &dir.0);
            let (dl, dh) = (max_diff(&cpu.0, &gpu.0), max_diff(&cpu.1, &gpu.1));
            println!("{model} TP {n}: max |cpu - cuda| logits {dl:e}, hidden states {dh:e}");
            assert!(dl <= tol && dh <= tol, "{model} TP {n}: {dl} {dh}");
        }
    }
}

fn greedy(model: &str, n: &str, device: &str) -> serde_json::Value {
    let m = fixture(model).display().to_string();
    let args = [
        "--device",
        device,
        "generate",
        "--model",
        &m,
        "--input-ids",
        "1,5,9,2,7,3",
        "--greedy",
        "--ignore-eos",
        "--max-new-tokens",
        "10",
        "--json",
    ];
    let (out, _) = tprun_ok(n, &args, &[]);
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    j["output_ids"].clone()
}

/// generate --greedy on the emulated device picks the CPU path's tokens (device KV cache,
/// distributed argmax) at TP 1 and 2, both fixtures.
#[test]
fn greedy_generation_on_the_emulated_device_matches_the_cpu_tokens() {
    for model in ["tiny-t5-f32-untied", "tiny-hub-bf16-tied"] {
        let cpu = greedy(model, "1", "cpu");
        for n in ["1", "2"] {
            assert_eq!(greedy(model, n, "cuda"), cpu, "{model} TP {n}");
        }
    }
}

/// rank `r`'s pid among `tprun`'s rank processes, waiting for it to start.
fn rank_pid(tprun: u32, r: usize) -> u32 {
    let t = std::time::Instant::now();
    loop {
        let want = format!("RANK={r}");
        if let Some(p) = common::rank_programs_of(tprun)
            .into_iter()
            .find(|&p| common::env_of(p).lines().any(|l| l == want))
        {
            return p;
        }
        assert!(
            t.elapsed().as_secs() < 30,
            "rank {r} of tprun {tprun} never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A peer that stops (SIGSTOP) or dies (SIGKILL) while the others run device all-reduces over
/// emulated IPC: for the stopped one, the survivor's bounded wait in comm.cu fires and the job
/// ends naming the op and the rank; for the killed one the job ends, naming it. Nothing is left.
#[test]
fn a_peer_lost_during_device_all_reduces_ends_the_job_naming_it() {
    for sig in [libc::SIGSTOP, libc::SIGKILL] {
        let mut cmd = Command::new(TPRUN);
        cmd.args(["-n", "2", "--grace-period", "1", "--device", "cuda", "perf"])
            .args([
                "--op",
                "all-reduce",
                "--min-bytes",
                "4K",
                "--max-bytes",
                "4K",
            ])
            .args(["--iters", "1000000", "--warmup", "0"])
            .env_remove("TPRUN_ROLE")
            .env_remove("CUDA_VISIBLE_DEVICES")
            .env("TPRUN_CUDA_EMULATE", "1")
            .env("TPRUN_CUDA_TRANSPORT", "ipc")
            .env("TPRUN_COMM_TIMEOUT_S", "2")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let err = common::drain(child.stderr.take().unwrap());
        let victim = rank_pid(child.id(), 1);
        // Set-up is done once each rank has mapped the other's slab (the emulator's IPC is
        // named shared memory: /proc/PID/maps shows it); then the all-reduces run.
        let maps_peer = |pid: u32, peer: u32| {
            std::fs::read_to_string(format!("/proc/{pid}/maps"))
                .unwrap_or_default()
                .contains(&format!("tprun-cuemu-{peer}-"))
        };
        let first = rank_pid(child.id(), 0);
        let t = std::time::Instant::now();
        while !(maps_peer(first, victim) && maps_peer(victim, first)) {
            assert!(
                t.elapsed().as_secs() < 60,
                "signal {sig}: the ranks never mapped each other"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        std::thread::sleep(std::time::Duration::from_millis(1000));
        // SAFETY: kill(2) with a pid and a signal number has no memory effects.
        assert_eq!(unsafe { libc::kill(victim as i32, sig) }, 0);
        let status = common::wait_limited(&mut child, std::time::Duration::from_secs(60));
        let err = err.join().unwrap();
        let status = status.unwrap_or_else(|| panic!("signal {sig}: tprun did not end\n{err}"));
        assert!(!status.success(), "signal {sig}: {err}");
        if sig == libc::SIGSTOP {
            assert!(
                err.contains("all_reduce #") && err.contains("rank 1 did not arrive"),
                "the device wait names the op and the rank: {err}"
            );
            assert!(
                !err.contains("cannot set up"),
                "stopped after the set-up: {err}"
            );
        } else {
            assert!(err.contains("rank 1"), "{err}");
        }
        println!("signal {sig}: {}", err.lines().last().unwrap_or(""));
        std::thread::sleep(std::time::Duration::from_millis(200));
        let left = std::path::Path::new(&format!("/proc/{victim}")).exists();
        assert!(!left, "signal {sig}: rank 1 ({victim}) outlived the job");
    }
}

/// A prompt at the attention kernels' shared-memory limit: with the emulated GPU's opt-in shared
/// memory lowered to 4096 + 40 * 4 bytes (the static 4 KiB the kernels are held to, then one f32
/// score per position), 40 positions run and match the CPU, and 41 are refused naming both.
#[test]
fn a_prompt_at_the_attention_shared_memory_limit_runs_and_one_past_it_is_refused() {
    let dir = TempDir::new("emulator", "limit");
    let m = fixture("tiny-t5-f32-untied").display().to_string();
    let ids = |n: usize| {
        (0..n)
            .map(|i| ((i * 37 + 5) % 400).to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let run = |device: &str, n: usize| {
        let out = dir.join(format!("{device}{n}.safetensors"));
        let ids = ids(n);
        let args = [
            "--device",
            device,
            "logits",
            "--model",
            &m,
            "--input-ids",
            &ids,
            "--out",
            out.to_str().unwrap(),
        ];
        let env = [("TPRUN_CUDA_EMULATE_SHARED_OPTIN", "4256")];
        let (ok, _, err) = tprun("2", &args, &env);
        (ok, err, out)
    };
    let (ok, err, cpu) = run("cpu", 40);
    assert!(ok, "{err}");
    let (ok, err, gpu) = run("cuda", 40);
    assert!(ok, "40 positions: {err}");
    let d = max_diff(&read_f32(&cpu), &read_f32(&gpu));
    println!("40 positions: max |cpu - cuda| = {d:e}");
    assert!(d <= 1e-3, "{d}");
    let (ok, err, _) = run("cuda", 41);
    assert!(!ok);
    assert!(
        err.contains("attention over 41 positions") && err.contains("at most 40"),
        "{err}"
    );
}
