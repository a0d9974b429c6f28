//! `tprun compare`: the per-tensor diff table, through the real binary.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;

mod common;
use common::TempDir;

use safetensors::tensor::{Dtype, TensorView};

type Tensors = Vec<(&'static str, Vec<usize>, Vec<f32>)>;

fn write(path: &Path, tensors: &Tensors) {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views: HashMap<String, TensorView> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| {
            let view = TensorView::new(Dtype::F32, s.clone(), b).unwrap();
            (n.to_string(), view)
        })
        .collect();
    safetensors::serialize_to_file(&views, &None, path).unwrap();
}

fn tprun<S: AsRef<OsStr>>(args: &[S]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tprun"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn base() -> Tensors {
    let h = |k: usize| (0..12).map(|i| (i * 7 + k) as f32 * 0.1).collect();
    vec![
        ("hidden_states.0", vec![3, 4], h(0)),
        ("hidden_states.1", vec![3, 4], h(1)),
        ("hidden_states.10", vec![3, 4], h(2)),
        ("hidden_states.2", vec![3, 4], h(3)),
    ]
}

#[test]
fn identical_files_give_zeros() {
    let d = TempDir::new("compare", "same");
    let (a, b) = (d.join("a.safetensors"), d.join("b.safetensors"));
    write(&a, &base());
    write(&b, &base());
    let (code, out, err) = tprun(&[
        "compare".as_ref(),
        a.as_os_str(),
        b.as_os_str(),
        "--tol".as_ref(),
        "0".as_ref(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let rows: Vec<&str> = out.lines().skip(1).collect();
    assert_eq!(rows.len(), 4, "{out}");
    let names: Vec<&str> = rows
        .iter()
        .map(|r| r.split_whitespace().next().unwrap())
        .collect();
    // natural order: .2 before .10
    let want = [
        "hidden_states.0",
        "hidden_states.1",
        "hidden_states.2",
        "hidden_states.10",
    ];
    assert_eq!(names, want);
    for r in rows {
        assert!(r.contains("0.000e0"), "{r}");
        assert!(r.ends_with("ok"), "{r}");
    }
}

#[test]
fn perturbed_tensor_is_found_with_its_position() {
    let d = TempDir::new("compare", "perturb");
    let (a, b) = (d.join("a.safetensors"), d.join("b.safetensors"));
    write(&a, &base());
    let mut t = base();
    t[3].2[2 * 4 + 1] += 0.5; // hidden_states.2, row 2, column 1
    t[1].2[0] += 1e-6;
    write(&b, &t);
    let args = [
        "compare".as_ref(),
        a.as_os_str(),
        b.as_os_str(),
        "--json".as_ref(),
    ];
    let (code, out, err) = tprun(&args);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let tensors = v["tensors"].as_array().unwrap();
    let t2 = tensors
        .iter()
        .find(|t| t["name"] == "hidden_states.2")
        .unwrap();
    assert_eq!(t2["worst_index"], serde_json::json!([2, 1]));
    assert!((t2["max_abs"].as_f64().unwrap() - 0.5).abs() < 1e-6);

    let args = [
        "compare".as_ref(),
        a.as_os_str(),
        b.as_os_str(),
        "--tol".as_ref(),
        "1e-4".as_ref(),
    ];
    let (code, out, err) = tprun(&args);
    assert_eq!(code, 1, "{out}{err}");
    let row = |name: &str| {
        out.lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap()
            .to_string()
    };
    let bad = row("hidden_states.2");
    assert!(bad.contains("[2, 1]") && bad.ends_with("FAIL"), "{bad}");
    assert!(row("hidden_states.1").ends_with("ok"));
    assert!(
        err.contains("1 of 4 tensors exceed --tol") && err.contains("hidden_states.2"),
        "{err}"
    );
}

#[test]
fn mismatched_names_and_shapes_are_clear_errors() {
    let d = TempDir::new("compare", "mismatch");
    let (a, b, c) = (
        d.join("a.safetensors"),
        d.join("b.safetensors"),
        d.join("c.safetensors"),
    );
    write(&a, &base());
    let mut t = base();
    t.pop();
    write(&b, &t);
    let (code, _, err) = tprun(&["compare".as_ref(), a.as_os_str(), b.as_os_str()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("different tensors") && err.contains("hidden_states.2"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");

    let mut t = base();
    t[0].1 = vec![4, 3];
    write(&c, &t);
    let (code, _, err) = tprun(&["compare".as_ref(), a.as_os_str(), c.as_os_str()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("hidden_states.0") && err.contains("[3, 4]") && err.contains("[4, 3]"),
        "{err}"
    );

    let missing = d.join("nope");
    let (code, _, err) = tprun(&["compare".as_ref(), a.as_os_str(), missing.as_os_str()]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot read") && err.contains("nope"), "{err}");
}
