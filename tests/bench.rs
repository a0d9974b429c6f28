//! End-to-end test of `tprun -n N bench --json` on the bundled tiny model: the real binary,
//! launcher and shm collectives; the greedy tokens must not depend on the TP size.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

mod common;
use common::wait_limited;

/// Runs `tprun -n N bench ARGS... --json` and returns its JSON object (rank 0's).
fn bench_json(n: usize, args: &[&str]) -> Value {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tprun"))
        .args(["-n", &n.to_string(), "bench"])
        .args(args)
        .arg("--json")
        .env_remove("TPRUN_MODEL")
        .env_remove("TPRUN_ROLE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    if wait_limited(&mut child, Duration::from_secs(120)).is_none() {
        panic!("tprun -n {n} bench did not finish within 120 s");
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "tprun -n {n} bench failed");
    let stdout = String::from_utf8(out.stdout).unwrap();
    // Exactly one JSON object, unprefixed (built-in programs print their result plainly).
    serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {stdout:?}"))
}

#[test]
fn bench_json_reports_throughput_comm_and_shard_bytes() {
    let args = ["--prompt-len", "5", "--new-tokens", "4", "--rounds", "2"];
    let one = bench_json(1, &args);
    let two = bench_json(2, &args);
    for (j, n) in [(&one, 1), (&two, 2)] {
        assert_eq!(j["world_size"], n);
        assert!(j["timings"]["prefill_tok_s"].as_f64().unwrap() > 0.0);
        assert!(j["timings"]["decode_tok_s"].as_f64().unwrap() > 0.0);
        assert!(j["comm"]["decode_s"].as_f64().unwrap() >= 0.0);
        assert_eq!(j["weight_bytes_per_rank"].as_array().unwrap().len(), n);
        assert_eq!(j["output_ids"].as_array().unwrap().len(), 4);
    }
    assert_eq!(one["comm"]["decode_s"].as_f64().unwrap(), 0.0);
    assert!(two["comm"]["decode_s"].as_f64().unwrap() > 0.0);
    assert_eq!(one["output_ids"], two["output_ids"]);
    let b1 = one["weight_bytes_max"].as_f64().unwrap();
    let b2 = two["weight_bytes_max"].as_f64().unwrap();
    assert!(b2 <= 0.55 * b1, "TP 2 holds {b2} bytes per rank, TP 1 {b1}");
}
