//! End-to-end tests of the TP-degree check: tprun reads the model's config.json and builds rank 0's
//! sharding plan before any rank starts (docs/DESIGN.md, "Command line"), so a degree the model
//! does not allow is one line and exit 2, with no rank output and no output file.

use std::process::{Command, Stdio};
use std::time::Duration;

mod common;
use common::{fixture, wait_limited, TempDir};

/// Any single tprun run here is killed after this, so a bug fails the test instead of hanging.
const RUN_LIMIT: Duration = Duration::from_secs(120);

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `tprun ARGS...` with the default model (no --model, no $TPRUN_MODEL) to completion.
fn tprun(dir: &TempDir, args: &[&str]) -> Run {
    let (out, err) = (dir.join("stdout"), dir.join("stderr"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_tprun"))
        .args(args)
        .env_remove("TPRUN_MODEL")
        .env_remove("TPRUN_ROLE")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let status = wait_limited(&mut child, RUN_LIMIT)
        .unwrap_or_else(|| panic!("tprun {args:?} did not finish within {RUN_LIMIT:?}"));
    Run {
        code: status.code().unwrap_or(-1),
        stdout: std::fs::read_to_string(&out).unwrap(),
        stderr: std::fs::read_to_string(&err).unwrap(),
    }
}

/// Exit 2, exactly one stderr line naming `what`, the TP degree and what the model allows; no rank
/// printed anything.
fn refused(r: &Run, what: &str, n: usize, allows: &str) {
    assert_eq!(r.code, 2, "stderr: {}", r.stderr);
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one stderr line, got: {}", r.stderr);
    let line = lines[0];
    assert!(line.starts_with("tprun: error: "), "{line}");
    for want in [what, &format!("TP degree {n}"), allows] {
        assert!(line.contains(want), "{want:?} not in: {line}");
    }
    assert!(!r.stdout.contains("[rank"), "rank output: {}", r.stdout);
    assert!(!r.stderr.contains("[rank"), "rank output: {}", r.stderr);
}

#[test]
fn tp_degree_past_the_default_model_is_refused_before_any_rank_starts() {
    let dir = TempDir::new("tpcheck", "logits64");
    let out = dir.join("x.safetensors");
    let r = tprun(
        &dir,
        &[
            "-n",
            "64",
            "logits",
            "--input-ids",
            "1",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    // The default model is the tiny-hub fixture compiled into tprun (4 attention heads).
    refused(&r, "tiny-hub-bf16-tied", 64, "at most 4 ranks");
    assert!(
        r.stderr.contains("model (bundled) tiny-hub-bf16-tied"),
        "{}",
        r.stderr
    );
    assert!(!out.exists(), "logits wrote {}", out.display());
    assert!(r.stdout.is_empty(), "{}", r.stdout);
}

#[test]
fn tp_degree_is_checked_for_generate_and_bench_presets_too() {
    let dir = TempDir::new("tpcheck", "others");
    let m = fixture("tiny-hub-bf16-tied");
    let r = tprun(
        &dir,
        &[
            "-n",
            "5",
            "generate",
            "--model",
            m.to_str().unwrap(),
            "--prompt",
            "hi",
        ],
    );
    refused(&r, m.to_str().unwrap(), 5, "at most 4 ranks");
    // Qwen2.5-0.5B has 14 attention heads.
    let r = tprun(&dir, &["-n", "15", "bench", "--preset", "qwen2.5-0.5b"]);
    refused(&r, "preset qwen2.5-0.5b", 15, "at most 14 ranks");
}

#[test]
fn a_tp_degree_the_model_allows_still_runs() {
    let dir = TempDir::new("tpcheck", "logits2");
    let out = dir.join("x.safetensors");
    let r = tprun(
        &dir,
        &[
            "-n",
            "2",
            "logits",
            "--input-ids",
            "1",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(r.code, 0, "stderr: {}", r.stderr);
    assert!(out.exists(), "no {}", out.display());
}
