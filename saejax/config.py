"""Frozen configuration for SAEs and training. Derived values are properties; bad values raise
:class:`~saejax.errors.ConfigError` at construction, naming the field."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass
from typing import Literal

import numpy as np

from saejax import archs
from saejax.errors import ConfigError, check


def _describe(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return " or ".join(repr(a) for a in args)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        return f"a tuple of {_describe(args[0])}" if len(args) == 2 and args[1] is Ellipsis else \
            f"a tuple ({', '.join(_describe(a) for a in args)})"
    return {int: "an integer", float: "a finite number", bool: "True or False", str: "a string",
            dict: "a dict", type(None): "None"}.get(tp, getattr(tp, "__name__", str(tp)))


def _conform(value, tp):
    """``value`` as type ``tp`` (a list becomes a tuple), or raise TypeError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is typing.Any:
        return value
    if origin is typing.Literal:
        if value in args and isinstance(value, str):
            return value
    elif origin in (types.UnionType, typing.Union):
        for a in args:
            try:
                return _conform(value, a)
            except TypeError:
                pass
    elif origin is tuple and isinstance(value, (tuple, list)):
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(items) == len(value):
            return tuple(_conform(v, t) for v, t in zip(value, items))
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
    elif tp is int:
        if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)) \
                and np.isfinite(value):
            return value
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise TypeError


def check_fields(obj) -> None:
    """The one validator of field types: every init field of the dataclass ``obj`` must match its
    annotation (ints are not floats' impostors: ``1.5`` is no ``int``, ``True`` no number, NaN and
    inf no float). Lists given for tuple fields become tuples. Raises :class:`ConfigError`."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if not f.init or f.name not in hints:
            continue
        value = getattr(obj, f.name)
        try:
            new = _conform(value, hints[f.name])
        except TypeError:
            raise ConfigError(f"{f.name} must be {_describe(hints[f.name])}, got {value!r}") from None
        if new is not value and isinstance(new, tuple):
            object.__setattr__(obj, f.name, new)


def check_seeds(seeds) -> tuple[int, ...]:
    """Distinct non-negative integer seeds."""
    seeds = tuple(seeds)
    check(len(seeds) > 0, "seed list is empty; give at least one integer seed")
    for s in seeds:
        check(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and 0 <= s < 2**31,
              f"seeds must be integers in [0, 2**31), got {s!r}")
    dup = sorted({s for s in seeds if seeds.count(s) > 1})
    check(not dup, f"duplicate seeds {dup}: each seed must appear once")
    return tuple(int(s) for s in seeds)


def closest(name: object, options) -> str:
    """' (did you mean X?)' for the closest of ``options``, or ''."""
    hit = difflib.get_close_matches(str(name), [str(o) for o in options], n=1)
    return f" (did you mean {hit[0]!r}?)" if hit else ""


@dataclass(frozen=True)
class SAEConfig:
    """One sparse autoencoder's shape and objective (shape-changing fields compile a new program)."""

    d_in: int
    """Width of the activations."""
    d_sae: int
    """Number of latents (dictionary size)."""
    arch: str = "topk"
    """An entry of :mod:`saejax.archs`: ``topk`` (k latents per token; Gao et al. 2024), ``batchtopk`` (k·batch per batch; Bussmann
    et al. 2024), ``relu`` (ReLU + L1; Bricken et al. 2023), ``jumprelu`` (Rajamanoharan et al. 2024),
    ``matryoshka`` (Matryoshka BatchTopK; Bussmann et al. 2025), ``gated`` (Rajamanoharan et al. 2024)."""
    k: int = 32
    """Active latents per token for the TopK family."""
    l1_coef: float = 1e-3
    """ReLU: weight of the L1 penalty ``sum_j z_j ||W_dec[j]||`` (gated: of ``sum_j relu(pi_gate)_j ||W_dec[j]||``)."""
    l1_decoder_norm: bool = True
    """ReLU and gated: weight each latent's L1 term by its decoder row's norm, ``sum_j z_j
    ||W_dec[j]||`` (SAELens' ``scale_sparsity_penalty_by_decoder_norm``; Anthropic's April 2023
    update, with ``unit_norm_decoder=False``), or False: the plain ``sum_j |z_j|`` (SAELens'
    default, dictionary_learning's ``StandardTrainer``). Equal while decoder rows are unit-norm."""
    l0_coef: float = 1e-3
    """JumpReLU: weight of the (straight-through) L0 penalty."""
    jump_bandwidth: float = 1e-3
    """JumpReLU: width of the rectangle kernel in the straight-through estimator."""
    jump_init_threshold: float = 1e-3
    """JumpReLU: initial threshold of every latent."""
    unit_norm_decoder: bool = True
    """Keep decoder rows unit-norm: remove the gradient component parallel to each row and
    project the rows back to the sphere after every step (SAELens, sparsify, dictionary_learning)."""
    enc_init_transpose: bool = True
    """Initialise the encoder as the decoder's transpose (Gao et al. 2024; Conerly et al. 2024)."""
    b_dec_init: Literal["mean", "median", "zeros"] = "mean"
    """Decoder bias initialisation: ``mean`` or ``median`` (geometric) of a data sample, or ``zeros``."""
    normalize_input: bool = True
    """Scale inputs to unit mean squared norm; the scale is folded back into the weights on export."""
    aux_k: int | None = None
    """AuxK (Gao et al. 2024): dead latents used to reconstruct the residual; ``None`` = d_in // 2, 0 = off."""
    aux_coef: float = 1 / 32
    """Weight of the AuxK loss."""
    dead_tokens: int = 1_000_000
    """A latent is dead if it has not fired in the last this-many training tokens."""
    kernel: Literal["auto", "dense", "sparse"] = "auto"
    """TopK family (``topk``, ``batchtopk``, ``matryoshka``): ``dense`` matmuls or ``sparse``
    gather/scatter-add decoding (same numbers); ``auto`` picks the faster one for the backend and
    shape (:func:`saejax.kernels.resolve`)."""
    matryoshka_prefixes: tuple[int, ...] | None = None
    """Matryoshka: nested prefix sizes, increasing, the last = d_sae; ``None`` = (d_sae//8, d_sae//4,
    d_sae//2, d_sae)."""

    def __post_init__(self):
        check_fields(self)
        arch = archs.get(self.arch)
        check(isinstance(self.d_in, int) and self.d_in > 0, f"d_in must be a positive integer, got {self.d_in!r}")
        check(isinstance(self.d_sae, int) and self.d_sae > 0, f"d_sae must be a positive integer, got {self.d_sae!r}")
        if arch.uses_k:
            check(isinstance(self.k, int) and 0 < self.k < self.d_sae,
                  f"k must satisfy 0 < k < d_sae={self.d_sae}, got k={self.k!r}")
        check(self.b_dec_init in ("mean", "median", "zeros"), f"b_dec_init must be 'mean', 'median' or 'zeros', got {self.b_dec_init!r}")
        check(self.kernel in ("auto", "dense", "sparse"), f"kernel must be 'auto', 'dense' or 'sparse', got {self.kernel!r}")
        check(self.kernel != "sparse" or arch.sparse_step is not None,
              f"kernel='sparse' is not implemented for arch={self.arch!r}; only for "
              f"{[a.name for a in archs.REGISTRY.values() if a.sparse_step is not None]}")
        check(self.aux_k is None or self.aux_k >= 0, f"aux_k must be >= 0 or None, got {self.aux_k!r}")
        pre = self.matryoshka_prefixes
        check(pre is None or (len(pre) > 0 and pre[0] > 0 and pre[-1] == self.d_sae
                              and all(a < b for a, b in zip(pre, pre[1:]))),
              f"matryoshka_prefixes must increase from > 0 to d_sae={self.d_sae}, got {pre!r}")
        check(self.dead_tokens > 0, f"dead_tokens must be positive, got {self.dead_tokens!r}")
        for f in ("l1_coef", "l0_coef", "jump_bandwidth", "jump_init_threshold", "aux_coef"):
            check(getattr(self, f) >= 0, f"{f} must be >= 0, got {getattr(self, f)!r}")

    @property
    def n_aux(self) -> int:
        """Latents used by AuxK (0 when off or the architecture is not in the TopK family)."""
        if not archs.get(self.arch).uses_k:
            return 0
        n = self.d_in // 2 if self.aux_k is None else self.aux_k
        return min(n, self.d_sae)

    @property
    def sparsity_coef_name(self) -> str | None:
        return archs.get(self.arch).coef

    def replace(self, **kw) -> "SAEConfig":
        return dataclasses.replace(self, **kw)


@dataclass(frozen=True)
class TrainConfig:
    """How long and how to optimise. Floats here (lr, coefficients) may be swept in one program."""

    batch_size: int = 4096
    """Tokens per step."""
    steps: int | None = None
    """Optimiser steps; give this or ``epochs``."""
    epochs: float | None = None
    """Passes over a finite source (steps = ceil(epochs * n_tokens / batch_size))."""
    lr: float = 3e-4
    """Peak Adam learning rate."""
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    warmup_steps: int = 0
    """Linear learning-rate warm-up from 0."""
    decay: Literal["constant", "linear", "cosine"] = "constant"
    """Learning rate after warm-up: ``constant``, ``linear`` (to 0) or ``cosine`` (to 0)."""
    sparsity_warmup_steps: int = 0
    """Linear warm-up of the L1/L0 coefficient from 0 (ReLU and JumpReLU): ``min(1, step / n)``
    at 0-based step ``step``, as SAELens' ``l1_warm_up_steps`` and dictionary_learning's
    ``sparsity_warmup_steps``."""
    resample_steps: tuple[int, ...] = ()
    """Steps (counted from 1) after which dead latents are resampled towards badly reconstructed
    inputs (Bricken et al. 2023; see :mod:`saejax.resample`), e.g. ``(25_000, 50_000, 75_000)``."""
    resample_scale: float = 0.2
    """A resampled encoder column's norm, as a fraction of the mean norm of the live ones."""
    grad_clip: float | None = None
    """Clip the global gradient norm (per seed) before Adam."""
    log_every: int = 10
    """Metrics are averaged over windows of this many steps."""
    chunk_steps: int = 200
    """Steps per compiled call (progress updates between chunks; capped by host memory)."""
    chunk_bytes: int = 256 * 2**20
    """Upper bound on the host batch buffer of one chunk."""
    root_seed: int = 0
    """Seed i's parameter key is ``fold_in(PRNGKey(root_seed), i)``."""
    data_seed: int = 0
    """Seed of the data order shared by all seeds."""
    same_data_order: bool = True
    """All seeds see the same batches (only initialisation differs); False gives seed i the order
    of data seed ``(data_seed, i)``."""
    init_tokens: int = 16384
    """Tokens sampled to estimate the input scale and the decoder-bias initialisation."""
    mesh_shape: tuple[int, int] | None = None
    """Device mesh ``(members, batch)``: seeds x swept floats are sharded over ``members``, each
    batch over ``batch`` (one entry may be -1: all remaining devices). ``None``: every device,
    on the member axis, with the spare factor on ``batch`` when there are fewer members than
    devices (see :func:`saejax.sharding.mesh_shape`)."""
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    """``float32``, or ``bfloat16`` for activations and matmuls (master weights, gradients, Adam
    and all stability cosines stay float32). Off by default; pays off on TPUs and recent GPUs."""

    def __post_init__(self):
        check_fields(self)
        check(self.batch_size > 0, f"batch_size must be positive, got {self.batch_size!r}")
        check((self.steps is None) != (self.epochs is None), f"give exactly one of steps or epochs, got steps={self.steps!r}, epochs={self.epochs!r}")
        check(self.steps is None or self.steps > 0, f"steps must be positive, got {self.steps!r}")
        check(self.epochs is None or self.epochs > 0, f"epochs must be positive, got {self.epochs!r}")
        check(self.lr > 0, f"lr must be positive, got {self.lr!r}")
        check(self.decay in ("constant", "linear", "cosine"), f"decay must be 'constant', 'linear' or 'cosine', got {self.decay!r}")
        check(self.log_every > 0 and self.chunk_steps > 0, f"log_every and chunk_steps must be positive, got {self.log_every!r}, {self.chunk_steps!r}")
        check(self.warmup_steps >= 0 and self.sparsity_warmup_steps >= 0, "warm-up steps must be >= 0")
        rs = self.resample_steps
        check(all(v > 0 for v in rs) and all(a < b for a, b in zip(rs, rs[1:])),
              f"resample_steps must be increasing positive step numbers, got {rs!r}")
        check(self.resample_scale > 0, f"resample_scale must be positive, got {self.resample_scale!r}")
        check(self.compute_dtype in ("float32", "bfloat16"), f"compute_dtype must be 'float32' or 'bfloat16', got {self.compute_dtype!r}")
        if self.mesh_shape is not None:
            ms = tuple(self.mesh_shape)
            check(len(ms) == 2 and all(isinstance(v, int) and (v > 0 or v == -1) for v in ms) and ms != (-1, -1),
                  f"mesh_shape must be (members, batch) positive integers (one may be -1), got {self.mesh_shape!r}")
            check(ms[1] == -1 or self.batch_size % ms[1] == 0,
                  f"batch_size={self.batch_size} must be divisible by the mesh's batch axis, got mesh_shape={self.mesh_shape!r}")
            object.__setattr__(self, "mesh_shape", ms)  # a list from an experiment file stays hashable

    def total_steps(self, n_tokens: int | None) -> int:
        if self.steps is not None:
            return self.steps
        check(n_tokens is not None, "epochs needs a finite activation source; give steps for an endless one")
        assert n_tokens is not None and self.epochs is not None  # __post_init__: exactly one of steps, epochs
        return max(1, -(-int(self.epochs * n_tokens) // self.batch_size))

    def replace(self, **kw) -> "TrainConfig":
        return dataclasses.replace(self, **kw)
