//! Exact greedy argmax over a large output projection (the LM head) that reads most of it as
//! int8.
//!
//! Decode is bound by memory bandwidth, and the LM head of a small model is a large share of the
//! bytes read per token (Qwen2.5-0.5B: 272 of 990 MB). [`Screen`] keeps a row-major int8 copy of
//! the weight with one scale per row and the largest quantisation error of each row. From it
//! [`argmax_screened`] computes every logit approximately (half the bytes of bf16) together with
//! a rigorous bound on its distance from the f32 logit the full product computes; only the
//! panels holding a row that could be the maximum are then multiplied exactly, with the very
//! kernel the full product uses. So the result is the full product's argmax bit for bit (ties
//! to the lowest index), not an approximation.

use crate::packed::{AllocError, PackedWeight, WordBuf, PANEL};

/// Elements of `x` per quantisation block (one `vpdpbusd` of 64 byte pairs).
const BLOCK: usize = 64;

/// An int8 copy of a [`PackedWeight`] for bounding its products (see the module docs).
pub struct Screen {
    n: usize,
    k: usize,
    /// `k` rounded up to [`BLOCK`].
    kp: usize,
    /// `[n, kp]` bytes row-major, offset by 128 (`vpdpbusd` multiplies unsigned by signed
    /// bytes): `w[r, i] ≈ scale[r] · (qu[r, i] − 128)`; the padding is 128 (zero). In the
    /// weights' huge-page memory: it is streamed once per token like them.
    qu: WordBuf,
    scale: Vec<f32>,
    /// Per row: max_i |w[r, i] − scale[r]·q[r, i]| (the quantisation error, measured).
    err: Vec<f32>,
    /// Per row: max_i |w[r, i]|.
    amax: Vec<f32>,
    /// Per row: Σ_i |q[r, i]|.
    q1: Vec<f32>,
}

impl Screen {
    /// Quantises `w` row by row (symmetric int8, scale = max |w| / 127).
    /// Fails only if the quantised copy cannot be mapped.
    pub fn new(w: &PackedWeight) -> Result<Screen, AllocError> {
        let (n, k) = (w.rows(), w.cols());
        let kp = k.next_multiple_of(BLOCK);
        let mut words = WordBuf::zeroed(n * kp / 4)?;
        let qu: &mut [u8] = bytemuck::cast_slice_mut(words.as_mut_slice());
        qu.fill(128);
        let (mut scale, mut err) = (vec![0f32; n], vec![0f32; n]);
        let (mut amax, mut q1) = (vec![0f32; n], vec![0f32; n]);
        let mut row = vec![0f32; k];
        for r in 0..n {
            w.row_into(r, &mut row);
            let m = row.iter().fold(0f32, |a, v| a.max(v.abs()));
            let s = if m > 0.0 && m.is_finite() {
                m / 127.0
            } else {
                1.0
            };
            let (mut e, mut a1) = (0f64, 0f64);
            for (qi, &v) in qu[r * kp..r * kp + k].iter_mut().zip(&row) {
                let q = (v / s).round().clamp(-127.0, 127.0) as i32;
                *qi = (q + 128) as u8;
                e = e.max((v as f64 - s as f64 * q as f64).abs());
                a1 += q.unsigned_abs() as f64;
            }
            // Rounded up so the bound stays an upper bound in f32; a row with inf or NaN
            // weights gets an infinite bound, so the exact product always decides it.
            let e = (e as f32) * (1.0 + f32::EPSILON);
            let e = if e.is_finite() && m.is_finite() {
                e
            } else {
                f32::INFINITY
            };
            (scale[r], err[r], amax[r], q1[r]) = (s, e, m, a1 as f32);
        }
        Ok(Screen {
            n,
            k,
            kp,
            qu: words,
            scale,
            err,
            amax,
            q1,
        })
    }

    /// Resident bytes.
    pub fn bytes(&self) -> usize {
        self.n * self.kp + 16 * self.n
    }
}

/// `x` quantised for the screen: per [`BLOCK`] a scale and signed bytes, and the constants of
/// the bound (see [`argmax_screened`]).
#[derive(Default)]
struct QuantX {
    /// `[kp]` signed bytes, zero-padded.
    xq: Vec<i8>,
    /// Per block: scale, and 128·Σ xq (what the +128 offset of the weights adds).
    sx: Vec<f32>,
    corr: Vec<i32>,
    /// max and Σ over blocks of max_i |x_i − sx·xq_i|.
    e_max: f32,
    e_sum: f32,
    /// A bound on the f32 rounding of Σ_b sx_b·(block sum), per unit of row scale.
    round: f32,
}

impl QuantX {
    fn quantize(&mut self, x: &[f32], kp: usize) {
        let nb = kp / BLOCK;
        self.xq.clear();
        self.xq.resize(kp, 0);
        self.sx.clear();
        self.corr.clear();
        let (mut e_max, mut e_sum, mut mass) = (0f64, 0f64, 0f64);
        for b in 0..nb {
            let xs = &x[(b * BLOCK).min(x.len())..((b + 1) * BLOCK).min(x.len())];
            let m = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
            let s = if m > 0.0 { m / 127.0 } else { 1.0 };
            let (mut e, mut sum, mut abs) = (0f64, 0i32, 0f64);
            for (i, &v) in xs.iter().enumerate() {
                let q = (v / s).round().clamp(-127.0, 127.0) as i32;
                self.xq[b * BLOCK + i] = q as i8;
                e = e.max((v as f64 - s as f64 * q as f64).abs());
                sum += q;
                abs += q.unsigned_abs() as f64;
            }
            self.sx.push(s);
            self.corr.push(128 * sum);
            e_max = e_max.max(e);
            e_sum += e;
            // The lanes of a block hold at most |corr| + 255·Σ|xq| in all.
            mass += s as f64 * (128.0 * sum.unsigned_abs() as f64 + 255.0 * abs);
        }
        let up = 1.0 + 1e-6;
        self.e_max = (e_max * up) as f32;
        self.e_sum = (e_sum * up) as f32;
        self.round = (2.0 * (nb + 16) as f64 * f32::EPSILON as f64 * mass * up) as f32;
    }
}

/// Scratch for [`argmax_screened`], sized on first use (so decode steps do not allocate).
#[derive(Default)]
pub struct ScreenScratch {
    x: QuantX,
    approx: Vec<f32>,
    exact: Vec<f32>,
    panels: Vec<usize>,
}

/// What [`argmax_screened`] found.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Screened {
    /// The maximum of `x · wᵀ` as the full product computes it, and its row (`None` when every
    /// value is NaN).
    pub best: Option<(f32, usize)>,
    /// Panels of `w` that were multiplied exactly.
    pub panels_read: usize,
}

/// The argmax of `y = x · wᵀ` (lowest row on ties, NaN never wins), equal to scanning the full
/// [`crate::matmul`] output, reading `screen` in full and `w` only where the bound says the
/// maximum may be.
///
/// The bound: with `e_r` the row's quantisation error and `M_r` its largest |weight|,
/// |approx_r − y_r| ≤ ‖x‖₁·e_r plus the f32 rounding of both sums, each at most k·ε·M_r·‖x‖₁
/// (any summation order) — taken twice over, plus ε·|approx_r| for the final scaling.
pub fn argmax_screened(
    w: &PackedWeight,
    screen: &Screen,
    x: &[f32],
    scratch: &mut ScreenScratch,
) -> Screened {
    let (n, k) = (w.rows(), w.cols());
    assert!(
        screen.n == n && screen.k == k && x.len() == k,
        "argmax_screened: shapes"
    );
    let norm1 = x.iter().map(|v| v.abs() as f64).sum::<f64>() as f32 * (1.0 + 1e-6);
    if k == 0 || !norm1.is_finite() {
        // Inf or NaN in x: the bound means nothing, so take the full product.
        return full_argmax(w, x, scratch);
    }
    if scratch.approx.len() < n {
        scratch.approx.resize(n, 0.0);
        scratch.exact.resize(n, 0.0);
    }
    scratch.x.quantize(x, screen.kp);
    let qx = &scratch.x;
    let approx = &mut scratch.approx[..n];
    dot_u8_rows(
        bytemuck::cast_slice(screen.qu.as_slice()),
        screen.kp,
        qx,
        approx,
    );
    let c = Consts {
        norm1,
        rounding: 4.0 * k as f32 * f32::EPSILON,
        e_max: qx.e_max,
        e_sum: qx.e_sum,
        e_cap: 127.0 * BLOCK as f32,
        round: qx.round,
    };
    // The largest lower bound: no row whose upper bound is below it can be the maximum.
    let mut floor = f32::NEG_INFINITY;
    for (r, a) in approx.iter_mut().enumerate() {
        *a *= screen.scale[r];
        floor = floor.max(*a - bound(screen, r, *a, &c));
    }
    let panels = &mut scratch.panels;
    panels.clear();
    for (r, &a) in approx.iter().enumerate() {
        // NaN approximations (NaN weights) keep their panel: the exact product decides.
        let b = bound(screen, r, a, &c);
        // The slack covers the f32 rounding of this comparison itself.
        if a.is_nan() || a + b >= floor - f32::EPSILON * (floor.abs() + a.abs() + b) {
            let p = r / PANEL;
            if panels.last() != Some(&p) {
                panels.push(p);
            }
        }
    }
    let exact = &mut scratch.exact[..n];
    let mut best: Option<(f32, usize)> = None;
    for &p in panels.iter() {
        let rows = p * PANEL..p * PANEL + w.panel_width(p);
        crate::matmul_panels(x, w, p..p + 1, exact);
        for r in rows {
            let v = exact[r];
            if !v.is_nan() && best.is_none_or(|(b, _)| v > b) {
                best = Some((v, r));
            }
        }
    }
    Screened {
        best,
        panels_read: panels.len(),
    }
}

/// Per-token constants of the bound.
struct Consts {
    norm1: f32,
    rounding: f32,
    e_max: f32,
    e_sum: f32,
    e_cap: f32,
    round: f32,
}

/// |approx_r − y_r| ≤ ‖x‖₁·e_r (weights' int8 error) + s_r·min(Q1_r·max_b e_b, 127·64·Σ_b e_b)
/// (x's int8 error: e_b per block, Q1_r = Σ|q_r|, and no |q| above 127) + s_r·(rounding of the
/// block sums in f32) + twice k·ε·(M_r + e_r)·‖x‖₁ (the f32 rounding of the exact product) +
/// ε·|approx_r| (the final scaling), each already rounded up.
#[inline]
fn bound(s: &Screen, r: usize, approx: f32, c: &Consts) -> f32 {
    let xq = (s.q1[r] * c.e_max).min(c.e_cap * c.e_sum);
    c.norm1 * (s.err[r] + c.rounding * (s.amax[r] + s.err[r]))
        + s.scale[r] * (xq + c.round)
        + f32::EPSILON * approx.abs()
}

fn full_argmax(w: &PackedWeight, x: &[f32], scratch: &mut ScreenScratch) -> Screened {
    let n = w.rows();
    if scratch.exact.len() < n {
        scratch.exact.resize(n, 0.0);
    }
    let y = &mut scratch.exact[..n];
    crate::matmul(x, w, y, 1);
    let mut best: Option<(f32, usize)> = None;
    for (r, &v) in y.iter().enumerate() {
        if !v.is_nan() && best.is_none_or(|(b, _)| v > b) {
            best = Some((v, r));
        }
    }
    Screened {
        best,
        panels_read: w.panels(),
    }
}

/// `out[r] = Σ_b sx_b · Σ_{i∈b} (qu[r, i] − 128)·xq[i]` for the rows of `qu` (`[n, kp]`):
/// each block sum exact in integers, the blocks added in f32.
fn dot_u8_rows(qu: &[u8], kp: usize, x: &QuantX, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::isa() == crate::Isa::Avx512 && std::arch::is_x86_feature_detected!("avx512vnni") {
        // SAFETY: the CPU has AVX-512 and VNNI (checked above); `qu` is `[out.len(), kp]`,
        // `x.xq` is `[kp]`, `x.sx` and `x.corr` have `kp / 64` entries.
        return unsafe { crate::x86::dot_u8_rows_vnni(qu, kp, &x.xq, &x.sx, &x.corr, out) };
    }
    for (o, row) in out.iter_mut().zip(qu.chunks_exact(kp.max(1))) {
        let mut acc = 0f32;
        for (b, blk) in row.chunks_exact(BLOCK).enumerate() {
            let xs = &x.xq[b * BLOCK..(b + 1) * BLOCK];
            let t: i32 = blk
                .iter()
                .zip(xs)
                .map(|(q, v)| (*q as i32 - 128) * *v as i32)
                .sum();
            acc += x.sx[b] * t as f32;
        }
        *o = acc;
    }
}
