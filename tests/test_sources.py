"""Several named sources in one experiment: each trains the whole grid, its cells are named and
labelled after it, they equal the same source run alone, and contrasts compare across them."""

import json

import numpy as np
import pytest

from saejax.errors import ConfigError
from saejax.experiment import Experiment, Modular, Synthetic, apply_overrides
from saejax.run import main

EXP = """
from saejax.contrasts import Contrast
from saejax.experiment import Experiment, Synthetic

def get_config():
    return Experiment(name="two", source={SOURCE}, archs=("topk",), widths=(24,), ks=(2,), epochs=None,
                      steps=(40,), seeds=(0, 1, 2), train={{"batch_size": 128, "lr": 3e-3, "log_every": 10}},
                      dynamics=0, heldout_tokens=512, contrasts={CONTRASTS})
"""
A = "Synthetic(d=16, n_features=24, s=2, n_heldout=512)"
B = "Synthetic(d=16, n_features=48, s=4, n_heldout=512)"


def write(tmp_path, name, source, contrasts="()"):
    path = tmp_path / f"{name}.py"
    path.write_text(EXP.format(SOURCE=source, CONTRASTS=contrasts))
    return str(path)


def cells(out):
    return json.loads((out / "summary.json").read_text())["cells"]


def test_named_sources_equal_each_source_alone(tmp_path):
    both = write(tmp_path, "both", f'{{"easy": {A}, "hard": {B}}}', '(Contrast("source", "easy", "hard"),)')
    assert main([both, "--out", str(tmp_path / "both"), "--no-progress"]) == 0
    assert main([write(tmp_path, "hard", B), "--out", str(tmp_path / "hard"), "--no-progress"]) == 0
    got = cells(tmp_path / "both")
    assert [c["cell"] for c in got] == ["easy.topk-w24-k2-len40", "hard.topk-w24-k2-len40"]
    assert [c["source"] for c in got] == ["easy", "hard"]
    alone = cells(tmp_path / "hard")[0]
    for key in ("pwmcc", "hungarian_mean", "explained_variance", "gt_mcc", "random_pwmcc"):
        assert got[1][key] == pytest.approx(alone[key], rel=1e-6), key  # the same training, named differently
    rows = json.loads((tmp_path / "both" / "contrasts.json").read_text())
    assert [(r["a"], r["b"]) for r in rows] == [("easy.topk-w24-k2-len40", "hard.topk-w24-k2-len40")]
    assert rows[0]["pwmcc_diff"] == pytest.approx(got[0]["pwmcc"] - got[1]["pwmcc"], abs=1e-9)
    report = (tmp_path / "both" / "report.md").read_text()
    assert "easy: synthetic" in report and "hard: synthetic" in report
    assert "easy.topk-w24-k2-len40" in (tmp_path / "both" / "explorer.html").read_text()


def test_bad_named_sources(tmp_path, capsys):
    with pytest.raises(ConfigError, match="source names must be"):
        Experiment(name="x", source={"a/b": Synthetic()})
    with pytest.raises(ConfigError, match="empty dict"):
        Experiment(name="x", source={})
    with pytest.raises(ConfigError, match="accuracy must be in"):
        Modular(accuracy=1.5)
    bad = write(tmp_path, "bad", f'{{"easy": {A}, "hard": {B}}}', '(Contrast("source", "easy", "medium"),)')
    assert main([bad, "--out", str(tmp_path / "o"), "--dry-run"]) == 2
    assert "pairs no cells" in capsys.readouterr().err


def test_overrides_reach_named_sources():
    exp = Experiment(name="x", source={"a": Modular(task="add"), "b": Modular(task="mul", layer=0)})
    every = apply_overrides(exp, ["source.site=mlp_out"])
    assert [s.site for s in every.source.values()] == ["mlp_out", "mlp_out"]
    one = apply_overrides(exp, ["source.b.layer=1"])
    assert (one.source["a"].layer, one.source["b"].layer) == (1, 1)
    with pytest.raises(ConfigError, match="no named source has option 'nope'"):
        apply_overrides(exp, ["source.nope=1"])
    assert np.all([v.variant == n for v, n in zip(exp.variants(), ("a", "b"))])


def test_modular_accuracy_names_its_own_model():
    """Each target accuracy is its own cached model (a stop on one trajectory, evaluated every 5
    steps); no accuracy is the tuned default model."""
    from saejax.models.modular import default_config

    low, high = Modular(accuracy=0.6).config(), Modular(accuracy=0.9).config()
    assert (low.target_acc, low.eval_every) == (0.6, 5) and low.key != high.key
    assert Modular().config() == default_config("add")
    assert {k: v for k, v in vars(low).items() if k not in ("target_acc",)} == {
        k: v for k, v in vars(high).items() if k not in ("target_acc",)}  # the same trajectory
    assert "0.6 held-out accuracy" in Modular(accuracy=0.6).describe()
