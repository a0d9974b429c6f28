"""The torch examples (examples/torch) run as their docstrings say, so they never rot: under
`tprun -n 4 -- python` every rank prints its checked result line (each script asserts its own
results and exits non-zero on a wrong one).

Needs the tprun binary (TPRUN_BIN, else target/debug/tprun) and the package with torch in this
interpreter's environment (.ci/python-tests provides both)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[2]
TPRUN = os.environ.get("TPRUN_BIN", str(ROOT / "target" / "debug" / "tprun"))


def run_example(name, n):
    p = subprocess.run([TPRUN, "-n", str(n), "--", sys.executable, str(ROOT / "examples" / "torch" / name)],
                       capture_output=True, text=True, timeout=600, cwd="/tmp")
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    return out


def test_ddp_example_trains_to_the_same_weights_on_every_rank():
    out = run_example("ddp.py", 4)
    ranks = sorted(int(r) for r in re.findall(r"rank (\d)/4: loss [0-9.]+ -> [0-9.]+, same weights as rank 0", out))
    assert ranks == [0, 1, 2, 3], out


def test_device_mesh_example_matches_the_whole_model_and_trains():
    out = run_example("device_mesh.py", 4)
    found = re.findall(r"rank (\d)/4 \(dp (\d), tp (\d)\): output matches the whole model, loss [0-9.]+ -> [0-9.]+, "
                       r"same weights as rank 0", out)
    # Rank r is (dp r // 2, tp r % 2): DeviceMesh lays the last dimension out fastest.
    assert sorted(found) == [(str(r), str(r // 2), str(r % 2)) for r in range(4)], out
