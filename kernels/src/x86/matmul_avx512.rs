//! AVX-512 GEMV and register-blocked GEMM over bf16 and f32 panels, and the bf16 activation
//! words of the `vdpbf16ps` GEMM (see the module docs of `x86` for the pointer contract).

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
