//! x86-64 SIMD kernels over [`PackedWeight`] panels: AVX-512 (F+BW+VL, optionally BF16) and
//! AVX2+FMA.
//!
//! Every function here is `unsafe` because it is compiled for CPU features the baseline target
//! lacks: callers must have checked them (see `crate::Isa::detect`). The safe wrappers in
//! `lib.rs` assert the lengths; the raw-pointer arithmetic below stays inside them: panel `p`
//! has `row_words` steps of `panel_width(p)` words (loads past the width are masked off), `x`
//! is `[m, k]`, and `y` is written at `i * ldy + c` for the panel's output rows only.
//!
//! Each output row is one SIMD lane, summed over `k` in order; bf16 words are widened exactly
//! (the even element by a 16-bit shift, the odd one by masking off the low half).

// Tiles are indexed by (row, half) on purpose: the loops mirror the register layout.
#![allow(clippy::needless_range_loop)]

use core::arch::x86_64::*;
use std::ops::Range;

use crate::packed::{PackedDtype, PackedWeight, PANEL};

/// x rows per micro-kernel call: 12 × 2 accumulators + 4 widened weight vectors + 1 broadcast
/// fit the 32 zmm registers (12 measured ~5% faster than 8).
const MR: usize = 12;
/// Words of `k` per cache block: 128 words × 32 rows × 4 bytes = 16 KiB of panel, half of L1,
/// reused by every group of [`MR`] x rows before the next block.
const KW: usize = 128;

/// Bytes ahead of the current step that the bf16 GEMV prefetches (see `gemv_avx512`).
const GEMV_PREFETCH: usize = 1024;

#[inline(always)]
fn lane_mask(valid: usize) -> [u16; 2] {
    let m = |n: usize| {
        if n >= 16 {
            0xffff
        } else {
            ((1u32 << n) - 1) as u16
        }
    };
    [m(valid), m(valid.saturating_sub(16))]
}

/// One step of a panel `width` words wide as two vectors of 16 words; lanes past the width are
/// masked off (not read) and zero.
///
/// # Safety
/// The CPU must support `avx512f,avx512bw,avx512vl`.
/// Every pointer must be valid for the elements read or written through it here, and a
/// written range must not overlap a range another live reference uses.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn load_step(p: *const u32, m: [u16; 2]) -> (__m512i, __m512i) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        (
            _mm512_maskz_loadu_epi32(m[0], p as *const i32),
            _mm512_maskz_loadu_epi32(m[1], p.wrapping_add(16) as *const i32),
        )
    }
}

/// The even (`w << 16`) and odd (`w & 0xffff0000`) bf16 elements of 16 words as f32.
///
/// # Safety
/// The CPU must support `avx512f,avx512bw,avx512vl`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn widen_pair(v: __m512i) -> (__m512, __m512) {
    (
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v)),
        _mm512_castsi512_ps(_mm512_and_si512(
            v,
            _mm512_set1_epi32(0xffff_0000u32 as i32),
        )),
    )
}

/// `y[c] = w[c, :]·x` for the rows of `panels` (AVX-512): one pass over each panel with
/// even-`k` and odd-`k` partial sums (four independent chains), added at the end.
///
/// # Safety
/// AVX-512F/BW/VL available; `x.len() == w.cols()`, `panels` within `w`, and `y` writable at
/// `c` for every valid row `c` of those panels, by this call alone.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn gemv_avx512(w: &PackedWeight, panels: Range<usize>, x: &[f32], y: *mut f32) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        let (k, words) = (w.cols(), w.row_words());
        let xp = x.as_ptr();
        for pi in panels {
            let (wp, pw) = (w.panel(pi).as_ptr(), w.panel_width(pi));
            let m = lane_mask(pw);
            let mut a = [_mm512_setzero_ps(); 4];
            match w.dtype() {
                PackedDtype::BF16 => {
                    for p in 0..k / 2 {
                        // The two lines GEMV_PREFETCH bytes ahead (into the next panel near the
                        // end: panels are contiguous), so DRAM reads are in flight earlier than
                        // the hardware prefetcher alone issues them.
                        let ahead = (wp.add(p * pw) as *const i8).wrapping_add(GEMV_PREFETCH);
                        _mm_prefetch::<_MM_HINT_T0>(ahead);
                        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64));
                        let (v0, v1) = load_step(wp.add(p * pw), m);
                        let ((e0, o0), (e1, o1)) = (widen_pair(v0), widen_pair(v1));
                        let xe = _mm512_set1_ps(*xp.add(2 * p));
                        let xo = _mm512_set1_ps(*xp.add(2 * p + 1));
                        a[0] = _mm512_fmadd_ps(e0, xe, a[0]);
                        a[1] = _mm512_fmadd_ps(e1, xe, a[1]);
                        a[2] = _mm512_fmadd_ps(o0, xo, a[2]);
                        a[3] = _mm512_fmadd_ps(o1, xo, a[3]);
                    }
                    if k % 2 == 1 {
                        let (v0, v1) = load_step(wp.add((words - 1) * pw), m);
                        let xe = _mm512_set1_ps(*xp.add(k - 1));
                        a[0] = _mm512_fmadd_ps(widen_pair(v0).0, xe, a[0]);
                        a[1] = _mm512_fmadd_ps(widen_pair(v1).0, xe, a[1]);
                    }
                }
                PackedDtype::F32 => {
                    for p in 0..k {
                        let (v0, v1) = load_step(wp.add(p * pw), m);
                        let xv = _mm512_set1_ps(*xp.add(p));
                        let s = 2 * (p % 2);
                        a[s] = _mm512_fmadd_ps(_mm512_castsi512_ps(v0), xv, a[s]);
                        a[s + 1] = _mm512_fmadd_ps(_mm512_castsi512_ps(v1), xv, a[s + 1]);
                    }
                }
            }
            let yp = y.add(pi * PANEL);
            _mm512_mask_storeu_ps(yp, m[0], _mm512_add_ps(a[0], a[2]));
            _mm512_mask_storeu_ps(yp.wrapping_add(16), m[1], _mm512_add_ps(a[1], a[3]));
        }
    }
}

/// The activations of the prefill GEMM: f32 (exact products), or bf16-rounded words from
/// [`to_bf16_words`] for `vdpbf16ps`.
#[derive(Clone, Copy)]
pub(crate) enum Activations<'a> {
    /// `[m, k]` f32.
    F32(&'a [f32]),
    /// `[m, row_words]` words of bf16 pairs (bf16 weights only).
    Bf16Words(&'a [u32]),
}

/// `y[i, c] = Σ_k x[i, k]·w[c, k]` for `m` x rows and the rows of `panels` (AVX-512),
/// register-blocked for prefill: for each 16 KiB block of a panel, every group of [`MR`] x rows
/// is run over it as an outer product (each x element, or x pair for `vdpbf16ps`, broadcast and
/// multiplied into the two vectors of 16 output rows). Each output is a plain sequential sum over
/// `k`, partial sums going through `y` between blocks, so the result does not depend on the
/// thread split.
///
/// # Safety
/// As for [`gemv_avx512`], with `x` `[m, k]` (f32) or `[m, row_words]` (words), and `y` writable
/// at `i * ldy + c`. `Bf16Words` needs a bf16 `w` and a CPU with AVX512_BF16.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn gemm_avx512(
    w: &PackedWeight,
    panels: Range<usize>,
    x: Activations,
    m: usize,
    y: *mut f32,
    ldy: usize,
) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        let (k, words) = (w.cols(), w.row_words());
        let bf = w.dtype() == PackedDtype::BF16;
        // Block depth in words: 16 KiB of panel, and for exact bf16 128 of k (its x rows are f32).
        let block = match x {
            Activations::F32(_) if bf => KW / 2,
            _ => KW,
        };
        for pi in panels {
            let (wp, pw) = (w.panel(pi).as_ptr(), w.panel_width(pi));
            let masks = lane_mask(pw);
            let mut kb = 0;
            while kb < words {
                let kw = (words - kb).min(block);
                let blk = wp.add(kb * pw);
                let mut i = 0;
                while i < m {
                    let r = (m - i).min(MR);
                    let ys = y.add(i * ldy + pi * PANEL);
                    let first = kb == 0;
                    macro_rules! go {
                        ($micro:ident, $xs:expr, $ldx:expr, $kx:expr; $($R:literal)*) => {
                            match r {
                                $($R => $micro::<$R>($xs, $ldx, blk, pw, $kx, ys, ldy, masks, first),)*
                                _ => unreachable!(),
                            }
                        };
                    }
                    match x {
                        Activations::F32(x) if bf => {
                            // x elements of this block; the last word may be half (odd k).
                            let kx = (2 * (kb + kw)).min(k) - 2 * kb;
                            let xs = x.as_ptr().add(i * k + 2 * kb);
                            go!(micro_bf16, xs, k, kx; 1 2 3 4 5 6 7 8 9 10 11 12)
                        }
                        Activations::F32(x) => {
                            let xs = x.as_ptr().add(i * k + kb);
                            go!(micro_f32, xs, k, kw; 1 2 3 4 5 6 7 8 9 10 11 12)
                        }
                        Activations::Bf16Words(xw) => {
                            let xs = xw.as_ptr().add(i * words + kb);
                            // SAFETY (of the AVX512_BF16 call): the caller's contract.
                            go!(micro_dpbf16, xs, words, kw; 1 2 3 4 5 6 7 8 9 10 11 12)
                        }
                    }
                    i += r;
                }
                kb += kw;
            }
        }
    }
}

/// Loads (or zeroes, for the first block) `R` rows × 32 outputs of `y`.
///
/// # Safety
/// The CPU must support `avx512f,avx512bw,avx512vl`.
/// Every pointer must be valid for the elements read or written through it here, and a
/// written range must not overlap a range another live reference uses.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn acc_init<const R: usize>(
    y: *const f32,
    ldy: usize,
    masks: [u16; 2],
    first: bool,
) -> [[__m512; 2]; R] {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        if !first {
            for r in 0..R {
                for h in 0..2 {
                    acc[r][h] = _mm512_maskz_loadu_ps(masks[h], y.wrapping_add(r * ldy + 16 * h));
                }
            }
        }
        acc
    }
}

/// # Safety
/// The CPU must support `avx512f,avx512bw,avx512vl`.
/// Every pointer must be valid for the elements read or written through it here, and a
/// written range must not overlap a range another live reference uses.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn acc_store<const R: usize>(
    acc: &[[__m512; 2]; R],
    y: *mut f32,
    ldy: usize,
    masks: [u16; 2],
) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        for r in 0..R {
            for h in 0..2 {
                _mm512_mask_storeu_ps(y.wrapping_add(r * ldy + 16 * h), masks[h], acc[r][h]);
            }
        }
    }
}

/// `R` x rows (`ldx` apart, `kx` elements from `x`) × one bf16 panel block, into `y`.
///
/// # Safety
/// The CPU must support `avx512f,avx512bw,avx512vl`.
/// Every pointer must be valid for the elements read or written through it here, and a
/// written range must not overlap a range another live reference uses.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[allow(clippy::too_many_arguments)]
unsafe fn micro_bf16<const R: usize>(
    x: *const f32,
    ldx: usize,
    panel: *const u32,
    pw: usize,
    kx: usize,
    y: *mut f32,
    ldy: usize,
    masks: [u16; 2],
    first: bool,
) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        let mut acc = acc_init::<R>(y, ldy, masks, first);
        for p in 0..kx / 2 {
            let (v0, v1) = load_step(panel.add(p * pw), masks);
            let ((e0, o0), (e1, o1)) = (widen_pair(v0), widen_pair(v1));
            for r in 0..R {
                let xe = _mm512_set1_ps(*x.add(r * ldx + 2 * p));
                acc[r][0] = _mm512_fmadd_ps(xe, e0, acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(xe, e1, acc[r][1]);
                let xo = _mm512_set1_ps(*x.add(r * ldx + 2 * p + 1));
                acc[r][0] = _mm512_fmadd_ps(xo, o0, acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(xo, o1, acc[r][1]);
            }
        }
        if kx % 2 == 1 {
            let p = kx / 2;
            let (v0, v1) = load_step(panel.add(p * pw), masks);
            let (e0, e1) = (widen_pair(v0).0, widen_pair(v1).0);
            for r in 0..R {
                let xe = _mm512_set1_ps(*x.add(r * ldx + 2 * p));
                acc[r][0] = _mm512_fmadd_ps(xe, e0, acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(xe, e1, acc[r][1]);
            }
        }
        acc_store::<R>(&acc, y, ldy, masks);
    }
}

/// [`micro_bf16`] for an f32 panel block (one element per word).
///
/// # Safety
/// The CPU must support `avx512f,avx512bw,avx512vl`.
/// Every pointer must be valid for the elements read or written through it here, and a
/// written range must not overlap a range another live reference uses.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[allow(clippy::too_many_arguments)]
unsafe fn micro_f32<const R: usize>(
    x: *const f32,
    ldx: usize,
    panel: *const u32,
    pw: usize,
    kx: usize,
    y: *mut f32,
    ldy: usize,
    masks: [u16; 2],
    first: bool,
) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        let mut acc = acc_init::<R>(y, ldy, masks, first);
        for p in 0..kx {
            let (v0, v1) = load_step(panel.add(p * pw), masks);
            let (w0, w1) = (_mm512_castsi512_ps(v0), _mm512_castsi512_ps(v1));
            for r in 0..R {
                let xb = _mm512_set1_ps(*x.add(r * ldx + p));
                acc[r][0] = _mm512_fmadd_ps(xb, w0, acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(xb, w1, acc[r][1]);
            }
        }
        acc_store::<R>(&acc, y, ldy, masks);
    }
}

/// f32 → bf16 with round-to-nearest-even (as `half::bf16::from_f32`) into 32-bit words, a row
/// of `x` (`[m, k]`) per `row_words` words, zero-padded: the activations of the bf16-dot GEMM.
///
/// # Safety
/// AVX-512F/BW/VL and AVX512_BF16 available; `x.len() == m * k`,
/// `out.len() == m * row_words`, `2 * row_words >= k`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(crate) unsafe fn to_bf16_words(x: &[f32], k: usize, out: &mut [u32], row_words: usize) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        let m = out.len() / row_words.max(1);
        for i in 0..m {
            let src = x.as_ptr().add(i * k);
            let dst = out.as_mut_ptr().add(i * row_words) as *mut u16;
            let mut j = 0;
            while j < k {
                let mk: __mmask16 = if k - j >= 16 {
                    0xffff
                } else {
                    ((1u32 << (k - j)) - 1) as u16
                };
                let v = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mk, src.add(j)));
                _mm256_mask_storeu_epi16(
                    dst.add(j) as *mut i16,
                    mk,
                    core::mem::transmute::<__m256bh, __m256i>(v),
                );
                j += 16;
            }
            if k % 2 == 1 {
                *dst.add(k) = 0;
            }
        }
    }
}

/// `R` rows of bf16 activation words (`ldx` apart) × one bf16 panel block with `vdpbf16ps`:
/// each instruction multiplies a broadcast x pair into the weight pairs of 16 output rows and
/// adds both products in f32 (twice the f32 FMA rate).
///
/// # Safety
/// The CPU must support `avx512f,avx512bw,avx512vl,avx512bf16`.
/// Every pointer must be valid for the elements read or written through it here, and a
/// written range must not overlap a range another live reference uses.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn micro_dpbf16<const R: usize>(
    xw: *const u32,
    ldx: usize,
    panel: *const u32,
    pw: usize,
    kw: usize,
    y: *mut f32,
    ldy: usize,
    masks: [u16; 2],
    first: bool,
) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        let mut acc = acc_init::<R>(y, ldy, masks, first);
        for p in 0..kw {
            let (v0, v1) = load_step(panel.add(p * pw), masks);
            let w0: __m512bh = core::mem::transmute(v0);
            let w1: __m512bh = core::mem::transmute(v1);
            for r in 0..R {
                let xb: __m512bh =
                    core::mem::transmute(_mm512_set1_epi32(*xw.add(r * ldx + p) as i32));
                acc[r][0] = _mm512_dpbf16_ps(acc[r][0], xb, w0);
                acc[r][1] = _mm512_dpbf16_ps(acc[r][1], xb, w1);
            }
        }
        acc_store::<R>(&acc, y, ldy, masks);
    }
}

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

/// [`gemv_avx512`] for AVX2+FMA: the panel as four 8-row quarters, even and odd `k` summed
/// separately.
///
/// # Safety
/// AVX2 and FMA available; otherwise as for [`gemv_avx512`].
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

/// [`gemm_avx512`] for AVX2+FMA: 4 x rows × 16 output rows per micro-kernel (8 accumulators,
/// 4 widened weight vectors), each output a sequential sum over `k`.
///
/// # Safety
/// AVX2 and FMA available; otherwise as for [`gemm_avx512`].
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

/// `out[r] = Σ_b sx[b] · (Σ_{i∈b} qu[r, i]·xq[i] − corr[b])` (AVX-512 VNNI): one `vpdpbusd` per
/// 64-element block multiplies the offset weight bytes by the signed x bytes into 16 exact i32
/// lanes, lane 0 starting at `−corr[b]` so the lanes sum to Σ (qu − 128)·xq; the block is then
/// converted and scaled into an f32 accumulator.
///
/// # Safety
/// AVX-512F/BW/VL and AVX512_VNNI available; `qu.len() >= out.len() * kp`, `xq.len() == kp`,
/// `sx.len() == corr.len() == kp / 64`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) unsafe fn dot_u8_rows_vnni(
    qu: &[u8],
    kp: usize,
    xq: &[i8],
    sx: &[f32],
    corr: &[i32],
    out: &mut [f32],
) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        let nb = kp / 64;
        let (qp, xp) = (qu.as_ptr(), xq.as_ptr());
        for (r, o) in out.iter_mut().enumerate() {
            let row = qp.add(r * kp);
            // Even and odd blocks in two accumulators: two dependency chains per row.
            let mut acc = [_mm512_setzero_ps(); 2];
            for b in 0..nb {
                let init = _mm512_maskz_set1_epi32(1, -*corr.get_unchecked(b));
                let w = _mm512_loadu_si512(row.add(64 * b) as *const __m512i);
                let xv = _mm512_loadu_si512(xp.add(64 * b) as *const __m512i);
                let t = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(init, w, xv));
                let s = _mm512_set1_ps(*sx.get_unchecked(b));
                if b % 2 == 0 {
                    acc[0] = _mm512_fmadd_ps(t, s, acc[0]);
                } else {
                    acc[1] = _mm512_fmadd_ps(t, s, acc[1]);
                }
            }
            *o = _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]));
        }
    }
}

/// Wrapping sum of `x` as u32 with eight independent 512-bit accumulators (4 KiB apart at most
/// per iteration), for [`crate::roofline`]'s read bandwidth.
///
/// # Safety
/// The CPU must support `avx512f`.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn read_sum_avx512(x: &[u32]) -> u32 {
    let mut acc = [_mm512_setzero_si512(); 8];
    let mut chunks = x.chunks_exact(128);
    for c in &mut chunks {
        for (l, a) in acc.iter_mut().enumerate() {
            // SAFETY: `c` has 128 elements; lane `l` reads 16 of them at 16·l.
            let v = unsafe { _mm512_loadu_si512(c.as_ptr().add(16 * l) as *const _) };
            *a = _mm512_add_epi32(*a, v);
        }
    }
    let mut s = chunks
        .remainder()
        .iter()
        .fold(0u32, |a, &b| a.wrapping_add(b));
    for a in acc {
        s = s.wrapping_add(_mm512_reduce_add_epi32(a) as u32);
    }
    s
}

/// `n` iterations of 12 independent chains of 512-bit FMAs; returns the flops done.
///
/// # Safety
/// The CPU must support `avx512f`.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn fma_chains_avx512(n: usize) -> f64 {
    let b = _mm512_set1_ps(std::hint::black_box(0.999_999));
    let c = _mm512_set1_ps(std::hint::black_box(1e-7));
    let mut a = [_mm512_set1_ps(1.0); 12];
    for _ in 0..n {
        for v in a.iter_mut() {
            *v = _mm512_fmadd_ps(*v, b, c);
        }
    }
    std::hint::black_box(a);
    (n * 12 * 16 * 2) as f64
}

/// `n` iterations of 12 independent chains of 256-bit FMAs; returns the flops done.
///
/// # Safety
/// The CPU must support `avx2,fma`.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn fma_chains_avx2(n: usize) -> f64 {
    let b = _mm256_set1_ps(std::hint::black_box(0.999_999));
    let c = _mm256_set1_ps(std::hint::black_box(1e-7));
    let mut a = [_mm256_set1_ps(1.0); 12];
    for _ in 0..n {
        for v in a.iter_mut() {
            *v = _mm256_fmadd_ps(*v, b, c);
        }
    }
    std::hint::black_box(a);
    (n * 12 * 8 * 2) as f64
}

/// `n` iterations of 12 independent chains of `vdpbf16ps`; returns the flops done (64 per
/// instruction: 16 lanes, two products and two adds each).
///
/// # Safety
/// The CPU must support `avx512f,avx512bf16`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(crate) unsafe fn dpbf16_chains_avx512(n: usize) -> f64 {
    // SAFETY: plain bit reinterpretations of 512-bit vectors.
    let (x, y): (__m512bh, __m512bh) = unsafe {
        (
            core::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(std::hint::black_box(
                0x3f80_3f80,
            ))),
            core::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(std::hint::black_box(
                0x3380_3380,
            ))),
        )
    };
    let mut a = [_mm512_setzero_ps(); 12];
    for _ in 0..n {
        for v in a.iter_mut() {
            *v = _mm512_dpbf16_ps(*v, x, y);
        }
    }
    std::hint::black_box(a);
    (n * 12 * 64) as f64
}
