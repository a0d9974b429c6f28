//! `tprun._native`: the collectives crate for Python. Buffers arrive as (address, byte count)
//! pairs that the Python layer (`tprun/__init__.py`, `tprun/torch.py`) takes from numpy arrays,
//! memoryviews and torch tensors after checking that they are contiguous, writable where written
//! and of the right sizes; this layer checks overlaps, the collectives check sizes, nothing is
//! copied (except an input that overlaps an output). The GIL is released for the duration of
//! every collective.
//!
//! Every operation goes through one method, `NativeComm::run`, which maps an op name, the
//! collectives' dtype and reduce-op names and a list of buffers onto the `Communicator` trait, so
//! a new operation of the trait is one arm of `Op::call`, not a new wrapper.

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

use std::sync::Mutex;
use std::time::Duration;

use collectives::{stats::OpKind, CommError as Error, Communicator, DType, P2p, ReduceOp};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

pyo3::create_exception!(
    _native,
    CommError,
    PyRuntimeError,
    "A collective failed: the message names the operation, its sequence number and the rank that died, hung or disagreed."
);

type Comm = Box<dyn Communicator>;

/// One rank's communicator on one group: the job's world (`from_env`), a group met by key
/// (`from_key`) or a part of another (`split`).
#[pyclass(module = "tprun._native", frozen)]
struct NativeComm {
    inner: Mutex<Option<Comm>>,
    #[pyo3(get)]
    rank: usize,
    #[pyo3(get)]
    world_size: usize,
}

/// # Safety
/// `addr` must point to `len` bytes that stay valid and unaliased by Rust for the call.
unsafe fn bytes_mut<'a>(addr: usize, len: usize) -> &'a mut [u8] {
    if len == 0 {
        return &mut [];
    }
    // SAFETY: the caller upholds this function's contract.
    unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, len) }
}

impl NativeComm {
    fn new(c: Comm) -> NativeComm {
        NativeComm {
            rank: c.rank(),
            world_size: c.world_size(),
            inner: Mutex::new(Some(c)),
        }
    }

    /// Runs `f` on the communicator without the GIL; a collective error becomes `CommError`.
    fn with<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut Comm) -> collectives::Result<T> + Send,
    ) -> PyResult<T> {
        py.allow_threads(|| {
            let mut g = self
                .inner
                .lock()
                .map_err(|_| CommError::new_err("communicator lock poisoned"))?;
            let c = g
                .as_mut()
                .ok_or_else(|| CommError::new_err("the communicator was closed"))?;
            f(c).map_err(|e| CommError::new_err(e.to_string()))
        })
    }
}

#[pymethods]
impl NativeComm {
    /// This rank's communicator from the environment tprun sets (or torchrun's, through a
    /// named segment keyed by TPRUN_RUN_ID or MASTER_PORT).
    #[staticmethod]
    fn from_env() -> PyResult<NativeComm> {
        let c = collectives::from_env().map_err(|e| CommError::new_err(format!("{e:#}")))?;
        Ok(NativeComm::new(c))
    }

    /// Group rank `rank` of `world` ranks on this host meeting in the named segment `key`, which
    /// every member got from the same place (torch's Store); `timeout_s` bounds the meeting and
    /// every later wait for a peer (`TPRUN_COMM_TIMEOUT_S`, else 60 s, when omitted).
    #[staticmethod]
    #[pyo3(signature = (key, rank, world, timeout_s=None))]
    fn from_key(
        py: Python<'_>,
        key: &str,
        rank: usize,
        world: usize,
        timeout_s: Option<f64>,
    ) -> PyResult<NativeComm> {
        let timeout = match timeout_s {
            Some(t) if !(t.is_finite() && t > 0.0) => {
                return Err(PyValueError::new_err(format!(
                    "timeout_s={t}: expected a positive number of seconds"
                )))
            }
            Some(t) => Some(Duration::from_secs_f64(t.min(1e9))),
            None => None,
        };
        let key = key.to_string();
        let c = py
            .allow_threads(move || collectives::meet::shm_by_key(&key, rank, world, timeout))
            .map_err(|e| CommError::new_err(format!("{e:#}")))?;
        Ok(NativeComm::new(c))
    }

    /// MPI_Comm_split over this group (every rank calls it): the ranks passing the same `color`
    /// form a new group ordered by `key`, then rank; `color=None` opts out and gets `None`.
    #[pyo3(signature = (color, key=0))]
    fn split(&self, py: Python<'_>, color: Option<u32>, key: i64) -> PyResult<Option<NativeComm>> {
        let sub = self.with(py, move |c| c.split(color, key))?;
        Ok(sub.map(NativeComm::new))
    }

    /// Every collective through one call: `op` names it, `dtype` and `redop` are the
    /// collectives' names (`DType::parse`: f32 bf16 f16 f64 u8 i8 i32 u32 i64 u64;
    /// `ReduceOp::parse`: sum prod max min avg band bor bxor premulsum, whose factor is
    /// `factor`), `bufs` are (address, byte count) pairs in the order of the op's Rust call:
    ///
    /// - `all_reduce`, `reduce`, `broadcast`: `[buf]`, in place (`root` for the rooted ones)
    /// - `all_gather`, `reduce_scatter`, `gather`, `scatter`, `all_to_all`: `[input, output]`
    /// - `all_to_allv`: `[input, output]` with `send_counts`, `recv_counts` (elements)
    /// - `send_recv`: one buffer per transfer, `peers[i]` its group rank and `sends[i]` whether
    ///   it is a send; one grouped call, the transfers progress together
    /// - `barrier`: `[]`
    ///
    /// The caller (the Python layer) guarantees that every buffer is live and of the size given
    /// for the duration of the call, and writable where the op writes. This refuses a written
    /// buffer that overlaps another one; a read buffer that overlaps a written one (torch's
    /// in-place all_gather_into_tensor, whose input is a chunk of its output) is copied first.
    #[pyo3(signature = (op, dtype, bufs, redop="sum", factor=1.0, root=0, send_counts=None, recv_counts=None, peers=None, sends=None))]
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        py: Python<'_>,
        op: &str,
        dtype: &str,
        bufs: Vec<(usize, usize)>,
        redop: &str,
        factor: f64,
        root: usize,
        send_counts: Option<Vec<usize>>,
        recv_counts: Option<Vec<usize>>,
        peers: Option<Vec<usize>>,
        sends: Option<Vec<bool>>,
    ) -> PyResult<()> {
        let kind = Op::parse(op)?;
        let dt = DType::parse(dtype)
            .ok_or_else(|| PyValueError::new_err(format!("{op}: unknown dtype {dtype:?}")))?;
        let rop = match ReduceOp::parse(redop) {
            Some(ReduceOp::PreMulSum(_)) => ReduceOp::PreMulSum(factor),
            Some(r) => r,
            None => {
                return Err(PyValueError::new_err(format!(
                    "{op}: unknown reduce op {redop:?}"
                )))
            }
        };
        let written: Vec<bool> = match kind {
            Op::SendRecv => {
                let (Some(p), Some(s)) = (&peers, &sends) else {
                    return Err(PyValueError::new_err("send_recv: needs peers= and sends="));
                };
                if p.len() != bufs.len() || s.len() != bufs.len() {
                    return Err(PyValueError::new_err(format!(
                        "send_recv: {} buffers but {} peers and {} send flags",
                        bufs.len(),
                        p.len(),
                        s.len()
                    )));
                }
                s.iter().map(|s| !s).collect()
            }
            Op::AllReduce | Op::Reduce | Op::Broadcast => vec![true],
            Op::Barrier => vec![],
            _ => vec![false, true],
        };
        if written.len() != bufs.len() {
            return Err(PyValueError::new_err(format!(
                "{op}: expected {} buffers, got {}",
                written.len(),
                bufs.len()
            )));
        }
        let copies = inputs_to_copy(&bufs, &written)?;
        let peers = peers.unwrap_or_default();
        self.with(py, move |c| {
            // SAFETY: see the method's doc: the caller keeps every buffer live and of its size;
            // the written ones overlap nothing (checked above) and the read ones that overlap a
            // written one are read from their copy instead.
            let mut views: Vec<Buf> = bufs
                .iter()
                .zip(&written)
                .zip(&copies)
                .map(|((&(a, n), &w), copy)| match (w, copy) {
                    (true, _) => Buf::W(unsafe { bytes_mut(a, n) }),
                    (false, Some(v)) => Buf::R(v.as_slice()),
                    (false, None) => Buf::R(unsafe { bytes_mut(a, n) }),
                })
                .collect();
            let counts = Counts {
                send: send_counts.as_deref(),
                recv: recv_counts.as_deref(),
            };
            kind.call(c, &mut views, dt, rop, root, counts, &peers)
        })
    }

    /// `{op: {"count", "bytes", "seconds", "wait_seconds"}}` since the communicator was made.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.with(py, |c| Ok(c.stats()))?;
        let out = PyDict::new(py);
        for k in OpKind::ALL {
            let o = s.get(k);
            let d = PyDict::new(py);
            d.set_item("count", o.count)?;
            d.set_item("bytes", o.bytes)?;
            d.set_item("seconds", o.seconds)?;
            d.set_item("wait_seconds", o.wait_seconds)?;
            out.set_item(k.name(), d)?;
        }
        Ok(out)
    }

    /// Leaves the group: later calls fail, and the peers see this rank as gone.
    fn close(&self) -> PyResult<()> {
        if let Ok(mut g) = self.inner.lock() {
            g.take();
        }
        Ok(())
    }
}

/// A buffer of [`NativeComm::run`]: read or written by the op.
enum Buf<'a> {
    R(&'a [u8]),
    W(&'a mut [u8]),
}

impl Buf<'_> {
    fn r(&self) -> &[u8] {
        match self {
            Buf::R(b) => b,
            Buf::W(b) => b,
        }
    }
}

/// all_to_allv's per-rank element counts.
struct Counts<'a> {
    send: Option<&'a [usize]>,
    recv: Option<&'a [usize]>,
}

/// The operations of [`NativeComm::run`].
#[derive(Clone, Copy)]
enum Op {
    AllReduce,
    Reduce,
    Broadcast,
    AllGather,
    ReduceScatter,
    Gather,
    Scatter,
    AllToAll,
    AllToAllv,
    SendRecv,
    Barrier,
}

impl Op {
    fn parse(s: &str) -> PyResult<Op> {
        Ok(match s {
            "all_reduce" => Op::AllReduce,
            "reduce" => Op::Reduce,
            "broadcast" => Op::Broadcast,
            "all_gather" => Op::AllGather,
            "reduce_scatter" => Op::ReduceScatter,
            "gather" => Op::Gather,
            "scatter" => Op::Scatter,
            "all_to_all" => Op::AllToAll,
            "all_to_allv" => Op::AllToAllv,
            "send_recv" => Op::SendRecv,
            "barrier" => Op::Barrier,
            _ => {
                return Err(PyValueError::new_err(format!(
                    "unknown collective {s:?} (all_reduce, reduce, broadcast, all_gather, reduce_scatter, gather, scatter, all_to_all, all_to_allv, send_recv, barrier)"
                )))
            }
        })
    }

    /// The `Communicator` call of this op; `b` has the shape `run` built for it.
    #[allow(clippy::too_many_arguments)]
    fn call(
        self,
        c: &mut Comm,
        b: &mut [Buf],
        dt: DType,
        op: ReduceOp,
        root: usize,
        counts: Counts,
        peers: &[usize],
    ) -> collectives::Result<()> {
        match (self, b) {
            (Op::AllReduce, [Buf::W(buf)]) => c.all_reduce_raw(buf, dt, op),
            (Op::Reduce, [Buf::W(buf)]) => c.reduce_raw(buf, dt, op, root),
            (Op::Broadcast, [Buf::W(buf)]) => c.broadcast_raw(buf, root),
            (Op::AllGather, [i, Buf::W(o)]) => c.all_gather_raw(i.r(), o, dt),
            (Op::ReduceScatter, [i, Buf::W(o)]) => c.reduce_scatter_raw(i.r(), o, dt, op),
            (Op::Gather, [i, Buf::W(o)]) => c.gather_raw(i.r(), o, dt, root),
            (Op::Scatter, [i, Buf::W(o)]) => c.scatter_raw(i.r(), o, dt, root),
            (Op::AllToAll, [i, Buf::W(o)]) => c.all_to_all_raw(i.r(), o, dt),
            (Op::AllToAllv, [i, Buf::W(o)]) => {
                let (Some(s), Some(r)) = (counts.send, counts.recv) else {
                    return Err(Error::Invalid {
                        op: "all_to_all",
                        msg: "all_to_allv needs send_counts= and recv_counts=".into(),
                    });
                };
                c.all_to_allv_raw(i.r(), s, o, r, dt)
            }
            (Op::SendRecv, b) => {
                let mut ops: Vec<P2p> = b
                    .iter_mut()
                    .zip(peers)
                    .map(|(x, &peer)| match x {
                        Buf::R(buf) => P2p::Send { buf, peer },
                        Buf::W(buf) => P2p::Recv { buf, peer },
                    })
                    .collect();
                c.send_recv_raw(&mut ops, dt)
            }
            (Op::Barrier, []) => c.barrier(),
            _ => Err(Error::Invalid {
                op: "run",
                msg: "the buffers do not match the op".into(),
            }),
        }
    }
}

/// Refuses a written buffer that overlaps any other buffer, and returns a copy of each read
/// buffer that overlaps a written one (`None` where it can be read in place).
fn inputs_to_copy(bufs: &[(usize, usize)], written: &[bool]) -> PyResult<Vec<Option<Vec<u8>>>> {
    let overlap = |(a, al): (usize, usize), (b, bl): (usize, usize)| {
        al > 0 && bl > 0 && a < b.saturating_add(bl) && b < a.saturating_add(al)
    };
    let mut copies = Vec::with_capacity(bufs.len());
    for (i, (&x, &wx)) in bufs.iter().zip(written).enumerate() {
        let mut copy = false;
        for (j, (&y, &wy)) in bufs.iter().zip(written).enumerate() {
            if i == j || !overlap(x, y) {
                continue;
            }
            if wx && wy {
                return Err(PyValueError::new_err(format!(
                    "buffers {i} and {j} are both written and overlap"
                )));
            }
            copy |= wy;
        }
        // SAFETY: the caller of run() keeps the buffer live and of this size for the call.
        copies.push(copy.then(|| unsafe { bytes_mut(x.0, x.1) }.to_vec()));
    }
    Ok(copies)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<NativeComm>()?;
    m.add("CommError", m.py().get_type::<CommError>())?;
    Ok(())
}
