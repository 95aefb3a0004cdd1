"""Real multi-process runs: ``jax.distributed`` with 2 processes x 2 CPU devices on this machine
(Gloo collectives over 127.0.0.1), members sharded over processes, process 0 writing.

The runner joins a job from ``JAX_COORDINATOR_ADDRESS``, ``SAEJAX_NUM_PROCESSES`` and
``SAEJAX_PROCESS_ID`` (see ``saejax.sharding.maybe_initialize_distributed``).
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "experiments" / "smoke.py")
# 4 seeds over 4 devices (2 per process); TopK only, to keep it short
ARGS = [SMOKE, "--set", "archs=topk", "--set", "seeds=0,1,2,3", "--no-progress"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(pid: int | None, port: int, devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "TPU_", "JAX_COORD"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    if pid is not None:
        env.update(SAEJAX_DISTRIBUTED="1", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", SAEJAX_NUM_PROCESSES="2",
                   SAEJAX_PROCESS_ID=str(pid), SAEJAX_HEARTBEAT_S="15")
    return env


class Proc:
    """A runner process whose output goes to files (pipes could fill and block a collective)."""

    def __init__(self, out: Path, pid: int | None, port: int = 0, devices: int = 2):
        out.parent.mkdir(parents=True, exist_ok=True)
        self.logs = [out.parent / f"{out.name}.{pid}.{name}" for name in ("out", "err")]
        with open(self.logs[0], "w") as so, open(self.logs[1], "w") as se:
            self.p = subprocess.Popen([sys.executable, "-m", "saejax.run", *ARGS, "--out", str(out)], cwd=ROOT,
                                      env=env_for(pid, port, devices), stdout=so, stderr=se)

    def wait(self, timeout: float) -> tuple[int, str, str]:
        try:
            rc = self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            raise
        return rc, self.logs[0].read_text(), self.logs[1].read_text()


def both(out: Path, timeout: float = 400):
    port = free_port()
    procs = [Proc(out, i, port) for i in range(2)]
    return [p.wait(timeout) for p in procs]


def numbers(tree):
    if isinstance(tree, dict):
        return [x for k in sorted(tree) for x in numbers(tree[k])]
    if isinstance(tree, list):
        return [x for v in tree for x in numbers(v)]
    return [float(tree)] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


def same_summary(a: Path, b: Path) -> None:
    ca, cb = (json.loads((d / "summary.json").read_text())["cells"] for d in (a, b))
    assert [c["cell"] for c in ca] == [c["cell"] for c in cb]
    # sharded over 4 devices vs one: the same numbers up to float32 rounding of the reductions
    np.testing.assert_allclose(numbers(ca), numbers(cb), rtol=2e-3, atol=1e-5)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    rc, _, err = Proc(out, None, devices=1).wait(400)
    assert rc == 0, err[-2000:]
    return out


@pytest.mark.slow
def test_two_processes_equal_one(reference, tmp_path):
    out = tmp_path / "two"
    (rc0, so0, se0), (rc1, so1, se1) = both(out)
    assert rc0 == 0 and rc1 == 0, (se0[-2000:], se1[-2000:])
    assert "jax.distributed initialised (SAEJAX_DISTRIBUTED=1): 2 processes" in so0
    assert "4 devices" in so0 or "members" in so0, so0[:2000]
    same_summary(out, reference)
    # process 0 writes the results; process 1 keeps its own copy aside, and the two agree exactly
    assert (out / ".process1" / "summary.json").read_text() == (out / "summary.json").read_text()


@pytest.mark.slow
def test_killed_process_stops_the_other_cleanly_and_a_rerun_resumes(reference, tmp_path):
    out = tmp_path / "killed"
    port = free_port()
    procs = [Proc(out, i, port) for i in range(2)]
    t0 = time.time()
    while not any(out.glob("units/*/ckpt/group0/*")) and time.time() - t0 < 300:
        time.sleep(0.05)
    assert any(out.glob("units/*/ckpt/group0/*")), procs[0].logs[1].read_text()[-2000:]
    procs[1].p.kill()
    procs[1].p.wait()  # reaped, as a dead process elsewhere would be (a zombie still holds its pid)
    t = time.time()
    rc, _, err = procs[0].wait(150)  # no hang: JAX's heartbeat (15 s here) bounds the wait
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    if lines:  # the lost peer broke a collective: saejax's one line, no traceback
        assert rc == 1 and "another process of this 2-process run stopped" in lines[0], err[-3000:]
        assert "Traceback" not in err, err[-3000:]
    else:  # it was noticed by the coordination service, which ends the process itself
        assert rc != 0 and "another task died" in err, err[-3000:]
    print(f"survivor exited {time.time() - t:.1f} s after the kill ({'saejax error' if lines else 'JAX heartbeat'})")
    (rc0, _, se0), (rc1, _, se1) = both(out)
    assert rc0 == 0 and rc1 == 0, (se0[-2000:], se1[-2000:])
    same_summary(out, reference)


def test_each_process_reads_only_its_part_of_the_data(tmp_path):
    """Batch split over the 2 processes: each reads only its half of every batch; members split:
    each reads only its own members' streams. Parameters equal one process's training."""
    from saejax import SAEConfig, TrainConfig
    from saejax.train import train

    sys.path.insert(0, str(ROOT / "tests" / "workers"))
    from host_slices import Counting

    port, stem = free_port(), str(tmp_path / "w")
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "workers" / "host_slices.py"), stem], cwd=ROOT,
                              env=env_for(i, port, 2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    outs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[-2000:] for o in outs]
    got = [np.load(f"{stem}.{i}.npz") for i in range(2)]
    for name, same in (("batch", True), ("members", False)):
        src = Counting(np.random.default_rng(0).standard_normal((3000, 16)).astype(np.float32))
        src.sizes = []
        tc = TrainConfig(batch_size=64, steps=30, lr=1e-3, log_every=10, chunk_steps=20, same_data_order=same)
        ref = train(SAEConfig(d_in=16, d_sae=32, arch="topk", k=4), tc, src, [0, 1, 2, 3], progress=False)
        one = sum(src.sizes[1:])  # rows one process reads for the whole job (the first take is the init sample)
        for g in got:
            np.testing.assert_array_equal(g[f"{name}_W_dec"], got[0][f"{name}_W_dec"])  # every process agrees
            np.testing.assert_allclose(g[f"{name}_W_dec"], ref.params["W_dec"], rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(g[f"{name}_loss"], ref.history["loss"], rtol=1e-4)
            assert g[f"{name}_sizes"].sum() * 2 == one, (name, g[f"{name}_sizes"], one)
