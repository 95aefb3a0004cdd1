"""Run-level progress: one line per stage with the elapsed time and an ETA for the whole run,
and at the end where the time went.

A unit's seconds are predicted in three parts, each from what the units already trained measured:
compilation and setup (its training time net of the steady time, averaged over the units of its
architecture), steady training (a line ``a + b * work`` through the units of its architecture,
``work = members x steps x batch x d_sae x d_in``), and analyses (seconds per cell, a line in
``d_sae`` through every unit). While one size only is measured, a line through it with a prior
intercept (:data:`STEADY_OFFSET_D_SAE`, :data:`ANALYSIS_OFFSET_D_SAE`): much of a step and of an
analysis does not grow with the width. Rates are per architecture because a TopK step costs
several ReLU steps of the same work on a CPU. The runner trains, for each architecture in turn,
its largest unit, then its smallest, then the rest (:func:`run_order`), so the line is anchored
at both ends after a few units and nothing is extrapolated far upwards. The report at the end is
estimated per cell (:data:`REPORT_S_PER_CELL`). Before the first unit finishes the line says so
instead of guessing.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

REPORT_S_PER_CELL = 1.0
"""Seconds of the final report (summary, contrasts, figures, explorer) per cell, measured on the
default grid (16 cells on a 2-core CPU: 19 s on a first run, 4 s when the explorer's pages are
already written)."""


def fmt(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _arch(unit) -> str | None:
    return getattr(unit.sae, "arch", None)


def _cells(unit) -> int:
    return max(len(getattr(unit, "cells", ())), 1)


def run_order(units) -> list[int]:
    """Indices of ``units`` in training order: the architectures in turn, each giving its largest
    unit (by :func:`work`), then its smallest, then the rest in plan order, so the ETA has every
    architecture's cost at both ends of the sizes after a few units."""
    by_arch: dict = {}
    for i, u in enumerate(units):
        by_arch.setdefault(_arch(u), []).append(i)
    queues = []
    for q in by_arch.values():
        big = max(q, key=lambda i: work(units[i]))
        small = min((i for i in q if i != big), key=lambda i: work(units[i]), default=None)
        first = [big] + ([small] if small is not None else [])
        queues.append(first + [i for i in q if i not in first])
    return [q[j] for j in range(max(map(len, queues), default=0)) for q in queues if j < len(q)]


def work(unit) -> float:
    return float(unit.n_members) * unit.total * unit.train.batch_size * unit.sae.d_sae * unit.sae.d_in


def _line(xs, ys, x: float, offset: float = 0.0) -> float:
    """``y`` at ``x`` on the least-squares line through the points where it has no negative term and
    there are two sizes or more; else in proportion to ``x + offset`` (one size: a line through it
    whose intercept is ``offset`` times its slope)."""
    xs, ys = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
    if len(set(xs.tolist())) >= 2:
        b, a = np.polyfit(xs, ys, 1)
        if b >= 0 and a >= 0:
            return float(a + b * x)
    return float((x + offset) * ys.sum() / max(xs.sum() + offset * len(xs), 1e-30))


STEADY_OFFSET_D_SAE = 256
"""Until a second size of an architecture is measured, its steady step time is taken to grow like
``d_sae + 256`` (not like ``d_sae``: a step has costs that do not grow with the width). Measured on
the default grid (2-core CPU): TopK steps cost about ``30 s + 0.036 s x d_sae`` per unit, ReLU
steps ``8 s + 0.055 s x d_sae``."""
ANALYSIS_OFFSET_D_SAE = 600
"""Likewise, until a second width is measured, analyses per cell grow like ``d_sae + 600``
(default grid: about ``14 s + 0.022 s x d_sae`` per cell)."""


@dataclass(frozen=True)
class Measured:
    unit: str
    arch: str | None
    work: float
    d_sae: int
    cells: int
    trained: bool  # trained in this run (else found finished: not a measurement)
    seconds: float  # the whole unit
    steady_seconds: float | None = None  # its training at the steady rate (net of compilation)
    train_seconds: float | None = None  # from its start to the end of its training (the rest is analyses)


@dataclass
class RunClock:
    units: tuple
    t0: float = field(default_factory=time.perf_counter)
    stages: list = field(default_factory=list)
    done: list = field(default_factory=list)  # a :class:`Measured` per unit, trained or found finished

    @property
    def measured(self) -> list:
        return [m for m in self.done if m.trained]

    def stage(self, name: str, seconds: float) -> None:
        self.stages.append((name, seconds))

    def predict(self, unit) -> float:
        """Predicted seconds of ``unit`` (see the module docstring)."""
        measured = self.measured
        ms = [m for m in measured if m.arch == _arch(unit)] or measured
        split = [m for m in ms if m.steady_seconds is not None and m.train_seconds is not None]
        if not split:  # only whole-unit times: a line in work through them
            return _line([m.work for m in ms], [m.seconds for m in ms], work(unit))
        setup = float(np.mean([max(m.train_seconds - m.steady_seconds, 0.0) for m in split]))
        # work per latent of the unit: the steady time's offset is STEADY_OFFSET_D_SAE latents' worth
        steady = _line([m.work for m in split], [m.steady_seconds for m in split], work(unit),
                       offset=STEADY_OFFSET_D_SAE * work(unit) / unit.sae.d_sae)
        every = [m for m in measured if m.train_seconds is not None]
        per_cell = _line([m.d_sae for m in every], [max(m.seconds - m.train_seconds, 0.0) / m.cells for m in every],
                         unit.sae.d_sae, offset=ANALYSIS_OFFSET_D_SAE)
        return setup + steady + per_cell * _cells(unit)

    def remaining(self, units) -> float:
        """Seconds left for ``units`` and the report."""
        return sum(self.predict(u) for u in units) + REPORT_S_PER_CELL * sum(_cells(u) for u in self.units)

    def eta(self, remaining_units) -> str:
        if not self.measured:
            return "ETA after the first unit"
        return f"ETA {fmt(self.remaining(remaining_units))}"

    def unit_done(self, unit, seconds: float, trained: bool, steady: float | None = None,
                  train_seconds: float | None = None) -> None:
        """``steady``: the unit's training seconds net of compilation (``TrainResult.steady_seconds``);
        ``train_seconds``: from the unit's start to the end of its training (the rest is analyses)."""
        self.stage(unit.id, seconds)
        self.done.append(Measured(unit.id, _arch(unit), work(unit), unit.sae.d_sae, _cells(unit), trained, seconds,
                                  steady, train_seconds))

    def line(self, i: int, unit) -> str:
        elapsed = time.perf_counter() - self.t0
        return f"[{i}/{len(self.units)}] {unit.id}  (elapsed {fmt(elapsed)}, {self.eta(self.units[i - 1:])})"

    def to_dict(self) -> dict:
        """Where the time went: every stage, and per unit its training (steady and in all) and analyses."""
        return {"seconds": time.perf_counter() - self.t0, "stages": [{"name": n, "seconds": t} for n, t in self.stages],
                "units": [asdict(m) for m in self.done]}

    def summary(self) -> str:
        total = time.perf_counter() - self.t0
        parts = sorted(self.stages, key=lambda s: -s[1])[:6]
        return f"time: {fmt(total)} in all; " + ", ".join(f"{n} {fmt(s)}" for n, s in parts)


class _Plain:
    """What a bar says, as one plain line every ``every`` seconds (and at the end): for logs, CI and
    notebooks, where a carriage-return bar turns into thousands of fragments."""

    def __init__(self, total: int, desc: str, unit: str, initial: int, every: float, stream):
        self.total, self.desc, self.unit, self.n, self.every, self.stream = total, desc, unit, initial, every, stream
        self.t0 = self.last = time.perf_counter()
        self.n0, self.post = initial, ""

    def update(self, n: int) -> None:
        self.n += n
        if time.perf_counter() - self.last >= self.every:
            self._line()

    def set_postfix(self, **kw) -> None:
        self.post = ", ".join(f"{k}={v}" for k, v in kw.items())

    def _line(self) -> None:
        self.last = now = time.perf_counter()
        rate = (self.n - self.n0) / max(now - self.t0, 1e-9)
        eta = f", ETA {fmt((self.total - self.n) / rate)}" if rate > 0 and self.n < self.total else ""
        post = f", {self.post}" if self.post else ""
        print(f"  {self.desc}: {self.n:,}/{self.total:,} {self.unit} ({rate:,.1f} {self.unit}/s, "
              f"elapsed {fmt(now - self.t0)}{eta}{post})", file=self.stream, flush=True)

    def close(self) -> None:
        if self.n > self.n0:
            self._line()


class _Ticking:
    """A tqdm bar redrawn every second by a daemon thread, so its elapsed time and rate move even
    while one long compiled call (or its compilation) runs."""

    def __init__(self, bar, interval: float = 1.0):
        import threading

        self.bar, self._stop = bar, threading.Event()
        self._thread = threading.Thread(target=self._tick, args=(interval,), daemon=True)
        self._thread.start()

    def _tick(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.bar.refresh()

    def update(self, n: int) -> None:
        self.bar.update(n)

    def set_postfix(self, **kw) -> None:
        self.bar.set_postfix(**kw)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.bar.close()


class _Off:
    def update(self, n: int) -> None: ...
    def set_postfix(self, **kw) -> None: ...
    def close(self) -> None: ...


def bar(total: int, desc: str, *, unit: str = "step", enabled: bool = True, initial: int = 0,
        leave: bool = False, every: float = 15.0, stream=None):
    """A progress display with ``update(n)``, ``set_postfix(**kw)`` and ``close()``: a live tqdm bar
    in a terminal, plain periodic lines (every ``every`` s) anywhere else, nothing when disabled."""
    import sys

    stream = stream or sys.stderr
    if not enabled:
        return _Off()
    if not (hasattr(stream, "isatty") and stream.isatty()):
        return _Plain(total, desc, unit, initial, every, stream)
    from tqdm import tqdm

    return _Ticking(tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave, dynamic_ncols=True,
                         unit_scale=unit != "step", file=stream))
