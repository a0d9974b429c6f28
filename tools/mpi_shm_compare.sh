#!/usr/bin/env bash
# tprun's shared-memory collectives side by side with Open MPI's shared-memory transport (issue
# 26): every `tprun perf` op against the matching MPI call (MPI_Allreduce, MPI_Allgather,
# MPI_Reduce_scatter_block, MPI_Bcast, MPI_Reduce, MPI_Gather, MPI_Scatter, MPI_Alltoall, an
# MPI_Sendrecv ring) at the same sizes, float32 sum, the same byte counting, warm-up and timing
# (tools/mpi_shm_compare.c says how). Rounds are interleaved (MPI, tprun, MPI, tprun, ...); the
# markdown table gives each system's median and range over the rounds, and tprun / MPI of the
# medians.
#
# Installs nothing. Needs Open MPI (mpicc, mpirun) and a release build of tprun:
#   apt-get install -y openmpi-bin libopenmpi-dev
#   cargo build --release
# On a shared machine run it under a quiet-machine wrapper and quote only [ok] runs:
#   /work/shared/tools/quiet -- tools/mpi_shm_compare.sh --rounds 5
#
# Options (defaults): --rounds 5  --np 2  --min-bytes 8  --max-bytes 64M  --iters 20  --warmup 5
#   --ops all_reduce,all_gather,reduce_scatter,broadcast,reduce,gather,scatter,all_to_all,send_recv
#   --tprun target/release/tprun  --keep DIR (keep every round's raw output there)
# Open MPI is held to shared memory: --mca pml ob1 --mca btl self,vader, ranks bound to cores
# when there are enough of them (--bind-to none otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=5 np=2 min_bytes=8 max_bytes=64M iters=20 warmup=5 keep=
ops=all_reduce,all_gather,reduce_scatter,broadcast,reduce,gather,scatter,all_to_all,send_recv
tprun=target/release/tprun
die() { echo "mpi_shm_compare: $*" >&2; exit 2; }
while [[ $# -gt 0 ]]; do
    [[ $# -ge 2 ]] || die "$1 needs a value"
    case "$1" in
        --rounds) rounds=$2 ;;
        --np) np=$2 ;;
        --min-bytes) min_bytes=$2 ;;
        --max-bytes) max_bytes=$2 ;;
        --iters) iters=$2 ;;
        --warmup) warmup=$2 ;;
        --ops) ops=$2 ;;
        --tprun) tprun=$2 ;;
        --keep) keep=$2 ;;
        *) die "unknown option $1 (see the comment at the top of $0)" ;;
    esac
    shift 2
done
for v in rounds np iters warmup; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "--${v} ${!v}: expected a whole number"
done
[[ $rounds -ge 1 && $np -ge 1 ]] || die "--rounds and --np must be at least 1"

# Sizes in bytes for the C program (perf takes the K/M/G suffixes itself).
bytes_of() {
    local s=$1 m=1
    case "$s" in
        *[kK]) m=1024; s=${s%?} ;;
        *[mM]) m=$((1024 * 1024)); s=${s%?} ;;
        *[gG]) m=$((1024 * 1024 * 1024)); s=${s%?} ;;
    esac
    [[ $s =~ ^[0-9]+$ ]] || die "size $1: expected bytes with an optional K/M/G suffix"
    echo $((s * m))
}
min_b=$(bytes_of "$min_bytes")
max_b=$(bytes_of "$max_bytes")

if ! command -v mpicc >/dev/null || ! command -v mpirun >/dev/null; then
    echo "mpi_shm_compare: Open MPI is missing (mpicc, mpirun); install it with:" >&2
    echo "  apt-get install -y openmpi-bin libopenmpi-dev" >&2
    exit 1
fi
if [[ ! -x $tprun ]]; then
    echo "mpi_shm_compare: no $tprun; build it with: cargo build --release" >&2
    exit 1
fi
command -v python3 >/dev/null || die "python3 is needed for the table"

work=${keep:-$(mktemp -d)}
mkdir -p "$work"
[[ -n $keep ]] || trap 'rm -rf "$work"' EXIT
mpicc -O2 -o "$work/mpi_shm_compare" tools/mpi_shm_compare.c

cores=$(nproc)
mpirun_args=(-np "$np" --mca pml ob1 --mca btl self,vader)
if [[ $np -le $cores ]]; then
    mpirun_args+=(--bind-to core)
else
    mpirun_args+=(--bind-to none --oversubscribe)
fi
[[ $(id -u) -ne 0 ]] || mpirun_args+=(--allow-run-as-root)

tprun_ops=${ops//_/-}
for r in $(seq 1 "$rounds"); do
    echo "round $r/$rounds: Open MPI" >&2
    mpirun "${mpirun_args[@]}" "$work/mpi_shm_compare" --ops "$ops" --min-bytes "$min_b" \
        --max-bytes "$max_b" --iters "$iters" --warmup "$warmup" >"$work/mpi.$r.tsv"
    echo "round $r/$rounds: tprun" >&2
    "$tprun" -n "$np" perf --op "$tprun_ops" --dtype f32 --redop sum --min-bytes "$min_b" \
        --max-bytes "$max_b" --iters "$iters" --warmup "$warmup" --json >"$work/tprun.$r.json"
done

cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
ompi=$(mpirun --version 2>/dev/null | head -1)
WORK=$work ROUNDS=$rounds NP=$np ITERS=$iters WARMUP=$warmup CPU=$cpu OMPI=$ompi \
    CORES=$cores MPIRUN="mpirun ${mpirun_args[*]}" python3 - <<'EOF'
import datetime, json, os, statistics

work, rounds = os.environ["WORK"], int(os.environ["ROUNDS"])
tprun, mpi = {}, {}  # (op, bytes) -> [µs per round]
order = []
for r in range(1, rounds + 1):
    with open(f"{work}/mpi.{r}.tsv") as f:
        for line in f:
            op, b, us = line.split("\t")
            key = (op, int(b))
            if key not in order:
                order.append(key)
            mpi.setdefault(key, []).append(float(us))
    with open(f"{work}/tprun.{r}.json") as f:
        for row in json.load(f)["rows"]:
            tprun.setdefault((row["op"], row["bytes"]), []).append(row["time_us"])

def cell(v):
    if not v:
        return "-"
    return f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})"

now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
print(f"tprun perf vs {os.environ['OMPI']} (shared memory), {os.environ['NP']} ranks, float32 sum; "
      f"{os.environ['ITERS']} timed calls after {os.environ['WARMUP']} warm-up per size; "
      f"median (range) of {rounds} interleaved rounds; {now}; CPU: {os.environ['CPU']} "
      f"({os.environ['CORES']} CPUs); MPI: `{os.environ['MPIRUN']}`")
print()
print("| op | bytes | tprun µs, median (range) | MPI µs, median (range) | tprun / MPI |")
print("| --- | ---: | ---: | ---: | ---: |")
for key in order + [k for k in tprun if k not in order]:
    t, m = tprun.get(key, []), mpi.get(key, [])
    ratio = f"{statistics.median(t) / statistics.median(m):.2f}" if t and m else "-"
    print(f"| {key[0]} | {key[1]} | {cell(t)} | {cell(m)} | {ratio} |")
EOF
