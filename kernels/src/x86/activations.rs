//! AVX-512 element-wise kernels of the model: `exp`, SiLU·up, softmax and attention.

// Accumulators are indexed by lane group on purpose: the loops mirror the register layout.
#![allow(clippy::needless_range_loop)]

use core::arch::x86_64::*;

/// `e^x` for 16 lanes (AVX-512): `2^n · p(r)` with `n = round(x·log2 e)`, `r = x − n·ln 2` (ln 2
/// split in two so `r` is exact to f32), `p` the degree-7 Taylor polynomial (truncation below
/// 1e-8 relative for `|r| ≤ ln 2 / 2`), scaled by `vscalefps` (which over- and underflows like
/// `exp`). Within 2 ulp of libm's `expf`; NaN stays NaN.
///
/// # Safety
/// The CPU must support `avx512f,avx512bw,avx512vl`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn exp16(x: __m512) -> __m512 {
    // e^89 is inf and e^-104 is 0 in f32: clamping keeps r finite for ±inf (NaN passes, being
    // the second operand).
    let x = _mm512_min_ps(_mm512_set1_ps(89.0), x);
    let x = _mm512_max_ps(_mm512_set1_ps(-104.0), x);
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
    let c = |v: f32| _mm512_set1_ps(v);
    let mut p = c(1.0 / 5040.0);
    p = _mm512_fmadd_ps(p, r, c(1.0 / 720.0));
    p = _mm512_fmadd_ps(p, r, c(1.0 / 120.0));
    p = _mm512_fmadd_ps(p, r, c(1.0 / 24.0));
    p = _mm512_fmadd_ps(p, r, c(1.0 / 6.0));
    p = _mm512_fmadd_ps(p, r, c(0.5));
    p = _mm512_fmadd_ps(p, r, c(1.0));
    p = _mm512_fmadd_ps(p, r, c(1.0));
    _mm512_scalef_ps(p, n)
}

#[inline]
fn mask16(n: usize) -> __mmask16 {
    if n >= 16 {
        0xffff
    } else {
        ((1u32 << n) - 1) as u16
    }
}

/// `gate = silu(gate) · up` (AVX-512, [`exp16`]).
///
/// # Safety
/// AVX-512F/BW/VL available; `gate.len() == up.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn silu_mul_avx512(gate: &mut [f32], up: &[f32]) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        let (g, u) = (gate.as_mut_ptr(), up.as_ptr());
        let mut i = 0;
        while i < gate.len() {
            let m = mask16(gate.len() - i);
            let gv = _mm512_maskz_loadu_ps(m, g.add(i));
            let e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv));
            let s = _mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.0), e));
            _mm512_mask_storeu_ps(
                g.add(i),
                m,
                _mm512_mul_ps(s, _mm512_maskz_loadu_ps(m, u.add(i))),
            );
            i += 16;
        }
    }
}

/// Numerically stable softmax in place (AVX-512, [`exp16`]).
///
/// # Safety
/// AVX-512F/BW/VL available.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn softmax_avx512(x: &mut [f32]) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        let (p, n) = (x.as_mut_ptr(), x.len());
        let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut i = 0;
        while i < n {
            let m = mask16(n - i);
            mx = _mm512_mask_max_ps(mx, m, mx, _mm512_maskz_loadu_ps(m, p.add(i)));
            i += 16;
        }
        let mx = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
        let mut sum = _mm512_setzero_ps();
        i = 0;
        while i < n {
            let m = mask16(n - i);
            let e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p.add(i)), mx));
            _mm512_mask_storeu_ps(p.add(i), m, e);
            sum = _mm512_mask_add_ps(sum, m, sum, e);
            i += 16;
        }
        let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(sum));
        i = 0;
        while i < n {
            let m = mask16(n - i);
            _mm512_mask_storeu_ps(
                p.add(i),
                m,
                _mm512_mul_ps(_mm512_maskz_loadu_ps(m, p.add(i)), inv),
            );
            i += 16;
        }
    }
}

/// [`crate::attend`] with AVX-512: the scores as 16-lane dot products, [`softmax_avx512`], then
/// the weighted sum of value rows with up to 8 vectors of `out` held in registers.
///
/// # Safety
/// AVX-512F/BW/VL available; lengths as `crate::attend` asserts.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn attend_avx512(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        let d = q.len();
        let len = k.len() / d;
        let chunks = d.div_ceil(16);
        let (qp, kp, vp) = (q.as_ptr(), k.as_ptr(), v.as_ptr());
        for (i, s) in scores[..len].iter_mut().enumerate() {
            let kr = kp.add(i * d);
            let mut acc = _mm512_setzero_ps();
            for c in 0..chunks {
                let m = mask16(d - 16 * c);
                acc = _mm512_fmadd_ps(
                    _mm512_maskz_loadu_ps(m, qp.add(16 * c)),
                    _mm512_maskz_loadu_ps(m, kr.add(16 * c)),
                    acc,
                );
            }
            *s = _mm512_reduce_add_ps(acc) * scale;
        }
        softmax_avx512(&mut scores[..len]);
        let op = out.as_mut_ptr();
        let mut c0 = 0;
        while c0 < chunks {
            let cn = (chunks - c0).min(8);
            let mut acc = [_mm512_setzero_ps(); 8];
            for (i, &p) in scores[..len].iter().enumerate() {
                let pv = _mm512_set1_ps(p);
                let vr = vp.add(i * d);
                for c in 0..cn {
                    let at = 16 * (c0 + c);
                    let m = mask16(d - at);
                    acc[c] = _mm512_fmadd_ps(pv, _mm512_maskz_loadu_ps(m, vr.add(at)), acc[c]);
                }
            }
            for c in 0..cn {
                let at = 16 * (c0 + c);
                _mm512_mask_storeu_ps(op.add(at), mask16(d - at), acc[c]);
            }
            c0 += cn;
        }
    }
}
