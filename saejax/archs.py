"""The architecture registry: one :class:`Arch` entry per SAE architecture, and nothing else
in saejax tests an architecture's name.

An entry owns what differs between architectures: the latents in training (with the sparsity
term and the name of its swept coefficient) and at inference, whether it uses ``k`` (the TopK
family, which also gets AuxK), its extra parameters, a BatchTopK-style inference threshold, the
memory it needs, its sparse kernel if any, and its SAELens export/load mapping. Adding an
architecture is one :func:`register` call (see ``tests/test_archs.py`` for a toy one that trains,
exports and reloads with no other edit).

Latent functions (written for one seed, ``pre`` is ``[B, d_sae]``):

- ``topk``: keep the k largest pre-activations per token, then ReLU (Gao et al. 2024).
- ``batchtopk``: keep the k·B largest over the whole batch (Bussmann et al. 2024); at inference
  a threshold estimated during training (EMA of the smallest kept value) replaces the batch top-k.
- ``relu``: ReLU with L1 penalty ``sum_j z_j ||W_dec[j]||`` (Bricken et al. 2023).
- ``jumprelu``: ``z = pre * H(pre - theta)``, thresholds learned through a straight-through
  estimator and an L0 penalty (Rajamanoharan et al. 2024).
- ``matryoshka`` and ``gated`` (in :mod:`saejax.archs_extra`): Matryoshka BatchTopK (Bussmann et
  al. 2025) and the gated SAE (Rajamanoharan et al. 2024, arXiv:2404.16014).

An entry whose objective needs the input itself (not only the pre-activations) gives a whole
``dense_step``; one whose sparsity term has several parts returns it as a vector, one entry per
name of its ``metrics``, and the trainer records each part next to :data:`saejax.train.METRICS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from saejax import topk
from saejax.errors import ConfigError


def _no_params(cfg) -> dict:
    return {}


def _no_tensors(cfg, params, threshold) -> dict:
    return {}


def _from_tensors(tensors: dict) -> dict:
    return {}


def _no_metrics(cfg) -> tuple[str, ...]:
    return ()


@dataclass(frozen=True)
class Arch:
    """One SAE architecture. ``train_latents(cfg, params, pre, hp, ramp) -> (z, sparsity,
    min_kept)`` and ``infer_latents(cfg, params, pre, threshold) -> z`` are pure functions."""

    name: str
    train_latents: Callable
    infer_latents: Callable
    uses_k: bool = False
    """Has ``k`` latents per token (the TopK family): cell ids carry k, AuxK applies."""
    coef: str | None = None
    """Name of its sparsity coefficient (``l1_coef``, ``l0_coef``), swept by the runner, or None."""
    ema_threshold: bool = False
    """Tracks an inference threshold during training (BatchTopK) that inference then uses."""
    extra_params: Callable = _no_params
    """``cfg -> {name: initial array}``, parameters beyond the four of every SAE."""
    dense_arrays: int = 4
    """``[B, d_sae]`` arrays alive in a dense training step (for :func:`saejax.train.member_bytes`)."""
    sparse_step: Callable | None = None
    """``(cfg, params, x, dead) -> Step`` for ``kernel="sparse"``, or None (dense only)."""
    sparse_arrays: int = 0
    """``[B, d_sae]`` arrays alive in its sparse step (BatchTopK's batch-wide top-k needs the whole
    pre-activations; TopK's encoder works in token chunks)."""
    saelens: str = "standard"
    """Architecture name in SAELens' ``cfg.json``."""
    to_saelens: Callable = _no_tensors
    """``(cfg, params, threshold) -> {name: tensor}``: extra tensors on export (raw units)."""
    from_saelens: Callable = _from_tensors
    """``tensors -> {name: array}``: extra parameters when loading an export of this entry."""
    loads_as: str | None = None
    """Architecture a reloaded export runs as (BatchTopK reloads as a JumpReLU), None = itself."""
    cfg_fields: tuple[str, ...] = field(default=())
    """``SAEConfig`` fields written to ``cfg.json`` on export (e.g. ``k``)."""
    saelens_b_enc: str = "b_enc"
    """Name of the tensor that holds saejax's ``b_enc`` in the SAELens layout (gated SAEs: ``b_gate``)."""
    dense_step: Callable | None = None
    """``(cfg, params, x, hp, dead, ramp) -> Step`` replacing :func:`saejax.sae.dense_step`, for an
    objective that needs ``x`` (Matryoshka's prefix reconstructions, the gated auxiliary loss)."""
    metrics: Callable = _no_metrics
    """``cfg -> names``: when non-empty, the sparsity term is a vector with one entry per name; the
    loss adds its sum (the ``sparsity`` metric) and each entry is recorded as a training metric."""

    def threshold(self, threshold):
        """The inference threshold to pass to ``encode``: the trained one, or None."""
        return threshold if self.ema_threshold else None


REGISTRY: dict[str, Arch] = {}


def register(arch: Arch) -> Arch:
    REGISTRY[arch.name] = arch
    return arch


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def get(name: str) -> Arch:
    if name not in REGISTRY:
        from saejax.config import closest

        raise ConfigError(f"unknown SAE architecture {name!r}; expected one of {names()}{closest(name, names())}")
    return REGISTRY[name]


# ----------------------------------------------------------------------------- latent primitives
def topk_select(pre: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Top-k values (after ReLU) and their latent indices, per token: ``[B, k]`` each."""
    vals, idx = topk.top_k(pre, k)
    return jax.nn.relu(vals), idx


def scatter_latents(vals: jax.Array, idx: jax.Array, d_sae: int) -> jax.Array:
    rows = jnp.arange(vals.shape[0])[:, None]
    return jnp.zeros((vals.shape[0], d_sae), vals.dtype).at[rows, idx].set(vals)


def batchtopk_latents(pre: jax.Array, k: int) -> jax.Array:
    """Keep the ``k * B`` largest ReLU'd pre-activations of the whole batch."""
    b, d = pre.shape
    flat = jax.nn.relu(pre).reshape(-1)
    vals, idx = topk.top_k(flat, k * b)
    return jnp.zeros_like(flat).at[idx].set(vals).reshape(b, d)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def heaviside_ste(pre: jax.Array, threshold: jax.Array, bandwidth: float) -> jax.Array:
    """``H(pre - threshold)``; d/dthreshold = -(1/eps) K((pre - threshold)/eps), K a unit rectangle."""
    return (pre > threshold).astype(pre.dtype)


def _heaviside_fwd(pre, threshold, bandwidth):
    return heaviside_ste(pre, threshold, bandwidth), (pre, threshold)


def _heaviside_bwd(bandwidth, res, g):
    pre, threshold = res
    rect = (jnp.abs((pre - threshold) / bandwidth) < 0.5).astype(pre.dtype)
    d_thr = -(1.0 / bandwidth) * rect * g
    return jnp.zeros_like(pre), d_thr.sum(axis=tuple(range(d_thr.ndim - threshold.ndim)))


heaviside_ste.defvjp(_heaviside_fwd, _heaviside_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def jumprelu(pre: jax.Array, threshold: jax.Array, bandwidth: float) -> jax.Array:
    """``pre * H(pre - threshold)``; d/dthreshold = -(threshold/eps) K((pre - threshold)/eps)."""
    return pre * (pre > threshold)


def _jumprelu_fwd(pre, threshold, bandwidth):
    return jumprelu(pre, threshold, bandwidth), (pre, threshold)


def _jumprelu_bwd(bandwidth, res, g):
    pre, threshold = res
    gate = (pre > threshold).astype(pre.dtype)
    rect = (jnp.abs((pre - threshold) / bandwidth) < 0.5).astype(pre.dtype)
    d_thr = -(threshold / bandwidth) * rect * g
    return g * gate, d_thr.sum(axis=tuple(range(d_thr.ndim - threshold.ndim)))


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


# ----------------------------------------------------------------------------- the four entries
def _zero(pre):
    return jnp.zeros((), pre.dtype)


def _topk_train(cfg, params, pre, hp, ramp):
    return scatter_latents(*topk_select(pre, cfg.k), cfg.d_sae), _zero(pre), _zero(pre)


def _topk_infer(cfg, params, pre, threshold):
    return scatter_latents(*topk_select(pre, cfg.k), cfg.d_sae)


def _batchtopk_train(cfg, params, pre, hp, ramp):
    z = batchtopk_latents(pre, cfg.k)
    return z, _zero(pre), jnp.min(jnp.where(z > 0, z, jnp.inf))


def _batchtopk_infer(cfg, params, pre, threshold):
    if threshold is None:
        return batchtopk_latents(pre, cfg.k)
    return jnp.where(pre > threshold, pre, 0.0) * (pre > 0)


def l1_weights(cfg, params) -> jax.Array:
    """Per-latent weights of an L1 term: decoder row norms, or ones (``SAEConfig.l1_decoder_norm``)."""
    if cfg.l1_decoder_norm:
        return jnp.linalg.norm(params["W_dec"], axis=1)
    return jnp.ones(cfg.d_sae, params["W_dec"].dtype)


def _relu_train(cfg, params, pre, hp, ramp):
    z = jax.nn.relu(pre)
    return z, ramp * hp["l1_coef"] * jnp.mean(z @ l1_weights(cfg, params)), _zero(pre)


def _relu_infer(cfg, params, pre, threshold):
    return jax.nn.relu(pre)


def _jump_train(cfg, params, pre, hp, ramp):
    thr = jnp.exp(params["log_threshold"])
    z = jumprelu(pre, thr, cfg.jump_bandwidth)
    l0: jax.Array = heaviside_ste(pre, thr, cfg.jump_bandwidth)  # partial(custom_vjp) loses the return type
    return z, ramp * hp["l0_coef"] * jnp.mean(jnp.sum(l0, axis=1)), _zero(pre)


def _jump_infer(cfg, params, pre, threshold):
    return jnp.where(pre > jnp.exp(params["log_threshold"]), pre, 0.0)


def _jump_params(cfg) -> dict:
    return {"log_threshold": jnp.full(cfg.d_sae, np.log(cfg.jump_init_threshold), jnp.float32)}


def _jump_export(cfg, params, threshold) -> dict:
    return {"threshold": np.exp(np.asarray(params["log_threshold"], np.float32))}


def _jump_load(tensors: dict) -> dict:
    return {"log_threshold": np.log(np.maximum(tensors["threshold"], 1e-30)).astype(np.float32)}


def _batchtopk_export(cfg, params, threshold) -> dict:
    """Exported the way SAELens runs BatchTopK at inference: a JumpReLU with the trained threshold."""
    return {"threshold": np.full(cfg.d_sae, threshold if threshold is not None else 0.0, np.float32)}


def _topk_sparse(cfg, params, x, dead):
    from saejax.sae import sparse_topk_step

    return sparse_topk_step(cfg, params, x, dead)


def _batchtopk_sparse(cfg, params, x, dead):
    from saejax.sae import sparse_batchtopk_step

    return sparse_batchtopk_step(cfg, params, x, dead)


register(Arch("topk", _topk_train, _topk_infer, uses_k=True, dense_arrays=9, sparse_step=_topk_sparse,
              saelens="topk", cfg_fields=("k",)))
register(Arch("batchtopk", _batchtopk_train, _batchtopk_infer, uses_k=True, ema_threshold=True, dense_arrays=9,
              sparse_step=_batchtopk_sparse, sparse_arrays=4,
              saelens="jumprelu", to_saelens=_batchtopk_export, from_saelens=_jump_load, loads_as="jumprelu"))
register(Arch("relu", _relu_train, _relu_infer, coef="l1_coef", dense_arrays=4))
register(Arch("jumprelu", _jump_train, _jump_infer, coef="l0_coef", extra_params=_jump_params, dense_arrays=7,
              saelens="jumprelu", to_saelens=_jump_export, from_saelens=_jump_load))
SAELENS_NAMES = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated"}
"""SAELens ``architecture`` values of pretrained SAEs (no ``saejax_arch``) and the entry that runs them."""

from saejax import archs_extra  # noqa: E402,F401  (registers matryoshka and gated)
