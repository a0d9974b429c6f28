"""The torch backend against gloo: each test runs one program (progs.py, started by
torch.multiprocessing.spawn with init_method file://) with gloo and with tprun and compares
every result. Data movement must match bit for bit; reductions of floats within a tolerance
(gloo reduces in its own order, tprun in rank order), integers exactly. A result gloo refuses
(AVG, bitwise ops, bool product, ...) is checked against the program's own reference only.
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

PROGS = str(Path(__file__).with_name("progs.py"))


def shm_names():
    """The backend's group segments (named by progs' group keys; other jobs' names are theirs)."""
    return {p.name for p in Path("/dev/shm").glob("tprun-*pg-*")}


def run(backend, n, scenarios, timeout=600):
    out = tempfile.mkdtemp(prefix=f"tprun-{backend}-")
    before = shm_names()
    p = subprocess.run(
        [sys.executable, PROGS, backend, str(n), ",".join(scenarios), out],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd="/tmp",
    )
    log = p.stdout + p.stderr
    assert p.returncode == 0, f"{backend} at {n} ranks failed:\n{log[-6000:]}"
    if backend == "tprun":
        assert shm_names() <= before, f"left in /dev/shm: {shm_names() - before}"
    res = {}
    for s in scenarios:
        for r in range(n):
            f = os.path.join(out, f"{s}-{r}.pt")
            res[(s, r)] = torch.load(f) if os.path.exists(f) else {"FAILED": "no result file"}
    return res


def tolerance(name):
    if any(k in name for k in ("bfloat16", "float16")):
        return 2e-2
    if "product" in name:
        return 1e-3
    return 1e-5


def compare(gloo, tp):
    """Returns (matched, only tprun, problems). A result where gloo itself missed the
    program's reference (gloo's in-place all_reduce of a strided view) counts as tprun-only."""
    matched, only, problems = 0, [], []
    gloo_wrong = {n[len("MISMATCH ") :] for t in gloo.values() for n in t if n.startswith("MISMATCH ")}
    for key, t in tp.items():
        for name, v in t.items():
            if name.startswith(("FAILED", "MISMATCH")):
                problems.append(f"{key}: {name}: {v}")
                continue
            if name == "overlap times":
                continue
            g = gloo.get(key, {}).get(name)
            if isinstance(v, str):
                if not isinstance(g, str):
                    problems.append(f"{key} {name}: tprun refused, gloo did not: {v}")
                continue
            if g is None or isinstance(g, str) or name in gloo_wrong:
                only.append(name)
                continue
            if g.shape != v.shape or g.dtype != v.dtype:
                problems.append(f"{key} {name}: shape/dtype {tuple(v.shape)} {v.dtype} vs gloo {tuple(g.shape)} {g.dtype}")
            elif v.dtype.is_floating_point and not name.startswith(("broadcast", "all_gather", "gather", "scatter", "all_to_all", "send", "isend", "batch")):
                tol = tolerance(name)
                if not torch.allclose(v.double(), g.double(), rtol=tol, atol=tol):
                    problems.append(f"{key} {name}: {v.flatten()[:4]} vs gloo {g.flatten()[:4]}")
                else:
                    matched += 1
            elif not torch.equal(v, g):
                problems.append(f"{key} {name}: {v.flatten()[:4]} vs gloo {g.flatten()[:4]}")
            else:
                matched += 1
    return matched, sorted(set(only)), problems


def check(n, scenarios, gloo_runs_them=True):
    """Runs the scenarios with both backends; (gloo's results, tprun's) after comparing them.
    gloo_runs_them=False: gloo refuses every op, so tprun's are checked against the program's
    own references only."""
    gloo = run("gloo", n, scenarios)
    tp = run("tprun", n, scenarios)
    matched, only, problems = compare(gloo, tp)
    print(f"{n} ranks {scenarios}: {matched} results equal to gloo's; tprun only ({len(only)}): {only[:12]}")
    assert not problems, "\n".join(problems[:40])
    assert matched > 0 or not gloo_runs_them
    return tp if gloo_runs_them else (gloo, tp)


OPS = ["reductions", "moves", "p2p", "groups"]


@pytest.mark.parametrize("n", [2, 3, 4])
def test_every_op_dtype_and_group_matches_gloo(n):
    tp = check(n, OPS + (["overlap"] if n == 2 else []))
    if n == 2:
        for r in range(n):
            times = tp[("overlap", r)]["overlap times"].tolist()
            print(f"rank {r}: all_reduce of 64 MiB issued in {times[0]*1e3:.1f} ms, completed in the "
                  f"background after {times[1]*1e3:.1f} ms while the caller ran {int(times[2])} matmuls")
            assert times[2] >= 1, "the caller did not compute while the collective ran"


@pytest.mark.parametrize("n", [2, 3])
def test_premul_sum_from_torch(n):
    """PREMUL_SUM with a float and a tensor factor (a different one per rank), checked against
    the program's reference (gloo refuses it); an integer PREMUL_SUM is refused by name."""
    gloo, tp = check(n, ["premul_sum"], gloo_runs_them=False)
    for r in range(n):
        assert all(isinstance(v, str) for v in gloo[("premul_sum", r)].values()), "gloo reduced a PREMUL_SUM"
        res = tp[("premul_sum", r)]
        assert sum(1 for k, v in res.items() if "factor=float" in k and isinstance(v, torch.Tensor)) == 12
        assert sum(1 for k, v in res.items() if "factor=tensor" in k and isinstance(v, torch.Tensor)) == 12
        err = res["all_reduce premul_sum int32"]
        assert isinstance(err, str) and "premulsum takes float types" in err, err


def test_real_programs_match_gloo_at_2_ranks():
    check(2, ["ddp", "fsdp2", "tp", "pipeline", "moe", "dcp"])


def test_2d_mesh_and_pipeline_match_gloo_at_4_ranks():
    check(4, ["mesh2d", "pipeline", "moe"])


def test_torch_older_than_the_python_backend_api_is_refused_by_name():
    """torch 2.1.0 to 2.13 (register_backend with devices, but no Python c10d Backend): the
    backend says which torch it needs instead of failing inside torch."""
    import tprun.torch as tt

    for old in ("2.1.0", "2.13.0", "2.13.1+cu130"):
        why = tt.unsupported_torch(old)
        assert why and f"needs torch >= {tt.MIN_TORCH}" in why and f"this is torch {old}" in why, why
    assert tt.unsupported_torch("2.14.0") is None
    assert tt.unsupported_torch() is None, "the CI's torch is too old for the backend"
