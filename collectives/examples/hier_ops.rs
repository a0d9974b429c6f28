//! A rank program that checks every point-to-point, rooted, personalised and group operation of
//! this rank's communicator against a scalar rank-order reference, bit for bit, at several sizes
//! and types; for the hierarchical (MPI) communicator under
//! `TPRUN_PRETEND_NODES=2 mpirun -np 4 target/debug/examples/hier_ops` (tests/multinode.rs runs
//! the same code), but any communicator of 2 or more ranks will do.
//!
//! Every rank can compute every rank's input (a hash of rank, element and a per-call salt), so
//! each checks its own result without trusting another rank. Prints `hier_ops: rank R of N: K
//! checks passed` and exits 0; the first wrong value is an error naming the op, the group, the
//! element and both values.

use anyhow::{ensure, Result};
use collectives::{CommExt, Communicator, ReduceOp};

#[allow(dead_code)]
fn main() -> Result<()> {
    let res = run();
    collectives::end_job(res.is_ok());
    println!("{}", res?);
    Ok(())
}

/// A well-mixed 64-bit value of `(salt, rank, i)`.
fn mix(salt: u64, rank: usize, i: usize) -> u64 {
    let mut z = salt
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add((rank as u64) << 32)
        .wrapping_add(i as u64);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// f32 inputs whose rank-order sum differs from other orders (mixed magnitudes and signs).
fn f32_of(salt: u64, rank: usize, i: usize) -> f32 {
    let m = mix(salt, rank, i);
    let mag = [1e-3f32, 1.0, 1e4][(m % 3) as usize];
    ((m >> 8) % 20_001) as f32 / 10_000.0 * mag - mag
}

fn f64_of(salt: u64, rank: usize, i: usize) -> f64 {
    let m = mix(salt, rank, i);
    ((m >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * [1e-6, 1.0, 1e9][(m % 3) as usize]
}

fn i64_of(salt: u64, rank: usize, i: usize) -> i64 {
    mix(salt, rank, i) as i64
}

fn i32_of(salt: u64, rank: usize, i: usize) -> i32 {
    mix(salt, rank, i) as i32
}

fn u8_of(salt: u64, rank: usize, i: usize) -> u8 {
    mix(salt, rank, i) as u8
}

/// The group's name in messages: `world`, `world/split(c)`...
struct Checker {
    group: String,
    checks: usize,
}

impl Checker {
    fn eq<T: PartialEq + std::fmt::Debug>(
        &mut self,
        op: &str,
        got: &[T],
        want: &[T],
    ) -> Result<()> {
        ensure!(
            got.len() == want.len(),
            "{op} in {}: {} elements, want {}",
            self.group,
            got.len(),
            want.len()
        );
        if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
            anyhow::bail!(
                "{op} in {}: element {i} is {:?}, want {:?}",
                self.group,
                got[i],
                want[i]
            );
        }
        self.checks += 1;
        Ok(())
    }

    /// Floats compared as bits (the rank-order result is exact, not approximate).
    fn f32_bits(&mut self, op: &str, got: &[f32], want: &[f32]) -> Result<()> {
        let g: Vec<u32> = got.iter().map(|x| x.to_bits()).collect();
        let w: Vec<u32> = want.iter().map(|x| x.to_bits()).collect();
        self.eq(op, &g, &w)
    }

    fn f64_bits(&mut self, op: &str, got: &[f64], want: &[f64]) -> Result<()> {
        let g: Vec<u64> = got.iter().map(|x| x.to_bits()).collect();
        let w: Vec<u64> = want.iter().map(|x| x.to_bits()).collect();
        self.eq(op, &g, &w)
    }
}

/// Runs every check on the world and on groups split from it; returns the summary line.
pub fn run() -> Result<String> {
    let mut world = collectives::from_env()?;
    let (rank, n) = (world.rank(), world.world_size());
    ensure!(n >= 2, "hier_ops needs 2 or more ranks, got {n}");
    let mut c = Checker {
        group: "world".into(),
        checks: 0,
    };
    all_ops(&mut *world, &mut c, 1)?;

    // Two groups across the nodes (even and odd ranks), numbered in reverse (key = -rank).
    let color = (rank % 2) as u32;
    let mut g = world
        .split(Some(color), -(rank as i64))?
        .ok_or_else(|| anyhow::anyhow!("split with a color returned no group"))?;
    let members: Vec<usize> = (0..n).filter(|r| r % 2 == rank % 2).rev().collect();
    ensure!(
        g.world_size() == members.len() && members[g.rank()] == rank,
        "split: rank {rank} is rank {} of {} in its group, want {} of {}",
        g.rank(),
        g.world_size(),
        members
            .iter()
            .position(|&r| r == rank)
            .unwrap_or(usize::MAX),
        members.len()
    );
    c.group = format!("world/split({color})");
    if g.world_size() >= 2 {
        all_ops(&mut *g, &mut c, 2 + color as u64)?;
    }
    // The other group's operations run at the same time: a different-sized all-reduce in each
    // group must not mix (checked above by each group's own results), and a world op after the
    // groups' still matches up.
    let mut after = vec![rank as i64; 3];
    world.all_reduce(&mut after, ReduceOp::Sum)?;
    c.eq(
        "all_reduce after split",
        &after,
        &[(n * (n - 1) / 2) as i64; 3],
    )?;

    // Nesting, and opting out: group rank 0 opts out of a split of the group.
    let sub = g.split((g.rank() != 0).then_some(7), 0)?;
    match (g.rank(), sub) {
        (0, None) => c.checks += 1,
        (0, Some(_)) => anyhow::bail!("split: a rank that opted out got a group"),
        (_, None) => anyhow::bail!("split: a rank with a color got no group"),
        (gr, Some(mut s)) => {
            ensure!(
                s.world_size() == g.world_size() - 1 && s.rank() == gr - 1,
                "nested split: rank {} of {}",
                s.rank(),
                s.world_size()
            );
            let mut v = vec![1u64 << s.rank(); 5];
            s.all_reduce(&mut v, ReduceOp::BOr)?;
            c.group = format!("world/split({color})/split(7)");
            c.eq("all_reduce bor", &v, &[(1u64 << s.world_size()) - 1; 5])?;
        }
    }
    drop(g);
    world.barrier()?;
    Ok(format!(
        "hier_ops: rank {rank} of {n}: {} checks passed",
        c.checks
    ))
}

/// Every operation on `comm` (a world or a group), checked against the rank-order reference.
fn all_ops(comm: &mut dyn Communicator, c: &mut Checker, salt: u64) -> Result<()> {
    let (me, n) = (comm.rank(), comm.world_size());
    // Sizes: empty-ish, odd, and above the shared-memory slot (1 MiB) in bytes.
    for (k, &len) in [1usize, 7, 1000, (1 << 18) + 3].iter().enumerate() {
        let s = salt * 100 + k as u64;

        // Point-to-point: a ring (send to me+1, receive from me-1) in one grouped call, two
        // transfers to the same peer matched in order, then blocking send/recv pairs.
        let next = (me + 1) % n;
        let prev = (me + n - 1) % n;
        let a: Vec<f32> = (0..len).map(|i| f32_of(s, me, i)).collect();
        let b: Vec<f32> = (0..len).map(|i| f32_of(s + 50, me, i)).collect();
        let bytes = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
        let floats = |b: &[u8]| -> Vec<f32> {
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        };
        let (sa, sb) = (bytes(&a), bytes(&b));
        let (mut ra, mut rb) = (vec![0u8; 4 * len], vec![0u8; 4 * len]);
        let mut ops = [
            collectives::P2p::Send {
                buf: &sa,
                peer: next,
            },
            collectives::P2p::Send {
                buf: &sb,
                peer: next,
            },
            collectives::P2p::Recv {
                buf: &mut ra,
                peer: prev,
            },
            collectives::P2p::Recv {
                buf: &mut rb,
                peer: prev,
            },
        ];
        comm.send_recv_raw(&mut ops, collectives::DType::F32)?;
        let (ra, rb) = (floats(&ra), floats(&rb));
        let want: Vec<f32> = (0..len).map(|i| f32_of(s, prev, i)).collect();
        c.f32_bits("send_recv ring (1st)", &ra, &want)?;
        let want: Vec<f32> = (0..len).map(|i| f32_of(s + 50, prev, i)).collect();
        c.f32_bits("send_recv ring (2nd, in order)", &rb, &want)?;
        // Blocking pairs: even ranks send first, odd ranks receive first.
        let partner = me ^ 1;
        if partner < n {
            let mine: Vec<i64> = (0..len).map(|i| i64_of(s, me, i)).collect();
            let mut got = vec![0i64; len];
            if me % 2 == 0 {
                comm.send(&mine, partner)?;
                comm.recv(&mut got, partner)?;
            } else {
                comm.recv(&mut got, partner)?;
                comm.send(&mine, partner)?;
            }
            let want: Vec<i64> = (0..len).map(|i| i64_of(s, partner, i)).collect();
            c.eq("send/recv", &got, &want)?;
        }

        // All-reduce: f32 sum in rank order (bits), f64 sum/max, i64 sum (wraps), i32 bxor,
        // f32 premulsum.
        let mut x: Vec<f32> = (0..len).map(|i| f32_of(s, me, i)).collect();
        comm.all_reduce(&mut x, ReduceOp::Sum)?;
        let want: Vec<f32> = (0..len)
            .map(|i| (1..n).fold(f32_of(s, 0, i), |acc, r| acc + f32_of(s, r, i)))
            .collect();
        c.f32_bits("all_reduce f32 sum", &x, &want)?;
        let mut y: Vec<f64> = (0..len).map(|i| f64_of(s, me, i)).collect();
        comm.all_reduce(&mut y, ReduceOp::Sum)?;
        let want: Vec<f64> = (0..len)
            .map(|i| (1..n).fold(f64_of(s, 0, i), |acc, r| acc + f64_of(s, r, i)))
            .collect();
        c.f64_bits("all_reduce f64 sum", &y, &want)?;
        let mut y: Vec<f64> = (0..len).map(|i| f64_of(s, me, i)).collect();
        comm.all_reduce(&mut y, ReduceOp::Max)?;
        let want: Vec<f64> = (0..len)
            .map(|i| (0..n).map(|r| f64_of(s, r, i)).fold(f64::MIN, f64::max))
            .collect();
        c.f64_bits("all_reduce f64 max", &y, &want)?;
        let mut z: Vec<i64> = (0..len).map(|i| i64_of(s, me, i)).collect();
        comm.all_reduce(&mut z, ReduceOp::Sum)?;
        let want: Vec<i64> = (0..len)
            .map(|i| (0..n).fold(0i64, |acc, r| acc.wrapping_add(i64_of(s, r, i))))
            .collect();
        c.eq("all_reduce i64 sum", &z, &want)?;
        let mut w: Vec<i32> = (0..len).map(|i| i32_of(s, me, i)).collect();
        comm.all_reduce(&mut w, ReduceOp::BXor)?;
        let want: Vec<i32> = (0..len)
            .map(|i| (0..n).fold(0, |acc, r| acc ^ i32_of(s, r, i)))
            .collect();
        c.eq("all_reduce i32 bxor", &w, &want)?;
        let f = 0.37f64;
        let mut p: Vec<f32> = (0..len).map(|i| f32_of(s, me, i)).collect();
        comm.all_reduce(&mut p, ReduceOp::PreMulSum(f))?;
        let want: Vec<f32> = (0..len)
            .map(|i| {
                let sc = |r| f32_of(s, r, i) * f as f32;
                (1..n).fold(sc(0), |acc, r| acc + sc(r))
            })
            .collect();
        c.f32_bits("all_reduce f32 premulsum", &p, &want)?;

        // Reduce to each root in turn (i32 min); the others' buffers stay as they were.
        let root = k % n;
        let mine: Vec<i32> = (0..len).map(|i| i32_of(s, me, i)).collect();
        let mut r = mine.clone();
        comm.reduce(&mut r, ReduceOp::Min, root)?;
        let want: Vec<i32> = if me == root {
            (0..len)
                .map(|i| (0..n).map(|q| i32_of(s, q, i)).min().unwrap_or(0))
                .collect()
        } else {
            mine.clone()
        };
        c.eq("reduce i32 min", &r, &want)?;

        // Gather and scatter (u8) at `root`.
        let mine: Vec<u8> = (0..len).map(|i| u8_of(s, me, i)).collect();
        let mut all = if me == root {
            vec![0u8; n * len]
        } else {
            Vec::new()
        };
        comm.gather(&mine, &mut all, root)?;
        if me == root {
            let want: Vec<u8> = (0..n)
                .flat_map(|q| (0..len).map(move |i| u8_of(s, q, i)))
                .collect();
            c.eq("gather u8", &all, &want)?;
        }
        let src: Vec<u8> = if me == root {
            (0..n * len).map(|i| u8_of(s + 7, root, i)).collect()
        } else {
            Vec::new()
        };
        let mut part = vec![0u8; len];
        comm.scatter(&src, &mut part, root)?;
        let want: Vec<u8> = (0..len).map(|i| u8_of(s + 7, root, me * len + i)).collect();
        c.eq("scatter u8", &part, &want)?;

        // All-to-all (f64, chunk p to rank p) and all-to-allv (i64, rank q sends rank p
        // (q + p + k) % 3 * len / 2 + 1 elements).
        let input: Vec<f64> = (0..n * len).map(|i| f64_of(s, me, i)).collect();
        let mut out = vec![0f64; n * len];
        comm.all_to_all(&input, &mut out)?;
        let want: Vec<f64> = (0..n)
            .flat_map(|q| (0..len).map(move |i| f64_of(s, q, me * len + i)))
            .collect();
        c.f64_bits("all_to_all f64", &out, &want)?;
        let count = |q: usize, p: usize| (q + p + k) % 3 * len / 2 + 1;
        let send: Vec<usize> = (0..n).map(|p| count(me, p)).collect();
        let recv: Vec<usize> = (0..n).map(|q| count(q, me)).collect();
        let input: Vec<i64> = (0..send.iter().sum()).map(|i| i64_of(s, me, i)).collect();
        let mut out = vec![0i64; recv.iter().sum()];
        comm.all_to_allv(&input, &send, &mut out, &recv)?;
        let want: Vec<i64> = (0..n)
            .flat_map(|q| {
                let off: usize = (0..me).map(|p| count(q, p)).sum();
                (off..off + count(q, me)).map(move |i| i64_of(s, q, i))
            })
            .collect();
        c.eq("all_to_allv i64", &out, &want)?;

        // The five original collectives too (a group runs them on its own path).
        let mine: Vec<f32> = (0..len).map(|i| f32_of(s, me, i)).collect();
        let mut all = vec![0f32; n * len];
        comm.all_gather(&mine, &mut all)?;
        let want: Vec<f32> = (0..n)
            .flat_map(|q| (0..len).map(move |i| f32_of(s, q, i)))
            .collect();
        c.f32_bits("all_gather f32", &all, &want)?;
        let input: Vec<f32> = (0..n * len).map(|i| f32_of(s, me, i)).collect();
        let mut out = vec![0f32; len];
        comm.reduce_scatter(&input, &mut out, ReduceOp::Sum)?;
        let want: Vec<f32> = (0..len)
            .map(|i| {
                let x = |r| f32_of(s, r, me * len + i);
                (1..n).fold(x(0), |acc, r| acc + x(r))
            })
            .collect();
        c.f32_bits("reduce_scatter f32 sum", &out, &want)?;
        let mut bc: Vec<u8> = if me == root {
            (0..len).map(|i| u8_of(s + 9, root, i)).collect()
        } else {
            vec![0; len]
        };
        comm.broadcast(&mut bc, root)?;
        let want: Vec<u8> = (0..len).map(|i| u8_of(s + 9, root, i)).collect();
        c.eq("broadcast u8", &bc, &want)?;
        comm.barrier()?;
    }
    Ok(())
}
