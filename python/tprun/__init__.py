"""tprun's NCCL-free shared-memory collectives for Python.

    comm = tprun.Communicator.from_env()      # in a rank started by `tprun -n N` or torchrun
    comm.all_reduce(array)                    # in place, sum in rank order, same bits everywhere

Buffers are any C-contiguous numpy array or buffer-protocol object (memoryview, bytearray);
outputs must be writable. Nothing is copied except into and out of the shared segment.
`import tprun.torch` registers the torch.distributed backend "tprun".
"""

import os

import numpy as np

from ._native import CommError, NativeComm

__all__ = ["DTYPES", "OPS", "CommError", "Communicator", "native_comm", "set_rendezvous_key"]

# Codes of the collectives' DType and ReduceOp (python/src/lib.rs).
DTYPES = {
    "float32": 0,
    "bfloat16": 1,
    "float16": 2,
    "uint8": 3,
    "int32": 4,
    "uint32": 5,
    "int64": 6,
    "uint64": 7,
}
OPS = {"sum": 0, "max": 1, "min": 2, "product": 3}
_REDUCIBLE = ("float32", "bfloat16", "float16")


def set_rendezvous_key():
    """Give ranks started without tprun (e.g. by torchrun) a shared TPRUN_RUN_ID.

    tprun hands its ranks the segment itself (TPRUN_SHM_FD). Otherwise rank 0 creates a named
    segment in /dev/shm keyed by TPRUN_RUN_ID, which this sets from torchrun's
    TORCHELASTIC_RUN_ID and MASTER_ADDR:MASTER_PORT (the run id alone is "none" by default).
    """
    env = os.environ
    if env.get("TPRUN_SHM_FD") or env.get("TPRUN_RUN_ID"):
        return
    parts = [env.get("TORCHELASTIC_RUN_ID", ""), env.get("MASTER_ADDR", ""), env.get("MASTER_PORT", "")]
    if any(parts):
        env["TPRUN_RUN_ID"] = "torchrun-" + "-".join(p for p in parts if p)


_shared = None


def native_comm():
    """This process's one NativeComm (the segment has one slot per rank, so every
    Communicator and the torch backend share it)."""
    global _shared
    if _shared is None:
        set_rendezvous_key()
        _shared = NativeComm.from_env()
    return _shared


def _array(obj, what, writable):
    a = obj if isinstance(obj, np.ndarray) else np.asarray(memoryview(obj))
    if not a.flags.c_contiguous:
        raise ValueError(f"{what}: the buffer must be C-contiguous")
    if writable and not a.flags.writeable:
        raise ValueError(f"{what}: the buffer is read-only")
    return a


def _dtype(a, dtype, what, reduce):
    name = dtype if dtype is not None else a.dtype.name
    if name not in DTYPES:
        if reduce:
            raise TypeError(f"{what}: cannot reduce {name} (float32, bfloat16 or float16; pass dtype= for raw buffers)")
        name = "uint8"  # gather and broadcast move any type as bytes
    if reduce and name not in _REDUCIBLE:
        raise TypeError(f"{what}: cannot reduce {name} (reductions are in f32: float32, bfloat16 or float16)")
    return DTYPES[name]


class Communicator:
    """One rank's handle on the job's collectives."""

    def __init__(self, native):
        self._c = native
        self.rank = native.rank
        self.world_size = native.world_size

    @classmethod
    def from_env(cls):
        return cls(native_comm())

    def all_reduce(self, buf, op="sum", dtype=None):
        """In-place all-reduce; op is "sum", "max", "min" or "product"."""
        a = _array(buf, "all_reduce", True)
        self._c.all_reduce(a.ctypes.data, a.nbytes, _dtype(a, dtype, "all_reduce", True), OPS[op])
        return buf

    def all_gather(self, input, output, dtype=None):
        """output = every rank's input in rank order (output holds world_size x input)."""
        i = _array(input, "all_gather", False)
        o = _array(output, "all_gather", True)
        self._c.all_gather(i.ctypes.data, i.nbytes, o.ctypes.data, o.nbytes, _dtype(i, dtype, "all_gather", False))
        return output

    def reduce_scatter(self, input, output, op="sum", dtype=None):
        """output = this rank's 1/world_size of the reduction of every rank's input."""
        i = _array(input, "reduce_scatter", False)
        o = _array(output, "reduce_scatter", True)
        code = _dtype(i, dtype, "reduce_scatter", True)
        self._c.reduce_scatter(i.ctypes.data, i.nbytes, o.ctypes.data, o.nbytes, code, OPS[op])
        return output

    def broadcast(self, buf, root=0):
        """Copies root's buf into every other rank's buf, in place."""
        a = _array(buf, "broadcast", True)
        self._c.broadcast(a.ctypes.data, a.nbytes, root)
        return buf

    def barrier(self):
        self._c.barrier()

    def stats(self):
        """{op: {"count", "bytes", "seconds", "wait_seconds"}} since from_env()."""
        return self._c.stats()

    def close(self):
        """Leave the job; this process's communicators cannot be used afterwards."""
        global _shared
        self._c.close()
        _shared = None
