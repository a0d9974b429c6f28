//! N ranks as N threads of one process, for tests: the model and the programs can be tested at
//! several tensor-parallel degrees without processes or shared memory.
//!
//! Why a third communicator: [`crate::ShmComm`] is the production transport (and its own tests
//! run it on threads, via [`crate::ShmComm::new_group`]), [`crate::local::SoloComm`] is the
//! production world of one; [`ThreadComm`] has no segment, no deadlines to tune and no
//! one-per-process rule, and a rank that fails (an `Err` or a panic) aborts the others' waits,
//! so a failing test never hangs. Every rank deposits its buffer, waits for the others, and
//! computes the result from all of them with the transport's own reduction
//! ([`crate::reduce::reduce_into`]: rank order 0..N-1), so every rank gets the same bits as over
//! shared memory. Point-to-point messages go through one FIFO per ordered pair of ranks (a send
//! never waits, a receive waits for its message), and the rooted and all-to-all operations are
//! the trait's defaults over them. [`Communicator::split`] gives each new group its own state,
//! so groups never wait on one another; an abort reaches every group split from the aborted one.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use crate::reduce::{premul_input, reduce_into, Simd};
use crate::types::check_reducible;
use crate::{args, CommError, Communicator, DType, P2p, ReduceOp, Result};

struct State {
    slots: Vec<Vec<u8>>,
    arrived: usize,
    generation: u64,
    seq: u64,
    aborted: Option<usize>,
    /// Collective waits each rank has entered, so a timeout can name a rank that is behind.
    entered: Vec<u64>,
    /// Point-to-point messages posted and not yet received: `queues[src * world + dst]`, in the
    /// order `src` sent them.
    queues: Vec<VecDeque<Vec<u8>>>,
    /// Groups a split is making: (split number, color) -> the group and how many of its members
    /// have not picked it up yet (the entry goes once all have).
    pending: HashMap<(u64, u32), (Arc<Shared>, usize)>,
    /// Groups split from this one, so that an abort reaches their waits too.
    children: Vec<Weak<Shared>>,
}

struct Shared {
    world: usize,
    state: Mutex<State>,
    cv: Condvar,
}

impl Shared {
    fn new(world: usize, aborted: Option<usize>) -> Arc<Shared> {
        Arc::new(Shared {
            world,
            state: Mutex::new(State {
                slots: vec![Vec::new(); world],
                arrived: 0,
                generation: 0,
                seq: 0,
                aborted,
                entered: vec![0; world],
                queues: vec![VecDeque::new(); world * world],
                pending: HashMap::new(),
                children: Vec::new(),
            }),
            cv: Condvar::new(),
        })
    }

    /// The state, also after a rank panicked while holding it (its abort is what the others
    /// need to see, not a second panic).
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks this group and every group split from it (transitively) as failed by `failed` and
    /// wakes their waits.
    fn abort(&self, failed: usize) {
        let children: Vec<Arc<Shared>> = {
            let mut st = self.lock();
            st.aborted.get_or_insert(failed);
            self.cv.notify_all();
            st.children.iter().filter_map(Weak::upgrade).collect()
        };
        for c in children {
            c.abort(failed);
        }
    }
}

/// One thread's handle; see [`run_world`].
pub struct ThreadComm {
    rank: usize,
    shared: Arc<Shared>,
    /// Splits this rank has called on this group: with the color, it names the new group in
    /// the parent's `pending` (every rank calls split in the same order, so the numbers agree).
    splits: u64,
}

const DEADLINE: Duration = Duration::from_secs(300);

impl ThreadComm {
    /// `world` connected communicators, one per rank.
    pub fn world(world: usize) -> Vec<ThreadComm> {
        let shared = Shared::new(world, None);
        (0..world)
            .map(|rank| ThreadComm {
                rank,
                shared: shared.clone(),
                splits: 0,
            })
            .collect()
    }

    /// Makes every current and future wait of the other ranks fail, in this group and in every
    /// group split from it (their errors name this rank's number in this group).
    pub fn abort(&self) {
        self.shared.abort(self.rank);
    }

    /// Waits on the group's condition variable while `pending(state)` holds; fails once the
    /// group is aborted or after [`DEADLINE`] (naming `missing(state)`, the rank waited for).
    fn wait_while<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        op: &'static str,
        missing: impl Fn(&State) -> usize,
        mut pending: impl FnMut(&State) -> bool,
    ) -> Result<MutexGuard<'a, State>> {
        let start = Instant::now();
        while pending(&st) {
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
                    missing: missing(&st),
                    waited_s: start.elapsed().as_secs_f64(),
                });
            }
            st = self
                .shared
                .cv
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(st)
    }

    fn wait_all(&self, op: &'static str) -> Result<()> {
        let mut st = self.shared.lock();
        let gen = st.generation;
        st.arrived += 1;
        st.entered[self.rank] += 1;
        if st.arrived == self.shared.world {
            st.arrived = 0;
            st.generation += 1;
            st.seq += 1;
            self.shared.cv.notify_all();
            return Ok(());
        }
        let me = self.rank;
        let behind = |st: &State| {
            (0..st.entered.len())
                .find(|&r| st.entered[r] < st.entered[me])
                .unwrap_or(me)
        };
        drop(self.wait_while(st, op, behind, |st| st.generation == gen)?);
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
        self.shared.lock().slots[self.rank] = input.to_vec();
        self.wait_all(op)?;
        let r = f(&self.shared.lock().slots);
        self.wait_all(op)?;
        Ok(r)
    }

    /// The new group of color `color` made by split number `id`, with `size` members: the
    /// first member here creates it, the others pick it up.
    fn join_group(&self, id: u64, color: u32, size: usize) -> Arc<Shared> {
        let mut st = self.shared.lock();
        let aborted = st.aborted;
        let (group, left) = match st.pending.remove(&(id, color)) {
            Some((g, left)) => (g, left - 1),
            None => {
                let g = Shared::new(size, aborted);
                st.children.retain(|c| c.strong_count() > 0);
                st.children.push(Arc::downgrade(&g));
                (g, size - 1)
            }
        };
        if left > 0 {
            st.pending.insert((id, color), (group.clone(), left));
        }
        group
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

/// A split's deposit: the color (`u64::MAX` for none) and the key.
fn encode_split(color: Option<u32>, key: i64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&color.map_or(u64::MAX, u64::from).to_le_bytes());
    b[8..].copy_from_slice(&key.to_le_bytes());
    b
}

fn decode_split(b: &[u8]) -> (Option<u32>, i64) {
    let c = u64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
    let k = i64::from_le_bytes(b[8..16].try_into().expect("8 bytes"));
    (u32::try_from(c).ok(), k)
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
        args::elements("all_reduce", buf.len(), dtype, "the buffer")?;
        let (input, op) = premul_input(dtype, op, buf);
        let mut out = vec![0u8; buf.len()];
        self.exchange("all_reduce", &input, |s| reduce(s, dtype, op, &mut out))?;
        buf.copy_from_slice(&out);
        Ok(())
    }
    fn all_gather_raw(&mut self, input: &[u8], output: &mut [u8], dtype: DType) -> Result<()> {
        args::elements("all_gather", input.len(), dtype, "the input")?;
        let n = self.shared.world;
        args::world_multiple(
            "all_gather",
            output.len(),
            "output",
            input.len(),
            "input",
            n,
        )?;
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
        args::elements("reduce_scatter", n, dtype, "the output")?;
        let w = self.shared.world;
        args::world_multiple("reduce_scatter", input.len(), "input", n, "output", w)?;
        let mine = self.rank * n..(self.rank + 1) * n;
        let (input, op) = premul_input(dtype, op, input);
        self.exchange("reduce_scatter", &input, |s| {
            let parts: Vec<Vec<u8>> = s.iter().map(|x| x[mine.clone()].to_vec()).collect();
            reduce(&parts, dtype, op, output)
        })
    }
    fn broadcast_raw(&mut self, buf: &mut [u8], root: usize) -> Result<()> {
        args::root("broadcast", root, self.shared.world)?;
        let r = self.exchange("broadcast", buf, |s| s[root].clone())?;
        if r.len() != buf.len() {
            return Err(invalid(
                "broadcast",
                format!(
                    "rank {} passed {} bytes but root {root} broadcast {}",
                    self.rank,
                    buf.len(),
                    r.len()
                ),
            ));
        }
        buf.copy_from_slice(&r);
        Ok(())
    }
    fn barrier(&mut self) -> Result<()> {
        self.exchange("barrier", &[], |_| ())
    }
    /// Posts every send (a copy in the pair's queue, so no send waits), then takes each receive's
    /// message from its pair's queue in order, waiting for it where it has not been sent yet.
    fn send_recv_raw(&mut self, ops: &mut [P2p<'_>], dtype: DType) -> Result<()> {
        const OP: &str = "send_recv";
        let (n, me) = (self.shared.world, self.rank);
        for o in ops.iter() {
            args::peer(OP, o.peer(), n)?;
            let what = match o {
                P2p::Send { .. } => "a send buffer",
                P2p::Recv { .. } => "a receive buffer",
            };
            args::elements(OP, o.len(), dtype, what)?;
        }
        {
            let mut st = self.shared.lock();
            for o in ops.iter() {
                if let P2p::Send { buf, peer } = o {
                    st.queues[me * n + peer].push_back(buf.to_vec());
                }
            }
            self.shared.cv.notify_all();
        }
        for o in ops.iter_mut() {
            let P2p::Recv { buf, peer } = o else {
                continue;
            };
            let q = *peer * n + me;
            let st = self.shared.lock();
            let from = *peer;
            let mut st = self.wait_while(st, OP, |_| from, |st| st.queues[q].is_empty())?;
            let msg = st.queues[q].pop_front().expect("waited for a message");
            drop(st);
            if msg.len() != buf.len() {
                return Err(invalid(
                    OP,
                    format!(
                        "rank {me} receives {} bytes from rank {peer} but rank {peer} sent {} \
                         bytes (the sizes must agree)",
                        buf.len(),
                        msg.len()
                    ),
                ));
            }
            buf.copy_from_slice(&msg);
        }
        Ok(())
    }
    /// All-gathers every rank's (color, key), orders each color's ranks by (key, rank here),
    /// and hands the members of one color the same new group state.
    fn split(&mut self, color: Option<u32>, key: i64) -> Result<Option<Box<dyn Communicator>>> {
        let id = self.splits;
        self.splits += 1;
        let all: Vec<(Option<u32>, i64)> =
            self.exchange("split", &encode_split(color, key), |s| {
                s.iter().map(|b| decode_split(b)).collect()
            })?;
        let Some(color) = color else {
            return Ok(None);
        };
        let mut members: Vec<(i64, usize)> = all
            .iter()
            .enumerate()
            .filter(|(_, (c, _))| *c == Some(color))
            .map(|(r, &(_, k))| (k, r))
            .collect();
        members.sort_unstable();
        let rank = members
            .iter()
            .position(|&(_, r)| r == self.rank)
            .expect("a rank is a member of its own color");
        let shared = self.join_group(id, color, members.len());
        Ok(Some(Box::new(ThreadComm {
            rank,
            shared,
            splits: 0,
        })))
    }
}

fn invalid(op: &'static str, msg: String) -> CommError {
    CommError::Invalid { op, msg }
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

    /// MPI_Comm_split: ranks of one color ordered by (key, old rank), `None` opts out, groups
    /// nest, and two groups' collectives run at once without waiting on each other.
    #[test]
    fn split_orders_by_key_then_rank_and_nests() {
        let out = run_world(5, |r, c| {
            // Colors r % 2: {0, 2, 4} and {1, 3}; key 0 for all but rank 4 (key -1), so rank 4
            // comes first in its group.
            let key = if r == 4 { -1 } else { 0 };
            let mut g = c.split(Some((r % 2) as u32), key)?.expect("a member");
            let mut ranks = vec![0u32; g.world_size()];
            g.all_gather(&[r as u32], &mut ranks)?;
            // Rank 3 opts out of the nested split; the others form groups of one each... apart
            // from the even group's first two, which share color 7.
            let color = match r {
                3 => None,
                0 | 4 => Some(7),
                _ => Some(r as u32),
            };
            let nested = g.split(color, -(r as i64))?;
            let nested_ranks = match nested {
                Some(mut h) => {
                    let mut v = vec![0u32; h.world_size()];
                    h.all_gather(&[r as u32], &mut v)?;
                    Some(v)
                }
                None => None,
            };
            Ok((g.rank(), ranks, nested_ranks))
        });
        let out: Vec<_> = out.into_iter().map(|o| o.unwrap()).collect();
        assert_eq!(out[0], (1, vec![4, 0, 2], Some(vec![4, 0])));
        assert_eq!(out[1], (0, vec![1, 3], Some(vec![1])));
        assert_eq!(out[2], (2, vec![4, 0, 2], Some(vec![2])));
        assert_eq!(out[3], (1, vec![1, 3], None));
        assert_eq!(out[4], (0, vec![4, 0, 2], Some(vec![4, 0])));
    }

    /// One group blocks in a receive while the other finishes a whole series of collectives:
    /// groups have separate state.
    #[test]
    fn groups_do_not_wait_on_each_other() {
        // Rank 0 sends only once group {2, 3} is done; rank 1 waits in its receive meanwhile.
        let done = std::sync::Barrier::new(3);
        let out = run_world(4, |r, c| {
            let mut g = c.split(Some((r / 2) as u32), 0)?.expect("a member");
            let mut v = [r as i64];
            match r {
                0 => {
                    done.wait();
                    g.send(&[10i64], 1)?;
                }
                1 => g.recv(&mut v, 0)?,
                _ => {
                    for _ in 0..20 {
                        g.all_reduce(&mut v, ReduceOp::Sum)?;
                    }
                    done.wait();
                }
            }
            Ok(v[0])
        });
        let got: Vec<i64> = out.into_iter().map(|o| o.unwrap()).collect();
        // 2 + 3 = 5 after one all-reduce, doubled 19 times.
        assert_eq!(got, vec![0, 10, 5 << 19, 5 << 19]);
    }

    #[test]
    fn receive_of_the_wrong_size_names_both() {
        let out = run_world(2, |r, c| {
            if r == 0 {
                c.send(&[1u8, 2, 3], 1)?;
                return Ok(String::new());
            }
            let mut v = [0u8; 2];
            Ok(c.recv(&mut v, 0).unwrap_err().to_string())
        });
        let msg = out[1].as_ref().unwrap();
        assert!(
            msg.contains("2 bytes") && msg.contains("sent 3 bytes"),
            "{msg}"
        );
    }

    /// A rank that fails aborts the world, and that reaches the others' waits inside groups.
    #[test]
    fn an_abort_reaches_split_groups() {
        let out = run_world(3, |r, c| {
            let mut g = c.split(Some(0), 0)?.expect("a member");
            if r == 2 {
                anyhow::bail!("rank 2 fails");
            }
            let mut v = [0u8; 4];
            g.recv(&mut v, 2)?;
            Ok(())
        });
        for (r, o) in out.iter().enumerate().take(2) {
            let e = o.as_ref().unwrap_err().to_string();
            assert!(
                e.contains("aborted") && e.contains("rank 2"),
                "rank {r}: {e}"
            );
        }
    }
}
