//! `tprun._native`: the collectives crate for Python. Buffers arrive as (address, byte count)
//! pairs that the Python layer (`tprun/__init__.py`) takes from numpy arrays, memoryviews and
//! torch tensors after checking that they are contiguous, writable where written and of the
//! right sizes; this layer checks sizes again and never copies. The GIL is released for the
//! duration of every collective.

#![deny(unsafe_op_in_unsafe_fn)]

use std::sync::Mutex;

use collectives::{stats::OpKind, Communicator, DType, ReduceOp};
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

/// One rank's communicator (`collectives::from_env()`).
#[pyclass(module = "tprun._native", frozen)]
struct NativeComm {
    inner: Mutex<Option<Comm>>,
    #[pyo3(get)]
    rank: usize,
    #[pyo3(get)]
    world_size: usize,
}

fn dtype(code: u8) -> PyResult<DType> {
    Ok(match code {
        0 => DType::F32,
        1 => DType::BF16,
        2 => DType::F16,
        3 => DType::U8,
        4 => DType::I32,
        5 => DType::U32,
        6 => DType::I64,
        7 => DType::U64,
        _ => return Err(PyValueError::new_err(format!("unknown dtype code {code}"))),
    })
}

fn redop(code: u8) -> PyResult<ReduceOp> {
    Ok(match code {
        0 => ReduceOp::Sum,
        1 => ReduceOp::Max,
        2 => ReduceOp::Min,
        3 => ReduceOp::Product,
        _ => return Err(PyValueError::new_err(format!("unknown op code {code}"))),
    })
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
        Ok(NativeComm {
            rank: c.rank(),
            world_size: c.world_size(),
            inner: Mutex::new(Some(c)),
        })
    }

    /// In-place all-reduce of `nbytes` at `addr`.
    ///
    /// The Python layer guarantees that the buffers are live, writable where written and of the
    /// sizes given for the duration of the call.
    fn all_reduce(
        &self,
        py: Python<'_>,
        addr: usize,
        nbytes: usize,
        dt: u8,
        op: u8,
    ) -> PyResult<()> {
        let (dt, op) = (dtype(dt)?, redop(op)?);
        self.with(py, move |c| {
            // SAFETY: see the method's doc: the caller owns the buffer for the call.
            let buf = unsafe { bytes_mut(addr, nbytes) };
            c.all_reduce_raw(buf, dt, op)
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn all_gather(
        &self,
        py: Python<'_>,
        in_addr: usize,
        in_bytes: usize,
        out_addr: usize,
        out_bytes: usize,
        dt: u8,
    ) -> PyResult<()> {
        let dt = dtype(dt)?;
        self.check_disjoint(in_addr, in_bytes, out_addr, out_bytes)?;
        self.with(py, move |c| {
            // SAFETY: as for all_reduce; the two ranges do not overlap (checked above).
            let (input, output) =
                unsafe { (bytes_mut(in_addr, in_bytes), bytes_mut(out_addr, out_bytes)) };
            c.all_gather_raw(input, output, dt)
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn reduce_scatter(
        &self,
        py: Python<'_>,
        in_addr: usize,
        in_bytes: usize,
        out_addr: usize,
        out_bytes: usize,
        dt: u8,
        op: u8,
    ) -> PyResult<()> {
        let (dt, op) = (dtype(dt)?, redop(op)?);
        self.check_disjoint(in_addr, in_bytes, out_addr, out_bytes)?;
        self.with(py, move |c| {
            // SAFETY: as for all_gather.
            let (input, output) =
                unsafe { (bytes_mut(in_addr, in_bytes), bytes_mut(out_addr, out_bytes)) };
            c.reduce_scatter_raw(input, output, dt, op)
        })
    }

    fn broadcast(&self, py: Python<'_>, addr: usize, nbytes: usize, root: usize) -> PyResult<()> {
        self.with(py, move |c| {
            // SAFETY: as for all_reduce.
            let buf = unsafe { bytes_mut(addr, nbytes) };
            c.broadcast_raw(buf, root)
        })
    }

    fn barrier(&self, py: Python<'_>) -> PyResult<()> {
        self.with(py, |c| c.barrier())
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

    /// Leaves the job: later calls fail, and the peers see this rank as gone.
    fn close(&self) -> PyResult<()> {
        if let Ok(mut g) = self.inner.lock() {
            g.take();
        }
        Ok(())
    }
}

impl NativeComm {
    fn check_disjoint(&self, a: usize, alen: usize, b: usize, blen: usize) -> PyResult<()> {
        if alen > 0 && blen > 0 && a < b + blen && b < a + alen {
            return Err(PyValueError::new_err(
                "input and output buffers overlap (out-of-place collective)",
            ));
        }
        Ok(())
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<NativeComm>()?;
    m.add("CommError", m.py().get_type::<CommError>())?;
    Ok(())
}
