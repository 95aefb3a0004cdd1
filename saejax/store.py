"""The run directory: every on-disk layout of a run, in one place.

``OUT/units/<unit>-<key>/``: Orbax checkpoints (``ckpt/``), snapshots at stop steps
(``snapshots/step<N>-g<G>.npz``, one file per member group) and ``done.json`` (written last: a unit
either counts as finished or is resumed). The key is :func:`saejax.plan.unit_key`, so a changed
setting never reuses a finished unit. ``OUT/cells/<cell>/``: per-cell reports (``*.json``) and each
seed's SAE in the SAELens layout (``saes/seed<N>/``). ``OUT/summary.json``, ``summary.csv``,
``report.md`` and ``figures/`` come from :mod:`saejax.summary` and :mod:`saejax.figures`.
Every file is written atomically (:func:`saejax.io.atomic_write`) with the user's umask.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from saejax.errors import ConfigError
from saejax.io import read_json, save_saelens, write_json, write_npz

SNAPSHOT_FULL = ("threshold", "since_fired")


@dataclass(frozen=True)
class RunStore:
    out: Path

    # ------------------------------------------------------------------ units
    def unit_dir(self, unit_id: str, key: str) -> Path:
        return self.out / "units" / f"{unit_id}-{key[:10]}"

    def done(self, udir: Path) -> list[dict] | None:
        """The finished unit's cell records, or None."""
        path = udir / "done.json"
        if not path.is_file():
            return None
        try:
            return read_json(path)["cells"]
        except (ValueError, KeyError):
            raise ConfigError(f"{path} is corrupt; delete that unit directory (or use --fresh) to retrain it") from None

    def finish(self, udir: Path, records: list[dict]) -> None:
        write_json(udir / "done.json", {"cells": records})
        shutil.rmtree(udir / "ckpt", ignore_errors=True)  # finished: the checkpoint is no longer needed
        shutil.rmtree(udir / "snapshots", ignore_errors=True)

    def status(self, udir: Path) -> str:
        if (udir / "done.json").is_file():
            return "done"
        # a finished Orbax save is ckpt/group<G>/<step>/; an unfinished one is <step>.orbax-checkpoint-tmp[-<time>]
        if any(p.name.isdigit() and p.is_dir() for p in (udir / "ckpt").glob("group*/*")):
            return "resumes from checkpoint"
        return "to train"

    # ------------------------------------------------------------------ snapshots
    def save_snapshot(self, udir: Path, group: int, step: int, state, full: bool) -> None:
        """The state of one member group at ``step``: all parameters when ``full`` (a training
        length's end), else only the decoders (for the stability dynamics)."""
        path = udir / "snapshots" / f"step{step}-g{group}.npz"
        if path.exists():
            return
        arrays = {f"params/{k}": v for k, v in state.params.items()} if full else {"params/W_dec": state.params["W_dec"]}
        if full:
            arrays.update({k: getattr(state, k) for k in SNAPSHOT_FULL})
        write_npz(path, **arrays)

    def load_snapshot(self, udir: Path, step: int) -> dict:
        """``{"params": {...}, "threshold": ..., "since_fired": ...}`` stacked over groups."""
        parts = sorted((udir / "snapshots").glob(f"step{step}-g*.npz"), key=lambda p: int(p.stem.split("-g")[1]))
        if not parts:
            raise ConfigError(f"snapshot of step {step} missing in {udir}; delete that directory to retrain the unit")
        loaded = [dict(np.load(p)) for p in parts]
        cat = {k: np.concatenate([d[k] for d in loaded]) for k in loaded[0]}
        out: dict = {"params": {k.split("/", 1)[1]: v for k, v in cat.items() if k.startswith("params/")}}
        out.update({k: v for k, v in cat.items() if not k.startswith("params/")})
        return out

    # ------------------------------------------------------------------ cells
    def cell_dir(self, cell_id: str) -> Path:
        return self.out / "cells" / cell_id

    def write_cell(self, cell_id: str, name: str, obj) -> Path:
        return write_json(self.cell_dir(cell_id) / f"{name}.json", obj)

    def export_saes(self, cell_id: str, cfg, raw: dict, thresholds, seeds, metadata: dict) -> None:
        """Each seed's SAE in the SAELens layout (raw activation units)."""
        for i, seed in enumerate(seeds):
            save_saelens(self.cell_dir(cell_id) / "saes" / f"seed{seed}", cfg, {k: np.asarray(v[i]) for k, v in raw.items()},
                         threshold=float(thresholds[i]), metadata={"seed": seed, **metadata})

    # ------------------------------------------------------------------ the run
    @contextmanager
    def lock(self, wait: bool = False):
        """Hold ``OUT/.lock`` (pid, host, start time) for the run; a second run on the same
        directory gets a one-line error naming the holder (or waits with ``wait``). A lock left by
        a process that no longer runs on this host is taken over."""
        path = self.out / ".lock"
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        while True:
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                break
            except FileExistsError:
                holder = _read_lock(path)
                if holder is not None and not _alive(holder):
                    path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                if not wait:
                    who = "another run" if holder is None else \
                        f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"
                    raise ConfigError(f"output directory {str(self.out)!r} is in use by {who}; "
                                      "wait for it, pass --wait, or choose another --out") from None
                time.sleep(1.0)
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        try:
            yield
        finally:
            path.unlink(missing_ok=True)

    def clear(self) -> None:
        """``--fresh``: forget every earlier result of this run directory."""
        for sub in ("units", "cells", "figures"):
            shutil.rmtree(self.out / sub, ignore_errors=True)

    def remove_partial_writes(self) -> None:
        for tmp in self.out.rglob(".*.tmp"):  # left by a run killed mid-write; never read
            tmp.unlink(missing_ok=True)


def _read_lock(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _alive(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return True  # cannot tell for another host: assume it runs
    try:
        os.kill(int(holder["pid"]), 0)
    except (ProcessLookupError, ValueError, KeyError, TypeError):
        return False
    except PermissionError:
        return True
    return True
