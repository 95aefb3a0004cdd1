"""Two more registry entries: Matryoshka BatchTopK and the gated SAE (see :mod:`saejax.archs`).

- ``matryoshka`` (Bussmann et al. 2025, "Learning Multi-Level Features with Matryoshka SAEs"):
  BatchTopK latents ``z`` (the ``k * B`` largest ReLU'd pre-activations of the batch; at inference
  the EMA threshold, exactly as ``batchtopk``) and a dictionary split into nested prefixes
  ``m_1 < ... < m_G = d_sae`` (``SAEConfig.matryoshka_prefixes``). Each prefix reconstructs from its
  own latents only, ``x_hat_m = z[:, :m] @ W_dec[:m] + b_dec``, and the objective is the sum of
  the prefix reconstruction losses plus AuxK on the full residual::

      L = sum_g mean_b ||x - x_hat_{m_g}||^2 + aux_coef * AuxK(x - x_hat_{m_G})

  The paper's formula, with unit weights. dictionary_learning's ``MatryoshkaBatchTopKTrainer``
  takes ``mean_g(w_g * L_g)`` with default weights ``w_g = 1/G``, i.e. ``(1/G^2) sum_g L_g``: the
  same minimiser, the loss scaled by a constant (relative to AuxK its weight differs by ``G^2``).
  The generic reconstruction term is the last prefix's loss; the sparsity term is the vector of
  the other prefixes' losses, recorded as ``prefix_loss_<m>``. Exported as a JumpReLU with the
  trained threshold, as SAELens runs BatchTopK at inference.

- ``gated`` (Rajamanoharan et al. 2024, arXiv:2404.16014; SAELens' ``gated``)::

      pi_gate = (x - b_dec) @ W_enc + b_gate
      pi_mag  = (x - b_dec) @ (W_enc * exp(r_mag)) + b_mag = (pi_gate - b_gate) * exp(r_mag) + b_mag
      f       = 1[pi_gate > 0] * relu(pi_mag)
      L = mean_b ||x - x_hat||^2 + l1_coef * mean_b sum_j relu(pi_gate)_j ||W_dec[j]||
          + mean_b ||x - (relu(pi_gate) @ sg(W_dec) + sg(b_dec))||^2

  ``b_gate`` is saejax's ``b_enc`` (so the generic ``pre_acts`` is ``pi_gate``); ``r_mag`` and
  ``b_mag`` are extra parameters, all three zero at initialisation as in SAELens. The gate gets no
  gradient through the Heaviside; the auxiliary loss trains it through a frozen (stop-gradient)
  decoder, as in the paper (SAELens' current trainer does not stop the gradient there). The
  sparsity term is ``(l1 term, auxiliary loss)``, recorded as ``gate_l1`` and ``gate_aux``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from saejax.archs import Arch, _batchtopk_export, _batchtopk_infer, _jump_load, batchtopk_latents, l1_weights, register


# ----------------------------------------------------------------------------- matryoshka
def matryoshka_prefixes(cfg) -> tuple[int, ...]:
    """The nested prefix sizes: ``cfg.matryoshka_prefixes``, or ``(d/8, d/4, d/2, d)`` (zeros and
    repeats dropped) for ``d = d_sae``."""
    if cfg.matryoshka_prefixes is not None:
        return tuple(cfg.matryoshka_prefixes)
    d = cfg.d_sae
    return tuple(sorted({d // 8, d // 4, d // 2, d} - {0}))


def _matryoshka_metrics(cfg) -> tuple[str, ...]:
    return tuple(f"prefix_loss_{m}" for m in matryoshka_prefixes(cfg)[:-1])


def _matryoshka_train(cfg, params, pre, hp, ramp):
    z = batchtopk_latents(pre, cfg.k)
    return z, jnp.zeros((0,), pre.dtype), jnp.min(jnp.where(z > 0, z, jnp.inf))


def _matryoshka_step(cfg, params, x, hp, dead, ramp):
    """Prefix reconstructions accumulated group by group (one full decode in all); ``x_hat`` is the
    last, the full dictionary's. Sparsity = ``[L_{m_1}, ..., L_{m_{G-1}}]``."""
    from saejax import sae

    pre = sae.pre_acts(params, x)
    z, _, min_kept = _matryoshka_train(cfg, params, pre, hp, ramp)
    x_hat, terms = _prefix_losses(cfg, params, x, lambda lo, hi: z[:, lo:hi] @ params["W_dec"][lo:hi])
    aux = jnp.zeros((), x.dtype)
    if cfg.n_aux > 0:
        aux = sae.auxk_loss(cfg, params, pre, jax.lax.stop_gradient(x - x_hat), dead)
    return sae.Step(x_hat, jnp.any(z > 0, axis=0), jnp.mean(jnp.sum(z > 0, axis=1)), terms, aux, min_kept)


def _matryoshka_sparse(cfg, params, x, dead):
    """The same numbers through the BatchTopK entry kernels: each prefix group decodes the entries
    of its own latents (the others' values masked to 0), ``O(k B d_in)`` per group."""
    from saejax import kernels_batch, sae

    vals, tok, lat, aux_vals, aux_idx = sae.batchtopk_entries(cfg, params, x, dead)

    def part(lo, hi):
        v = jnp.where((lat >= lo) & (lat < hi), vals, 0.0)
        return kernels_batch.decode_entries(v, tok, lat, params["W_dec"], x.shape[0])

    x_hat, terms = _prefix_losses(cfg, params, x, part)
    fired, l0, min_kept = sae.entry_stats(cfg, vals, lat, x.shape[0])
    aux = sae.sparse_auxk(cfg, params, x, x_hat, dead, aux_vals, aux_idx)
    return sae.Step(x_hat, fired, l0, terms, aux, min_kept)


def _prefix_losses(cfg, params, x, part):
    """``x_hat`` of the full dictionary and the losses of the smaller prefixes, ``part(lo, hi)``
    being the decode of latents ``lo..hi-1`` (no bias)."""
    bounds = (0, *matryoshka_prefixes(cfg))
    x_hat = jnp.broadcast_to(params["b_dec"], x.shape)
    losses = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        x_hat = x_hat + part(lo, hi)
        losses.append(jnp.mean(jnp.sum((x - x_hat) ** 2, axis=1)))
    return x_hat, jnp.stack(losses[:-1]) if len(losses) > 1 else jnp.zeros((0,), x.dtype)


# ----------------------------------------------------------------------------- gated
def gated_latents(params, pre):
    """``1[pi_gate > 0] * relu(pi_mag)`` with ``pi_gate = pre`` and ``pi_mag = (pre - b_gate) *
    exp(r_mag) + b_mag`` (column scaling commutes with the matmul; ``b_gate`` is ``b_enc``)."""
    mag = (pre - params["b_enc"]) * jnp.exp(params["r_mag"]) + params["b_mag"]
    return jnp.where(pre > 0, jax.nn.relu(mag), 0.0)


def _gated_train(cfg, params, pre, hp, ramp):
    return gated_latents(params, pre), jnp.zeros((2,), pre.dtype), jnp.zeros((), pre.dtype)


def _gated_infer(cfg, params, pre, threshold):
    return gated_latents(params, pre)


def _gated_step(cfg, params, x, hp, dead, ramp):
    """Sparsity = ``[ramp * l1_coef * mean_b sum_j relu(pi_gate)_j ||W_dec[j]||, L_aux]``."""
    from saejax import sae

    pre = sae.pre_acts(params, x)
    z = gated_latents(params, pre)
    gate = jax.nn.relu(pre)
    l1 = ramp * hp["l1_coef"] * jnp.mean(gate @ l1_weights(cfg, params))
    via_gate = gate @ jax.lax.stop_gradient(params["W_dec"]) + jax.lax.stop_gradient(params["b_dec"])
    aux = jnp.mean(jnp.sum((x - via_gate) ** 2, axis=1))
    zero = jnp.zeros((), x.dtype)
    return sae.Step(sae.decode(params, z), jnp.any(z > 0, axis=0), jnp.mean(jnp.sum(z > 0, axis=1)),
                    jnp.stack([l1, aux]), zero, zero)


def _gated_params(cfg) -> dict:
    return {"r_mag": jnp.zeros(cfg.d_sae, jnp.float32), "b_mag": jnp.zeros(cfg.d_sae, jnp.float32)}


def _gated_export(cfg, params, threshold) -> dict:
    """SAELens' gated tensors besides ``b_gate`` (saejax's ``b_enc``, see ``saelens_b_enc``): ``r_mag``, ``b_mag``."""
    return {"r_mag": np.asarray(params["r_mag"], np.float32), "b_mag": np.asarray(params["b_mag"], np.float32)}


def _gated_load(tensors: dict) -> dict:
    return {"r_mag": tensors["r_mag"], "b_mag": tensors["b_mag"]}


def _gated_metrics(cfg) -> tuple[str, ...]:
    return ("gate_l1", "gate_aux")


register(Arch("matryoshka", _matryoshka_train, _batchtopk_infer, uses_k=True, ema_threshold=True, dense_arrays=9,
              saelens="jumprelu", to_saelens=_batchtopk_export, from_saelens=_jump_load, loads_as="jumprelu",
              dense_step=_matryoshka_step, sparse_step=_matryoshka_sparse, sparse_arrays=4,
              metrics=_matryoshka_metrics))
register(Arch("gated", _gated_train, _gated_infer, coef="l1_coef", extra_params=_gated_params, dense_arrays=8,
              saelens="gated", to_saelens=_gated_export, from_saelens=_gated_load,
              dense_step=_gated_step, metrics=_gated_metrics, saelens_b_enc="b_gate"))
