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
    if let Err(why) = kernels::cuda::cuda_available() {
        kernels::skips::no_hardware(
            "rank::model::cuda device_logits_match_the_cpu_or_skip",
            &why,
        );
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
