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


def run(backend, n, scenarios, timeout=600, env=None):
    """Runs progs.py's scenarios with `env` added to the environment; {(scenario, rank): results}."""
    out = tempfile.mkdtemp(prefix=f"tprun-{backend}-")
    before = shm_names()
    p = subprocess.run(
        [sys.executable, PROGS, backend, str(n), ",".join(scenarios), out],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd="/tmp",
        env={**os.environ, **(env or {})},
    )
    log = p.stdout + p.stderr
    assert p.returncode == 0, f"{backend} at {n} ranks failed:\n{log[-6000:]}"
    if "tprun" in backend:
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


def check(n, scenarios, gloo_runs_them=True, env=None):
    """Runs the scenarios with both backends; (gloo's results, tprun's) after comparing them.
    gloo_runs_them=False: gloo refuses every op, so tprun's are checked against the program's
    own references only. `env`: added to tprun's environment only (gloo runs on the CPU)."""
    gloo = run("gloo", n, scenarios)
    tp = run("tprun", n, scenarios, env=env)
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


def same_as_unstaged(staged, plain):
    """Every result of the staged run bit-identical to the unstaged tprun run's (tprun reduces in
    rank order: staging must not change a bit); returns how many were compared."""
    compared, problems = 0, []
    for key, res in plain.items():
        got = staged[key]
        for name, v in res.items():
            if name == "staged tensors":
                continue
            g = got.get(name)
            if isinstance(v, torch.Tensor) and isinstance(g, torch.Tensor):
                if v.dtype != g.dtype or v.shape != g.shape or not torch.equal(v, g):
                    problems.append(f"{key} {name}: staged {g.flatten()[:4]} vs unstaged {v.flatten()[:4]}")
                compared += 1
            elif v != g:
                problems.append(f"{key} {name}: staged {g!r} vs unstaged {v!r}")
        extra = set(got) - set(res) - {"staged tensors"}
        assert not extra, f"{key}: results only in the staged run: {sorted(extra)}"
    assert not problems, "\n".join(problems[:40])
    return compared


def staged_counts(res, n):
    return [int(res[("staged", r)]["staged tensors"]) for r in range(n)]


def every_tensor_staged(n):
    """How many tensors progs.staged hands the backend on each rank: per dtype and layout (6),
    4n + 20 (all_reduce 2, all_gather n + 1, into a tensor 2, reduce_scatter 2 and n + 1,
    broadcast 1, reduce 1, gather and scatter 1 each plus n at the root, all_to_all_single 2,
    all_to_all 2n, the isend/irecv ring 2, batch_isend_irecv 4); then send/recv 2 on ranks 0
    and 1, the uneven all_to_all_single 2, the async ops 5, the stream-order all_reduce 1."""
    return [6 * (4 * n + 20 + (2 * n if r == 0 else 0)) + (2 if r < 2 else 0) + 2 + 5 + 1 for r in range(n)]


def staged_against_plain(n, env, plain_backend):
    """The staged scenario run with `env` (checked against gloo) and unstaged on
    `plain_backend`: asserts they agree bit for bit on at least 80 results per rank and that the
    staged run staged every tensor; returns both runs and the number compared."""
    staged = check(n, ["staged"], env=env)
    plain = run(plain_backend, n, ["staged"])
    compared = same_as_unstaged(staged, plain)
    assert compared >= 80 * n
    assert staged_counts(staged, n) == every_tensor_staged(n)
    return staged, plain, compared


@pytest.mark.parametrize("n", [2, 3])
def test_staging_path_matches_gloo_and_the_unstaged_path(n):
    """TPRUN_TORCH_STAGE_ALL=1 sends CPU tensors through the host staging CUDA tensors take
    (a separate host tensor in, the op, a copy back): every op, contiguous and not, async with
    wait() and get_future(), equal to gloo's results and bit-identical to the unstaged run's
    (that one started with init_process_group("cpu:tprun,cuda:tprun"))."""
    # The device-pair form names the backend for CPU and CUDA tensors alike.
    staged, plain, compared = staged_against_plain(n, {"TPRUN_TORCH_STAGE_ALL": "1"}, "cpu:tprun,cuda:tprun")
    print(f"{n} ranks: {compared} results of the staged run bit-identical to the unstaged run's")
    # The unstaged run never took the staging path.
    assert staged_counts(plain, n) == [0] * n


def test_cuda_tensors_match_gloo_and_the_cpu_path(cuda_devices):
    """Real CUDA tensors (ranks share the GPUs round-robin) through the backend's host staging:
    the same scenario as the test above, equal to gloo's CPU results and bit-identical to the
    tprun CPU run's. Needs a GPU: tools/gpu_torch_check.sh runs it there."""
    n = 2
    _, _, compared = staged_against_plain(n, {"TPRUN_TEST_DEVICE": "cuda"}, "tprun")
    print(f"{n} ranks on {cuda_devices} GPU(s): {compared} results of the CUDA run bit-identical to the CPU run's")


def test_mixed_devices_and_staging_in_process():
    """One call with tensors on two devices is refused naming the op (a meta tensor stands in
    for a CUDA one here); a group of one stages a non-contiguous CPU tensor under STAGE_ALL and
    copies the result back into the view."""
    import tprun.torch as tt
    from tprun._native import NativeComm

    pg = tt.ProcessGroupTprun(NativeComm.from_key("solo", 0, 1), 0, 1, "solo")
    with pytest.raises(RuntimeError, match=r"all_gather_into_tensor got tensors on cpu, meta in one call"):
        pg.all_gather_single(torch.empty(4), torch.empty(4, device="meta"))
    with pytest.raises(RuntimeError, match=r"all_reduce got a meta tensor; only CPU and CUDA tensors"):
        pg.allreduce([torch.empty(4, device="meta")])
    from torch._C._distributed_c10d import _make_nccl_premul_sum

    base = torch.arange(12.0).view(3, 4)
    view = base.t()
    out = torch.zeros(3, 4).t()
    before, was = tt.staged_tensors, tt.STAGE_ALL
    tt.STAGE_ALL = True
    try:
        opts = tt.dist.AllreduceOptions()
        opts.reduceOp = _make_nccl_premul_sum(2.0)  # a group of one: the sum doubles the input
        pg.allreduce([view], opts).wait()
        fut = pg.all_gather_single(out, view).get_future()
        fut.wait()
    finally:
        tt.STAGE_ALL = was
    assert torch.equal(base, torch.arange(12.0).view(3, 4) * 2)
    assert torch.equal(out, view) and fut.value()[0] is out
    assert tt.staged_tensors - before == 3
