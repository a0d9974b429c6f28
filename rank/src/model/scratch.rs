//! Activation buffers reused by every forward call, and the per-part profiler, kept out of the
//! blocks' math.

use std::time::Instant;

/// Grows `v` to at least `n` elements (never shrinks, so steady-state decode does not allocate)
/// and returns its first `n`.
pub(crate) fn buf(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
}

/// Activation buffers reused by every forward call (sized for the largest call so far).
#[derive(Default)]
pub(crate) struct Scratch {
    pub(crate) x: Vec<f32>,
    pub(crate) normed: Vec<f32>,
    pub(crate) q: Vec<f32>,
    pub(crate) k: Vec<f32>,
    pub(crate) v: Vec<f32>,
    pub(crate) attn: Vec<f32>,
    pub(crate) proj: Vec<f32>,
    pub(crate) gate: Vec<f32>,
    pub(crate) up: Vec<f32>,
    pub(crate) scores: Vec<f32>,
    pub(crate) screen: kernels::ScreenScratch,
}

/// What the per-part timers of [`crate::Qwen2::set_profile`] measure.
pub const PARTS: [&str; 7] = [
    "qkv_proj + rope + kv append",
    "attention (scores, softmax, V)",
    "o_proj matmul + all-reduce",
    "gate/up matmul + silu",
    "down_proj matmul + all-reduce",
    "embedding, norms, residuals",
    "lm_head + argmax",
];

/// Index into [`PARTS`] of the time outside the blocks (embedding, norms, residuals).
pub(crate) const OTHER: usize = 5;

/// Seconds per [`PARTS`] entry, when profiling is on; two clock reads per part, none when off.
#[derive(Default)]
pub(crate) struct Profiler {
    pub(crate) seconds: Option<[f64; PARTS.len()]>,
    since: Option<Instant>,
}

impl Profiler {
    /// Restarts the clock (no-op unless profiling).
    #[inline]
    pub(crate) fn start(&mut self) {
        if self.seconds.is_some() {
            self.since = Some(Instant::now());
        }
    }

    /// Adds the time since the last start or lap to part `i` and restarts the clock.
    #[inline]
    pub(crate) fn lap(&mut self, i: usize) {
        if let (Some(p), Some(t0)) = (self.seconds.as_mut(), self.since.as_mut()) {
            let now = Instant::now();
            p[i] += (now - *t0).as_secs_f64();
            *t0 = now;
        }
    }

    /// Profiling on (zeroed) or off.
    pub(crate) fn set(&mut self, on: bool) {
        self.seconds = on.then_some([0.0; PARTS.len()]);
        self.since = None;
    }
}
