#!/usr/bin/env bash
# The torch backend's CUDA tensors (host-staged, python/tprun/torch.py `_Stage`) on a machine
# with a GPU: for a lead to run there, with no network and no Rust toolchain.
#
#   tools/gpu_torch_check.sh --python VENV/bin/python [--wheel dist/tprun-*.whl]
#
# VENV: a Python with a CUDA build of torch (>= 2.14) and pytest, e.g. a copy of the CI venv
# (.ci/python-tests builds it from python/requirements-ci.txt; its torch is the +cu132 wheel).
# --wheel: a built tprun wheel (`maturin build --release -m python/Cargo.toml`), installed with
# --no-deps into a temporary directory put first on PYTHONPATH (the VENV is not changed);
# without it, the tprun that VENV imports is tested.
#
# Checks, under TPRUN_REQUIRE_GPU=1 (a test that finds no GPU fails instead of skipping):
#   1. torch sees a GPU, and `import tprun.torch` is the tprun under test;
#   2. python/tests/test_torch.py -k "cuda_tensors": every op (all_reduce, all_gather list and
#      into a tensor, reduce_scatter tensor and list, broadcast, reduce, gather, scatter,
#      all_to_all, all_to_all_single equal and uneven, send/recv, isend/irecv,
#      batch_isend_irecv, async_op=True with wait() and get_future(), an input still being
#      computed on the caller's stream) on CUDA tensors, contiguous and not, at 2 ranks sharing
#      the GPUs round-robin; results equal to gloo's on the CPU and bit-identical to tprun's
#      CPU run;
#   3. the same file's staging tests on the CPU (-k "staging_path or in_process"), which need
#      no GPU but must pass on the same install.
# About a minute in all. Exits 0 only if every step passed.
set -euo pipefail
cd "$(dirname "$0")/.."
py="" wheel=""
while [ $# -gt 0 ]; do
    case "$1" in
        --python) py=$2; shift 2 ;;
        --wheel) wheel=$2; shift 2 ;;
        -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
        *) echo "gpu_torch_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
[ -n "$py" ] && [ -x "$py" ] || { echo "gpu_torch_check: --python must name a Python with torch and pytest" >&2; exit 2; }
if [ -n "$wheel" ]; then
    [ -f "$wheel" ] || { echo "gpu_torch_check: no wheel at $wheel (--wheel)" >&2; exit 2; }
    site=$(mktemp -d)
    trap 'rm -rf "$site"' EXIT
    "$py" -m pip install -q --no-deps --no-index --target "$site" "$wheel"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export TPRUN_REQUIRE_GPU=1
command -v nvidia-smi >/dev/null && nvidia-smi -L || echo "gpu_torch_check: no nvidia-smi"
"$py" - <<'PY'
import sys
import torch
import tprun.torch as tt
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), tprun from {tt.__file__}")
if not torch.cuda.is_available():
    sys.exit("gpu_torch_check: FAIL: torch.cuda.is_available() is False")
print(f"{torch.cuda.device_count()} GPU(s): {torch.cuda.get_device_name(0)}")
PY
rc=0
timeout 600 "$py" -m pytest -q -s python/tests/test_torch.py -k "cuda_tensors" || rc=1
timeout 600 "$py" -m pytest -q python/tests/test_torch.py -k "staging_path or in_process" || rc=1
[ "$rc" = 0 ] && echo "gpu_torch_check: PASS" || echo "gpu_torch_check: FAIL" >&2
exit "$rc"
