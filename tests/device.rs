//! `--device cuda` through the real binary. bench has no CUDA path yet, so it must refuse it
//! before starting ranks, with one line that fits this build: no `cuda` feature, no driver or
//! device, or (on a GPU machine) "not implemented yet". perf (its collectives), logits and
//! generate (the model's forward pass, issue 20) run on the GPU with the `cuda` feature; without a
//! usable GPU they refuse the same way, and the tests print why the GPU half skipped.

use std::path::Path;
use std::process::Command;

mod common;
use common::{fixture, TempDir};

const TPRUN: &str = env!("CARGO_BIN_EXE_tprun");

fn model() -> String {
    fixture("tiny-hub-bf16-tied").display().to_string()
}

/// Runs `tprun -n 2 --device cuda ARGS` and returns its stderr after checking it failed with
/// exactly one line.
fn refused(args: &[&str]) -> String {
    let out = Command::new(TPRUN)
        .args(["-n", "2", "--device", "cuda"])
        .args(args)
        .env_remove("TPRUN_ROLE")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    assert!(out.stdout.is_empty(), "{args:?}: ranks ran");
    assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
    stderr
}

fn check_message(stderr: &str) {
    if cfg!(feature = "cuda") {
        // Without a GPU: the discovery error; with one: "not implemented yet".
        assert!(
            stderr.starts_with("tprun: error: --device cuda: "),
            "{stderr}"
        );
        if stderr.contains("not implemented yet") {
            println!("a CUDA device is usable here; bench has no CUDA path yet");
        } else {
            let why = stderr
                .trim_end()
                .trim_start_matches("tprun: error: --device cuda: ");
            println!("skipped: no usable CUDA device: {why}");
        }
    } else {
        assert_eq!(
            stderr,
            "tprun: error: tprun was built without CUDA support: rebuild with \
             `cargo build --release --features cuda`\n"
        );
    }
}

#[test]
fn bench_refuses_cuda_with_one_line() {
    check_message(&refused(&["bench"]));
}

/// Where a GPU is usable (bench's refusal says "not implemented yet"), `None`; else the refusal
/// bench got, after checking it.
fn gpu_or_refusal() -> Option<String> {
    let first = refused(&["bench"]);
    if first.contains("not implemented yet") {
        return None;
    }
    check_message(&first);
    Some(first)
}

fn read_logits(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("logits").unwrap();
    t.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// `tprun -n N [--device cuda] logits` on the f32 fixture; the logits file's values.
fn logits_run(n: &str, cuda: bool, out: &Path) -> Vec<f32> {
    let m = fixture("tiny-t5-f32-untied").display().to_string();
    let mut cmd = Command::new(TPRUN);
    cmd.args(["-n", n]);
    if cuda {
        cmd.args(["--device", "cuda"]);
    }
    let o = cmd
        .args(["logits", "--model", &m, "--input-ids", "1,5,9,2,7,3"])
        .arg("--out")
        .arg(out)
        .env_remove("TPRUN_ROLE")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "cuda {cuda}, -n {n}: {stderr}");
    if cuda {
        assert!(stderr.contains("GPU"), "rank 0 names its GPU: {stderr}");
        println!("{stderr}");
    }
    read_logits(out)
}

/// logits with `--device cuda` on the f32 fixture, TP 1 and 2, within 1e-3 of the CPU path; or,
/// without a usable GPU, the same refusal as bench.
#[test]
fn logits_runs_on_the_gpu_within_1e_3_of_the_cpu_or_refuses() {
    let m = model();
    if let Some(first) = gpu_or_refusal() {
        let out = "/nonexistent/x.safetensors";
        let args = ["logits", "--model", &m, "--text", "hi", "--out", out];
        assert_eq!(refused(&args), first);
        println!("skipped the GPU comparison: {}", first.trim_end());
        return;
    }
    let dir = TempDir::new("device", "logits");
    let cpu = logits_run("1", false, &dir.join("cpu.safetensors"));
    for n in ["1", "2"] {
        let gpu = logits_run(n, true, &dir.join(format!("cuda{n}.safetensors")));
        assert_eq!(gpu.len(), cpu.len());
        let d = cpu
            .iter()
            .zip(&gpu)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        println!("-n {n}: max |cpu - cuda| = {d:e}");
        assert!(d <= 1e-3, "-n {n}: {d}");
    }
}

#[test]
fn auto_rank_count_with_cuda_refuses_before_counting_gpus() {
    let m = model();
    let out = Command::new(TPRUN)
        .args(["-n", "auto", "--device", "cuda", "bench", "--model", &m])
        .env_remove("TPRUN_ROLE")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    check_message(&stderr);
}

/// perf with `--device cuda`: with the `cuda` build and a usable GPU it must run and check every
/// element; otherwise it refuses with the same line as bench.
#[test]
fn perf_runs_on_the_gpu_or_refuses_like_the_others() {
    if let Some(first) = gpu_or_refusal() {
        assert_eq!(refused(&["perf"]), first);
        return;
    }
    let out = Command::new(TPRUN)
        .args([
            "-n", "2", "--device", "cuda", "perf", "--op", "all", "--check",
        ])
        .args(["--max-bytes", "4M"])
        .env_remove("TPRUN_ROLE")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("Out of bounds values : 0 OK"), "{stdout}");
}

/// `tprun -n N [--device cuda] generate --greedy --json` on the f32 fixture: the output ids.
fn greedy_ids(n: &str, cuda: bool) -> serde_json::Value {
    let m = fixture("tiny-t5-f32-untied").display().to_string();
    let mut cmd = Command::new(TPRUN);
    cmd.args(["-n", n]);
    if cuda {
        cmd.args(["--device", "cuda"]);
    }
    let o = cmd
        .args(["generate", "--model", &m, "--input-ids", "1,5,9,2,7,3"])
        .args([
            "--greedy",
            "--ignore-eos",
            "--max-new-tokens",
            "12",
            "--json",
        ])
        .env_remove("TPRUN_ROLE")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "cuda {cuda}, -n {n}: {stderr}");
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    j["output_ids"].clone()
}

/// generate `--greedy` with `--device cuda` picks the CPU's tokens at TP 1 and 2 on the f32
/// fixture; without a usable GPU it refuses like bench.
#[test]
fn generate_greedy_on_the_gpu_matches_the_cpu_or_refuses() {
    let m = model();
    if let Some(first) = gpu_or_refusal() {
        assert_eq!(
            refused(&["generate", "--model", &m, "--prompt", "hi"]),
            first
        );
        println!("skipped the GPU generation: {}", first.trim_end());
        return;
    }
    let cpu = greedy_ids("1", false);
    for n in ["1", "2"] {
        assert_eq!(greedy_ids(n, true), cpu, "-n {n}");
    }
}
