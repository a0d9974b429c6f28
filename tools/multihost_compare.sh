#!/usr/bin/env bash
# Both hierarchy modes beside Open MPI's MPI_Allreduce (MPI_FLOAT, MPI_SUM) on 2 separate hosts
# x 2 ranks (tools/nshosts.sh: namespaces, every inter-host byte over TCP on the veths, shared
# memory only inside a host), 8 B to 32 MiB, RUNS runs per mode (default 5); prints each run's
# table and then, per mode and size, the median (min-max) of both and the median ratio.
#   tools/multihost_compare.sh          (root; needs openmpi-bin, libopenmpi-dev, libclang-dev)
# On a shared machine prefix it with a quiet-machine wrapper, e.g. QUIET=/work/shared/tools/quiet
# (the whole run goes under it). Timing only: the bits are checked by tests/multihost.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
# PROFILE=debug: a quick run of the script itself (its numbers mean nothing).
profile=${PROFILE:-release}
cargo build --profile "${profile/debug/dev}" -p collectives --features mpi --example mpi_allreduce_compare
runs=${RUNS:-5}
out=$(mktemp -d "${TMPDIR:-/var/tmp}/multihost-compare.XXXXXX")
trap 'rm -rf "$out"' EXIT
# $out is outside /tmp: the head host has a /tmp of its own.
script='
for run in $(seq 1 "$RUNS"); do
    for mode in reproducible fast; do
        mpirun $NSHOSTS_MPIRUN -np 4 -x TPRUN_HIER_MODE=$mode \
            target/$PROFILE/examples/mpi_allreduce_compare > "$OUT/$mode.$run"
        echo "== $mode, run $run"; cat "$OUT/$mode.$run"
    done
done'
run=(env RUNS="$runs" OUT="$out" PROFILE="$profile" tools/nshosts.sh --hosts 2 --slots 2 -- bash -c "$script")
if [[ -n "${QUIET:-}" ]]; then "$QUIET" -- "${run[@]}"; else "${run[@]}"; fi
python3 - "$out" <<'EOF'
import glob, os, statistics, sys
out = sys.argv[1]
for mode in ("reproducible", "fast"):
    rows = {}
    for f in sorted(glob.glob(os.path.join(out, mode + ".*"))):
        for line in open(f):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) == 4 and cells[0].isdigit():
                rows.setdefault(int(cells[0]), []).append((float(cells[1]), float(cells[2])))
    print(f"\n{mode}: 2 hosts x 2 ranks, {len(next(iter(rows.values()), []))} runs")
    print("| bytes | tprun µs, median (range) | MPI_Allreduce µs, median (range) | tprun / MPI |")
    print("| ---: | ---: | ---: | ---: |")
    for b, v in sorted(rows.items()):
        a, m = [x[0] for x in v], [x[1] for x in v]
        r = statistics.median(x / y for x, y in v)
        print(f"| {b} | {statistics.median(a):.1f} ({min(a):.1f}-{max(a):.1f}) | "
              f"{statistics.median(m):.1f} ({min(m):.1f}-{max(m):.1f}) | {r:.2f} |")
EOF
