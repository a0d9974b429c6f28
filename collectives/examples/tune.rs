//! A/B comparison of wait/algorithm settings, interleaved so that a busy machine affects every
//! setting alike: `cargo run -p collectives --example tune -- RANKS BYTES ROUNDS pin|nopin CFG...`
//! where CFG is `spin_us:one_shot_max:chunk_bytes[:slot_bytes]` (e.g. `1000:1G:256K:1M`). Prints the median and
//! mean time per all-reduce for each setting. A diagnostic; `tprun perf` is the benchmark.

use collectives::shm::{CommOptions, SegmentOptions};
use collectives::units::parse_size;
use collectives::{CommExt, ReduceOp, ShmComm};
use std::time::{Duration, Instant};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let n: usize = a[1].parse().unwrap();
    let bytes = parse_size(&a[2]).unwrap() as usize;
    let rounds: usize = a[3].parse().unwrap();
    let pin = a[4] == "pin";
    let slots: Vec<usize> = a[5..]
        .iter()
        .map(|c| {
            c.split(':')
                .nth(3)
                .map_or(1 << 20, |s| parse_size(s).unwrap() as usize)
        })
        .collect();
    let cfgs: Vec<CommOptions> = a[5..]
        .iter()
        .map(|c| {
            let p: Vec<&str> = c.split(':').collect();
            let mut o = CommOptions::for_world(n);
            o.spin = Duration::from_micros(p[0].parse().unwrap());
            o.one_shot_max = parse_size(p[1]).unwrap() as usize;
            o.chunk_bytes = parse_size(p[2]).unwrap() as usize;
            o
        })
        .collect();
    let mut groups: Vec<Vec<ShmComm>> = cfgs
        .iter()
        .zip(&slots)
        .map(|(o, &slot_bytes)| {
            let seg = SegmentOptions {
                dir: None,
                slot_bytes,
            };
            ShmComm::new_group_with(n, &seg, o).unwrap()
        })
        .collect();
    let mut per_rank: Vec<Vec<ShmComm>> = (0..n).map(|_| Vec::new()).collect();
    for g in groups.iter_mut() {
        for (r, c) in g.drain(..).enumerate() {
            per_rank[r].push(c);
        }
    }
    let iters = (256usize << 20).div_ceil(bytes.max(1)).clamp(3, 200);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let times: Vec<Vec<Vec<f64>>> = std::thread::scope(|s| {
        let hs: Vec<_> = per_rank
            .into_iter()
            .enumerate()
            .map(|(r, mut comms)| {
                s.spawn(move || {
                    if pin {
                        let mut set = nix::sched::CpuSet::new();
                        set.set(r % cpus).unwrap();
                        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).unwrap();
                    }
                    let mut buf = vec![1f32; bytes / 4];
                    let mut t = vec![Vec::new(); comms.len()];
                    for _ in 0..rounds {
                        for (k, c) in comms.iter_mut().enumerate() {
                            c.all_reduce(&mut buf, ReduceOp::Sum).unwrap();
                            for _ in 0..iters {
                                let t0 = Instant::now();
                                c.all_reduce(&mut buf, ReduceOp::Sum).unwrap();
                                t[k].push(t0.elapsed().as_secs_f64() * 1e6);
                            }
                        }
                    }
                    t
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (k, cfg) in a[5..].iter().enumerate() {
        let mut t = times[0][k].clone();
        let mean = t.iter().sum::<f64>() / t.len() as f64;
        t.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let med = t[t.len() / 2];
        println!(
            "{n} ranks {bytes} B {cfg:>16}: median {med:>10.2} us ({:.2} GB/s)  mean {mean:>10.2} us  p10 {:.2}",
            bytes as f64 / med / 1e3,
            t[t.len() / 10]
        );
    }
}
