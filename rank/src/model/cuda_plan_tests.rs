use super::*;

const SOURCES: [&str; 2] = [
    include_str!("../../../kernels/src/cuda/model.cu"),
    include_str!("../../../kernels/src/cuda/attention.cu"),
];

/// `(type, name)` of each parameter of `extern "C" __global__ void kernel(...)`.
fn signature(kernel: &str) -> Vec<(String, String)> {
    SOURCES
        .iter()
        .find_map(|s| kernels::cu_params::kernel_params(s, kernel))
        .unwrap_or_else(|| panic!("no kernel {kernel} in the .cu sources"))
}

/// Every argument matches the kernel's parameter in kind, and buffers by name.
fn check(l: &Launch) {
    let sig = signature(l.kernel);
    assert_eq!(sig.len(), l.args.len(), "{}: argument count", l.kernel);
    for ((ty, name), arg) in sig.iter().zip(&l.args) {
        match arg {
            Arg::Buf(b) => {
                assert!(ty.ends_with('*'), "{}: {name} is {ty}", l.kernel);
                assert_eq!(b, name, "{}: buffer order", l.kernel);
            }
            Arg::I32(_) => assert_eq!(ty, "int", "{}: {name}", l.kernel),
            Arg::F32(_) => assert_eq!(ty, "float", "{}: {name}", l.kernel),
        }
    }
    let threads = l.block.0 * l.block.1 * l.block.2;
    assert!(
        (1..=1024).contains(&threads) && l.grid.0 >= 1,
        "{}",
        l.kernel
    );
}

/// Qwen2.5-0.5B's heads at TP 1 (14 query heads over 2 KV heads), 12,224 positions (48 KiB).
fn heads() -> Heads {
    Heads {
        heads: 14,
        kv_heads: 2,
        head_dim: 64,
        q_head0: 0,
        kv_head0: 0,
        group: 7,
        max_positions: 12_224,
    }
}

#[test]
fn every_launch_matches_its_kernel_signature() {
    let launches = [
        embedding_gather(5, 896, 100..200),
        rms_norm(5, 896, 1e-6),
        rope(5, 14, 64),
        silu_gate(4864),
        bias_add(5, 896),
        add_inplace(5 * 896),
        f32_to_bf16_split(5 * 896),
        sum_halves(5 * 896),
        argmax(75968, 75968),
        kv_append(5, 3, 2, 64),
        attention_prefill(5, 3, heads()).unwrap(),
        attention_decode(9, heads()).unwrap(),
    ];
    for l in &launches {
        check(l);
    }
}

#[test]
fn block_reductions_get_power_of_two_blocks() {
    for l in [rms_norm(1, 896, 1e-6), argmax(10, 0)] {
        assert!(l.block.0.is_power_of_two(), "{}", l.kernel);
    }
    let a = attention_decode(9, heads()).unwrap();
    assert!(a.block.0.is_power_of_two());
}

#[test]
fn grids_follow_the_sources() {
    assert_eq!(rope(7, 14, 64).grid, (7, 14, 1));
    assert_eq!(rope(7, 14, 64).block.0, 32);
    assert_eq!(kv_append(7, 0, 2, 64).grid, (7, 2, 1));
    assert_eq!(attention_prefill(7, 0, heads()).unwrap().grid, (7, 14, 1));
    assert_eq!(attention_decode(9, heads()).unwrap().grid, (14, 1, 1));
    assert_eq!(silu_gate(1).grid.0, 1);
    assert_eq!(silu_gate(10_000_000).grid.0, MAX_BLOCKS);
}

#[test]
fn attention_shared_memory_holds_every_score() {
    let p = attention_prefill(4, 10, heads()).unwrap();
    assert_eq!(p.shared_bytes, 14 * 4);
    assert_eq!(p.args[4], Arg::I32(10));
    assert_eq!(p.args[8], Arg::F32(0.125));
    assert_eq!(attention_decode(11, heads()).unwrap().shared_bytes, 44);
    assert!(attention_decode(12_224, heads()).is_some());
    assert!(attention_decode(12_225, heads()).is_none());
    // An H100's opt-in 227 KiB per block leaves room for 57,088 positions after the static
    // arrays; the 48 KiB default with the same reserve, 11,264.
    assert_eq!(attention_dynamic_bytes(232_448) / 4, 57_088);
    assert_eq!(attention_dynamic_bytes(48 * 1024) / 4, 11_264);
}

/// A rank's query heads need not start on a group boundary (14 heads over 2 KV heads at TP 3
/// and 4 replicate KV heads): each local query head reads the KV head the plan says, and the
/// kernels compute it with the plan's formula.
#[test]
fn attention_maps_query_heads_to_the_plans_kv_heads_at_every_tp_degree() {
    let shapes = crate::model::plan::Shapes {
        hidden: 896,
        heads: 14,
        kv_heads: 2,
        head_dim: 64,
        intermediate: 4864,
        vocab: 151_936,
    };
    for world in [1, 2, 3, 4, 7] {
        for rank in 0..world {
            let plan = crate::model::plan::ShardPlan::new(&shapes, world, rank).unwrap();
            let h = Heads::of(&plan, 1000);
            let l = attention_decode(5, h).unwrap();
            let arg = |i: usize| match l.args[i] {
                Arg::I32(v) => v as usize,
                ref a => panic!("{a:?}"),
            };
            let (q_head0, group, kv_head0) = (arg(9), arg(10), arg(11));
            for local in 0..h.heads {
                let kernel = (q_head0 + local) / group - kv_head0;
                assert_eq!(
                    kernel,
                    plan.local_kv_of(local),
                    "TP {world} rank {rank} head {local}"
                );
                assert!(kernel < h.kv_heads);
            }
        }
    }
    assert!(SOURCES[1].contains("return (q_head0 + h) / group - kv_head0;"));
}

/// The LM head of a long prefill goes in pieces whose launches the kernels' `int` sizes hold:
/// 14,000 positions of Qwen2's whole vocabulary split twice over are 4.3e9 elements.
#[test]
fn long_products_go_in_pieces_the_kernels_can_index() {
    let width = 2 * 151_936;
    let piece = rows_per_piece(width);
    assert!(piece * width <= MAX_ELEMENTS && (piece + 1) * width > MAX_ELEMENTS);
    assert!(14_000 > piece);
    assert_eq!(rows_per_piece(usize::MAX), 1);
    assert!(MAX_ELEMENTS + (MAX_BLOCKS * THREADS) as usize <= i32::MAX as usize);
}

#[test]
fn embedding_gather_passes_the_vocab_shard() {
    let l = embedding_gather(3, 8, 100..250);
    assert_eq!(&l.args[3..], &[Arg::I32(8), Arg::I32(100), Arg::I32(150)]);
}

#[test]
fn linear_gemm_computes_row_major_x_times_w_transposed() {
    let (tokens, out, inp) = (3, 4, 5);
    let x: Vec<f32> = (0..tokens * inp).map(|i| i as f32 * 0.5 - 3.0).collect();
    let w: Vec<f32> = (0..out * inp).map(|i| (i % 7) as f32 - 2.0).collect();
    let g = linear(tokens, out, inp);
    let mut y = vec![0.0; tokens * out];
    g.reference(&w, &x, &mut y);
    for t in 0..tokens {
        for o in 0..out {
            let want: f32 = (0..inp).map(|i| x[t * inp + i] * w[o * inp + i]).sum();
            assert_eq!(y[t * out + o], want, "y[{t}, {o}]");
        }
    }
}

/// Norm weights, biases and the embedding table are f32 on the device, as the CPU path keeps
/// them (bf16 there would miss the 1e-3 comparison with the CPU on an f32 checkpoint).
#[test]
fn norms_biases_and_the_embedding_table_are_f32() {
    for (kernel, param) in [
        ("embedding_gather", "table"),
        ("rms_norm", "w"),
        ("bias_add", "bias"),
        ("add_inplace", "y"),
    ] {
        let sig = signature(kernel);
        let (ty, _) = sig.iter().find(|(_, n)| n == param).unwrap();
        assert_eq!(ty, "const float*", "{kernel}: {param}");
    }
}
