"""The tprun Python package and torch backend, run as real jobs under `tprun -n N` and torchrun.

Needs the tprun binary (TPRUN_BIN, else target/debug/tprun from `cargo test`) and the package
installed in this interpreter's environment (.ci/python-tests does both)."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WORKER = str(Path(__file__).with_name("worker.py"))
TPRUN = os.environ.get("TPRUN_BIN", str(ROOT / "target" / "debug" / "tprun"))


def shm_names():
    """Named segments of this user: collectives' `named_path` is /dev/shm/tprun-<uid>/<key> (the
    directory goes once empty); names of the older form tprun-<uid>-<key> count too."""
    shm, uid = Path("/dev/shm"), os.getuid()
    found = [*shm.glob(f"tprun-{uid}-*"), *shm.glob(f"tprun-{uid}/*")]
    return {str(p.relative_to(shm)) for p in found}


def job_processes(mark):
    """Live processes of the run marked TPRUN_TEST_MARK=mark (every process it started carries the
    mark in its environment, setsid or not), each with the tprun memfds and named segments it has
    open or mapped."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if f"TPRUN_TEST_MARK={mark}".encode() not in (d / "environ").read_bytes().split(b"\0"):
                continue
            if (d / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            held = set()
            for fd in (d / "fd").iterdir():
                held.add(os.readlink(fd))
            for line in (d / "maps").read_text().splitlines():
                held.add(line.split()[-1])
        except OSError:
            continue
        found[int(d.name)] = sorted(h for h in held if h.startswith("/memfd:tprun-") or f"/tprun-{os.getuid()}/" in h or f"/tprun-{os.getuid()}-" in h)
    return found


_runs = iter(range(1 << 30))


def run(cmd, timeout=300):
    """Runs cmd to the end; asserts it left no named segment and no process (with the job's
    memory) behind, killing any such process first."""
    mark = f"{os.getpid()}-{next(_runs)}"
    before = shm_names()
    env = {**os.environ, "TPRUN_TEST_MARK": mark}
    p = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, cwd="/tmp", env=env)
    out = p.stdout + p.stderr
    deadline = time.monotonic() + 5  # a killed job's processes take a moment to go
    while (left := job_processes(mark)) and time.monotonic() < deadline:
        time.sleep(0.02)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left holding {left}\n{out}"
    assert shm_names() <= before, f"left in /dev/shm: {shm_names() - before}\n{out}"
    return p.returncode, out


def tprun(n, mode, timeout=300):
    return run([TPRUN, "-n", str(n), "--", sys.executable, WORKER, mode], timeout)


def oks(out, n):
    """Every rank passed, with the same digest of every result."""
    found = dict(re.findall(r"OK (\d+) ([0-9a-f]{64})", out))
    assert sorted(found) == [str(r) for r in range(n)], out[-4000:]
    assert len(set(found.values())) == 1, f"ranks hold different bits: {found}"


@pytest.mark.parametrize("n", [2, 3, 4])
def test_every_op_and_dtype_under_tprun(n):
    rc, out = tprun(n, "ops")
    assert rc == 0, out[-4000:]
    oks(out, n)


def test_every_op_and_dtype_under_torchrun():
    rc, out = run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", WORKER, "ops"])
    assert rc == 0, out[-4000:]
    oks(out, 2)


def losses(out, n):
    by_rank = {}
    for line in out.splitlines():
        m = re.match(r"(?:\[rank(\d+)\]: )?LOSSES (.*)", line)
        if m:
            by_rank[len(by_rank) if m.group(1) is None else int(m.group(1))] = [float(v) for v in m.group(2).split()]
    assert len(by_rank) == n, out[-4000:]
    return by_rank


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_training_matches_gloo(kind):
    rc, out_t = tprun(2, f"{kind}-tprun")
    assert rc == 0, out_t[-4000:]
    oks(out_t, 2)  # identical parameters on every rank (also asserted inside the worker)
    rc, out_g = tprun(2, f"{kind}-gloo")
    assert rc == 0, out_g[-4000:]
    lt, lg = losses(out_t, 2), losses(out_g, 2)
    for r in range(2):
        assert len(lt[r]) == 20
        for a, b in zip(lt[r], lg[r]):
            assert abs(a - b) <= 1e-5 * abs(b), (r, lt[r], lg[r])
    # The model did train: the losses are not all equal.
    assert len(set(lt[0])) > 1


@pytest.mark.parametrize(
    "mode,op",
    [("kill", "all_reduce"), ("kill-p2p", "send"), ("kill-a2a", "all_to_all"), ("kill-sub", "all_reduce")],
)
def test_killed_rank_is_named_within_10_s(mode, op):
    """Rank 1 SIGKILLs itself; the others' next call (all_reduce, send/recv, all_to_all, or an
    all_reduce of the sub-group {0, 1}) raises CommError naming the op and rank 1."""
    rc, out = tprun(3, mode, timeout=60)
    assert rc != 0
    errs = re.findall(r"\[rank(\d)\]: CommError after ([\d.]+) s: (.*)", out)
    assert sorted(r for r, _, _ in errs) == ["0", "2"], out[-4000:]
    for r, secs, msg in errs:
        if mode == "kill-sub" and r == "2":
            continue  # not a member of the sub-group
        assert float(secs) < 10, msg
        ops = ("send", "recv") if op == "send" else (op,)
        assert any(o in msg for o in ops) and "rank 1" in msg, msg


def test_unsupported_calls_fail_clearly():
    rc, out = tprun(2, "unsupported", timeout=120)
    assert rc == 0, out[-4000:]
    for what, needle in [
        ("recv from any source", "RuntimeError: tprun backend: recv from any source is not supported"),
        ("PREMUL_SUM of int32", "premulsum takes float types, not int32"),
        ("all_reduce of int16", "RuntimeError: tprun backend: all_reduce cannot reduce torch.int16"),
        ("BAND of float32", "CommError: tprun backend: all_reduce on rank "),
        ("BAND of float32", "band is a bitwise reduction and float is a float type"),
        ("wrong output size", "RuntimeError: tprun backend: all_gather_into_tensor: output has 3 elements, expected 2 x 4"),
    ]:
        assert f"UNSUPPORTED {what}: {needle}" in out or (needle in out and f"UNSUPPORTED {what}:" in out), (
            needle,
            out[-4000:],
        )


def test_numpy_api_without_a_launcher_is_a_world_of_one():
    code = (
        "import numpy as np, tprun; c = tprun.Communicator.from_env(); a = np.ones(3, np.float32); "
        "c.all_reduce(a); print(c.world_size, a.tolist())"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "TPRUN_SHM_FD")}
    p = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env, timeout=60)
    assert p.stdout.strip() == "1 [1.0, 1.0, 1.0]", p.stdout + p.stderr


def test_stale_segment_of_a_crashed_run_does_not_block_a_new_one():
    """Ranks started by hand (as torchrun does): rank 0 of a first run creates the named segment
    and is killed before rank 1 maps it; a new run with the same key replaces the stale one."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TPRUN_", "TORCHELASTIC_"))}
    env.update(
        WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(40000 + os.getpid() % 20000)
    )
    code = (
        "import sys, numpy as np, tprun; c = tprun.Communicator.from_env(); print('mapped', flush=True); "
        "sys.stdin.read() if c.rank == 0 and len(sys.argv) > 1 else None; "
        "a = np.full(3, c.rank + 1.0, np.float32); c.all_reduce(a); print('sum', a.tolist(), flush=True)"
    )
    before = shm_names()
    crashed = subprocess.Popen(
        [sys.executable, "-c", code, "crash"],
        env={**env, "RANK": "0"},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert crashed.stdout.readline().strip() == "mapped"
        left = shm_names() - before
        assert len(left) == 1 and "torchrun-127.0.0.1-" in left.pop(), shm_names()
    finally:
        crashed.kill()
        crashed.wait()
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env={**env, "RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (0, 1)
    ]
    outs = [p.communicate(timeout=60)[0] for p in ranks]
    assert [p.returncode for p in ranks] == [0, 0], outs
    assert all("sum [3.0, 3.0, 3.0]" in o for o in outs), outs
    assert shm_names() == before, shm_names()


def test_the_leftover_check_reports_a_leaked_named_segment():
    name = f"tprun-{os.getuid()}-planted-{os.getpid()}"
    try:
        with pytest.raises(AssertionError, match=f"left in /dev/shm: {{'{name}'}}"):
            run([sys.executable, "-c", f"open('/dev/shm/{name}', 'w').close()"])
    finally:
        Path("/dev/shm", name).unlink(missing_ok=True)


def test_the_leftover_check_reports_a_process_left_holding_the_job_memory():
    """A process that outlives its run (setsid) holding a memfd named as tprun names the segment's."""
    code = (
        "import os, subprocess; fd = os.memfd_create('tprun-shm', 0); "
        "subprocess.Popen(['sleep', '300'], pass_fds=[fd], start_new_session=True, "
        "stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)"
    )
    with pytest.raises(AssertionError, match=r"processes left holding \{\d+: \['/memfd:tprun-shm \(deleted\)'\]\}"):
        run([sys.executable, "-c", code])
