"""torch.distributed backend "tprun" for CPU and CUDA tensors: `import tprun.torch` (or let
torch load it from the `torch.distributed.backends` entry point), then
`dist.init_process_group("tprun")` (or "cpu:tprun,cuda:tprun").

The ranks may be started by tprun, torchrun or torch.multiprocessing.spawn (init_method env://,
tcp://, file://): every group meets through the c10d Store torch hands its backend. Rank 0 of
the group puts a fresh segment name in the store, the members map that shared-memory segment
(`NativeComm.from_key`). Under tprun the world group uses the segment tprun made instead, so
tprun's statistics, trace and failure reports see it.

The backend is a `torch._C._distributed_c10d.Backend` subclass registered with
`extended_api=True`, the route torch's own gloo takes: torch wraps it in a ProcessGroup and sets
its name, so DeviceMesh, DTensor, FSDP2, functional collectives and DCP find it. Every operation
goes to the group's own worker thread in issue order and returns a Work made from a Future at
once: `async_op=True` overlaps with the caller (the collective runs without the GIL), `wait()`
blocks, and a failure surfaces at `wait()` naming the op, the rank and the group.

Tensors: every dtype moves (the ones the collectives lack move as bytes); reductions take f32,
bf16, f16, f64, uint8, int8, int32, int64 and bool (as uint8; sum/max are "or", product/min
"and"), and PREMUL_SUM (float types) with its factor; non-contiguous tensors go through a
contiguous copy. CUDA tensors are staged through host memory (_Stage): copied to pinned host
tensors after the caller's stream, run on the host, copied back before the Work completes.
Needs torch >= 2.14 (MIN_TORCH).
"""

import os
import queue
import threading
import uuid
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.futures import Future
from torch.torch_version import TorchVersion

from . import CommError, native_comm
from ._native import NativeComm

__all__ = ["CommError", "MIN_TORCH", "ProcessGroupTprun", "register", "unsupported_torch"]

_C = torch._C._distributed_c10d

# torch dtype -> the collectives' DType name (DType::parse). Others move as bytes.
_DTYPES = {
    torch.float32: "f32",
    torch.bfloat16: "bf16",
    torch.float16: "f16",
    torch.float64: "f64",
    torch.uint8: "u8",
    torch.int8: "i8",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.bool: "u8",
}
for _name, _code in (("uint32", "u32"), ("uint64", "u64")):
    if hasattr(torch, _name):
        _DTYPES[getattr(torch, _name)] = _code

_R = dist.ReduceOp.RedOpType
# ReduceOp -> the collectives' ReduceOp name (ReduceOp::parse).
_REDOPS = {
    _R.SUM: "sum",
    _R.AVG: "avg",
    _R.PRODUCT: "prod",
    _R.MIN: "min",
    _R.MAX: "max",
    _R.BAND: "band",
    _R.BOR: "bor",
    _R.BXOR: "bxor",
}
# bool reductions are logical: sum/max = any, product/min = all (gloo's bool arithmetic).
_BOOL_REDOPS = {"sum": "bor", "max": "bor", "bor": "bor", "prod": "band", "min": "band", "band": "band", "bxor": "bxor"}
_KEY = "tprun/shm_key"


def _redop(op, opts, t):
    """The native call's reduction arguments: {"redop": name, "factor": PREMUL_SUM's factor}."""
    r = opts.reduceOp
    kind = getattr(r, "op", r)
    factor = 1.0
    if kind == _R.PREMUL_SUM:
        # torch's _make_nccl_premul_sum(factor) (FSDP2's gradient divide): a float or a
        # one-element tensor (any device), which multiplies this rank's input before the sum.
        f = getattr(r, "factor", None)
        if f is None:
            raise RuntimeError(f"tprun backend: {op}: ReduceOp.PREMUL_SUM without a factor (use _make_nccl_premul_sum)")
        if isinstance(f, torch.Tensor):
            if f.numel() != 1:
                raise RuntimeError(f"tprun backend: {op}: PREMUL_SUM's factor tensor has {f.numel()} elements, expected 1")
            f = f.item()
        return {"redop": "premulsum", "factor": float(f)}
    name = _REDOPS.get(kind)
    if name is None:
        raise RuntimeError(f"tprun backend: {op} does not support {r}")
    if t.dtype == torch.bool:
        if name not in _BOOL_REDOPS:
            raise RuntimeError(f"tprun backend: {op} cannot reduce bool with {name}")
        name = _BOOL_REDOPS[name]
    return {"redop": name, "factor": factor}


# Test hook: TPRUN_TORCH_STAGE_ALL=1 (read at import; or set this attribute) sends CPU tensors
# through the staging path CUDA tensors take (a separate host tensor in, the op, a copy back), so
# the staging code is tested on machines without a GPU.
STAGE_ALL = os.environ.get("TPRUN_TORCH_STAGE_ALL") == "1"
# Tensors staged so far in this process (the tests check that the staging path was taken).
staged_tensors = 0


class _Stage:
    """Host staging of one call's tensors. A CUDA tensor (or any tensor, under STAGE_ALL) runs
    through a host copy: `read` copies an input to host memory (pinned, non_blocking, on the
    caller's current stream, and `issued` records an event there that the op waits for before it
    runs, so the copy sees everything queued before the call); `write` gives an output's host
    stand-in, copied back to the device tensor after the op on a side stream that is synchronized
    before the op's Work completes: after wait() or the future, the caller's stream may use the
    outputs (what NCCL promises). Inputs that are only read are not copied back; outputs that
    are not read are not copied in. Every tensor of a call must be on one device."""

    def __init__(self, op, tensors, streams):
        devices = {t.device for t in tensors}
        for t in tensors:
            if t.is_sparse:
                raise RuntimeError(f"tprun backend: {op} got a sparse tensor; only dense tensors are supported")
        if len(devices) > 1:
            raise RuntimeError(
                f"tprun backend: {op} got tensors on {', '.join(sorted(map(str, devices)))} in one call; "
                "every tensor of a call must be on the same device (all CPU or all on one CUDA device)"
            )
        dev = next(iter(devices), None)
        if dev is not None and dev.type not in ("cpu", "cuda"):
            raise RuntimeError(f"tprun backend: {op} got a {dev.type} tensor; only CPU and CUDA tensors are supported")
        self.cuda = dev is not None and dev.type == "cuda"
        self.on = self.cuda or (STAGE_ALL and dev is not None)
        self.device = dev
        self._streams = streams  # the backend's copy-back stream per CUDA device
        self._back = []  # (device tensor, host stand-in) to copy back after the op
        self._event = None

    def read(self, t):
        """t's values in host memory (t itself when not staging)."""
        return self._host(t, True, False)

    def write(self, t, read=False):
        """The host tensor an op writes t's result into (t itself when not staging), copied back
        after the op; read=True: it starts with t's values (an in-place op)."""
        return self._host(t, read, True)

    def _host(self, t, read, write):
        global staged_tensors
        if not self.on:
            return t
        h = torch.empty(t.shape, dtype=t.dtype, pin_memory=self.cuda)
        if read:
            h.copy_(t, non_blocking=self.cuda)
        if write:
            self._back.append((t, h))
        staged_tensors += 1
        return h

    def issued(self):
        """On the caller's thread, after the reads: marks the caller's stream, which the op waits
        for (its queued work may still be writing an input or reading an output)."""
        if self.cuda:
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(self.device))

    def before(self):
        if self._event is not None:
            self._event.synchronize()

    def after(self):
        """The copy-back of the outputs, finished when this returns."""
        if not self._back:
            return
        if not self.cuda:
            for t, h in self._back:
                t.copy_(h)
            return
        s = self._streams.get(self.device)
        if s is None:
            s = self._streams[self.device] = torch.cuda.Stream(self.device)
        with torch.cuda.stream(s):
            for t, h in self._back:
                t.copy_(h, non_blocking=True)
        s.synchronize()


def _staged(stages, fn):
    """fn between the stages' waits for their input copies and their output copy-backs."""
    stages = [s for s in stages if s is not None and s.on]
    if not stages:
        return fn

    def run():
        for s in stages:
            s.before()
        fn()
        for s in stages:
            s.after()

    return run


def _dtype(op, t, reduce):
    """(DType name, elements per tensor element): unknown dtypes move as bytes."""
    name = _DTYPES.get(t.dtype)
    if name is not None:
        return name, 1
    if reduce:
        raise RuntimeError(
            f"tprun backend: {op} cannot reduce {t.dtype} (float32, bfloat16, float16, float64, "
            "uint8, int8, int32, int64, bool)"
        )
    return "u8", t.element_size()


def _buf(t):
    return (t.data_ptr(), t.numel() * t.element_size()) if t.numel() else (0, 0)


def _dense(t):
    """A contiguous tensor holding t's values (t itself when already contiguous)."""
    return t if t.is_contiguous() else t.contiguous()


class _Out:
    """A contiguous stand-in for an output tensor, copied back after the op if it was not t."""

    def __init__(self, t):
        self.t = t
        self.c = _dense(t)

    def done(self):
        if self.c is not self.t:
            self.t.copy_(self.c)


class _Worker:
    """One group's background thread: runs the group's operations in issue order."""

    def __init__(self, name):
        self._q = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending = 0
        self._t = threading.Thread(target=self._loop, name=f"tprun-{name}", daemon=True)
        self._t.start()

    def submit(self, fn, result, what):
        fut = Future()
        with self._lock:
            self._pending += 1
        self._q.put((fn, result, fut, what))
        return fut

    def idle(self):
        """Nothing queued or running."""
        return self._pending == 0

    def stop(self):
        self._q.put(None)

    def _loop(self):
        while True:
            item = self._q.get()
            if item is None:
                return
            fn, result, fut, what = item
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - every failure belongs to the Work
                err = _error(e, what)
            else:
                err = None
            with self._lock:
                self._pending -= 1
            if err is None:
                fut.set_result(result)
            else:
                fut.set_exception(err)


def _error(e, what):
    """The exception wait() raises: CommError stays CommError; the message names the op, rank
    and group first. A deadline passed (collectives' CommError::Timeout, error.rs) reads
    "Timed out", the words torch's tests and tools look for in a backend's timeout."""
    msg = str(e)
    if "did not arrive within" in msg:
        msg = f"Timed out ({msg})"
    return (CommError if isinstance(e, CommError) else RuntimeError)(f"{what}: {msg}")


class _Work(getattr(dist, "_Work", None) or torch._C._distributed_c10d.Work):
    """A Work over the Future the group's worker completes. A Python subclass (rather than
    `_create_work_from_future`, whose wait() drops the Future's error) so that wait() raises the
    failure, naming the op and the rank, and honours its timeout."""

    def __init__(self, fut):
        super().__init__()
        self._fut = fut
        self._done = threading.Event()
        if fut.done():
            self._done.set()
        else:
            fut.add_done_callback(lambda _: self._done.set())

    def wait(self, timeout=None):
        secs = _seconds(timeout)
        if secs and not self._done.wait(secs):
            raise RuntimeError(f"tprun backend: Work.wait timed out after {secs} s")
        self._fut.wait()
        return True

    def is_completed(self):
        return self._fut.done()

    def is_success(self):
        return self._fut.done() and self.exception() is None

    def exception(self):
        if not self._fut.done():
            return None
        try:
            self._fut.value()
        except Exception as e:  # noqa: BLE001 - the failure is what is asked for
            return e
        return None

    def result(self):
        return self._fut.value()

    def get_future(self):
        return self._fut

    def synchronize(self):
        pass


def _work(fut):
    return _Work(fut)


class ProcessGroupTprun(_C.Backend):
    """One rank's backend on one group (group-local rank and size, as torch passes them)."""

    def __init__(self, native, rank, size, name="", timeout=None):
        super().__init__(rank, size)
        if (native.rank, native.world_size) != (rank, size):
            raise RuntimeError(
                f"tprun backend: group {name!r} is rank {rank} of {size} for torch but rank "
                f"{native.rank} of {native.world_size} in the shared-memory segment"
            )
        self._c = native
        self._rank, self._size = rank, size
        self._name = name
        self._timeout = timeout
        self._worker = _Worker(name or "world")
        self._batch = None  # (p2p ops, their tensors to keep alive, Future) while coalescing
        self._seq = 0  # operations issued (TORCH_DISTRIBUTED_DEBUG=DETAIL compares them)
        self._copy_streams = {}  # CUDA device -> the stream staged outputs are copied back on

    # --- what torch asks of a backend -------------------------------------------------------
    def getBackendName(self):
        return "tprun"

    @property
    def options(self):
        # Without it torch's getBackendOptions() (split_group) recurses through the base class.
        t = self._timeout if isinstance(self._timeout, timedelta) else timedelta(seconds=_seconds(self._timeout) or 1800)
        return _C.Backend.Options("tprun", t)

    @property
    def supports_splitting(self):
        return True

    @property
    def supports_coalescing(self):
        return True

    @property
    def _supports_time_estimate(self):
        return False

    @property
    def supports_shrinking(self):
        return False

    @property
    def supports_reconfigure(self):
        return False

    @property
    def supports_window(self):
        return False

    def _set_sequence_number_for_group(self):
        self._seq = 0

    def _get_sequence_number_for_group(self):
        return self._seq

    def _wait_for_pending_works(self):
        self._worker.submit(lambda: None, [], "").wait()

    def __del__(self):
        w = getattr(self, "_worker", None)
        if w is not None:
            w.stop()

    # --- the worker ---------------------------------------------------------------------------
    def _what(self, op):
        return f"tprun backend: {op} on rank {self._rank} of group {self._name or 'world'} ({self._size} ranks)"

    def _stage(self, op, *tensors):
        """The call's staging (_Stage): every op passes all its tensors here first."""
        return _Stage(op, tensors, self._copy_streams)

    def _submit(self, op, fn, result, opts=None, stage=None):
        """Runs fn on the group's worker and returns its Work; a call torch will wait for at once
        (`opts.asyncOp` False: async_op=False) runs here instead when nothing is queued, which
        keeps the issue order and saves the handover to the worker. `stage`: fn runs on its
        host copies, after their copy-in and before their copy-back (the Work completes after)."""
        self._flush()
        self._seq += 1
        if stage is not None:
            stage.issued()
            fn = _staged([stage], fn)
        if opts is not None and not opts.asyncOp and self._worker.idle():
            fut = Future()
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - raised by wait(), as from the worker
                fut.set_exception(_error(e, self._what(op)))
            else:
                fut.set_result(result)
            return _work(fut)
        return _work(self._worker.submit(fn, result, self._what(op)))

    def _run(self, op, dtype, bufs, **kw):
        self._c.run(op, dtype, bufs, **kw)

    # --- collectives --------------------------------------------------------------------------
    def allreduce(self, tensors, opts=None):
        if isinstance(tensors, torch.Tensor):
            tensors = [tensors]
        opts = opts or dist.AllreduceOptions()
        st = self._stage("all_reduce", *tensors)
        plan = [
            (_Out(st.write(t, read=True)), _dtype("all_reduce", t, True)[0], _redop("all_reduce", opts, t))
            for t in tensors
        ]

        def fn():
            for o, dt, rop in plan:
                self._run("all_reduce", dt, [_buf(o.c)], **rop)
                o.done()

        return self._submit("all_reduce", fn, tensors, opts, st)

    def allreduce_coalesced(self, tensors, opts=None):
        return self.allreduce(tensors, opts)

    def broadcast(self, tensors, opts=None):
        if isinstance(tensors, torch.Tensor):
            tensors = [tensors]
        root = opts.rootRank if opts is not None else 0
        st = self._stage("broadcast", *tensors)
        # The root only reads its tensors, the others only receive.
        outs = [_Out(st.read(t) if self._rank == root else st.write(t)) for t in tensors]

        def fn():
            for o in outs:
                self._run("broadcast", _dtype("broadcast", o.c, False)[0], [_buf(o.c)], root=root)
                o.done()

        return self._submit("broadcast", fn, tensors, opts, st)

    def reduce(self, tensors, opts=None):
        opts = opts or dist.ReduceOptions()
        st = self._stage("reduce", *tensors)
        # Only the root's tensors get the result (the others' stay as they were when staged).
        root = self._rank == opts.rootRank
        plan = []
        for t in tensors:
            x = st.write(t, read=True) if root else st.read(t)
            plan.append((_Out(x), _dtype("reduce", t, True)[0], _redop("reduce", opts, t)))

        def fn():
            for o, dt, rop in plan:
                self._run("reduce", dt, [_buf(o.c)], root=opts.rootRank, **rop)
                o.done()

        return self._submit("reduce", fn, tensors, opts, st)

    def _all_gather_into(self, out, inp):
        """out (contiguous, size x inp) = every rank's inp in rank order."""
        dt, _ = _dtype("all_gather", inp, False)
        self._run("all_gather", dt, [_buf(inp), _buf(out)])

    def all_gather_single(self, output, input, opts=None):
        st = self._stage("all_gather_into_tensor", output, input)
        if output.dtype != input.dtype:
            raise RuntimeError(
                f"tprun backend: all_gather_into_tensor: output is {output.dtype} but input is {input.dtype}"
            )
        if output.numel() != input.numel() * self._size:
            raise RuntimeError(
                f"tprun backend: all_gather_into_tensor: output has {output.numel()} elements, "
                f"expected {self._size} x {input.numel()}"
            )
        o, i = _Out(st.write(output)), _dense(st.read(input))

        def fn():
            self._all_gather_into(o.c, i)
            o.done()

        return self._submit("all_gather_into_tensor", fn, [output], opts, st)

    _allgather_base = all_gather_single

    def all_gather_single_coalesced(self, outputs, inputs, opts=None):
        st = self._stage("all_gather_into_tensor_coalesced", *outputs, *inputs)
        plan = [(_Out(st.write(o)), _dense(st.read(i))) for o, i in zip(outputs, inputs)]

        def fn():
            for o, i in plan:
                self._all_gather_into(o.c, i)
                o.done()

        return self._submit("all_gather_into_tensor_coalesced", fn, outputs, opts, st)

    def allgather(self, output_lists, inputs, opts=None):
        st = self._stage("all_gather", *inputs, *[t for outs in output_lists for t in outs])
        for outs in output_lists:
            if len(outs) != self._size:
                raise RuntimeError(f"tprun backend: all_gather: {len(outs)} output tensors for {self._size} ranks")
        plan = [([st.write(o) for o in outs], _dense(st.read(i))) for outs, i in zip(output_lists, inputs)]

        def fn():
            for outs, i in plan:
                # Uneven sizes (all_gather of differently shaped tensors) pad to the largest.
                most = max(o.numel() for o in outs)
                src = i.reshape(-1)
                if src.numel() != most:
                    src = torch.cat([src, src.new_zeros(most - src.numel())])
                flat = torch.empty(self._size * most, dtype=i.dtype)
                self._all_gather_into(flat, src)
                for r, o in enumerate(outs):
                    o.copy_(flat[r * most : r * most + o.numel()].view(o.shape))

        return self._submit("all_gather", fn, [t for outs in output_lists for t in outs], opts, st)

    def allgather_coalesced(self, output_lists, inputs, opts=None):
        # output_lists[r] holds rank r's copy of every input.
        st = self._stage("all_gather_coalesced", *inputs, *[t for outs in output_lists for t in outs])
        flat_in = [_dense(st.read(i)).reshape(-1) for i in inputs]
        host_outs = [[st.write(o) for o in outs] for outs in output_lists]
        sizes = [t.numel() for t in flat_in]

        def fn():
            if len({t.dtype for t in flat_in}) > 1:
                raise RuntimeError("all_gather_coalesced needs inputs of one dtype")
            src = torch.cat(flat_in) if flat_in else torch.empty(0)
            flat = torch.empty(self._size * src.numel(), dtype=src.dtype)
            self._all_gather_into(flat, src)
            for r, outs in enumerate(host_outs):
                chunk = flat[r * src.numel() : (r + 1) * src.numel()]
                for o, piece in zip(outs, chunk.split(sizes)):
                    o.copy_(piece.view(o.shape))

        return self._submit("all_gather_coalesced", fn, [t for outs in output_lists for t in outs], opts, st)

    def _reduce_scatter_into(self, out, inp, rop):
        dt, _ = _dtype("reduce_scatter", inp, True)
        self._run("reduce_scatter", dt, [_buf(inp), _buf(out)], **rop)

    def reduce_scatter_single(self, output, input, opts=None):
        opts = opts or dist.ReduceScatterOptions()
        st = self._stage("reduce_scatter_tensor", output, input)
        if input.numel() != output.numel() * self._size:
            raise RuntimeError(
                f"tprun backend: reduce_scatter_tensor: input has {input.numel()} elements, "
                f"expected {self._size} x {output.numel()}"
            )
        rop = _redop("reduce_scatter_tensor", opts, input)
        o, i = _Out(st.write(output)), _dense(st.read(input))

        def fn():
            self._reduce_scatter_into(o.c, i, rop)
            o.done()

        return self._submit("reduce_scatter_tensor", fn, [output], opts, st)

    _reduce_scatter_base = reduce_scatter_single

    def reduce_scatter_single_coalesced(self, outputs, inputs, opts=None):
        opts = opts or dist.ReduceScatterOptions()
        st = self._stage("reduce_scatter_tensor_coalesced", *outputs, *inputs)
        plan = [
            (_Out(st.write(o)), _dense(st.read(i)), _redop("reduce_scatter_tensor", opts, i))
            for o, i in zip(outputs, inputs)
        ]

        def fn():
            for o, i, rop in plan:
                self._reduce_scatter_into(o.c, i, rop)
                o.done()

        return self._submit("reduce_scatter_tensor_coalesced", fn, outputs, opts, st)

    def reduce_scatter(self, outputs, input_lists, opts=None):
        opts = opts or dist.ReduceScatterOptions()
        st = self._stage("reduce_scatter", *outputs, *[t for ins in input_lists for t in ins])
        plan = []
        for o, ins in zip(outputs, input_lists):
            if len(ins) != self._size or any(t.numel() != o.numel() for t in ins):
                raise RuntimeError(
                    f"tprun backend: reduce_scatter: needs {self._size} inputs of the output's "
                    f"{o.numel()} elements"
                )
            plan.append((_Out(st.write(o)), [st.read(t) for t in ins], _redop("reduce_scatter", opts, o)))

        def fn():
            for o, ins, rop in plan:
                self._reduce_scatter_into(o.c, torch.cat([t.reshape(-1) for t in ins]), rop)
                o.done()

        return self._submit("reduce_scatter", fn, outputs, opts, st)

    def gather(self, output_lists, inputs, opts=None):
        root = opts.rootRank if opts is not None else 0
        outs = output_lists[0] if self._rank == root else []
        st = self._stage("gather", *inputs, *outs)
        if self._rank == root and len(outs) != self._size:
            raise RuntimeError(f"tprun backend: gather: {len(outs)} output tensors at the root for {self._size} ranks")
        i = _dense(st.read(inputs[0]))
        host_outs = [st.write(o) for o in outs]

        def fn():
            dt, _ = _dtype("gather", i, False)
            flat = torch.empty(self._size * i.numel() if self._rank == root else 0, dtype=i.dtype)
            self._run("gather", dt, [_buf(i), _buf(flat)], root=root)
            for r, o in enumerate(host_outs):
                o.copy_(flat[r * i.numel() : (r + 1) * i.numel()].view(o.shape))

        return self._submit("gather", fn, list(outs), opts, st)

    def scatter(self, outputs, input_lists, opts=None):
        root = opts.rootRank if opts is not None else 0
        ins = input_lists[0] if self._rank == root else []
        st = self._stage("scatter", *outputs, *ins)
        if self._rank == root and len(ins) != self._size:
            raise RuntimeError(f"tprun backend: scatter: {len(ins)} input tensors at the root for {self._size} ranks")
        o = _Out(st.write(outputs[0]))
        ins = [st.read(t) for t in ins]

        def fn():
            dt, _ = _dtype("scatter", o.c, False)
            flat = torch.cat([t.reshape(-1) for t in ins]) if ins else o.c.new_empty(0)
            self._run("scatter", dt, [_buf(flat), _buf(o.c)], root=root)
            o.done()

        return self._submit("scatter", fn, outputs, opts, st)

    def _all_to_allv(self, out, inp, send, recv):
        """Packed all-to-all: send[p] elements of inp to rank p, recv[p] into out from p."""
        dt, scale = _dtype("all_to_all", inp, False)
        self._run(
            "all_to_allv",
            dt,
            [_buf(inp), _buf(out)],
            send_counts=[c * scale for c in send],
            recv_counts=[c * scale for c in recv],
        )

    def all_to_all_single(self, output, input, output_split_sizes, input_split_sizes, opts=None):
        st = self._stage("all_to_all_single", output, input)
        n = self._size

        def counts(t, splits, what):
            rows = t.shape[0] if t.dim() else 1
            per_row = t.numel() // rows if rows else 0
            if not splits:
                if rows % n:
                    raise RuntimeError(
                        f"tprun backend: all_to_all_single: the {what} has {rows} rows, not a multiple of {n} ranks"
                    )
                return [rows // n * per_row] * n
            if len(splits) != n or sum(splits) != rows:
                raise RuntimeError(
                    f"tprun backend: all_to_all_single: {what} splits {list(splits)} do not cut {rows} rows into {n}"
                )
            return [s * per_row for s in splits]

        send = counts(input, input_split_sizes, "input")
        recv = counts(output, output_split_sizes, "output")
        o, i = _Out(st.write(output)), _dense(st.read(input))

        def fn():
            self._all_to_allv(o.c, i, send, recv)
            o.done()

        return self._submit("all_to_all_single", fn, [output], opts, st)

    alltoall_base = all_to_all_single

    def alltoall(self, outputs, inputs, opts=None):
        st = self._stage("all_to_all", *outputs, *inputs)
        if len(outputs) != self._size or len(inputs) != self._size:
            raise RuntimeError(f"tprun backend: all_to_all: needs {self._size} inputs and outputs")
        host_in, host_out = [st.read(t) for t in inputs], [st.write(t) for t in outputs]

        def fn():
            src = torch.cat([t.reshape(-1) for t in host_in])
            dst = torch.empty(sum(t.numel() for t in host_out), dtype=src.dtype)
            self._all_to_allv(dst, src, [t.numel() for t in host_in], [t.numel() for t in host_out])
            for o, piece in zip(host_out, dst.split([t.numel() for t in host_out])):
                o.copy_(piece.view(o.shape))

        return self._submit("all_to_all", fn, outputs, opts, st)

    def barrier(self, opts=None):
        return self._submit("barrier", lambda: self._run("barrier", "u8", []), [], opts)

    def monitored_barrier(self, opts=None, wait_all_ranks=False):
        # Our barrier already names a rank that died or timed out; waiting here is the point.
        self.barrier(opts).wait()

    # --- point to point -----------------------------------------------------------------------
    def _p2p(self, op, tensors, peer, is_send):
        if len(tensors) != 1:
            raise RuntimeError(f"tprun backend: {op} takes one tensor, got {len(tensors)}")
        st = self._stage(op, *tensors)
        if not 0 <= peer < self._size or peer == self._rank:
            raise RuntimeError(f"tprun backend: {op}: peer {peer} is not another rank of the {self._size}")
        t = tensors[0]
        self._seq += 1
        x = _dense(st.read(t)) if is_send else _Out(st.write(t))
        entry = (x, peer, is_send, t, st)
        if self._batch is not None:
            st.issued()
            self._batch[0].append(entry)
            return _work(self._batch[1])
        return self._submit(op, lambda: self._send_recv([entry]), tensors, None, st)

    def _batch_fn(self, entries):
        """The batched p2p entries as one grouped call between their stagings."""
        return _staged([e[4] for e in entries], lambda: self._send_recv(entries))

    def _send_recv(self, entries):
        """One grouped call of the entries (tensor or _Out, peer, is_send, tensor, _Stage)."""
        bufs, peers, sends, dts = [], [], [], set()
        for x, peer, is_send, _, _ in entries:
            c = x if is_send else x.c
            dt, scale = _dtype("send_recv", c, False)
            dts.add((dt, scale))
            bufs.append(_buf(c))
            peers.append(peer)
            sends.append(is_send)
        # The dtype only tags the transfer for statistics; mixed batches are counted as bytes.
        dt = next(iter(dts))[0] if len(dts) == 1 else "u8"
        self._run("send_recv", dt, bufs, peers=peers, sends=sends)
        for x, _, is_send, _, _ in entries:
            if not is_send:
                x.done()

    def send(self, tensors, dstRank, tag=0):
        return self._p2p("send", tensors, dstRank, True)

    def recv(self, tensors, srcRank, tag=0):
        return self._p2p("recv", tensors, srcRank, False)

    def recv_anysource(self, tensors, tag=0):
        raise RuntimeError("tprun backend: recv from any source is not supported; name the source rank")

    def start_coalescing(self):
        if self._batch is not None:
            raise RuntimeError("tprun backend: start_coalescing while already coalescing")
        self._batch = ([], Future())

    def end_coalescing(self):
        if self._batch is None:
            raise RuntimeError("tprun backend: end_coalescing without start_coalescing")
        entries, outer = self._batch
        self._batch = None
        tensors = [e[3] for e in entries]
        inner = self._worker.submit(self._batch_fn(entries), tensors, self._what("batch_isend_irecv"))

        def chain(f):
            try:
                outer.set_result(f.value())
            except BaseException as e:  # noqa: BLE001
                outer.set_exception(e)

        inner.add_done_callback(chain)
        return _work(inner)

    def _flush(self):
        """A collective issued while coalescing: the p2p ops batched so far go first."""
        if self._batch is not None and self._batch[0]:
            entries, outer = self._batch
            self._batch = ([], outer)
            self._worker.submit(self._batch_fn(entries), [], self._what("batch_isend_irecv"))

    # --- groups -------------------------------------------------------------------------------
    def split(self, store, ranks, opts):
        """split_group: the members of `ranks` (global ranks) meet through `store`."""
        me = dist.get_rank()
        if me not in ranks:
            return None
        ranks = list(ranks)
        timeout = getattr(opts, "timeout", None) or self._timeout
        return _make(store, ranks.index(me), len(ranks), getattr(opts, "group_name", ""), timeout, False)


def _seconds(timeout):
    if isinstance(timeout, timedelta):
        return timeout.total_seconds()
    return float(timeout) if timeout else None


# Every backend made, kept alive here: C++ holders (TORCH_DISTRIBUTED_DEBUG=DETAIL's wrapper
# process group) keep only the C++ half of a Python Backend, whose methods then fail with
# "getBackendName is not implemented" once Python frees its half.
_LIVE = []


def _make(store, rank, size, name, timeout, whole_world):
    """The backend of group rank `rank` of `size` (kept alive in _LIVE)."""
    b = _make_backend(store, rank, size, name, timeout, whole_world)
    _LIVE.append(b)
    return b


def _make_backend(store, rank, size, name, timeout, whole_world):
    """tprun's own segment for the whole job under tprun, else a segment named by a key rank 0
    put in the group's store."""
    secs = _seconds(timeout)
    if whole_world and os.environ.get("TPRUN_SHM_FD"):
        c = native_comm()
        if (c.rank, c.world_size) == (rank, size):
            return ProcessGroupTprun(c, rank, size, name, timeout)
    if size == 1:
        return ProcessGroupTprun(NativeComm.from_key("solo", 0, 1), rank, size, name, timeout)
    if rank == 0:
        key = f"pg-{os.getpid()}-{uuid.uuid4().hex[:16]}"
        store.set(_KEY, key)
    else:
        key = store.get(_KEY).decode()
    native = NativeComm.from_key(key, rank, size, timeout_s=secs)
    return ProcessGroupTprun(native, rank, size, name, timeout)


def _create(opts, backend_options=None):
    # The default group's global_ranks_in_group is empty; a new_group over every rank is a
    # group of its own (its collectives interleave with the default group's in any order).
    whole = not list(opts.global_ranks_in_group)
    return _make(opts.store, opts.group_rank, opts.group_size, opts.group_id, opts.timeout, whole)


# The first torch whose c10d Backend a Python class can subclass (its pybind trampoline,
# torch/csrc/distributed/c10d/py/PyBackend.hpp): before it, torch never calls a Python
# Backend's methods. torch 2.1.0 is the oldest with register_backend(devices=...) for Python
# 3.11, but from 2.1 to 2.13 a Python backend could only subclass ProcessGroup, whose trampoline
# forwards only some ops (in 2.1: allreduce, allgather, broadcast, reduce_scatter, barrier, send,
# recv); that route is not built.
MIN_TORCH = "2.14"


def unsupported_torch(version=None):
    """Why this torch cannot run the backend (None when it can)."""
    v = TorchVersion(version or torch.__version__)
    if v < MIN_TORCH:
        return (
            f"the tprun backend needs torch >= {MIN_TORCH} (a Python subclass of torch's c10d "
            f"Backend, torch/csrc/distributed/c10d/py/PyBackend.hpp); this is torch {v}"
        )
    return None


def _refuse(*args, **kwargs):
    raise RuntimeError(unsupported_torch())


def register():
    """Registers backend "tprun" for CPU and CUDA tensors (the `torch.distributed.backends` entry
    point); CUDA tensors are staged through host memory (_Stage).
    On a torch too old for it, the name is registered all the same and
    `init_process_group("tprun")` raises, saying which torch it needs."""
    if "tprun" not in dist.Backend.backend_list:
        creator = _refuse if unsupported_torch() else _create
        dist.Backend.register_backend("tprun", creator, extended_api=True, devices=["cpu", "cuda"])


register()
