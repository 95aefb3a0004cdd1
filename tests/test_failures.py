"""Failed members never give a silently wrong result: frozen with finite parameters, named,
left out of their cell's statistics, and the other members unaffected."""

import json

import jax
import numpy as np
import pytest

from saejax import SAEConfig, SyntheticSource, TrainConfig
from saejax.run import main
from saejax.train import train

SRC = SyntheticSource(d=12, n_features=20, s=2, n_heldout=256)


@pytest.mark.parametrize("bad_lr", [1e6, 1e30])  # finite blow-up, and a non-finite one
def test_diverging_member_is_frozen_and_others_unaffected(bad_lr):
    cfg = SAEConfig(d_in=12, d_sae=20, arch="relu", l1_coef=1e-3)
    tc = TrainConfig(batch_size=64, steps=40, lr=3e-3, log_every=10)
    both = train(cfg, tc, SRC, [0, 1], sweep={"lr": [3e-3, bad_lr]}, progress=False)
    good = train(cfg, tc, SRC, [0, 1], sweep={"lr": [3e-3]}, progress=False)
    assert set(both.failed) == {2, 3}, both.failed  # members of the bad learning rate, named
    for leaf in jax.tree.leaves(both.params):
        assert np.isfinite(np.asarray(leaf)).all()
    for k in good.params:
        np.testing.assert_allclose(np.asarray(both.params[k])[:2], np.asarray(good.params[k]), atol=1e-6)


def test_runner_marks_failed_cells(tmp_path, capsys, monkeypatch):
    from pathlib import Path

    root = Path(__file__).parent.parent
    monkeypatch.chdir(root)
    common = ["experiments/smoke.py", "--no-progress", "--set", "archs=relu", "--set", "steps=60,",
              "--cache-dir", str(tmp_path / "cache")]
    assert main([*common, "--set", "lrs=3e-3,1e6", "--out", str(tmp_path / "a")]) == 0
    assert main([*common, "--set", "lrs=3e-3", "--out", str(tmp_path / "b")]) == 0
    a = {r["cell"]: r for r in json.loads((tmp_path / "a" / "summary.json").read_text())["cells"]}
    b = {r["cell"]: r for r in json.loads((tmp_path / "b" / "summary.json").read_text())["cells"]}
    bad = [r for r in a.values() if r["lr"] == 1e6]
    assert len(bad) == 1 and bad[0]["status"].startswith("failed") and bad[0].get("pwmcc") is None
    assert bad[0]["failed_seeds"] == [0, 1, 2]
    for cell, r in b.items():
        assert a[cell]["status"] == "ok"
        for key in ("pwmcc", "hungarian_mean", "explained_variance", "l0"):
            assert a[cell][key] == pytest.approx(r[key], abs=1e-6), key
    assert "failed" in (tmp_path / "a" / "report.md").read_text()
