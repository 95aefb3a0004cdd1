"""Dead-latent resampling inside the compiled training step (Bricken et al. 2023, "Towards
Monosemanticity", section "Neuron resampling"; the recipe of Anthropic's April 2023 update).

At each step of ``TrainConfig.resample_steps`` (counted from 1: after that many optimiser steps),
every latent of a member that is dead (not fired within the last ``SAEConfig.dead_tokens`` tokens)
is re-initialised towards an input the SAE reconstructs badly:

- inputs are drawn from that step's batch without replacement, with probability proportional to
  the square of their loss ``||x - x_hat||^2`` (Gumbel top-k over ``2 log loss``); with more dead
  latents than batch rows the draws repeat cyclically. (Anthropic score a separate sample of
  819,200 inputs; dictionary_learning, like saejax, uses the current batch, but samples
  proportional to the loss itself, not its square.)
- the decoder row becomes the unit-normalised input ``v / ||v||``; the encoder column becomes
  ``resample_scale * mean_alive ||W_enc[:, j]|| * v / ||v||`` (0.2 in the recipe), the encoder
  bias 0, any per-latent extra parameter (a JumpReLU threshold, gated ``r_mag``/``b_mag``) its
  initial value, and Adam's first and second moments of all of them 0.

Everything is a mask over ``[d_sae]`` (static shapes), per member inside the vmapped program, and
the draws come from the member's own key, so a member resamples exactly as it would alone.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from saejax import archs, sae
from saejax.config import SAEConfig, TrainConfig


def latent_axis(name: str) -> int | None:
    """Axis of a parameter that indexes latents (None: ``b_dec`` has none)."""
    return {"W_enc": 1, "b_dec": None}.get(name, 0)


def masked(tree: Any, new: Any, mask: jax.Array) -> dict:
    """``new`` where ``mask`` (``[d_sae]``) is set, ``tree`` elsewhere, per parameter."""
    out = {}
    for name, old in tree.items():
        ax = latent_axis(name)
        if ax is None:
            out[name] = old
            continue
        m = mask[None, :] if ax == 1 else mask.reshape((-1,) + (1,) * (old.ndim - 1))
        out[name] = jnp.where(m, new[name], old)
    return out


def _zero_moments(opt, mask: jax.Array):
    """Adam's ``mu`` and ``nu`` set to 0 on the masked latents (other optimiser states untouched)."""
    def fix(s):
        if isinstance(s, optax.ScaleByAdamState):
            zeros = lambda t: jax.tree.map(jnp.zeros_like, t)  # noqa: E731
            return s._replace(mu=masked(s.mu, zeros(s.mu), mask), nu=masked(s.nu, zeros(s.nu), mask))
        return s
    return jax.tree.map(fix, opt, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))


def _draws(key: jax.Array, loss: jax.Array, dead: jax.Array) -> jax.Array:
    """For every latent, the batch row it is resampled towards (only dead latents use theirs)."""
    m = min(loss.shape[0], dead.shape[0])
    logits = 2.0 * jnp.log(jnp.maximum(loss, 1e-30))  # probability proportional to loss**2
    _, order = jax.lax.top_k(logits + jax.random.gumbel(key, loss.shape), m)  # without replacement
    rank = jnp.cumsum(dead) - 1  # the i-th dead latent takes the i-th draw
    return order[jnp.mod(jnp.maximum(rank, 0), m)]


def resample(cfg: SAEConfig, tc: TrainConfig, state, x: jax.Array, key: jax.Array):
    """``(state, n)``: ``state`` with its dead latents resampled towards rows of ``x`` (already in
    training units), and ``n`` the number resampled."""
    params = state.params
    dead = state.since_fired >= cfg.dead_tokens
    arch = archs.get(cfg.arch)
    x_hat = sae.decode(params, sae.encode(cfg, params, x, arch.threshold(state.threshold)))
    loss = jnp.sum((x - x_hat) ** 2, axis=1)
    v = x[_draws(key, loss, dead)]  # [d_sae, d_in]
    v = v / jnp.maximum(jnp.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    enc_norm = jnp.linalg.norm(params["W_enc"], axis=0)
    alive = ~dead
    mean_alive = jnp.where(jnp.any(alive), jnp.sum(enc_norm * alive) / jnp.maximum(jnp.sum(alive), 1), 1.0)
    new = {**params, "W_dec": v, "W_enc": (tc.resample_scale * mean_alive * v).T,
           "b_enc": jnp.zeros_like(params["b_enc"]), **arch.extra_params(cfg)}
    out = state.replace(params=masked(params, new, dead), opt=_zero_moments(state.opt, dead),
                        since_fired=jnp.where(dead, 0, state.since_fired))
    return out, jnp.sum(dead).astype(jnp.int32)


def maybe_resample(cfg: SAEConfig, tc: TrainConfig, state, x: jax.Array, axis_name: str | None):
    """:func:`resample` on the steps of ``tc.resample_steps``, recording the count per event in
    ``state.resampled``; other steps return ``state`` unchanged. The branch is taken when any
    member is at an event (a ``psum`` over the member axis keeps ``lax.cond`` a real branch under
    ``vmap``), and applied to the members that are."""
    if not tc.resample_steps:
        return state
    events = jnp.asarray(tc.resample_steps, jnp.int32)
    hit = (events == state.step) & state.ok  # state.step: steps taken, including this one
    now = jnp.any(hit).astype(jnp.int32)
    if axis_name is not None:
        now = jax.lax.psum(now, axis_name)

    def run():
        new, n = resample(cfg, tc, state, x, jax.random.fold_in(state.key, state.step))
        new = new.replace(resampled=jnp.where(hit, n, state.resampled))
        return jax.tree.map(lambda a, b: jnp.where(jnp.any(hit), a, b), new, state)

    return jax.lax.cond(now > 0, run, lambda: state)
