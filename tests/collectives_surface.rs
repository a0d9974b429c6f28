//! The README's Rust example (collectives/examples/surface.rs) run as real rank processes under
//! tprun: groups made by split across processes, an average inside each, a ring of sends and
//! receives over the world; nothing left behind in /dev/shm.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

fn surface() -> String {
    let st = Command::new(env!("CARGO"))
        .args([
            "build",
            "--quiet",
            "--example",
            "surface",
            "-p",
            "collectives",
        ])
        .status()
        .unwrap();
    assert!(st.success());
    let exe = std::path::Path::new(env!("CARGO_BIN_EXE_tprun"));
    exe.parent()
        .unwrap()
        .join("examples/surface")
        .display()
        .to_string()
}

#[test]
fn the_readme_example_runs_in_groups_and_a_ring() {
    let exe = surface();
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
