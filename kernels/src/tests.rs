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

/// `w` row-major `[n, k]` from random data.
fn weight<W: Weight>(n: usize, k: usize, seed: u32, conv: &impl Fn(f32) -> W) -> Vec<W> {
    data(n * k, seed).into_iter().map(conv).collect()
}

/// Every path's `matmul` on the packed `w` against the portable row-major product.
fn check_shapes<W: Weight>(conv: impl Fn(f32) -> W, ms: &[usize], ns: &[usize], ks: &[usize]) {
    for &k in ks {
        for &n in ns {
            let w = weight(n, k, (k + n * 7) as u32, &conv);
            let pw = PackedWeight::pack(&w, n, k).unwrap();
            for &m in ms {
                let x = data(m * k, (m * 131 + k * 31 + n) as u32);
                let mut r = vec![0f32; m * n];
                portable::matmul(&x, &w, &mut r, m, n, k);
                for isa in Isa::all_supported() {
                    let mut y = vec![f32::NAN; m * n];
                    matmul_with(isa, &x, &pw, &mut y, m);
                    for i in 0..m {
                        let scale = abs_scale(&w, &x[i * k..(i + 1) * k], n);
                        for j in 0..n {
                            close(
                                y[i * n + j],
                                r[i * n + j],
                                scale[j],
                                &format!("{isa:?} m={m} n={n} k={k} [{i},{j}]"),
                            );
                        }
                    }
                }
            }
        }
    }
}

const KS: [usize; 14] = [1, 2, 7, 15, 16, 17, 31, 32, 33, 48, 100, 257, 896, 4097];
const NS: [usize; 9] = [1, 3, 4, 5, 17, 31, 32, 33, 70];

#[test]
fn matvec_simd_equals_portable_f32() {
    check_shapes(|v| v, &[1], &NS, &KS);
}

#[test]
fn matvec_simd_equals_portable_bf16() {
    check_shapes(bf16::from_f32, &[1], &NS, &KS);
}

const MS: [usize; 7] = [2, 3, 4, 5, 12, 13, 29];

#[test]
fn matmul_simd_equals_portable_f32() {
    check_shapes(
        |v| v,
        &MS,
        &[1, 5, 17, 33, 70],
        &[1, 2, 7, 17, 33, 64, 257, 300],
    );
}

#[test]
fn matmul_simd_equals_portable_bf16() {
    check_shapes(
        bf16::from_f32,
        &MS,
        &[1, 5, 17, 33, 70],
        &[1, 2, 7, 17, 33, 64, 257, 300],
    );
}

/// The panel layout keeps every element: rows come back bit for bit.
#[test]
fn packed_rows_round_trip() {
    for &(n, k) in &[(1usize, 1usize), (5, 7), (33, 17), (70, 300), (32, 2)] {
        let wf = data(n * k, (n * k) as u32);
        let wb: Vec<bf16> = wf.iter().map(|v| bf16::from_f32(*v)).collect();
        let (pf, pb) = (
            PackedWeight::pack(&wf, n, k).unwrap(),
            PackedWeight::pack(&wb, n, k).unwrap(),
        );
        assert_eq!((pf.rows(), pf.cols(), pf.dtype()), (n, k, PackedDtype::F32));
        assert_eq!(pb.dtype(), PackedDtype::BF16);
        // No padding but the odd element of an odd bf16 row.
        assert_eq!(pf.bytes(), n * k * 4);
        assert_eq!(pb.bytes(), n * k.div_ceil(2) * 4);
        let mut row = vec![0f32; k];
        for r in 0..n {
            pf.row_into(r, &mut row);
            assert_eq!(row, wf[r * k..(r + 1) * k], "f32 row {r} of [{n}, {k}]");
            pb.row_into(r, &mut row);
            let want: Vec<f32> = wb[r * k..(r + 1) * k].iter().map(|v| v.to_f32()).collect();
            assert_eq!(row, want, "bf16 row {r} of [{n}, {k}]");
        }
    }
}

/// Big enough to be split over the pool's threads (when there are several).
#[test]
fn large_products_split_over_threads_match() {
    let (m, n, k) = (6, 1031, 300);
    let x = data(m * k, 9);
    let w = weight(n, k, 10, &bf16::from_f32);
    let pw = PackedWeight::pack(&w, n, k).unwrap();
    let mut r = vec![0f32; m * n];
    portable::matmul(&x, &w, &mut r, m, n, k);
    let mut y = vec![0f32; m * n];
    matmul(&x, &pw, &mut y, m);
    let mut v = vec![0f32; n];
    matmul(&x[..k], &pw, &mut v, 1);
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

/// On a CPU without AVX512_BF16 (what `bf16_dot_gemm_...` would test): turning the rounded
/// path on is refused, and a bf16 prefill GEMM matches the portable product of the unrounded
/// activations to f32 rounding, which the bf16-rounded path would not.
fn without_bf16_dot() {
    assert!(
        !set_bf16_dot(true),
        "set_bf16_dot(true) on a CPU without AVX512_BF16"
    );
    assert!(!bf16_dot());
    let (m, n, k) = (7, 33, 257);
    let x = data(m * k, 77);
    let w = weight(n, k, 78, &bf16::from_f32);
    let pw = PackedWeight::pack(&w, n, k).unwrap();
    let mut r = vec![0f32; m * n];
    portable::matmul(&x, &w, &mut r, m, n, k);
    let mut y = vec![f32::NAN; m * n];
    matmul(&x, &pw, &mut y, m);
    for i in 0..m {
        let scale = abs_scale(&w, &x[i * k..(i + 1) * k], n);
        for j in 0..n {
            close(y[i * n + j], r[i * n + j], scale[j], "fallback bf16 GEMM");
        }
    }
    crate::skips::no_hardware(
        "kernels bf16_dot_gemm_equals_portable_on_rounded_activations",
        "the CPU has no AVX512_BF16 (checked the f32 fallback instead)",
    );
}

/// On a CPU without AVX-512 (what `test` would check): the products do not pick it, and the
/// dispatching silu, softmax and attention are exactly the portable loops.
fn without_avx512(test: &str) {
    assert_ne!(isa(), Isa::Avx512);
    assert!(!Isa::all_supported().contains(&Isa::Avx512));
    for n in [1usize, 17, 2432] {
        let g0: Vec<f32> = data(n, n as u32).iter().map(|v| v * 30.0).collect();
        let u = data(n, 7 + n as u32);
        let (mut a, mut b) = (g0.clone(), g0);
        portable::silu_mul(&mut a, &u);
        silu_mul(&mut b, &u);
        assert_eq!(a, b, "silu_mul n={n}");
        let s0: Vec<f32> = data(n, 3 * n as u32).iter().map(|v| v * 20.0).collect();
        let (mut a, mut b) = (s0.clone(), s0);
        portable::softmax(&mut a);
        softmax(&mut b);
        assert_eq!(a, b, "softmax n={n}");
    }
    let (d, len) = (64, 17);
    let (q, k, v) = (data(d, 1), data(len * d, 2), data(len * d, 3));
    let (mut a, mut b) = (vec![0f32; d], vec![f32::NAN; d]);
    let mut sc = vec![0f32; len];
    portable::attend(&q, &k, &v, 0.3, &mut sc, &mut a);
    attend(&q, &k, &v, 0.3, &mut sc, &mut b);
    assert_eq!(a, b, "attend");
    crate::skips::no_hardware(
        &format!("kernels {test}"),
        "the CPU has no AVX-512 (checked that the portable fallback is used instead)",
    );
}

/// vdpbf16ps rounds the activations to bf16 first: compared with the portable product of the
/// rounded activations it is again a summation-order difference.
#[test]
fn bf16_dot_gemm_equals_portable_on_rounded_activations() {
    if !has_bf16_dot() {
        return without_bf16_dot();
    }
    #[cfg(target_arch = "x86_64")]
    {
        for &k in &[1usize, 2, 7, 31, 32, 33, 100, 257, 300] {
            for &(m, n) in &[(2usize, 1usize), (7, 9), (13, 33), (29, 70)] {
                let x = data(m * k, k as u32);
                let xr: Vec<f32> = x.iter().map(|v| bf16::from_f32(*v).to_f32()).collect();
                let w = weight(n, k, 3 + k as u32, &bf16::from_f32);
                let pw = PackedWeight::pack(&w, n, k).unwrap();
                let mut r = vec![0f32; m * n];
                portable::matmul(&xr, &w, &mut r, m, n, k);
                let words = pw.row_words();
                let mut xw = vec![u32::MAX; m * words];
                let mut y = vec![f32::NAN; m * n];
                // SAFETY: has_bf16_dot() checked the CPU; `y` is `[m, n]`, owned here; `xw` is
                // `[m, words]`.
                unsafe {
                    x86::to_bf16_words(&x, k, &mut xw, words);
                    let xs = x86::Activations::Bf16Words(&xw);
                    x86::gemm_avx512(&pw, 0..pw.panels(), xs, m, y.as_mut_ptr(), n);
                }
                for i in 0..m {
                    for j in 0..k {
                        let h = (xw[i * words + j / 2] >> (16 * (j % 2))) as u16;
                        assert_eq!(bf16::from_bits(h).to_f32(), xr[i * k + j], "rounding");
                    }
                    if k % 2 == 1 {
                        assert_eq!(xw[i * words + k / 2] >> 16, 0, "padding");
                    }
                    let scale = abs_scale(&w, &xr[i * k..(i + 1) * k], n);
                    for j in 0..n {
                        close(
                            y[i * n + j],
                            r[i * n + j],
                            scale[j],
                            &format!("dpbf16 m={m} n={n} k={k}"),
                        );
                    }
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

/// The AVX-512 `exp` against f64's, across the whole f32 range and at the edges.
#[test]
fn exp16_is_within_2_ulp() {
    if !Isa::Avx512.supported() {
        return without_avx512("exp16_is_within_2_ulp");
    }
    #[cfg(target_arch = "x86_64")]
    {
        let mut xs: Vec<f32> = (0..200_000)
            .map(|i| -104.0 + i as f32 * 0.000_965)
            .collect();
        xs.extend([
            0.0,
            -0.0,
            1e-30,
            -1e-30,
            88.7,
            -87.3,
            -103.9,
            f32::MIN_POSITIVE,
        ]);
        for c in xs.chunks(16) {
            let mut v = [0f32; 16];
            v[..c.len()].copy_from_slice(c);
            let mut out = [0f32; 16];
            // SAFETY: AVX-512 checked above.
            unsafe {
                use core::arch::x86_64::*;
                _mm512_storeu_ps(out.as_mut_ptr(), x86::exp16(_mm512_loadu_ps(v.as_ptr())));
            }
            for (x, y) in c.iter().zip(out) {
                let want = (*x as f64).exp();
                let ulp = (want as f32).abs() * f32::EPSILON;
                let tol = 2.0 * ulp.max(f32::from_bits(1)) as f64;
                assert!(
                    (y as f64 - want).abs() <= tol,
                    "exp({x}) = {y}, want {want}"
                );
            }
        }
        let special = [f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 100.0, -200.0];
        let mut v = [0f32; 16];
        v[..5].copy_from_slice(&special);
        let mut out = [0f32; 16];
        // SAFETY: AVX-512 checked above.
        unsafe {
            use core::arch::x86_64::*;
            _mm512_storeu_ps(out.as_mut_ptr(), x86::exp16(_mm512_loadu_ps(v.as_ptr())));
        }
        assert_eq!(out[0], f32::INFINITY);
        assert_eq!(out[1], 0.0);
        assert!(out[2].is_nan());
        assert_eq!(out[3], f32::INFINITY);
        assert_eq!(out[4], 0.0);
    }
}

#[test]
fn silu_softmax_and_attention_simd_equal_portable() {
    if !Isa::Avx512.supported() {
        return without_avx512("silu_softmax_and_attention_simd_equal_portable");
    }
    #[cfg(target_arch = "x86_64")]
    {
        for n in [1usize, 5, 16, 17, 100, 2432] {
            let g0: Vec<f32> = data(n, n as u32).iter().map(|v| v * 30.0).collect();
            let u = data(n, 7 + n as u32);
            let (mut a, mut b) = (g0.clone(), g0.clone());
            portable::silu_mul(&mut a, &u);
            // SAFETY: AVX-512 checked above; equal lengths.
            unsafe { x86::silu_mul_avx512(&mut b, &u) };
            for i in 0..n {
                let tol = 1e-6 * a[i].abs().max(1e-30);
                assert!(
                    (a[i] - b[i]).abs() <= tol,
                    "silu {}: {} vs {}",
                    g0[i],
                    a[i],
                    b[i]
                );
            }
            let s0: Vec<f32> = data(n, 3 * n as u32).iter().map(|v| v * 20.0).collect();
            let (mut a, mut b) = (s0.clone(), s0.clone());
            portable::softmax(&mut a);
            // SAFETY: AVX-512 checked above.
            unsafe { x86::softmax_avx512(&mut b) };
            for i in 0..n {
                assert!(
                    (a[i] - b[i]).abs() <= 1e-5 * a[i].max(1e-30),
                    "softmax n={n}"
                );
            }
        }
        for d in [1usize, 16, 24, 64, 128, 200] {
            for len in [1usize, 2, 17, 130] {
                let q = data(d, d as u32);
                let k = data(len * d, len as u32);
                let v = data(len * d, 5 + len as u32);
                let (mut a, mut b) = (vec![0f32; d], vec![f32::NAN; d]);
                let mut sc = vec![0f32; len];
                portable::attend(&q, &k, &v, 0.3, &mut sc, &mut a);
                // SAFETY: AVX-512 checked above; lengths as attend asserts.
                unsafe { x86::attend_avx512(&q, &k, &v, 0.3, &mut sc, &mut b) };
                for i in 0..d {
                    assert!(
                        (a[i] - b[i]).abs() <= 1e-5,
                        "attend d={d} len={len}: {a:?} {b:?}"
                    );
                }
            }
        }
    }
}

/// The threaded causal attention equals one `attend` per (token, head) with the right prefix.
#[test]
fn causal_attention_matches_per_token_attend() {
    let (d, heads, kvh, start, m) = (24, 6, 2, 5, 9);
    let kv_of: Vec<usize> = (0..heads).map(|h| h / (heads / kvh)).collect();
    let keys: Vec<Vec<f32>> = (0..kvh)
        .map(|j| data((start + m) * d, 40 + j as u32))
        .collect();
    let values: Vec<Vec<f32>> = (0..kvh)
        .map(|j| data((start + m) * d, 50 + j as u32))
        .collect();
    let q = data(m * heads * d, 60);
    let mut out = vec![f32::NAN; m * heads * d];
    let mut sc = vec![0f32; start + m];
    causal_attention(&q, &keys, &values, &kv_of, d, start, 0.2, &mut sc, &mut out);
    for t in 0..m {
        for h in 0..heads {
            let s = (t * heads + h) * d;
            let len = start + t + 1;
            let (k, v) = (&keys[kv_of[h]][..len * d], &values[kv_of[h]][..len * d]);
            let mut want = vec![0f32; d];
            attend(&q[s..s + d], k, v, 0.2, &mut sc, &mut want);
            assert_eq!(&out[s..s + d], &want[..], "token {t} head {h}");
        }
    }
}

/// The screened argmax is the full product's argmax, bit for bit, on random rows, planted near
/// ties, exact ties (lowest row wins), NaN rows and odd shapes, on every path.
#[test]
fn screened_argmax_equals_full_argmax() {
    let full = |w: &PackedWeight, x: &[f32]| {
        let mut y = vec![0f32; w.rows()];
        matmul(x, w, &mut y, 1);
        let mut best: Option<(f32, usize)> = None;
        for (r, &v) in y.iter().enumerate() {
            if !v.is_nan() && best.is_none_or(|(b, _)| v > b) {
                best = Some((v, r));
            }
        }
        best
    };
    let mut scratch = ScreenScratch::default();
    for &(n, k) in &[(1usize, 1usize), (33, 7), (70, 17), (1000, 64), (4099, 200)] {
        for variant in 0..5 {
            let mut wf = data(n * k, (n + k + variant) as u32);
            let x = data(k, 99 + variant as u32);
            match variant {
                // Row n/2 a copy of row n/3 nudged by one bf16 ulp in one weight: a near tie.
                1 if n > 3 => {
                    let (a, b) = (n / 3, n / 2);
                    let row: Vec<f32> = wf[a * k..(a + 1) * k].to_vec();
                    wf[b * k..(b + 1) * k].copy_from_slice(&row);
                    wf[b * k] = f32::from_bits(wf[b * k].to_bits() + (1 << 16));
                }
                // Exact tie between rows 1 and n-1: the lower wins.
                2 if n > 2 => {
                    let row: Vec<f32> = wf[k..2 * k].to_vec();
                    wf[(n - 1) * k..n * k].copy_from_slice(&row);
                }
                // A NaN weight in row 0 and an inf weight in the last row.
                3 => {
                    wf[0] = f32::NAN;
                    wf[(n - 1) * k] = f32::INFINITY;
                }
                // Every row the same up to 0.1% noise: the logits differ by much less than the
                // int8 error, so the approximate order is not the exact one.
                4 => {
                    let base: Vec<f32> = wf[..k].to_vec();
                    for r in 1..n {
                        for i in 0..k {
                            wf[r * k + i] = base[i] * (1.0 + 1e-3 * wf[r * k + i]);
                        }
                    }
                }
                _ => {}
            }
            let wb: Vec<bf16> = wf.iter().map(|v| bf16::from_f32(*v)).collect();
            for pw in [
                PackedWeight::pack(&wf, n, k).unwrap(),
                PackedWeight::pack(&wb, n, k).unwrap(),
            ] {
                let screen = Screen::new(&pw).unwrap();
                let got = argmax_screened(&pw, &screen, &x, &mut scratch);
                assert_eq!(got.best, full(&pw, &x), "n={n} k={k} variant {variant}");
                if n >= 1000 && variant == 0 {
                    // Random rows: the bound leaves few candidates.
                    assert!(
                        got.panels_read * 4 < pw.panels(),
                        "read {} panels",
                        got.panels_read
                    );
                }
            }
        }
    }
}

/// Row `b` of `w` (`[n, k]`, as f32 and as bf16) is the maximum of `x · wᵀ`, ahead of row `a`,
/// and the screened argmax finds it.
fn expect_screened_maximum(w: &[f32], x: &[f32], n: usize, k: usize, a: usize, b: usize) {
    let wb: Vec<bf16> = w.iter().map(|v| bf16::from_f32(*v)).collect();
    let mut scratch = ScreenScratch::default();
    for pw in [
        PackedWeight::pack(w, n, k).unwrap(),
        PackedWeight::pack(&wb, n, k).unwrap(),
    ] {
        let mut y = vec![0f32; n];
        matmul(x, &pw, &mut y, 1);
        assert!(
            y[b] > y[a],
            "row {b} must be the maximum: {} vs {}",
            y[b],
            y[a]
        );
        let got = argmax_screened(&pw, &Screen::new(&pw).unwrap(), x, &mut scratch);
        assert_eq!(got.best, Some((y[b], b)));
    }
}

/// A row whose int8 copy under-estimates it by most of the bound is the true maximum by less
/// than that error: only a bound that really covers the weights' error keeps it. (x is exact in
/// int8 here: multiples of 1/64 with a 127/64 in each block.)
#[test]
fn screened_argmax_keeps_a_maximum_hidden_by_quantisation() {
    let (n, k, a, b) = (70usize, 192usize, 5usize, 40usize);
    let mut x: Vec<f32> = data(k, 5)
        .iter()
        .map(|v| (v * 127.0).round() / 64.0)
        .collect();
    for blk in 0..k / 64 {
        x[64 * blk] = 127.0 / 64.0;
    }
    let sx = |i: usize| x[i].signum();
    let s0 = 1.0f32 / 128.0;
    let mut w = vec![0f32; n * k];
    // Both rows start with ±127·s0, so each row's scale is exactly s0.
    w[a * k] = sx(0) * 127.0 * s0;
    w[b * k] = sx(0) * 127.0 * s0;
    // Row b: 50.25 units (quantised to 50: its approximation is low by 0.25·s0·Σ|x|).
    let rest: f32 = (1..k).map(|i| x[i].abs()).sum();
    for i in 1..k {
        w[b * k + i] = sx(i) * 50.25 * s0;
    }
    // Row a: exact multiples, 50 units plus one more on elements worth ~15% of Σ|x|: above
    // b's approximation by more than 0.3 of b's bound, below b's exact value.
    let mut bumped = 0.0;
    for i in 1..k {
        let extra = if bumped < 0.15 * rest { 1.0 } else { 0.0 };
        bumped += extra * x[i].abs();
        w[a * k + i] = sx(i) * (50.0 + extra) * s0;
    }
    expect_screened_maximum(&w, &x, n, k, a, b);
}

/// The same for x's int8 error: both rows are exact in int8, x is 1/4 unit off its int8 value
/// on every element but the block's maximum, and the maximum row only wins through that.
#[test]
fn screened_argmax_keeps_a_maximum_hidden_by_the_activations_rounding() {
    let (n, k, a, b) = (70usize, 64usize, 5usize, 40usize);
    let s0 = 1.0f32 / 128.0;
    // x: 127/64 (sets the block's scale to exactly 1/64), one 40.25/64, 36 of 1.25/64, zeros.
    let mut x = vec![0f32; k];
    x[0] = 127.0 / 64.0;
    x[1] = 40.25 / 64.0;
    for v in &mut x[2..38] {
        *v = 1.25 / 64.0;
    }
    // Row b: 100 units everywhere; row a: 101 on x[1], 99 on the 36 small ones. In int8 units
    // a leads by 40 - 36 = 4; exactly, b leads by 0.25 * 35 - 4 = 4.75 (times s0 / 64).
    let mut w = vec![0f32; n * k];
    for i in 0..k {
        w[a * k + i] = 100.0 * s0;
        w[b * k + i] = 100.0 * s0;
    }
    w[a * k] = 127.0 * s0;
    w[b * k] = 127.0 * s0;
    w[a * k + 1] = 101.0 * s0;
    for i in 2..38 {
        w[a * k + i] = 99.0 * s0;
    }
    expect_screened_maximum(&w, &x, n, k, a, b);
}

/// The roofline measurements run and give positive figures (their size is the machine's).
#[test]
fn roofline_figures_are_positive() {
    assert!(crate::roofline::read_gbps(8 << 20, 2, 1) > 0.0);
    if let Some(g) = crate::roofline::peak_gflops(crate::roofline::Fma::F32, 1, 1000) {
        assert!(g > 0.0);
    }
    let bf = crate::roofline::peak_gflops(crate::roofline::Fma::Bf16Dot, 1, 1000);
    assert_eq!(bf.is_some(), crate::has_bf16_dot());
}
