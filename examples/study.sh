#!/usr/bin/env bash
# Studying a run's communication, start to end (docs/studying.md explains each output):
#   1. trace a 2-rank tensor-parallel generation (any `-- PROGRAM` that links the collectives
#      traces the same way),
#   2. analyze the trace: per-rank compute/communication/wait, the worst calls, stragglers,
#      per-layer waits (tables, then the same as JSON for scripts),
#   3. draw the picture: a per-rank timeline and a rank x layer wait heat map.
#
# Usage: examples/study.sh [OUT_DIR]      (default: a new temporary folder)
#        TPRUN=target/debug/tprun examples/study.sh /tmp/study
# Writes OUT_DIR/gen/trace.json (open it in https://ui.perfetto.dev), OUT_DIR/gen/ranks/rank*.json
# (PyTorch-profiler style, for Holistic Trace Analysis), OUT_DIR/analysis.json, OUT_DIR/study.svg.
# tests/examples.rs runs it and checks every file.
set -euo pipefail
tprun="${TPRUN:-tprun}"
out="${1:-$(mktemp -d)}"
mkdir -p "$out"

# 1. Trace: the folder form (trailing slash) writes the merged trace and one file per rank.
#    The bundled tiny model needs no download; --model takes a Hugging Face checkpoint instead.
"$tprun" -n 2 --trace "$out/gen/" generate --max-new-tokens 8 --prompt Hello

# 2. Analyze: tables for a person, then JSON for a script.
"$tprun" analyze "$out/gen"
"$tprun" analyze --json "$out/gen" > "$out/analysis.json"

# 3. The picture.
"$tprun" analyze "$out/gen" --svg "$out/study.svg" > /dev/null

echo "study: $out/gen/trace.json (Perfetto), $out/analysis.json, $out/study.svg"
