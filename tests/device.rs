//! `--device cuda` through the real binary. perf (its collectives), logits, generate and bench
//! (the model's forward pass, issue 20) run on the GPU with the `cuda` feature; without a usable
//! GPU they refuse before starting ranks, with one line that fits this build (no `cuda` feature,
//! or no driver or device), and the tests log why the GPU half did not run (kernels::skips).

use std::path::Path;
use std::process::Command;

mod common;
use common::{fixture, TempDir};

const TPRUN: &str = env!("CARGO_BIN_EXE_tprun");

fn model() -> String {
    fixture("tiny-hub-bf16-tied").display().to_string()
}

/// Runs `tprun -n 2 --device cuda ARGS` and returns its stderr after checking it failed with
/// exactly one line and exit code `code`.
fn refused_with(code: i32, args: &[&str]) -> String {
    let out = Command::new(TPRUN)
        .args(["-n", "2", "--device", "cuda"])
        .args(args)
        .env_remove("TPRUN_ROLE")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
    assert!(out.stdout.is_empty(), "{args:?}: ranks ran");
    assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
    stderr
}

fn refused(args: &[&str]) -> String {
    refused_with(1, args)
}

/// `None` where a GPU is usable here; else the line every `--device cuda` program is refused
/// with on this build and machine. Whether there is a GPU is the driver's answer
/// (`kernels::cuda::cuda_available`); the wording of the refusal is written out here.
fn gpu_or_refusal(test: &str) -> Option<String> {
    #[cfg(feature = "cuda")]
    {
        let why = kernels::cuda::cuda_available().err()?;
        // The GPU acceptance machine and the emulator's CI job: no usable GPU is a failure.
        kernels::cuda::require_gpu_unless(&format!("device {test}"), &why);
        kernels::skips::no_hardware(&format!("device {test}"), &why);
        Some(format!("tprun: error: --device cuda: {why}\n"))
    }
    #[cfg(not(feature = "cuda"))]
    let _ = test;
    #[cfg(not(feature = "cuda"))]
    Some(
        "tprun: error: tprun was built without CUDA support: rebuild with `cargo build --release --features cuda`\n"
            .to_string(),
    )
}

/// bench's CPU-only measurements are refused with `--device cuda` before anything starts,
/// whatever the build and machine.
#[test]
fn bench_refuses_its_cpu_only_flags_with_cuda_in_one_line() {
    for (flag, why) in [
        ("--profile", "per-part timers"),
        ("--roofline", "read bandwidth"),
    ] {
        let e = refused_with(2, &["bench", "--preset", "qwen2.5-0.5b", flag]);
        assert!(
            e.contains(&format!("{flag} is not available with --device cuda")) && e.contains(why),
            "{e}"
        );
    }
}

/// Runs `tprun -n N [--device cuda] ARGS`, checks that it succeeded, and returns its stdout
/// and stderr.
fn run_ok<S: AsRef<std::ffi::OsStr>>(
    n: &str,
    cuda: bool,
    args: impl IntoIterator<Item = S>,
) -> (Vec<u8>, String) {
    let mut cmd = Command::new(TPRUN);
    // The CPU baselines name their device: where a GPU is usable the default is cuda.
    cmd.args(["-n", n, "--device", if cuda { "cuda" } else { "cpu" }]);
    let o = cmd.args(args).env_remove("TPRUN_ROLE").output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "cuda {cuda}, -n {n}: {stderr}");
    (o.stdout, stderr)
}

/// The f32 fixture, as a `--model` argument.
fn f32_model() -> String {
    fixture("tiny-t5-f32-untied").display().to_string()
}

/// `tprun -n N [--device cuda] bench --json` on the f32 fixture: the report.
fn bench_run(n: &str, cuda: bool) -> serde_json::Value {
    let m = f32_model();
    let args = [
        "bench",
        "--model",
        &m,
        "--prompt-len",
        "9",
        "--new-tokens",
        "7",
    ];
    let rest = ["--rounds", "2", "--json"];
    let (stdout, _) = run_ok(n, cuda, args.into_iter().chain(rest));
    serde_json::from_slice(&stdout).unwrap()
}

/// bench with `--device cuda` decodes the CPU's greedy tokens at TP 1 and 2 (f32 fixture), says
/// it ran on the GPU, counts its device all-reduces and reports each rank's weight bytes; without
/// a usable GPU it refuses in one line.
#[test]
fn bench_runs_on_the_gpu_like_the_cpu_or_refuses() {
    if let Some(line) = gpu_or_refusal("bench_runs_on_the_gpu_like_the_cpu_or_refuses") {
        assert_eq!(refused(&["bench", "--preset", "qwen2.5-0.5b"]), line);
        return;
    }
    let cpu = bench_run("1", false);
    assert_eq!(cpu["device"], "cpu");
    for n in ["1", "2"] {
        let gpu = bench_run(n, true);
        assert_eq!(gpu["output_ids"], cpu["output_ids"], "-n {n}");
        assert!(gpu["device"].as_str().unwrap().starts_with("cuda"), "{gpu}");
        let ranks = gpu["weight_bytes_per_rank"].as_array().unwrap();
        assert_eq!(ranks.len(), n.parse::<usize>().unwrap());
        if n == "2" {
            // Per forward one all-reduce for the embedding and two per layer; a round is the
            // prefill and 7 decode steps; 2 rounds.
            let config = std::fs::read_to_string(fixture("tiny-t5-f32-untied").join("config.json"));
            let config: serde_json::Value = serde_json::from_str(&config.unwrap()).unwrap();
            let layers = config["num_hidden_layers"].as_u64().unwrap();
            let count = gpu["comm"]["ops"]["all_reduce"]["count"].as_u64().unwrap();
            assert_eq!(count, 2 * 8 * (1 + 2 * layers), "{gpu}");
        }
        println!("-n {n}: {}", gpu["timings"]);
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

/// `tprun -n N [--device cuda] logits --hidden-states` on the f32 fixture; the logits, then the
/// hidden states.
fn logits_run(n: &str, cuda: bool, out: &Path) -> (Vec<f32>, Vec<f32>) {
    let hidden = out.with_extension("hidden.safetensors");
    let m = f32_model();
    let args = ["logits", "--model", &m, "--input-ids", "1,5,9,2,7,3"].map(std::ffi::OsStr::new);
    let files = [
        "--out".as_ref(),
        out.as_os_str(),
        "--hidden-states".as_ref(),
        hidden.as_os_str(),
    ];
    let (_, stderr) = run_ok(n, cuda, args.into_iter().chain(files));
    if cuda {
        assert!(stderr.contains("GPU"), "rank 0 names its GPU: {stderr}");
        println!("{stderr}");
    }
    (read_f32(out), read_f32(&hidden))
}

/// logits with `--device cuda` on the f32 fixture, TP 1 and 2, within 1e-3 of the CPU path; or,
/// without a usable GPU, the one-line refusal.
#[test]
fn logits_runs_on_the_gpu_within_1e_3_of_the_cpu_or_refuses() {
    let m = model();
    if let Some(first) = gpu_or_refusal("logits_runs_on_the_gpu_within_1e_3_of_the_cpu_or_refuses")
    {
        let out = "/nonexistent/x.safetensors";
        let args = ["logits", "--model", &m, "--text", "hi", "--out", out];
        assert_eq!(refused(&args), first);
        return;
    }
    let dir = TempDir::new("device", "logits");
    let cpu = logits_run("1", false, &dir.join("cpu.safetensors"));
    for n in ["1", "2"] {
        let gpu = logits_run(n, true, &dir.join(format!("cuda{n}.safetensors")));
        for (what, c, g) in [
            ("logits", &cpu.0, &gpu.0),
            ("hidden states", &cpu.1, &gpu.1),
        ] {
            assert_eq!(g.len(), c.len(), "{what}");
            let d = c
                .iter()
                .zip(g)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            println!("-n {n}: {what} max |cpu - cuda| = {d:e}");
            assert!(d <= 1e-3, "-n {n}: {what} {d}");
        }
    }
}

/// `-n auto --device cuda` is one rank per visible GPU; without a usable GPU it refuses before
/// counting them, with the same line.
#[test]
fn auto_rank_count_with_cuda_is_one_rank_per_gpu_or_refuses() {
    let m = f32_model();
    let out = Command::new(TPRUN)
        .args(["-n", "auto", "--device", "cuda", "bench", "--model", &m])
        .args(["--prompt-len", "4", "--new-tokens", "2", "--json"])
        .env_remove("TPRUN_ROLE")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    match gpu_or_refusal("auto_rank_count_with_cuda_is_one_rank_per_gpu_or_refuses") {
        Some(line) => {
            assert_eq!(out.status.code(), Some(1), "{stderr}");
            assert_eq!(stderr, line);
        }
        None => {
            assert!(out.status.success(), "{stderr}");
            let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            println!("-n auto: {} rank(s)", j["world_size"]);
            #[cfg(feature = "cuda")]
            assert_eq!(
                j["world_size"].as_u64(),
                kernels::cuda::cuda_available().ok().map(|n| n as u64),
                "one rank per GPU the driver sees: {j}"
            );
            // CUDA_VISIBLE_DEVICES narrows it: one rank for one visible GPU.
            let out = Command::new(TPRUN)
                .args(["-n", "auto", "--device", "cuda", "bench", "--model", &m])
                .args(["--prompt-len", "4", "--new-tokens", "2", "--json"])
                .env_remove("TPRUN_ROLE")
                .env("CUDA_VISIBLE_DEVICES", "0")
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(j["world_size"], 1, "{j}");
        }
    }
}

/// perf with `--device cuda`: with the `cuda` build and a usable GPU it must run and check every
/// element; otherwise it refuses in one line.
#[test]
fn perf_runs_on_the_gpu_or_refuses_like_the_others() {
    if let Some(first) = gpu_or_refusal("perf_runs_on_the_gpu_or_refuses_like_the_others") {
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
    let m = f32_model();
    let args = ["generate", "--model", &m, "--input-ids", "1,5,9,2,7,3"];
    let rest = [
        "--greedy",
        "--ignore-eos",
        "--max-new-tokens",
        "12",
        "--json",
    ];
    let (stdout, _) = run_ok(n, cuda, args.into_iter().chain(rest));
    let j: serde_json::Value = serde_json::from_slice(&stdout).unwrap();
    j["output_ids"].clone()
}

/// generate `--greedy` with `--device cuda` picks the CPU's tokens at TP 1 and 2 on the f32
/// fixture; without a usable GPU it refuses in one line.
#[test]
fn generate_greedy_on_the_gpu_matches_the_cpu_or_refuses() {
    let m = model();
    if let Some(first) = gpu_or_refusal("generate_greedy_on_the_gpu_matches_the_cpu_or_refuses") {
        assert_eq!(
            refused(&["generate", "--model", &m, "--prompt", "hi"]),
            first
        );
        return;
    }
    let cpu = greedy_ids("1", false);
    for n in ["1", "2"] {
        assert_eq!(greedy_ids(n, true), cpu, "-n {n}");
    }
}

/// Without `--device`, a `-- PROGRAM` job gets cuda where a driver is loaded and a GPU visible,
/// else cpu (CUDA_VISIBLE_DEVICES alone is not a GPU), and `--device` wins; a built-in program
/// gets cuda only where its CUDA path can run (the cuda build, a driver, a device).
#[test]
fn the_default_device_is_cuda_only_where_a_gpu_is_usable() {
    let device = |visible: Option<&str>, args: &[&str]| {
        let mut cmd = Command::new(TPRUN);
        cmd.args(["-n", "1"]).args(args);
        cmd.args(["--", "sh", "-c", "echo $TPRUN_DEVICE"]);
        cmd.env_remove("TPRUN_ROLE")
            .env_remove("CUDA_VISIBLE_DEVICES");
        if let Some(v) = visible {
            cmd.env("CUDA_VISIBLE_DEVICES", v);
        }
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let out = String::from_utf8_lossy(&o.stdout);
        out.trim().trim_start_matches("[rank0]: ").to_string()
    };
    // The CUDA emulator's GPUs count as a driver's (feature cuda-emulator, TPRUN_CUDA_EMULATE=1).
    let emulated = cfg!(feature = "cuda-emulator")
        && std::env::var("TPRUN_CUDA_EMULATE").as_deref() == Ok("1");
    let driver = Path::new("/proc/driver/nvidia").exists() || emulated;
    let with_driver = if driver { "cuda" } else { "cpu" };
    assert_eq!(device(Some("0"), &[]), with_driver);
    assert_eq!(device(Some("0,1"), &["--device", "cpu"]), "cpu");
    assert_eq!(device(Some("0"), &["--device", "cuda"]), "cuda");
    assert_eq!(device(Some("-1"), &[]), "cpu");
    assert_eq!(device(Some(""), &[]), "cpu");
    if !driver {
        assert_eq!(device(None, &[]), "cpu");
    }
    // A built-in: bench's report names the device it ran on.
    let m = f32_model();
    let o = Command::new(TPRUN)
        .args(["-n", "1", "bench", "--model", &m, "--prompt-len", "4"])
        .args(["--new-tokens", "2", "--json"])
        .env_remove("TPRUN_ROLE")
        .env("CUDA_VISIBLE_DEVICES", "0")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let on = j["device"].as_str().unwrap();
    match gpu_or_refusal("the_default_device_is_cuda_only_where_a_gpu_is_usable") {
        Some(_) => assert_eq!(on, "cpu"),
        None => assert!(on.starts_with("cuda"), "{on}"),
    }
}
