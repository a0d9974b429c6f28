#!/usr/bin/env bash
# Hierarchical all-reduce vs Open MPI's MPI_Allreduce (MPI_FLOAT, MPI_SUM) on the same 4 ranks,
# 2 pretend nodes of 2, every MPI byte over TCP (btl tcp,self), 8 B to 32 MiB. One command:
#   tools/mpi_compare.sh            (needs openmpi-bin, libopenmpi-dev, libclang-dev)
# On a shared machine prefix the mpirun with a quiet-machine wrapper, e.g. QUIET=/work/shared/tools/quiet.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p collectives --features mpi --example mpi_allreduce_compare
run=(mpirun --oversubscribe --allow-run-as-root --mca btl tcp,self -np "${NP:-4}"
     -x TPRUN_PRETEND_NODES="${NODES:-2}" target/release/examples/mpi_allreduce_compare)
if [[ -n "${QUIET:-}" ]]; then "$QUIET" -- "${run[@]}"; else "${run[@]}"; fi
