//! Compute kernels for the Qwen2 runtime. f32 activations and accumulation throughout.
//!
//! Every function here is the portable reference: plain loops written so that the compiler can
//! auto-vectorise them (several independent accumulators in the dot products). Weights are
//! row-major `[out, in]` (the Hugging Face layout), either f32 or bf16 ([`Weight`]); a SIMD
//! implementation can replace the bodies without changing these signatures.

use half::bf16;

#[cfg(feature = "cuda")]
pub mod cuda;

/// Independent accumulators in a dot product: lets the compiler keep a vector register per lane
/// instead of a serial chain of adds. Fixed, so results do not depend on the build.
const LANES: usize = 16;

/// A weight element type: stored as itself, widened to f32 for compute.
pub trait Weight: Copy + Send + Sync + 'static {
    /// Σ w[i]·x[i] with f32 accumulation. `w.len() == x.len()`.
    fn dot(w: &[Self], x: &[f32]) -> f32;
    /// Widens `w` into `out` (same length).
    fn widen(w: &[Self], out: &mut [f32]);
}

impl Weight for f32 {
    fn dot(w: &[f32], x: &[f32]) -> f32 {
        dot(w, x)
    }
    fn widen(w: &[f32], out: &mut [f32]) {
        out.copy_from_slice(w);
    }
}

impl Weight for bf16 {
    fn dot(w: &[bf16], x: &[f32]) -> f32 {
        assert_eq!(w.len(), x.len());
        let mut acc = [0f32; LANES];
        let wc = w.chunks_exact(LANES);
        let xc = x.chunks_exact(LANES);
        let (wr, xr) = (wc.remainder(), xc.remainder());
        for (wv, xv) in wc.zip(xc) {
            for l in 0..LANES {
                acc[l] += bf16_to_f32(wv[l]) * xv[l];
            }
        }
        let mut tail = 0f32;
        for (a, b) in wr.iter().zip(xr) {
            tail += bf16_to_f32(*a) * b;
        }
        sum_lanes(&acc) + tail
    }
    fn widen(w: &[bf16], out: &mut [f32]) {
        assert_eq!(w.len(), out.len());
        for (o, v) in out.iter_mut().zip(w) {
            *o = bf16_to_f32(*v);
        }
    }
}

/// bf16 → f32 is a shift of the bits (exact), written out so it vectorises.
#[inline(always)]
pub fn bf16_to_f32(v: bf16) -> f32 {
    f32::from_bits((v.to_bits() as u32) << 16)
}

#[inline(always)]
fn sum_lanes(acc: &[f32; LANES]) -> f32 {
    // Pairwise, so the rounding does not depend on vector width.
    let mut a = *acc;
    let mut n = LANES;
    while n > 1 {
        n /= 2;
        for i in 0..n {
            a[i] += a[i + n];
        }
    }
    a[0]
}

/// Σ a[i]·b[i] in f32.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut acc = [0f32; LANES];
    let ac = a.chunks_exact(LANES);
    let bc = b.chunks_exact(LANES);
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (av, bv) in ac.zip(bc) {
        for l in 0..LANES {
            acc[l] += av[l] * bv[l];
        }
    }
    let mut tail = 0f32;
    for (x, y) in ar.iter().zip(br) {
        tail += x * y;
    }
    sum_lanes(&acc) + tail
}

/// `y[j] = Σ_i w[j, i]·x[i]`: `w` is `[n, k]` row-major, `x` is `[k]`, `y` is `[n]`.
pub fn matvec<W: Weight>(w: &[W], x: &[f32], y: &mut [f32]) {
    let k = x.len();
    assert_eq!(
        w.len(),
        y.len() * k,
        "matvec: weight is not [{}, {k}]",
        y.len()
    );
    if k == 0 {
        y.fill(0.0);
        return;
    }
    for (yj, row) in y.iter_mut().zip(w.chunks_exact(k)) {
        *yj = W::dot(row, x);
    }
}

/// `y = x · wᵀ`: `x` is `[m, k]`, `w` is `[n, k]` (row-major `[out, in]`), `y` is `[m, n]`.
///
/// Each weight row is widened once and then dotted with every row of `x`, so a prefill of `m`
/// tokens reads the weights once instead of `m` times. The result for row `i` is bit-identical to
/// `matvec` on that row alone.
pub fn matmul<W: Weight>(x: &[f32], w: &[W], y: &mut [f32], m: usize, n: usize, k: usize) {
    assert_eq!(x.len(), m * k, "matmul: x is not [{m}, {k}]");
    assert_eq!(w.len(), n * k, "matmul: weight is not [{n}, {k}]");
    assert_eq!(y.len(), m * n, "matmul: y is not [{m}, {n}]");
    if m == 1 {
        return matvec(w, x, y);
    }
    if k == 0 {
        y.fill(0.0);
        return;
    }
    // Widen a block of weight rows once, then sweep every x row over the block: x is re-read
    // n / ROW_BLOCK times instead of n times, and the widened block stays in cache.
    const ROW_BLOCK: usize = 8;
    let mut block = vec![0f32; ROW_BLOCK * k];
    for (b, wblock) in w.chunks(ROW_BLOCK * k).enumerate() {
        let rows = wblock.len() / k;
        W::widen(wblock, &mut block[..rows * k]);
        for i in 0..m {
            let xi = &x[i * k..(i + 1) * k];
            let yi = &mut y[i * n + b * ROW_BLOCK..i * n + b * ROW_BLOCK + rows];
            for (yj, wrow) in yi.iter_mut().zip(block.chunks_exact(k)) {
                *yj = dot(wrow, xi);
            }
        }
    }
}

/// Adds `bias` (`[n]`) to every row of `y` (`[m, n]`).
pub fn add_bias(y: &mut [f32], bias: &[f32]) {
    for row in y.chunks_exact_mut(bias.len()) {
        for (v, b) in row.iter_mut().zip(bias) {
            *v += b;
        }
    }
}

/// `a += b` elementwise (the residual connection).
pub fn add_inplace(a: &mut [f32], b: &[f32]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
}

/// RMSNorm of each row of `x` (`[m, weight.len()]`) into `out`, as transformers computes it in
/// f32: `weight * (x * rsqrt(mean(x²) + eps))`.
pub fn rmsnorm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let h = weight.len();
    assert_eq!(x.len(), out.len());
    assert_eq!(x.len() % h.max(1), 0);
    for (xr, or) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
        let mean = dot(xr, xr) / h as f32;
        let inv = 1.0 / (mean + eps).sqrt();
        for ((o, v), w) in or.iter_mut().zip(xr).zip(weight) {
            *o = w * (v * inv);
        }
    }
}

/// Rotary embedding, "rotate half" (NeoX) form, in place on one head vector `x` (`[d]`):
/// `x' = x·cos + rotate_half(x)·sin` with `rotate_half(x) = cat(-x[d/2..], x[..d/2])`.
/// `cos` and `sin` are the `[d]` rows for this position (the halves repeat).
pub fn rope(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let d = x.len();
    let half = d / 2;
    assert!(cos.len() == d && sin.len() == d && d.is_multiple_of(2));
    for i in 0..half {
        let (a, b) = (x[i], x[i + half]);
        x[i] = a * cos[i] - b * sin[i];
        x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

/// `gate = silu(gate) * up` elementwise; `silu(v) = v / (1 + e^-v)`.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len());
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// Numerically stable softmax in place.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// Attention of one query head over `len` cached positions: `out = softmax(q·Kᵀ·scale)·V`.
/// `k` and `v` are `[len, d]` (post-RoPE keys, values); `scores` is scratch of at least `len`.
/// The caller passes only the positions the query may see (causality is the caller's slice).
pub fn attend(q: &[f32], k: &[f32], v: &[f32], scale: f32, scores: &mut [f32], out: &mut [f32]) {
    let d = q.len();
    let len = k.len() / d.max(1);
    assert!(k.len() == len * d && v.len() == len * d && out.len() == d && scores.len() >= len);
    let scores = &mut scores[..len];
    for (s, kr) in scores.iter_mut().zip(k.chunks_exact(d)) {
        *s = dot(q, kr) * scale;
    }
    softmax(scores);
    out.fill(0.0);
    for (p, vr) in scores.iter().zip(v.chunks_exact(d)) {
        for (o, x) in out.iter_mut().zip(vr) {
            *o += p * x;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
    }

    fn data(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn dot_matches_f64_for_odd_lengths() {
        for n in [0, 1, 7, 16, 17, 63, 100, 257] {
            let (a, b) = (data(n, 1), data(n, 2));
            assert!(
                (dot(&a, &b) as f64 - naive_dot(&a, &b)).abs() < 1e-4,
                "n={n}"
            );
            let wb: Vec<bf16> = a.iter().map(|v| bf16::from_f32(*v)).collect();
            let wf: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
            assert!((bf16::dot(&wb, &b) as f64 - naive_dot(&wf, &b)).abs() < 1e-4);
        }
    }

    #[test]
    fn matmul_rows_equal_matvec() {
        let (m, n, k) = (5, 9, 37);
        let x = data(m * k, 3);
        let w = data(n * k, 4);
        let wb: Vec<bf16> = w.iter().map(|v| bf16::from_f32(*v)).collect();
        let mut y = vec![0f32; m * n];
        let mut yb = vec![0f32; m * n];
        matmul(&x, &w, &mut y, m, n, k);
        matmul(&x, &wb, &mut yb, m, n, k);
        for i in 0..m {
            let mut r = vec![0f32; n];
            matvec(&w, &x[i * k..(i + 1) * k], &mut r);
            assert_eq!(&y[i * n..(i + 1) * n], &r[..]);
            matvec(&wb, &x[i * k..(i + 1) * k], &mut r);
            assert_eq!(&yb[i * n..(i + 1) * n], &r[..]);
            for j in 0..n {
                let e = naive_dot(&x[i * k..(i + 1) * k], &w[j * k..(j + 1) * k]);
                assert!((y[i * n + j] as f64 - e).abs() < 1e-4);
            }
        }
    }

    #[test]
    fn rmsnorm_unit_rms() {
        let x = data(64, 5);
        let w = vec![2.0f32; 32];
        let mut out = vec![0f32; 64];
        rmsnorm(&x, &w, 0.0, &mut out);
        for row in out.chunks(32) {
            let ms: f32 = row.iter().map(|v| v * v).sum::<f32>() / 32.0;
            assert!((ms - 4.0).abs() < 1e-4);
        }
    }

    #[test]
    fn rope_is_a_rotation_of_each_pair() {
        let mut x = vec![1.0, 2.0, 3.0, 4.0];
        let th = [0.3f32, 1.1];
        let cos = [th[0].cos(), th[1].cos(), th[0].cos(), th[1].cos()];
        let sin = [th[0].sin(), th[1].sin(), th[0].sin(), th[1].sin()];
        rope(&mut x, &cos, &sin);
        // Pair (x[0], x[2]) rotated by th[0], (x[1], x[3]) by th[1].
        assert!((x[0] - (1.0 * cos[0] - 3.0 * sin[0])).abs() < 1e-6);
        assert!((x[2] - (3.0 * cos[0] + 1.0 * sin[0])).abs() < 1e-6);
        assert!((x[1] - (2.0 * cos[1] - 4.0 * sin[1])).abs() < 1e-6);
        assert!((x[3] - (4.0 * cos[1] + 2.0 * sin[1])).abs() < 1e-6);
    }

    #[test]
    fn softmax_and_attend() {
        let mut s = vec![1.0, 2.0, 3.0];
        softmax(&mut s);
        assert!((s.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(s[2] > s[1] && s[1] > s[0]);
        // One position: attention returns its value.
        let q = [1.0, 0.0];
        let mut out = [0.0; 2];
        let mut sc = [0.0; 1];
        attend(&q, &[0.5, 0.5], &[3.0, -1.0], 1.0, &mut sc, &mut out);
        assert_eq!(out, [3.0, -1.0]);
    }

    #[test]
    fn silu_values() {
        let mut g = vec![0.0, 1.0, -1.0];
        silu_mul(&mut g, &[1.0, 2.0, 1.0]);
        assert_eq!(g[0], 0.0);
        assert!((g[1] - 2.0 * 0.731_058_6).abs() < 1e-6);
        assert!((g[2] + 0.268_941_4).abs() < 1e-6);
    }
}
