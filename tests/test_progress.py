"""Progress as a person sees it: the pacing of compiled calls never changes results, a bar in a
terminal moves and shows an ETA, plain lines (no carriage returns) anywhere else."""

import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from saejax import SAEConfig, SyntheticSource, TrainConfig, progress
from saejax import train as train_mod

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_progress  # noqa: E402  (its pseudo-terminal runner)

ROOT = Path(__file__).resolve().parents[1]
SRC = SyntheticSource(d=16, n_features=40, s=3, n_heldout=256)


def test_pacing_of_calls_never_changes_results(monkeypatch):
    cfg = SAEConfig(d_in=16, d_sae=32, arch="topk", k=3)
    tc = TrainConfig(batch_size=64, steps=250, lr=3e-3, log_every=10, chunk_steps=60)
    ref = train_mod.train(cfg, tc, SRC, [0, 1], progress=False, stops=(35,), on_stop=lambda *a: None)
    seen = []
    real_ran = train_mod._Pace.ran

    def ran(self, n):
        seen.append(n)
        real_ran(self, n)

    monkeypatch.setattr(train_mod._Pace, "ran", ran)
    monkeypatch.setattr(train_mod._Pace, "__init__", lambda self, chunk, log_every: (
        setattr(self, "chunk", chunk), setattr(self, "unit", log_every), setattr(self, "target", 1e-9),
        setattr(self, "per_step", None), setattr(self, "calls", 0), setattr(self, "t", time.perf_counter()),
        setattr(self, "timed", [0.0, 0]))[0])
    paced = train_mod.train(cfg, tc, SRC, [0, 1], progress=False, stops=(35,), on_stop=lambda *a: None)
    assert seen == [35, 60, 60] + [10] * 9 + [5]  # whole chunks until timed, then one window per call; the stop at 35 honoured
    for a, b in zip(jax.tree.leaves(ref.params), jax.tree.leaves(paced.params)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(ref.log_steps, paced.log_steps)
    np.testing.assert_allclose(ref.history["loss"], paced.history["loss"], rtol=1e-6)


def test_pace_targets_seconds_per_call():
    p = train_mod._Pace(chunk=200, log_every=10, target=2.0)
    assert p.steps(1000) == 200  # before any timing: the whole chunk
    p.per_step = 0.05
    assert p.steps(1000) == 40 and p.steps(25) == 25  # 2 s worth, capped by what remains
    p.per_step = 1e-5
    assert p.steps(1000) == 200  # capped by the compiled chunk
    p.per_step = 10.0
    assert p.steps(1000) == 10  # never below one window


def test_plain_lines_outside_a_terminal():
    out = io.StringIO()
    bar = progress.bar(100, "train 4 SAEs", stream=out, every=0.0)
    for _ in range(4):
        bar.set_postfix(loss="0.5")
        bar.update(25)
        time.sleep(0.01)
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 5
    assert "train 4 SAEs: 25/100 step" in lines[0] and "ETA" in lines[0] and "loss=0.5" in lines[0]
    assert "100/100" in lines[-1] and "ETA" not in lines[-1]
    off = io.StringIO()
    progress.bar(10, "x", stream=off, enabled=False).update(10)
    assert off.getvalue() == ""


def _run_in_terminal(args) -> tuple[int, str]:
    """Exit status and everything drawn on a pseudo-terminal (carriage returns included)."""
    code, events = bench_progress.run_in_terminal(args)
    return code, b"".join(d for _, d in events).decode("utf-8", "replace")


@pytest.mark.slow
def test_smoke_in_a_terminal_shows_stages_and_a_moving_bar(tmp_path):
    code, screen = _run_in_terminal([sys.executable, "-m", "saejax.run", "experiments/smoke.py", "--out", str(tmp_path)])
    assert code == 0, screen[-3000:]
    assert re.search(r"\[1/2\] \S+\s+\(elapsed \d+s, ETA after the first unit\)", screen), screen[:3000]
    assert re.search(r"\[2/2\] \S+\s+\(elapsed \d+s, ETA \d+", screen), screen[:3000]
    frames = [f for f in re.split(r"[\r\n]", screen) if "SAEs x 256 tok" in f]
    counts = {m.group(1) for f in frames if (m := re.search(r"\| *(\d+)/\d+ \[", f))}
    assert len(counts) >= 2, frames[:20]  # the bar moved: at least two different step counts drawn
    assert any(re.search(r"<\d\d:\d\d", f) for f in frames), frames[:20]  # tqdm's time left
    assert re.search(r"time: \d+s in all; ", screen)  # where the time went


@pytest.mark.slow
def test_smoke_in_a_log_has_plain_lines_only(tmp_path):
    r = subprocess.run([sys.executable, "-m", "saejax.run", "experiments/smoke.py", "--out", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "\r" not in r.stdout + r.stderr
    assert re.search(r"3 SAEs x 256 tok: 120/120 step \([\d,.]+ step/s", r.stderr), r.stderr[-2000:]


def test_run_eta_separates_fixed_cost_from_work():
    from types import SimpleNamespace as NS

    def unit(i, d_sae):
        return NS(id=f"u{i}", n_members=5, total=100, train=NS(batch_size=10), sae=NS(d_sae=d_sae, d_in=8))

    units = tuple(unit(i, w) for i, w in enumerate((64, 128, 256, 512, 1024)))
    clock = progress.RunClock(units)
    assert clock.eta(units) == "ETA after the first unit"
    cost = lambda u: 20.0 + 1e-6 * progress.work(u)  # noqa: E731  20 s fixed + work
    clock.unit_done(units[0], cost(units[0]), True)
    assert clock.predict(units[1]) == pytest.approx(2 * cost(units[0]))  # one size: proportional
    clock.unit_done(units[1], cost(units[1]), True)
    clock.unit_done(units[1], 0.0, False)  # a unit found done is not a measurement
    left = sum(cost(u) for u in units[2:]) + progress.REPORT_S_PER_CELL * len(units)  # and the report, a cell each
    assert clock.remaining(units[2:]) == pytest.approx(left)
    assert clock.eta(units[2:]) == f"ETA {progress.fmt(left)}"


def test_a_swallowed_interrupt_still_stops_at_the_next_chunk(tmp_path):
    """SIGINT inside a finaliser is swallowed by Python; the runner's handler also sets a flag that
    the trainer checks after every chunk, and main() gives the caller its handlers back."""
    import signal

    from saejax import errors
    from saejax.run import main

    calls = []
    tc = TrainConfig(batch_size=32, steps=100, log_every=10, chunk_steps=20)
    errors.STOP.set()
    try:
        with pytest.raises(KeyboardInterrupt):
            train_mod.train(SAEConfig(d_in=16, d_sae=32, k=3), tc, SRC, [0], progress=False,
                            stops=(20, 40), on_stop=lambda g, step, st: calls.append(step))
    finally:
        errors.STOP.clear()
    assert calls == [20]  # stopped after the first chunk, not at the end
    before = signal.getsignal(signal.SIGINT)
    assert main([str(ROOT / "experiments" / "smoke.py"), "--dry-run", "--out", str(tmp_path), "--no-progress"]) == 0
    assert signal.getsignal(signal.SIGINT) is before


def test_run_eta_uses_the_steady_training_time_from_the_first_unit():
    """With the trainer's steady seconds, one small unit dominated by compilation and analyses
    already predicts a large one: setup once, training and analyses along lines through it with
    the documented prior intercepts."""
    from types import SimpleNamespace as NS

    def unit(i, d_sae):
        return NS(id=f"u{i}", n_members=5, total=100, train=NS(batch_size=10), sae=NS(d_sae=d_sae, d_in=8))

    units = (unit(0, 64), unit(1, 4096))
    clock = progress.RunClock(units)
    per_latent = 5 * 100 * 10 * 8
    steady = lambda u: 1e-6 * per_latent * (u.sae.d_sae + progress.STEADY_OFFSET_D_SAE)  # noqa: E731
    analyses = lambda u: 20.0 * (u.sae.d_sae + progress.ANALYSIS_OFFSET_D_SAE) / (64 + progress.ANALYSIS_OFFSET_D_SAE)  # noqa: E731
    # 10 s compiling, then training, then the analyses (one cell)
    clock.unit_done(units[0], 10.0 + steady(units[0]) + 20.0, True, steady(units[0]), 10.0 + steady(units[0]))
    assert clock.predict(units[1]) == pytest.approx(10.0 + steady(units[1]) + analyses(units[1]))
    old = progress.RunClock(units)  # without it the small unit's fixed cost is scaled 64-fold: 10x too long
    old.unit_done(units[0], 30.0 + steady(units[0]), True)
    assert old.predict(units[1]) > 10 * (30.0 + steady(units[1]))


def test_eta_rates_are_per_architecture_and_the_run_order_alternates_them():
    """A TopK step costs several ReLU steps of the same work on a CPU; measured on TopK units only,
    ReLU units would be predicted far too long. The runner trains the architectures in turn, and
    the ETA uses the rate of a unit's own architecture once one is measured; each architecture's
    largest unit comes first and its smallest second, so no rate is extrapolated upwards."""
    from types import SimpleNamespace as NS

    def unit(arch, d_sae):
        return NS(id=f"{arch}{d_sae}", n_members=5, total=100, train=NS(batch_size=10),
                  sae=NS(d_sae=d_sae, d_in=8, arch=arch))

    units = tuple(unit(a, w) for a in ("topk", "relu") for w in (64, 256, 1024))
    order = progress.run_order(units)
    assert [units[i].id for i in order] == ["topk1024", "relu1024", "topk64", "relu64", "topk256", "relu256"]
    assert sorted(order) == list(range(len(units)))
    rate = {"topk": 4e-6, "relu": 1e-6}
    steady = lambda u: rate[u.sae.arch] * progress.work(u) * (1 + progress.STEADY_OFFSET_D_SAE / u.sae.d_sae)  # noqa: E731
    cost = lambda u: 10.0 + steady(u)  # noqa: E731
    clock = progress.RunClock(tuple(units[i] for i in order))
    for i in order[:2]:
        u = units[i]
        clock.unit_done(u, cost(u), True, steady(u), cost(u))
    for u in units:
        assert clock.predict(u) == pytest.approx(cost(u))
