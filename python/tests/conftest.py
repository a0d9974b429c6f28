"""A skipped test says so where the CI log shows it: a `SKIPPED: <test>: <why>` line appended to
the file named by TPRUN_SKIP_LOG (.ci/run sets it and lists the file at its end; on CI that list
must be empty), as the Rust tests do (kernels::skips). A test that needs hardware the machine
lacks (a GPU: the `cuda_devices` fixture) writes `NOT ON THIS MACHINE: <test>: <why>` instead,
which CI allows, and fails under TPRUN_REQUIRE_GPU=1 (a GPU machine cannot pass by skipping)."""

import os

import pytest

NO_HARDWARE = "NOT ON THIS MACHINE"


def pytest_runtest_logreport(report):
    log = os.environ.get("TPRUN_SKIP_LOG")
    if report.skipped and log:
        why = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        kind = NO_HARDWARE if f"{NO_HARDWARE}: " in why else "SKIPPED"
        why = why.split(f"{NO_HARDWARE}: ", 1)[-1]
        with open(log, "a") as f:
            f.write(f"{kind}: python {report.nodeid}: {why}\n")


@pytest.fixture
def cuda_devices():
    """The number of CUDA devices torch sees; without one the test is skipped as NOT ON THIS
    MACHINE, or fails under TPRUN_REQUIRE_GPU=1."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count()
    why = f"torch.cuda.is_available() is False (torch {torch.__version__})"
    if os.environ.get("TPRUN_REQUIRE_GPU") == "1":
        pytest.fail(f"TPRUN_REQUIRE_GPU=1 but {why}")
    pytest.skip(f"{NO_HARDWARE}: {why}")
