#!/usr/bin/env python3
"""Side-by-side benchmark that only measures on a quiet machine (issue 18).

One command runs every case, with bench_peers.py's systems (same workers, same timing; see its
docstring), and prints the markdown tables of docs/benchmarks/README.md:

    /tmp/peers/venv/bin/python tools/bench_quiet.py --tprun target/release/tprun \\
        --rounds 4 --out /tmp/peers/quiet.json

Cases (--cases picks some): short = prompt 128 + 32 greedy steps (every system); prefill1024 =
prompt 1024 + 8 steps; ctx2048 = prompt 2048 + 32 steps (decode at 2048 tokens of context);
the long cases run --long-systems only.

Quiet rules, per job (one job = one system's one round):
  * before it, wait until processes other than this script's own tree use less than --max-load
    of the CPUs (default 0.05 = 5%) over one second, sampling /proc/stat like
    /work/shared/tools/quiet (give up waiting after --wait s and run it anyway, marked);
  * during it, log the other processes' CPU use (busy time from /proc/stat minus this tree's own
    CPU time, which covers the idle workers and the tprun children);
  * a job whose others' use exceeded --max-load is LOADED: it is re-run up to --retries times,
    and LOADED rounds are left out of the medians (kept in the JSON, and counted in the table).
Rounds interleave across systems (round r runs every system once, the order rotating).
tprun's jobs run `bench --roofline`, whose ceilings (read GB/s, f32 and bf16-dot GFLOP/s) and
decode % of floor / prefill % of peak the table reports (medians over its quiet rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_peers as bp  # noqa: E402

CASES = {"short": (128, 32), "prefill1024": (1024, 8), "ctx2048": (2048, 32)}
TICK = os.sysconf("SC_CLK_TCK")


def busy() -> float:
    """CPU-seconds all processes have been busy (not idle, not iowait) since boot."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / TICK


def tree_cpu() -> float:
    """CPU-seconds of this process, its reaped children and its live descendants (the workers)."""
    me, ch = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    total = me.ru_utime + me.ru_stime + ch.ru_utime + ch.ru_stime
    parent: dict[int, int] = {}
    times: dict[int, float] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            st = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        f = st[st.rfind(")") + 2:].split()
        parent[int(d)] = int(f[1])
        times[int(d)] = (int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])) / TICK
    ours, frontier = set(), [os.getpid()]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p and c not in ours]
        ours.update(kids)
        frontier.extend(kids)
    return total + sum(times.get(p, 0.0) for p in ours)


def others_cpus(seconds: float) -> float:
    """Other processes' CPUs in use over the next `seconds`."""
    b0, o0 = busy(), tree_cpu()
    time.sleep(seconds)
    return max(0.0, busy() - b0 - (tree_cpu() - o0)) / seconds


def wait_quiet(limit: float, wait: float) -> tuple[float, float]:
    """Waits until others use less than `limit` CPUs over a second; (seconds waited, last use)."""
    t0 = time.time()
    while True:
        use = others_cpus(1.0)
        if use < limit or time.time() - t0 > wait:
            return time.time() - t0, use


def job(system, limit: float, wait: float) -> dict:
    waited, before = wait_quiet(limit, wait)
    b0, o0, s = busy(), tree_cpu(), time.time()
    res = system.round()
    wall = time.time() - s
    others = max(0.0, busy() - b0 - (tree_cpu() - o0)) / max(wall, 1e-9)
    res["quiet"] = {"waited_s": waited, "others_before": before, "others_during": others,
                    "wall_s": wall, "loaded": others >= limit or before >= limit}
    return res


def med(v: list[float], digits: int = 1) -> str:
    if not v:
        return "-"
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{statistics.median(v):.{digits}f} ({min(v):.{digits}f}..{max(v):.{digits}f})"


def run_case(case: str, names: list[str], args, log) -> dict:
    p, k = CASES[case]
    bp.PROMPT_LEN, bp.NEW_TOKENS = p, k
    os.environ["BENCH_PROMPT_LEN"], os.environ["BENCH_NEW_TOKENS"] = str(p), str(k)
    os.environ["BENCH_TPRUN_ROOFLINE"] = "1"
    limit = args.max_load * os.cpu_count()
    systems, rounds = {}, {n: [] for n in names}
    try:
        for n in names:
            t0 = time.perf_counter()
            systems[n] = bp.Tprun(n, args) if n in bp.TPRUN_SYSTEMS else bp.Worker(n, args)
            log(f"[{case}] {n}: ready in {time.perf_counter() - t0:.1f} s")
        for r in range(args.rounds):
            o = r % len(names)
            for n in names[o:] + names[:o]:
                for attempt in range(args.retries + 1):
                    res = job(systems[n], limit, args.wait)
                    q = res["quiet"]
                    rounds[n].append(res)
                    log(f"[{case}] round {r + 1}/{args.rounds} {n:17s} prefill "
                        f"{p / res['prefill_s']:8.1f} decode {k / res['decode_s']:6.1f} tok/s; "
                        f"others {q['others_during']:.2f} CPUs (waited {q['waited_s']:.0f} s) "
                        f"[{'LOADED' if q['loaded'] else 'ok'}]")
                    if not q["loaded"]:
                        break
    finally:
        for s in systems.values():
            s.close()
    return {"prompt_len": p, "new_tokens": k, "rounds": rounds,
            "info": {n: systems[n].info for n in systems}}


def table(case: str, res: dict, threads: int) -> list[str]:
    p, k = res["prompt_len"], res["new_tokens"]
    out = [f"\n**{case}**: prompt {p}, {k} greedy decode steps, {threads} threads; median "
           f"(range) over quiet rounds\n",
           "| system | prefill tok/s | decode tok/s | quiet / LOADED rounds | "
           "tprun decode % of read floor | tprun prefill % of peak |",
           "| --- | --- | --- | --- | --- | --- |"]
    for n, rs in res["rounds"].items():
        ok = [x for x in rs if not x["quiet"]["loaded"]]
        pre = [p / x["prefill_s"] for x in ok]
        dec = [k / x["decode_s"] for x in ok]
        tp = [x["tprun"] for x in ok if "tprun" in x]
        floor = [t["decode_floor_pct"] for t in tp if t.get("decode_floor_pct")]
        peak = [t["prefill_peak_pct"] for t in tp if t.get("prefill_peak_pct")]
        out.append(f"| {bp.LABELS[n].format(T=threads)} | {med(pre)} | {med(dec)} | "
                   f"{len(ok)} / {len(rs) - len(ok)} | {med(floor, 0) if floor else ''} | "
                   f"{med(peak, 0) if peak else ''} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tprun", required=True, help="tprun binary")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--cases", default="short,prefill1024,ctx2048")
    ap.add_argument("--systems", default="llama-bf16,llama-f16,hf-bf16,tprun-n2,tprun-n1,"
                    "tprun-n2-bf16dot", help="systems of the short case")
    ap.add_argument("--long-systems", default="llama-bf16,tprun-n2,tprun-n1,tprun-n2-bf16dot")
    ap.add_argument("--model-dir", default="/tmp/peers")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-load", type=float, default=0.05, help="share of the CPUs (0.05 = 5%%)")
    ap.add_argument("--wait", type=float, default=600, help="most seconds to wait for quiet")
    ap.add_argument("--retries", type=int, default=2, help="re-runs of a LOADED job")
    ap.add_argument("--out", help="every raw number, as JSON")
    args = ap.parse_args()
    if not Path(args.tprun).is_file():
        sys.exit(f"--tprun {args.tprun}: no such file")
    t0 = time.time()
    started = time.strftime("%Y-%m-%d %H:%M %Z")
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    results = {}
    for case in [c.strip() for c in args.cases.split(",") if c.strip()]:
        if case not in CASES:
            sys.exit(f"--cases: unknown {case}; known: {', '.join(CASES)}")
        names = (args.systems if case == "short" else args.long_systems).split(",")
        results[case] = run_case(case, [n.strip() for n in names if n.strip()], args, log)
    # The ceilings, from tprun's quiet rounds (every rank measuring at once, summed).
    rl = [x["tprun"]["roofline"] for r in results.values() for rs in r["rounds"].values()
          for x in rs if "tprun" in x and x["tprun"].get("roofline")
          and not x["quiet"]["loaded"] and x["tprun"]["world_size"] == args.threads]
    lines = [f"Measured {started} on {bp.cpu_model()} ({os.cpu_count()} CPUs), "
             f"{time.time() - t0:.0f} s in all, by `tools/bench_quiet.py` (jobs wait for other "
             f"processes < {100 * args.max_load:.0f}% of the CPUs; LOADED rounds dropped)."]
    if rl:
        lines.append(f"Roofline ({args.threads} ranks x 1 thread, median): read "
                     f"{med([x['read_gbps'] for x in rl])} GB/s, f32 FMA "
                     f"{med([x['f32_gflops'] for x in rl], 0)} GFLOP/s, bf16 dot "
                     f"{med([x['bf16_gflops'] for x in rl], 0)} GFLOP/s.")
    for case, res in results.items():
        lines += table(case, res, args.threads)
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text(json.dumps({"started": started, "cpu": bp.cpu_model(),
                                              "args": vars(args), "cases": results,
                                              "table": lines}, indent=1) + "\n")
        log(f"raw numbers: {args.out}")


if __name__ == "__main__":
    main()
