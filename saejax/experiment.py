"""Experiments: frozen descriptions of a grid of SAE trainings, resolved into one :class:`Plan`.

An experiment file is Python with ``get_config()`` (or a module-level ``config``) returning an
:class:`Experiment`. The grid ``archs x widths x (k | coefficient) x lrs x lengths`` expands to
*cells* (one record each in ``summary.json``). Cells that differ only in floats or training
length share one *unit*, one compiled program: swept coefficients and learning rates are a
vmapped axis and shorter lengths are exact snapshots of the longest run (valid for a constant
learning rate after warm-up; with a decaying schedule every length trains on its own).

:meth:`Experiment.plan` resolves everything once (SAE and train configs, steps, snapshot steps,
cell ids, member layout, memory) from the source's :class:`~saejax.data.SourcePlan`, which reads
configs only; the dry run, the runner and the trainer all read that plan.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from saejax import archs
from saejax.config import SAEConfig, TrainConfig, check_fields, check_seeds, closest
from saejax.contrasts import Contrast
from saejax.data import SourcePlan, SyntheticSource
from saejax.errors import ConfigError, check

Synthetic = SyntheticSource
"""Song et al. (2025)'s model organism; the spec is the source itself (:class:`saejax.data.SyntheticSource`)."""


# ----------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class Modular:
    """The embedded modular-arithmetic transformer (p = 113), trained by saejax on first use.

    ``task``: ``add``, ``mul`` or ``both``; ``layer``/``site``: where activations are read;
    ``positions``: which prompt positions become tokens (see :mod:`saejax.models.modular`);
    ``accuracy``: stop the model's training at the first evaluation with at least this held-out
    accuracy (default: the tuned 0.99), so one seed of the model at several qualities; the reached
    accuracy is the ``model_heldout_acc`` column."""

    task: str = "add"
    layer: int = 1
    site: str = "resid_post"
    positions: Any = "all"
    accuracy: float | None = None

    def __post_init__(self):
        check_fields(self)
        check(self.accuracy is None or 0 < self.accuracy <= 1,
              f"modular accuracy must be in (0, 1] (a held-out accuracy to stop training at), got {self.accuracy!r}")

    def config(self):
        """The :class:`saejax.models.modular.ModularConfig` of the model these activations come from."""
        from saejax.models.modular import default_config

        cfg = default_config(self.task)
        if self.accuracy is None:
            return cfg
        # held-out accuracy jumps from ~40% to ~100% within 50 steps (grokking): evaluated every 5 steps,
        # the stops of different targets are distinct checkpoints of one trajectory
        return dataclasses.replace(cfg, target_acc=float(self.accuracy), eval_every=5)

    def fingerprint(self) -> str:
        """The model's config key: part of every unit key, so a changed model never reuses SAEs."""
        return self.config().key

    def build(self, cache_dir=None, progress: bool = True):
        from saejax.models.modular import modular_activations

        return modular_activations(task=self.task, layer=self.layer, site=self.site, positions=self.positions,
                                   config=self.config(), cache_dir=cache_dir, progress=progress)

    def plan(self, cache_dir=None) -> SourcePlan:
        from saejax.models.modular import plan_activations

        return plan_activations(self.task, self.layer, self.site, self.positions, config=self.config(),
                                cache_dir=cache_dir)

    def columns(self, cache_dir=None) -> dict:
        """Record columns of the built source: the model's held-out accuracy."""
        from saejax.models.modular import load_or_train

        _, info = load_or_train(self.task, config=self.config(), cache_dir=cache_dir, progress=False)
        return {"model_heldout_acc": float(info["heldout_accuracy"])}

    def describe(self) -> str:
        acc = f", model trained to {self.accuracy:g} held-out accuracy" if self.accuracy is not None else ""
        return f"modular-{self.task} layer {self.layer} {self.site} ({self.positions} positions{acc})"

    def supports(self, analysis: str, cache_dir=None) -> str | None:
        return None  # splice and probe both run on the embedded model

    def downstream(self, cfg, raw_params, thresholds, seeds, *, analyses, cache_dir=None) -> tuple[dict, dict]:
        from saejax.downstream import modular_downstream

        return modular_downstream(self, cfg, raw_params, thresholds, seeds, analyses=analyses, cache_dir=cache_dir)


def _hf():
    from saejax.activations import HF

    return HF


def __getattr__(name):  # ``experiment.HF`` without importing the Hugging Face edge up front
    if name == "HF":
        return _hf()
    raise AttributeError(name)


def _is_source(obj) -> bool:
    return all(callable(getattr(obj, m, None)) for m in ("build", "plan", "describe")) and dataclasses.is_dataclass(obj)


# ----------------------------------------------------------------------------- experiment
@dataclass(frozen=True)
class Recipe:
    """A named training recipe: an architecture with its own SAE and train options, merged over
    the experiment's ``sae`` and ``train`` (e.g. ReLU-L1 with dead-latent resampling)."""

    name: str
    """Prefix of the recipe's cell ids and its series in tables and figures."""
    arch: str
    sae: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)

    def __post_init__(self):
        check(isinstance(self.name, str) and self.name.replace("_", "").replace("+", "").isalnum(),
              f"recipe name must be letters, digits, '_' or '+', got {self.name!r}")
        check_fields(self)
        archs.get(self.arch)


@dataclass(frozen=True)
class Experiment:
    """A grid of SAE trainings on one activation source and the analyses run on each cell."""

    name: str
    """Output directory name (under ``runs/`` unless ``--out`` says otherwise)."""
    source: Any = field(default_factory=SyntheticSource)
    """A source spec: :class:`Synthetic`, :class:`Modular` or ``HF`` (anything with ``build``,
    ``plan`` and ``describe``); or a dict of named specs (layers, sites, models, tasks, model
    qualities), each trained over the whole grid and analysed side by side: cell ids start with
    the name, the ``source`` column holds it, and contrasts may compare them
    (``Contrast("source", "layer0", "layer6")``)."""
    archs: tuple[str, ...] = ("topk",)
    """SAE architectures (entries of :mod:`saejax.archs`); ignored when ``recipes`` are given."""
    contrasts: tuple[Contrast, ...] = ()
    """Comparisons between cells (:class:`saejax.contrasts.Contrast`), e.g. ``Contrast("arch",
    "topk", "relu")``: a table in ``report.md`` and ``contrasts.json``; each must pair planned cells."""
    recipes: tuple[Recipe, ...] | None = None
    """Named recipes that replace ``archs``: each trains every width (and k) with its own
    architecture and options, and its cells are named after it (``experiments/recipes.py``)."""
    widths: tuple[int, ...] = (1024,)
    """Dictionary sizes ``d_sae``."""
    ks: tuple[int, ...] = (32,)
    """TopK family: latents per token."""
    l1_coefs: tuple[float, ...] = (1e-3,)
    """ReLU: L1 coefficients (swept inside one program)."""
    l0_coefs: tuple[float, ...] = (1e-3,)
    """JumpReLU: L0 coefficients (swept inside one program)."""
    lrs: tuple[float, ...] | None = None
    """Learning rates swept inside one program (``None``: ``train["lr"]``, not part of cell ids)."""
    epochs: tuple[float, ...] | None = (20.0,)
    """Training lengths in epochs over the source (finite sources); or give ``steps``."""
    steps: tuple[int, ...] | None = None
    """Training lengths in optimiser steps (set ``epochs=None``)."""
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    """Seeds trained together in each program."""
    sae: dict = field(default_factory=dict)
    """Other :class:`saejax.SAEConfig` fields, e.g. ``{"aux_k": 0, "b_dec_init": "median"}``."""
    train: dict = field(default_factory=dict)
    """:class:`saejax.TrainConfig` fields, e.g. ``{"batch_size": 512, "lr": 3e-4}``."""
    dynamics: int = 6
    """Measure cross-seed PWMCC at this many evenly spaced steps (plus every length), 0 = off."""
    checkpoint_every: int = 500
    """Orbax checkpoint interval in steps (a killed run resumes from the last one)."""
    heldout_tokens: int = 8192
    """Held-out tokens for evaluation, dead latents and activation correlations."""
    analyses: tuple[str, ...] = ("stability",)
    """Analyses run on every cell, from :data:`saejax.cells.ANALYSES`: ``stability`` always;
    ``splice`` (reconstructions spliced into the model) and ``probe`` (linear probes) where the
    source supports them (checked at plan time)."""
    variant: str | None = None
    """Set by :meth:`variants`: the name of this experiment's source among several."""

    def __post_init__(self):
        check(isinstance(self.name, str) and self.name and "/" not in self.name,
              f"experiment name must be a plain non-empty string, got {self.name!r}")
        if isinstance(self.source, dict):
            check(len(self.source) > 0, "source is an empty dict: name at least one source")
            for name, spec in self.source.items():
                check(isinstance(name, str) and name.replace("_", "").replace("-", "").isalnum(),
                      f"source names must be letters, digits, '-' or '_', got {name!r}")
                check(_is_source(spec), f"source {name!r} must be Synthetic, Modular or HF, got {type(spec).__name__}")
        else:
            check(_is_source(self.source), f"source must be Synthetic, Modular or HF (or a dict of them), "
                                           f"got {type(self.source).__name__}")
        check_fields(self)
        for a in self.archs:
            archs.get(a)
        check(self.recipes is None or (len(self.recipes) > 0 and all(isinstance(r, Recipe) for r in self.recipes)),
              f"recipes must be a non-empty tuple of saejax.experiment.Recipe, got {self.recipes!r}")
        names_ = [r.name for r in self.recipes or ()]
        check(len(set(names_)) == len(names_), f"recipe names must be unique, got {names_}")
        for name in ("archs", "widths", "seeds"):
            check(len(getattr(self, name)) > 0, f"{name} is empty: give at least one value")
        for w in self.widths:
            check(w > 0, f"impossible width d_sae={w!r}: widths must be positive integers")
        check((self.epochs is None) != (self.steps is None), "give exactly one of epochs or steps")
        check(len(self.lengths) > 0 and all(v > 0 for v in self.lengths), f"training lengths must be positive, got {self.lengths}")
        check(len(self.seeds) >= 2, f"a stability experiment needs at least 2 seeds, got {list(self.seeds)}")
        check_seeds(self.seeds)
        for name in ("l1_coefs", "l0_coefs"):
            check(len(getattr(self, name)) > 0 and all(np.isfinite(v) and v >= 0 for v in getattr(self, name)),
                  f"{name} must be finite and >= 0, got {list(getattr(self, name))}")
        check(self.lrs is None or (len(self.lrs) > 0 and all(np.isfinite(v) and v > 0 for v in self.lrs)),
              f"lrs must be finite and positive, got {self.lrs}")
        for where, sae, train in [("", self.sae, self.train)] + [
                (f"recipe {r.name}: ", r.sae, r.train) for r in self.recipes or ()]:
            try:
                _check_keys(sae, SAEConfig, "sae", skip=("d_in", "d_sae", "arch", "k", "l1_coef", "l0_coef"))
                _check_keys(train, TrainConfig, "train", skip=("steps", "epochs"))
            except ConfigError as e:
                raise ConfigError(f"{where}{e}") from None
        for recipe in self.recipes or (None,):
            for length in self.lengths:  # every TrainConfig field is validated here, before anything runs
                self.train_config(length, recipe)
        check(self.dynamics >= 0 and self.checkpoint_every > 0 and self.heldout_tokens > 0,
              f"dynamics must be >= 0, checkpoint_every and heldout_tokens positive, got "
              f"{self.dynamics}, {self.checkpoint_every}, {self.heldout_tokens}")
        from saejax.cells import ANALYSES

        for a in self.analyses:
            check(a in ANALYSES, f"unknown analysis {a!r}; expected some of {tuple(ANALYSES)}{closest(a, ANALYSES)}")

    def variants(self) -> list[Experiment]:
        """One experiment per named source (``variant`` set, contrasts left to the whole run), or
        ``[self]`` for a single source."""
        if not isinstance(self.source, dict):
            return [self]
        return [dataclasses.replace(self, source=spec, variant=name, contrasts=()) for name, spec in self.source.items()]

    def describe_source(self) -> str:
        if isinstance(self.source, dict):
            return "; ".join(f"{name}: {spec.describe()}" for name, spec in self.source.items())
        return self.source.describe()

    @property
    def lengths(self) -> tuple:
        if self.epochs is not None:
            return tuple(self.epochs)
        assert self.steps is not None  # __post_init__: exactly one of epochs, steps
        return tuple(self.steps)

    @property
    def length_unit(self) -> str:
        return "epochs" if self.epochs is not None else "steps"

    def train_config(self, length, recipe: Recipe | None = None) -> TrainConfig:
        try:
            return TrainConfig(**{**self.train, **(recipe.train if recipe else {}), self.length_unit: length})
        except ConfigError as e:
            raise ConfigError(f"{f'recipe {recipe.name}: ' if recipe else ''}train: {e}") from None

    def plan(self, source: SourcePlan) -> Plan:
        """Every unit of the grid, fully resolved (see :class:`Unit`)."""
        from saejax.plan import resolve

        return resolve(self, source)


def _check_keys(d: dict, cls, name: str, skip=()) -> None:
    check(isinstance(d, dict), f"{name} must be a dict of {cls.__name__} fields, got {type(d).__name__}")
    names = [f.name for f in dataclasses.fields(cls) if f.name not in skip]
    for key in d:
        check(key in names, f"unknown {name} option {key!r}{closest(key, names)}; valid: {', '.join(names)}")


# ----------------------------------------------------------------------------- the resolved plan
@dataclass(frozen=True)
class Cell:
    """One record of ``summary.json``: a swept point of a unit at one training length."""

    id: str
    point: int
    """Index of the unit's swept combination (members ``point * n_seeds ...``)."""
    coef: float | None
    lr: float | None
    length: float
    step: int


@dataclass(frozen=True)
class Unit:
    """One compiled training program, fully resolved."""

    id: str
    sae: SAEConfig
    train: TrainConfig
    """The configuration of the longest length (the one trained)."""
    sweep: dict | None
    """``{name: values}`` swept inside the program (:func:`saejax.train.train`'s ``sweep``)."""
    cells: tuple[Cell, ...]
    total: int
    """Steps trained."""
    stops: tuple[int, ...]
    """Steps at which the state is snapshotted: every length's step and the dynamics steps."""
    dynamics: tuple[int, ...]
    n_members: int
    member_bytes: int
    """Device bytes per member (:func:`saejax.train.member_bytes`)."""
    recipe: str | None = None
    """The :class:`Recipe` it trains, if the experiment names recipes."""

    @property
    def lengths(self) -> tuple:
        return tuple(dict.fromkeys(c.length for c in self.cells))


@dataclass(frozen=True)
class Plan:
    experiment: Experiment
    source: SourcePlan
    units: tuple[Unit, ...]

    @property
    def cells(self) -> tuple[Cell, ...]:
        return tuple(c for u in self.units for c in u.cells)


# ----------------------------------------------------------------------------- files and --set
def load(path) -> Experiment:
    """Import an experiment file and return its :class:`Experiment`."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(path)
    check(path.is_file(), f"experiment file {str(path)!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"saejax_experiment_{path.stem}", path)
    check(spec is not None and spec.loader is not None, f"experiment file {str(path)!r} is not a Python file")
    assert spec is not None and spec.loader is not None  # narrowing only: check raised otherwise
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        exp = module.get_config() if hasattr(module, "get_config") else getattr(module, "config", None)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except SyntaxError as e:
        raise ConfigError(f"{path}:{e.lineno}: syntax error: {e.msg}") from None
    except Exception as e:  # an experiment file is user code: one line, not a traceback
        raise ConfigError(f"{path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    check(exp is not None, f"{path} defines neither get_config() nor a module-level config")
    check(isinstance(exp, Experiment), f"{path}: get_config() must return saejax.experiment.Experiment, got {type(exp).__name__}")
    assert isinstance(exp, Experiment)  # narrowing only: check raised otherwise
    return exp


def _set_field(spec, name: str, val):
    fields = [f.name for f in dataclasses.fields(spec) if f.init]
    check(name in fields, f"unknown source option {name!r}{closest(name, fields)}; valid: {', '.join(fields)}")
    return dataclasses.replace(spec, **{name: val})


def _parse(key: str, value: str):
    import ast

    text = value.strip()
    if text.lower() in ("nan", "inf", "+inf", "-inf"):
        return float(text)
    try:
        v = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        check(not any(c in text for c in "[](){}'\""),
              f"--set {key}: cannot parse {value!r}; expected a number, a string or a list like 1,2,3")
        if "," in text:  # archs=topk,relu
            return tuple(_parse(key, part) for part in text.split(",") if part.strip())
        return text
    return tuple(v) if isinstance(v, list) else v


def apply_overrides(exp: Experiment, items) -> Experiment:
    """``--set key=value``: ``seeds=0,1,2``, ``widths=(64,128)``, ``train.lr=1e-3``, ``source.task=mul``."""
    for item in items or ():
        check("=" in item, f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        head, _, sub = key.strip().partition(".")
        names = [f.name for f in dataclasses.fields(exp)]
        check(head in names, f"--set: unknown key {head!r}{closest(head, names)}; valid: {', '.join(names)}")
        val = _parse(key, value)
        try:
            exp = _override(exp, head, sub, val, key)
        except ConfigError as e:
            raise ConfigError(f"--set {key}={value}: {e}") from None
    return exp


def _override(exp: Experiment, head: str, sub: str, val, key: str) -> Experiment:
    if not sub:
        import typing

        if "tuple[" in str(typing.get_type_hints(Experiment)[head]) and not isinstance(val, tuple):
            val = (val,)
        return dataclasses.replace(exp, **{head: val})
    if head in ("sae", "train"):
        return dataclasses.replace(exp, **{head: {**getattr(exp, head), sub: val}})
    if head == "source":
        if not isinstance(exp.source, dict):
            return dataclasses.replace(exp, source=_set_field(exp.source, sub, val))
        name, _, field_ = sub.partition(".")
        if name in exp.source and field_:  # source.<name>.<field>: one of the named sources
            return dataclasses.replace(exp, source={**exp.source, name: _set_field(exp.source[name], field_, val)})
        have = [n for n, spec in exp.source.items() if sub in {f.name for f in dataclasses.fields(spec) if f.init}]
        check(bool(have), f"no named source has option {sub!r} (sources: {', '.join(exp.source)}; "
                          f"one of them: source.<name>.<option>)")
        return dataclasses.replace(exp, source={n: _set_field(spec, sub, val) if n in have else spec
                                                for n, spec in exp.source.items()})
    raise ConfigError(f"{head!r} has no sub-keys (got {key!r})")
