//! comm.cu's own flag wait on tprun's CUDA emulator (feature `cuda-emulator`): two ranks as two
//! emulated GPUs of this process, each slab reachable by both (host memory), the kernels
//! launched as collectives::cuda launches them. What used to be tested as a Rust copy of the
//! wait (`reached`) is tested on the kernel: sequence numbers past 2^32, a stale flag whose low
//! 32 bits equal the sequence number, a zeroed slab, and the bounded wait's error word.
#![cfg(feature = "cuda-emulator")]

use std::collections::HashMap;
use std::sync::Arc;

use collectives::cuda::cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg,
};
use collectives::cuda_plan::{device_error, SlabLayout, THREADS};

struct Rank {
    stream: Arc<CudaStream>,
    funcs: HashMap<&'static str, CudaFunction>,
    slab: CudaSlice<u8>,
    bases: Option<CudaSlice<u64>>,
}

const MAX_BLOCKS: u32 = 4;

/// Two ranks on emulated GPUs 0 and 1 with zeroed slabs, each with the table of both slabs.
fn world() -> (SlabLayout, Vec<Rank>) {
    kernels::cuda::emulator::activate().expect("the CUDA emulator loads");
    assert!(kernels::cuda::cuda_available().expect("emulated GPUs") >= 2);
    let layout = SlabLayout::new(2, MAX_BLOCKS, 4096);
    let mut ranks: Vec<Rank> = (0..2)
        .map(|g| {
            let ctx = CudaContext::new(g).unwrap();
            let stream = ctx.new_stream().unwrap();
            let funcs = kernels::cuda::module::load(&ctx, &kernels::cuda::sources::COMM).unwrap();
            let slab = stream
                .alloc_zeros::<u8>(layout.total_bytes as usize)
                .unwrap();
            Rank {
                stream,
                funcs,
                slab,
                bases: None,
            }
        })
        .collect();
    let addrs: Vec<u64> = ranks
        .iter()
        .map(|r| r.slab.device_ptr(&r.stream).0)
        .collect();
    for r in &mut ranks {
        r.bases = Some(r.stream.memcpy_stod(&addrs).unwrap());
    }
    // Every slab is zeroed before any rank signals into it (collectives::cuda's set-up has a
    // host barrier for this; without it a peer's flag can land before the memset and be wiped).
    for r in &ranks {
        r.stream.synchronize().unwrap();
    }
    (layout, ranks)
}

/// Launches comm.cu's `barrier` on `rank` at sequence number `seq` (not waiting for it).
fn barrier(l: &SlabLayout, ranks: &[Rank], rank: usize, seq: u64, timeout_ns: u64) {
    let r = &ranks[rank];
    let mut b = r.stream.launch_builder(&r.funcs["barrier"]);
    let (me, world, blocks) = (rank as i32, l.world as i32, l.max_blocks as i32);
    b.arg(r.bases.as_ref().unwrap())
        .arg(&l.flags_off)
        .arg(&l.data_off);
    b.arg(&me)
        .arg(&world)
        .arg(&blocks)
        .arg(&seq)
        .arg(&timeout_ns);
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: comm.cu's SLABS_PARAMS in order; both slabs live until the test ends.
    unsafe { b.launch(cfg) }.unwrap();
}

/// Waits for `rank`'s stream and returns its error word, then clears it.
fn error_word(ranks: &mut [Rank], rank: usize) -> u32 {
    let r = &mut ranks[rank];
    r.stream.synchronize().unwrap();
    let head = r.stream.memcpy_dtov(&r.slab.slice(0..4)).unwrap();
    r.stream.memset_zeros(&mut r.slab.slice_mut(0..4)).unwrap();
    r.stream.synchronize().unwrap();
    u32::from_le_bytes(head.try_into().unwrap())
}

const LONG: u64 = 20_000_000_000;
const SHORT: u64 = 30_000_000;

#[test]
fn the_kernels_wait_counts_in_64_bits_and_gives_up_naming_the_missing_rank() {
    let (l, mut ranks) = world();
    // A zeroed slab is no arrival: rank 0 alone at operation 1 times out waiting for rank 1 in
    // the DONE phase (2) of a barrier (op 5).
    barrier(&l, &ranks, 0, 1, SHORT);
    let word = error_word(&mut ranks, 0);
    assert_eq!(word, 0x8000_0000 | 5 << 16 | 2 << 8 | 1, "{word:#x}");
    let e = device_error(word, 1, 0.03).unwrap().to_string();
    assert!(e.starts_with("barrier #1: rank 1 did not arrive"), "{e}");

    // Both ranks at a sequence number past 2^32 meet.
    let past = (1u64 << 32) + 7;
    barrier(&l, &ranks, 1, past, LONG);
    barrier(&l, &ranks, 0, past, LONG);
    assert_eq!(error_word(&mut ranks, 0), 0);
    assert_eq!(error_word(&mut ranks, 1), 0);

    // Rank 1 leaves a flag of 7 in rank 0's slab: the low 32 bits of 2^33 + 7. A 32-bit wait
    // would take it as rank 1's arrival at operation 2^33 + 7; the kernel's waits and gives up.
    barrier(&l, &ranks, 1, 7, LONG);
    assert_eq!(error_word(&mut ranks, 1), 0);
    let later = (1u64 << 33) + 7;
    barrier(&l, &ranks, 0, later, SHORT);
    assert_eq!(
        error_word(&mut ranks, 0),
        0x8000_0000 | 5 << 16 | 2 << 8 | 1
    );
    // Once rank 1 gets there, both pass.
    barrier(&l, &ranks, 1, later, LONG);
    barrier(&l, &ranks, 0, later, LONG);
    assert_eq!(error_word(&mut ranks, 0), 0);
    assert_eq!(error_word(&mut ranks, 1), 0);
}

/// A one-shot all-reduce of two ranks through the kernel (both slabs' data areas), then one
/// where rank 1 never comes: rank 0's wait in the COPIED phase (0) gives up with op 1.
#[test]
fn a_oneshot_all_reduce_sums_in_rank_order_and_a_missing_peer_is_named() {
    let (l, mut ranks) = world();
    let n = 1000usize;
    let inputs: Vec<Vec<f32>> = (0..2)
        .map(|r| {
            (0..n)
                .map(|i| (i as f32 + 0.25) * (r as f32 + 1.0))
                .collect()
        })
        .collect();
    let mut bufs: Vec<CudaSlice<f32>> = (0..2)
        .map(|r| ranks[r].stream.memcpy_stod(&inputs[r]).unwrap())
        .collect();
    let launch = |ranks: &[Rank], bufs: &mut [CudaSlice<f32>], rank: usize, seq: u64, t: u64| {
        let r = &ranks[rank];
        let mut b = r.stream.launch_builder(&r.funcs["all_reduce_oneshot_f32"]);
        let (me, world, blocks, op, len) = (rank as i32, 2i32, MAX_BLOCKS as i32, 0i32, n as u64);
        let p = bufs[rank].device_ptr(&r.stream).0;
        b.arg(r.bases.as_ref().unwrap())
            .arg(&l.flags_off)
            .arg(&l.data_off);
        b.arg(&me).arg(&world).arg(&blocks).arg(&seq).arg(&t);
        b.arg(&op).arg(&p).arg(&p).arg(&len);
        let cfg = LaunchConfig {
            grid_dim: (2, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: all_reduce_oneshot_f32's parameters; the buffers hold n f32 each.
        unsafe { b.launch(cfg) }.unwrap();
    };
    launch(&ranks, &mut bufs, 0, 1, LONG);
    launch(&ranks, &mut bufs, 1, 1, LONG);
    for r in 0..2 {
        assert_eq!(error_word(&mut ranks, r), 0);
        let got = ranks[r].stream.memcpy_dtov(&bufs[r]).unwrap();
        let want: Vec<f32> = (0..n).map(|i| inputs[0][i] + inputs[1][i]).collect();
        assert_eq!(got, want, "rank {r}");
    }
    launch(&ranks, &mut bufs, 0, 2, SHORT);
    let word = error_word(&mut ranks, 0);
    assert_eq!(word, 0x8000_0000 | 1 << 16 | 1, "{word:#x}");
    let e = device_error(word, 2, 0.03).unwrap().to_string();
    assert!(e.starts_with("all_reduce #2: rank 1 did not arrive"), "{e}");
}
