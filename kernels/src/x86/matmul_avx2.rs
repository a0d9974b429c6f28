//! AVX2+FMA GEMV and GEMM, for CPUs without AVX-512 (the same panels and sums as
//! [`super::gemm_avx512`]).

#![allow(clippy::needless_range_loop)]

use core::arch::x86_64::*;
use std::ops::Range;

use crate::packed::{PackedDtype, PackedWeight, PANEL};

/// The even and odd bf16 elements of 8 words as f32 (AVX2).
///
/// # Safety
/// The CPU must support `avx2,fma`.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn widen_pair256(v: __m256i) -> (__m256, __m256) {
    (
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v)),
        _mm256_castsi256_ps(_mm256_and_si256(
            v,
            _mm256_set1_epi32(0xffff_0000u32 as i32),
        )),
    )
}

/// A mask of the first `valid` (clamped to 0..=8) of 8 lanes, for `maskload`.
///
/// # Safety
/// The CPU must support `avx2,fma`.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn mask8(valid: usize) -> __m256i {
    _mm256_cmpgt_epi32(
        _mm256_set1_epi32(valid.min(8) as i32),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    )
}

/// 8 words of a panel step at `p`; in a panel that is not `full`, lanes outside `mask` are not
/// read and are zero (`vpmaskmovd` is several times slower than a plain load on AMD, so full
/// panels, all but the last, do not use it).
///
/// # Safety
/// The CPU must support `avx2,fma`.
/// Every pointer must be valid for the elements read or written through it here, and a
/// written range must not overlap a range another live reference uses.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn load8(p: *const u32, mask: __m256i, full: bool) -> __m256i {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        if full {
            _mm256_loadu_si256(p as *const __m256i)
        } else {
            _mm256_maskload_epi32(p as *const i32, mask)
        }
    }
}

/// Stores the first `valid` of 8 lanes.
///
/// # Safety
/// The CPU must support `avx2,fma`.
/// Every pointer must be valid for the elements read or written through it here, and a
/// written range must not overlap a range another live reference uses.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn store8(y: *mut f32, v: __m256, valid: usize) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        if valid >= 8 {
            _mm256_storeu_ps(y, v);
        } else {
            let mut t = [0f32; 8];
            _mm256_storeu_ps(t.as_mut_ptr(), v);
            core::ptr::copy_nonoverlapping(t.as_ptr(), y, valid);
        }
    }
}

/// [`gemv_avx512`](super::gemv_avx512) for AVX2+FMA: the panel as four 8-row quarters, even and odd `k` summed
/// separately.
///
/// # Safety
/// AVX2 and FMA available; otherwise as for [`gemv_avx512`](super::gemv_avx512).
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn gemv_avx2(w: &PackedWeight, panels: Range<usize>, x: &[f32], y: *mut f32) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        let k = w.cols();
        let xp = x.as_ptr();
        for pi in panels {
            let (wp, pw) = (w.panel(pi).as_ptr(), w.panel_width(pi));
            let quarters = pw.div_ceil(8);
            let full = pw == PANEL;
            let masks: [__m256i; 4] = [
                mask8(pw),
                mask8(pw.saturating_sub(8)),
                mask8(pw.saturating_sub(16)),
                mask8(pw.saturating_sub(24)),
            ];
            let mut e = [_mm256_setzero_ps(); 4];
            let mut o = [_mm256_setzero_ps(); 4];
            match w.dtype() {
                PackedDtype::BF16 => {
                    for p in 0..k.div_ceil(2) {
                        let xe = _mm256_set1_ps(*xp.add(2 * p));
                        let xo = _mm256_set1_ps(if 2 * p + 1 < k {
                            *xp.add(2 * p + 1)
                        } else {
                            0.0
                        });
                        for q in 0..quarters {
                            let (we, wo) =
                                widen_pair256(load8(wp.add(p * pw + 8 * q), masks[q], full));
                            e[q] = _mm256_fmadd_ps(we, xe, e[q]);
                            o[q] = _mm256_fmadd_ps(wo, xo, o[q]);
                        }
                    }
                }
                PackedDtype::F32 => {
                    for p in 0..k {
                        let xv = _mm256_set1_ps(*xp.add(p));
                        let a = if p % 2 == 0 { &mut e } else { &mut o };
                        for q in 0..quarters {
                            let v =
                                _mm256_castsi256_ps(load8(wp.add(p * pw + 8 * q), masks[q], full));
                            a[q] = _mm256_fmadd_ps(v, xv, a[q]);
                        }
                    }
                }
            }
            for q in 0..quarters {
                store8(
                    y.add(pi * PANEL + 8 * q),
                    _mm256_add_ps(e[q], o[q]),
                    pw - 8 * q,
                );
            }
        }
    }
}

/// [`gemm_avx512`](super::gemm_avx512) for AVX2+FMA: 4 x rows × 16 output rows per micro-kernel (8 accumulators,
/// 4 widened weight vectors), each output a sequential sum over `k`.
///
/// # Safety
/// AVX2 and FMA available; otherwise as for [`gemm_avx512`](super::gemm_avx512).
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn gemm_avx2(
    w: &PackedWeight,
    panels: Range<usize>,
    x: &[f32],
    m: usize,
    y: *mut f32,
    ldy: usize,
) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        let k = w.cols();
        let bf = w.dtype() == PackedDtype::BF16;
        for pi in panels {
            let (wp, pw) = (w.panel(pi).as_ptr(), w.panel_width(pi));
            let full = pw == PANEL;
            for half in 0..pw.div_ceil(16) {
                let vh = (pw - 16 * half).min(16);
                let (m0, m1) = (mask8(vh), mask8(vh.saturating_sub(8)));
                let mut i = 0;
                while i < m {
                    let r = (m - i).min(4);
                    let mut acc = [[_mm256_setzero_ps(); 2]; 4];
                    let xr = |t: usize| x.as_ptr().add((i + t.min(r - 1)) * k);
                    let xs = [xr(0), xr(1), xr(2), xr(3)];
                    if bf {
                        for p in 0..k.div_ceil(2) {
                            let base = wp.add(p * pw + 16 * half);
                            let (e0, o0) = widen_pair256(load8(base, m0, full));
                            let (e1, o1) = widen_pair256(load8(base.wrapping_add(8), m1, full));
                            let odd = 2 * p + 1 < k;
                            for t in 0..4 {
                                let xe = _mm256_set1_ps(*xs[t].add(2 * p));
                                acc[t][0] = _mm256_fmadd_ps(xe, e0, acc[t][0]);
                                acc[t][1] = _mm256_fmadd_ps(xe, e1, acc[t][1]);
                                if odd {
                                    let xo = _mm256_set1_ps(*xs[t].add(2 * p + 1));
                                    acc[t][0] = _mm256_fmadd_ps(xo, o0, acc[t][0]);
                                    acc[t][1] = _mm256_fmadd_ps(xo, o1, acc[t][1]);
                                }
                            }
                        }
                    } else {
                        for p in 0..k {
                            let base = wp.add(p * pw + 16 * half);
                            let w0 = _mm256_castsi256_ps(load8(base, m0, full));
                            let w1 = _mm256_castsi256_ps(load8(base.wrapping_add(8), m1, full));
                            for t in 0..4 {
                                let xb = _mm256_set1_ps(*xs[t].add(p));
                                acc[t][0] = _mm256_fmadd_ps(xb, w0, acc[t][0]);
                                acc[t][1] = _mm256_fmadd_ps(xb, w1, acc[t][1]);
                            }
                        }
                    }
                    for t in 0..r {
                        let yp = y.add((i + t) * ldy + pi * PANEL + 16 * half);
                        store8(yp, acc[t][0], vh);
                        if vh > 8 {
                            store8(yp.add(8), acc[t][1], vh - 8);
                        }
                    }
                    i += r;
                }
            }
        }
    }
}
