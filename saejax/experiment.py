"""Experiments: frozen descriptions of a grid of SAE trainings, and their expansion into cells.

An experiment file is Python with ``get_config()`` (or a module-level ``config``) returning an
:class:`Experiment`. The grid ``archs x widths x (k | coefficient) x lengths`` expands to *cells*
(one record each in ``summary.json``). Cells that differ only in floats or training length share
one *unit*, one compiled program: swept coefficients are a vmapped axis and shorter lengths are
exact snapshots of the longest run (valid for a constant learning rate after warm-up; with a
decaying schedule every length trains on its own).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saejax.config import ARCHS, TOPK_FAMILY, SAEConfig, TrainConfig, closest
from saejax.data import SyntheticSource
from saejax.errors import ConfigError, check


# ----------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class Synthetic:
    """Song et al. (2025)'s model organism: a known dictionary, s active features per sample."""

    d: int = 64
    n_features: int = 128
    s: int = 4
    dictionary_seed: int = 0
    n_heldout: int = 4096

    def build(self, cache_dir: Path | None = None):
        return SyntheticSource(self.d, self.n_features, self.s, self.dictionary_seed, self.n_heldout)

    def describe(self) -> str:
        return f"synthetic d={self.d} n_features={self.n_features} s={self.s}"


@dataclass(frozen=True)
class Modular:
    """The embedded modular-arithmetic transformer (p = 113), trained by saejax on first use.

    ``task``: ``add``, ``mul`` or ``both``; ``layer``/``site``: where activations are read;
    ``positions``: which prompt positions become tokens (see :mod:`saejax.models.modular`)."""

    task: str = "add"
    layer: int = 1
    site: str = "resid_post"
    positions: str = "all"

    def build(self, cache_dir: Path | None = None):
        from saejax.models.modular import modular_activations

        return modular_activations(task=self.task, layer=self.layer, site=self.site,
                                   positions=self.positions, cache_dir=cache_dir)

    def describe(self) -> str:
        return f"modular-{self.task} layer {self.layer} {self.site} ({self.positions} positions)"


@dataclass(frozen=True)
class HF:
    """Activations of a Hugging Face causal LM (extracted once, cached): see :mod:`saejax.activations`.

    ``hook`` is ``"<layer>.<site>"`` or a TransformerLens name like ``blocks.6.hook_resid_post``."""

    model: str
    hook: str
    dataset: str
    revision: str | None = None
    dataset_config: str | None = None
    split: str = "train"
    text_column: str = "text"
    ctx_len: int = 128
    n_tokens: int = 1_000_000
    dtype: str = "float32"
    drop_bos: bool = True
    heldout_frac: float = 0.05

    def build(self, cache_dir: Path | None = None):
        from saejax.activations import hf_source

        return hf_source(self, cache_dir=cache_dir)

    def describe(self) -> str:
        return f"{self.model} {self.hook} on {self.dataset} ({self.n_tokens} tokens)"


SOURCES = {"synthetic": Synthetic, "modular": Modular, "hf": HF}


# ----------------------------------------------------------------------------- experiment
@dataclass(frozen=True)
class Experiment:
    """A grid of SAE trainings on one activation source and the analyses run on each cell."""

    name: str
    """Output directory name (under ``runs/`` unless ``--out`` says otherwise)."""
    source: Any = field(default_factory=Synthetic)
    """:class:`Synthetic`, :class:`Modular` or :class:`HF`."""
    archs: tuple = ("topk",)
    """SAE architectures (see :class:`saejax.SAEConfig`)."""
    widths: tuple = (1024,)
    """Dictionary sizes ``d_sae``."""
    ks: tuple = (32,)
    """TopK family: latents per token."""
    l1_coefs: tuple = (1e-3,)
    """ReLU: L1 coefficients (swept inside one program)."""
    l0_coefs: tuple = (1e-3,)
    """JumpReLU: L0 coefficients (swept inside one program)."""
    epochs: tuple | None = (20.0,)
    """Training lengths in epochs over the source (finite sources); or give ``steps``."""
    steps: tuple | None = None
    """Training lengths in optimiser steps (set ``epochs=None``)."""
    seeds: tuple = (0, 1, 2, 3, 4)
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
    analyses: tuple = ("stability",)
    """``stability`` always; ``splice`` (reconstructions spliced into the model) and ``probe``
    (linear probes, per-latent label profiles) for the embedded modular model."""

    def __post_init__(self):
        check(isinstance(self.name, str) and self.name and "/" not in self.name, f"experiment name must be a plain non-empty string, got {self.name!r}")
        check(type(self.source) in SOURCES.values(), f"source must be one of Synthetic, Modular, HF, got {type(self.source).__name__}")
        for a in self.archs:
            check(a in ARCHS, f"unknown SAE architecture {a!r}; expected one of {ARCHS}{closest(a, ARCHS)}")
        for w in self.widths:
            check(isinstance(w, int) and w > 0, f"impossible width d_sae={w!r}: widths must be positive integers")
        check((self.epochs is None) != (self.steps is None), "give exactly one of epochs or steps")
        check(len(self.lengths) > 0 and all(v > 0 for v in self.lengths), f"training lengths must be positive, got {self.lengths}")
        check(len(self.seeds) >= 2, f"a stability experiment needs at least 2 seeds, got {list(self.seeds)}")
        _check_keys(self.sae, SAEConfig, "sae", skip=("d_in", "d_sae", "arch", "k", "l1_coef", "l0_coef"))
        _check_keys(self.train, TrainConfig, "train", skip=("steps", "epochs"))
        check(self.dynamics >= 0, f"dynamics must be >= 0, got {self.dynamics}")
        known = ("stability", "splice", "probe")
        for a in self.analyses:
            check(a in known, f"unknown analysis {a!r}; expected some of {known}{closest(a, known)}")

    @property
    def lengths(self) -> tuple:
        return tuple(self.epochs if self.epochs is not None else self.steps)

    @property
    def length_unit(self) -> str:
        return "epochs" if self.epochs is not None else "steps"

    def train_config(self, length) -> TrainConfig:
        return TrainConfig(**{**self.train, self.length_unit: length})

    def units(self, d_in: int) -> list["Unit"]:
        """Compiled programs of this grid (validated SAE configs)."""
        shares = self.train.get("decay", "constant") == "constant"
        lengths = [tuple(sorted(self.lengths))] if shares else [(v,) for v in sorted(self.lengths)]
        out = []
        for arch in self.archs:
            for width in self.widths:
                for k in (self.ks if arch in TOPK_FAMILY else (None,)):
                    coefs = {"relu": self.l1_coefs, "jumprelu": self.l0_coefs}.get(arch, (None,))
                    kw = {**self.sae, "d_in": d_in, "d_sae": width, "arch": arch}
                    if k is not None:
                        kw["k"] = k
                    try:
                        cfg = SAEConfig(**kw)
                    except ConfigError as e:
                        raise ConfigError(f"cell {arch} d_sae={width}: {e}") from None
                    for ls in lengths:
                        out.append(Unit(cfg, tuple(coefs), ls))
        return out


@dataclass(frozen=True)
class Unit:
    """One compiled training program: an SAE config, swept coefficients, lengths as snapshots."""

    sae: SAEConfig
    coefs: tuple
    lengths: tuple

    @property
    def id(self) -> str:
        s = f"{self.sae.arch}-w{self.sae.d_sae}"
        if self.sae.arch in TOPK_FAMILY:
            s += f"-k{self.sae.k}"
        return s + ("" if len(self.lengths) > 1 else f"-len{self.lengths[0]:g}")

    def cell_id(self, coef, length) -> str:
        s = f"{self.sae.arch}-w{self.sae.d_sae}"
        if self.sae.arch in TOPK_FAMILY:
            s += f"-k{self.sae.k}"
        if coef is not None:
            s += f"-{self.sae.sparsity_coef_name.split('_')[0]}_{coef:g}"
        return s + f"-len{length:g}"

    @property
    def sweep(self) -> dict | None:
        return None if self.coefs == (None,) else {self.sae.sparsity_coef_name: list(self.coefs)}


def _check_keys(d: dict, cls, name: str, skip=()) -> None:
    check(isinstance(d, dict), f"{name} must be a dict of {cls.__name__} fields, got {type(d).__name__}")
    names = [f.name for f in dataclasses.fields(cls) if f.name not in skip]
    for key in d:
        check(key in names, f"unknown {name} option {key!r}{closest(key, names)}; valid: {', '.join(names)}")


# ----------------------------------------------------------------------------- files and --set
def load(path: str | Path) -> Experiment:
    """Import an experiment file and return its :class:`Experiment`."""
    path = Path(path)
    check(path.is_file(), f"experiment file {str(path)!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"saejax_experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    if hasattr(module, "get_config"):
        exp = module.get_config()
    elif hasattr(module, "config"):
        exp = module.config
    else:
        raise ConfigError(f"{path} defines neither get_config() nor a module-level config")
    check(isinstance(exp, Experiment), f"{path}: get_config() must return saejax.experiment.Experiment, got {type(exp).__name__}")
    return exp


def _parse(value: str):
    try:
        v = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value
    return tuple(v) if isinstance(v, list) else v


def apply_overrides(exp: Experiment, items) -> Experiment:
    """``--set key=value``: ``seeds=0,1,2``, ``widths=(64,128)``, ``train.lr=1e-3``, ``source.task=mul``."""
    for item in items or ():
        check("=" in item, f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        head, _, sub = key.strip().partition(".")
        names = [f.name for f in dataclasses.fields(exp)]
        check(head in names, f"--set: unknown key {head!r}{closest(head, names)}; valid: {', '.join(names)}")
        val = _parse(value)
        if not sub:
            if isinstance(getattr(exp, head), tuple) and not isinstance(val, tuple):
                val = (val,)
            exp = dataclasses.replace(exp, **{head: val})
        elif head in ("sae", "train"):
            exp = dataclasses.replace(exp, **{head: {**getattr(exp, head), sub: val}})
        elif head == "source":
            fields = [f.name for f in dataclasses.fields(exp.source)]
            check(sub in fields, f"--set: unknown source option {sub!r}{closest(sub, fields)}; valid: {', '.join(fields)}")
            exp = dataclasses.replace(exp, source=dataclasses.replace(exp.source, **{sub: val}))
        else:
            raise ConfigError(f"--set: {head!r} has no sub-keys (got {key!r})")
    return exp
