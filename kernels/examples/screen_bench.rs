//! Time of the screened greedy argmax against the full GEMV on the Qwen2.5-0.5B LM head shard
//! of TP 2 (75968 x 896, bf16), and how many panels the screen leaves to read exactly:
//! `cargo run --release -p kernels --example screen_bench`.

use std::time::Instant;

use half::bf16;
use kernels::{argmax_screened, PackedWeight, Screen, ScreenScratch};

fn main() {
    let (n, k) = (75968, 896);
    let mut s = 1u64;
    let mut rnd = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    };
    let w: Vec<bf16> = (0..n * k).map(|_| bf16::from_f32(rnd() * 0.04)).collect();
    let x: Vec<f32> = (0..k).map(|_| rnd() * 4.0).collect();
    let pw = PackedWeight::pack(&w, n, k).unwrap();
    let screen = Screen::new(&pw).unwrap();
    let mut scratch = ScreenScratch::default();
    let mut y = vec![0f32; n];
    for round in 0..3 {
        let t = Instant::now();
        for _ in 0..20 {
            kernels::matmul(&x, &pw, &mut y, 1);
        }
        let full = t.elapsed().as_secs_f64() / 20.0;
        let t = Instant::now();
        let mut got = None;
        for _ in 0..20 {
            got = Some(argmax_screened(&pw, &screen, &x, &mut scratch));
        }
        let scr = t.elapsed().as_secs_f64() / 20.0;
        let got = got.unwrap();
        println!(
            "round {round}: full GEMV {:.2} ms ({:.1} GB/s) | screened {:.2} ms, {} of {} panels read exactly",
            full * 1e3,
            (n * k * 2) as f64 / full / 1e9,
            scr * 1e3,
            got.panels_read,
            pw.panels()
        );
    }
}
