#!/usr/bin/env bash
# What the C layer costs (issue 28): `tprun perf --op all-reduce` (the Rust call) beside
# examples/c/allreduce_perf.c (tprunAllReduce through libtprun, out of place and in place), the
# same sizes, iterations and timing (mean per call on each rank, maximum over ranks), rounds
# interleaved (Rust, C, Rust, C, ...). Prints a markdown table of medians and ranges in µs and
# C / Rust of the medians.
#
# Needs a C compiler and a release build (cargo build --release -p tprun-capi -p tprun); run it
# under a quiet-machine wrapper and quote only [ok] runs:
#   /work/shared/tools/quiet -- tools/capi_compare.sh --rounds 5
# Options (defaults): --rounds 5 --np 2 --min-bytes 1024 --max-bytes 64M --iters 20 --warmup 5
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=5 np=2 min_bytes=1024 max_bytes=$((64 << 20)) iters=20 warmup=5
die() { echo "capi_compare: $*" >&2; exit 2; }
while [[ $# -gt 0 ]]; do
    [[ $# -ge 2 ]] || die "$1 needs a value"
    case "$1" in
        --rounds) rounds=$2 ;;
        --np) np=$2 ;;
        --min-bytes) min_bytes=$2 ;;
        --max-bytes) max_bytes=$2 ;;
        --iters) iters=$2 ;;
        --warmup) warmup=$2 ;;
        *) die "unknown option $1 (see the comment at the top of $0)" ;;
    esac
    shift 2
done
for v in rounds np min_bytes max_bytes iters warmup; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "--${v//_/-} ${!v}: expected a whole number (bytes for sizes)"
done
tprun=target/release/tprun
[[ -x $tprun && -f target/release/libtprun.so ]] ||
    die "no release build: cargo build --release -p tprun -p tprun-capi"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cc -O2 -Iinclude examples/c/allreduce_perf.c -o "$work/allreduce_perf" \
    -Ltarget/release -ltprun -Wl,-rpath,"$PWD/target/release"

for ((r = 1; r <= rounds; r++)); do
    echo "round $r/$rounds" >&2
    "$tprun" -n "$np" perf --op all-reduce --min-bytes "$min_bytes" --max-bytes "$max_bytes" \
        --iters "$iters" --warmup "$warmup" --json >"$work/rust.$r.json"
    "$tprun" -n "$np" -- "$work/allreduce_perf" "$min_bytes" "$max_bytes" "$iters" "$warmup" \
        >"$work/c.$r.txt"
done

python3 - "$work" "$rounds" "$np" <<'EOF'
import json, statistics, sys
work, rounds, np = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rust, c_out, c_in = {}, {}, {}
for r in range(1, rounds + 1):
    doc = json.load(open(f"{work}/rust.{r}.json"))
    rows = doc["results"] if "results" in doc else doc["rows"]
    for row in rows:
        rust.setdefault(row["bytes"], []).append(row["time_us"])
    for line in open(f"{work}/c.{r}.txt"):
        # tprun prefixes a program's lines with its rank ("[rank0]: ").
        line = line.split("]: ", 1)[1] if line.startswith("[rank") else line
        f = line.split()
        if f and not line.lstrip().startswith("#"):
            b = int(f[0])
            c_out.setdefault(b, []).append(float(f[5]))
            c_in.setdefault(b, []).append(float(f[9]))
def cell(v):
    return f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})"
print(f"| bytes | Rust µs | C in place µs | C/Rust | C out of place µs | C/Rust |")
print("| ---: | --- | --- | ---: | --- | ---: |")
for b in sorted(c_in):
    if b not in rust:
        continue
    m = statistics.median(rust[b])
    print(f"| {b} | {cell(rust[b])} | {cell(c_in[b])} | {statistics.median(c_in[b]) / m:.2f} "
          f"| {cell(c_out[b])} | {statistics.median(c_out[b]) / m:.2f} |")
print(f"\n{np} ranks, float32 sum, medians and ranges over {rounds} interleaved rounds")
EOF
