//! Per-call latency percentiles of an in-process group (one thread per rank, optionally pinned):
//! `cargo run -p collectives --example latency -- RANKS BYTES ITERS [pin]`. A diagnostic for the
//! wait policy; `tprun perf` is the real benchmark.

use collectives::{CommExt, Communicator, ReduceOp, ShmComm};
use std::time::Instant;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let n: usize = a.get(1).map_or(2, |s| s.parse().unwrap());
    let bytes: usize = a.get(2).map_or(4096, |s| s.parse().unwrap());
    let iters: usize = a.get(3).map_or(20000, |s| s.parse().unwrap());
    let pin = a.get(4).is_some_and(|s| s == "pin");
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let opts = collectives::shm::CommOptions::from_env(n).unwrap();
    let comms = ShmComm::new_group_with(n, &Default::default(), &opts).unwrap();
    let res: Vec<Vec<f64>> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .map(|mut c| {
                s.spawn(move || {
                    if pin {
                        let mut set = nix::sched::CpuSet::new();
                        set.set(c.rank() % cpus).unwrap();
                        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).unwrap();
                    }
                    let mut buf = vec![1f32; bytes / 4];
                    let mut t = Vec::with_capacity(iters);
                    for _ in 0..100 {
                        c.all_reduce(&mut buf, ReduceOp::Sum).unwrap();
                    }
                    for _ in 0..iters {
                        let t0 = Instant::now();
                        c.all_reduce(&mut buf, ReduceOp::Sum).unwrap();
                        t.push(t0.elapsed().as_secs_f64() * 1e6);
                    }
                    let st = c.stats();
                    let ar = st.get(collectives::OpKind::AllReduce);
                    eprintln!(
                        "rank {}: waiting {:.0}% of {:.3} s",
                        c.rank(),
                        100.0 * ar.wait_seconds / ar.seconds,
                        ar.seconds
                    );
                    t
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut t = res[0].clone();
    let mean = t.iter().sum::<f64>() / t.len() as f64;
    t.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let p = |q: f64| t[((t.len() - 1) as f64 * q) as usize];
    println!(
        "{n} ranks {bytes} B: mean {mean:.2} us  p10 {:.2}  p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.0}",
        p(0.1),
        p(0.5),
        p(0.9),
        p(0.99),
        p(1.0)
    );
}
