//! `--trace` end to end: `tprun -n 2 generate --trace` writes one Chrome trace holding both ranks
//! whose collective events are exactly those of docs/qwen2.md's formula ("Communication patterns of
//! Qwen2 TP") and agree with `--json`'s `comm`; nothing is left behind, also when the job fails;
//! `perf --plot` draws an SVG, from a live run and from saved `--json` results.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

mod common;
use common::{fixture, TempDir};

const TPRUN: &str = env!("CARGO_BIN_EXE_tprun");

/// A scratch directory, also used as the job's TMPDIR (where nothing of the trace may appear),
/// removed on drop.
struct Scratch(TempDir);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let d = TempDir::new("trace-test", tag);
        std::fs::create_dir_all(d.join("tmp")).unwrap();
        Scratch(d)
    }
    fn tmp(&self) -> PathBuf {
        self.0.join("tmp")
    }
    /// Every entry left in the directory, sorted (relative names).
    fn entries(&self) -> Vec<String> {
        let mut v = Vec::new();
        for d in [self.0.path(), &self.tmp()] {
            for e in std::fs::read_dir(d).unwrap() {
                let p = e.unwrap().path();
                v.push(p.strip_prefix(self.0.path()).unwrap().display().to_string());
            }
        }
        v.sort();
        v
    }
}

fn tprun(s: &Scratch, args: &[&str]) -> Output {
    Command::new(TPRUN)
        .args(args)
        .env_remove("TPRUN_ROLE")
        .env("TMPDIR", s.tmp())
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "tprun failed: {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// (count, total bytes) of each collective in the trace, per rank.
fn comm_events(trace: &Value) -> BTreeMap<(u64, String), (u64, u64)> {
    let mut m = BTreeMap::new();
    for e in trace["traceEvents"].as_array().unwrap() {
        if e["ph"] == "X" && e["cat"] == "comm" {
            let k = (
                e["pid"].as_u64().unwrap(),
                e["name"].as_str().unwrap().to_string(),
            );
            let v = m.entry(k).or_insert((0, 0));
            v.0 += 1;
            v.1 += e["args"]["bytes"].as_u64().unwrap();
        }
    }
    m
}

#[test]
fn generate_trace_matches_the_readme_formula_and_the_json_comm() {
    let s = Scratch::new("gen");
    let model = fixture("tiny-hub-bf16-tied");
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    let layers = cfg["num_hidden_layers"].as_u64().unwrap();
    let hidden = cfg["hidden_size"].as_u64().unwrap();
    let vocab = cfg["vocab_size"].as_u64().unwrap();
    let (n, p, k) = (2u64, 5u64, 6u64);
    let trace_path = s.0.join("gen.json");
    let out = tprun(
        &s,
        &[
            "-n",
            "2",
            "--only-rank",
            "0",
            "--no-prefix",
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--input-ids",
            "1,2,3,4,5",
            "--max-new-tokens",
            &k.to_string(),
            "--ignore-eos",
            // Sampling: rank 0 picks from the gathered logits and broadcasts (greedy uses the
            // distributed argmax instead; tests/generate.rs checks that pattern).
            "--temperature",
            "0.8",
            "--seed",
            "7",
            "--json",
            "--trace",
            trace_path.to_str().unwrap(),
        ],
    );
    let stdout = ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("all_reduce"),
        "no summary on stderr:\n{stderr}"
    );
    let j: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(j["output_ids"].as_array().unwrap().len() as u64, k);

    // Only the merged trace is left: no per-rank files, nothing in TMPDIR.
    assert_eq!(s.entries(), ["gen.json", "tmp"]);
    let trace: Value =
        serde_json::from_str(&std::fs::read_to_string(&trace_path).unwrap()).unwrap();
    let events = trace["traceEvents"].as_array().unwrap();
    for r in 0..n {
        assert!(
            events.iter().any(|e| e["ph"] == "M"
                && e["name"] == "process_name"
                && e["pid"] == r
                && e["args"]["name"] == format!("rank {r}")),
            "no track for rank {r}"
        );
        let spans = |name: &str| {
            events
                .iter()
                .filter(|e| e["ph"] == "X" && e["pid"] == r && e["name"] == name)
                .count() as u64
        };
        assert_eq!(spans("attention"), k * layers);
        assert_eq!(spans("mlp"), k * layers);
        assert_eq!(spans("lm_head"), k);
        assert_eq!(spans("sample"), if r == 0 { k } else { 0 });
    }
    for e in events.iter().filter(|e| e["ph"] == "X") {
        assert!(e["ts"].as_f64().unwrap() >= 0.0 && e["dur"].as_f64().unwrap() >= 0.0);
    }

    // docs/qwen2.md's formula for sampling: K tokens = 1 prefill + (K-1) decode forwards, each
    // with 1 + 2L all-reduces (embedding, o_proj and down_proj per layer) and one logits
    // all-gather; one token broadcast per generated token.
    let padded = vocab.div_ceil(n);
    let mut want = BTreeMap::new();
    for r in 0..n {
        let ar_bytes = (p + (k - 1)) * (1 + 2 * layers) * hidden * 4;
        want.insert(
            (r, "all_reduce".to_string()),
            (k * (1 + 2 * layers), ar_bytes),
        );
        want.insert((r, "all_gather".to_string()), (k, k * n * padded * 4));
        want.insert((r, "broadcast".to_string()), (k, k * 4));
    }
    let got = comm_events(&trace);
    assert_eq!(got, want);

    // --json's comm (rank 0) counts the very same calls.
    let comm = j["comm"].as_object().unwrap();
    assert_eq!(comm.len(), 3, "{comm:?}");
    for (op, v) in comm {
        let (count, bytes) = got[&(0, op.clone())];
        assert_eq!(v["count"].as_u64().unwrap(), count, "{op}");
        assert_eq!(v["bytes"].as_u64().unwrap(), bytes, "{op}");
        assert!(v["wait_seconds"].as_f64().unwrap() <= v["seconds"].as_f64().unwrap());
    }
}

#[test]
fn failed_job_leaves_no_trace_files() {
    let s = Scratch::new("fail");
    let trace_path = s.0.join("t.json");
    let out = tprun(
        &s,
        &[
            "-n",
            "2",
            "generate",
            "--model",
            s.0.join("missing-model").to_str().unwrap(),
            "--input-ids",
            "1,2",
            "--trace",
            trace_path.to_str().unwrap(),
        ],
    );
    assert!(!out.status.success());
    assert_eq!(s.entries(), ["tmp"]);

    // An output directory that does not exist: one line, before any rank starts.
    let out = tprun(
        &s,
        &[
            "-n",
            "2",
            "logits",
            "--input-ids",
            "1,2",
            "--out",
            s.0.join("l.safetensors").to_str().unwrap(),
            "--trace",
            s.0.join("no/such/dir/t.json").to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--trace") && err.contains("does not exist"),
        "{err}"
    );
    assert_eq!(s.entries(), ["tmp"]);
}

#[test]
fn a_rank_started_alone_writes_a_complete_trace() {
    let s = Scratch::new("alone");
    let trace_path = s.0.join("alone.json");
    let out = Command::new(TPRUN)
        .args([
            "generate",
            "--input-ids",
            "1,2,3",
            "--max-new-tokens",
            "2",
            "--ignore-eos",
            "--trace",
        ])
        .arg(&trace_path)
        .env("TPRUN_ROLE", "rank")
        .env("TMPDIR", s.tmp())
        .env_remove("WORLD_SIZE")
        .env_remove("RANK")
        .env_remove("TPRUN_TRACE_FD")
        .output()
        .unwrap();
    ok(&out);
    assert_eq!(s.entries(), ["alone.json", "tmp"]);
    let trace: Value =
        serde_json::from_str(&std::fs::read_to_string(&trace_path).unwrap()).unwrap();
    let events = trace["traceEvents"].as_array().unwrap();
    assert!(events
        .iter()
        .any(|e| e["name"] == "process_name" && e["pid"] == 0));
    // A world of one calls no collectives; the compute spans are there.
    assert!(comm_events(&trace).is_empty());
    let forwards = events.iter().filter(|e| e["name"] == "forward").count();
    assert_eq!(forwards, 2);
}

#[test]
fn perf_trace_and_plot_live_and_from_saved_results() {
    let s = Scratch::new("perf");
    let svg = s.0.join("live.svg");
    let trace_path = s.0.join("perf.json");
    let out = tprun(
        &s,
        &[
            "-n",
            "2",
            "--only-rank",
            "0",
            "--no-prefix",
            "perf",
            "--op",
            "all",
            "--max-bytes",
            "4K",
            "--iters",
            "2",
            "--warmup",
            "1",
            "--json",
            "--plot",
            svg.to_str().unwrap(),
            "--trace",
            trace_path.to_str().unwrap(),
        ],
    );
    let stdout = ok(&out);
    let saved = s.0.join("n2.json");
    std::fs::write(&saved, &stdout).unwrap();
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg") && text.trim_end().ends_with("</svg>"));
    for op in ["all_reduce", "all_gather", "reduce_scatter", "broadcast"] {
        assert!(text.contains(op), "{op} missing from the legend");
    }
    let trace: Value =
        serde_json::from_str(&std::fs::read_to_string(&trace_path).unwrap()).unwrap();
    let got = comm_events(&trace);
    // 10 sizes (8 B .. 4 KiB) x (1 warmup + 2 timed) all-reduces per rank.
    assert_eq!(got[&(0, "all_reduce".to_string())].0, 30);
    assert_eq!(got[&(1, "all_reduce".to_string())].0, 30);

    // Plot saved results without ranks; two files of different world sizes get "op N=n" lines.
    let mut one = serde_json::from_str::<Value>(stdout.trim()).unwrap();
    one["world_size"] = 3.into();
    let other = s.0.join("n3.json");
    std::fs::write(&other, format!("[rank0]: {one}\n")).unwrap();
    let svg2 = s.0.join("saved.svg");
    let out = tprun(
        &s,
        &[
            "perf",
            "--plot",
            svg2.to_str().unwrap(),
            "--from",
            saved.to_str().unwrap(),
            "--from",
            other.to_str().unwrap(),
        ],
    );
    ok(&out);
    let text = std::fs::read_to_string(&svg2).unwrap();
    assert!(text.contains("all_reduce N=2") && text.contains("all_reduce N=3"));
    assert_eq!(
        s.entries(),
        [
            "live.svg",
            "n2.json",
            "n3.json",
            "perf.json",
            "saved.svg",
            "tmp"
        ]
    );
}
