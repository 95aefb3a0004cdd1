"""SAE architectures as pure functions over a parameter pytree, written for one seed.

Parameters (SAELens layout): ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``,
``b_dec [d_in]``, and for JumpReLU ``log_threshold [d_sae]``. Inputs are batches ``[B, d_in]``
already scaled by the input normaliser; the seed axis comes from ``vmap`` in :mod:`saejax.train`.

    pre = (x - b_dec) @ W_enc + b_enc        z = f(pre)        x_hat = z @ W_dec + b_dec

with ``f`` per architecture (each an entry of the registry in :mod:`saejax.archs`):

- ``topk``: keep the k largest pre-activations per token, then ReLU (Gao et al. 2024, arXiv:2406.04093).
- ``batchtopk``: keep the k·B largest over the whole batch (Bussmann et al. 2024, arXiv:2412.06410);
  at inference a threshold estimated during training replaces the batch top-k.
- ``relu``: ReLU with L1 penalty ``sum_j z_j ||W_dec[j]||`` (Bricken et al. 2023; Conerly et al. 2024).
- ``jumprelu``: ``z = pre * H(pre - theta)``, thresholds learned through a straight-through
  estimator with a rectangle kernel of width ``jump_bandwidth`` and an L0 penalty
  (Rajamanoharan et al. 2024, arXiv:2407.14435).
- ``matryoshka`` (Matryoshka BatchTopK) and ``gated``: formulas in :mod:`saejax.archs_extra`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from saejax import archs, kernels, kernels_batch, topk
from saejax.archs import batchtopk_latents, heaviside_ste, jumprelu, scatter_latents, topk_select  # noqa: F401
from saejax.config import SAEConfig


# ----------------------------------------------------------------------------- initialisation
def init(cfg: SAEConfig, key: jax.Array, b_dec: jax.Array) -> dict:
    """Parameters for one seed. ``b_dec`` comes from :func:`b_dec_init` (shared by all seeds)."""
    k_dec, k_enc = jax.random.split(key)
    w_dec = jax.random.normal(k_dec, (cfg.d_sae, cfg.d_in), jnp.float32)
    w_dec = w_dec / jnp.linalg.norm(w_dec, axis=1, keepdims=True)
    if cfg.enc_init_transpose:
        w_enc = w_dec.T
    else:  # PyTorch nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        bound = 1.0 / np.sqrt(cfg.d_in)
        w_enc = jax.random.uniform(k_enc, (cfg.d_in, cfg.d_sae), jnp.float32, -bound, bound)
    params = {"W_enc": w_enc, "b_enc": jnp.zeros(cfg.d_sae, jnp.float32), "W_dec": w_dec,
              "b_dec": jnp.asarray(b_dec, jnp.float32)}
    params.update(archs.get(cfg.arch).extra_params(cfg))
    return params


def geometric_median(x: np.ndarray, iters: int = 100, tol: float = 1e-6) -> np.ndarray:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances to the rows."""
    m = x.mean(0)
    for _ in range(iters):
        w = 1.0 / np.maximum(np.linalg.norm(x - m, axis=1), 1e-8)
        new = (w[:, None] * x).sum(0) / w.sum()
        if np.linalg.norm(new - m) < tol * max(1.0, np.linalg.norm(m)):
            return new
        m = new
    return m


def b_dec_init(cfg: SAEConfig, sample: np.ndarray) -> np.ndarray:
    """Decoder-bias start from a (normalised) data sample: mean, geometric median or zeros."""
    if cfg.b_dec_init == "zeros":
        return np.zeros(cfg.d_in, np.float32)
    if cfg.b_dec_init == "median":
        return geometric_median(sample.astype(np.float64)).astype(np.float32)
    return sample.mean(0).astype(np.float32)


def input_scale(cfg: SAEConfig, sample: np.ndarray) -> float:
    """Factor ``c`` with ``E ||c x||^2 = 1`` (1.0 when normalisation is off)."""
    if not cfg.normalize_input:
        return 1.0
    return float(1.0 / np.sqrt(np.mean(np.sum(sample.astype(np.float64) ** 2, axis=1))))


def fold_scale(params: dict, scale) -> dict:
    """Express parameters trained on ``c x`` in the units of ``x``.

    ``x_hat = z (W_dec / c) + b_dec / c`` and ``pre = (x - b_dec / c)(c W_enc) + b_enc``: the
    latents, and so the thresholds, are unchanged. Works with or without a leading seed axis.
    """
    c = jnp.asarray(scale, jnp.float32)
    out = dict(params)
    out["W_enc"] = params["W_enc"] * c
    out["W_dec"] = params["W_dec"] / c
    out["b_dec"] = params["b_dec"] / c
    return out


# ----------------------------------------------------------------------------- forward
def pre_acts(params: dict, x: ArrayLike) -> jax.Array:
    return (x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]


def encode(cfg: SAEConfig, params: dict, x: ArrayLike, threshold: ArrayLike | None = None) -> jax.Array:
    """Latents ``[B, d_sae]`` for inference. BatchTopK uses its estimated ``threshold`` when given
    (per-token, batch-independent) and the batch top-k otherwise."""
    return archs.get(cfg.arch).infer_latents(cfg, params, pre_acts(params, x), threshold)


def decode(params: dict, z: jax.Array) -> jax.Array:
    return z @ params["W_dec"] + params["b_dec"]


# ----------------------------------------------------------------------------- objective
class Step(NamedTuple):
    """What one training forward of one seed produces, whatever the architecture."""

    x_hat: jax.Array
    fired: jax.Array  # [d_sae] bool: fired on this batch
    l0: jax.Array
    sparsity: jax.Array  # the architecture's sparsity term (already weighted)
    aux: jax.Array  # AuxK (unweighted), 0 outside the TopK family
    min_kept: jax.Array  # BatchTopK: smallest kept latent (feeds its inference threshold)


def dense_step(cfg: SAEConfig, params: dict, x: jax.Array, hp: dict, dead: jax.Array | DeadSet, ramp) -> Step:
    pre = pre_acts(params, x)
    z, sparsity, min_kept = archs.get(cfg.arch).train_latents(cfg, params, pre, hp, ramp)
    x_hat = decode(params, z)
    aux = jnp.zeros((), x.dtype)
    if cfg.n_aux > 0:
        aux = auxk_loss(cfg, params, pre, jax.lax.stop_gradient(x - x_hat), dead)
    return Step(x_hat, jnp.any(z > 0, axis=0), jnp.mean(jnp.sum(z > 0, axis=1)), sparsity, aux, min_kept)


def sparse_topk_step(cfg: SAEConfig, params: dict, x: jax.Array, dead: jax.Array | DeadSet) -> Step:
    """TopK through :mod:`saejax.kernels`: same numbers as :func:`dense_step`; only the encoder
    forward is dense."""
    mask = None if isinstance(dead, DeadSet) else dead  # a DeadSet: no per-token aux top-k in the encoder
    enc: tuple[jax.Array, jax.Array, jax.Array, jax.Array] = kernels.topk_encode(  # partial(custom_vjp) loses the type
        x, params["W_enc"], params["b_enc"], params["b_dec"], mask, cfg.k, 0 if mask is None else cfg.n_aux)
    vals, idx, aux_vals, aux_idx = enc
    x_hat = kernels.sparse_decode(vals, idx, params["W_dec"]) + params["b_dec"]
    fired = jnp.zeros(cfg.d_sae, bool).at[idx.reshape(-1)].max((vals > 0).reshape(-1))
    zero = jnp.zeros((), x.dtype)
    aux = sparse_auxk(cfg, params, x, x_hat, dead, aux_vals, aux_idx)
    return Step(x_hat, fired, jnp.mean(jnp.sum(vals > 0, axis=1)), zero, aux, zero)


def batchtopk_entries(cfg: SAEConfig, params: dict, x: jax.Array,
                      dead: jax.Array | DeadSet) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """BatchTopK's selection as entries (:func:`saejax.kernels_batch.batchtopk_encode`), with the
    per-token AuxK picks when ``dead`` is a mask: ``(vals, tok, lat, aux_vals, aux_idx)``."""
    mask = None if isinstance(dead, DeadSet) else dead
    enc: tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array] = kernels_batch.batchtopk_encode(  # partial(custom_vjp) loses the type
        x, params["W_enc"], params["b_enc"], params["b_dec"], mask, cfg.k, 0 if mask is None else cfg.n_aux)
    return enc


def entry_stats(cfg: SAEConfig, vals: jax.Array, lat: jax.Array, n_tok: int):
    """``fired`` ``[d_sae]``, mean L0 and the smallest kept value of a batch's entries."""
    on = vals > 0
    fired = jnp.zeros(cfg.d_sae, bool).at[lat].max(on)
    return fired, jnp.sum(on) / n_tok, jnp.min(jnp.where(on, vals, jnp.inf))


def sparse_batchtopk_step(cfg: SAEConfig, params: dict, x: jax.Array, dead: jax.Array | DeadSet) -> Step:
    """BatchTopK through :mod:`saejax.kernels_batch`: same numbers as :func:`dense_step`."""
    vals, tok, lat, aux_vals, aux_idx = batchtopk_entries(cfg, params, x, dead)
    x_hat = kernels_batch.decode_entries(vals, tok, lat, params["W_dec"], x.shape[0]) + params["b_dec"]
    fired, l0, min_kept = entry_stats(cfg, vals, lat, x.shape[0])
    aux = sparse_auxk(cfg, params, x, x_hat, dead, aux_vals, aux_idx)
    return Step(x_hat, fired, l0, jnp.zeros((), x.dtype), aux, min_kept)


def sparse_auxk(cfg: SAEConfig, params: dict, x: jax.Array, x_hat: jax.Array, dead: jax.Array | DeadSet,
                aux_vals: jax.Array, aux_idx: jax.Array) -> jax.Array:
    """AuxK of a sparse step: from the shared :class:`DeadSet` (a small dense matmul over the dead
    columns), or by decoding the encoder's per-token ``[B, n_aux]`` picks; 0 without AuxK."""
    resid = jax.lax.stop_gradient(x - x_hat)
    if isinstance(dead, DeadSet):  # the dead columns' pre-activations: [B, d_in] @ [d_in, n_aux]
        w = params["W_enc"][:, dead.idx]  # x @ w - b_dec @ w: no [B, d_in] gradient for b_dec
        pre_dead = x @ w - params["b_dec"] @ w + params["b_enc"][dead.idx]
        return _auxk_shared(cfg, params, pre_dead, resid, dead)
    if cfg.n_aux > 0:
        e_hat = kernels.sparse_decode(aux_vals, aux_idx, params["W_dec"])
        return _auxk_ratio(cfg, e_hat, resid, jnp.sum(dead))
    return jnp.zeros((), x.dtype)


def loss(cfg: SAEConfig, params: dict, x: jax.Array, hp: dict, dead: jax.Array | DeadSet, ramp: jax.Array):
    """Training loss for one seed on a batch, and its metrics.

    ``L = mean_b ||x - x_hat||^2 + sparsity``, where sparsity is ``ramp * l1_coef * sum_j z_j
    ||W_dec[j]||`` (ReLU), ``ramp * l0_coef * sum_j H(pre_j - theta_j)`` (JumpReLU), or for the
    TopK family ``aux_coef * AuxK``: the ``n_aux`` largest pre-activations among ``dead`` latents
    reconstruct the residual ``e = x - x_hat``, ``AuxK = ||e - e_hat||^2 / ||e - mean(e)||^2``
    (Gao et al. 2024, normalised as in EleutherAI sparsify); ``dead`` is a ``[d_sae]`` mask or, when
    at most ``n_aux`` latents are dead, a :class:`DeadSet` (same numbers, cheaper). ``hp`` holds the
    traced floats (``lr``, ``l1_coef``, ``l0_coef``, ``aux_coef``) so one program can sweep them.
    An entry with its own ``dense_step`` replaces :func:`dense_step`; a vector sparsity term is summed, and each
    part recorded under its name in ``arch.metrics(cfg)`` (see :mod:`saejax.archs_extra`).
    """
    arch = archs.get(cfg.arch)
    if kernels.resolve(cfg) == "sparse":
        assert arch.sparse_step is not None  # SAEConfig only allows kernel="sparse" for an arch with one
        st = arch.sparse_step(cfg, params, x, dead)
    else:
        st = (arch.dense_step or dense_step)(cfg, params, x, hp, dead, ramp)
    err = st.x_hat - x
    recon = jnp.mean(jnp.sum(err**2, axis=1))
    total_var = jnp.sum((x - x.mean(0)) ** 2)
    sparsity = jnp.sum(st.sparsity) if st.sparsity.ndim else st.sparsity  # a vector: one part per arch.metrics name
    out = recon + sparsity + hp["aux_coef"] * st.aux
    metrics = {
        "loss": out,
        "mse": jnp.mean(err**2),
        "fvu": jnp.sum(err**2) / jnp.maximum(total_var, 1e-12),
        "l0": st.l0,
        "aux": st.aux,
        "sparsity": sparsity,
    }
    if st.sparsity.ndim:
        metrics.update({name: st.sparsity[i] for i, name in enumerate(arch.metrics(cfg))})
    return out, (metrics, st.fired, st.min_kept)


class DeadSet(NamedTuple):
    """The dead latents as one set shared by all tokens, for when at most ``n_aux`` are dead.

    Then AuxK's per-token top-``n_aux`` among dead latents (the others masked to -inf) selects
    every dead latent for every token, so ``e_hat = relu(pre[:, idx]) @ W_dec[idx]`` over the
    ``n_aux`` slots ``idx`` (padding slots masked out by ``valid``): a small dense matmul, no
    per-token top-k or scatter. Passed in place of the ``dead`` mask (:func:`dead_set`).
    """

    idx: jax.Array  # [n_aux] int32: the dead latents, then padding (latent 0)
    valid: jax.Array  # [n_aux] bool: the slot holds a dead latent


def dead_set(dead: jax.Array, n_aux: int) -> DeadSet:
    """The :class:`DeadSet` of a ``[d_sae]`` mask with at most ``n_aux`` dead latents."""
    idx = jnp.nonzero(dead, size=n_aux, fill_value=0)[0].astype(jnp.int32)
    return DeadSet(idx, jnp.arange(n_aux) < jnp.sum(dead))


def auxk_loss(cfg: SAEConfig, params: dict, pre: jax.Array, resid: jax.Array, dead: jax.Array | DeadSet) -> jax.Array:
    """AuxK: reconstruct ``resid`` from the top-``n_aux`` dead latents (0 when none are dead).

    ``dead``: a ``[d_sae]`` mask (per-token top-``n_aux`` of ``where(dead, pre, -inf)``), or a
    :class:`DeadSet` when at most ``n_aux`` are dead (the same numbers, much cheaper).
    """
    if isinstance(dead, DeadSet):
        return _auxk_shared(cfg, params, pre[:, dead.idx], resid, dead)
    masked = jnp.where(dead, pre, -jnp.inf)
    vals, idx = topk.top_k(masked, cfg.n_aux)
    vals = jnp.where(jnp.isfinite(vals), jax.nn.relu(vals), 0.0)
    e_hat = scatter_latents(vals, idx, cfg.d_sae) @ params["W_dec"]
    return _auxk_ratio(cfg, e_hat, resid, jnp.sum(dead))


def _auxk_shared(cfg: SAEConfig, params: dict, pre_dead: jax.Array, resid: jax.Array, ds: DeadSet) -> jax.Array:
    """AuxK from a :class:`DeadSet`: ``e_hat = (relu(pre_dead) * valid) @ W_dec[idx]``, with
    ``pre_dead = pre[:, idx]`` ``[B, n_aux]``."""
    vals = jnp.where(ds.valid, jax.nn.relu(pre_dead), 0.0)
    return _auxk_ratio(cfg, vals @ params["W_dec"][ds.idx], resid, jnp.sum(ds.valid))


def _auxk_ratio(cfg: SAEConfig, e_hat: jax.Array, resid: jax.Array, n_dead: jax.Array) -> jax.Array:
    """``||e_hat - resid||^2 / ||resid - mean(resid)||^2``, scaled by the dead fraction of n_aux."""
    num = jnp.sum((e_hat - resid) ** 2)
    den = jnp.maximum(jnp.sum((resid - resid.mean(0)) ** 2), 1e-12)
    # Scale down while fewer latents are dead than n_aux (sparsify); exactly 0 when none are.
    scale = jnp.minimum(n_dead / cfg.n_aux, 1.0)
    return jnp.where(n_dead > 0, scale * num / den, 0.0)
