//! x86-64 SIMD kernels: AVX-512 (F+BW+VL, optionally BF16) and AVX2+FMA.
//!
//! Every function here is `unsafe` because it is compiled for CPU features the baseline target
//! lacks: callers must have checked them (see `crate::Isa::detect`). Slices are bounds-checked by
//! the safe wrappers in `lib.rs`; the raw-pointer arithmetic below stays inside the lengths those
//! wrappers assert (`w.len() == rows * k`, `x.len() == k` or `m * k`).
//!
//! Weights are row-major `[out, in]`, so both products are dot-product shaped: a tile of
//! accumulators, each a vector along `k`, reduced horizontally at the end.

// Tiles are indexed by (row, column) on purpose: the loops mirror the register layout.
#![allow(clippy::needless_range_loop)]

use core::arch::x86_64::*;

use half::bf16;

/// A weight element type the SIMD kernels can load and widen to f32.
pub(crate) trait SimdWeight: Copy {
    /// 16 elements widened to f32. Caller: AVX-512F, `p..p+16` readable.
    unsafe fn load16(p: *const Self) -> __m512;
    /// The first `count(mask)` elements widened, zeros elsewhere. Caller: AVX-512F+BW+VL; only
    /// the masked-in elements are read.
    unsafe fn load16_mask(p: *const Self, mask: __mmask16) -> __m512;
    /// 8 elements widened to f32. Caller: AVX2, `p..p+8` readable.
    unsafe fn load8(p: *const Self) -> __m256;
    fn to_f32(self) -> f32;
}

impl SimdWeight for f32 {
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load16(p: *const f32) -> __m512 {
        _mm512_loadu_ps(p)
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load16_mask(p: *const f32, mask: __mmask16) -> __m512 {
        _mm512_maskz_loadu_ps(mask, p)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load8(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

impl SimdWeight for bf16 {
    // bf16 → f32 is a 16-bit left shift of the bits: exact.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load16(p: *const bf16) -> __m512 {
        let h = _mm256_loadu_si256(p as *const __m256i);
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load16_mask(p: *const bf16, mask: __mmask16) -> __m512 {
        let h = _mm256_maskz_loadu_epi16(mask, p as *const i16);
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load8(p: *const bf16) -> __m256 {
        let h = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        crate::bf16_to_f32(self)
    }
}

#[inline(always)]
fn tail_mask(n: usize) -> __mmask16 {
    debug_assert!(n < 16);
    ((1u32 << n) - 1) as __mmask16
}

/// `y[j] = w[j,:]·x` for `y.len()` rows of a `[rows, k]` weight (AVX-512), one row after the
/// other with two accumulators. Decode streams the weights from DRAM once per token, and one
/// sequential stream reads ~2.3x faster here than four interleaved rows sharing the `x` loads
/// (20 vs 8.5 GB/s on one core of the 2-core EPYC; `x` stays in L1 anyway).
///
/// # Safety
/// AVX-512F/BW/VL available; `w.len() >= y.len() * x.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn gemv_avx512<W: SimdWeight>(w: &[W], x: &[f32], y: &mut [f32]) {
    let k = x.len();
    let rows = y.len();
    debug_assert!(w.len() >= rows * k);
    let xp = x.as_ptr();
    let wp = w.as_ptr();
    let mut j = 0;
    while j < rows {
        let r = wp.add(j * k);
        let mut a = _mm512_setzero_ps();
        let mut b = _mm512_setzero_ps();
        let mut i = 0;
        while i + 32 <= k {
            a = _mm512_fmadd_ps(W::load16(r.add(i)), _mm512_loadu_ps(xp.add(i)), a);
            b = _mm512_fmadd_ps(W::load16(r.add(i + 16)), _mm512_loadu_ps(xp.add(i + 16)), b);
            i += 32;
        }
        while i < k {
            let m = if k - i >= 16 {
                0xffff
            } else {
                tail_mask(k - i)
            };
            a = _mm512_fmadd_ps(
                W::load16_mask(r.add(i), m),
                _mm512_maskz_loadu_ps(m, xp.add(i)),
                a,
            );
            i += 16;
        }
        *y.get_unchecked_mut(j) = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
        j += 1;
    }
}

/// One `MR x NR` tile of `x · wᵀ` over the whole `k` (AVX-512): `MR * NR` accumulators.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn tile_avx512<W: SimdWeight, const MR: usize, const NR: usize>(
    xs: [*const f32; MR],
    ws: [*const W; NR],
    k: usize,
) -> [[f32; NR]; MR] {
    let mut acc = [[_mm512_setzero_ps(); NR]; MR];
    let mut i = 0;
    while i + 16 <= k {
        let mut wv = [_mm512_setzero_ps(); NR];
        for c in 0..NR {
            wv[c] = W::load16(ws[c].add(i));
        }
        for r in 0..MR {
            let xv = _mm512_loadu_ps(xs[r].add(i));
            for c in 0..NR {
                acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
            }
        }
        i += 16;
    }
    if i < k {
        let m = tail_mask(k - i);
        let mut wv = [_mm512_setzero_ps(); NR];
        for c in 0..NR {
            wv[c] = W::load16_mask(ws[c].add(i), m);
        }
        for r in 0..MR {
            let xv = _mm512_maskz_loadu_ps(m, xs[r].add(i));
            for c in 0..NR {
                acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
            }
        }
    }
    let mut out = [[0f32; NR]; MR];
    for r in 0..MR {
        for c in 0..NR {
            out[r][c] = _mm512_reduce_add_ps(acc[r][c]);
        }
    }
    out
}

/// `y[m, rows] = x[m, k] · w[rows, k]ᵀ` (AVX-512), rows of `y` are `ldy` apart (so a thread can
/// write a column block). Tiles of 4 x-rows × 4 weight rows; each 4-row weight block is swept
/// over every x row while it sits in L1.
///
/// # Safety
/// AVX-512F/BW/VL available; `x.len() >= m * k`, `w.len() >= rows * k`,
/// `yp` writable at `i * ldy + j` for `i < m`, `j < rows`, and no one else
/// reading or writing those elements meanwhile.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn gemm_avx512<W: SimdWeight>(
    x: &[f32],
    w: &[W],
    yp: *mut f32,
    m: usize,
    rows: usize,
    k: usize,
    ldy: usize,
) {
    let (xp, wp) = (x.as_ptr(), w.as_ptr());
    let mut j = 0;
    while j < rows {
        let nr = (rows - j).min(4);
        let mut i = 0;
        while i < m {
            let mr = (m - i).min(4);
            let xr = |t: usize| xp.add((i + t.min(mr - 1)) * k);
            let wr = |t: usize| wp.add((j + t.min(nr - 1)) * k);
            macro_rules! run {
                ($MR:literal, $NR:literal) => {{
                    let o = tile_avx512::<W, $MR, $NR>(
                        core::array::from_fn(xr),
                        core::array::from_fn(wr),
                        k,
                    );
                    for r in 0..$MR {
                        for c in 0..$NR {
                            *yp.add((i + r) * ldy + j + c) = o[r][c];
                        }
                    }
                }};
            }
            match (mr, nr) {
                (4, 4) => run!(4, 4),
                (4, _) => {
                    for c0 in 0..nr {
                        let o = tile_avx512::<W, 4, 1>(
                            core::array::from_fn(xr),
                            [wp.add((j + c0) * k)],
                            k,
                        );
                        for r in 0..4 {
                            *yp.add((i + r) * ldy + j + c0) = o[r][0];
                        }
                    }
                }
                (_, 4) => {
                    for r0 in 0..mr {
                        let o = tile_avx512::<W, 1, 4>(
                            [xp.add((i + r0) * k)],
                            core::array::from_fn(wr),
                            k,
                        );
                        for c in 0..4 {
                            *yp.add((i + r0) * ldy + j + c) = o[0][c];
                        }
                    }
                }
                _ => {
                    for r0 in 0..mr {
                        for c0 in 0..nr {
                            let o = tile_avx512::<W, 1, 1>(
                                [xp.add((i + r0) * k)],
                                [wp.add((j + c0) * k)],
                                k,
                            );
                            *yp.add((i + r0) * ldy + j + c0) = o[0][0];
                        }
                    }
                }
            }
            i += mr;
        }
        j += nr;
    }
}

/// Output columns per packed panel: two AVX-512 vectors.
const PNR: usize = 32;
/// Depth of a packed panel: `PKC x PNR` f32 = 16 KiB, so the panel stays in L1.
const PKC: usize = 128;
/// x rows per micro-kernel call: 12 x 2 accumulators + 2 panel vectors + 1 broadcast (27 of
/// the 32 zmm registers; 12 measured ~5% faster than 8).
const PMR: usize = 12;

/// `y[m, rows] = x[m, k] · w[rows, k]ᵀ` (AVX-512), register-blocked for prefill. Blocks of 32
/// weight rows × 128 of `k` are widened once into an f32 panel laid out `[k][32]` (in L1), and
/// every group of 12 x rows is run over it as an outer product: each x element is broadcast and
/// multiplied into 2 vectors of 16 output columns, so no horizontal sums and no repeated
/// widening. Each output is a plain sequential sum over `k` (f32, the same order whatever the
/// thread split), partial sums going through `y` between `k` blocks.
///
/// # Safety
/// As for [`gemm_avx512`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn gemm_packed_avx512<W: SimdWeight>(
    x: &[f32],
    w: &[W],
    yp: *mut f32,
    m: usize,
    rows: usize,
    k: usize,
    ldy: usize,
) {
    debug_assert!(x.len() >= m * k && w.len() >= rows * k);
    let mut panel = vec![0f32; PKC * PNR];
    let pp = panel.as_mut_ptr();
    let (xp, wp) = (x.as_ptr(), w.as_ptr());
    let mut j = 0;
    while j < rows {
        let nr = (rows - j).min(PNR);
        let mask = |n: usize| {
            if n >= 16 {
                0xffff
            } else {
                tail_mask(n)
            }
        };
        let masks = [mask(nr), mask(nr.saturating_sub(16))];
        let mut kb = 0;
        while kb < k {
            let kc = (k - kb).min(PKC);
            // Pack (widen + transpose): whole 16 x 16 blocks with SIMD, the rest one by one;
            // columns past `nr` are zero (and masked off on store).
            let mut c = 0;
            while c + 16 <= nr {
                let mut p = 0;
                while p + 16 <= kc {
                    // Plain loops, not `array::from_fn`: its closure does not inherit the
                    // target features, so it would not be inlined (a call per load).
                    let mut rows16 = [_mm512_setzero_ps(); 16];
                    for i in 0..16 {
                        rows16[i] = W::load16(wp.add((j + c + i) * k + kb + p));
                    }
                    let t = transpose16(rows16);
                    for q in 0..16 {
                        _mm512_storeu_ps(pp.add((p + q) * PNR + c), t[q]);
                    }
                    p += 16;
                }
                for cc in c..c + 16 {
                    let r = wp.add((j + cc) * k + kb);
                    for p in p..kc {
                        *pp.add(p * PNR + cc) = (*r.add(p)).to_f32();
                    }
                }
                c += 16;
            }
            for c in c..PNR {
                if c < nr {
                    let r = wp.add((j + c) * k + kb);
                    for p in 0..kc {
                        *pp.add(p * PNR + c) = (*r.add(p)).to_f32();
                    }
                } else {
                    for p in 0..kc {
                        *pp.add(p * PNR + c) = 0.0;
                    }
                }
            }
            let mut i = 0;
            while i < m {
                let mr = (m - i).min(PMR);
                let (xs, ys) = (xp.add(i * k + kb), yp.add(i * ldy + j));
                macro_rules! go {
                    ($($R:literal)*) => {
                        match mr {
                            $($R => micro_avx512::<$R>(xs, k, pp, kc, ys, ldy, masks, kb == 0),)*
                            _ => unreachable!(),
                        }
                    };
                }
                go!(1 2 3 4 5 6 7 8 9 10 11 12);
                i += mr;
            }
            kb += kc;
        }
        j += nr;
    }
}

/// The 16 x 16 transpose of `r` (row `i` of the result holds element `i` of every input).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
    // Pairs of rows interleaved within each 128-bit lane, then groups of four rows: u[4g + e]
    // holds, in lane l, element 4l + e of rows 4g..4g + 4.
    let mut t = [_mm512_setzero_ps(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    let mut u = [_mm512_setzero_ps(); 16];
    for g in 0..4 {
        u[4 * g] = _mm512_shuffle_ps::<0x44>(t[4 * g], t[4 * g + 2]);
        u[4 * g + 1] = _mm512_shuffle_ps::<0xEE>(t[4 * g], t[4 * g + 2]);
        u[4 * g + 2] = _mm512_shuffle_ps::<0x44>(t[4 * g + 1], t[4 * g + 3]);
        u[4 * g + 3] = _mm512_shuffle_ps::<0xEE>(t[4 * g + 1], t[4 * g + 3]);
    }
    // Then a 4 x 4 transpose of 128-bit lanes across u[e], u[4 + e], u[8 + e], u[12 + e].
    let mut out = [_mm512_setzero_ps(); 16];
    for e in 0..4 {
        let (a, b, c, d) = (u[e], u[4 + e], u[8 + e], u[12 + e]);
        let v0 = _mm512_shuffle_f32x4::<0x44>(a, b);
        let v1 = _mm512_shuffle_f32x4::<0xEE>(a, b);
        let v2 = _mm512_shuffle_f32x4::<0x44>(c, d);
        let v3 = _mm512_shuffle_f32x4::<0xEE>(c, d);
        out[e] = _mm512_shuffle_f32x4::<0x88>(v0, v2);
        out[4 + e] = _mm512_shuffle_f32x4::<0xDD>(v0, v2);
        out[8 + e] = _mm512_shuffle_f32x4::<0x88>(v1, v3);
        out[12 + e] = _mm512_shuffle_f32x4::<0xDD>(v1, v3);
    }
    out
}

/// `R` x rows (`ldx` apart) × one packed panel (`kc` deep, [`PNR`] wide) added into (or, when
/// `first`, stored to) `R` rows of `y` under `masks`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[allow(clippy::too_many_arguments)]
unsafe fn micro_avx512<const R: usize>(
    x: *const f32,
    ldx: usize,
    panel: *const f32,
    kc: usize,
    y: *mut f32,
    ldy: usize,
    masks: [__mmask16; 2],
    first: bool,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    if !first {
        for r in 0..R {
            for h in 0..2 {
                acc[r][h] = _mm512_maskz_loadu_ps(masks[h], y.add(r * ldy + 16 * h));
            }
        }
    }
    for p in 0..kc {
        let w0 = _mm512_loadu_ps(panel.add(p * PNR));
        let w1 = _mm512_loadu_ps(panel.add(p * PNR + 16));
        for r in 0..R {
            let xb = _mm512_set1_ps(*x.add(r * ldx + p));
            acc[r][0] = _mm512_fmadd_ps(xb, w0, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(xb, w1, acc[r][1]);
        }
    }
    for r in 0..R {
        for h in 0..2 {
            _mm512_mask_storeu_ps(y.add(r * ldy + 16 * h), masks[h], acc[r][h]);
        }
    }
}

/// f32 → bf16 with round-to-nearest-even (as `half::bf16::from_f32`), `x.len() == out.len()`.
///
/// # Safety
/// AVX-512F/BW/VL and AVX512_BF16 available.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(crate) unsafe fn to_bf16_avx512(x: &[f32], out: &mut [bf16]) {
    let n = x.len().min(out.len());
    let mut i = 0;
    while i + 16 <= n {
        let v = _mm512_cvtneps_pbh(_mm512_loadu_ps(x.as_ptr().add(i)));
        _mm256_storeu_si256(
            out.as_mut_ptr().add(i) as *mut __m256i,
            core::mem::transmute::<__m256bh, __m256i>(v),
        );
        i += 16;
    }
    for t in i..n {
        out[t] = bf16::from_f32(x[t]);
    }
}

/// One `MR x NR` tile with `vdpbf16ps`: bf16 activations × bf16 weights, f32 accumulation, two
/// products per f32 lane per instruction (twice the f32 FMA rate).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn tile_dpbf16<const MR: usize, const NR: usize>(
    xs: [*const bf16; MR],
    ws: [*const bf16; NR],
    k: usize,
) -> [[f32; NR]; MR] {
    let mut acc = [[_mm512_setzero_ps(); NR]; MR];
    let mut i = 0;
    while i < k {
        let m: __mmask32 = if k - i >= 32 {
            u32::MAX
        } else {
            (1u32 << (k - i)) - 1
        };
        let mut wv = [_mm512_setzero_si512(); NR];
        for c in 0..NR {
            wv[c] = _mm512_maskz_loadu_epi16(m, ws[c].add(i) as *const i16);
        }
        for r in 0..MR {
            let xv: __m512bh =
                core::mem::transmute(_mm512_maskz_loadu_epi16(m, xs[r].add(i) as *const i16));
            for c in 0..NR {
                acc[r][c] = _mm512_dpbf16_ps(
                    acc[r][c],
                    xv,
                    core::mem::transmute::<__m512i, __m512bh>(wv[c]),
                );
            }
        }
        i += 32;
    }
    let mut out = [[0f32; NR]; MR];
    for r in 0..MR {
        for c in 0..NR {
            out[r][c] = _mm512_reduce_add_ps(acc[r][c]);
        }
    }
    out
}

/// `y[m, rows] = xb[m, k] · w[rows, k]ᵀ` with bf16 activations `xb` (see [`tile_dpbf16`]).
///
/// # Safety
/// AVX-512F/BW/VL and AVX512_BF16 available; lengths as for [`gemm_avx512`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(crate) unsafe fn gemm_dpbf16(
    xb: &[bf16],
    w: &[bf16],
    yp: *mut f32,
    m: usize,
    rows: usize,
    k: usize,
    ldy: usize,
) {
    let (xp, wp) = (xb.as_ptr(), w.as_ptr());
    let mut j = 0;
    while j < rows {
        let nr = (rows - j).min(4);
        let mut i = 0;
        while i < m {
            let mr = (m - i).min(4);
            if mr == 4 && nr == 4 {
                let o = tile_dpbf16::<4, 4>(
                    core::array::from_fn(|t| xp.add((i + t) * k)),
                    core::array::from_fn(|t| wp.add((j + t) * k)),
                    k,
                );
                for r in 0..4 {
                    for c in 0..4 {
                        *yp.add((i + r) * ldy + j + c) = o[r][c];
                    }
                }
            } else {
                for r0 in 0..mr {
                    for c0 in 0..nr {
                        let o =
                            tile_dpbf16::<1, 1>([xp.add((i + r0) * k)], [wp.add((j + c0) * k)], k);
                        *yp.add((i + r0) * ldy + j + c0) = o[0][0];
                    }
                }
            }
            i += mr;
        }
        j += nr;
    }
}

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn hsum256(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
    _mm_cvtss_f32(s)
}

/// [`gemv_avx512`] for AVX2+FMA: four rows share each load of `x`, scalar tail.
///
/// # Safety
/// AVX2 and FMA available; `w.len() >= y.len() * x.len()`.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn gemv_avx2<W: SimdWeight>(w: &[W], x: &[f32], y: &mut [f32]) {
    let k = x.len();
    let rows = y.len();
    debug_assert!(w.len() >= rows * k);
    let xp = x.as_ptr();
    let wp = w.as_ptr();
    let k8 = k - k % 8;
    let mut j = 0;
    while j < rows {
        let nr = (rows - j).min(4);
        let r: [*const W; 4] = core::array::from_fn(|t| wp.add((j + t.min(nr - 1)) * k));
        let mut a = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i < k8 {
            let xv = _mm256_loadu_ps(xp.add(i));
            for t in 0..4 {
                a[t] = _mm256_fmadd_ps(W::load8(r[t].add(i)), xv, a[t]);
            }
            i += 8;
        }
        for t in 0..nr {
            let mut s = hsum256(a[t]);
            for i in k8..k {
                s += (*r[t].add(i)).to_f32() * *xp.add(i);
            }
            *y.get_unchecked_mut(j + t) = s;
        }
        j += nr;
    }
}

/// [`gemm_avx512`] for AVX2+FMA: tiles of 2 x-rows × 4 weight rows, scalar tail.
///
/// # Safety
/// AVX2 and FMA available; lengths as for [`gemm_avx512`].
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn gemm_avx2<W: SimdWeight>(
    x: &[f32],
    w: &[W],
    yp: *mut f32,
    m: usize,
    rows: usize,
    k: usize,
    ldy: usize,
) {
    let (xp, wp) = (x.as_ptr(), w.as_ptr());
    let k8 = k - k % 8;
    let mut j = 0;
    while j < rows {
        let nr = (rows - j).min(4);
        let ws: [*const W; 4] = core::array::from_fn(|t| wp.add((j + t.min(nr - 1)) * k));
        let mut i = 0;
        while i < m {
            let mr = (m - i).min(2);
            let xs: [*const f32; 2] = core::array::from_fn(|t| xp.add((i + t.min(mr - 1)) * k));
            let mut acc = [[_mm256_setzero_ps(); 4]; 2];
            let mut p = 0;
            while p < k8 {
                let wv: [__m256; 4] = core::array::from_fn(|c| W::load8(ws[c].add(p)));
                for r in 0..2 {
                    let xv = _mm256_loadu_ps(xs[r].add(p));
                    for c in 0..4 {
                        acc[r][c] = _mm256_fmadd_ps(xv, wv[c], acc[r][c]);
                    }
                }
                p += 8;
            }
            for r in 0..mr {
                for c in 0..nr {
                    let mut s = hsum256(acc[r][c]);
                    for p in k8..k {
                        s += *xs[r].add(p) * (*ws[c].add(p)).to_f32();
                    }
                    *yp.add((i + r) * ldy + j + c) = s;
                }
            }
            i += mr;
        }
        j += nr;
    }
}
