//! Test scaffolding: an in-process [`Communicator`] for N threads, so the TP model can be tested
//! at several degrees without processes or shared memory. Every rank deposits its buffer, waits
//! for the others, and computes the result from all of them; reductions go in rank order 0..N-1
//! in f32, like the real transport, so every rank gets the same bits.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

#[cfg(test)]
use collectives::CommExt;
use collectives::{CommError, Communicator, DType, ReduceOp};
use half::{bf16, f16};

struct State {
    slots: Vec<Vec<u8>>,
    arrived: usize,
    generation: u64,
    seq: u64,
    aborted: Option<usize>,
}

struct Shared {
    world: usize,
    state: Mutex<State>,
    cv: Condvar,
}

/// One thread's handle; see [`run_world`].
pub struct ThreadComm {
    rank: usize,
    shared: Arc<Shared>,
}

const DEADLINE: Duration = Duration::from_secs(300);

impl ThreadComm {
    /// `world` connected communicators, one per rank.
    pub fn world(world: usize) -> Vec<ThreadComm> {
        let shared = Arc::new(Shared {
            world,
            state: Mutex::new(State {
                slots: vec![Vec::new(); world],
                arrived: 0,
                generation: 0,
                seq: 0,
                aborted: None,
            }),
            cv: Condvar::new(),
        });
        (0..world)
            .map(|rank| ThreadComm {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }

    /// Makes every current and future wait of the other ranks fail.
    pub fn abort(&self) {
        let mut st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        st.aborted.get_or_insert(self.rank);
        self.shared.cv.notify_all();
    }

    fn wait_all(&self, op: &'static str) -> collectives::Result<()> {
        let mut st = self.shared.state.lock().unwrap();
        let gen = st.generation;
        st.arrived += 1;
        if st.arrived == self.shared.world {
            st.arrived = 0;
            st.generation += 1;
            st.seq += 1;
            self.shared.cv.notify_all();
            return Ok(());
        }
        let start = Instant::now();
        while st.generation == gen {
            if let Some(failed) = st.aborted {
                return Err(CommError::Aborted {
                    op,
                    seq: st.seq,
                    failed,
                    missing: failed,
                });
            }
            let left = DEADLINE.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(CommError::Timeout {
                    op,
                    seq: st.seq,
                    missing: usize::MAX,
                    waited_s: start.elapsed().as_secs_f64(),
                });
            }
            st = self.shared.cv.wait_timeout(st, left).unwrap().0;
        }
        Ok(())
    }

    /// Deposits `input`, waits for all, runs `f` on every rank's deposit, waits again so nobody
    /// overwrites a slot that another rank is still reading.
    fn exchange<R>(
        &self,
        op: &'static str,
        input: &[u8],
        f: impl FnOnce(&[Vec<u8>]) -> R,
    ) -> collectives::Result<R> {
        self.shared.state.lock().unwrap().slots[self.rank] = input.to_vec();
        self.wait_all(op)?;
        let r = {
            let st = self.shared.state.lock().unwrap();
            f(&st.slots)
        };
        self.wait_all(op)?;
        Ok(r)
    }
}

impl Drop for ThreadComm {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.abort();
        }
    }
}

fn to_f32(b: &[u8], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        DType::BF16 => b
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes(c.try_into().unwrap()).to_f32())
            .collect(),
        DType::F16 => b
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes(c.try_into().unwrap()).to_f32())
            .collect(),
        d => unreachable!("{d:?} is not reduced (check_reducible ran first)"),
    }
}

fn from_f32(v: &[f32], dtype: DType, out: &mut [u8]) {
    match dtype {
        DType::F32 => out.copy_from_slice(bytemuck::cast_slice(v)),
        DType::BF16 => {
            for (o, x) in out.chunks_exact_mut(2).zip(v) {
                o.copy_from_slice(&bf16::from_f32(*x).to_le_bytes());
            }
        }
        DType::F16 => {
            for (o, x) in out.chunks_exact_mut(2).zip(v) {
                o.copy_from_slice(&f16::from_f32(*x).to_le_bytes());
            }
        }
        d => unreachable!("{d:?} is not reduced (check_reducible ran first)"),
    }
}

fn reduce(slots: &[Vec<u8>], dtype: DType, op: ReduceOp) -> Vec<f32> {
    let mut acc = to_f32(&slots[0], dtype);
    for s in &slots[1..] {
        for (a, b) in acc.iter_mut().zip(to_f32(s, dtype)) {
            *a = match op {
                ReduceOp::Sum => *a + b,
                ReduceOp::Max => a.max(b),
            };
        }
    }
    acc
}

impl Communicator for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.shared.world
    }
    fn all_reduce_raw(
        &mut self,
        buf: &mut [u8],
        dtype: DType,
        op: ReduceOp,
    ) -> collectives::Result<()> {
        collectives::types::check_reducible("all_reduce", dtype)?;
        let r = self.exchange("all_reduce", buf, |s| reduce(s, dtype, op))?;
        from_f32(&r, dtype, buf);
        Ok(())
    }
    fn all_gather_raw(
        &mut self,
        input: &[u8],
        output: &mut [u8],
        _dtype: DType,
    ) -> collectives::Result<()> {
        if output.len() != input.len() * self.shared.world {
            return Err(CommError::Invalid {
                op: "all_gather",
                msg: "output is not world_size × input".into(),
            });
        }
        self.exchange("all_gather", input, |s| {
            for (o, x) in output.chunks_exact_mut(input.len().max(1)).zip(s) {
                o.copy_from_slice(x);
            }
        })
    }
    fn reduce_scatter_raw(
        &mut self,
        input: &[u8],
        output: &mut [u8],
        dtype: DType,
        op: ReduceOp,
    ) -> collectives::Result<()> {
        collectives::types::check_reducible("reduce_scatter", dtype)?;
        let r = self.exchange("reduce_scatter", input, |s| reduce(s, dtype, op))?;
        let n = output.len() / dtype.size();
        from_f32(&r[self.rank * n..(self.rank + 1) * n], dtype, output);
        Ok(())
    }
    fn broadcast_raw(&mut self, buf: &mut [u8], root: usize) -> collectives::Result<()> {
        let r = self.exchange("broadcast", buf, |s| s[root].clone())?;
        buf.copy_from_slice(&r);
        Ok(())
    }
    fn barrier(&mut self) -> collectives::Result<()> {
        self.exchange("barrier", &[], |_| ())
    }
}

/// Runs `f(rank, comm)` on `world` threads and returns the results in rank order. A rank that
/// fails aborts the others' collectives, so a failure never hangs the test.
pub fn run_world<T: Send>(
    world: usize,
    f: impl Fn(usize, &mut dyn Communicator) -> anyhow::Result<T> + Sync,
) -> Vec<anyhow::Result<T>> {
    let comms = ThreadComm::world(world);
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(r, mut c)| {
                let f = &f;
                s.spawn(move || {
                    let out = f(r, &mut c);
                    if out.is_err() {
                        c.abort();
                    }
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread panicked"))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collectives_in_rank_order() {
        let out = run_world(3, |r, c| {
            let mut v = vec![r as f32 + 0.5, 1.0];
            c.all_reduce(&mut v, ReduceOp::Sum)?;
            let mut g = vec![0f32; 3];
            c.all_gather(&[r as f32], &mut g)?;
            Ok((v, g))
        });
        for o in out {
            let (v, g) = o.unwrap();
            assert_eq!(v, vec![4.5, 3.0]);
            assert_eq!(g, vec![0.0, 1.0, 2.0]);
        }
    }

    #[test]
    fn a_failing_rank_does_not_hang_the_others() {
        let out = run_world(2, |r, c| {
            if r == 1 {
                anyhow::bail!("rank 1 fails");
            }
            c.barrier()?;
            Ok(())
        });
        assert!(out.iter().all(|o| o.is_err()));
    }
}
