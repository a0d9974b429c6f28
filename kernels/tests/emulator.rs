//! The model kernels (model.cu, attention.cu) on tprun's CUDA emulator (feature `cuda-emulator`):
//! the same sources NVRTC compiles, built by the host compiler through the stand-in NVRTC,
//! loaded and launched through cudarc and the stand-in driver, against host references.
#![cfg(feature = "cuda-emulator")]

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaStream, LaunchConfig, PushKernelArg};
use kernels::cuda::{emulator, module, sources};

fn setup() -> (
    Arc<CudaStream>,
    std::collections::HashMap<&'static str, CudaFunction>,
) {
    emulator::activate().expect("the CUDA emulator loads");
    assert!(kernels::cuda::emulated());
    let n = kernels::cuda::cuda_available().expect("emulated GPUs");
    assert!(n >= 1);
    let ctx = CudaContext::new(0).unwrap();
    let stream = ctx.new_stream().unwrap();
    let mut funcs = module::load(&ctx, &sources::MODEL).unwrap();
    funcs.extend(module::load(&ctx, &sources::ATTENTION).unwrap());
    (stream, funcs)
}

fn cfg(grid: u32, block: u32, shared: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: shared,
    }
}

/// A deterministic pseudo-random vector in [-1, 1).
fn data(n: usize, seed: u32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(2654435761).wrapping_add(1);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x as f32 / u32::MAX as f32) * 2.0 - 1.0
        })
        .collect()
}

#[test]
fn rms_norm_matches_the_host_reference_with_block_barriers_and_warp_shuffles() {
    let (s, f) = setup();
    let (rows, hidden, eps) = (3usize, 200usize, 1e-6f32);
    let x = data(rows * hidden, 1);
    let w = data(hidden, 2);
    let dx = s.memcpy_stod(&x).unwrap();
    let dw = s.memcpy_stod(&w).unwrap();
    let mut dy = s.alloc_zeros::<f32>(rows * hidden).unwrap();
    let h = hidden as i32;
    let mut b = s.launch_builder(&f["rms_norm"]);
    b.arg(&dx).arg(&dw).arg(&mut dy).arg(&h).arg(&eps);
    // SAFETY: rms_norm(x, w, y, hidden, eps) with rows x hidden f32 buffers.
    unsafe { b.launch(cfg(rows as u32, 256, 0)) }.unwrap();
    let y = s.memcpy_dtov(&dy).unwrap();
    for r in 0..rows {
        let row = &x[r * hidden..(r + 1) * hidden];
        let ss: f32 = row.iter().map(|v| v * v).sum();
        let inv = 1.0 / (ss / hidden as f32 + eps).sqrt();
        for i in 0..hidden {
            let want = row[i] * inv * w[i];
            let got = y[r * hidden + i];
            assert!(
                (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                "{r},{i}: {got} vs {want}"
            );
        }
    }
}

#[test]
fn argmax_takes_the_lowest_index_of_ties_skips_nan_and_adds_the_offset() {
    let (s, f) = setup();
    let mut x = data(5000, 3);
    x[17] = 5.0;
    x[4000] = 5.0;
    x[100] = f32::NAN;
    let run = |x: &[f32], threads: u32| {
        let dx = s.memcpy_stod(x).unwrap();
        let mut val = s.alloc_zeros::<f32>(1).unwrap();
        let mut idx = s.alloc_zeros::<i32>(1).unwrap();
        let (n, off) = (x.len() as i32, 1000i32);
        let mut b = s.launch_builder(&f["argmax"]);
        b.arg(&dx).arg(&n).arg(&off).arg(&mut val).arg(&mut idx);
        // SAFETY: argmax(x, n, offset, out_val, out_idx) over n f32, one block.
        unsafe { b.launch(cfg(1, threads, 0)) }.unwrap();
        (
            s.memcpy_dtov(&val).unwrap()[0],
            s.memcpy_dtov(&idx).unwrap()[0],
        )
    };
    for threads in [32, 256, 1024] {
        assert_eq!(run(&x, threads), (5.0, 1017), "{threads} threads");
    }
    assert_eq!(run(&[f32::NAN; 40], 64).1, -1, "nothing wins: -1");
}

#[test]
fn attention_decode_uses_dynamic_shared_memory_and_the_limits_are_the_h100s() {
    let (s, f) = setup();
    let (len, kv_heads, heads, hd) = (37usize, 2usize, 4usize, 16usize);
    let q = data(heads * hd, 4);
    let k = data(len * kv_heads * hd, 5);
    let v = data(len * kv_heads * hd, 6);
    let scale = 1.0 / (hd as f32).sqrt();
    let (dq, dk, dv) = (
        s.memcpy_stod(&q).unwrap(),
        s.memcpy_stod(&k).unwrap(),
        s.memcpy_stod(&v).unwrap(),
    );
    let mut dout = s.alloc_zeros::<f32>(heads * hd).unwrap();
    let ints = [len, heads, kv_heads, hd].map(|x| x as i32);
    let (q0, group, kv0) = (0i32, (heads / kv_heads) as i32, 0i32);
    let launch = |shared: u32, threads: u32, out: &mut cudarc::driver::CudaSlice<f32>| {
        let mut b = s.launch_builder(&f["attention_decode"]);
        b.arg(&dq).arg(&dk).arg(&dv).arg(out);
        b.arg(&ints[0]).arg(&ints[1]).arg(&ints[2]).arg(&ints[3]);
        b.arg(&scale).arg(&q0).arg(&group).arg(&kv0);
        // SAFETY: attention_decode's signature; the cache holds len positions.
        unsafe { b.launch(cfg(heads as u32, threads, shared)) }
    };
    launch((len * 4) as u32, 128, &mut dout).unwrap();
    let out = s.memcpy_dtov(&dout).unwrap();
    for h in 0..heads {
        let kvh = h / (heads / kv_heads);
        let sc: Vec<f32> = (0..len)
            .map(|j| {
                (0..hd)
                    .map(|i| q[h * hd + i] * k[(j * kv_heads + kvh) * hd + i])
                    .sum::<f32>()
                    * scale
            })
            .collect();
        let m = sc.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = sc.iter().map(|x| (x - m).exp()).collect();
        let total: f32 = e.iter().sum();
        for i in 0..hd {
            let want: f32 = (0..len)
                .map(|j| e[j] * v[(j * kv_heads + kvh) * hd + i])
                .sum::<f32>()
                / total;
            let got = out[h * hd + i];
            assert!(
                (got - want).abs() < 1e-5,
                "head {h} dim {i}: {got} vs {want}"
            );
        }
    }
    // Past the 48 KiB default without cuFuncSetAttribute, and more than 1024 threads: refused.
    assert!(launch(49 * 1024, 128, &mut dout).is_err());
    assert!(launch(1024, 2048, &mut dout).is_err());
}
