//! Every SIMD path against the portable reference, on random shapes with odd sizes.

use super::*;

fn data(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s % 20001) as f32 / 10000.0 - 1.0
        })
        .collect()
}

/// |a - b| ≤ 1e-5 · Σ|terms| (the scale of the sum's rounding; a plain relative error is
/// meaningless for a sum that cancels to near zero).
fn close(a: f32, b: f32, scale: f32, what: &str) {
    assert!(
        (a - b).abs() <= 1e-5 * scale.max(1e-30),
        "{what}: {a} vs {b} (scale {scale})"
    );
}

/// Σ_i |x[i]·w[j, i]| for each row j.
fn abs_scale<W: Weight>(w: &[W], x: &[f32], n: usize) -> Vec<f32> {
    let k = x.len();
    let mut wf = vec![0f32; n * k];
    W::widen(w, &mut wf);
    (0..n)
        .map(|j| (0..k).map(|i| (wf[j * k + i] * x[i]).abs()).sum())
        .collect()
}

const KS: [usize; 12] = [1, 7, 15, 16, 17, 31, 32, 33, 48, 100, 896, 4097];
const NS: [usize; 7] = [1, 3, 4, 5, 9, 17, 33];

fn check_matvec<W: Weight>(conv: impl Fn(f32) -> W) {
    for &k in &KS {
        for &n in &NS {
            let x = data(k, (k * 31 + n) as u32);
            let w: Vec<W> = data(n * k, (k + n * 7) as u32)
                .into_iter()
                .map(&conv)
                .collect();
            let mut r = vec![0f32; n];
            portable::matvec(&w, &x, &mut r);
            let scale = abs_scale(&w, &x, n);
            for isa in Isa::all_supported() {
                let mut y = vec![f32::NAN; n];
                matvec_with(isa, &w, &x, &mut y);
                for j in 0..n {
                    close(
                        y[j],
                        r[j],
                        scale[j],
                        &format!("{isa:?} matvec n={n} k={k} j={j}"),
                    );
                }
            }
        }
    }
}

#[test]
fn matvec_simd_equals_portable_f32() {
    check_matvec(|v| v);
}

#[test]
fn matvec_simd_equals_portable_bf16() {
    check_matvec(bf16::from_f32);
}

fn check_matmul<W: Weight>(conv: impl Fn(f32) -> W) {
    for &k in &[1usize, 7, 17, 33, 64, 257] {
        for &(m, n) in &[
            (2usize, 1usize),
            (3, 5),
            (4, 4),
            (5, 9),
            (7, 17),
            (9, 33),
            (13, 6),
            (29, 70),
        ] {
            let x = data(m * k, (m * 131 + k) as u32);
            let w: Vec<W> = data(n * k, (n * 17 + k) as u32)
                .into_iter()
                .map(&conv)
                .collect();
            let mut r = vec![0f32; m * n];
            portable::matmul(&x, &w, &mut r, m, n, k);
            for isa in Isa::all_supported() {
                let mut y = vec![f32::NAN; m * n];
                matmul_with(isa, &x, &w, &mut y, m, n, k);
                for i in 0..m {
                    let scale = abs_scale(&w, &x[i * k..(i + 1) * k], n);
                    for j in 0..n {
                        close(
                            y[i * n + j],
                            r[i * n + j],
                            scale[j],
                            &format!("{isa:?} matmul m={m} n={n} k={k} [{i},{j}]"),
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn matmul_simd_equals_portable_f32() {
    check_matmul(|v| v);
}

#[test]
fn matmul_simd_equals_portable_bf16() {
    check_matmul(bf16::from_f32);
}

/// Big enough to be split over the pool's threads (when there are several).
#[test]
fn large_products_split_over_threads_match() {
    let (m, n, k) = (6, 1031, 300);
    let x = data(m * k, 9);
    let w: Vec<bf16> = data(n * k, 10).into_iter().map(bf16::from_f32).collect();
    let mut r = vec![0f32; m * n];
    portable::matmul(&x, &w, &mut r, m, n, k);
    let mut y = vec![0f32; m * n];
    matmul(&x, &w, &mut y, m, n, k);
    let mut v = vec![0f32; n];
    matvec(&w, &x[..k], &mut v);
    for i in 0..m {
        let scale = abs_scale(&w, &x[i * k..(i + 1) * k], n);
        for j in 0..n {
            close(y[i * n + j], r[i * n + j], scale[j], "matmul");
        }
    }
    for j in 0..n {
        close(v[j], r[j], abs_scale(&w, &x[..k], n)[j], "matvec");
    }
}

/// vdpbf16ps rounds the activations to bf16 first: compared with the portable product of the
/// rounded activations it is again a summation-order difference.
#[test]
fn bf16_dot_gemm_equals_portable_on_rounded_activations() {
    #[cfg(target_arch = "x86_64")]
    if has_bf16_dot() {
        for &k in &[1usize, 7, 31, 32, 33, 100, 257] {
            let (m, n) = (7, 9);
            let x = data(m * k, k as u32);
            let xr: Vec<f32> = x.iter().map(|v| bf16::from_f32(*v).to_f32()).collect();
            let w: Vec<bf16> = data(n * k, 3 + k as u32)
                .into_iter()
                .map(bf16::from_f32)
                .collect();
            let mut r = vec![0f32; m * n];
            portable::matmul(&xr, &w, &mut r, m, n, k);
            let mut xb = vec![bf16::ZERO; m * k];
            let mut y = vec![f32::NAN; m * n];
            // SAFETY: has_bf16_dot() checked the CPU; `y` is `[m, n]`, owned here.
            unsafe {
                x86::to_bf16_avx512(&x, &mut xb);
                x86::gemm_dpbf16(&xb, &w, y.as_mut_ptr(), m, n, k, n);
            }
            for (a, b) in xb.iter().zip(&xr) {
                assert_eq!(a.to_f32(), *b, "rounding to bf16");
            }
            for i in 0..m {
                let scale = abs_scale(&w, &xr[i * k..(i + 1) * k], n);
                for j in 0..n {
                    close(
                        y[i * n + j],
                        r[i * n + j],
                        scale[j],
                        &format!("dpbf16 k={k}"),
                    );
                }
            }
        }
    }
}

#[test]
fn the_best_path_is_detected() {
    let all = Isa::all_supported();
    assert_eq!(all[0], Isa::Portable);
    if std::env::var_os("TPRUN_ISA").is_none() {
        assert_eq!(isa(), *all.last().unwrap());
    }
}
