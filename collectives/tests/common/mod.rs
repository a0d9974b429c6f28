//! Helpers shared by the in-process tests: run one closure per rank on its own thread, and a
//! serial rank-order reference built on the `half` crate (independent of the kernels under test).

#![allow(dead_code)]

use collectives::{Communicator, DType, ReduceOp, ShmComm};
use half::{bf16, f16};

/// Runs `f(comm)` for every communicator on its own thread; returns the results in rank order.
pub fn on_ranks<R: Send>(comms: Vec<ShmComm>, f: impl Fn(ShmComm) -> R + Sync) -> Vec<R> {
    std::thread::scope(|s| {
        let handles: Vec<_> = comms.into_iter().map(|c| s.spawn(|| f(c))).collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread panicked"))
            .collect()
    })
}

pub fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A finite input value for (seed, rank, index): mostly in [-100, 100) with a full mantissa,
/// sometimes ±0, tiny (f16 subnormal range) or large; never large enough for a sum of 8 to
/// overflow f16.
pub fn value(seed: u64, rank: usize, i: usize) -> f32 {
    let h = splitmix(seed ^ ((rank as u64) << 48) ^ (i as u64).wrapping_mul(0x1000_0001));
    let u = ((h >> 40) as f32) / (1u64 << 24) as f32; // [0, 1)
    match h % 16 {
        0 => 0.0,
        1 => -0.0,
        2 => (u - 0.5) * 1e-5,
        3 => (u - 0.5) * 8000.0,
        _ => (u - 0.5) * 200.0,
    }
}

pub fn to_f32(dtype: DType, b: &[u8]) -> f32 {
    match dtype {
        DType::F32 => f32::from_le_bytes(b.try_into().unwrap()),
        DType::BF16 => bf16::from_le_bytes(b.try_into().unwrap()).to_f32(),
        DType::F16 => f16::from_le_bytes(b.try_into().unwrap()).to_f32(),
        d => unreachable!("{d:?} is not reduced"),
    }
}

pub fn from_f32(dtype: DType, v: f32, out: &mut Vec<u8>) {
    match dtype {
        DType::F32 => out.extend_from_slice(&v.to_le_bytes()),
        DType::BF16 => out.extend_from_slice(&bf16::from_f32(v).to_le_bytes()),
        DType::F16 => out.extend_from_slice(&f16::from_f32(v).to_le_bytes()),
        d => unreachable!("{d:?} is not reduced"),
    }
}

/// Rank `rank`'s input of `count` elements (stored in `dtype`).
pub fn input(seed: u64, rank: usize, dtype: DType, count: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(count * dtype.size());
    for i in 0..count {
        from_f32(dtype, value(seed, rank, i), &mut out);
    }
    out
}

/// acc = x0; acc = op(acc, x1); ... in f32, rounded once. `Max` and `Min` keep acc on NaN
/// (and take x on ties, as maxps/minps do).
pub fn combine(op: ReduceOp, acc: f32, x: f32) -> f32 {
    match op {
        ReduceOp::Sum => acc + x,
        ReduceOp::Product => acc * x,
        ReduceOp::Max if acc.is_nan() || acc > x => acc,
        ReduceOp::Min if acc.is_nan() || acc < x => acc,
        ReduceOp::Max | ReduceOp::Min => x,
        o => unreachable!("{o:?} is not covered by this f32 reference"),
    }
}

/// Reference reduction of every rank's buffer (each `count` elements), serial rank order.
pub fn reference(dtype: DType, op: ReduceOp, inputs: &[Vec<u8>]) -> Vec<u8> {
    let e = dtype.size();
    let count = inputs[0].len() / e;
    let mut out = Vec::with_capacity(count * e);
    for i in 0..count {
        let mut acc = to_f32(dtype, &inputs[0][i * e..(i + 1) * e]);
        for inp in &inputs[1..] {
            acc = combine(op, acc, to_f32(dtype, &inp[i * e..(i + 1) * e]));
        }
        from_f32(dtype, acc, &mut out);
    }
    out
}

/// Index of the first differing element, for readable failures.
pub fn first_diff(a: &[u8], b: &[u8], e: usize) -> Option<usize> {
    if a.len() != b.len() {
        return Some(usize::MAX);
    }
    (0..a.len() / e).find(|&i| a[i * e..(i + 1) * e] != b[i * e..(i + 1) * e])
}

pub fn all_dtypes() -> [DType; 3] {
    [DType::F32, DType::BF16, DType::F16]
}

/// Keeps the compiler from flagging the trait import as unused in some test files.
pub fn world(c: &impl Communicator) -> usize {
    c.world_size()
}
