//! The device model against the CPU model on a random tiny checkpoint, world of one. Without a
//! usable GPU (every CI machine so far) the test logs why it did not run (kernels::skips).

use collectives::cuda::CudaComm;
use collectives::local::SoloComm;

use super::{CudaQwen2, DeviceLogits};
use crate::model::config::Config;
use crate::model::loader::{Checkpoint, WeightDtype};
use crate::model::plan::ShardPlan;
use crate::tests::{tmpdir, write_tiny, Tiny};
use crate::Qwen2;

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn the_attention_shared_memory_bound_is_the_one_the_cubin_is_checked_against() {
    let checked = kernels::cuda::sources::ATTENTION_STATIC_SHARED_MAX;
    assert_eq!(
        crate::model::cuda_plan::ATTENTION_STATIC_SHARED as u32,
        checked
    );
}

#[test]
fn device_logits_match_the_cpu_or_skip() {
    if !kernels::cuda::gpu_or_skip("rank::model::cuda device_logits_match_the_cpu_or_skip") {
        return;
    }
    let mut comm = CudaComm::new(Box::new(SoloComm), 0).expect("CUDA communicator on GPU 0");
    for bf16 in [false, true] {
        let t = Tiny {
            hidden: 64,
            heads: 4,
            kv: 2,
            head_dim: 16,
            inter: 96,
            vocab: 77,
            layers: 2,
            tied: bf16,
            bf16,
        };
        let dir = tmpdir("cuda-model");
        write_tiny(&dir, &t, 7);
        let config = Config::from_dir(&dir).unwrap();
        let plan = ShardPlan::new(&config.shapes(), 1, 0).unwrap();
        let load = || Checkpoint::open(&dir).unwrap();
        let mut cpu = Qwen2::load(
            &mut load(),
            &config,
            &plan,
            WeightDtype::Auto,
            &mut |_, _| {},
        )
        .unwrap();
        let mut dev =
            CudaQwen2::load(&mut load(), &config, &plan, WeightDtype::Auto, &comm).unwrap();
        println!("{}", dev.loaded);
        let ids = [3u32, 14, 15, 9, 26, 5];
        let want = cpu.forward(&mut SoloComm, &ids, 0).unwrap();
        let got = dev.forward(&mut comm, &ids, 0, DeviceLogits::All).unwrap();
        let d = max_diff(&want, &got);
        println!("bf16 {bf16}: prefill max |cpu - cuda| = {d:e}");
        // bf16 weights multiply the activations split into two bf16 terms, so both types are
        // held to the acceptance tolerance.
        let tol = 1e-3;
        assert!(d < tol, "bf16 {bf16}: {d}");
        // Hidden states (a fresh forward from position 0): every tensor, embeddings to the
        // final norm, within the same bound.
        let opts = crate::model::ForwardOptions {
            logits: crate::model::Logits::All,
            hidden_states: true,
        };
        let want = cpu.forward_with(&mut SoloComm, &ids, 0, opts).unwrap();
        let mut hs = Vec::new();
        let got = (dev.forward_with(&mut comm, &ids, 0, DeviceLogits::All, Some(&mut hs))).unwrap();
        assert!(max_diff(&want.logits, &got) < tol);
        assert_eq!(hs.len(), config.num_hidden_layers + 1);
        for (i, (w, g)) in want.hidden_states.iter().zip(&hs).enumerate() {
            let d = max_diff(w, g);
            println!("bf16 {bf16}: hidden_states.{i} max |cpu - cuda| = {d:e}");
            assert!(d < tol, "hidden_states.{i}: {d}");
        }
        let cpu_next = cpu.forward_argmax(&mut SoloComm, &[7], ids.len()).unwrap();
        let dev_next = dev.forward_argmax(&mut comm, &[7], ids.len()).unwrap();
        println!("bf16 {bf16}: greedy decode step cpu {cpu_next}, cuda {dev_next}");
        assert_eq!(cpu_next, dev_next, "bf16 {bf16}: greedy decode step");
    }
}

/// The bf16 products' two-term split on the device: model.cu's `f32_to_bf16_split` and
/// `sum_halves`, launched as the plan launches them (on the emulator in CI). The split rounds
/// like the CPU's bf16 (round to nearest even), and bf16 weights times the two terms land within
/// f32 rounding of the same weights times the f32 activations, where one bf16 term is off by
/// ~1e-3.
#[test]
fn the_split_and_sum_kernels_carry_f32_activations_through_a_bf16_product() {
    use collectives::cuda::cudarc::driver::{CudaContext, DevicePtr};
    use half::bf16;
    if !kernels::cuda::gpu_or_skip(
        "rank::model::cuda the_split_and_sum_kernels_carry_f32_activations",
    ) {
        return;
    }
    let ctx = CudaContext::new(0).unwrap();
    let stream = ctx.new_stream().unwrap();
    let funcs = super::launch::load_kernels(&ctx).unwrap().funcs;
    let (out, inp) = (16, 896);
    let mut seed = 0x2545f4914f6cdd1du64;
    let mut rnd = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    };
    let x: Vec<f32> = (0..inp).map(|_| rnd() * 3.0).collect();
    let w: Vec<f32> = (0..out * inp)
        .map(|_| bf16::from_f32(rnd() * 0.05).to_f32())
        .collect();
    let dx = stream.memcpy_stod(&x).unwrap();
    let dxb = stream.alloc_zeros::<u16>(2 * inp).unwrap();
    let ptr = |p: (u64, _)| p.0;
    let bufs = [ptr(dx.device_ptr(&stream)), ptr(dxb.device_ptr(&stream))];
    let split = crate::model::cuda_plan::f32_to_bf16_split(inp);
    // SAFETY: x holds inp f32, xb 2 * inp u16, both alive until the copies below.
    unsafe { super::launch::launch_on(&stream, &funcs, &split, &bufs) }.unwrap();
    let terms = stream.memcpy_dtov(&dxb).unwrap();
    let (hi, lo): (Vec<f32>, Vec<f32>) = (0..inp)
        .map(|i| {
            let (h, l) = (bf16::from_bits(terms[i]), bf16::from_bits(terms[inp + i]));
            assert_eq!(h, bf16::from_f32(x[i]), "hi[{i}] of {}", x[i]);
            assert_eq!(l, bf16::from_f32(x[i] - h.to_f32()), "lo[{i}] of {}", x[i]);
            (h.to_f32(), l.to_f32())
        })
        .unzip();
    let dot = |a: &[f32], r: usize| -> f64 {
        (0..inp).map(|i| a[i] as f64 * w[r * inp + i] as f64).sum()
    };
    let (mut two, mut one) = (0f64, 0f64);
    for r in 0..out {
        let exact = dot(&x, r);
        two = two.max((dot(&hi, r) + dot(&lo, r) - exact).abs());
        one = one.max((dot(&hi, r) - exact).abs());
    }
    println!("max abs error over {out} rows of {inp}: split {two:e}, one bf16 term {one:e}");
    assert!(two < 2e-5, "split {two:e}");
    assert!(one > 50.0 * two, "one term {one:e}, split {two:e}");
    // sum_halves adds the two products element by element.
    let halves: Vec<f32> = (0..2 * out).map(|_| rnd()).collect();
    let dh = stream.memcpy_stod(&halves).unwrap();
    let dy = stream.alloc_zeros::<f32>(out).unwrap();
    let bufs = [ptr(dh.device_ptr(&stream)), ptr(dy.device_ptr(&stream))];
    let sum = crate::model::cuda_plan::sum_halves(out);
    // SAFETY: halves holds 2 * out f32, y out f32.
    unsafe { super::launch::launch_on(&stream, &funcs, &sum, &bufs) }.unwrap();
    let y = stream.memcpy_dtov(&dy).unwrap();
    for i in 0..out {
        assert_eq!(y[i], halves[i] + halves[out + i], "y[{i}]");
    }
}
