//! Throughput of the matrix products on Qwen2.5-0.5B shapes (bf16 weights), per path:
//! `cargo run --release -p kernels --example kernels_bench [m]` (m = prefill rows, default 128).
//! Decode (m = 1) is reported in GB/s of weights read, prefill in GFLOP/s.

use std::time::Instant;

use half::bf16;
use kernels::Isa;

fn main() {
    let m: usize = std::env::args()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(128);
    // (name, rows, cols): gate/up, down, q, lm_head shard of TP 2.
    let shapes = [
        ("gate_proj tp2", 2432, 896),
        ("down_proj tp2", 896, 2432),
        ("q_proj tp2", 448, 896),
        ("lm_head tp2", 75968, 896),
    ];
    println!(
        "threads {} bf16_dot available {}",
        kernels::threads(),
        kernels::has_bf16_dot()
    );
    for &(name, n, k) in &shapes {
        let w: Vec<bf16> = (0..n * k)
            .map(|i| bf16::from_f32(((i * 7919) % 1000) as f32 / 1000.0 - 0.5))
            .collect();
        let pw = kernels::PackedWeight::pack(&w, n, k).unwrap();
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 31) % 100) as f32 / 100.0)
            .collect();
        let mut y = vec![0f32; m * n];
        for isa in Isa::all_supported() {
            let reps = (2e8 / (n * k) as f64).ceil() as usize;
            let mut best = f64::MAX;
            for _ in 0..3 {
                let t = Instant::now();
                for _ in 0..reps {
                    kernels::matmul_with(isa, &x[..k], &pw, &mut y[..n], 1);
                }
                best = best.min(t.elapsed().as_secs_f64() / reps as f64);
            }
            let gbs = (n * k * 2) as f64 / best / 1e9;
            let mut bestm = f64::MAX;
            if n * k < 10_000_000 {
                for _ in 0..2 {
                    let t = Instant::now();
                    kernels::matmul_with(isa, &x, &pw, &mut y, m);
                    bestm = bestm.min(t.elapsed().as_secs_f64());
                }
            }
            let gflops = 2.0 * (m * n * k) as f64 / bestm / 1e9;
            println!(
                "{name:14} [{n:6} x {k:5}] {:9}: matvec {:7.1} us {gbs:6.1} GB/s | matmul m={m} {:8.2} ms {gflops:6.1} GFLOP/s",
                isa.name(),
                best * 1e6,
                bestm * 1e3
            );
        }
    }
}
