//! `tprun compare A.safetensors B.safetensors`: a per-tensor diff table.
//!
//! Meant for layer-by-layer debugging of tensor parallelism: dump hidden states at TP 1 and TP N
//! (or from transformers) and see where an error enters and how it grows. Any two files with the
//! same tensor names and shapes can be compared; F32, BF16 and F16 tensors are compared in f32.

use std::cmp::Ordering;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use safetensors::{Dtype, SafeTensors};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// The file to check (e.g. tprun's dump).
    pub a: PathBuf,
    /// The reference file (e.g. transformers' dump).
    pub b: PathBuf,
    /// Exit non-zero when any tensor's max abs diff exceeds this.
    #[arg(long)]
    pub tol: Option<f64>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// The differences between two tensors of the same name and shape.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TensorDiff {
    pub name: String,
    pub shape: Vec<usize>,
    pub max_abs: f64,
    pub mean_abs: f64,
    /// max over elements of |a-b| / max(|a|, |b|) (0 where both are 0).
    pub max_rel: f64,
    /// Index of the element with the largest absolute difference (row, column, ...).
    pub worst_index: Vec<usize>,
    pub worst_a: f32,
    pub worst_b: f32,
}

/// Runs the `compare` command: prints the table (or JSON) and fails when `--tol` is exceeded.
pub fn run(args: &Args) -> Result<()> {
    let a = read(&args.a)?;
    let b = read(&args.b)?;
    let diffs = compare_files(&args.a, &a, &args.b, &b)?;
    let failed: Vec<&TensorDiff> = match args.tol {
        Some(tol) => diffs.iter().filter(|d| !within(d.max_abs, tol)).collect(),
        None => Vec::new(),
    };
    if args.json {
        let obj = serde_json::json!({
            "a": args.a, "b": args.b, "tol": args.tol, "tensors": diffs,
            "exceeded": failed.iter().map(|d| &d.name).collect::<Vec<_>>(),
        });
        println!("{obj}");
    } else {
        print!("{}", format_table(&diffs, args.tol));
    }
    if let (Some(tol), false) = (args.tol, failed.is_empty()) {
        bail!(
            "{} of {} tensors exceed --tol {tol:e} (first: {}, max abs diff {:e})",
            failed.len(),
            diffs.len(),
            failed[0].name,
            failed[0].max_abs
        );
    }
    Ok(())
}

/// `diff <= tol`, with NaN never within tolerance.
fn within(diff: f64, tol: f64) -> bool {
    matches!(
        diff.partial_cmp(&tol),
        Some(Ordering::Less | Ordering::Equal)
    )
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Compares every tensor of `a` with the tensor of the same name in `b`, in natural name order
/// (`hidden_states.2` before `hidden_states.10`).
pub fn compare_files(
    a_path: &Path,
    a_bytes: &[u8],
    b_path: &Path,
    b_bytes: &[u8],
) -> Result<Vec<TensorDiff>> {
    // The loader's header check first: its errors say what is wrong (safetensors' own errors
    // are bare names such as `HeaderTooLarge`).
    for (path, bytes) in [(a_path, a_bytes), (b_path, b_bytes)] {
        rank::model::loader::parse_header(bytes)
            .with_context(|| format!("{} is not a valid safetensors file", path.display()))?;
    }
    let a = SafeTensors::deserialize(a_bytes)
        .with_context(|| format!("{} is not a valid safetensors file", a_path.display()))?;
    let b = SafeTensors::deserialize(b_bytes)
        .with_context(|| format!("{} is not a valid safetensors file", b_path.display()))?;
    let mut a_names: Vec<String> = a.names().into_iter().cloned().collect();
    let mut b_names: Vec<String> = b.names().into_iter().cloned().collect();
    a_names.sort_by(|x, y| natural_cmp(x, y));
    b_names.sort_by(|x, y| natural_cmp(x, y));
    if a_names != b_names {
        let only_a: Vec<&String> = a_names.iter().filter(|n| !b_names.contains(n)).collect();
        let only_b: Vec<&String> = b_names.iter().filter(|n| !a_names.contains(n)).collect();
        bail!(
            "the files hold different tensors: only in {}: {:?}; only in {}: {:?}",
            a_path.display(),
            only_a,
            b_path.display(),
            only_b
        );
    }
    let mut out = Vec::with_capacity(a_names.len());
    for name in &a_names {
        let ta = a.tensor(name)?;
        let tb = b.tensor(name)?;
        if ta.shape() != tb.shape() {
            bail!(
                "tensor {name}: shape {:?} in {} but {:?} in {}",
                ta.shape(),
                a_path.display(),
                tb.shape(),
                b_path.display()
            );
        }
        let va = to_f32(ta.dtype(), ta.data())
            .with_context(|| format!("tensor {name} in {}", a_path.display()))?;
        let vb = to_f32(tb.dtype(), tb.data())
            .with_context(|| format!("tensor {name} in {}", b_path.display()))?;
        out.push(diff(name, ta.shape(), &va, &vb));
    }
    Ok(out)
}

fn to_f32(dtype: Dtype, data: &[u8]) -> Result<Vec<f32>> {
    let pairs = || {
        data.chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
    };
    Ok(match dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::BF16 => pairs().map(|b| half::bf16::from_bits(b).to_f32()).collect(),
        Dtype::F16 => pairs().map(|b| half::f16::from_bits(b).to_f32()).collect(),
        other => bail!("unsupported dtype {other:?} (expected F32, BF16 or F16)"),
    })
}

/// The element-wise differences of two equally shaped tensors. A NaN on either side counts as an
/// infinite difference so that it is never hidden.
pub fn diff(name: &str, shape: &[usize], a: &[f32], b: &[f32]) -> TensorDiff {
    let mut max_abs = 0f64;
    let mut sum_abs = 0f64;
    let mut max_rel = 0f64;
    let mut worst = 0usize;
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        let d = if x.is_nan() || y.is_nan() {
            if x.is_nan() && y.is_nan() {
                0.0
            } else {
                f64::INFINITY
            }
        } else if x == y {
            0.0 // also equal infinities
        } else {
            (x as f64 - y as f64).abs()
        };
        sum_abs += d;
        let scale = (x as f64).abs().max((y as f64).abs());
        if d > 0.0 {
            max_rel = max_rel.max(if scale > 0.0 {
                d / scale
            } else {
                f64::INFINITY
            });
        }
        if d > max_abs {
            max_abs = d;
            worst = i;
        }
    }
    let n = a.len().max(1);
    TensorDiff {
        name: name.to_string(),
        shape: shape.to_vec(),
        max_abs,
        mean_abs: sum_abs / n as f64,
        max_rel,
        worst_index: unravel(worst, shape),
        worst_a: a.get(worst).copied().unwrap_or(0.0),
        worst_b: b.get(worst).copied().unwrap_or(0.0),
    }
}

fn unravel(mut flat: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for (k, &dim) in shape.iter().enumerate().rev() {
        if dim > 0 {
            idx[k] = flat % dim;
            flat /= dim;
        }
    }
    idx
}

/// The human-readable table, one row per tensor.
pub fn format_table(diffs: &[TensorDiff], tol: Option<f64>) -> String {
    let width = diffs.iter().map(|d| d.name.len()).max().unwrap_or(6).max(6);
    let mut s = format!(
        "{:<width$}  {:>14}  {:>11}  {:>11}  {:>11}  {:>14}  {:>14}{}\n",
        "tensor",
        "shape",
        "max_abs",
        "mean_abs",
        "max_rel",
        "worst_at",
        "a / b",
        if tol.is_some() { "  ok" } else { "" }
    );
    for d in diffs {
        let ok = match tol {
            Some(t) if within(d.max_abs, t) => "  ok",
            Some(_) => "  FAIL",
            None => "",
        };
        s += &format!(
            "{:<width$}  {:>14}  {:>11.3e}  {:>11.3e}  {:>11.3e}  {:>14}  {:>14}{}\n",
            d.name,
            format!("{:?}", d.shape),
            d.max_abs,
            d.mean_abs,
            d.max_rel,
            format!("{:?}", d.worst_index),
            format!("{:.4}/{:.4}", d.worst_a, d.worst_b),
            ok
        );
    }
    s
}

/// Orders names with their digit runs compared as numbers.
fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut x, mut y) = (a.as_bytes(), b.as_bytes());
    loop {
        match (x.first(), y.first()) {
            (None, None) => return Ordering::Equal,
            (None, _) => return Ordering::Less,
            (_, None) => return Ordering::Greater,
            (Some(c), Some(d)) if c.is_ascii_digit() && d.is_ascii_digit() => {
                let nx = x.iter().take_while(|c| c.is_ascii_digit()).count();
                let ny = y.iter().take_while(|c| c.is_ascii_digit()).count();
                let (dx, dy) = (&x[..nx], &y[..ny]);
                let strip = |s: &[u8]| -> usize { s.iter().take_while(|&&c| c == b'0').count() };
                let (tx, ty) = (&dx[strip(dx)..], &dy[strip(dy)..]);
                let ord = tx.len().cmp(&ty.len()).then(tx.cmp(ty));
                if ord != Ordering::Equal {
                    return ord;
                }
                x = &x[nx..];
                y = &y[ny..];
            }
            (Some(c), Some(d)) => {
                if c != d {
                    return c.cmp(d);
                }
                x = &x[1..];
                y = &y[1..];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order() {
        let mut v = vec!["h.10", "h.2", "h.1", "logits", "h.0"];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(v, ["h.0", "h.1", "h.2", "h.10", "logits"]);
    }

    #[test]
    fn diff_finds_worst_element() {
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let mut b = a;
        b[4] += 0.5;
        b[1] -= 0.25;
        let d = diff("t", &[2, 3], &a, &b);
        assert_eq!(d.max_abs, 0.5);
        assert_eq!(d.worst_index, vec![1, 1]);
        assert_eq!(d.mean_abs, 0.75 / 6.0);
        assert_eq!(d.max_rel, 0.25 / 2.0);
        assert_eq!((d.worst_a, d.worst_b), (5.0, 5.5));
    }

    #[test]
    fn nan_is_never_hidden() {
        let d = diff("t", &[2], &[1.0, f32::NAN], &[1.0, 2.0]);
        assert!(d.max_abs.is_infinite());
        assert_eq!(d.worst_index, vec![1]);
    }
}
