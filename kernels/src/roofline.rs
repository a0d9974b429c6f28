//! This machine's ceilings, measured in about a second: streaming read bandwidth (the floor of
//! decode, which reads every weight byte once per token) and the FMA peaks (the ceiling of the
//! prefill GEMMs), so `tprun bench --roofline` can say how close the kernels get.
//!
//! Each function measures what the calling thread and `threads - 1` helpers do together; the
//! bench runs them on every rank at once (after a barrier) and adds the ranks' figures, so the
//! ranks' interference on the memory bus is part of the floor.

use std::time::Instant;

/// Bytes of the read buffer: much larger than any L3 of these machines (32 MiB per CCD), so the
/// passes stream from DRAM.
pub const READ_BYTES: usize = 256 << 20;

/// Streaming read bandwidth in GB/s of `threads` threads, each summing its own contiguous part of
/// a buffer of `bytes` (best of `passes` passes, each pass timed from the first thread's start to
/// the last thread's end).
pub fn read_gbps(bytes: usize, threads: usize, passes: usize) -> f64 {
    let threads = threads.max(1);
    let n = (bytes / 4).max(threads * 64);
    // Written, so the pages are really mapped (a zeroed allocation could share one zero page).
    let buf: Vec<u32> = (0..n).map(|i| i as u32).collect();
    let mut best = f64::MAX;
    let mut sink = 0u32;
    for _ in 0..passes.max(1) {
        let t = Instant::now();
        let parts: Vec<u32> = std::thread::scope(|s| {
            let hs: Vec<_> = buf
                .chunks(n.div_ceil(threads))
                .skip(1)
                .map(|c| s.spawn(move || read_sum(c)))
                .collect();
            let first = read_sum(&buf[..n.div_ceil(threads).min(n)]);
            std::iter::once(first)
                .chain(hs.into_iter().map(|h| h.join().unwrap()))
                .collect()
        });
        best = best.min(t.elapsed().as_secs_f64());
        sink = parts.iter().fold(sink, |a, &b| a.wrapping_add(b));
    }
    std::hint::black_box(sink);
    (n * 4) as f64 / best / 1e9
}

/// Wrapping sum of `x` with many independent accumulators, so the loop is bound by loads.
fn read_sum(x: &[u32]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if crate::Isa::Avx512.supported() {
        // SAFETY: AVX-512F checked just above.
        return unsafe { crate::x86::read_sum_avx512(x) };
    }
    let mut acc = [0u32; 16];
    for c in x.chunks_exact(16) {
        for l in 0..16 {
            acc[l] = acc[l].wrapping_add(c[l]);
        }
    }
    acc.iter().fold(0, |a, &b| a.wrapping_add(b))
}

/// Which multiply-add instruction [`peak_gflops`] times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fma {
    /// `vfmadd231ps` on the widest vectors the path has (2 flops per f32 lane).
    F32,
    /// `vdpbf16ps` (4 flops per f32 lane: two bf16 products and their sum added).
    Bf16Dot,
}

/// Peak GFLOP/s of `threads` threads each running `iters` iterations of 12 independent chains of
/// `fma` (enough to hide the latency on every core these kernels target); best of 3. `None` when
/// this CPU lacks the instruction.
pub fn peak_gflops(fma: Fma, threads: usize, iters: usize) -> Option<f64> {
    let per_thread = match fma {
        Fma::F32 => flops_f32_fn()?,
        Fma::Bf16Dot => flops_bf16_fn()?,
    };
    let threads = threads.max(1);
    let mut best = f64::MAX;
    let mut flops = 0.0;
    for _ in 0..3 {
        let t = Instant::now();
        flops = std::thread::scope(|s| {
            let hs: Vec<_> = (1..threads)
                .map(|_| s.spawn(move || per_thread(iters)))
                .collect();
            per_thread(iters) + hs.into_iter().map(|h| h.join().unwrap()).sum::<f64>()
        });
        best = best.min(t.elapsed().as_secs_f64());
    }
    Some(flops / best / 1e9)
}

/// A timed loop: runs `iters` iterations and returns the flops it did.
type FlopsFn = fn(usize) -> f64;

fn flops_f32_fn() -> Option<FlopsFn> {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::Isa::Avx512.supported() {
            // SAFETY (of the call inside): AVX-512F checked just above.
            return Some(|n| unsafe { crate::x86::fma_chains_avx512(n) });
        }
        if crate::Isa::Avx2.supported() {
            // SAFETY (of the call inside): AVX2+FMA checked just above.
            return Some(|n| unsafe { crate::x86::fma_chains_avx2(n) });
        }
    }
    None
}

fn flops_bf16_fn() -> Option<FlopsFn> {
    #[cfg(target_arch = "x86_64")]
    if crate::has_bf16_dot() {
        // SAFETY (of the call inside): AVX512_BF16 checked just above.
        return Some(|n| unsafe { crate::x86::dpbf16_chains_avx512(n) });
    }
    None
}

/// The three ceilings, for `threads` threads in this process.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Roofline {
    /// Streaming read bandwidth, GB/s.
    pub read_gbps: f64,
    /// f32 FMA peak, GFLOP/s (0 when the CPU has no FMA path).
    pub f32_gflops: f64,
    /// `vdpbf16ps` peak, GFLOP/s (0 when the CPU lacks it).
    pub bf16_gflops: f64,
}

/// Measures all three with `threads` threads (~0.5 s per call plus the buffer's first touch).
pub fn measure(threads: usize) -> Roofline {
    Roofline {
        read_gbps: read_gbps(READ_BYTES, threads, 4),
        f32_gflops: peak_gflops(Fma::F32, threads, 20_000_000).unwrap_or(0.0),
        bf16_gflops: peak_gflops(Fma::Bf16Dot, threads, 10_000_000).unwrap_or(0.0),
    }
}
