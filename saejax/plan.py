"""Resolving an :class:`~saejax.experiment.Experiment` into its :class:`~saejax.experiment.Plan`.

The one place where the grid becomes units: SAE configs, train configs, steps per length,
snapshot and dynamics steps, cell ids, the member layout and the memory estimate (the trainer's
own :func:`saejax.train.member_bytes`). Each unit also gets a key, a fingerprint of everything
that shapes its results, so a re-run with any changed setting never reuses old numbers.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from saejax import archs
from saejax.config import SAEConfig
from saejax.data import SourcePlan
from saejax.errors import ConfigError
from saejax.experiment import Cell, Experiment, Plan, Recipe, Unit

PLAN_VERSION = 1  # bump when a change alters a unit's results: old finished units then miss


def dynamics_steps(n: int, total: int) -> tuple[int, ...]:
    """``n`` evenly spaced steps (0 and the end included) at which cross-seed PWMCC is measured."""
    if n <= 0:
        return ()
    return tuple(sorted({int(round(v)) for v in np.linspace(0, total, n)}))


def resolve(exp: Experiment, source: SourcePlan) -> Plan:
    shares = exp.train.get("decay", "constant") == "constant"
    groups = [tuple(sorted(exp.lengths))] if shares else [(v,) for v in sorted(exp.lengths)]
    units = []
    for recipe in exp.recipes or [Recipe(name, name) for name in exp.archs]:
        arch = archs.get(recipe.arch)
        for width in exp.widths:
            for k in (exp.ks if arch.uses_k else (None,)):
                kw = {**exp.sae, **recipe.sae, "d_in": source.d_in, "d_sae": width, "arch": recipe.arch}
                if k is not None:
                    kw["k"] = k
                try:
                    cfg = SAEConfig(**kw)
                except ConfigError as e:
                    raise ConfigError(f"cell {recipe.name} d_sae={width}: {e}") from None
                units += [_unit(exp, cfg, lengths, source.n_tokens, recipe if exp.recipes else None)
                          for lengths in groups]
    from saejax.contrasts import check_plan

    check_plan(exp.contrasts, [cell_config(exp, u, c) for u in units for c in u.cells])
    return Plan(exp, source, tuple(units))


def cell_config(exp: Experiment, unit: Unit, cell: Cell) -> dict:
    """The config columns of a cell's record (``summary.json``), known before it trains."""
    return {"cell": cell.id, **({"source": exp.variant} if exp.variant else {}),
            **({"recipe": unit.recipe} if unit.recipe else {}), "arch": unit.sae.arch,
            "d_sae": unit.sae.d_sae, "d_in": unit.sae.d_in, "k": unit.sae.k if archs.get(unit.sae.arch).uses_k else None,
            "sparsity_coef": cell.coef, **({"lr": cell.lr} if cell.lr is not None else {}),
            exp.length_unit: cell.length, "steps": cell.step}


def _unit(exp: Experiment, cfg: SAEConfig, lengths: tuple, n_tokens: int | None, recipe: Recipe | None = None) -> Unit:
    from saejax.train import member_bytes

    arch = archs.get(cfg.arch)
    coefs = tuple(getattr(exp, f"{arch.coef}s")) if arch.coef else (None,)
    lrs = exp.lrs or (None,)
    sweep = {**({arch.coef: list(coefs)} if arch.coef else {}), **({"lr": list(exp.lrs)} if exp.lrs else {})}
    steps = [exp.train_config(v, recipe).total_steps(n_tokens) for v in lengths]
    total = max(steps)
    tc = exp.train_config(lengths[steps.index(total)], recipe)
    dyn = dynamics_steps(exp.dynamics, total)
    base = (f"{exp.variant}." if exp.variant else "") + f"{recipe.name if recipe else cfg.arch}-w{cfg.d_sae}" + (
        f"-k{cfg.k}" if arch.uses_k else "")
    cells = []
    for h, (coef, lr) in enumerate(itertools.product(coefs, lrs)):  # sweep_grid's order: coef-major
        name = base + (f"-{arch.coef.split('_')[0]}_{coef:g}" if arch.coef and coef is not None else "")
        name += f"-lr{lr:g}" if lr is not None else ""
        cells += [Cell(f"{name}-len{v:g}", h, coef, lr, v, s) for v, s in zip(lengths, steps)]
    uid = base + (f"-len{lengths[0]:g}" if len(lengths) == 1 else "")  # lengths is never empty
    n_members = len(exp.seeds) * len(coefs) * len(lrs)
    return Unit(uid, cfg, tc, sweep or None, tuple(cells), total, tuple(sorted(set(dyn) | set(steps))), dyn,
                n_members, member_bytes(cfg, tc), recipe.name if recipe else None)


def unit_key(exp: Experiment, unit: Unit) -> str:
    """Fingerprint of everything that shapes a unit's results (source, configs, seeds, sweep,
    snapshot steps, analyses): finished units and checkpoints are stored under it."""
    from saejax.cache import fingerprint_key

    return fingerprint_key({
        "version": PLAN_VERSION, "source": repr(exp.source), **_source_fingerprint(exp.source),
        "sae": dataclasses.asdict(unit.sae),
        "train": dataclasses.asdict(unit.train), "sweep": unit.sweep, "seeds": list(exp.seeds),
        "stops": list(unit.stops), "cells": [dataclasses.asdict(c) for c in unit.cells],
        "heldout_tokens": exp.heldout_tokens, "analyses": list(exp.analyses)})


def _source_fingerprint(spec) -> dict:
    """What the spec's ``fingerprint()`` adds to its repr (e.g. the embedded model's config key,
    which changes with code defaults the repr does not show)."""
    fp = getattr(spec, "fingerprint", None)
    return {"source_fingerprint": fp()} if callable(fp) else {}
