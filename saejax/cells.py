"""Running one unit of an experiment grid: train, snapshot, evaluate, measure, export.

Everything a unit writes lives in ``OUT/units/<unit>/`` (checkpoints, snapshots, ``done.json``)
and ``OUT/cells/<cell>/`` (stability report, histories, SAEs in the SAELens layout). Files are
written atomically and ``done.json`` last, so a unit either counts as finished or is resumed from
its Orbax checkpoint; re-running a finished unit only reads ``done.json``.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from saejax import sae, sharding, stability
from saejax.checkpoint import Checkpointer
from saejax.experiment import Experiment, Modular, Unit
from saejax.io import read_json, save_saelens, write_json, write_npz
from saejax.train import evaluate, train

SNAPSHOT_KEYS = ("params", "threshold", "since_fired")


def unit_steps(exp: Experiment, unit: Unit, n_tokens: int | None) -> list[int]:
    """Optimiser steps of each training length of the unit."""
    return [exp.train_config(length).total_steps(n_tokens) for length in unit.lengths]


def dynamics_steps(exp: Experiment, total: int) -> list[int]:
    """Evenly spaced steps (0 and the end included) at which cross-seed PWMCC is measured."""
    if exp.dynamics <= 0:
        return []
    return sorted({int(round(v)) for v in np.linspace(0, total, exp.dynamics)})


def random_control(cfg, seeds, d_in: int, root_seed: int) -> dict:
    """Untrained, randomly initialised SAEs of the same shape (the empirical chance level)."""
    keys = jnp.stack([jax.random.fold_in(jax.random.PRNGKey(root_seed + 1_000_003), s) for s in seeds])
    params = jax.vmap(lambda k: sae.init(cfg, k, jnp.zeros(d_in, jnp.float32)))(keys)
    return {"decoders": np.asarray(params["W_dec"]), "encoders": np.asarray(params["W_enc"]).transpose(0, 2, 1)}


def run_unit(exp: Experiment, unit: Unit, source, out: Path, *, progress: bool = True, log=print) -> list[dict]:
    """Train ``unit`` (or resume it) and return one summary record per cell."""
    udir = out / "units" / unit.id
    if (udir / "done.json").exists():
        return read_json(udir / "done.json")["cells"]
    steps = unit_steps(exp, unit, source.n_tokens)
    total = max(steps)
    dyn = dynamics_steps(exp, total)
    snap_dir = udir / "snapshots"

    def on_stop(group: int, step: int, state) -> None:
        path = snap_dir / f"step{step}-g{group}.npz"
        if path.exists():
            return
        if step in steps:
            flat = {f"params/{k}": v for k, v in state.params.items()}
            write_npz(path, threshold=state.threshold, since_fired=state.since_fired, **flat)
        else:
            write_npz(path, **{"params/W_dec": state.params["W_dec"]})

    tc = exp.train_config(unit.lengths[steps.index(total)])
    ckpt = Checkpointer(udir / "ckpt", exp.checkpoint_every)
    result = train(unit.sae, tc, source, exp.seeds, sweep=unit.sweep, progress=progress,
                   stops=sorted(set(dyn) | set(steps)), on_stop=on_stop, checkpoint=ckpt)
    ckpt.close()
    heldout = np.asarray(source.heldout()[: exp.heldout_tokens], np.float32)
    rand = random_control(unit.sae, exp.seeds, unit.sae.d_in, tc.root_seed)
    eff_rank = stability.effective_rank(heldout[:4096])
    records = []
    n = len(exp.seeds)
    for h, coef in enumerate(unit.coefs):
        for length, step in zip(unit.lengths, steps):
            view = result.select(h)
            if step != total:
                snap = _load_snapshot(snap_dir, step)
                view = dataclasses.replace(view, params={k: v[h * n:(h + 1) * n] for k, v in snap["params"].items()},
                                           threshold=snap["threshold"][h * n:(h + 1) * n])
            cell = unit.cell_id(coef, length)
            records.append(_analyse_cell(exp, unit, cell, coef, length, step, view, heldout, source, rand,
                                         eff_rank, _dynamics(snap_dir, sorted(set(dyn) | set(steps)), step, h, n), out))
            log(_headline(records[-1]))
    write_json(udir / "done.json", {"cells": records})
    shutil.rmtree(udir / "ckpt", ignore_errors=True)  # finished: the checkpoint is no longer needed
    return records


def _load_snapshot(snap_dir: Path, step: int) -> dict:
    parts = sorted(snap_dir.glob(f"step{step}-g*.npz"), key=lambda p: int(p.stem.split("-g")[1]))
    loaded = [dict(np.load(p)) for p in parts]
    cat = {k: np.concatenate([d[k] for d in loaded]) for k in loaded[0]}
    out = {"params": {k.split("/", 1)[1]: v for k, v in cat.items() if k.startswith("params/")}}
    out.update({k: v for k, v in cat.items() if not k.startswith("params/")})
    return out


def _dynamics(snap_dir: Path, dyn: list[int], upto: int, h: int, n: int) -> list[dict]:
    """Cross-seed PWMCC at each snapshot step up to ``upto`` (training dynamics)."""
    rows = []
    for step in dyn:
        if step > upto:
            break
        dec = _load_snapshot(snap_dir, step)["params"]["W_dec"][h * n:(h + 1) * n]
        pairs = [(i, j) for i in range(len(dec)) for j in range(i + 1, len(dec))]
        rows.append({"step": step, "pwmcc": float(np.mean([stability.pwmcc(dec[i], dec[j]) for i, j in pairs]))})
    return rows


def _analyse_cell(exp, unit, cell, coef, length, step, view, heldout, source, rand, eff_rank, dynamics, out):
    ev = evaluate(view, heldout, keep_latents=True)
    dec, enc = view.decoders(), view.encoders()
    measure = sharding.stability_report_sharded if jax.device_count() > 1 else stability.stability_report
    report = measure(
        dec, enc, alive=ev["alive"], latents=ev["latents"], true_dictionary=source.true_dictionary,
        seeds=list(exp.seeds), random_control=rand["decoders"])
    cdir = out / "cells" / cell
    write_json(cdir / "report.json", report.to_dict())
    # matched |cos| of the first seed pair, trained and random control, for the histogram figure
    write_json(cdir / "matched.json", {
        "seeds": list(exp.seeds[:2]),
        "trained": stability.match(dec[0], dec[1]).abs_cos,
        "random": stability.match(rand["decoders"][0], rand["decoders"][1]).abs_cos})
    at = int(np.searchsorted(view.log_steps, step, side="right"))
    write_json(cdir / "history.json", {"step": view.log_steps[:at], **{k: v[:, :at] for k, v in view.history.items()},
                                       "dynamics": dynamics, "seeds": list(exp.seeds)})
    raw = view.raw_params()
    for i, seed in enumerate(exp.seeds):
        save_saelens(cdir / "saes" / f"seed{seed}", unit.sae, {k: np.asarray(v[i]) for k, v in raw.items()},
                     threshold=float(view.threshold[i]), metadata={"seed": seed, "cell": cell, "step": step,
                                                                  "source": exp.source.describe()})
    last = at - 1
    record = {
        "cell": cell, "arch": unit.sae.arch, "d_sae": unit.sae.d_sae, "d_in": unit.sae.d_in,
        "k": unit.sae.k if unit.sae.arch in ("topk", "batchtopk") else None,
        "sparsity_coef": coef, exp.length_unit: length, "steps": step, "n_seeds": len(exp.seeds),
        **report.summary,
        "effective_rank_pr": eff_rank["participation_ratio"], "effective_rank_entropy": eff_rank["entropy_rank"],
        "explained_variance": float(np.mean(ev["ev"])), "mse": float(np.mean(ev["mse"])),
        "l0": float(np.mean(ev["l0"])), "dead_fraction": float(np.mean(ev["dead_frac"])),
        "train_fvu": float(np.mean(view.history["fvu"][:, last])) if last >= 0 else None,
        "failed_seeds": [exp.seeds[m] for m in view.failed],
    }
    if dynamics:
        record["pwmcc_at_start"] = dynamics[0]["pwmcc"]
    wanted = tuple(a for a in exp.analyses if a in ("splice", "probe"))
    if wanted and isinstance(exp.source, Modular):
        from saejax.downstream import modular_downstream

        cols, down = modular_downstream(exp.source, unit.sae, raw, view.threshold, list(exp.seeds), analyses=wanted)
        write_json(cdir / "downstream.json", down)
        record.update(cols)
    write_json(cdir / "cell.json", record)
    return record


def _headline(r: dict) -> str:
    return (f"  {r['cell']:<28} PWMCC {r['pwmcc']:.3f} [{r['pwmcc_ci_low']:.3f}, {r['pwmcc_ci_high']:.3f}]"
            f"  random {r['random_pwmcc']:.3f}  ratio {r['pwmcc_ratio']:.2f}x  Hungarian {r['hungarian_mean']:.3f}"
            f"  EV {r['explained_variance']:.3f}  L0 {r['l0']:.1f}  dead {r['dead_fraction']:.2f}")
