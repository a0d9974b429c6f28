//! The programs of examples/ run the way their headers say, so they never rot:
//! - examples/from_env.rs (the collectives from Rust) as real rank processes under tprun: groups
//!   made by split across processes, an average inside each, a ring of sends and receives over
//!   the world; nothing left behind in /dev/shm;
//! - examples/study.sh (trace, analyze, picture) on the bundled model.
//!
//! The C examples (examples/c) are compiled and run by capi/tests/c_api.rs, the torch ones
//! (examples/torch) by python/tests/test_examples.py (`.ci/python-tests`, where torch is).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

#[test]
fn the_rust_example_runs_in_groups_and_a_ring() {
    let exe = example("tprun", "from_env");
    for (n, lines) in [
        (
            4,
            [
                "rank 0: group 0 of 2, avg 0.5, from rank 3",
                "rank 1: group 1 of 2, avg 0.5, from rank 0",
                "rank 2: group 0 of 2, avg 2.5, from rank 1",
                "rank 3: group 1 of 2, avg 2.5, from rank 2",
            ]
            .as_slice(),
        ),
        (
            3,
            [
                "rank 0: group 0 of 2, avg 0.5, from rank 2",
                "rank 2: group 0 of 1, avg 2, from rank 1",
            ]
            .as_slice(),
        ),
    ] {
        let shm_before = shm_names();
        let f = run_cmd(
            tprun().args(["-n", &n.to_string(), "--", &exe]),
            Duration::from_secs(60),
        );
        assert_eq!(f.code, 0, "{}", f.stderr);
        for l in lines {
            assert!(f.stdout.contains(l), "missing {l:?} in:\n{}", f.stdout);
        }
        assert_eq!(shm_names(), shm_before, "a run left names in /dev/shm");
    }
}

/// examples/study.sh with this build's tprun: a 2-rank trace, its analysis and the picture.
#[test]
fn the_study_walkthrough_writes_trace_analysis_and_picture() {
    let dir = TempDir::new("examples", "study");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/study.sh");
    let f = run_cmd(
        Command::new("bash")
            .arg(&script)
            .arg(dir.path())
            .env("TPRUN", tprun_bin())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
        Duration::from_secs(120),
    );
    assert_eq!(f.code, 0, "{}\n{}", f.stdout, f.stderr);
    // The tables on stdout, then the closing line naming the three outputs.
    assert!(
        f.stdout.contains("collective calls per rank"),
        "{}",
        f.stdout
    );
    assert!(f.stdout.contains("study.svg"), "{}", f.stdout);

    let json = |p: &str| -> Value {
        let text =
            std::fs::read_to_string(dir.path().join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{p}: {e}"))
    };
    let trace = json("gen/trace.json");
    let comm = trace["traceEvents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["cat"] == "comm")
        .count();
    // 8 forwards of the bundled model (3 layers): 1 + 2 * 3 all-reduces and 1 all-gather each,
    // on each of the 2 ranks.
    assert_eq!(comm, 2 * 8 * 8, "collective events in trace.json");
    for r in 0..2 {
        let v = json(&format!("gen/ranks/rank{r}.json"));
        assert_eq!(v["distributedInfo"]["rank"], r);
        assert_eq!(v["distributedInfo"]["world_size"], 2);
    }
    let a = json("analysis.json");
    assert_eq!(a["world_size"], 2, "{a}");
    assert_eq!(a["calls"], 64, "{a}");
    assert_eq!(a["layers"].as_array().map(Vec::len), Some(3), "{a}");
    let svg = std::fs::read_to_string(dir.path().join("study.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
}

fn shm_names() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("tprun"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}
