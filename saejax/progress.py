"""Run-level progress: one line per stage with the elapsed time and an ETA for the whole run,
and at the end where the time went.

The ETA weighs each unit by its work, ``members x steps x batch x d_sae x d_in`` (what a dense
step costs), at the seconds per unit of work measured on the units already trained of the same
architecture where there are some (a TopK step costs far more than a ReLU step of the same work
on a CPU: the top-k), of any architecture before; before the first unit finishes it says so
instead of guessing. The runner trains the architectures in turn (:func:`run_order`) so that each
is measured early.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np


def _fmt(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _arch(unit) -> str | None:
    return getattr(unit.sae, "arch", None)


def run_order(units) -> list[int]:
    """Indices of ``units`` in training order: the architectures in turn, each in its plan order
    (topk, relu, topk, relu, ...), so the ETA has measured every architecture after a few units."""
    by_arch: dict = {}
    for i, u in enumerate(units):
        by_arch.setdefault(_arch(u), []).append(i)
    queues = list(by_arch.values())
    return [q[j] for j in range(max(map(len, queues), default=0)) for q in queues if j < len(q)]


def work(unit) -> float:
    return float(unit.n_members) * unit.total * unit.train.batch_size * unit.sae.d_sae * unit.sae.d_in


@dataclass
class RunClock:
    units: tuple
    t0: float = field(default_factory=time.perf_counter)
    stages: list = field(default_factory=list)
    measured: list = field(default_factory=list)  # (work, seconds, steady seconds or None, arch) per unit trained

    def stage(self, name: str, seconds: float) -> None:
        self.stages.append((name, seconds))

    def seconds_for(self, w: float, arch: str | None = None) -> float:
        """Predicted seconds of a unit of work ``w``, so that a unit's fixed cost (compilation,
        analyses) is not scaled by its size: where the trainer measured its steady time per step,
        the mean fixed cost (unit time minus steady training time) plus ``w`` at the measured
        steady seconds per unit of work; else ``a + b w`` fitted by least squares to the units
        trained so far, proportional to work with one size only or where the fit gives a negative term.
        Only units of ``arch`` count where one has been measured."""
        measured = [m for m in self.measured if m[3] == arch] or self.measured
        steady = [m for m in measured if m[2] is not None]
        if steady:
            rate = sum(m[2] for m in steady) / max(sum(m[0] for m in steady), 1e-30)
            return float(np.mean([max(m[1] - m[2], 0.0) for m in steady]) + rate * w)
        ws = np.array([m[0] for m in measured])
        ts = np.array([m[1] for m in measured])
        if len(set(ws.tolist())) >= 2:
            b, a = np.polyfit(ws, ts, 1)
            if b >= 0 and a >= 0:
                return float(a + b * w)
        return float(w * ts.sum() / ws.sum())

    def eta(self, remaining_units) -> str:
        if not self.measured:
            return "ETA after the first unit"
        return f"ETA {_fmt(sum(self.seconds_for(work(u), _arch(u)) for u in remaining_units))}"

    def unit_done(self, unit, seconds: float, trained: bool, steady: float | None = None) -> None:
        """``steady``: the unit's training seconds net of compilation (``TrainResult.steady_seconds``)."""
        self.stage(unit.id, seconds)
        if trained:
            self.measured.append((work(unit), seconds, steady, _arch(unit)))

    def line(self, i: int, unit) -> str:
        elapsed = time.perf_counter() - self.t0
        return f"[{i}/{len(self.units)}] {unit.id}  (elapsed {_fmt(elapsed)}, {self.eta(self.units[i - 1:])})"

    def summary(self) -> str:
        total = time.perf_counter() - self.t0
        parts = sorted(self.stages, key=lambda s: -s[1])[:6]
        return f"time: {_fmt(total)} in all; " + ", ".join(f"{n} {_fmt(s)}" for n, s in parts)


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
        eta = f", ETA {_fmt((self.total - self.n) / rate)}" if rate > 0 and self.n < self.total else ""
        post = f", {self.post}" if self.post else ""
        print(f"  {self.desc}: {self.n:,}/{self.total:,} {self.unit} ({rate:,.1f} {self.unit}/s, "
              f"elapsed {_fmt(now - self.t0)}{eta}{post})", file=self.stream, flush=True)

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
