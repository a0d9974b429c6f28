"""tprun backend vs gloo, side by side: `python python/bench.py [--ranks 2] [--rounds 3]`.

Runs `tprun -n N -- python bench.py --worker BACKEND` for gloo and tprun alternately (same
process layout), plus `tprun -n N perf --json` (the Rust figure), and prints a markdown table of
the median (and range) of the rounds per size: time per call in µs, tprun's speed-up over gloo, and the Python layer's
overhead over the Rust call. Sizes follow nccl-tests: all_gather's size is its output.
Needs torch and the tprun package installed, and the tprun binary (TPRUN_BIN, else target/)."""

import argparse
import json
import os
import subprocess
import sys
import time
from statistics import median
from pathlib import Path

# This folder holds the package's sources (without the built _native module): use the installed one.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

SIZES = [8, 64, 512, 4096, 32 << 10, 256 << 10, 2 << 20, 32 << 20]
OPS = ["all_reduce", "all_gather"]


def worker(backend):
    import torch
    import torch.distributed as dist

    if backend == "tprun":
        import tprun.torch  # noqa: F401
    dist.init_process_group(backend)
    world, rank = dist.get_world_size(), dist.get_rank()
    for op in OPS:
        for size in SIZES:
            n = max(1, size // 4)
            if op == "all_reduce":
                buf = torch.ones(n)
                call = lambda buf=buf: dist.all_reduce(buf)
            else:
                out = torch.empty(max(world, n - n % world))
                inp = torch.ones(out.numel() // world)
                call = lambda out=out, inp=inp: dist.all_gather_into_tensor(out, inp)
            iters = max(5, min(2000, (64 << 20) // max(size, 1) // 8))
            for _ in range(3):
                call()
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(iters):
                call()
            us = (time.perf_counter() - t0) / iters * 1e6
            if rank == 0:
                print(json.dumps({"op": op, "bytes": size, "us": us}), flush=True)
    dist.barrier()
    # gloo of torch 2.15 aborts at interpreter exit after destroy_process_group; skip teardown.
    sys.stdout.flush()
    os._exit(0)


def launch(tprun, ranks, args):
    p = subprocess.run(
        [tprun, "-n", str(ranks), "--only-rank", "0", "--no-prefix", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if p.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{p.stdout}{p.stderr}")
    return [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", choices=["gloo", "tprun"])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker)
    root = Path(__file__).resolve().parents[1]
    tprun = os.environ.get("TPRUN_BIN") or next(
        (str(p) for p in [root / "target/release/tprun", root / "target/debug/tprun"] if p.exists()), "tprun"
    )
    runs = {}
    for _ in range(a.rounds):
        for backend in ["gloo", "tprun"]:
            for r in launch(tprun, a.ranks, ["--", sys.executable, __file__, "--worker", backend]):
                runs.setdefault((backend, r["op"], r["bytes"]), []).append(r["us"])
        for op in OPS:
            out = launch(
                tprun,
                a.ranks,
                ["perf", "--op", op.replace("_", "-"), "--json", "--min-bytes", "8", "--max-bytes", "32M"],
            )
            for r in out[0]["rows"]:
                runs.setdefault(("rust", op, r["bytes"]), []).append(r["time_us"])
    print(f"{a.ranks} ranks, median (range) of {a.rounds} alternating rounds, µs per call (float32)\n")
    print("| op | size | gloo µs | tprun (Python) µs | speed-up | Rust `tprun perf` µs | Python overhead µs |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for op in OPS:
        for s in SIZES:
            g, t = runs[("gloo", op, s)], runs[("tprun", op, s)]
            r = runs.get(("rust", op, s), [float("nan")])
            gm, tm, rm = median(g), median(t), median(r)
            print(
                f"| {op} | {human(s)} | {gm:.1f} ({min(g):.1f}-{max(g):.1f}) | {tm:.1f} ({min(t):.1f}-{max(t):.1f}) "
                f"| {gm / tm:.0f}x | {rm:.1f} ({min(r):.1f}-{max(r):.1f}) | {tm - rm:.1f} |"
            )


def human(n):
    for unit in ["B", "KiB", "MiB"]:
        if n < 1024 or unit == "MiB":
            return f"{n:g} {unit}"
        n /= 1024


if __name__ == "__main__":
    main()
