"""The built wheel installs into a fresh venv and runs the README's example under tprun.

TPRUN_WHEEL names the wheel (.ci/python-tests sets it). The fresh venv gets the wheel and its
dependency (numpy) from pip; torch, several GB from PyPI, is not installed a second time: a .pth
file makes the test venv's torch importable, so what is tested is the wheel's own install."""

import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from test_tprun import ROOT, TPRUN, run

WHEEL = os.environ.get("TPRUN_WHEEL")


def readme_example():
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- python-example.*?-->\n```python\n(.*?)```", text, re.DOTALL)
    assert m, "README has no python-example block"
    return m.group(1)


@pytest.mark.skipif(not WHEEL, reason="TPRUN_WHEEL not set (.ci/python-tests sets it)")
def test_wheel_in_a_fresh_venv_runs_the_readme_example(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    subprocess.run([py, "-m", "pip", "install", "-q", WHEEL], check=True, timeout=600)
    # torch only (not this venv's tprun): a directory holding just a link to the torch package
    # would miss its dependencies, so the whole site-packages goes on the path, after the venv's.
    site = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(site, "zz_torch_from_test_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    where = subprocess.run(
        [py, "-c", "import tprun; print(tprun.__file__)"], capture_output=True, text=True, check=True
    ).stdout
    assert where.startswith(str(venv)), where
    example = tmp_path / "example.py"
    example.write_text(readme_example())
    rc, out = run([TPRUN, "-n", "2", "--", py, str(example)])
    assert rc == 0, out
    for r in range(2):
        assert f"[rank{r}]: {r} [3.0, 3.0, 3.0, 3.0]" in out, out
