"""One training step of one member, and the compiled chunk program ``jit(vmap(scan(step)))``.

:func:`train_step` is Adam on one seed's SAE (tangential decoder gradient, unit-norm rows, dead-
latent tracking, the BatchTopK threshold, failure detection); :func:`chunk_program` vmaps it over
members and scans it over a chunk of steps. The driver is :mod:`saejax.train`.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from functools import lru_cache, partial
from typing import cast

import jax
import jax.numpy as jnp
import optax
from flax import struct

from saejax import archs, precision, resample, sae
from saejax.config import SAEConfig, TrainConfig

METRICS = ("loss", "mse", "fvu", "l0", "aux", "sparsity", "dead_frac", "dec_norm_err")
"""Metrics every member records; an architecture adds the parts of its sparsity term (:func:`metric_names`)."""
MEMBER_AXIS = "member"  # name of the vmapped member axis inside a chunk program
DIVERGENCE = 1e4
"""A member whose loss exceeds this many times its first-step loss has diverged: it is frozen at its
last good step and reported as failed, like a member whose loss or parameters turn non-finite."""
RESAMPLE_STREAM = 0x5E5A  # folded into a member's parameter key for its resampling draws
TRACES: Counter = Counter()  # how often each chunk program was traced (tests assert on it)


@struct.dataclass
class TrainState:
    params: dict
    opt: optax.OptState
    step: jax.Array  # int32 scalar: steps taken
    since_fired: jax.Array  # [d_sae] int32: tokens since each latent last fired (capped)
    threshold: jax.Array  # BatchTopK inference threshold (EMA of the smallest kept value)
    ok: jax.Array  # bool: no non-finite loss so far; a failed member is frozen
    bad_step: jax.Array  # int32: first step whose loss was not finite or diverged, -1 if none
    loss0: jax.Array  # float32: the loss of the first step (the divergence reference), -1 before it
    key: jax.Array  # the member's key for its own random draws during training (resampling)
    resampled: jax.Array  # [max(1, len(resample_steps))] int32: latents resampled at each event


def metric_names(sae_cfg: SAEConfig) -> tuple[str, ...]:
    """:data:`METRICS` and the architecture's own (``Arch.metrics``, e.g. Matryoshka's prefix losses)."""
    return METRICS + tuple(archs.get(sae_cfg.arch).metrics(sae_cfg))


def sparsity_ramp(tc: TrainConfig, step: jax.Array):
    """Multiplier of the L1/L0 coefficient at ``step`` (0-based): ``min(1, step / W)`` for
    ``W = sparsity_warmup_steps``, 0 at the first step; SAELens' ``L1Scheduler`` (its coefficient
    starts at 0 and reaches ``(1 + s) / W`` after step ``s``) and dictionary_learning's
    ``min(step / sparsity_warmup_steps, 1)`` give the same sequence."""
    if not tc.sparsity_warmup_steps:
        return 1.0
    return jnp.minimum(1.0, step.astype(jnp.float32) / tc.sparsity_warmup_steps)


def lr_schedule(tc: TrainConfig, total, step: jax.Array) -> jax.Array:
    """Multiplier of the peak learning rate at ``step`` (0-based); ``total`` may be traced."""
    t = step.astype(jnp.float32)
    warm = jnp.minimum(1.0, (t + 1) / tc.warmup_steps) if tc.warmup_steps else 1.0
    span = jnp.maximum(jnp.asarray(total, jnp.float32) - tc.warmup_steps, 1.0)
    frac = jnp.clip((t - tc.warmup_steps) / span, 0.0, 1.0)
    decay = {"constant": 1.0, "linear": 1.0 - frac, "cosine": 0.5 * (1 + jnp.cos(jnp.pi * frac))}[tc.decay]
    return warm * decay


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """Adam without the learning rate (it is a traced, sweepable float applied in the step)."""
    parts = [optax.clip_by_global_norm(tc.grad_clip)] if tc.grad_clip else []
    return optax.chain(*parts, optax.scale_by_adam(b1=tc.b1, b2=tc.b2, eps=tc.eps))


def _unit_rows(w):
    return w / jnp.maximum(jnp.linalg.norm(w, axis=-1, keepdims=True), 1e-12)


def init_state(sae_cfg: SAEConfig, tc: TrainConfig, key: jax.Array, b_dec: jax.Array) -> TrainState:
    params = sae.init(sae_cfg, key, b_dec)
    return TrainState(params=params, opt=make_optimizer(tc).init(params), step=jnp.zeros((), jnp.int32),
                      since_fired=jnp.zeros(sae_cfg.d_sae, jnp.int32), threshold=jnp.full((), -1.0, jnp.float32),
                      ok=jnp.ones((), bool), bad_step=jnp.full((), -1, jnp.int32),
                      loss0=jnp.full((), -1.0, jnp.float32), key=jax.random.fold_in(key, RESAMPLE_STREAM),
                      resampled=jnp.zeros(max(1, len(tc.resample_steps)), jnp.int32))


def train_step(sae_cfg: SAEConfig, tc: TrainConfig, total: int, state: TrainState, x: jax.Array,
               active: jax.Array, hp: dict, scale: jax.Array, axis_name: str | None = None):
    """One Adam step for one member. ``active`` False (padding past the last step) changes nothing.

    ``axis_name``: the vmapped member axis, if any; AuxK is then skipped while no member has a
    dead latent (see :func:`_loss_and_grads`).
    """
    x = x * scale
    ramp = sparsity_ramp(tc, state.step)
    dead = state.since_fired >= sae_cfg.dead_tokens
    (loss, (metrics, fired, min_kept)), grads = _loss_and_grads(sae_cfg, tc, state.params, x, hp, dead, ramp, axis_name)
    if sae_cfg.unit_norm_decoder:  # only the tangential part of the gradient moves a unit row
        w = state.params["W_dec"]
        g = grads["W_dec"]
        grads = {**grads, "W_dec": g - jnp.sum(g * w, axis=1, keepdims=True) * w}
    updates, opt = make_optimizer(tc).update(grads, state.opt, state.params)
    lr = hp["lr"] * lr_schedule(tc, total, state.step)
    params = cast(dict, optax.apply_updates(state.params, jax.tree.map(lambda u: -lr * u, updates)))  # same tree as state.params
    if sae_cfg.unit_norm_decoder:
        params = {**params, "W_dec": _unit_rows(params["W_dec"])}
    since = jnp.where(fired, 0, jnp.minimum(state.since_fired + x.shape[0], sae_cfg.dead_tokens))
    threshold = state.threshold
    if archs.get(sae_cfg.arch).ema_threshold:
        threshold = jnp.where(threshold < 0, min_kept, 0.99 * threshold + 0.01 * min_kept)
    loss0 = jnp.where(state.loss0 < 0, loss.astype(jnp.float32), state.loss0)
    # a member fails on a non-finite loss or update, or a loss DIVERGENCE times its first one
    finite = jnp.isfinite(loss) & (loss <= DIVERGENCE * jnp.maximum(loss0, 1e-6)) & jnp.all(
        jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(params)]))
    take = active & state.ok & finite
    new = dataclasses.replace(state, params=params, opt=opt, step=state.step + 1, since_fired=since, threshold=threshold, loss0=loss0,
                              ok=state.ok & (finite | ~active),
                              bad_step=jnp.where(state.ok & active & ~finite, state.step, state.bad_step))
    kept = jax.tree.map(lambda a, b: jnp.where(take, a, b), new, state)
    kept = resample.maybe_resample(sae_cfg, tc, kept.replace(ok=new.ok, bad_step=new.bad_step), x, axis_name)
    metrics = dict(metrics, dead_frac=jnp.mean(kept.since_fired >= sae_cfg.dead_tokens),
                   dec_norm_err=jnp.max(jnp.abs(jnp.linalg.norm(kept.params["W_dec"], axis=1) - 1.0)))
    return kept, metrics


SHARED_AUXK = True
"""AuxK from the shared dead set while at most ``n_aux`` latents are dead (:class:`saejax.sae.DeadSet`);
False forces the per-token path everywhere. Read when a program is traced (tests and benchmarks only)."""


def _loss_and_grads(sae_cfg, tc, params, x, hp, dead, ramp, axis_name):
    """``value_and_grad`` of :func:`saejax.sae.loss`, with AuxK's work cut to what it needs.

    Three exact branches, on the largest ``need`` over the vmapped member axis (a ``pmax``: a
    predicate shared by all members keeps ``lax.switch`` a real branch under ``vmap`` instead of
    a select that runs every side):

    0. no member has a dead latent: AuxK is exactly 0 in value and gradient, and is skipped;
    1. every member has at most ``n_aux`` dead: each token's top-``n_aux`` among dead latents is
       all of them, so AuxK is ``relu(pre[:, idx]) @ W_dec[idx]`` over the shared dead set ``idx``
       (:func:`saejax.sae.dead_set`), a small dense matmul;
    2. otherwise the per-token top-``n_aux`` (the ``[d_sae]`` mask).
    """
    def run(cfg, dead_arg):
        fn = jax.value_and_grad(precision.in_compute_dtype(partial(sae.loss, cfg), tc.compute_dtype), has_aux=True)
        return fn(params, x, hp, dead_arg, ramp)

    n_aux = sae_cfg.n_aux
    if n_aux == 0:
        return run(sae_cfg, dead)
    n_dead = jnp.sum(dead)
    need = jnp.where(n_dead == 0, 0, jnp.where((n_dead <= n_aux) & SHARED_AUXK, 1, 2)).astype(jnp.int32)
    if axis_name is not None:
        need = jax.lax.pmax(need, axis_name)
    return jax.lax.switch(need, [lambda: run(sae_cfg.replace(aux_k=0), dead),
                                 lambda: run(sae_cfg, sae.dead_set(dead, n_aux)),
                                 lambda: run(sae_cfg, dead)])


def program_key(tc: TrainConfig) -> TrainConfig:
    """The train config as the compiled program sees it: the training length is a traced input,
    so runs of any length with otherwise equal configs share one compile."""
    return tc.replace(steps=1, epochs=None)


@lru_cache(maxsize=32)
def init_program(sae_cfg: SAEConfig, tc: TrainConfig, out_shardings):
    """``jit(vmap(init_state))`` over member keys; cached so a later run of the same shape compiles
    nothing (``tc`` as :func:`program_key` gives it)."""
    return jax.jit(jax.vmap(partial(init_state, sae_cfg, tc), in_axes=(0, None)), out_shardings=out_shardings)


@lru_cache(maxsize=32)
def chunk_program(sae_cfg: SAEConfig, tc: TrainConfig, shared_data: bool):
    """``jit(vmap(loop(train_step)))`` for a chunk; cached so equal configs compile once. Only the
    chunk's first ``sum(actives)`` steps run (a loop with a traced trip count, shared by all
    members); the steps past the end are never executed, so a short call costs nothing for the
    chunk's unused length (a ``lax.cond`` per step copied the whole state through each skipped one)."""

    def member(state, xs, actives, hp, scale, total):
        TRACES[(sae_cfg, tc, shared_data)] += 1  # runs only while tracing

        def step(st, x):
            return train_step(sae_cfg, tc, total, st, x, jnp.ones((), bool), hp, scale, MEMBER_AXIS)

        def body(i, carry):
            st, ms = carry
            st, m = step(st, xs[i])
            return st, {k: ms[k].at[i].set(m[k]) for k in ms}

        like = jax.eval_shape(step, state, xs[0])[1]
        ms = {k: jnp.zeros((xs.shape[0], *v.shape), v.dtype) for k, v in like.items()}
        # the active steps are a prefix of the chunk (it is padded at its end)
        state, m = jax.lax.fori_loop(0, jnp.sum(actives, dtype=jnp.int32), body, (state, ms))
        w = actives.reshape(-1, tc.log_every).astype(jnp.float32)  # window means over active steps
        m = {k: jnp.sum(v.reshape(w.shape) * w, 1) / jnp.maximum(w.sum(1), 1) for k, v in m.items()}
        return state, m

    data_axis = None if shared_data else 0
    return jax.jit(jax.vmap(member, in_axes=(0, data_axis, None, 0, None, None), axis_name=MEMBER_AXIS),
                   donate_argnums=(0,))
