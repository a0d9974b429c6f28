"""Programs that run the same way on gloo and on tprun: `python progs.py BACKEND N SCENARIOS OUT`.

Starts N ranks with torch.multiprocessing.spawn and init_method file:// (so the backend meets
through the Store torch hands it, with no launcher environment), runs each scenario of the
comma-separated list, and saves every rank's results to OUT/<scenario>-<rank>.pt as
{name: tensor, or "ERROR: message" where the backend refused}. test_torch.py compares the two
backends' files. Every scenario also checks its results against a reference the rank computes
itself where one exists (each rank can compute every other rank's input).
"""

import os
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist

R = dist.ReduceOp
GLOO = False
SCEN = {}


def scenario(f):
    SCEN[f.__name__] = f
    return f


def inputs(world, shape, dtype, seed):
    """Every rank's input for a test (so each rank can compute the reference)."""
    out = []
    for r in range(world):
        g = torch.Generator().manual_seed(seed * 1000 + r)
        x = torch.randn(shape, generator=g)
        if dtype == torch.bool:
            out.append(x > 0)
        elif dtype.is_floating_point:
            out.append((x * 4).to(dtype))
        elif dtype == torch.uint8:
            out.append((x.abs() * 40).to(dtype))
        elif dtype == torch.int8:
            out.append((x * 30).to(dtype))
        else:
            out.append((x * 1000).to(dtype))
    return out


def ref_reduce(xs, op):
    """The reduction in rank order (floats in f32/f64, ints in their type)."""
    acc_t = torch.float64 if xs[0].dtype == torch.float64 else (torch.float32 if xs[0].dtype.is_floating_point else None)
    ys = [x.to(acc_t) if acc_t else x.clone() for x in xs]
    acc = ys[0]
    for y in ys[1:]:
        if op in ("sum", "avg"):
            acc = acc | y if acc.dtype == torch.bool else acc + y
        elif op == "product":
            acc = acc & y if acc.dtype == torch.bool else acc * y
        elif op == "max":
            acc = torch.maximum(acc, y)
        elif op == "min":
            acc = torch.minimum(acc, y)
        elif op == "band":
            acc = acc & y
        elif op == "bor":
            acc = acc | y
        elif op == "bxor":
            acc = acc ^ y
    out = acc.to(xs[0].dtype)
    if op == "avg":
        out = out / len(xs) if out.dtype.is_floating_point else torch.div(acc, len(xs), rounding_mode="trunc").to(out.dtype)
    return out


class Ctx:
    def __init__(self, res):
        self.res = res
        self.rank, self.n = dist.get_rank(), dist.get_world_size()

    def put(self, name, t, want=None, tol=None):
        """Record a result; check it against `want` when given (exact, or within tol)."""
        t = t.detach().cpu().clone() if isinstance(t, torch.Tensor) else t
        self.res[name] = t
        if want is not None:
            ok = (
                torch.equal(t, want)
                if tol is None or not t.dtype.is_floating_point
                else torch.allclose(t.double(), want.double(), rtol=tol, atol=tol)
            )
            if not ok:  # recorded, not raised: the other ranks go on, so no rank hangs
                self.res[f"MISMATCH {name}"] = f"got {t.flatten()[:6]}, want {want.flatten()[:6]}"

    def tryput(self, name, f, want=None, tol=None):
        try:
            self.put(name, f(), want, tol)
        except Exception as e:  # noqa: BLE001 - a refused call is a result too (gloo refuses some)
            self.res[name] = f"ERROR: {type(e).__name__}: {str(e).splitlines()[0][:300]}"


DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.uint8, torch.int8, torch.int32, torch.int64, torch.bool]
OPS = {"sum": R.SUM, "product": R.PRODUCT, "max": R.MAX, "min": R.MIN, "avg": R.AVG, "band": R.BAND, "bor": R.BOR, "bxor": R.BXOR}


@scenario
def reductions(c):
    """all_reduce, reduce, reduce_scatter (tensor and list) for every dtype x op."""
    n, me = c.n, c.rank
    for di, dt in enumerate(DTYPES):
        for oi, (name, op) in enumerate(OPS.items()):
            if dt.is_floating_point and name in ("band", "bor", "bxor"):
                continue
            if dt == torch.bool and name in ("avg",):
                continue
            xs = inputs(n, (5, 3), dt, di * 10 + oi)
            want = ref_reduce(xs, name)
            tol = 1e-2 if dt in (torch.bfloat16, torch.float16) else 1e-5
            if name == "product" and dt.is_floating_point:
                tol = 0.05

            def ar():
                t = xs[me].clone()
                dist.all_reduce(t, op=op)
                return t

            c.tryput(f"all_reduce {dt} {name}", ar, want, tol)

            def red():
                t = xs[me].clone()
                dist.reduce(t, dst=n - 1, op=op)
                return t

            if me == n - 1:  # gloo leaves the other ranks' buffers undefined
                c.tryput(f"reduce {dt} {name}", red, want, tol)
            else:
                c.tryput(f"reduce {dt} {name} (not root)", lambda: (red(), torch.tensor(0))[1])
            big = inputs(n, (2 * n, 3), dt, di * 10 + oi + 500)
            wbig = ref_reduce(big, name)[2 * me : 2 * me + 2]

            def rs():
                out = torch.empty(2, 3, dtype=dt)
                dist.reduce_scatter_tensor(out, big[me], op=op)
                return out

            c.tryput(f"reduce_scatter_tensor {dt} {name}", rs, wbig, tol)

            def rsl():
                out = torch.empty(2, 3, dtype=dt)
                dist.reduce_scatter(out, list(big[me].chunk(n)), op=op)
                return out

            c.tryput(f"reduce_scatter list {dt} {name}", rsl, wbig, tol)


@scenario
def premul_sum(c):
    """ReduceOp.PREMUL_SUM(factor) (FSDP2's set_gradient_divide_factor) and
    _make_nccl_premul_sum(tensor): each rank's input times its own factor, then the sum."""
    from torch._C._distributed_c10d import _make_nccl_premul_sum

    n, me = c.n, c.rank
    factors = [0.5 * (r + 1) for r in range(n)]  # a different factor per rank
    for di, dt in enumerate([torch.float32, torch.bfloat16, torch.float16, torch.float64]):
        xs = inputs(n, (2 * n, 3), dt, 900 + di)
        acc = torch.float64 if dt == torch.float64 else torch.float32
        want = sum(x.to(acc) * f for x, f in zip(xs, factors)).to(dt)
        tol = 2e-2 if dt in (torch.bfloat16, torch.float16) else 1e-5
        for how, op in (("factor=float", R.PREMUL_SUM(factors[me])), ("factor=tensor", _make_nccl_premul_sum(torch.tensor([factors[me]], dtype=dt)))):

            def ar(op=op):
                t = xs[me].clone()
                dist.all_reduce(t, op=op)
                return t

            def rs(op=op):
                out = torch.empty(2, 3, dtype=dt)
                dist.reduce_scatter_tensor(out, xs[me], op=op)
                return out

            def red(op=op):
                t = xs[me].clone()
                dist.reduce(t, dst=0, op=op)
                return t if me == 0 else torch.tensor(0)

            c.tryput(f"all_reduce premul_sum {how} {dt}", ar, want, tol)
            c.tryput(f"reduce_scatter_tensor premul_sum {how} {dt}", rs, want[2 * me : 2 * me + 2], tol)
            c.tryput(f"reduce premul_sum {how} {dt}", red, want if me == 0 else torch.tensor(0), tol)
    # Integers have no pre-multiplication: a clear refusal, not a wrong sum.
    def premul_int():
        t = torch.ones(3, dtype=torch.int32)
        dist.all_reduce(t, op=R.PREMUL_SUM(2.0))
        return t

    c.tryput("all_reduce premul_sum int32", premul_int)


def _bcast(t, src):
    dist.broadcast(t, src=src)
    return t


def _all_gather_list(x, n):
    outs = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(outs, x)
    return torch.stack(outs)


def _all_gather_tensor(x, n):
    out = x.new_empty((n * x.shape[0],) + tuple(x.shape[1:]))
    dist.all_gather_into_tensor(out, x)
    return out


def _scatter(xs, me):
    t = torch.empty_like(xs[me])
    dist.scatter(t, [x.clone() for x in xs] if me == 0 else None, src=0)
    return t


def _all_to_all(ins):
    outs = [torch.empty_like(ins[0]) for _ in ins]
    dist.all_to_all(outs, ins)
    return torch.stack(outs)


def _a2a_single(src):
    dst = torch.empty_like(src)
    dist.all_to_all_single(dst, src)
    return dst


@scenario
def moves(c):
    """Data movement for every dtype: broadcast, all_gather (list, tensor, uneven), gather,
    scatter, all_to_all, all_to_all_single (equal and uneven); non-contiguous, zero-size and
    larger-than-a-slot tensors; coalesced forms; barriers; object collectives."""
    n, me = c.n, c.rank
    for di, dt in enumerate(DTYPES + [torch.int16, torch.complex64]):
        xs = inputs(n, (4, 3), torch.float32 if dt == torch.complex64 else dt, di)
        if dt == torch.complex64:
            xs = [torch.complex(x, x + 1) for x in xs]
        c.tryput(f"broadcast {dt}", lambda: _bcast(xs[me].clone(), n - 1), xs[n - 1])
        c.tryput(f"all_gather {dt}", lambda: _all_gather_list(xs[me], n), torch.stack(xs))
        c.tryput(f"all_gather_into_tensor {dt}", lambda: _all_gather_tensor(xs[me], n), torch.cat(xs))
        gl = [torch.empty_like(xs[me]) for _ in range(n)] if me == 0 else None
        c.tryput(f"gather {dt}", lambda: (dist.gather(xs[me], gl, dst=0), torch.stack(gl) if me == 0 else torch.stack(xs))[1],
                 torch.stack(xs))
        c.tryput(f"scatter {dt}", lambda: _scatter(xs, me), xs[me])
        a2a_in = [xs[me][r % 4].clone() for r in range(n)]
        c.tryput(f"all_to_all {dt}", lambda: _all_to_all(a2a_in), torch.stack([xs[r][me % 4] for r in range(n)]))
        c.tryput(f"all_to_all_single {dt}", lambda: _a2a_single(torch.cat([xs[me]] * n)), torch.cat(xs))
    # uneven all_to_all_single: rank r sends (r + p) % 3 rows to rank p
    rows = lambda r, p: (r + p) % 3  # noqa: E731
    ins = [torch.arange(sum(rows(r, p) for p in range(n)) * 2, dtype=torch.float32).view(-1, 2) + 100 * r for r in range(n)]
    out = torch.empty(sum(rows(p, me) for p in range(n)), 2)
    dist.all_to_all_single(out, ins[me], [rows(p, me) for p in range(n)], [rows(me, p) for p in range(n)])
    want = []
    for p in range(n):
        off = sum(rows(p, q) for q in range(me))
        want.append(ins[p][off : off + rows(p, me)])
    c.put("all_to_all_single uneven", out, torch.cat(want))
    # uneven all_gather (tensors of different sizes per rank)
    sizes = [r + 1 for r in range(n)]

    def uneven():  # gloo refuses (on every rank alike, before communicating)
        outs = [torch.empty(s) for s in sizes]
        dist.all_gather(outs, torch.full((sizes[me],), float(me)))
        return torch.cat(outs)

    c.tryput("all_gather uneven", uneven, torch.cat([torch.full((s,), float(r)) for r, s in enumerate(sizes)]))
    # non-contiguous in and out
    base = torch.arange(24, dtype=torch.float32).view(4, 6) + me
    t = base.t()[1:5]  # a strided view
    dist.all_reduce(t)
    want = torch.arange(24.0).view(4, 6) + me
    want[:, 1:5] = torch.arange(24.0).view(4, 6)[:, 1:5] * n + sum(range(n))
    c.put("all_reduce non-contiguous", base, want)
    out = torch.empty(2, 3 * n).t()
    inp = (torch.arange(6.0).view(2, 3) + 10 * me).t()
    dist.all_gather_into_tensor(out, inp)
    c.put("all_gather_into_tensor non-contiguous", out, torch.cat([(torch.arange(6.0).view(2, 3) + 10 * r).t() for r in range(n)]))
    # zero-size
    z = torch.empty(0)
    dist.all_reduce(z)
    dist.broadcast(z, src=0)
    zo = torch.empty(0)
    dist.all_gather_into_tensor(zo, z)
    c.put("zero-size", torch.tensor([z.numel(), zo.numel()]))
    # larger than the shared-memory slot (1 MiB): 3 MiB of f32, and an uneven all_to_all of it
    big = torch.arange(786_432, dtype=torch.float32) * (me + 1)
    dist.all_reduce(big)
    c.put("all_reduce 3 MiB", big, torch.arange(786_432, dtype=torch.float32) * (n * (n + 1) // 2))
    bo = torch.empty(786_432 * n, dtype=torch.float32)
    dist.all_gather_into_tensor(bo, torch.full((786_432,), float(me)))
    c.put("all_gather 3 MiB", bo, torch.arange(n, dtype=torch.float32).repeat_interleave(786_432))
    a = torch.full((n * 300_000,), float(me))
    b = torch.empty_like(a)
    dist.all_to_all_single(b, a)
    c.put("all_to_all_single 1.2 MB per peer", b, torch.arange(n, dtype=torch.float32).repeat_interleave(300_000))
    # coalesced forms (through the coalescing manager, as FSDP and DDP use them)
    from torch.distributed.distributed_c10d import _coalescing_manager

    ts = [torch.full((3,), float(me + i)) for i in range(3)]
    with _coalescing_manager(async_ops=True) as cm:
        for t in ts:
            dist.all_reduce(t)
    cm.wait()
    c.put("all_reduce coalesced", torch.stack(ts), torch.stack([torch.full((3,), float(sum(range(n)) + i * n)) for i in range(3)]))
    outs = [torch.empty(2 * n) for _ in range(2)]
    with _coalescing_manager(async_ops=True) as cm:
        for i, o in enumerate(outs):
            dist.all_gather_into_tensor(o, torch.full((2,), float(me * 10 + i)))
    cm.wait()
    c.put("all_gather_into_tensor coalesced", torch.stack(outs),
          torch.stack([torch.tensor([float(r * 10 + i) for r in range(n)]).repeat_interleave(2) for i in range(2)]))
    outs = [torch.empty(2) for _ in range(2)]
    with _coalescing_manager(async_ops=True) as cm:
        for i, o in enumerate(outs):
            dist.reduce_scatter_tensor(o, torch.full((2 * n,), float(me + i)))
    cm.wait()
    c.put("reduce_scatter_tensor coalesced", torch.stack(outs), torch.stack([torch.full((2,), float(sum(range(n)) + i * n)) for i in range(2)]))
    dist.barrier()
    c.tryput("monitored_barrier", lambda: (dist.monitored_barrier(), torch.tensor(1))[1])
    objs = [None] * n
    dist.all_gather_object(objs, {"rank": me, "s": "x" * me})
    c.put("all_gather_object", torch.tensor([o["rank"] for o in objs]), torch.arange(n))
    lst = [{"v": 7}] if me == 0 else [None]
    dist.broadcast_object_list(lst, src=0)
    c.put("broadcast_object_list", torch.tensor(lst[0]["v"]), torch.tensor(7))
    got = [None] if me == 0 else None
    go = [None] * n if me == 0 else None
    dist.gather_object(me * 3, go, dst=0)
    if me == 0:
        c.put("gather_object", torch.tensor(go), torch.arange(n) * 3)
    so = [None]
    dist.scatter_object_list(so, [r * 5 for r in range(n)] if me == 0 else None, src=0)
    c.put("scatter_object_list", torch.tensor(so[0]), torch.tensor(me * 5))
    del got


@scenario
def p2p(c):
    """send/recv, isend/irecv, batch_isend_irecv ring, large and non-contiguous p2p."""
    n, me = c.n, c.rank
    nxt, prv = (me + 1) % n, (me - 1) % n
    if me == 0:
        dist.send(torch.arange(5.0), dst=1)
        t = torch.empty(5, dtype=torch.int64)
        dist.recv(t, src=1)
        c.put("send/recv", t, torch.arange(5) * 2)
    elif me == 1:
        t = torch.empty(5)
        dist.recv(t, src=0)
        dist.send((t * 2).long(), dst=0)
        c.put("send/recv", t, torch.arange(5.0))
    dist.barrier()
    # isend/irecv (each rank posts its receive first, then its send: no cycle)
    r = torch.empty(3)
    works = [dist.irecv(r, src=prv), dist.isend(torch.full((3,), float(me)), dst=nxt)] if me % 2 else [
        dist.isend(torch.full((3,), float(me)), dst=nxt), dist.irecv(r, src=prv)]
    for w in works:
        w.wait()
    c.put("isend/irecv ring", r, torch.full((3,), float(prv)))
    # batch_isend_irecv in both directions, one of them > 1 MiB and one non-contiguous
    a = torch.empty(400_000)
    b = torch.empty(6, 4) if GLOO else torch.empty(4, 6).t()  # gloo refuses a strided receive
    ops = [
        dist.P2POp(dist.isend, torch.full((400_000,), float(me)), nxt),
        dist.P2POp(dist.irecv, a, prv),
        # gloo refuses a non-contiguous send (tprun sends the view as it is)
        dist.P2POp(dist.isend, (torch.arange(24.0).view(4, 6) + me).t().contiguous() if GLOO else (torch.arange(24.0).view(4, 6) + me).t(), prv),
        dist.P2POp(dist.irecv, b, nxt),
    ]
    for w in dist.batch_isend_irecv(ops):
        w.wait()
    c.put("batch_isend_irecv big", a, torch.full((400_000,), float(prv)))
    c.put("batch_isend_irecv non-contiguous", b, (torch.arange(24.0).view(4, 6) + nxt).t())


@scenario
def groups(c):
    """new_group, new_subgroups, split_group, a 2-D device mesh, functional collectives."""
    n, me = c.n, c.rank
    evens = list(range(0, n, 2))
    g = dist.new_group(evens)
    if me in evens:
        t = torch.full((3,), float(me + 1))
        dist.all_reduce(t, group=g)
        c.put("new_group evens all_reduce", t, torch.full((3,), float(sum(r + 1 for r in evens))))
        outs = [torch.empty(1) for _ in evens]
        dist.all_gather(outs, torch.tensor([float(me)]), group=g)
        c.put("new_group evens all_gather", torch.cat(outs), torch.tensor([float(r) for r in evens]))
    sub, subs = dist.new_subgroups(group_size=2) if n % 2 == 0 else (None, None)
    if sub is not None:
        t = torch.tensor([float(me)])
        dist.all_reduce(t, group=sub)
        pair = [r for r in range(n) if r // 2 == me // 2]
        c.put("new_subgroups all_reduce", t, torch.tensor([float(sum(pair))]))
    try:
        sg = dist.split_group(split_ranks=[list(range(0, n, 2)), list(range(1, n, 2))])
    except RuntimeError as e:
        # torch 2.14 splits only a default group bound to a device (init_process_group's
        # device_id), for gloo as for tprun; 2.15 splits any.
        if "No device associated with the default pg" not in str(e):
            raise
        c.res["split_group"] = f"ERROR: {e}"
        sg = None
    if sg is not None:
        t = torch.tensor([float(me)])
        dist.all_reduce(t, group=sg)
        c.put("split_group all_reduce", t, torch.tensor([float(sum(range(me % 2, n, 2)))]))
        c.put("split_group rank", torch.tensor([dist.get_rank(sg), dist.get_world_size(sg)]),
              torch.tensor([me // 2, len(range(me % 2, n, 2))]))
    from torch.distributed.device_mesh import init_device_mesh
    import torch.distributed._functional_collectives as fc

    shape = (2, n // 2) if n % 2 == 0 else (1, n)
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=("dp", "tp"))
    dp, tp = mesh["dp"].get_group(), mesh["tp"].get_group()
    t = torch.tensor([float(me)])
    dist.all_reduce(t, group=tp)
    tp_ranks = dist.get_process_group_ranks(tp)
    c.put("mesh tp all_reduce", t, torch.tensor([float(sum(tp_ranks))]))
    t = torch.tensor([float(me)])
    dist.all_reduce(t, group=dp)
    c.put("mesh dp all_reduce", t, torch.tensor([float(sum(dist.get_process_group_ranks(dp)))]))
    x = torch.full((2,), float(me))
    y = fc.all_reduce(x, "sum", mesh["tp"])
    c.put("functional all_reduce", fc.wait_tensor(y), torch.full((2,), float(sum(tp_ranks))))
    z = fc.all_gather_tensor(x, 0, mesh["tp"])
    c.put("functional all_gather", fc.wait_tensor(z), torch.cat([torch.full((2,), float(r)) for r in tp_ranks]))
    w = fc.reduce_scatter_tensor(torch.full((2 * len(tp_ranks),), float(me)), "sum", 0, mesh["tp"])
    c.put("functional reduce_scatter", fc.wait_tensor(w), torch.full((2,), float(sum(tp_ranks))))
    import torch.distributed.nn.functional as dnf

    v = torch.tensor([float(me)], requires_grad=True)
    s = dnf.all_reduce(v * 2, group=tp)
    s.sum().backward()
    c.put("nn.functional all_reduce", s, torch.tensor([2.0 * sum(tp_ranks)]))
    c.put("nn.functional all_reduce grad", v.grad, torch.tensor([2.0 * len(tp_ranks)]))


@scenario
def overlap(c):
    """async_op=True overlaps: a 64 MiB all_reduce is issued, then this thread computes until
    the Work reports completion, without calling wait(): the collective ran in the background
    while the caller computed. Records the issue, completion and wait times (seconds)."""
    t = torch.ones(16 << 20)
    x = torch.randn(256, 256)
    dist.barrier()
    t0 = time.perf_counter()
    w = dist.all_reduce(t, async_op=True)
    t_issue = time.perf_counter() - t0
    steps = 0
    fut = w.get_future()  # (is_completed() of a Python backend's Work is not seen from Python)
    while not fut.done() and time.perf_counter() - t0 < 60:
        x = torch.tanh(x @ x * 0.01)
        steps += 1
    t_done = time.perf_counter() - t0
    completed = fut.done()
    w.wait()
    c.put("overlap all_reduce", t[:4], torch.full((4,), float(c.n)))
    c.put("overlap completed before wait", torch.tensor(completed), torch.tensor(True))
    c.res["overlap times"] = torch.tensor([t_issue, t_done, steps], dtype=torch.float64)


def _device():
    """The device the `staged` scenario's tensors live on: TPRUN_TEST_DEVICE=cuda puts each rank
    on GPU rank % device count (ranks may share one); else the CPU."""
    if os.environ.get("TPRUN_TEST_DEVICE") == "cuda":
        idx = dist.get_rank() % torch.cuda.device_count()
        torch.cuda.set_device(idx)
        return torch.device("cuda", idx)
    return torch.device("cpu")


def _layout(x, strided, dev):
    """x's values on dev, as a contiguous tensor or as a non-contiguous one (a transposed view of
    a fresh buffer)."""
    if not strided:
        return x.to(dev).clone()
    y = torch.empty(tuple(reversed(x.shape)), dtype=x.dtype, device=dev).t()
    y.copy_(x)
    assert not y.is_contiguous()
    return y


@scenario
def staged(c):
    """Every op on the device _device() names (with TPRUN_TORCH_STAGE_ALL=1 or CUDA tensors, the
    tprun backend's host-staging path), on contiguous and non-contiguous tensors; async_op=True
    with wait() and with get_future(). Results are compared with gloo's and with the unstaged
    run's by test_torch.py, and checked here against each rank's reference."""
    n, me, dev = c.n, c.rank, _device()
    nxt, prv = (me + 1) % n, (me - 1) % n
    for di, dt in enumerate([torch.float32, torch.int32, torch.bfloat16]):
        tol = 1e-2 if dt == torch.bfloat16 else 1e-5
        for strided in (False, True):
            tag = f"{dt} {'strided' if strided else 'contiguous'}"
            L = lambda x: _layout(x, strided, dev)  # noqa: E731
            E = lambda *shape: _layout(torch.zeros(shape, dtype=dt), strided, dev)  # noqa: E731
            xs = inputs(n, (4, 3), dt, 700 + di)
            big = inputs(n, (2 * n, 3), dt, 750 + di)

            def ar(op):
                t = L(xs[me])
                dist.all_reduce(t, op=op)
                return t

            c.tryput(f"staged all_reduce sum {tag}", lambda: ar(R.SUM), ref_reduce(xs, "sum"), tol)
            c.tryput(f"staged all_reduce max {tag}", lambda: ar(R.MAX), ref_reduce(xs, "max"))

            def ag_list():
                outs = [E(4, 3) for _ in range(n)]
                dist.all_gather(outs, L(xs[me]))
                return torch.stack([o.cpu() for o in outs])

            c.tryput(f"staged all_gather {tag}", ag_list, torch.stack(xs))

            def ag_tensor():
                out = E(4 * n, 3)
                dist.all_gather_into_tensor(out, L(xs[me]))
                return out

            c.tryput(f"staged all_gather_into_tensor {tag}", ag_tensor, torch.cat(xs))
            wrs = ref_reduce(big, "sum")[2 * me : 2 * me + 2]

            def rs_tensor():
                out = E(2, 3)
                dist.reduce_scatter_tensor(out, L(big[me]))
                return out

            c.tryput(f"staged reduce_scatter_tensor {tag}", rs_tensor, wrs, tol)

            def rs_list():
                out = E(2, 3)
                dist.reduce_scatter(out, [L(x) for x in big[me].chunk(n)])
                return out

            c.tryput(f"staged reduce_scatter list {tag}", rs_list, wrs, tol)

            def bc():
                t = L(xs[me])
                dist.broadcast(t, src=n - 1)
                return t

            c.tryput(f"staged broadcast {tag}", bc, xs[n - 1])

            def red():
                t = L(xs[me])
                dist.reduce(t, dst=0)
                return t

            if me == 0:  # gloo leaves the other ranks' buffers undefined
                c.tryput(f"staged reduce {tag}", red, ref_reduce(xs, "sum"), tol)
            else:
                c.tryput(f"staged reduce {tag} (not root)", lambda: (red(), torch.tensor(0))[1])

            def gat():
                outs = [E(4, 3) for _ in range(n)] if me == 0 else None
                dist.gather(L(xs[me]), outs, dst=0)
                return torch.stack([o.cpu() for o in outs]) if me == 0 else torch.stack(xs)

            c.tryput(f"staged gather {tag}", gat, torch.stack(xs))

            def sca():
                t = E(4, 3)
                dist.scatter(t, [L(x) for x in xs] if me == 0 else None, src=0)
                return t

            c.tryput(f"staged scatter {tag}", sca, xs[me])

            def a2a_single():
                out = E(4 * n, 3)
                dist.all_to_all_single(out, L(torch.cat([xs[me]] * n)))
                return out

            c.tryput(f"staged all_to_all_single {tag}", a2a_single, torch.cat(xs))

            def a2a_list():  # rows 2(p % 2), 2(p % 2) + 1 of each rank's input go to rank p
                outs = [E(2, 3) for _ in range(n)]
                dist.all_to_all(outs, [L(xs[me][p % 2 * 2 : p % 2 * 2 + 2]) for p in range(n)])
                return torch.cat([o.cpu() for o in outs])

            c.tryput(f"staged all_to_all {tag}", a2a_list, torch.cat([xs[r][me % 2 * 2 : me % 2 * 2 + 2] for r in range(n)]))

            def p2p_ring():
                r = E(4, 3)
                s = L(xs[me])
                works = [dist.irecv(r, src=prv), dist.isend(s, dst=nxt)] if me % 2 else [
                    dist.isend(s, dst=nxt), dist.irecv(r, src=prv)]
                for w in works:
                    w.wait()
                return r

            c.tryput(f"staged isend/irecv ring {tag}", p2p_ring, xs[prv])

            def batch():
                a, b = E(4, 3), E(4, 3)
                ops = [
                    dist.P2POp(dist.isend, L(xs[me]), nxt),
                    dist.P2POp(dist.irecv, a, prv),
                    dist.P2POp(dist.isend, L(xs[me] * 2), prv),
                    dist.P2POp(dist.irecv, b, nxt),
                ]
                for w in dist.batch_isend_irecv(ops):
                    w.wait()
                return torch.stack([a.cpu(), b.cpu()])

            c.tryput(f"staged batch_isend_irecv {tag}", batch, torch.stack([xs[prv], xs[nxt] * 2]))
    # blocking send/recv between ranks 0 and 1 (strided, except for gloo, which refuses that)
    if me in (0, 1):
        peer = 1 - me
        t = _layout(torch.arange(12.0).view(4, 3) + me, not GLOO, dev)
        r = _layout(torch.zeros(4, 3), not GLOO, dev)
        if me == 0:
            dist.send(t, dst=peer)
            dist.recv(r, src=peer)
        else:
            dist.recv(r, src=peer)
            dist.send(t, dst=peer)
        c.put("staged send/recv", r, torch.arange(12.0).view(4, 3) + peer)
    # uneven all_to_all_single: rank r sends (r + p) % 3 rows to rank p
    rows = lambda r, p: (r + p) % 3  # noqa: E731
    ins = [torch.arange(sum(rows(r, p) for p in range(n)) * 2, dtype=torch.float32).view(-1, 2) + 100 * r for r in range(n)]
    out = torch.zeros(sum(rows(p, me) for p in range(n)), 2, device=dev)
    dist.all_to_all_single(out, ins[me].to(dev), [rows(p, me) for p in range(n)], [rows(me, p) for p in range(n)])
    want = [ins[p][sum(rows(p, q) for q in range(me)) :][: rows(p, me)] for p in range(n)]
    c.put("staged all_to_all_single uneven", out, torch.cat(want))
    # async_op=True: three all_reduces in flight, waited for in reverse order; an all_gather
    # whose future (not wait()) says when the output may be read, and hands back the output.
    ts = [_layout(torch.full((2, 3), float(me + i)), i == 1, dev) for i in range(3)]
    works = [dist.all_reduce(t, async_op=True) for t in ts]
    for w in reversed(works):
        w.wait()
    c.put("staged async all_reduce wait", torch.stack([t.cpu() for t in ts]),
          torch.stack([torch.full((2, 3), float(sum(range(n)) + i * n)) for i in range(3)]))
    out = _layout(torch.zeros(2 * n, 3), True, dev)
    fut = dist.all_gather_into_tensor(out, torch.full((2, 3), float(me), device=dev), async_op=True).get_future()
    got = fut.wait()
    c.put("staged async all_gather future", out, torch.arange(n, dtype=torch.float32).repeat_interleave(2)[:, None].expand(2 * n, 3))
    c.put("staged future value is the output", torch.tensor(got[0].data_ptr() == out.data_ptr() and got[0].device == dev),
          torch.tensor(True))
    # Stream order: an input still being computed on the caller's stream when the op is issued
    # (on CUDA, 20 matmuls of 4096 x 4096 queued just before), the output read on that stream
    # right after the op returns.
    size = 4096 if dev.type == "cuda" else 64
    eye = torch.eye(size, device=dev)
    x = torch.full((size, size), float(me + 1), device=dev)
    for _ in range(20):
        x = x @ eye
    dist.all_reduce(x)
    c.put("staged stream order", (x * 2)[:2, :3], torch.full((2, 3), float(n * (n + 1))))
    if not GLOO:
        import tprun.torch as tt

        c.res["staged tensors"] = torch.tensor(tt.staged_tensors)


def _mlp(seed=0, width=32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, width), torch.nn.Tanh(), torch.nn.Linear(width, 16))


def _batch(step, rank):
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(8, 16, generator=g)
    return x, x.sin()


def _train(c, name, model, params, steps, local_batch=True):
    opt = torch.optim.SGD(params, lr=0.05)
    losses = []
    for step in range(steps):
        x, y = _batch(step, c.rank if local_batch else 0)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.full_tensor() if hasattr(loss, "full_tensor") else loss))
    c.put(f"{name} losses", torch.tensor(losses, dtype=torch.float64))
    return losses


@scenario
def ddp(c):
    """DDP with 1 KB buckets (many all_reduces per step), 6 steps."""
    model = _mlp()
    ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.001)
    _train(c, "ddp", ddp, ddp.parameters(), 6)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    outs = [torch.empty_like(flat) for _ in range(c.n)]
    dist.all_gather(outs, flat)
    c.put("ddp params equal on every rank", torch.tensor(all(torch.equal(o, flat) for o in outs)), torch.tensor(True))
    c.put("ddp params", flat)


@scenario
def fsdp2(c):
    """FSDP2 fully_shard on each layer and the root, 6 steps; full parameters at the end."""
    from torch.distributed.fsdp import fully_shard

    model = _mlp()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    _train(c, "fsdp2", model, model.parameters(), 6)
    c.put("fsdp2 params", torch.cat([p.full_tensor().detach().reshape(-1) for p in model.parameters()]))


@scenario
def tp(c):
    """DTensor tensor parallelism: parallelize_module with ColwiseParallel then RowwiseParallel."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (c.n,))
    model = parallelize_module(_mlp(width=8 * c.n), mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    _train(c, "tp", model, model.parameters(), 6, local_batch=False)
    c.put("tp params", torch.cat([p.full_tensor().detach().reshape(-1) for p in model.parameters()]))


@scenario
def mesh2d(c):
    """A 2-D (dp, tp) mesh: TP inside each dp group, FSDP2 across dp, 4 steps."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (2, c.n // 2), mesh_dim_names=("dp", "tp"))
    model = parallelize_module(_mlp(width=16), mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    fully_shard(model, mesh=mesh["dp"])
    dp_rank = mesh["dp"].get_local_rank()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for step in range(4):
        x, y = _batch(step, dp_rank)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    c.put("mesh2d losses", torch.tensor(losses, dtype=torch.float64))
    c.put("mesh2d params", torch.cat([p.full_tensor().detach().reshape(-1) for p in model.parameters()]))


@scenario
def pipeline(c):
    """torch.distributed.pipelining: one Linear+Tanh stage per rank, GPipe then 1F1B, 3 steps each."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    for sched_cls in (ScheduleGPipe, Schedule1F1B):
        torch.manual_seed(0)
        stages = [torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh()) for _ in range(c.n)]
        stage_mod = stages[c.rank]
        stage = PipelineStage(stage_mod, c.rank, c.n, torch.device("cpu"))
        losses = []
        sched = sched_cls(stage, n_microbatches=4, loss_fn=lambda out, y: torch.nn.functional.mse_loss(out, y))
        opt = torch.optim.SGD(stage_mod.parameters(), lr=0.1)
        for step in range(3):
            x, y = _batch(step, 0)
            opt.zero_grad()
            if c.rank == 0:
                sched.step(x)
            elif c.rank == c.n - 1:
                out_losses = []
                sched.step(target=y, losses=out_losses)
                losses.append(float(sum(out_losses)))
            else:
                sched.step()
            opt.step()
        name = sched_cls.__name__
        if c.rank == c.n - 1:
            c.put(f"pipeline {name} losses", torch.tensor(losses, dtype=torch.float64))
        c.put(f"pipeline {name} params", torch.cat([p.detach().reshape(-1) for p in stage_mod.parameters()]))


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with its backward (the transpose exchange)."""

    @staticmethod
    def forward(ctx, x, send, recv):
        ctx.send, ctx.recv = send, recv
        out = x.new_empty(sum(recv), x.shape[1])
        dist.all_to_all_single(out, x.contiguous(), recv, send)
        return out

    @staticmethod
    def backward(ctx, g):
        out = g.new_empty(sum(ctx.send), g.shape[1])
        dist.all_to_all_single(out, g.contiguous(), ctx.send, ctx.recv)
        return out, None, None


@scenario
def moe(c):
    """An MoE layer with one expert per rank: tokens routed by argmax, sent with a
    differentiable all_to_all_single of uneven splits, returned the same way; 4 steps."""
    torch.manual_seed(0)
    gate = torch.nn.Linear(16, c.n)
    experts = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(c.n))
    mine = experts[c.rank]
    opt = torch.optim.SGD(list(gate.parameters()) + list(mine.parameters()), lr=0.05)
    losses = []
    for step in range(4):
        x, y = _batch(step, c.rank)
        scores = gate(x).softmax(-1)
        dest = scores.argmax(-1)
        order = dest.argsort()
        send = torch.bincount(dest, minlength=c.n)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send)
        send_l, recv_l = send.tolist(), recv.tolist()
        routed = _AllToAll.apply(x[order], send_l, recv_l)
        back = _AllToAll.apply(mine(routed), recv_l, send_l)
        out = torch.empty_like(back).index_copy(0, order, back) * scores.gather(1, dest[:, None])
        loss = torch.nn.functional.mse_loss(out, y)
        opt.zero_grad()
        loss.backward()
        for p in gate.parameters():  # the gate is replicated: average its gradient
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= c.n
        opt.step()
        losses.append(float(loss))
    c.put("moe losses", torch.tensor(losses, dtype=torch.float64))
    c.put("moe expert", torch.cat([p.detach().reshape(-1) for p in mine.parameters()]))


@scenario
def dcp(c):
    """torch.distributed.checkpoint: save an FSDP2-sharded state dict, load it into a fresh model."""
    import torch.distributed.checkpoint as dcp_
    from torch.distributed.fsdp import fully_shard

    model = _mlp()
    fully_shard(model)
    _train(c, "dcp", model, model.parameters(), 2)
    path = [tempfile.mkdtemp(prefix="tprun-dcp-") if c.rank == 0 else None]
    dist.broadcast_object_list(path, src=0)
    dcp_.save({"model": model.state_dict()}, checkpoint_id=path[0])
    fresh = _mlp(seed=5)
    fully_shard(fresh)
    sd = {"model": fresh.state_dict()}
    dcp_.load(sd, checkpoint_id=path[0])
    fresh.load_state_dict(sd["model"])
    a = torch.cat([p.full_tensor().detach().reshape(-1) for p in model.parameters()])
    b = torch.cat([p.full_tensor().detach().reshape(-1) for p in fresh.parameters()])
    c.put("dcp loaded params", b, a)


def main(rank, n, backend, scenarios, out, init):
    global GLOO
    GLOO = backend == "gloo"
    torch.manual_seed(0)
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=n)
    if "tprun" in backend:
        assert dist.get_backend() == backend
    for s in scenarios:
        res = {}
        try:
            SCEN[s](Ctx(res))
        except BaseException:
            res["FAILED"] = traceback.format_exc()
            print(f"rank {rank} {s} FAILED\n{res['FAILED']}", flush=True)
        torch.save(res, os.path.join(out, f"{s}-{rank}.pt"))
    dist.barrier()
    if backend == "gloo":
        os._exit(0)  # torch 2.15's gloo can abort at exit after destroy_process_group
    dist.destroy_process_group()


if __name__ == "__main__":
    backend, n, names, out = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(","), sys.argv[4]
    if backend == "tprun":
        import tprun.torch  # noqa: F401
    init = "file://" + os.path.join(tempfile.mkdtemp(prefix="tprun-progs-"), "store")
    torch.multiprocessing.spawn(main, args=(n, backend, names, out, init), nprocs=n)
