"""A full disk: one clear line, exit 2, and the previous results intact."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.fixture
def small_disk(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", str(mnt)])


def _run(out, cache, *extra):
    return subprocess.run([sys.executable, "-m", "saejax.run", "experiments/smoke.py", "--out", str(out), "--no-progress",
                           "--cache-dir", str(cache), "--set", "steps=60,", "--set", "archs=topk", *extra],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.mark.slow
def test_disk_full_is_one_line_and_keeps_results(small_disk, tmp_path):
    out = small_disk / "run"
    first = _run(out, tmp_path / "cache")
    assert first.returncode == 0, first.stderr[-2000:]
    before = (out / "summary.json").read_bytes()
    free = os.statvfs(small_disk)
    (small_disk / "filler").write_bytes(b"\0" * max(0, free.f_bavail * free.f_frsize - 20_000))
    second = _run(out, tmp_path / "cache", "--set", "widths=24,32,40")
    lines = [ln for ln in second.stderr.splitlines() if ln.strip()]
    assert second.returncode == 2 and len(lines) == 1 and "no space left" in lines[0], second.stderr[-3000:]
    assert (out / "summary.json").read_bytes() == before
