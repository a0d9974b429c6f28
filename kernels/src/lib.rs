//! Compute kernels for the Qwen2 runtime. f32 activations and accumulation throughout.
//!
//! Weights are row-major `[out, in]` (the Hugging Face layout), f32 or bf16 ([`Weight`]). The
//! matrix products pick an instruction set once at run time ([`isa`]): AVX-512 (F+BW+VL), AVX2+FMA,
//! or the portable loops in [`portable`], which are the reference the tests compare against.
//! bf16 weights are widened to f32 exactly (a shift), so every path computes the same products
//! and differs only in summation order. The one exception is opt-in: [`set_bf16_dot`] lets the
//! prefill GEMM round the activations to bf16 and use `vdpbf16ps` (twice the rate, ~3
//! significant digits per activation).
//!
//! Products split their output rows over a persistent per-process thread pool ([`threads`]).

use std::sync::atomic::{AtomicU8, Ordering};

use half::bf16;

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod pool;
pub mod portable;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use portable::{
    add_bias, add_inplace, attend, bf16_to_f32, dot, rmsnorm, rope, silu_mul, softmax, Weight,
};

/// A weight slice as one of the concrete element types.
#[derive(Clone, Copy, Debug)]
pub enum WeightSlice<'a> {
    F32(&'a [f32]),
    BF16(&'a [bf16]),
}

/// An instruction-set path for the matrix products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Portable = 1,
    Avx2 = 2,
    Avx512 = 3,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2+fma",
            Isa::Avx512 => "avx512",
        }
    }

    /// Whether this CPU can run the path.
    pub fn supported(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Every path this CPU supports, best last.
    pub fn all_supported() -> Vec<Isa> {
        [Isa::Portable, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|i| i.supported())
            .collect()
    }

    /// The best supported path, unless `TPRUN_ISA` (portable, avx2, avx512) names a supported one.
    fn detect() -> Isa {
        let want = std::env::var("TPRUN_ISA").ok();
        let all = Isa::all_supported();
        if let Some(w) = want {
            if let Some(i) = all.iter().find(|i| i.name().starts_with(w.trim())) {
                return *i;
            }
        }
        *all.last().unwrap_or(&Isa::Portable)
    }
}

static ISA: AtomicU8 = AtomicU8::new(0);

/// The path the products use, detected once and cached.
pub fn isa() -> Isa {
    match ISA.load(Ordering::Relaxed) {
        1 => Isa::Portable,
        2 => Isa::Avx2,
        3 => Isa::Avx512,
        _ => {
            let i = Isa::detect();
            ISA.store(i as u8, Ordering::Relaxed);
            i
        }
    }
}

/// Whether this CPU has AVX512_BF16 dot products (`vdpbf16ps`).
pub fn has_bf16_dot() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        Isa::Avx512.supported() && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// 0: not decided yet, 1: off, 2: on.
static BF16_DOT: AtomicU8 = AtomicU8::new(0);

/// Lets [`matmul`] with bf16 weights and more than one row use `vdpbf16ps` on bf16-rounded
/// activations when the CPU has it (off by default: it trades accuracy for prefill speed; the
/// environment variable `TPRUN_BF16_DOT=1` turns it on at start). Returns whether it is now on.
pub fn set_bf16_dot(on: bool) -> bool {
    let on = on && has_bf16_dot();
    BF16_DOT.store(if on { 2 } else { 1 }, Ordering::Relaxed);
    on
}

/// Whether [`matmul`] uses `vdpbf16ps` (see [`set_bf16_dot`]).
pub fn bf16_dot() -> bool {
    match BF16_DOT.load(Ordering::Relaxed) {
        0 => set_bf16_dot(std::env::var("TPRUN_BF16_DOT").is_ok_and(|v| v.trim() == "1")),
        v => v == 2,
    }
}

/// Threads the products use in this process (see [`pool`]).
pub fn threads() -> usize {
    pool::pool().threads()
}

/// Splits `rows` output rows into per-thread chunks of a multiple of 4 (the kernels' tile) and
/// runs `f(range)` on each; small products run on the calling thread alone.
fn split_rows(rows: usize, work: usize, f: &(dyn Fn(std::ops::Range<usize>) + Sync)) {
    // Below this many multiply-adds a product is not worth waking other threads for.
    const MIN_WORK: usize = 1 << 15;
    let p = pool::pool();
    let t = p
        .threads()
        .min(rows.div_ceil(4))
        .min(work / MIN_WORK)
        .max(1);
    if t == 1 {
        return f(0..rows);
    }
    let chunk = rows.div_ceil(t).next_multiple_of(4);
    p.run(t, &|i| {
        let r = (i * chunk).min(rows)..((i + 1) * chunk).min(rows);
        if !r.is_empty() {
            f(r)
        }
    });
}

/// A mutable pointer that threads writing disjoint ranges may share.
#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);
// SAFETY: users write disjoint index ranges only (split_rows' ranges are disjoint).
unsafe impl Sync for SyncPtr {}
unsafe impl Send for SyncPtr {}

/// `y[j] = Σ_i w[j, i]·x[i]`: `w` is `[n, k]` row-major, `x` is `[k]`, `y` is `[n]`.
pub fn matvec<W: Weight>(w: &[W], x: &[f32], y: &mut [f32]) {
    matvec_with(isa(), w, x, y)
}

/// [`matvec`] on a given path (tests and benchmarks); panics if the CPU lacks it.
pub fn matvec_with<W: Weight>(isa: Isa, w: &[W], x: &[f32], y: &mut [f32]) {
    let (n, k) = (y.len(), x.len());
    assert_eq!(w.len(), n * k, "matvec: weight is not [{n}, {k}]");
    assert!(
        isa.supported(),
        "matvec: this CPU cannot run {}",
        isa.name()
    );
    if isa == Isa::Portable || k == 0 {
        return portable::matvec(w, x, y);
    }
    let yp = SyncPtr(y.as_mut_ptr());
    let ws = W::as_weights(w);
    split_rows(n, n * k, &|r| {
        // SAFETY: `r` is within 0..n and the ranges of different calls are disjoint.
        let y = unsafe { std::slice::from_raw_parts_mut({ yp }.0.add(r.start), r.len()) };
        gemv_rows(isa, ws, x, y, r.start, k);
    });
}

fn gemv_rows(isa: Isa, w: WeightSlice, x: &[f32], y: &mut [f32], row0: usize, k: usize) {
    let rows = row0 * k..(row0 + y.len()) * k;
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `isa.supported()` was asserted; the weight slice is exactly `[y.len(), k]`.
    unsafe {
        match (isa, w) {
            (Isa::Avx512, WeightSlice::F32(w)) => return x86::gemv_avx512(&w[rows], x, y),
            (Isa::Avx512, WeightSlice::BF16(w)) => return x86::gemv_avx512(&w[rows], x, y),
            (Isa::Avx2, WeightSlice::F32(w)) => return x86::gemv_avx2(&w[rows], x, y),
            (Isa::Avx2, WeightSlice::BF16(w)) => return x86::gemv_avx2(&w[rows], x, y),
            _ => {}
        }
    }
    match w {
        WeightSlice::F32(w) => portable::matvec(&w[rows], x, y),
        WeightSlice::BF16(w) => portable::matvec(&w[rows], x, y),
    }
}

/// `y = x · wᵀ`: `x` is `[m, k]`, `w` is `[n, k]` (row-major `[out, in]`), `y` is `[m, n]`.
pub fn matmul<W: Weight>(x: &[f32], w: &[W], y: &mut [f32], m: usize, n: usize, k: usize) {
    matmul_with(isa(), x, w, y, m, n, k)
}

/// [`matmul`] on a given path (tests and benchmarks); panics if the CPU lacks it.
pub fn matmul_with<W: Weight>(
    isa: Isa,
    x: &[f32],
    w: &[W],
    y: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
) {
    assert_eq!(x.len(), m * k, "matmul: x is not [{m}, {k}]");
    assert_eq!(w.len(), n * k, "matmul: weight is not [{n}, {k}]");
    assert_eq!(y.len(), m * n, "matmul: y is not [{m}, {n}]");
    assert!(
        isa.supported(),
        "matmul: this CPU cannot run {}",
        isa.name()
    );
    if m == 1 {
        return matvec_with(isa, w, x, y);
    }
    if isa == Isa::Portable || k == 0 {
        return portable::matmul(x, w, y, m, n, k);
    }
    let ws = W::as_weights(w);
    let yp = SyncPtr(y.as_mut_ptr());
    #[cfg(target_arch = "x86_64")]
    if let (Isa::Avx512, WeightSlice::BF16(wb), true) = (isa, ws, bf16_dot()) {
        let mut xb = vec![bf16::ZERO; m * k];
        // SAFETY: set_bf16_dot only turns this on when the CPU has AVX512_BF16.
        unsafe { x86::to_bf16_avx512(x, &mut xb) };
        split_rows(n, m * n * k, &|r| {
            let w = &wb[r.start * k..r.end * k];
            // SAFETY: AVX512_BF16 checked above; `y` rows are `n` apart and this call writes
            // columns `r` only, disjoint from other calls; `xb` is `[m, k]`, `w` is `[r.len(), k]`.
            unsafe { x86::gemm_dpbf16(&xb, w, { yp }.0.add(r.start), m, r.len(), k, n) };
        });
        return;
    }
    split_rows(n, m * n * k, &|r| {
        // SAFETY: `y` is `[m, n]`; this call writes columns `r` only, disjoint from other calls.
        unsafe { gemm_cols(isa, ws, x, { yp }.0.add(r.start), m, r, k, n) };
    });
}

/// From this many x rows on, the AVX-512 GEMM packs weight panels (their widening and transpose
/// then costs less than the products they feed).
const PACKED_MIN_ROWS: usize = 4;

/// Columns `cols` of `y = x · wᵀ`, `yp` pointing at column `cols.start` of row 0.
///
/// # Safety
/// `yp.add(i * ldy + j)` is writable for `i < m`, `j < cols.len()`, by this call alone.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_cols(
    isa: Isa,
    w: WeightSlice,
    x: &[f32],
    yp: *mut f32,
    m: usize,
    cols: std::ops::Range<usize>,
    k: usize,
    ldy: usize,
) {
    let n = cols.len();
    let span = cols.start * k..cols.end * k;
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `isa.supported()` was asserted by the caller; `x` is `[m, k]`, the weight slice
    // `[n, k]`, `yp` as this function's contract says.
    unsafe {
        match (isa, w) {
            (Isa::Avx512, WeightSlice::F32(w)) if m >= PACKED_MIN_ROWS => {
                return x86::gemm_packed_avx512(x, &w[span], yp, m, n, k, ldy)
            }
            (Isa::Avx512, WeightSlice::F32(w)) => {
                return x86::gemm_avx512(x, &w[span], yp, m, n, k, ldy)
            }
            (Isa::Avx512, WeightSlice::BF16(w)) if m >= PACKED_MIN_ROWS => {
                return x86::gemm_packed_avx512(x, &w[span], yp, m, n, k, ldy)
            }
            (Isa::Avx512, WeightSlice::BF16(w)) => {
                return x86::gemm_avx512(x, &w[span], yp, m, n, k, ldy)
            }
            (Isa::Avx2, WeightSlice::F32(w)) => {
                return x86::gemm_avx2(x, &w[span], yp, m, n, k, ldy)
            }
            (Isa::Avx2, WeightSlice::BF16(w)) => {
                return x86::gemm_avx2(x, &w[span], yp, m, n, k, ldy)
            }
            _ => {}
        }
    }
    // Portable: one x row at a time.
    for i in 0..m {
        // SAFETY: row `i`'s `n` columns are ours (contract above).
        let yi = unsafe { std::slice::from_raw_parts_mut(yp.add(i * ldy), n) };
        let xi = &x[i * k..(i + 1) * k];
        match w {
            WeightSlice::F32(w) => portable::matvec(&w[span.clone()], xi, yi),
            WeightSlice::BF16(w) => portable::matvec(&w[span.clone()], xi, yi),
        }
    }
}

#[cfg(test)]
mod tests;
