"""Contrasts between cells: pairing, seed-level statistics against references, the report table."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sstats

from saejax import ConfigError
from saejax.contrasts import Contrast, compare, pairs, permutation_p
from saejax.data import SourcePlan
from saejax.experiment import Experiment, Synthetic
from saejax.run import main

ROOT = Path(__file__).parent.parent


def matrix(rng, s, level, noise=0.01):
    """Pairwise ``[s, s]`` values ``level + a_i + a_j`` plus noise, NaN diagonal, as in report.json."""
    a = rng.normal(0, noise, s)
    m = level + a[:, None] + a[None, :] + rng.normal(0, noise / 3, (s, s))
    m = (m + m.T) / 2
    m[np.diag_indices(s)] = np.nan
    return m.tolist()


def test_pairs_hold_the_other_columns_equal():
    cfg = [dict(cell=f"{a}-{w}-{n}", arch=a, d_sae=w, k=2 if a == "topk" else None,
                sparsity_coef=None if a == "topk" else 1e-3, steps=n) for a in ("topk", "relu") for w in (8, 16) for n in (5, 9)]
    got = [(x["cell"], y["cell"]) for x, y in pairs(Contrast("arch", "topk", "relu"), cfg)]
    assert got == [("topk-8-5", "relu-8-5"), ("topk-8-9", "relu-8-9"), ("topk-16-5", "relu-16-5"), ("topk-16-9", "relu-16-9")]
    got = pairs(Contrast("d_sae", 16, 8), cfg)
    assert len(got) == 4 and all(x["arch"] == y["arch"] and x["steps"] == y["steps"] for x, y in got)
    assert len(pairs(Contrast("d_sae", 16, 8, within=("arch",)), cfg)) == 8


def test_permutation_p_equals_scipy_exact():
    rng = np.random.default_rng(1)
    for _ in range(5):
        x, y = rng.normal(0.3, 1, 5), rng.normal(0, 1, 5)
        p, res = permutation_p(x, y)
        ref = sstats.permutation_test((x, y), lambda a, b: np.mean(a) - np.mean(b), permutation_type="independent",
                                      alternative="two-sided", n_resamples=10_000).pvalue
        assert res == pytest.approx(1 / 252) and p == pytest.approx(ref, abs=1e-9)


def test_compare_finds_a_planted_difference_and_none_where_there_is_none():
    rng = np.random.default_rng(0)
    hi = {"pwmcc": matrix(rng, 5, 0.5), "frac_ge_0.7": matrix(rng, 5, 0.2)}
    lo = {"pwmcc": matrix(rng, 5, 0.3), "frac_ge_0.7": matrix(rng, 5, 0.05)}
    r = compare(hi, lo)
    assert r["pwmcc_diff"] == pytest.approx(0.2, abs=0.02) and r["pwmcc_diff_ci_low"] > 0.15
    assert r["frac_ge_0.7_diff_ci_low"] > 0.1
    assert r["p_value"] == pytest.approx(2 / 252) and r["cohens_d"] > 5  # two-sided exact minimum
    same = compare({"pwmcc": matrix(rng, 5, 0.3, 0.02)}, {"pwmcc": matrix(rng, 5, 0.3, 0.02)})
    assert same["pwmcc_diff_ci_low"] < 0 < same["pwmcc_diff_ci_high"]


def test_a_contrast_that_pairs_no_cells_is_refused_at_plan_time():
    exp = Experiment(name="c", source=Synthetic(), archs=("topk",), widths=(8,), ks=(2,), seeds=(0, 1),
                     contrasts=(Contrast("arch", "topk", "relu"),))
    with pytest.raises(ConfigError, match=r"contrast 'arch: topk vs relu' pairs no cells \(values of arch: topk"):
        exp.plan(SourcePlan(d_in=8, n_tokens=1000))
    with pytest.raises(ConfigError, match=r"drop contrasts with --set contrasts=\(\)"):
        exp.plan(SourcePlan(d_in=8, n_tokens=1000))
    assert dataclasses.replace(exp, contrasts=()).plan(SourcePlan(d_in=8, n_tokens=1000)).units
    with pytest.raises(ConfigError, match="contrast field must be one of"):
        Contrast("width", 8, 16)


def test_smoke_report_has_the_contrasts_table_and_untrained_reconstruction(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    exp = tmp_path / "smoke_contrasts.py"
    exp.write_text("import dataclasses, importlib.util\n"
                   "from saejax.contrasts import Contrast\n"
                   f"spec = importlib.util.spec_from_file_location('smoke', {str(ROOT / 'experiments' / 'smoke.py')!r})\n"
                   "smoke = importlib.util.module_from_spec(spec); spec.loader.exec_module(smoke)\n"
                   "def get_config():\n"
                   "    return dataclasses.replace(smoke.get_config(), contrasts=(Contrast('arch', 'topk', 'relu'),"
                   " Contrast('steps', 120, 60)))\n")
    out = tmp_path / "smoke"
    assert main([str(exp), "--out", str(out), "--no-progress", "--cache-dir", str(tmp_path / "c")]) == 0
    rows = json.loads((out / "contrasts.json").read_text())
    cells = {r["cell"]: r for r in json.loads((out / "summary.json").read_text())["cells"]}
    assert [r["contrast"] for r in rows] == ["arch: topk vs relu"] * 2 + ["steps: 120 vs 60"] * 2
    for r in rows:
        assert r["pwmcc_diff"] == pytest.approx(cells[r["a"]]["pwmcc"] - cells[r["b"]]["pwmcc"], abs=1e-9)
        assert r["pwmcc_diff_ci_low"] <= r["pwmcc_diff"] <= r["pwmcc_diff_ci_high"]
        assert r["p_value_resolution"] == pytest.approx(1 / 20)  # 3 vs 3 seeds: C(6, 3) relabellings
    for r in cells.values():  # the untrained control reconstructs far worse than the trained SAEs
        assert r["random_mse"] > 1.5 * r["mse"] and r["random_explained_variance"] < r["explained_variance"] - 0.2
    report = (out / "report.md").read_text()
    assert "## Contrasts" in report and "- Contrasts:" in report.split("## Cells")[0]
    assert "`topk-w24-k2-len120` | `relu-w24-l1_0.003-len120`" in report
    for name in ("heatmaps.png", "ratio_vs_width.png"):  # every cell's heatmap; ratio to each cell's own chance
        assert (out / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"figures/{name}" in report
