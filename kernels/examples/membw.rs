//! Memory read bandwidth, the floor of decode (every weight byte is read once per token):
//! `cargo run --release -p kernels --example membw [MiB] [threads]`. Each thread sums its own
//! part of a buffer much larger than the caches; best of 5 passes.

use std::time::Instant;

fn main() {
    let mut a = std::env::args().skip(1);
    let mib: usize = a.next().and_then(|v| v.parse().ok()).unwrap_or(1024);
    let threads: usize = a.next().and_then(|v| v.parse().ok()).unwrap_or(1);
    let n = mib << 18; // f32 elements
    let buf: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    let mut best = f64::MAX;
    let mut sink = 0f32;
    for _ in 0..5 {
        let t = Instant::now();
        let parts: Vec<f32> = std::thread::scope(|s| {
            let hs: Vec<_> = buf
                .chunks(n.div_ceil(threads))
                .map(|c| s.spawn(move || sum(c)))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        best = best.min(t.elapsed().as_secs_f64());
        sink += parts.iter().sum::<f32>();
    }
    println!(
        "read {mib} MiB with {threads} thread(s): {:.1} GB/s (best of 5; checksum {sink})",
        (n * 4) as f64 / best / 1e9
    );
}

/// Sixteen independent accumulators so the loop is bound by loads, not by add latency.
fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    for c in x.chunks_exact(16) {
        for l in 0..16 {
            acc[l] += c[l];
        }
    }
    acc.iter().sum()
}
