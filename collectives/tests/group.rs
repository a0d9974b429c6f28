//! Seeded property tests over in-process groups (one thread per rank): random scripts of mixed,
//! back-to-back collectives for 1 to 8 ranks, every dtype and reduce op, counts from 0 through
//! primes to several slots' worth (pipelining, both all-reduce algorithms). Every output must
//! equal the serial rank-order reference bit for bit, on every rank.

mod common;

use collectives::shm::{CommOptions, SegmentOptions};
use collectives::{CommExt, Communicator, DType, ReduceOp, ShmComm};
use common::*;

#[derive(Clone, Copy, Debug)]
enum Kind {
    AllReduce,
    AllGather,
    ReduceScatter,
    Broadcast(usize),
    Barrier,
}

#[derive(Clone, Copy, Debug)]
struct Spec {
    kind: Kind,
    dtype: DType,
    op: ReduceOp,
    count: usize,
    seed: u64,
}

/// The same script for every rank (derived from `seed` only).
fn script(seed: u64, n: usize, len: usize, counts: &[usize]) -> Vec<Spec> {
    let mut out = Vec::new();
    let mut st = seed;
    let mut next = || {
        st = splitmix(st);
        st
    };
    for _ in 0..len {
        let r = next();
        let dtype = all_dtypes()[(r % 3) as usize];
        let op = match (r >> 8) % 6 {
            0 => ReduceOp::Max,
            1 => ReduceOp::Min,
            2 => ReduceOp::Product,
            _ => ReduceOp::Sum,
        };
        let count = counts[((r >> 16) % counts.len() as u64) as usize];
        let seed = next();
        let kinds: Vec<Kind> = match (r >> 32) % 5 {
            0 => vec![Kind::AllReduce],
            1 => vec![Kind::AllGather],
            2 => vec![Kind::ReduceScatter],
            // Broadcast from every root in turn.
            3 => (0..n).map(Kind::Broadcast).collect(),
            _ => vec![Kind::Barrier, Kind::AllReduce],
        };
        for kind in kinds {
            out.push(Spec {
                kind,
                dtype,
                op,
                count,
                seed,
            });
        }
    }
    out
}

/// Runs one spec on one rank and checks its output; returns the output for cross-rank checks.
fn run_spec(c: &mut ShmComm, s: &Spec) -> Result<Vec<u8>, String> {
    let (n, me, e) = (c.world_size(), c.rank(), s.dtype.size());
    let fail = |what: &str, got: &[u8], want: &[u8]| {
        let at = first_diff(got, want, e);
        format!("{s:?} on rank {me}/{n}: {what} differs from the reference at element {at:?}")
    };
    match s.kind {
        Kind::AllReduce => {
            let mut buf = input(s.seed, me, s.dtype, s.count);
            c.all_reduce_raw(&mut buf, s.dtype, s.op)
                .map_err(|e| format!("{s:?}: {e}"))?;
            let inputs: Vec<_> = (0..n).map(|r| input(s.seed, r, s.dtype, s.count)).collect();
            let want = reference(s.dtype, s.op, &inputs);
            if buf != want {
                return Err(fail("all_reduce", &buf, &want));
            }
            Ok(buf)
        }
        Kind::AllGather => {
            let inp = input(s.seed, me, s.dtype, s.count);
            let mut out = vec![0xAAu8; inp.len() * n];
            c.all_gather_raw(&inp, &mut out, s.dtype)
                .map_err(|e| format!("{s:?}: {e}"))?;
            let want: Vec<u8> = (0..n)
                .flat_map(|r| input(s.seed, r, s.dtype, s.count))
                .collect();
            if out != want {
                return Err(fail("all_gather", &out, &want));
            }
            Ok(out)
        }
        Kind::ReduceScatter => {
            let inp = input(s.seed, me, s.dtype, s.count * n);
            let mut out = vec![0xAAu8; s.count * e];
            c.reduce_scatter_raw(&inp, &mut out, s.dtype, s.op)
                .map_err(|e| format!("{s:?}: {e}"))?;
            let seg = |r: usize| {
                let all = input(s.seed, r, s.dtype, s.count * n);
                all[me * s.count * e..(me + 1) * s.count * e].to_vec()
            };
            let inputs: Vec<_> = (0..n).map(seg).collect();
            let want = reference(s.dtype, s.op, &inputs);
            if out != want {
                return Err(fail("reduce_scatter", &out, &want));
            }
            Ok(Vec::new())
        }
        Kind::Broadcast(root) => {
            let mut buf = input(s.seed, me, s.dtype, s.count);
            c.broadcast_raw(&mut buf, root)
                .map_err(|e| format!("{s:?}: {e}"))?;
            let want = input(s.seed, root, s.dtype, s.count);
            if buf != want {
                return Err(fail("broadcast", &buf, &want));
            }
            Ok(buf)
        }
        Kind::Barrier => {
            c.barrier().map_err(|e| format!("{s:?}: {e}"))?;
            Ok(Vec::new())
        }
    }
}

/// Runs `script` on `n` ranks; every rank must match the reference, and ranks must agree.
fn check_group(n: usize, seg: &SegmentOptions, opts: &CommOptions, script: &[Spec]) {
    let comms = ShmComm::new_group_with(n, seg, opts).expect("group");
    let results = on_ranks(comms, |mut c| {
        let mut outs = Vec::new();
        for s in script {
            outs.push(run_spec(&mut c, s)?);
        }
        let stats = c.stats();
        let calls: u64 = stats.ops.iter().map(|o| o.count).sum();
        if calls != script.len() as u64 {
            return Err(format!(
                "stats counted {calls} calls, expected {}",
                script.len()
            ));
        }
        Ok::<_, String>(outs)
    });
    let mut ok = Vec::new();
    for (r, res) in results.into_iter().enumerate() {
        match res {
            Ok(o) => ok.push(o),
            Err(e) => panic!("rank {r}: {e}"),
        }
    }
    for r in 1..n {
        assert!(ok[r] == ok[0], "rank {r} got different bits than rank 0");
    }
}

fn small_slot() -> SegmentOptions {
    SegmentOptions {
        dir: None,
        slot_bytes: 4096,
    }
}

const SMALL_COUNTS: &[usize] = &[
    0, 1, 2, 3, 5, 7, 13, 16, 31, 61, 64, 127, 257, 1021, 1031, 4099, 10007,
];

/// Slot of 4 KiB so that a few thousand elements already take many pipelined chunks; all-reduces
/// above 1 KiB use reduce-scatter + all-gather.
#[test]
fn random_scripts_small_slots_rs_ag() {
    for n in 1..=8 {
        let mut opts = CommOptions::for_world(n);
        opts.one_shot_max = 1024;
        let sc = script(1000 + n as u64, n, 24, SMALL_COUNTS);
        check_group(n, &small_slot(), &opts, &sc);
    }
}

/// Same, with every all-reduce one-shot (chunked by slot).
#[test]
fn random_scripts_small_slots_one_shot() {
    for n in 1..=8 {
        let mut opts = CommOptions::for_world(n);
        opts.one_shot_max = usize::MAX;
        let sc = script(2000 + n as u64, n, 24, SMALL_COUNTS);
        check_group(n, &small_slot(), &opts, &sc);
    }
}

/// The default segment and thresholds, with messages larger than the 1 MiB slot.
#[test]
fn default_slots_large_messages() {
    for n in [2, 3, 5, 8] {
        let counts = [300_007usize, 70_001, 4099];
        let sc = script(3000 + n as u64, n, 6, &counts);
        check_group(
            n,
            &SegmentOptions::default(),
            &CommOptions::for_world(n),
            &sc,
        );
    }
}

/// All-reduce of every size around the one-shot / RS+AG switch gives the same bits as the other
/// algorithm (the result may not depend on the algorithm).
#[test]
fn algorithms_agree() {
    let n = 3;
    for dtype in all_dtypes() {
        for count in [255usize, 256, 257, 1000, 1025, 3001] {
            let mut outs = Vec::new();
            for one_shot_max in [0usize, usize::MAX] {
                let mut opts = CommOptions::for_world(n);
                opts.one_shot_max = one_shot_max;
                let comms = ShmComm::new_group_with(n, &small_slot(), &opts).unwrap();
                let res = on_ranks(comms, |mut c| {
                    let mut buf = input(7, c.rank(), dtype, count);
                    c.all_reduce_raw(&mut buf, dtype, ReduceOp::Sum).unwrap();
                    buf
                });
                outs.push(res);
            }
            assert_eq!(outs[0], outs[1], "{dtype:?} count {count}");
        }
    }
}

/// The typed helpers (what the model calls) on a group made with the plain constructor.
#[test]
fn typed_helpers() {
    let comms = ShmComm::new_group(4).unwrap();
    on_ranks(comms, |mut c| {
        let r = c.rank() as f32;
        let mut v = vec![r; 10];
        c.all_reduce(&mut v, ReduceOp::Sum).unwrap();
        assert_eq!(v, vec![6.0; 10]);
        let mut m = vec![half::bf16::from_f32(r); 3];
        c.all_reduce(&mut m, ReduceOp::Max).unwrap();
        assert_eq!(m, vec![half::bf16::from_f32(3.0); 3]);
        let mut g = vec![0f32; 8];
        c.all_gather(&[r, r + 0.5], &mut g).unwrap();
        assert_eq!(g, vec![0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5]);
        let inp: Vec<half::f16> = (0..8).map(|i| half::f16::from_f32(i as f32)).collect();
        let mut out = vec![half::f16::ZERO; 2];
        c.reduce_scatter(&inp, &mut out, ReduceOp::Sum).unwrap();
        let k = 2.0 * c.rank() as f32;
        assert_eq!(
            out,
            vec![
                half::f16::from_f32(4.0 * k),
                half::f16::from_f32(4.0 * (k + 1.0))
            ]
        );
        let mut b = vec![r; 5];
        c.broadcast(&mut b, 2).unwrap();
        assert_eq!(b, vec![2.0; 5]);
        c.barrier().unwrap();
        let st = c.stats();
        assert_eq!(st.get(collectives::OpKind::AllReduce).count, 2);
        assert_eq!(st.get(collectives::OpKind::AllReduce).bytes, 40 + 6);
        assert_eq!(st.get(collectives::OpKind::AllGather).bytes, 32);
        assert_eq!(st.get(collectives::OpKind::ReduceScatter).bytes, 16);
        assert_eq!(st.get(collectives::OpKind::Barrier).count, 1);
    });
}
