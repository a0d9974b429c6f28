"""torch's own backend tests (`_DistTestBase` of torch/testing/_internal/distributed/
distributed_test.py) against any backend, the way PyTorch's test_distributed_spawn.py runs
them for gloo. Not collected by the CI's pytest run (no test_ prefix): run it by hand, e.g.

    BACKEND=tprun WORLD_SIZE=2 TEMP_DIR=$(mktemp -d) pytest -q python/tests/torch_suite.py
    BACKEND=gloo  WORLD_SIZE=2 TEMP_DIR=$(mktemp -d) pytest -q python/tests/torch_suite.py

and compare the passed/failed/skipped counts (torch's test helpers also need `pip install
expecttest`; docs/pytorch.md has the last counts and the -k selection they used). For a backend other than gloo/nccl/ucc the
suite's feature tables (which tests a backend may run) get the backend added wherever gloo
is, so the same tests run for both; the tests that need a GPU skip for both on a CPU machine,
and the tests gloo-only by name (`require_backend_is_available({"gloo"})`, "GLOO Batch Send Recv
CPU", "Only gloo backend supports timeouts": CPU features, not gloo internals) run for the other
backend too unless TPRUN_SUITE_GLOO_ONLY=skip.
"""

import os
import sys

import torch
import torch.distributed as dist

if not dist.is_available():
    print("Distributed not available, skipping tests", file=sys.stderr)
    sys.exit(0)

from torch.testing._internal.common_distributed import DistTestCases  # noqa: E402
from torch.testing._internal.common_utils import run_tests  # noqa: E402

BACKEND = os.environ["BACKEND"]
if BACKEND not in ("gloo", "nccl", "ucc"):
    if BACKEND == "tprun":
        import tprun.torch  # noqa: F401 - registers the backend (the entry point does too)
    DistTestCases.backend_feature["plugin"].add(BACKEND)
    for backends in DistTestCases.backend_feature.values():
        if "gloo" in backends:  # GPU tests skip on their own where no GPU is visible
            backends.add(BACKEND)

# The tests gloo-only by name run for the other backend too: the skip decorators are wrapped
# before distributed_test (which imports them by name) applies them, so that only these reasons
# give way and a test's other skips (world size, init method, ...) stay.
_GLOO_ONLY = (f"Test requires backend {BACKEND} to be one of {{'gloo'}}", "GLOO Batch Send Recv CPU",
              "Only gloo backend supports timeouts")
if BACKEND not in ("gloo", "nccl", "ucc") and os.environ.get("TPRUN_SUITE_GLOO_ONLY") != "skip":
    import torch.testing._internal.common_utils as _cu

    _skip, _skip_if = _cu.skip_but_pass_in_sandcastle, _cu.skip_but_pass_in_sandcastle_if
    _cu.skip_but_pass_in_sandcastle = lambda reason: (lambda f: f) if reason in _GLOO_ONLY else _skip(reason)
    _cu.skip_but_pass_in_sandcastle_if = (
        lambda cond, reason: (lambda f: f) if reason in _GLOO_ONLY else _skip_if(cond, reason)
    )

from torch.testing._internal.distributed.distributed_test import (  # noqa: E402
    DistributedTest,
    TestDistBackend,
)


class TestDistBackendWithSpawn(TestDistBackend, DistributedTest._DistTestBase):
    def setUp(self):
        super().setUp()
        self._spawn_processes()
        torch.backends.cudnn.flags(enabled=True, allow_tf32=False).__enter__()


if __name__ == "__main__":
    run_tests()
