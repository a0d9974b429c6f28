//! N ranks as N threads of one process, for tests: the model and the programs can be tested at
//! several tensor-parallel degrees without processes or shared memory.
//!
//! Why a third communicator: [`crate::ShmComm`] is the production transport (and its own tests
//! run it on threads, via [`crate::ShmComm::new_group`]), [`crate::local::SoloComm`] is the
//! production world of one; [`ThreadComm`] has no segment, no deadlines to tune and no
//! one-per-process rule, and a rank that fails (an `Err` or a panic) aborts the others' waits,
//! so a failing test never hangs. Every rank deposits its buffer, waits for the others, and
//! computes the result from all of them with the transport's own reduction
//! ([`crate::reduce::reduce_into`]: rank order 0..N-1 in f32), so every rank gets the same bits
//! as over shared memory.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::reduce::{reduce_into, Simd};
use crate::types::check_reducible;
use crate::{CommError, Communicator, DType, ReduceOp, Result};

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

    fn wait_all(&self, op: &'static str) -> Result<()> {
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
    ) -> Result<R> {
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

/// Reduces every rank's deposit in rank order into `out`.
fn reduce(slots: &[Vec<u8>], dtype: DType, op: ReduceOp, out: &mut [u8]) {
    let srcs: Vec<&[u8]> = slots.iter().map(|s| s.as_slice()).collect();
    reduce_into(Simd::detect(), dtype, op, out, &srcs);
}

fn invalid(op: &'static str, msg: String) -> CommError {
    CommError::Invalid { op, msg }
}

impl Communicator for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.shared.world
    }
    fn all_reduce_raw(&mut self, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
        check_reducible("all_reduce", dtype, op)?;
        if !buf.len().is_multiple_of(dtype.size()) {
            return Err(invalid(
                "all_reduce",
                format!(
                    "the buffer is {} bytes, not a whole number of {} elements",
                    buf.len(),
                    dtype.name()
                ),
            ));
        }
        let mut out = vec![0u8; buf.len()];
        self.exchange("all_reduce", buf, |s| reduce(s, dtype, op, &mut out))?;
        buf.copy_from_slice(&out);
        Ok(())
    }
    fn all_gather_raw(&mut self, input: &[u8], output: &mut [u8], _dtype: DType) -> Result<()> {
        if output.len() != input.len() * self.shared.world {
            return Err(invalid(
                "all_gather",
                "output is not world_size × input".into(),
            ));
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
    ) -> Result<()> {
        check_reducible("reduce_scatter", dtype, op)?;
        let n = output.len();
        if input.len() != n * self.shared.world || !n.is_multiple_of(dtype.size()) {
            return Err(invalid(
                "reduce_scatter",
                format!(
                    "input is {} bytes, not world_size × output ({n} bytes of {})",
                    input.len(),
                    dtype.name()
                ),
            ));
        }
        let mine = self.rank * n..(self.rank + 1) * n;
        self.exchange("reduce_scatter", input, |s| {
            let parts: Vec<Vec<u8>> = s.iter().map(|x| x[mine.clone()].to_vec()).collect();
            reduce(&parts, dtype, op, output)
        })
    }
    fn broadcast_raw(&mut self, buf: &mut [u8], root: usize) -> Result<()> {
        if root >= self.shared.world {
            return Err(invalid(
                "broadcast",
                format!(
                    "root {root} out of range for world size {}",
                    self.shared.world
                ),
            ));
        }
        let r = self.exchange("broadcast", buf, |s| s[root].clone())?;
        buf.copy_from_slice(&r);
        Ok(())
    }
    fn barrier(&mut self) -> Result<()> {
        self.exchange("barrier", &[], |_| ())
    }
    fn send_recv_raw(&mut self, _ops: &mut [crate::P2p<'_>], _dtype: DType) -> Result<()> {
        Err(CommError::Invalid {
            op: "send_recv",
            msg: "not implemented yet on this transport".into(),
        })
    }
    fn split(&mut self, _color: Option<u32>, _key: i64) -> Result<Option<Box<dyn Communicator>>> {
        Err(CommError::Invalid {
            op: "split",
            msg: "not implemented yet on this transport".into(),
        })
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
    use crate::CommExt;

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

    #[test]
    fn reductions_match_the_transport_bit_for_bit() {
        use half::bf16;
        let n = 37;
        let input = |r: usize| -> Vec<bf16> {
            (0..3 * n)
                .map(|i| bf16::from_f32(((i * 7 + r * 13) % 23) as f32 * 0.37 - 3.1))
                .collect()
        };
        let out = run_world(3, |r, c| {
            let mut v = input(r);
            c.all_reduce(&mut v, ReduceOp::Sum)?;
            let mut rs = vec![bf16::ZERO; n];
            c.reduce_scatter(&input(r), &mut rs, ReduceOp::Max)?;
            Ok((v, rs))
        });
        let mut shm = crate::ShmComm::new_group(3).unwrap();
        let want = std::thread::scope(|s| {
            let hs: Vec<_> = shm
                .iter_mut()
                .enumerate()
                .map(|(r, c)| {
                    s.spawn(move || {
                        let mut v = input(r);
                        c.all_reduce(&mut v, ReduceOp::Sum).unwrap();
                        let mut rs = vec![bf16::ZERO; n];
                        c.reduce_scatter(&input(r), &mut rs, ReduceOp::Max).unwrap();
                        (v, rs)
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap())
                .collect::<Vec<_>>()
        });
        for (o, w) in out.into_iter().zip(want) {
            let o = o.unwrap();
            assert_eq!(
                bytemuck::cast_slice::<_, u16>(&o.0),
                bytemuck::cast_slice::<_, u16>(&w.0)
            );
            assert_eq!(
                bytemuck::cast_slice::<_, u16>(&o.1),
                bytemuck::cast_slice::<_, u16>(&w.1)
            );
        }
    }

    #[test]
    fn bitwise_reductions_of_floats_are_refused() {
        let out = run_world(2, |_, c| {
            let mut v = [1f32, 2.0];
            Ok(c.all_reduce(&mut v, ReduceOp::BXor).is_err())
        });
        assert!(out.into_iter().all(|o| o.unwrap()));
    }
}
