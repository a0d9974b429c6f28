"""torch.distributed backend "tprun" for CPU tensors: `import tprun.torch`, then
`dist.init_process_group("tprun")` in a rank started by `tprun -n N` or `torchrun`.

It is a Python `dist.ProcessGroup` subclass registered with `dist.Backend.register_backend`
(torch's extension point for Python process groups, as in torch's test_c10d_pypg.py), so there is
no C++ ABI tie to libtorch. Every call runs synchronously on the calling thread and returns a
completed Work; a failed peer raises tprun.CommError naming the rank and the operation.
"""

import torch
import torch.distributed as dist
from torch.futures import Future

from . import CommError, native_comm

__all__ = ["CommError", "ProcessGroupTprun"]

_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.uint8: 3, torch.int32: 4, torch.int64: 6}
# (op code, then divide by the world size): AVG is the sum, divided.
_SUM = dist.ReduceOp.SUM
_OPS = {
    dist.ReduceOp.SUM: (0, False),
    dist.ReduceOp.AVG: (0, True),
    dist.ReduceOp.MAX: (1, False),
    dist.ReduceOp.MIN: (2, False),
    dist.ReduceOp.PRODUCT: (3, False),
}


def _comm(rank, size):
    c = native_comm()
    if (c.rank, c.world_size) != (rank, size):
        raise RuntimeError(
            f"tprun backend: process groups must span the whole job (rank {c.rank} of "
            f"{c.world_size}); a subgroup (rank {rank} of {size}) is not supported"
        )
    return c


def _done(result):
    return _Work(result)


class _Work(dist._Work):
    """A finished collective (the calls are synchronous); its Future is made only if asked for."""

    def __init__(self, result):
        super().__init__()
        self._result = result

    def wait(self, timeout=None):
        return True

    def is_completed(self):
        return True

    def is_success(self):
        return True

    def get_future(self):
        fut = Future()
        fut.set_result(self._result)
        return fut


def _check(op, t):
    if t.device.type != "cpu":
        raise RuntimeError(f"tprun backend: {op} got a {t.device.type} tensor; only CPU tensors are supported")
    if not t.is_contiguous():
        raise RuntimeError(f"tprun backend: {op} needs contiguous tensors")


def _code(op, t, reduce):
    code = _CODES.get(t.dtype)
    if reduce and (code is None or code > 2):
        raise RuntimeError(f"tprun backend: {op} cannot reduce {t.dtype} (float32, bfloat16 or float16)")
    return 3 if code is None else code  # gather and broadcast move any dtype as bytes


def _nbytes(t):
    return t.numel() * t.element_size()


def _unsupported(name):
    def call(self, *args, **kwargs):
        raise RuntimeError(
            f"tprun backend: {name} is not supported (supported: all_reduce, all_gather, "
            "all_gather_into_tensor, reduce_scatter_tensor, broadcast, barrier)"
        )

    call.__name__ = name
    return call


class ProcessGroupTprun(dist.ProcessGroup):
    def __init__(self, store, rank, size, timeout=None):
        super().__init__(rank, size)
        self._c = _comm(rank, size)
        self._world = size

    def getBackendName(self):
        return "tprun"

    def _reduce_op(self, op, opts):
        r = opts.reduceOp
        if r == _SUM:  # the common case, cheapest test first
            return 0, False
        code = _OPS.get(getattr(r, "op", r))  # ReduceOp wraps a RedOpType (hashable) since torch 1.13
        if code is not None:
            return code
        name = getattr(getattr(r, "op", r), "name", r)
        raise RuntimeError(f"tprun backend: {op} does not support ReduceOp.{name} (sum, avg, max, min, product)")

    def _all_reduce(self, t, code, avg):
        _check("all_reduce", t)
        self._c.all_reduce(t.data_ptr(), _nbytes(t), _code("all_reduce", t, True), code)
        if avg:
            t.div_(self._world)

    def allreduce(self, tensors, opts=None):
        if isinstance(tensors, torch.Tensor):
            tensors = [tensors]
        code, avg = self._reduce_op("all_reduce", opts or dist.AllreduceOptions())
        for t in tensors:
            self._all_reduce(t, code, avg)
        return _done(tensors)

    def allreduce_coalesced(self, tensors, opts=None):
        return self.allreduce(tensors, opts)

    def all_gather_single(self, output, input, opts=None):
        _check("all_gather_into_tensor", input)
        _check("all_gather_into_tensor", output)
        if output.dtype != input.dtype:
            raise RuntimeError("tprun backend: all_gather_into_tensor needs output and input of one dtype")
        self._c.all_gather(
            input.data_ptr(), _nbytes(input), output.data_ptr(), _nbytes(output), _code("all_gather", input, False)
        )
        return _done([output])

    _allgather_base = all_gather_single

    def allgather_into_tensor_coalesced(self, outputs, inputs, opts=None):
        for o, i in zip(outputs, inputs):
            self.all_gather_single(o, i, opts)
        return _done(outputs)

    def allgather(self, output_lists, inputs, opts=None):
        for outs, i in zip(output_lists, inputs):
            _check("all_gather", i)
            flat = torch.empty((self._world,) + tuple(i.shape), dtype=i.dtype)
            self.all_gather_single(flat, i.contiguous())
            for r, o in enumerate(outs):
                o.copy_(flat[r])
        return _done(output_lists)

    def reduce_scatter_single(self, output, input, opts=None):
        _check("reduce_scatter_tensor", input)
        _check("reduce_scatter_tensor", output)
        code, avg = self._reduce_op("reduce_scatter_tensor", opts or dist.ReduceScatterOptions())
        self._c.reduce_scatter(
            input.data_ptr(),
            _nbytes(input),
            output.data_ptr(),
            _nbytes(output),
            _code("reduce_scatter_tensor", input, True),
            code,
        )
        if avg:
            output.div_(self._world)
        return _done([output])

    _reduce_scatter_base = reduce_scatter_single

    def reduce_scatter_tensor_coalesced(self, outputs, inputs, opts=None):
        for o, i in zip(outputs, inputs):
            self.reduce_scatter_single(o, i, opts)
        return _done(outputs)

    def reduce_scatter(self, outputs, input_lists, opts=None):
        for o, ins in zip(outputs, input_lists):
            self.reduce_scatter_single(o, torch.cat([t.reshape(-1) for t in ins]), opts)
        return _done(outputs)

    def broadcast(self, tensors, opts=None):
        if isinstance(tensors, torch.Tensor):
            tensors = [tensors]
        root = opts.rootRank if opts is not None else 0
        for t in tensors:
            _check("broadcast", t)
            self._c.broadcast(t.data_ptr(), _nbytes(t), root)
        return _done(tensors)

    def barrier(self, opts=None):
        self._c.barrier()
        return _done([])

    send = _unsupported("send")
    recv = _unsupported("recv")
    recv_anysource = _unsupported("recv_anysource")
    gather = _unsupported("gather")
    gather_single = _unsupported("gather_single")
    gather_into_tensor = _unsupported("gather_into_tensor")
    scatter = _unsupported("scatter")
    reduce = _unsupported("reduce")
    alltoall = _unsupported("alltoall")
    alltoall_base = _unsupported("alltoall_base")
    all_to_all_single = _unsupported("all_to_all_single")
    monitored_barrier = _unsupported("monitored_barrier")
    allgather_coalesced = _unsupported("allgather_coalesced")


def _create(store, rank, size, timeout):
    return ProcessGroupTprun(store, rank, size, timeout)


if "tprun" not in dist.Backend.backend_list:
    try:
        dist.Backend.register_backend("tprun", _create, devices=["cpu"])
    except TypeError:  # torch < 2.1: no devices argument
        dist.Backend.register_backend("tprun", _create)
