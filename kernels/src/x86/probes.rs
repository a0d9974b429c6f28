//! The roofline probes (`crate::roofline`): read bandwidth and FMA / bf16-dot throughput.

use core::arch::x86_64::*;

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
