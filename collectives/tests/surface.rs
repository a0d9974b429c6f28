//! Every operation of the `Communicator` surface (all-reduce, reduce-scatter, reduce, all-gather,
//! gather, scatter, broadcast, all-to-all, all-to-allv, send/recv, a grouped ring, barrier), for
//! every `DType` and every `ReduceOp` that `check_reducible` accepts, at 1..=5 ranks and inside
//! groups made by `split` (nested too), checked bit for bit on every rank against the scalar
//! rank-order reference below (written on the `half` crate and plain integer arithmetic, not on
//! the kernels under test). The same tests run on `ThreadComm` and on `ShmComm`.
//!
//! The reference's rules (the contract of `collectives::reduce` and `ReduceOp`):
//! - f32, bf16, f16 accumulate in f32 and round once to the storage type; f64 in f64;
//! - integers wrap (two's complement); `Avg` is the rank-order sum divided by N, truncated toward
//!   zero for integers;
//! - `PreMulSum(s)`: each rank multiplies its input by its own `s` in the accumulation type (`s`
//!   rounded to f32 for the f32-accumulated types), rounds to the storage type, then the
//!   rank-order sum;
//! - `Max`/`Min`: the first NaN in rank order wins, of equal values the later rank's;
//! - a NaN result is the canonical quiet NaN.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use collectives::shm::{CommOptions, SegmentOptions};
use collectives::thread::ThreadComm;
use collectives::types::check_reducible;
use collectives::{CommError, Communicator, DType, P2p, ReduceOp, ShmComm};
use common::{first_diff, splitmix};
use half::{bf16, f16};

type Comm = Box<dyn Communicator>;

// ---------------------------------------------------------------------------------------------
// Communicators.

fn threads(n: usize) -> Vec<Comm> {
    ThreadComm::world(n)
        .into_iter()
        .map(|c| Box::new(c) as Comm)
        .collect()
}

/// Shared-memory options for tests: a short deadline, so a failing rank ends the test soon.
fn shm_opts(n: usize) -> CommOptions {
    let mut o = CommOptions::for_world(n);
    o.timeout = Duration::from_secs(60);
    o
}

fn shm(n: usize) -> Vec<Comm> {
    ShmComm::new_group_with(n, &SegmentOptions::default(), &shm_opts(n))
        .expect("shm group")
        .into_iter()
        .map(|c| Box::new(c) as Comm)
        .collect()
}

/// Every copy-only call takes the single-copy path (`direct_min` 0; all-reduce and reduce too,
/// with `one_shot_max` and `direct_reduce_min` 0), or never does.
fn shm_direct_min(n: usize, direct_min: usize) -> Vec<Comm> {
    let mut o = shm_opts(n);
    o.direct_min = direct_min;
    if direct_min == 0 {
        o.one_shot_max = 0;
        o.direct_reduce_min = 0;
        o.direct_rooted_min = 0;
    }
    ShmComm::new_group_with(n, &SegmentOptions::default(), &o)
        .expect("shm group")
        .into_iter()
        .map(|c| Box::new(c) as Comm)
        .collect()
}

fn shm_direct(n: usize) -> Vec<Comm> {
    shm_direct_min(n, 0)
}

fn shm_two_copies(n: usize) -> Vec<Comm> {
    shm_direct_min(n, usize::MAX)
}

/// Slots of 4 KiB, so the larger counts below take several slots' worth.
fn shm_small_slot(n: usize) -> Vec<Comm> {
    let seg = SegmentOptions {
        dir: None,
        slot_bytes: 4096,
    };
    ShmComm::new_group_with(n, &seg, &shm_opts(n))
        .expect("shm group")
        .into_iter()
        .map(|c| Box::new(c) as Comm)
        .collect()
}

/// Runs `f` for every communicator on its own thread, results in rank order. A rank that panics
/// drops its communicator while unwinding, which fails the others' waits; the first panic in
/// rank order is raised again here.
fn run_ranks<R: Send>(comms: Vec<Comm>, f: impl Fn(&mut dyn Communicator) -> R + Sync) -> Vec<R> {
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|mut c| {
                let f = &f;
                s.spawn(move || f(&mut *c))
            })
            .collect();
        let joined: Vec<_> = handles.into_iter().map(|h| h.join()).collect();
        joined
            .into_iter()
            .map(|r| r.unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    })
}

// ---------------------------------------------------------------------------------------------
// The reference.

fn signed(d: DType) -> bool {
    matches!(d, DType::I8 | DType::I32 | DType::I64)
}

/// `v` reduced to `d`'s width (two's complement), as the value of that type.
fn wrap(d: DType, v: i128) -> i128 {
    let bits = 8 * d.size() as u32;
    let low = (v as u128) & ((1u128 << bits) - 1);
    if signed(d) && (low >> (bits - 1)) == 1 {
        low as i128 - (1i128 << bits)
    } else {
        low as i128
    }
}

fn get_int(d: DType, b: &[u8]) -> i128 {
    let mut raw = [0u8; 16];
    raw[..b.len()].copy_from_slice(b);
    wrap(d, u128::from_le_bytes(raw) as i128)
}

fn put_int(d: DType, v: i128, out: &mut Vec<u8>) {
    out.extend_from_slice(&v.to_le_bytes()[..d.size()]);
}

fn get_f32(d: DType, b: &[u8]) -> f32 {
    match d {
        DType::F32 => f32::from_le_bytes(b.try_into().unwrap()),
        DType::BF16 => bf16::from_le_bytes(b.try_into().unwrap()).to_f32(),
        DType::F16 => f16::from_le_bytes(b.try_into().unwrap()).to_f32(),
        d => unreachable!("{d:?} is not f32-accumulated"),
    }
}

/// `v` stored as `d` (round to nearest even), as is (NaN payloads too).
fn put_f32_raw(d: DType, v: f32, out: &mut Vec<u8>) {
    match d {
        DType::F32 => out.extend_from_slice(&v.to_le_bytes()),
        DType::BF16 => out.extend_from_slice(&bf16::from_f32(v).to_le_bytes()),
        DType::F16 => out.extend_from_slice(&f16::from_f32(v).to_le_bytes()),
        d => unreachable!("{d:?} is not f32-accumulated"),
    }
}

/// A result: rounded to `d`, NaN as the canonical quiet NaN.
fn put_f32(d: DType, v: f32, out: &mut Vec<u8>) {
    if !v.is_nan() {
        return put_f32_raw(d, v, out);
    }
    match d {
        DType::F32 => out.extend_from_slice(&0x7FC0_0000u32.to_le_bytes()),
        DType::BF16 => out.extend_from_slice(&0x7FC0u16.to_le_bytes()),
        _ => out.extend_from_slice(&0x7E00u16.to_le_bytes()),
    }
}

/// `v` rounded to `d` and back (PreMulSum's scaled input).
fn round_to(d: DType, v: f32) -> f32 {
    let mut b = Vec::new();
    put_f32_raw(d, v, &mut b);
    get_f32(d, &b)
}

trait Acc:
    Copy
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
{
    fn nan(self) -> bool;
    fn count(n: usize) -> Self;
}
impl Acc for f32 {
    fn nan(self) -> bool {
        self.is_nan()
    }
    fn count(n: usize) -> Self {
        n as f32
    }
}
impl Acc for f64 {
    fn nan(self) -> bool {
        self.is_nan()
    }
    fn count(n: usize) -> Self {
        n as f64
    }
}

/// Rank-order fold of one element's (already pre-multiplied) values.
fn fold_float<T: Acc>(op: ReduceOp, xs: &[T]) -> T {
    let mut acc = xs[0];
    for &x in &xs[1..] {
        acc = match op {
            ReduceOp::Sum | ReduceOp::Avg | ReduceOp::PreMulSum(_) => acc + x,
            ReduceOp::Product => acc * x,
            ReduceOp::Max if acc.nan() || acc > x => acc,
            ReduceOp::Min if acc.nan() || acc < x => acc,
            ReduceOp::Max | ReduceOp::Min => x,
            o => panic!("{o:?} is not a float reduction"),
        };
    }
    if op == ReduceOp::Avg {
        acc / T::count(xs.len())
    } else {
        acc
    }
}

fn fold_int(d: DType, op: ReduceOp, xs: &[i128]) -> i128 {
    let mut acc = xs[0];
    for &x in &xs[1..] {
        acc = match op {
            ReduceOp::Sum | ReduceOp::Avg => wrap(d, acc + x),
            ReduceOp::Product => wrap(d, acc.wrapping_mul(x)),
            ReduceOp::Max => acc.max(x),
            ReduceOp::Min => acc.min(x),
            ReduceOp::BAnd => wrap(d, acc & x),
            ReduceOp::BOr => wrap(d, acc | x),
            ReduceOp::BXor => wrap(d, acc ^ x),
            o => panic!("{o:?} is not an integer reduction"),
        };
    }
    if op == ReduceOp::Avg {
        // i128 division truncates toward zero.
        acc / xs.len() as i128
    } else {
        acc
    }
}

/// The reduction of every rank's buffer; `op_of(r)` is rank `r`'s operator (PreMulSum factors
/// differ per rank).
fn reference(d: DType, op_of: &dyn Fn(usize) -> ReduceOp, inputs: &[Vec<u8>]) -> Vec<u8> {
    let (e, n) = (d.size(), inputs.len());
    let op = op_of(0);
    let count = inputs[0].len() / e;
    let mut out = Vec::with_capacity(inputs[0].len());
    for i in 0..count {
        let el = |r: usize| &inputs[r][i * e..(i + 1) * e];
        match d {
            DType::F64 => {
                let xs: Vec<f64> = (0..n)
                    .map(|r| {
                        let x = f64::from_le_bytes(el(r).try_into().unwrap());
                        match op_of(r) {
                            ReduceOp::PreMulSum(s) => x * s,
                            _ => x,
                        }
                    })
                    .collect();
                let v = fold_float(op, &xs);
                let bits = if v.is_nan() {
                    0x7FF8_0000_0000_0000
                } else {
                    v.to_bits()
                };
                out.extend_from_slice(&bits.to_le_bytes());
            }
            DType::F32 | DType::BF16 | DType::F16 => {
                let xs: Vec<f32> = (0..n)
                    .map(|r| {
                        let x = get_f32(d, el(r));
                        match op_of(r) {
                            ReduceOp::PreMulSum(s) => round_to(d, x * s as f32),
                            _ => x,
                        }
                    })
                    .collect();
                put_f32(d, fold_float(op, &xs), &mut out);
            }
            _ => {
                let xs: Vec<i128> = (0..n).map(|r| get_int(d, el(r))).collect();
                put_int(d, fold_int(d, op, &xs), &mut out);
            }
        }
    }
    out
}

/// Rank `rank`'s input of `count` `d` elements for `seed`: floats are mostly finite with full
/// mantissas, with NaNs (signed, with payloads), infinities, ±0 and repeated values among them;
/// integers are mostly full-range (sums and products wrap) and sometimes small (ties, averages).
fn input(seed: u64, rank: usize, d: DType, count: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(count * d.size());
    for i in 0..count {
        let h = splitmix(
            seed ^ ((rank as u64) << 40)
                ^ ((d as u64) << 56)
                ^ (i as u64).wrapping_mul(0x1000_0000_01B3),
        );
        if d.is_int() {
            let v = if h.is_multiple_of(4) {
                ((h >> 8) % 7) as i128 - 3
            } else {
                (h >> 2) as i128
            };
            put_int(d, wrap(d, v), &mut out);
            continue;
        }
        let base = common::value(seed, rank, i) as f64;
        let v: f64 = match h % 32 {
            0 => f64::from_bits(0xFFF8_0000_0000_1234),
            1 => f64::INFINITY,
            2 => f64::NEG_INFINITY,
            3 => 0.0,
            4 => -0.0,
            5 => 1.5,
            // f64 gets low mantissa bits too.
            _ => base * (1.0 + (h >> 12) as f64 * 2f64.powi(-60)),
        };
        match d {
            DType::F64 => out.extend_from_slice(&v.to_le_bytes()),
            _ if h.is_multiple_of(32) => put_f32_raw(d, f32::from_bits(0xFFC0_1234), &mut out),
            _ => put_f32_raw(d, v as f32, &mut out),
        }
    }
    out
}

/// Rank `r`'s PreMulSum factor: every rank a different one, some not representable in f32.
fn factor(r: usize) -> f64 {
    [0.5, -1.25, 3.0, 0.1, 1e-3, 7.0][r % 6]
}

/// What rank `r` passes for `op`: PreMulSum with its own factor, every other operator as is.
fn op_for(op: ReduceOp, r: usize) -> ReduceOp {
    match op {
        ReduceOp::PreMulSum(_) => ReduceOp::PreMulSum(factor(r)),
        o => o,
    }
}

// ---------------------------------------------------------------------------------------------
// The suite.

fn check(what: &str, ctx: &str, got: &[u8], want: &[u8], e: usize) {
    if got != want {
        panic!(
            "{what} {ctx}: differs from the reference at element {:?} (got {} bytes, want {})",
            first_diff(got, want, e),
            got.len(),
            want.len()
        );
    }
}

fn ok<T>(what: &str, ctx: &str, r: collectives::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{what} {ctx}: {e}"))
}

/// Elements rank `src` sends rank `dst` in the all-to-allv of `count`: uneven, zeros included.
fn v_count(src: usize, dst: usize, count: usize) -> usize {
    (src * 3 + dst * 5 + count) % 4 * (1 + count / 8)
}

/// Rank `r`'s all-to-allv input: its chunks for every rank, packed in rank order.
fn v_input(seed: u64, r: usize, d: DType, n: usize, count: usize) -> Vec<u8> {
    let total = (0..n).map(|p| v_count(r, p, count)).sum();
    input(seed, r, d, total)
}

/// Rank `src`'s chunk for `dst` in its all-to-allv input.
fn v_chunk(seed: u64, src: usize, dst: usize, d: DType, n: usize, count: usize) -> Vec<u8> {
    let e = d.size();
    let off: usize = (0..dst).map(|p| v_count(src, p, count)).sum();
    v_input(seed, src, d, n, count)[off * e..(off + v_count(src, dst, count)) * e].to_vec()
}

/// Every operation, every type, every accepted reduction, for each of `counts`, on this rank of
/// the group `c`. `barriers` is the group's own counter: every rank adds one before each
/// barrier, so after its k-th barrier a rank must see at least k × N.
fn suite(c: &mut dyn Communicator, seed: u64, counts: &[usize], barriers: &AtomicUsize) {
    let (n, me) = (c.world_size(), c.rank());
    let mut case = 0u64;
    let mut barrier_k = 0;
    for d in DType::ALL {
        for &count in counts {
            case += 1;
            let s = seed ^ (case << 20);
            let e = d.size();
            let ctx = format!("{d:?} count {count} on rank {me} of {n}");
            let all: Vec<Vec<u8>> = (0..n).map(|r| input(s, r, d, count)).collect();
            let mine = &all[me];

            // all_gather
            let mut out = vec![0u8; n * count * e];
            ok("all_gather", &ctx, c.all_gather_raw(mine, &mut out, d));
            check("all_gather", &ctx, &out, &all.concat(), e);

            for root in 0..n {
                let rctx = format!("{ctx} root {root}");
                // gather (the non-roots' output may be empty)
                let mut out = if me == root {
                    vec![0u8; n * count * e]
                } else {
                    Vec::new()
                };
                ok("gather", &rctx, c.gather_raw(mine, &mut out, d, root));
                if me == root {
                    check("gather", &rctx, &out, &all.concat(), e);
                }
                // scatter (the non-roots' input may be empty)
                let big = input(s ^ 0x5CA7, root, d, n * count);
                let sin = if me == root { big.clone() } else { Vec::new() };
                let mut out = vec![0u8; count * e];
                ok("scatter", &rctx, c.scatter_raw(&sin, &mut out, d, root));
                let want = &big[me * count * e..(me + 1) * count * e];
                check("scatter", &rctx, &out, want, e);
                // broadcast
                let mut buf = mine.clone();
                ok("broadcast", &rctx, c.broadcast_raw(&mut buf, root));
                check("broadcast", &rctx, &buf, &all[root], e);
            }

            // all_to_all: chunk p of rank r's input goes to rank p.
            let a2a = |r: usize| input(s ^ 0xA2A, r, d, n * count);
            let mut out = vec![0u8; n * count * e];
            ok("all_to_all", &ctx, c.all_to_all_raw(&a2a(me), &mut out, d));
            let want: Vec<u8> = (0..n)
                .flat_map(|p| a2a(p)[me * count * e..(me + 1) * count * e].to_vec())
                .collect();
            check("all_to_all", &ctx, &out, &want, e);

            // all_to_allv with uneven counts (zeros among them)
            let sv = s ^ 0xA2A5;
            let send_counts: Vec<usize> = (0..n).map(|p| v_count(me, p, count)).collect();
            let recv_counts: Vec<usize> = (0..n).map(|p| v_count(p, me, count)).collect();
            let mut out = vec![0u8; recv_counts.iter().sum::<usize>() * e];
            let vin = v_input(sv, me, d, n, count);
            ok(
                "all_to_allv",
                &ctx,
                c.all_to_allv_raw(&vin, &send_counts, &mut out, &recv_counts, d),
            );
            let want: Vec<u8> = (0..n)
                .flat_map(|p| v_chunk(sv, p, me, d, n, count))
                .collect();
            check("all_to_allv", &ctx, &out, &want, e);

            // Blocking send/recv in pairs (0, 1), (2, 3)...: the even rank sends first.
            let partner = if me % 2 == 0 { me + 1 } else { me - 1 };
            if partner < n {
                let mut got = vec![0u8; count * e];
                let send = [P2p::Send {
                    buf: mine,
                    peer: partner,
                }];
                let recv = [P2p::Recv {
                    buf: &mut got,
                    peer: partner,
                }];
                let (first, second) = if me % 2 == 0 {
                    (send, recv)
                } else {
                    (recv, send)
                };
                for mut op in [first, second] {
                    ok("send/recv", &ctx, c.send_recv_raw(&mut op, d));
                }
                check("send/recv", &ctx, &got, &all[partner], e);
            }

            // A grouped ring: two messages to the next rank, one to itself, receives listed
            // before the sends they depend on (a grouped call must not deadlock on that).
            let (next, prev) = ((me + 1) % n, (me + n - 1) % n);
            let second = |r: usize| input(s ^ 0x2, r, d, count + 1);
            let mine2 = second(me);
            let (mut r1, mut r2, mut rs) = (
                vec![0u8; count * e],
                vec![0u8; (count + 1) * e],
                vec![0u8; (count + 1) * e],
            );
            let mut ops = [
                P2p::Recv {
                    buf: &mut r1,
                    peer: prev,
                },
                P2p::Recv {
                    buf: &mut r2,
                    peer: prev,
                },
                P2p::Recv {
                    buf: &mut rs,
                    peer: me,
                },
                P2p::Send {
                    buf: mine,
                    peer: next,
                },
                P2p::Send {
                    buf: &mine2,
                    peer: next,
                },
                P2p::Send {
                    buf: &mine2,
                    peer: me,
                },
            ];
            ok("ring", &ctx, c.send_recv_raw(&mut ops, d));
            check("ring 1st", &ctx, &r1, &all[prev], e);
            check("ring 2nd", &ctx, &r2, &second(prev), e);
            check("ring self", &ctx, &rs, &mine2, e);

            // Reductions.
            for (k, op) in ReduceOp::ALL.into_iter().enumerate() {
                if check_reducible("test", d, op).is_err() {
                    continue;
                }
                let op_of = |r: usize| op_for(op, r);
                let octx = format!("{ctx} {}", op.name());
                let want = reference(d, &op_of, &all);
                let mut buf = mine.clone();
                ok(
                    "all_reduce",
                    &octx,
                    c.all_reduce_raw(&mut buf, d, op_of(me)),
                );
                check("all_reduce", &octx, &buf, &want, e);
                // Out of place.
                let mut out = vec![0xA5u8; mine.len()];
                ok(
                    "all_reduce_into",
                    &octx,
                    c.all_reduce_into_raw(mine, &mut out, d, op_of(me)),
                );
                check("all_reduce_into", &octx, &out, &want, e);

                let rs_all: Vec<Vec<u8>> =
                    (0..n).map(|r| input(s ^ 0x75, r, d, n * count)).collect();
                let want_rs = reference(d, &op_of, &rs_all);
                let mut out = vec![0u8; count * e];
                ok(
                    "reduce_scatter",
                    &octx,
                    c.reduce_scatter_raw(&rs_all[me], &mut out, d, op_of(me)),
                );
                let want = &want_rs[me * count * e..(me + 1) * count * e];
                check("reduce_scatter", &octx, &out, want, e);

                // Every root in turn over the cases.
                let root = (case as usize + k) % n;
                let mut buf = mine.clone();
                ok("reduce", &octx, c.reduce_raw(&mut buf, d, op_of(me), root));
                let want = if me == root {
                    reference(d, &op_of, &all)
                } else {
                    mine.clone()
                };
                check(&format!("reduce to {root}"), &octx, &buf, &want, e);
            }

            barrier_k += 1;
            barriers.fetch_add(1, Ordering::SeqCst);
            ok("barrier", &ctx, c.barrier());
            let seen = barriers.load(Ordering::SeqCst);
            assert!(
                seen >= barrier_k * n,
                "barrier {ctx}: returned after {seen} arrivals, expected at least {}",
                barrier_k * n
            );
        }
    }
}

const COUNTS: &[usize] = &[0, 1, 5, 70];
/// Larger than a 4 KiB slot for every type (3001 bytes of u8 too, with the all-to-alls and
/// gathers N times that).
const LARGE: &[usize] = &[3001];

fn worlds(make: &dyn Fn(usize) -> Vec<Comm>, sizes: &[usize], counts: &[usize]) {
    for &n in sizes {
        let barriers = AtomicUsize::new(0);
        run_ranks(make(n), |c| {
            suite(c, 0xC0FFEE + n as u64, counts, &barriers)
        });
    }
}

/// MPI_Comm_split order: the ranks whose color is `color`, by (key, rank).
fn mpi_order(colors_keys: &[(Option<u32>, i64)], color: u32) -> Vec<usize> {
    let mut m: Vec<(i64, usize)> = colors_keys
        .iter()
        .enumerate()
        .filter(|(_, (c, _))| *c == Some(color))
        .map(|(r, &(_, k))| (k, r))
        .collect();
    m.sort();
    m.into_iter().map(|(_, r)| r).collect()
}

/// The world ranks of `g`'s members in its rank order (an all-gather of each one's world rank).
fn members(g: &mut dyn Communicator, world_rank: usize) -> Vec<usize> {
    let mut out = vec![0u8; 8 * g.world_size()];
    ok(
        "all_gather of world ranks",
        "",
        g.all_gather_raw(&(world_rank as u64).to_le_bytes(), &mut out, DType::U64),
    );
    out.chunks(8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap()) as usize)
        .collect()
}

/// 5 ranks split by rank % 2 with keys that reorder them, the suite in both groups at once;
/// then a nested split of each group (one rank of the larger group opts out, keys reversed) and
/// the suite again there, while the world and the first groups stay alive and usable.
fn split_groups(make: &dyn Fn(usize) -> Vec<Comm>, counts: &[usize]) {
    let n = 5;
    let key = |r: usize| (r as i64 * 7) % 3;
    let level1: Vec<(Option<u32>, i64)> = (0..n).map(|r| (Some((r % 2) as u32), key(r))).collect();
    let counters: Vec<AtomicUsize> = (0..8).map(|_| AtomicUsize::new(0)).collect();
    run_ranks(make(n), |c| {
        let me = c.rank();
        let color = (me % 2) as u32;
        let mut g = ok("split", "", c.split(Some(color), key(me))).expect("a member of its color");
        let want = mpi_order(&level1, color);
        assert_eq!(members(&mut *g, me), want, "rank {me}: level-1 members");
        assert_eq!(g.rank(), want.iter().position(|&r| r == me).unwrap());
        suite(
            &mut *g,
            0x5EED + color as u64,
            counts,
            &counters[color as usize],
        );

        // Nested: in the group of 3 its rank 1 opts out; keys reversed.
        let gsize = g.world_size();
        let level2: Vec<(Option<u32>, i64)> = (0..gsize)
            .map(|j| {
                let c2 = if gsize == 3 && j == 1 { None } else { Some(0) };
                (c2, -(j as i64))
            })
            .collect();
        let (c2, k2) = level2[g.rank()];
        let nested = ok("nested split", "", g.split(c2, k2));
        match nested {
            None => assert!(
                c2.is_none(),
                "rank {me}: no nested group though it asked for one"
            ),
            Some(mut h) => {
                let want: Vec<usize> = mpi_order(&level2, 0).iter().map(|&j| want[j]).collect();
                assert_eq!(members(&mut *h, me), want, "rank {me}: nested members");
                let slot = 2 + color as usize;
                suite(&mut *h, 0xAE57 + color as u64, counts, &counters[slot]);
            }
        }
        // The world and the first-level group still work.
        let mut v = (me as u32 + 1).to_le_bytes();
        ok(
            "world all_reduce",
            "",
            c.all_reduce_raw(&mut v, DType::U32, ReduceOp::Sum),
        );
        assert_eq!(u32::from_le_bytes(v), 15);
        ok("group barrier", "", g.barrier());
    });
}

/// Every refusal returns `CommError::Invalid` on every rank without moving data; the
/// communicator works afterwards.
fn refusals(c: &mut dyn Communicator) {
    let (n, me) = (c.world_size(), c.rank());
    let invalid = |what: &str, r: collectives::Result<()>| match r {
        Err(CommError::Invalid { .. }) => {}
        other => panic!("{what} on rank {me} of {n}: expected an Invalid error, got {other:?}"),
    };
    let mut ops = ReduceOp::ALL.to_vec();
    ops.extend([
        ReduceOp::PreMulSum(f64::NAN),
        ReduceOp::PreMulSum(f64::INFINITY),
    ]);
    for d in DType::ALL {
        for &op in &ops {
            if check_reducible("test", d, op).is_ok() {
                continue;
            }
            let what = format!("{} of {d:?}", op.name());
            let mut buf = vec![0u8; 4 * d.size()];
            invalid(&what, c.all_reduce_raw(&mut buf, d, op));
            let inp = vec![0u8; 4 * n * d.size()];
            invalid(&what, c.reduce_scatter_raw(&inp, &mut buf, d, op));
            invalid(&what, c.reduce_raw(&mut buf, d, op, 0));
        }
    }
    let f = DType::F32;
    let mut four = [0u8; 4];
    let mut big = vec![0u8; 4 * n];
    // Roots and peers out of range.
    invalid("broadcast root n", c.broadcast_raw(&mut four, n));
    invalid(
        "reduce root n",
        c.reduce_raw(&mut four, f, ReduceOp::Sum, n),
    );
    invalid("gather root n", c.gather_raw(&[0; 4], &mut big, f, n));
    invalid(
        "scatter root n",
        c.scatter_raw(&big.clone(), &mut four, f, n),
    );
    let send_n = &mut [P2p::Send {
        buf: &[0; 4],
        peer: n,
    }];
    invalid("send to rank n", c.send_recv_raw(send_n, f));
    let recv_n = &mut [P2p::Recv {
        buf: &mut four,
        peer: n,
    }];
    invalid("recv from rank n", c.send_recv_raw(recv_n, f));
    // Sizes and counts.
    invalid("all_reduce of 3 bytes of f32", {
        let mut b = [0u8; 3];
        c.all_reduce_raw(&mut b, f, ReduceOp::Sum)
    });
    let mut wrong = vec![0u8; 4 * n + 4];
    invalid(
        "all_gather into N+1",
        c.all_gather_raw(&[0; 4], &mut wrong, f),
    );
    invalid(
        "reduce_scatter of N+1",
        c.reduce_scatter_raw(&wrong.clone(), &mut four, f, ReduceOp::Sum),
    );
    invalid("gather of 3 bytes of f32", {
        let mut out = vec![0u8; 3 * n];
        c.gather_raw(&[0; 3], &mut out, f, 0)
    });
    invalid("scatter into 3 bytes of f32", {
        let mut out = [0u8; 3];
        c.scatter_raw(&vec![0u8; 3 * n], &mut out, f, 0)
    });
    invalid("all_to_all of unequal buffers", {
        let mut out = vec![0u8; 4 * n + 4];
        c.all_to_all_raw(&vec![0u8; 4 * n], &mut out, f)
    });
    if n > 1 {
        invalid("all_to_all of N+1 elements", {
            let mut out = vec![0u8; 4 * n + 4];
            c.all_to_all_raw(&vec![0u8; 4 * n + 4], &mut out, f)
        });
    }
    let ones = vec![1usize; n];
    invalid("all_to_allv with N+1 counts", {
        let mut out = vec![0u8; 4 * n];
        c.all_to_allv_raw(&vec![0u8; 4 * n], &vec![1; n + 1], &mut out, &ones, f)
    });
    invalid("all_to_allv with counts not adding up", {
        let mut out = vec![0u8; 4 * n];
        c.all_to_allv_raw(&vec![0u8; 4 * n + 4], &ones, &mut out, &ones, f)
    });
    invalid("all_to_allv sending itself a different count", {
        let mut sc = ones.clone();
        sc[me] = 2;
        let mut out = vec![0u8; 4 * n];
        c.all_to_allv_raw(&vec![0u8; 4 * (n + 1)], &sc, &mut out, &ones, f)
    });
    invalid("send of 3 bytes of f32", {
        let send = &mut [P2p::Send {
            buf: &[0; 3],
            peer: me,
        }];
        c.send_recv_raw(send, f)
    });
    // Still usable: nothing was left half done.
    let mut v = 1u64.to_le_bytes();
    ok("all_reduce after refusals", "", {
        c.barrier()
            .and_then(|()| c.all_reduce_raw(&mut v, DType::U64, ReduceOp::Sum))
    });
    assert_eq!(u64::from_le_bytes(v), n as u64);
}

// ---------------------------------------------------------------------------------------------
// ThreadComm.

#[test]
fn thread_every_op_type_and_reduction_at_1_to_5_ranks() {
    worlds(&threads, &[1, 2, 3, 4, 5], COUNTS);
}

#[test]
fn thread_larger_counts() {
    worlds(&threads, &[2, 5], LARGE);
}

#[test]
fn thread_every_op_in_split_and_nested_groups() {
    split_groups(&threads, COUNTS);
}

#[test]
fn thread_refusals() {
    for n in [1, 2, 3] {
        run_ranks(threads(n), refusals);
    }
}

/// The reference itself, on values worked out by hand (so a reference bug that mirrors a kernel
/// bug cannot hide).
#[test]
fn reference_by_hand() {
    let i8s = |v: &[i8]| -> Vec<Vec<u8>> { v.iter().map(|x| x.to_le_bytes().to_vec()).collect() };
    let r = |op, v: &[i8]| reference(DType::I8, &|_| op, &i8s(v))[0] as i8;
    assert_eq!(r(ReduceOp::Sum, &[100, 100]), -56);
    assert_eq!(r(ReduceOp::Avg, &[100, 100]), -28);
    assert_eq!(r(ReduceOp::Avg, &[-7, 0]), -3);
    assert_eq!(r(ReduceOp::Product, &[16, 16]), 0);
    assert_eq!(r(ReduceOp::Max, &[-1, -3]), -1);
    assert_eq!(r(ReduceOp::BXor, &[-1, 1]), -2);
    let u64s: Vec<Vec<u8>> = [u64::MAX, 3]
        .iter()
        .map(|x| x.to_le_bytes().to_vec())
        .collect();
    let p = reference(DType::U64, &|_| ReduceOp::Product, &u64s);
    assert_eq!(u64::from_le_bytes(p.try_into().unwrap()), u64::MAX - 2);
    let m = reference(DType::U64, &|_| ReduceOp::Max, &u64s);
    assert_eq!(u64::from_le_bytes(m.try_into().unwrap()), u64::MAX);

    let bf = |v: &[f32]| -> Vec<Vec<u8>> {
        v.iter()
            .map(|x| bf16::from_f32(*x).to_le_bytes().to_vec())
            .collect()
    };
    let out = |op: &dyn Fn(usize) -> ReduceOp, v: &[f32]| {
        bf16::from_le_bytes(reference(DType::BF16, op, &bf(v)).try_into().unwrap()).to_bits()
    };
    // 256 + 1 + 1 in f32 = 258, one rounding to bf16 (258 is representable); rounding per step
    // would give 256.
    assert_eq!(out(&|_| ReduceOp::Sum, &[256.0, 1.0, 1.0]), 0x4381);
    assert_eq!(
        out(&|_| ReduceOp::Avg, &[1.0, 2.0]),
        bf16::from_f32(1.5).to_bits()
    );
    // PreMulSum: 3 * 0.5 + 1 * -1.25 = 0.25.
    let pm = |r: usize| ReduceOp::PreMulSum([0.5, -1.25][r]);
    assert_eq!(out(&pm, &[3.0, 1.0]), bf16::from_f32(0.25).to_bits());
    // The first NaN wins and is stored canonically; ties take the later rank (+0 after -0).
    assert_eq!(out(&|_| ReduceOp::Max, &[f32::NAN, 1.0]), 0x7FC0);
    assert_eq!(out(&|_| ReduceOp::Max, &[-0.0, 0.0]), 0x0000);
    assert_eq!(out(&|_| ReduceOp::Min, &[0.0, -0.0]), 0x8000);
}

// ---------------------------------------------------------------------------------------------
// ShmComm (in-process groups over a memfd segment).

#[test]
fn shm_every_op_type_and_reduction_at_1_to_5_ranks() {
    worlds(&shm, &[1, 2, 3, 4, 5], COUNTS);
}

#[test]
fn shm_larger_than_the_slot() {
    worlds(&shm_small_slot, &[2, 3, 5], LARGE);
}

#[test]
fn shm_every_op_in_split_and_nested_groups() {
    split_groups(&shm, COUNTS);
}

#[test]
fn shm_split_groups_larger_than_the_slot() {
    split_groups(&shm_small_slot, LARGE);
}

#[test]
fn shm_single_copy_every_op_at_1_to_5_ranks_and_in_groups() {
    worlds(&shm_direct, &[1, 2, 3, 4, 5], COUNTS);
    worlds(&shm_direct, &[2, 3], LARGE);
    split_groups(&shm_direct, COUNTS);
}

#[test]
fn shm_two_copies_only_every_op_and_larger_than_the_slot() {
    worlds(&shm_two_copies, &[2, 3], COUNTS);
    worlds(&shm_two_copies, &[2, 3], LARGE);
}

#[test]
fn shm_refusals() {
    for n in [1, 2, 3] {
        run_ranks(shm(n), refusals);
    }
}
