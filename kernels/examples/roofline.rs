//! This machine's ceilings (see `kernels::roofline`):
//! `cargo run --release -p kernels --example roofline [threads]`.

fn main() {
    let threads: usize = std::env::args()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let t = std::time::Instant::now();
    let r = kernels::roofline::measure(threads);
    println!(
        "{threads} thread(s): read {:.1} GB/s, f32 FMA {:.0} GFLOP/s, bf16 dot {:.0} GFLOP/s ({:.2} s)",
        r.read_gbps,
        r.f32_gflops,
        r.bf16_gflops,
        t.elapsed().as_secs_f64()
    );
}
