"""The runner end to end: files, consistency with the stability report, re-runs, bad input (resume after
SIGKILL at every stage: tests/test_fault_injection.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "experiments" / "smoke.py")
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}


def run(*args, cwd=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "saejax.run", *args, "--no-progress"], capture_output=True,
                          text=True, env=ENV, cwd=cwd or ROOT, timeout=timeout)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    r = run(SMOKE, "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r.stdout


def test_smoke_writes_everything_consistently(smoke):
    out, stdout = smoke
    summary = json.loads((out / "summary.json").read_text())
    cells = summary["cells"]
    assert {c["cell"] for c in cells} == {"topk-w24-k2-len60", "topk-w24-k2-len120",
                                          "relu-w24-l1_0.003-len60", "relu-w24-l1_0.003-len120"}
    for c in cells:
        cdir = out / "cells" / c["cell"]
        rep = json.loads((cdir / "report.json").read_text())
        for key in ("pwmcc", "random_pwmcc", "hungarian_mean", "frac_ge_0.7", "gt_mcc"):
            assert c[key] == pytest.approx(rep["summary"][key], rel=1e-9), key
        pw = np.array(rep["matrices"]["pwmcc"], dtype=float)
        iu = np.triu_indices(len(pw), 1)
        assert c["pwmcc"] == pytest.approx(pw[iu].mean(), rel=1e-6)  # summary = mean over seed pairs
        assert c["pwmcc_ratio"] == pytest.approx(c["pwmcc"] / c["random_pwmcc"], rel=1e-6)
        assert 0 <= c["random_pwmcc"] < c["pwmcc"] <= 1  # a planted dictionary: far above chance
        for seed in (0, 1, 2):
            assert (cdir / "saes" / f"seed{seed}" / "cfg.json").is_file()
            assert (cdir / "saes" / f"seed{seed}" / "sae_weights.safetensors").is_file()
        hist = json.loads((cdir / "history.json").read_text())
        assert hist["step"][-1] == c["steps"]
    long = {c["arch"]: c for c in cells if c["steps"] == 120}
    assert long["topk"]["gt_mcc"] > 0.5 and long["topk"]["l0"] <= 2.0
    csv_lines = (out / "summary.csv").read_text().splitlines()
    assert len(csv_lines) == 5 and csv_lines[0].startswith("cell,")
    for fig in ("heatmap", "matched_hist", "dynamics", "stability_vs_l0", "stability_vs_width", "ev_vs_l0"):
        assert (out / "figures" / f"{fig}.png").stat().st_size > 1000
    md = (out / "report.md").read_text()
    assert "| cell |" in md and "figures/heatmap.png" in md
    assert "topk-w24-k2-len120" in stdout and "PWMCC" in stdout


def test_exported_sae_loads_back_and_matches(smoke):
    from saejax import sae
    from saejax.io import load_saelens

    out, _ = smoke
    cfg, params = load_saelens(out / "cells" / "topk-w24-k2-len120" / "saes" / "seed1")
    assert cfg.arch == "topk" and cfg.k == 2 and cfg.d_sae == 24
    x = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)
    z = sae.encode(cfg, params, x)
    assert np.all(np.sum(np.asarray(z) > 0, 1) <= 2)
    assert np.asarray(sae.decode(params, z)).shape == (64, 16)


def test_rerun_skips_finished_cells(smoke):
    out, _ = smoke
    before = (out / "summary.json").read_text()
    r = run(SMOKE, "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "summary.json").read_text() == before
    dry = run(SMOKE, "--out", str(out), "--dry-run")
    assert dry.returncode == 0 and dry.stdout.count("[done]") == 2, dry.stdout


def _one_line_error(argv, capsys, *needles):
    """Bad input: exit status 2 and one line on stderr (in-process: the same main() as the CLI)."""
    from saejax.run import main

    code = main([*argv, "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2, (code, err)
    assert err.startswith("error: ") and "\n" not in err, err
    for n in needles:
        assert n in err, err


def test_bad_input(tmp_path, capsys):
    _one_line_error([str(tmp_path / "nope.py")], capsys, "does not exist")
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    _one_line_error([str(empty)], capsys, "neither get_config()")
    _one_line_error([SMOKE, "--set", "archs=('topkk',)", "--dry-run"], capsys, "did you mean 'topk'")
    _one_line_error([SMOKE, "--set", "sead=1", "--dry-run"], capsys, "unknown key 'sead'", "did you mean 'seeds'")
    _one_line_error([SMOKE, "--set", "train.lrr=1", "--dry-run"], capsys, "did you mean 'lr'")
    _one_line_error([SMOKE, "--set", "source.dd=1", "--dry-run"], capsys, "unknown source option 'dd'", "did you mean 'd'")
    _one_line_error([SMOKE, "--set", "widths=0", "--dry-run"], capsys, "impossible width")
    _one_line_error([SMOKE, "--set", "widths=2", "--dry-run"], capsys, "k must satisfy")
    (tmp_path / "file").write_text("")
    _one_line_error([SMOKE, "--out", str(tmp_path / "file" / "sub")], capsys, "not writable")


def test_bad_input_from_the_command_line(tmp_path):
    r = run(str(tmp_path / "nope.py"))
    assert r.returncode == 2 and r.stderr.strip().startswith("error: experiment file")
    assert len(r.stderr.strip().splitlines()) == 1


def test_a_rerun_compiles_nothing_again(tmp_path):
    """JAX's persistent compilation cache under the cache dir: a second process running the same
    experiment writes no new compiled program, and its numbers equal the first run's."""
    # every program cached (a loaded machine moves compile times across the default threshold)
    env = {**ENV, "SAEJAX_COMPILE_CACHE": "1", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the runner's own cache dir, not the test session's
    args = [SMOKE, "--set", "archs=topk", "--set", "dynamics=0", "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    outs, programs = [], []
    for i in range(2):
        out = tmp_path / f"run{i}"
        r = subprocess.run([sys.executable, "-m", "saejax.run", *args, "--out", str(out)], capture_output=True,
                           text=True, env=env, cwd=ROOT, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        outs.append(json.loads((out / "summary.json").read_text())["cells"])
        programs.append(sorted(p.name for p in (tmp_path / "cache" / "xla").iterdir()))
    assert programs[0] and programs[1] == programs[0]
    assert outs[1] == outs[0]
