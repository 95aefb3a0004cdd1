"""A re-used --out never returns old numbers: with any setting changed, the summary equals a fresh
run with the new settings (every unit is stored under a fingerprint of what shapes it)."""

import json
from pathlib import Path

import pytest

from saejax.run import main

ROOT = Path(__file__).parent.parent
BASE = ["experiments/smoke.py", "--no-progress", "--set", "archs=topk", "--set", "steps=40,", "--set", "dynamics=0"]
CHANGES = [["--set", "seeds=5,6,7"], ["--set", "train.lr=0.01"], ["--set", "source.s=3"], ["--set", "widths=20"],
           ["--set", "ks=3"], ["--set", "archs=relu", "--set", "l1_coefs=1e-2"], ["--set", "steps=50,"]]


def _cells(out):
    return json.loads((out / "summary.json").read_text())["cells"]


@pytest.mark.slow
def test_changed_setting_never_reuses_old_numbers(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cache = ["--cache-dir", str(tmp_path / "cache")]
    shared = tmp_path / "shared"
    assert main([*BASE, *cache, "--out", str(shared)]) == 0
    first = _cells(shared)
    for i, change in enumerate(CHANGES):
        assert main([*BASE, *change, *cache, "--out", str(shared)]) == 0
        fresh = tmp_path / f"fresh{i}"
        assert main([*BASE, *change, *cache, "--out", str(fresh)]) == 0
        assert _cells(shared) == _cells(fresh), change
        assert _cells(shared) != first, change
