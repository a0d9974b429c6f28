//! Compute kernels for the Qwen2 runtime. f32 activations and accumulation throughout.
//!
//! Weights arrive row-major `[out, in]` (the Hugging Face layout), f32 or bf16 ([`Weight`]), and
//! are laid out once at load in 32-row panels ([`PackedWeight`]) that the products stream front
//! to back. The products pick an instruction set once at run time ([`isa`]): AVX-512 (F+BW+VL),
//! AVX2+FMA, or portable loops; the row-major loops in [`portable`] are the reference the tests
//! compare every path against. bf16 weights are widened to f32 exactly (a shift), so every path
//! computes the same products and differs only in summation order. The one exception is opt-in: [`set_bf16_dot`] lets the
//! prefill GEMM round the activations to bf16 and use `vdpbf16ps` (twice the rate, ~3
//! significant digits per activation).
//!
//! Products split their panels over a persistent per-process thread pool ([`threads`]).
//!
//! **Where to start reading.** [`PackedWeight`] (the weight layout, [`packed`]) and
//! [`matmul`] (the product the model calls); then `x86` for the SIMD paths and [`portable`] for
//! the reference loops; [`Screen`] is the int8 screen that finds the argmax of the LM head
//! without computing every logit. Weight storage is fallible ([`AllocError`]).

#![deny(unsafe_op_in_unsafe_fn)]

use std::ops::Range;
use std::sync::atomic::{AtomicU8, Ordering};

use half::bf16;

pub use packed::{AllocError, PackedDtype, PackedWeight, PANEL};
pub use screen::{argmax_screened, Screen, ScreenScratch, Screened};

pub mod cu_params;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod packed;
pub mod pool;
pub mod portable;
pub mod roofline;
pub mod screen;
pub mod skips;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use portable::{add_bias, add_inplace, bf16_to_f32, dot, rmsnorm, rope, Weight};

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
/// Splits `panels` weight panels into per-thread contiguous ranges and runs `f(range)` on each;
/// small products run on the calling thread alone.
fn split_panels(panels: usize, work: usize, f: &(dyn Fn(Range<usize>) + Sync)) {
    // Below this many multiply-adds a product is not worth waking other threads for.
    const MIN_WORK: usize = 1 << 15;
    let p = pool::pool();
    let t = p.threads().min(panels).min(work / MIN_WORK).max(1);
    if t == 1 {
        return f(0..panels);
    }
    let chunk = panels.div_ceil(t);
    p.run(t, &|i| {
        let r = (i * chunk).min(panels)..((i + 1) * chunk).min(panels);
        if !r.is_empty() {
            f(r)
        }
    });
}

/// A mutable pointer that threads writing disjoint ranges may share.
#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);
// SAFETY: users write disjoint index ranges only (split_panels' ranges are disjoint, and a
// panel's output rows belong to that panel alone).
unsafe impl Sync for SyncPtr {}
unsafe impl Send for SyncPtr {}

/// `y = x · wᵀ`: `x` is `[m, k]`, `w` is `[n, k]` (packed), `y` is `[m, n]`. One x row is the
/// decode GEMV; more rows are the prefill GEMM.
pub fn matmul(x: &[f32], w: &PackedWeight, y: &mut [f32], m: usize) {
    matmul_with(isa(), x, w, y, m)
}

/// [`matmul`] on a given path (tests and benchmarks); panics if the CPU lacks it.
pub fn matmul_with(isa: Isa, x: &[f32], w: &PackedWeight, y: &mut [f32], m: usize) {
    let (n, k) = (w.rows(), w.cols());
    assert_eq!(x.len(), m * k, "matmul: x is not [{m}, {k}]");
    assert_eq!(y.len(), m * n, "matmul: y is not [{m}, {n}]");
    assert!(
        isa.supported(),
        "matmul: this CPU cannot run {}",
        isa.name()
    );
    if k == 0 {
        y.fill(0.0);
        return;
    }
    let yp = SyncPtr(y.as_mut_ptr());
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 && m > 1 && w.dtype() == PackedDtype::BF16 && bf16_dot() {
        let words = w.row_words();
        let mut xw = vec![0u32; m * words];
        // SAFETY: set_bf16_dot only turns this on when the CPU has AVX512_BF16; `xw` is
        // `[m, words]` with `2 * words >= k`.
        unsafe { x86::to_bf16_words(x, k, &mut xw, words) };
        split_panels(w.panels(), m * n * k, &|r| {
            // SAFETY: AVX512_BF16 checked above; `y` is `[m, n]` and this call writes only the
            // output rows of panels `r`, disjoint from other calls.
            unsafe { x86::gemm_avx512(w, r, x86::Activations::Bf16Words(&xw), m, { yp }.0, n) };
        });
        return;
    }
    split_panels(w.panels(), m * n * k, &|r| {
        // SAFETY: as above, for the path `isa`, which was asserted supported.
        unsafe { panels_with(isa, w, r, x, m, { yp }.0, n) };
    });
}

/// The rows of `panels` of `y = x · wᵀ` for one x row (`y` is `[n]`; other rows are left as
/// they are), bit for bit what [`matmul`] writes there.
pub(crate) fn matmul_panels(x: &[f32], w: &PackedWeight, panels: Range<usize>, y: &mut [f32]) {
    assert!(x.len() == w.cols() && y.len() == w.rows() && panels.end <= w.panels());
    if w.cols() == 0 {
        return y.fill(0.0);
    }
    // SAFETY: isa() is supported by construction; `y` is `[1, n]` and ours alone.
    unsafe { panels_with(isa(), w, panels, x, 1, y.as_mut_ptr(), w.rows()) }
}

/// Output rows of `panels` for all `m` x rows.
///
/// # Safety
/// `isa` is supported; `y` (`[m, ldy]`) is writable at the output rows of `panels` by this call
/// alone.
unsafe fn panels_with(
    isa: Isa,
    w: &PackedWeight,
    panels: Range<usize>,
    x: &[f32],
    m: usize,
    y: *mut f32,
    ldy: usize,
) {
    let k = w.cols();
    #[cfg(target_arch = "x86_64")]
    // SAFETY: forwarded from this function's contract; `x` is `[m, k]` (asserted by the caller).
    unsafe {
        match (isa, m) {
            (Isa::Avx512, 1) => return x86::gemv_avx512(w, panels, x, y),
            (Isa::Avx512, _) => {
                return x86::gemm_avx512(w, panels, x86::Activations::F32(x), m, y, ldy)
            }
            (Isa::Avx2, 1) => return x86::gemv_avx2(w, panels, x, y),
            (Isa::Avx2, _) => return x86::gemm_avx2(w, panels, x, m, y, ldy),
            _ => {}
        }
    }
    for p in panels {
        let c0 = p * PANEL;
        let valid = (w.rows() - c0).min(PANEL);
        for i in 0..m {
            // SAFETY: row `i`'s outputs `c0..c0 + valid` are ours (contract above).
            let yi = unsafe { std::slice::from_raw_parts_mut(y.add(i * ldy + c0), valid) };
            packed::panel_dot(w, p, &x[i * k..(i + 1) * k], yi);
        }
    }
}

/// `gate = silu(gate) · up` elementwise; `silu(v) = v / (1 + e^-v)`.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len());
    #[cfg(target_arch = "x86_64")]
    if isa() == Isa::Avx512 {
        // SAFETY: the CPU has AVX-512 (isa() checked it); the lengths are equal.
        return unsafe { x86::silu_mul_avx512(gate, up) };
    }
    portable::silu_mul(gate, up)
}

/// Numerically stable softmax in place.
pub fn softmax(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa() == Isa::Avx512 {
        // SAFETY: the CPU has AVX-512 (isa() checked it).
        return unsafe { x86::softmax_avx512(x) };
    }
    portable::softmax(x)
}

/// Attention of one query head over `len` cached positions: `out = softmax(q·Kᵀ·scale)·V`.
/// `k` and `v` are `[len, d]` (post-RoPE keys, values, read in place from the cache); `scores`
/// is scratch of at least `len`. The caller passes only the positions the query may see.
pub fn attend(q: &[f32], k: &[f32], v: &[f32], scale: f32, scores: &mut [f32], out: &mut [f32]) {
    let d = q.len();
    let len = k.len() / d.max(1);
    assert!(k.len() == len * d && v.len() == len * d && out.len() == d && scores.len() >= len);
    #[cfg(target_arch = "x86_64")]
    if isa() == Isa::Avx512 && d > 0 {
        // SAFETY: the CPU has AVX-512 (isa() checked it); lengths asserted above.
        return unsafe { x86::attend_avx512(q, k, v, scale, scores, out) };
    }
    portable::attend(q, k, v, scale, scores, out)
}

/// Causal (GQA) attention of `m` query tokens at positions `start..start + m`: `q` and `out`
/// are `[m, heads, d]`, query head `h` reads KV head `kv_of[h]` of the cache (`keys[j]`,
/// `values[j]`: `[positions, d]`, read in place), and token `t` sees cached positions
/// `0..=start + t`. Several tokens are spread over the pool's threads (each with its
/// own scores); one token (decode) runs here with the caller's `scores` (`start + m` long), so
/// decode does not allocate.
#[allow(clippy::too_many_arguments)]
pub fn causal_attention(
    q: &[f32],
    keys: &[Vec<f32>],
    values: &[Vec<f32>],
    kv_of: &[usize],
    d: usize,
    start: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let heads = kv_of.len();
    let m = q.len() / (heads * d).max(1);
    assert!(q.len() == m * heads * d && out.len() == q.len() && scores.len() >= start + m);
    let one = |pair: usize, scores: &mut [f32], out: &mut [f32]| {
        let (t, h) = (pair / heads, pair % heads);
        let len = start + t + 1;
        let j = kv_of[h];
        let s = pair * d;
        attend(
            &q[s..s + d],
            &keys[j][..len * d],
            &values[j][..len * d],
            scale,
            scores,
            out,
        );
    };
    let p = pool::pool();
    let threads = p.threads().min(m * heads);
    if m == 1 || threads == 1 {
        for (pair, o) in out.chunks_exact_mut(d.max(1)).enumerate() {
            one(pair, scores, o);
        }
        return;
    }
    let op = SyncPtr(out.as_mut_ptr());
    // Pairs dealt round-robin, so every thread gets early (short) and late (long) tokens.
    p.run(threads, &|i| {
        let mut sc = vec![0f32; start + m];
        for pair in (i..m * heads).step_by(threads) {
            // SAFETY: pair `pair` owns out[pair * d..(pair + 1) * d]; pairs are dealt to one
            // thread each.
            let o = unsafe { std::slice::from_raw_parts_mut({ op }.0.add(pair * d), d) };
            one(pair, &mut sc, o);
        }
    });
}

#[cfg(test)]
mod tests;
