"""Seeded fault injection: SIGKILL the runner at 8 points (``SAEJAX_FAULT_KILLS``; up to 14) drawn
across every stage of a run.

The source is a tiny GPT-2 saved here, so building it (loading the model, extracting and writing
the activation cache) is part of the run, then training with Orbax checkpoints, the cell analyses
(``cells/*``) and the report (figures, ``summary.json``, ``report.md``). The kills are chained: run,
kill at point 1, re-run (which resumes), kill at point 2, ..., then a last run to completion, whose
``summary.json`` must equal an uninterrupted run's; no temporary file may be left, and each kill
must have landed in the stage it aimed at (judged from what the runner printed and the files it
had created when it died).

A kill point is a trigger (a line of the runner's output, or a file appearing) plus a seeded random
delay; the schedule (which stages, in which order, which checkpoint save or cell file, which delay)
comes from ``random.Random(SEED)``, so a failure reproduces with the same seed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from saejax.store import RunStore

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "experiments" / "smoke.py")
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
SEED = int(os.environ.get("SAEJAX_FAULT_SEED", "20250611"))  # another seed: another schedule
KILLS = int(os.environ.get("SAEJAX_FAULT_KILLS", "8"))  # each stage once, then random ones; 8 keeps CI short
TOTAL, EVERY = 300, 50  # training steps and checkpoint interval: saves at 50, 100, ..., 250
STAGES = ("source", "extraction", "training", "checkpoint", "analysis", "report")

EXPERIMENT = '''
from saejax.experiment import HF, Experiment


def get_config():
    return Experiment(
        name="faults",
        source=HF(model={model!r}, hook="1.resid_post", dataset={corpus!r}, ctx_len=8, n_tokens=6000,
                  batch_size=1, heldout_frac=0.2),
        archs=("topk",), widths=(64,), ks=(4,), epochs=None, steps=({half}, {total}), seeds=(0, 1, 2),
        train={{"batch_size": 1024, "lr": 3e-3, "log_every": 10, "chunk_steps": 10}},
        dynamics=3, checkpoint_every={every}, heldout_tokens=1200)
'''


def _runner(exp, out, cache):
    return [sys.executable, "-m", "saejax.run", str(exp), "--out", str(out), "--cache-dir", str(cache), "--no-progress"]


def latest_checkpoint(out: Path) -> int:
    """The newest finished Orbax save (``ckpt/group0/<step>/``), 0 when there is none."""
    return max((int(p.name) for p in out.glob("units/*/ckpt/group0/*") if p.name.isdigit()), default=0)


class Watched:
    """One runner process with what it has printed so far and the files it has created."""

    def __init__(self, exp: Path, out: Path, cache: Path, log: Path):
        self.out, self.cache = out, cache
        self.resume = latest_checkpoint(out)  # where this run's training restarts
        self.done_before = any(out.glob("units/*/done.json"))
        self.lines: list[str] = []
        time.sleep(0.05)  # files of the previous (dead) run are older than t0, even on a coarse clock
        self.t0 = time.time()
        self.log = open(log, "a")
        self.proc = subprocess.Popen(_runner(exp, out, cache), stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=ENV, cwd=ROOT)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    def saw(self, text: str) -> bool:
        return any(text in line for line in list(self.lines))

    def new(self, root: Path, pattern: str) -> list[Path]:
        """Paths matching ``pattern`` that this run created or rewrote."""
        found = []
        for p in root.glob(pattern):
            try:
                if p.stat().st_mtime >= self.t0:
                    found.append(p)
            except FileNotFoundError:  # renamed or removed meanwhile
                pass
        return found

    def cell_files(self) -> list[Path]:
        return [p for p in self.new(self.out, "cells/**/*") if p.is_file() and not p.name.endswith(".tmp")]

    def stage(self) -> str:
        """The stage the run is in (after a kill: the one it died in)."""
        out = self.out
        if (out / "summary.json").exists():
            return "finished"
        if self.new(out, "units/*/done.json") or self.new(out, "figures/*.png"):
            return "report"
        if self.cell_files() or self.new(out, f"units/*/snapshots/step{TOTAL}-g*.npz"):
            return "analysis"
        if self.new(out, "units/*/ckpt/group*/*.orbax-checkpoint-tmp*"):
            return "checkpoint"  # a save begun by this run and never finished
        if self.saw("[1/1]"):
            return "training"  # the source is built; restoring, compiling or stepping
        if self.new(self.cache, "activations/.tmp-*"):
            return "extraction"  # the cache entry is being written
        if self.saw("building the source"):
            return "source"
        return "startup"

    def kill_when(self, ready, delay: float, timeout: float = 240) -> str:
        """SIGKILL ``delay`` seconds after ``ready()`` first holds; the stage it died in ("finished"
        or "exited ..." when the trigger never came)."""
        t = time.time()
        try:
            while self.proc.poll() is None and time.time() - t < timeout:
                if ready():
                    time.sleep(delay)
                    self.proc.send_signal(signal.SIGKILL)
                    self.proc.wait()
                    self.reader.join(10)
                    return self.stage()
                time.sleep(0.003)
            return f"exited with {self.proc.poll()} before the trigger, in stage {self.stage()}"
        finally:
            self.proc.kill()
            self.proc.wait()
            self.log.close()


def schedule(rng: random.Random, n: int = KILLS) -> list[tuple[str, str]]:
    """``(stage, mode)`` in run order: each stage at least once, the other kills spread at random
    (at most three training or checkpoint kills each: they use up checkpoint saves)."""
    caps = {"source": 2, "extraction": 2, "training": 3, "checkpoint": 3, "analysis": 2, "report": 2}
    count = dict.fromkeys(STAGES, 1)
    while sum(count.values()) < n:
        s = rng.choice([s for s in STAGES if count[s] < caps[s]])
        count[s] += 1
    early = ["source"] * count["source"] + ["extraction"] * count["extraction"]
    middle = ["training"] * count["training"] + ["checkpoint"] * count["checkpoint"]
    rng.shuffle(early)
    rng.shuffle(middle)
    plan = early + middle + ["analysis"] * count["analysis"] + ["report"] * count["report"]
    # a training kill either lands while the unit restores/compiles, or between two checkpoint saves
    return [(s, rng.choice(("compile", "steps")) if s == "training" else "") for s in plan]


def trigger(stage: str, mode: str, w: Watched, rng: random.Random, reserve: int):
    """``(ready, delay, what)`` for one kill; ``reserve``: checkpoint saves later kills still need."""
    saves_left = len(range(w.resume + EVERY, TOTAL, EVERY))
    if stage == "source":  # loading the model, reading the corpus (before any cache file)
        return (lambda: w.saw("building the source")), rng.uniform(0.0, 1.0), "building the source"
    if stage == "extraction":
        return (lambda: bool(w.new(w.cache, "activations/.tmp-*"))), rng.uniform(0.0, 0.3), "cache entry being written"
    if stage == "training" and mode == "steps":
        k = rng.randint(1, max(1, min(2, saves_left - reserve)))
        step = w.resume + k * EVERY
        assert step < TOTAL, (w.resume, k)
        return (lambda: latest_checkpoint(w.out) >= step), rng.uniform(0.0, 0.05), f"after the save of step {step}"
    if stage == "training":
        return (lambda: w.saw("[1/1]")), rng.uniform(0.05, 0.8), "restoring/compiling"
    if stage == "checkpoint":
        k = rng.randint(1, max(1, min(2, saves_left, saves_left - reserve + 1)))
        step = w.resume + k * EVERY
        assert step < TOTAL, (w.resume, k)
        return ((lambda: bool(w.new(w.out, f"units/*/ckpt/group0/{step}.orbax-checkpoint-tmp*"))),
                rng.uniform(0.0, 0.01), f"during the save of step {step}")
    if stage == "analysis":  # cell 1 writes files 1-7 (history, SAEs), computes ~1 s, writes 8-10; cell 2 likewise
        n = rng.choice((rng.randint(1, 7), rng.randint(11, 14)))
        delay = rng.uniform(0.0, 0.8) if n <= 7 else 0.0
        return (lambda: len(w.cell_files()) >= n), delay, f"after cell file {n}"
    if stage == "report":  # done.json, then six figures ~0.2 s apart, then summary.csv/json and report.md
        m = rng.randint(1 if w.done_before else 0, 4)
        delay = rng.uniform(0.0, 0.6) if m == 0 else rng.uniform(0.0, 0.08)
        ready = (lambda: bool(w.new(w.out, "units/*/done.json"))) if m == 0 else \
            (lambda: len(w.new(w.out, "figures/*.png")) >= m)
        return ready, delay, f"after figure {m}" if m else "after done.json"
    raise AssertionError(stage)


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from test_activations import save_tiny, write_corpus

    d = tmp_path_factory.mktemp("faults")
    model, corpus = save_tiny(d / "model"), write_corpus(d / "corpus.txt", n_docs=700)
    exp = d / "faults.py"
    exp.write_text(EXPERIMENT.format(model=model, corpus=corpus, half=TOTAL // 2, total=TOTAL, every=EVERY))
    return d, exp


@pytest.mark.slow
def test_chained_sigkills_then_resume_equal_an_uninterrupted_run(tiny_source):
    d, exp = tiny_source
    ref = subprocess.run(_runner(exp, d / "ref", d / "ref-cache"), capture_output=True, text=True, env=ENV,
                         cwd=ROOT, timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]

    rng = random.Random(SEED)
    plan = schedule(rng)
    out, cache, log = d / "killed", d / "cache", d / "killed.log"
    landed = []
    for i, (stage, mode) in enumerate(plan):
        reserve = sum(1 for s, m in plan[i + 1:] if (s, m) == ("training", "steps")) + any(s == "checkpoint" for s, _ in plan[i + 1:])
        w = Watched(exp, out, cache, log)
        ready, delay, what = trigger(stage, mode, w, rng, reserve)
        got = w.kill_when(ready, delay)
        landed.append((stage, what, round(delay, 3), got))
        assert got == stage, f"kill {i + 1} aimed at {stage} ({what}, +{delay:.3f}s) but landed in: {got}\n" \
                             f"kills so far: {landed}\n{log.read_text()[-3000:]}"
        assert not (out / "summary.json").exists()

    final = subprocess.run(_runner(exp, out, cache), capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert final.returncode == 0, final.stderr[-3000:]
    print("\n".join(f"kill {i + 1}: {s:<10} {what} +{dl}s -> {got}" for i, (s, what, dl, got) in enumerate(landed)))
    assert len({got for *_, got in landed}) >= 4 and {got for *_, got in landed} == set(STAGES)
    assert json.loads((out / "summary.json").read_text()) == json.loads((d / "ref" / "summary.json").read_text())
    for f in ("summary.csv", "report.md"):  # the other reports too (the cache path appears in neither)
        assert (out / f).read_text() == (d / "ref" / f).read_text(), f
    assert not list(out.rglob("*.tmp")) and not list(out.rglob("*orbax-checkpoint-tmp*"))
    assert not list(out.glob("units/*/ckpt")) and not (out / ".lock").exists()
    assert [p.name for p in (cache / "activations").iterdir()] == [p.name for p in (d / "ref-cache" / "activations").iterdir()]


def test_dry_run_does_not_promise_a_resume_from_an_unfinished_checkpoint(tmp_path, capsys):
    """A kill during a checkpoint save leaves only ``<step>.orbax-checkpoint-tmp[-<time>]``."""
    from saejax import experiment
    from saejax.plan import unit_key
    from saejax.run import main

    exp = experiment.load(SMOKE)
    plan = exp.plan(exp.source.plan())
    store = RunStore(tmp_path)
    udir = store.unit_dir(plan.units[0].id, unit_key(exp, plan.units[0]))
    for name in ("40.orbax-checkpoint-tmp", "80.orbax-checkpoint-tmp-1718000000"):
        (udir / "ckpt" / "group0" / name / "state").mkdir(parents=True)
    assert store.status(udir) == "to train"
    assert main([SMOKE, "--out", str(tmp_path), "--dry-run"]) == 0
    first = next(line for line in capsys.readouterr().out.splitlines() if plan.units[0].id in line)
    assert first.endswith("[to train]"), first
    (udir / "ckpt" / "group0" / "40").mkdir()
    assert store.status(udir) == "resumes from checkpoint"
