#!/usr/bin/env bash
# GPU acceptance for `--device cuda` (issue 20), for a machine with a GPU and no Rust toolchain:
# it takes a prebuilt `cargo build --release --features cuda` binary and the test fixtures.
#
#   tools/gpu-acceptance.sh --bin target/release/tprun --fixtures tests/fixtures [--out FILE.json]
#   tools/gpu-acceptance.sh --emulate --bin target/debug/tprun   # no GPU: the CUDA emulator
#
# Prints what the GPU run loaded, then checks (every step bounded by a timeout, ~5 min in all on
# one GPU): `perf --check` for every op, f32 and bf16, at 2 and 4 ranks on one GPU (0 wrong),
# host-staged (the default for ranks sharing a GPU) and with TPRUN_CUDA_TRANSPORT=ipc;
# `logits` and `--hidden-states` on cuda against cpu at TP 1 and 2, TP 2 both ways (max |diff|
# <= 1e-3 on the f32 fixture, <= 2e-2 on bf16); `generate`'s greedy tokens equal on cuda and
# cpu (f32 fixture); the perf sweep 8 B - 64 MiB over IPC, with all-reduce at 8 B - 32 KiB
# against the device-to-device copy of the same bytes; the trace of device collectives;
# `-n auto`; `bench --preset qwen2.5-0.5b` at TP 1 and 2, TP 2 both ways. Writes one JSON
# summary (default gpu-acceptance.json) and exits 0 only if every check passed. Needs bash and
# python3 (stdlib).
#
# --emulate runs the same checks on tprun's CUDA emulator (a `--features cuda-emulator` build;
# TPRUN_CUDA_EMULATE=1 with one emulated GPU, as the acceptance machine has), with sizes cut so it
# takes minutes on a CPU (perf to 1 MiB, bench on the f32 fixture instead of the 0.5B preset):
# it proves the script before a GPU run. Either way the first run must say whether the device is
# emulated, and a GPU run that finds itself emulated fails.
set -euo pipefail
bin=target/release/tprun fixtures=tests/fixtures out=gpu-acceptance.json emulate=0
while [ $# -gt 0 ]; do
    case "$1" in
        --bin) bin=$2; shift 2 ;;
        --fixtures) fixtures=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --emulate) emulate=1; shift ;;
        -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
        *) echo "gpu-acceptance: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
[ -x "$bin" ] || { echo "gpu-acceptance: no executable at $bin (--bin)" >&2; exit 2; }
[ -d "$fixtures/tiny-t5-f32-untied" ] || { echo "gpu-acceptance: no fixtures at $fixtures" >&2; exit 2; }
if [ "$emulate" = 1 ]; then
    export TPRUN_CUDA_EMULATE=1 TPRUN_CUDA_EMULATE_GPUS=1
else
    unset TPRUN_CUDA_EMULATE
    command -v nvidia-smi >/dev/null && nvidia-smi -L || echo "gpu-acceptance: no nvidia-smi"
fi
# Any test this machine runs must fail, not skip, where the GPU is not usable.
export TPRUN_REQUIRE_GPU=1
exec python3 - "$bin" "$fixtures" "$out" "$emulate" <<'PY'
import json, os, struct, subprocess, sys, tempfile, time

BIN, FIX, OUT = sys.argv[1:4]
EMULATE = sys.argv[4] == "1"
# Sizes: the emulator runs kernels on CPU threads and GEMMs as plain loops.
CHECK_MAX, SWEEP_MAX = ("1M", "1M") if EMULATE else ("16M", "64M")
F32, BF16 = f"{FIX}/tiny-t5-f32-untied", f"{FIX}/tiny-hub-bf16-tied"
checks, started = [], time.time()

def run(args, limit=120, env=None):
    """tprun ARGS (with `env` added) -> (rc, stdout, stderr); a timeout is rc 124."""
    try:
        p = subprocess.run([BIN, *args], capture_output=True, text=True, timeout=limit,
                           env={**os.environ, **(env or {})})
        return p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        return 124, e.stdout or "", e.stderr or ""

def record(name, ok, **detail):
    checks.append({"check": name, "ok": bool(ok), **detail})
    print(f"{'PASS' if ok else 'FAIL'} {name} {json.dumps(detail)[:300]}", flush=True)

def last_json(text):
    for line in reversed(text.strip().splitlines()):
        line = line.split("]: ", 1)[-1] if line.startswith("[rank") else line
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None

def read_f32(path):
    """Every f32 tensor of a safetensors file in name order, as one flat list (stdlib only)."""
    with open(path, "rb") as f:
        b = f.read()
    n = struct.unpack("<Q", b[:8])[0]
    header = json.loads(b[8:8 + n])
    out = []
    for name in sorted(k for k in header if k != "__metadata__"):
        meta = header[name]
        lo, hi = meta["data_offsets"]
        assert meta["dtype"] == "F32", meta["dtype"]
        out += struct.unpack(f"<{(hi - lo) // 4}f", b[8 + n + lo:8 + n + hi])
    return out

# What the CUDA path loaded (libraries, device, transport) is on the first run's stderr.
rc, so, se = run(["-n", "2", "--device", "cuda", "perf", "--max-bytes", "8", "--iters", "1"])
print(se, end="")
record("cuda_starts", rc == 0, rc=rc, stderr=se.strip()[-2000:])
record("device_emulated_only_with_emulate", ("device is EMULATED" in se) == EMULATE,
       emulate=EMULATE)

# Ranks sharing one GPU stage through the host by default; TPRUN_CUDA_TRANSPORT=ipc makes them
# run the IPC kernels anyway, so both paths are checked on a one-GPU machine.
for transport in ("auto", "ipc"):
    for world in (2, 4):
        for dtype in ("f32", "bf16"):
            rc, so, se = run(["-n", str(world), "--device", "cuda", "--only-rank", "0", "perf",
                              "--op", "all", "--dtype", dtype, "--check", "--json",
                              "--max-bytes", CHECK_MAX, "--iters", "2", "--warmup", "1"], 180,
                             {"TPRUN_CUDA_TRANSPORT": transport})
            res = last_json(so) or {}
            wrong = sum(r.get("wrong", 0) for r in res.get("rows", [])) if res else None
            record(f"perf_check_{transport}_n{world}_{dtype}",
                   rc == 0 and wrong == 0 and res.get("rows"), rc=rc, wrong=wrong,
                   rows=len(res.get("rows", [])), stderr=se.strip()[-500:])

# TP 2 on one GPU stages through the host by default; "ipc" runs the device collectives.
RUNS = ((1, "auto"), (2, "auto"), (2, "ipc"))
IPC = {"TPRUN_CUDA_TRANSPORT": "ipc"}

with tempfile.TemporaryDirectory() as tmp:
    for model, tol in ((F32, 1e-3), (BF16, 2e-2)):
        for tp, transport in RUNS:
            got = {}
            for dev in ("cpu", "cuda"):
                path = f"{tmp}/{dev}.safetensors"
                hidden = f"{tmp}/{dev}.hidden.safetensors"
                rc, so, se = run(["-n", str(tp), "--device", dev, "logits", "--model", model,
                                  "--input-ids", "1,2,3,4,5,6,7,8", "--out", path,
                                  "--hidden-states", hidden], 120,
                                 {"TPRUN_CUDA_TRANSPORT": transport})
                got[dev] = read_f32(path) + read_f32(hidden) if rc == 0 else None
                if rc:
                    got[dev + "_err"] = se.strip()[-500:]
            diff = None
            if got["cpu"] and got["cuda"] and len(got["cpu"]) == len(got["cuda"]):
                diff = max(abs(a - b) for a, b in zip(got["cpu"], got["cuda"]))
            record(f"logits_and_hidden_{os.path.basename(model)}_tp{tp}_{transport}",
                   diff is not None and diff <= tol,
                   max_abs_diff=diff, tol=tol, err=got.get("cuda_err") or got.get("cpu_err"))

for tp, transport in RUNS:
    ids = {}
    for dev in ("cpu", "cuda"):
        rc, so, se = run(["-n", str(tp), "--device", dev, "--only-rank", "0", "generate",
                          "--model", F32, "--input-ids", "1,2,3", "--greedy", "--ignore-eos",
                          "--max-new-tokens", "16", "--json"], 120,
                         {"TPRUN_CUDA_TRANSPORT": transport})
        ids[dev] = (last_json(so) or {}).get("output_ids") if rc == 0 else se.strip()[-500:]
    record(f"generate_greedy_f32_tp{tp}_{transport}",
           isinstance(ids["cpu"], list) and ids["cpu"] == ids["cuda"],
           cpu=ids["cpu"], cuda=ids["cuda"])

# The sweep on the device collectives (IPC), as a machine with one GPU per rank runs them.
rc, so, se = run(["-n", "2", "--device", "cuda", "--only-rank", "0", "perf", "--op", "all",
                  "--min-bytes", "8", "--max-bytes", SWEEP_MAX, "--json"], 240, IPC)
sweep = last_json(so)
record(f"perf_sweep_8B_{SWEEP_MAX}_n2_ipc", rc == 0 and sweep is not None, rc=rc,
       stderr=se.strip()[-500:])
# All-reduce latency at 8 B - 32 KiB against the device-to-device copy of the same bytes.
latency = [{"bytes": r["bytes"], "time_us": r["time_us"], "copy_us": r.get("copy_us")}
           for r in (sweep or {}).get("rows", [])
           if r["op"] == "all_reduce" and r["bytes"] <= 32 << 10]
record("allreduce_latency_has_copy_floor", latency and all(x["copy_us"] for x in latency),
       rows=latency)

# The trace records the device collectives as on CPU (one event per call, algorithm named).
with tempfile.TemporaryDirectory() as tmp:
    trace = f"{tmp}/trace.json"
    rc, so, se = run(["-n", "2", "--device", "cuda", "--trace", trace, "perf", "--op",
                      "all_reduce", "--max-bytes", "1M", "--iters", "2", "--warmup", "0"], 120,
                     IPC)
    try:
        with open(trace) as f:
            events = json.load(f)
        events = events.get("traceEvents", events) if isinstance(events, dict) else events
        algos = sorted({e.get("args", {}).get("algorithm") for e in events
                        if e.get("name") == "all_reduce"} - {None})
    except (OSError, ValueError) as e:
        algos = [f"unreadable: {e}"]
    on_device = "staged through host memory" not in se
    record("trace_records_device_all_reduce", rc == 0 and on_device and "one_shot" in algos,
           rc=rc, algorithms=algos, stderr=se.strip()[-300:])

# -n auto: one rank per visible GPU.
rc, so, se = run(["-n", "auto", "--device", "cuda", "--only-rank", "0", "bench", "--model", F32,
                  "--prompt-len", "8", "--new-tokens", "4", "--json"])
record("auto_one_rank_per_gpu", rc == 0, world_size=(last_json(so) or {}).get("world_size"),
       stderr=se.strip()[-300:])

bench = {}
for tp, transport in RUNS:
    # The fixture's context is 128 positions.
    model = (["--model", F32, "--prompt-len", "64"] if EMULATE
             else ["--preset", "qwen2.5-0.5b", "--prompt-len", "128"])
    rc, so, se = run(["-n", str(tp), "--device", "cuda", "--only-rank", "0", "bench", *model,
                      "--new-tokens", "32", "--json"], 180,
                     {"TPRUN_CUDA_TRANSPORT": transport})
    key = f"tp{tp}_{transport}"
    bench[key] = last_json(so)
    record(f"bench_{'f32_fixture' if EMULATE else 'qwen2.5-0.5b'}_{key}", rc == 0 and bench[key] is not None, rc=rc,
           stderr=se.strip()[-500:])

summary = {"binary": BIN, "fixtures": FIX, "seconds": round(time.time() - started, 1),
           "passed": sum(c["ok"] for c in checks), "failed": sum(not c["ok"] for c in checks),
           "checks": checks, "allreduce_latency_us": latency, "perf_sweep": sweep,
           "bench": bench}
with open(OUT, "w") as f:
    json.dump(summary, f, indent=1)
print(f"gpu-acceptance: {summary['passed']} passed, {summary['failed']} failed in "
      f"{summary['seconds']} s; summary in {OUT}")
sys.exit(1 if summary["failed"] else 0)
PY
