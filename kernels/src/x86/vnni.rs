//! The LM-head screen's int8 dot products with AVX-512 VNNI (`crate::screen`).

use core::arch::x86_64::*;

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
