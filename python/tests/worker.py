"""One rank of the tests in test_tprun.py: `python worker.py MODE` under tprun or torchrun.

Prints "OK <rank> <digest of every result>" when every check passed; the test compares digests
across ranks (same bits everywhere)."""

import hashlib
import os
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

import tprun
import tprun.torch

MODE = sys.argv[1]
digest = hashlib.sha256()


def inputs(world, n, dtype, seed):
    """Every rank's input (each rank can compute the others', for the reference)."""
    out = []
    for r in range(world):
        g = torch.Generator().manual_seed(seed * 100 + r)
        x = torch.randn(n, generator=g) * 4
        if dtype in (torch.float32, torch.bfloat16, torch.float16):
            out.append(x.to(dtype))
        else:
            out.append((x * 1000).to(dtype))
    return out


def reduce_ref(xs, op):
    """Rank order, in f32, rounded once to the storage type: the collectives' definition."""
    acc = xs[0].float()
    for x in xs[1:]:
        x = x.float()
        acc = {
            "sum": acc + x,
            "avg": acc + x,
            "product": acc * x,
            "max": torch.where(acc > x, acc, x),
            "min": torch.where(acc < x, acc, x),
        }[op]
    if op == "avg":  # the f32 sum divided once, then rounded (the collectives' Avg)
        acc = acc / len(xs)
    return acc.to(xs[0].dtype)


def same(got, want, what, everywhere=True):
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, got.shape, want.shape)
    if not torch.equal(
        got.view(torch.uint8) if got.dtype != torch.bool else got,
        want.view(torch.uint8) if want.dtype != torch.bool else want,
    ):
        bad = (got != want).nonzero()[:5].flatten().tolist()
        raise AssertionError(f"{what}: differs at {bad}: {got.flatten()[bad]} vs {want.flatten()[bad]}")
    if everywhere:  # a result every rank holds: goes into the digest compared across ranks
        digest.update(got.contiguous().view(torch.uint8).numpy().tobytes())


def np_view(t):
    """A numpy array sharing t's memory (bf16 as uint16, tagged by dtype=)."""
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


def check_numpy_api(comm):
    world, rank = comm.world_size, comm.rank
    names = {torch.float32: None, torch.float16: None, torch.bfloat16: "bfloat16"}
    for seed, n in enumerate([1, 7, 1000, 70_000, 300_001]):
        for dt, name in names.items():
            xs = inputs(world, n, dt, seed)
            for op in ["sum", "max", "min", "product"]:
                t = xs[rank].clone()
                comm.all_reduce(np_view(t), op=op, dtype=name)
                same(t, reduce_ref(xs, op), f"numpy all_reduce {op} {dt} n={n}")
            # reduce_scatter: input of world * m
            m = n
            big = inputs(world, world * m, dt, seed + 50)
            out = torch.empty(m, dtype=dt)
            comm.reduce_scatter(np_view(big[rank]), np_view(out), dtype=name)
            same(out, reduce_ref(big, "sum")[rank * m : (rank + 1) * m], f"numpy reduce_scatter {dt} n={n}", False)
        for dt in [
            torch.float32,
            torch.bfloat16,
            torch.float16,
            torch.uint8,
            torch.int32,
            torch.int64,
            torch.float64,
            torch.int8,
        ]:
            xs = inputs(world, n, dt, seed + 7)
            out = torch.empty(world * n, dtype=dt)
            name = "bfloat16" if dt == torch.bfloat16 else None
            comm.all_gather(np_view(xs[rank]), np_view(out), dtype=name)
            same(out, torch.cat(xs), f"numpy all_gather {dt} n={n}")
            root = (seed + 1) % world
            t = xs[rank].clone()
            comm.broadcast(np_view(t), root=root)
            same(t, xs[root], f"numpy broadcast {dt} n={n} root={root}")
    # memoryview / bytearray buffers
    b = bytearray(np.full(5, rank + 1, np.float32).tobytes())
    comm.all_reduce(memoryview(b).cast("f"))
    same(torch.frombuffer(b, dtype=torch.float32).clone(), torch.full((5,), world * (world + 1) / 2), "memoryview")
    for bad, kind in [
        (lambda: comm.all_reduce(np.zeros(4, np.int16)), TypeError),
        (lambda: comm.all_reduce(np.zeros(4, np.float32), op="band"), tprun.CommError),
        (lambda: comm.all_reduce(np.zeros((4, 4), np.float32)[:, 0]), ValueError),
        (lambda: comm.all_reduce(bytes(16), dtype="float32"), ValueError),
    ]:
        try:
            bad()
        except kind:
            pass
        else:
            raise AssertionError(f"no {kind.__name__}")
    comm.barrier()
    s = comm.stats()
    assert s["all_reduce"]["count"] > 0 and s["barrier"]["count"] == 1, s


def check_torch_api():
    world, rank = dist.get_world_size(), dist.get_rank()
    assert dist.get_backend() == "tprun", dist.get_backend()
    ops = {
        "sum": dist.ReduceOp.SUM,
        "avg": dist.ReduceOp.AVG,
        "max": dist.ReduceOp.MAX,
        "min": dist.ReduceOp.MIN,
        "product": dist.ReduceOp.PRODUCT,
    }
    for seed, n in enumerate([1, 33, 100_000]):
        for dt in [torch.float32, torch.bfloat16, torch.float16]:
            xs = inputs(world, n, dt, seed + 20)
            for name, op in ops.items():
                t = xs[rank].clone()
                dist.all_reduce(t, op=op)
                same(t, reduce_ref(xs, name), f"torch all_reduce {name} {dt} n={n}")
            big = inputs(world, world * n, dt, seed + 30)
            out = torch.empty(n, dtype=dt)
            dist.reduce_scatter_tensor(out, big[rank])
            same(out, reduce_ref(big, "sum")[rank * n : (rank + 1) * n], f"torch reduce_scatter_tensor {dt}", False)
        for dt in [torch.float32, torch.bfloat16, torch.int64, torch.int32, torch.uint8, torch.bool]:
            xs = [x.reshape(-1, 1) for x in inputs(world, n, dt, seed + 40)]
            out = torch.empty(world * n, 1, dtype=dt)
            dist.all_gather_into_tensor(out, xs[rank])
            same(out, torch.cat(xs), f"torch all_gather_into_tensor {dt}")
            outs = [torch.empty_like(xs[rank]) for _ in range(world)]
            dist.all_gather(outs, xs[rank])
            same(torch.cat(outs), torch.cat(xs), f"torch all_gather {dt}")
            t = xs[rank].clone()
            dist.broadcast(t, src=world - 1)
            same(t, xs[world - 1], f"torch broadcast {dt}")
    work = dist.all_reduce(torch.ones(3), async_op=True)
    work.wait()
    dist.barrier()


def train(kind, backend):
    """20 steps of a small model under DDP or FSDP (CPU); prints the losses."""
    dist.init_process_group(backend)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    if kind == "ddp":
        ddp_model = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import FullyShardedDataParallel

        ddp_model = model = FullyShardedDataParallel(model, device_id=torch.device("cpu"))
    opt = torch.optim.SGD(ddp_model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(100 + dist.get_rank())
    losses = []
    for _ in range(20):
        x = torch.randn(8, 16, generator=g)
        y = x.sum(1, keepdim=True).sin()
        loss = torch.nn.functional.mse_loss(ddp_model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    if kind == "fsdp":  # each rank holds its shard: check the full parameters
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(model):
            params = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    else:
        params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(params) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, params)
    assert all(torch.equal(p, params) for p in gathered), "parameters differ between ranks"
    print("LOSSES", " ".join(repr(v) for v in losses), flush=True)
    digest.update(params.numpy().tobytes())


def main():
    rank = int(os.environ["RANK"])
    if MODE == "ops":
        comm = tprun.Communicator.from_env()
        assert (comm.rank, comm.world_size) == (rank, int(os.environ["WORLD_SIZE"]))
        check_numpy_api(comm)
        dist.init_process_group("tprun")
        check_torch_api()
    elif MODE.split("-")[0] in ("ddp", "fsdp"):
        train(*MODE.split("-"))
    elif MODE.startswith("kill"):
        # The launcher's SIGTERM (it tears the job down) must not end this rank before it reports.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        dist.init_process_group("tprun")
        sub = dist.new_group([0, 1]) if MODE == "kill-sub" else None
        world = dist.get_world_size()
        dist.barrier()
        if sub is not None:
            dist.all_reduce(torch.ones(4), group=sub)  # the group works before the kill
        if rank == 1:
            os.kill(os.getpid(), 9)
        t0 = time.monotonic()
        try:
            for _ in range(2):
                if MODE == "kill":
                    dist.all_reduce(torch.ones(1000))
                elif MODE == "kill-p2p":  # rank 0 waits to receive, rank 2 sends more than fits
                    if rank == 0:
                        dist.recv(torch.empty(1000), src=1)
                    else:
                        dist.send(torch.ones(4 << 20), dst=1)
                elif MODE == "kill-a2a":
                    dist.all_to_all_single(torch.empty(world * 1000), torch.ones(world * 1000))
                elif MODE == "kill-sub":
                    if rank != 0:
                        print("CommError after 0 s: not in the sub-group", flush=True)
                        sys.exit(3)
                    dist.all_reduce(torch.ones(1000), group=sub)
                time.sleep(0.5)
        except tprun.CommError as e:
            print(f"CommError after {time.monotonic() - t0:.2f} s: {e}", flush=True)
            sys.exit(3)
        raise AssertionError("no error")
    elif MODE == "unsupported":
        dist.init_process_group("tprun")
        t = torch.ones(4)
        calls = {
            "recv from any source": lambda: dist.recv(t),
            "PREMUL_SUM of int32": lambda: dist.all_reduce(
                torch.ones(4, dtype=torch.int32), op=dist._make_nccl_premul_sum(2.0)
            ),
            "all_reduce of int16": lambda: dist.all_reduce(torch.ones(4, dtype=torch.int16)),
            "BAND of float32": lambda: dist.all_reduce(t, op=dist.ReduceOp.BAND),
            "wrong output size": lambda: dist.all_gather_into_tensor(torch.empty(3), torch.ones(4)),
        }
        for what, call in calls.items():
            try:
                call()
            except Exception as e:  # noqa: BLE001 (the message is what is checked)
                print(f"UNSUPPORTED {what}: {type(e).__name__}: {e}", flush=True)
            else:
                raise AssertionError(f"{what} did not fail")
        dist.barrier()
    if MODE.endswith("-gloo"):
        # torch 2.15's gloo aborts the process at exit ("terminate called without an active
        # exception") after destroy_process_group: not what this test is about.
        print(f"OK {rank} {digest.hexdigest()}", flush=True)
        os._exit(0)
    if dist.is_initialized():
        dist.destroy_process_group()
    print(f"OK {rank} {digest.hexdigest()}", flush=True)


main()
