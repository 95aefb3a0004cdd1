"""Mid-training checkpoints with Orbax, so a killed run resumes where it stopped.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a kill
during a save leaves the previous checkpoint as the latest valid one. The last two are kept, and
a restore falls back to the older one when the newer cannot be read (a truncated file after a
kill or a full disk); when none can, one line names the directory to delete.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np

from saejax.errors import ConfigError


class Checkpointer:
    """Saves ``(step, state, history, log_steps)`` per member group every ``every`` steps; in a
    multi-process run, on process 0 only."""

    def __init__(self, directory: str | Path, every: int):
        self.directory = Path(directory).absolute()
        self.every = int(every)
        self._managers = {}

    def _manager(self, group: int):
        import orbax.checkpoint as ocp

        if group not in self._managers:
            # process 0 alone reads and writes checkpoints (the others get its state from
            # saejax.train), so Orbax's barriers must not wait for the other processes
            solo = ocp.options.MultiprocessingOptions(primary_host=0, active_processes={0})
            opts = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False,
                                                multiprocessing_options=solo if jax.process_count() > 1 else
                                                ocp.options.MultiprocessingOptions())
            if jax.process_count() > 1:  # Orbax does not create it with active_processes set
                opts = dataclasses.replace(opts, create=False)
                (self.directory / f"group{group}").mkdir(parents=True, exist_ok=True)
            self._managers[group] = ocp.CheckpointManager(self.directory / f"group{group}", options=opts)
        return self._managers[group]

    def save(self, group: int, step: int, state, history: dict, log_steps: np.ndarray) -> None:
        import orbax.checkpoint as ocp

        if jax.process_index() != 0:
            return
        logs = {"history": history, "log_steps": np.asarray(log_steps)}
        mngr = self._manager(group)
        mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                logs=ocp.args.StandardSave(logs)))
        mngr.wait_until_finished()

    def restore(self, group: int, like_state):
        """``(step, state, history, log_steps)`` of the latest save, or None."""
        import orbax.checkpoint as ocp

        if jax.process_index() != 0 or not (self.directory / f"group{group}").exists():
            return None
        mngr = self._manager(group)
        steps = sorted(mngr.all_steps(), reverse=True)
        if not steps:
            return None
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), like_state)
        for step in steps:  # the newest that reads back: a kill or a full disk may have broken one
            try:
                out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                 logs=ocp.args.StandardRestore()))
            except Exception as e:  # corrupt or truncated: fall back to the previous save
                print(f"warning: checkpoint {self.directory / f'group{group}' / str(step)} is unreadable "
                      f"({type(e).__name__}); trying an older one")
                continue
            logs = jax.tree.map(np.asarray, out["logs"])
            return int(step), out["state"], logs["history"], logs["log_steps"]
        raise ConfigError(f"no checkpoint in {self.directory} can be read (all {len(steps)} are corrupt); "
                          "delete that directory to retrain this unit from the start")

    def close(self) -> None:
        for m in self._managers.values():
            m.close()
        self._managers.clear()
