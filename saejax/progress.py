"""Run-level progress: one line per stage with the elapsed time and an ETA for the whole run,
and at the end where the time went.

The ETA weighs each unit by its work, ``members x steps x batch x d_sae x d_in`` (what a dense
step costs), at the seconds per unit of work measured on the units already trained; before the
first one finishes it says so instead of guessing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


def _fmt(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def work(unit) -> float:
    return float(unit.n_members) * unit.total * unit.train.batch_size * unit.sae.d_sae * unit.sae.d_in


@dataclass
class RunClock:
    units: tuple
    t0: float = field(default_factory=time.perf_counter)
    stages: list = field(default_factory=list)
    done_work: float = 0.0
    train_seconds: float = 0.0

    def stage(self, name: str, seconds: float) -> None:
        self.stages.append((name, seconds))

    def eta(self, remaining_units) -> str:
        if self.done_work == 0:
            return "ETA after the first unit"
        left = sum(work(u) for u in remaining_units) * self.train_seconds / self.done_work
        return f"ETA {_fmt(left)}"

    def unit_done(self, unit, seconds: float, trained: bool) -> None:
        self.stage(unit.id, seconds)
        if trained:
            self.done_work += work(unit)
            self.train_seconds += seconds

    def line(self, i: int, unit) -> str:
        elapsed = time.perf_counter() - self.t0
        return f"[{i}/{len(self.units)}] {unit.id}  (elapsed {_fmt(elapsed)}, {self.eta(self.units[i - 1:])})"

    def summary(self) -> str:
        total = time.perf_counter() - self.t0
        parts = sorted(self.stages, key=lambda s: -s[1])[:6]
        return f"time: {_fmt(total)} in all; " + ", ".join(f"{n} {_fmt(s)}" for n, s in parts)
