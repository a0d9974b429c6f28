"""Training-step time, gloo vs the tprun backend, side by side in one run:
`python python/bench_train.py [--ranks 2] [--rounds 5] [--steps 10] [--width 2048] [--layers 12]`.

For each round and backend, N ranks start with torch.multiprocessing.spawn (init_method file://),
build the same MLP (layers x (width x width + width); the defaults give 50.4M parameters), and
time `--steps` full training steps (forward, backward with its collectives, optimizer step) under
DDP and under FSDP2 after two warm-up steps: an untimed barrier lines the ranks up before each
step, rank 0's step time is reported (its collectives wait for the other rank). Prints the median
and range over the rounds, in ms per step, and checks that both backends trained alike (the last
step's loss, equal within 1e-3 relative: the reductions' order differs). Needs torch and the
tprun package installed. Measure on a quiet machine: the ranks compete for the CPUs with
everything else.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# This folder holds the package's sources (without the built _native module): use the installed
# one (an editable install's own entry further down stays).
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]


def model(width, layers):
    torch.manual_seed(0)
    mods = []
    for _ in range(layers):
        mods += [torch.nn.Linear(width, width), torch.nn.GELU()]
    return torch.nn.Sequential(*mods)


def steps_ms(m, params, width, steps):
    """(median ms per step, the last step's loss): each rank trains on its own batch."""
    opt = torch.optim.SGD(params, lr=1e-4)
    x = torch.randn(16, width, generator=torch.Generator().manual_seed(dist.get_rank()))
    times = []
    for i in range(steps + 2):
        dist.barrier()
        t0 = time.perf_counter()
        loss = m(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 2:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), loss.item()


def worker(rank, n, backend, init, args, out):
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // n))
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=n)
    from torch.distributed.fsdp import fully_shard

    m = model(args.width, args.layers)
    ddp = torch.nn.parallel.DistributedDataParallel(m)
    t_ddp, l_ddp = steps_ms(ddp, ddp.parameters(), args.width, args.steps)
    m = model(args.width, args.layers)
    for layer in m:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(m)
    t_fsdp, l_fsdp = steps_ms(m, m.parameters(), args.width, args.steps)
    if rank == 0:
        with open(out, "w") as f:
            f.write(f"{t_ddp} {t_fsdp} {l_ddp} {l_fsdp}\n")
    dist.barrier()
    if backend == "gloo":
        os._exit(0)  # torch 2.15's gloo can abort at exit after destroy_process_group
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=12)
    args = ap.parse_args()
    params = args.layers * (args.width * args.width + args.width)
    res = {b: ([], []) for b in ("gloo", "tprun")}
    losses = {}
    for _ in range(args.rounds):
        for b in res:
            d = tempfile.mkdtemp(prefix="tprun-bench-")
            out = os.path.join(d, "result")
            mp.spawn(worker, args=(args.ranks, b, "file://" + os.path.join(d, "store"), args, out), nprocs=args.ranks)
            ddp, fsdp, *loss = map(float, open(out).read().split())
            res[b][0].append(ddp)
            res[b][1].append(fsdp)
            losses[b] = loss
    print(f"{args.ranks} ranks, {params / 1e6:.1f}M parameters, median (range) of {args.rounds} rounds, ms per step")
    print("| step | gloo ms | tprun ms | speed-up |")
    print("| --- | ---: | ---: | ---: |")
    for i, name in enumerate(("DDP", "FSDP2")):
        g, t = res["gloo"][i], res["tprun"][i]
        mg, mt = statistics.median(g), statistics.median(t)
        print(f"| {name} | {mg:.1f} ({min(g):.1f}-{max(g):.1f}) | {mt:.1f} ({min(t):.1f}-{max(t):.1f}) | {mg / mt:.2f}x |")
    # Same model, data and steps: the backends must have trained alike.
    for i, name in enumerate(("DDP", "FSDP2")):
        g, t = losses["gloo"][i], losses["tprun"][i]
        if abs(g - t) > 1e-3 * max(abs(g), 1e-12):
            sys.exit(f"bench_train: {name}'s last loss differs: gloo {g!r}, tprun {t!r}")
    print(f"last losses equal within 1e-3: DDP {losses['tprun'][0]:.6g}, FSDP2 {losses['tprun'][1]:.6g}")


if __name__ == "__main__":
    main()
