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

# numpy dtype name -> the collectives' DType name (python/src/lib.rs parses it); others move
# as bytes and cannot be reduced.
DTYPES = {
    "float32": "f32",
    "bfloat16": "bf16",
    "float16": "f16",
    "float64": "f64",
    "uint8": "u8",
    "int8": "i8",
    "int32": "i32",
    "uint32": "u32",
    "int64": "i64",
    "uint64": "u64",
    "bool": "u8",
}
# Reduce ops (the collectives' names); "premulsum" multiplies each rank's input by its factor=.
OPS = ("sum", "max", "min", "product", "prod", "avg", "band", "bor", "bxor", "premulsum")


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
    """(DType name, elements per array element): unknown types move as bytes."""
    name = dtype if dtype is not None else a.dtype.name
    if name in DTYPES.values():
        return name, 1
    if name in DTYPES:
        return DTYPES[name], 1
    if reduce:
        raise TypeError(f"{what}: cannot reduce {name} ({', '.join(DTYPES)}; pass dtype= for raw buffers)")
    return "u8", a.itemsize


def _redop(op):
    if op not in OPS:
        raise ValueError(f"unknown reduce op {op!r} (one of {', '.join(OPS)})")
    return "prod" if op == "product" else op


def _buf(a):
    return (a.ctypes.data, a.nbytes)


class Communicator:
    """One rank's handle on a group's collectives (the job's world, or a part from split())."""

    def __init__(self, native):
        self._c = native
        self.rank = native.rank
        self.world_size = native.world_size

    @classmethod
    def from_env(cls):
        return cls(native_comm())

    @classmethod
    def from_key(cls, key, rank, world_size, timeout_s=None):
        """Group rank `rank` of `world_size` processes on this host that agreed on `key` some
        other way (a file, a store): they meet in the shared-memory segment of that name."""
        return cls(NativeComm.from_key(key, rank, world_size, timeout_s))

    def split(self, color, key=0):
        """MPI_Comm_split: every rank calls it; ranks with one color form a group ordered by key
        (then rank). color=None opts out and returns None."""
        sub = self._c.split(color, key)
        return None if sub is None else Communicator(sub)

    def _run(self, op, what, bufs, reduce, op_name="sum", factor=1.0, **kw):
        dt, _ = _dtype(bufs[0], kw.pop("dtype", None), what, reduce)
        self._c.run(op, dt, [_buf(b) for b in bufs], redop=_redop(op_name), factor=factor, **kw)

    def all_reduce(self, buf, op="sum", dtype=None, factor=1.0):
        """In-place all-reduce, in rank order (op: see OPS; factor= is premulsum's)."""
        a = _array(buf, "all_reduce", True)
        self._run("all_reduce", "all_reduce", [a], True, op, factor, dtype=dtype)
        return buf

    def reduce(self, buf, root=0, op="sum", dtype=None, factor=1.0):
        """root's buf becomes the reduction of every rank's buf; the others' stay as they were."""
        a = _array(buf, "reduce", True)
        self._run("reduce", "reduce", [a], True, op, factor, dtype=dtype, root=root)
        return buf

    def all_gather(self, input, output, dtype=None):
        """output = every rank's input in rank order (output holds world_size x input)."""
        i, o = _array(input, "all_gather", False), _array(output, "all_gather", True)
        self._run("all_gather", "all_gather", [i, o], False, dtype=dtype)
        return output

    def reduce_scatter(self, input, output, op="sum", dtype=None, factor=1.0):
        """output = this rank's 1/world_size of the reduction of every rank's input."""
        i, o = _array(input, "reduce_scatter", False), _array(output, "reduce_scatter", True)
        self._run("reduce_scatter", "reduce_scatter", [i, o], True, op, factor, dtype=dtype)
        return output

    def gather(self, input, output, root=0, dtype=None):
        """root's output = every rank's input in rank order (output is ignored elsewhere)."""
        i, o = _array(input, "gather", False), _array(output, "gather", True)
        self._run("gather", "gather", [i, o], False, dtype=dtype, root=root)
        return output

    def scatter(self, input, output, root=0, dtype=None):
        """output = chunk `rank` of root's input (input is ignored elsewhere)."""
        i, o = _array(input, "scatter", False), _array(output, "scatter", True)
        self._run("scatter", "scatter", [i, o], False, dtype=dtype, root=root)
        return output

    def all_to_all(self, input, output, send_counts=None, recv_counts=None, dtype=None):
        """Chunk p of input goes to rank p; with counts (elements per rank), uneven chunks."""
        i, o = _array(input, "all_to_all", False), _array(output, "all_to_all", True)
        if send_counts is None and recv_counts is None:
            self._run("all_to_all", "all_to_all", [i, o], False, dtype=dtype)
        else:
            dt, scale = _dtype(i, dtype, "all_to_all", False)
            self._c.run(
                "all_to_allv",
                dt,
                [_buf(i), _buf(o)],
                send_counts=[c * scale for c in send_counts],
                recv_counts=[c * scale for c in recv_counts],
            )
        return output

    def send_recv(self, sends=(), recvs=()):
        """One grouped exchange: sends = [(buf, peer)], recvs = [(buf, peer)]; returns when all
        are done (a ring exchange cannot deadlock)."""
        arrs = [_array(b, "send", False) for b, _ in sends] + [_array(b, "recv", True) for b, _ in recvs]
        peers = [p for _, p in sends] + [p for _, p in recvs]
        flags = [True] * len(sends) + [False] * len(recvs)
        self._c.run("send_recv", "u8", [_buf(a) for a in arrs], peers=peers, sends=flags)

    def send(self, buf, peer):
        self.send_recv(sends=[(buf, peer)])

    def recv(self, buf, peer):
        self.send_recv(recvs=[(buf, peer)])
        return buf

    def broadcast(self, buf, root=0):
        """Copies root's buf into every other rank's buf, in place."""
        a = _array(buf, "broadcast", True)
        self._c.run("broadcast", "u8", [_buf(a)], root=root)
        return buf

    def barrier(self):
        self._c.run("barrier", "u8", [])

    def stats(self):
        """{op: {"count", "bytes", "seconds", "wait_seconds"}} since the communicator was made."""
        return self._c.stats()

    def close(self):
        """Leave the group; this communicator cannot be used afterwards."""
        global _shared
        self._c.close()
        if self._c is _shared:
            _shared = None
