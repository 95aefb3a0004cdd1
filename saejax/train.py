"""The multi-seed trainer: one compiled program trains every seed (and swept float) at once.

``jit(vmap(scan(step)))``: ``vmap`` over *members* (seed x swept-hyper-parameter combinations),
``lax.scan`` over the steps of a chunk. Between chunks the host prepares the next batches while
the device runs (JAX dispatch is asynchronous) and a progress bar updates; every chunk has the
same shapes, so the program is traced once (the last chunk masks its surplus steps).

Seed ``s``'s parameter key is ``fold_in(PRNGKey(root_seed), s)``: adding seeds never changes the
existing ones, and a seed trained in an ensemble equals the same seed trained alone.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache, partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from saejax import archs, kernels, precision, sae, sharding
from saejax.config import SAEConfig, TrainConfig, closest
from saejax.data import Source
from saejax.errors import ConfigError, check

SWEEPABLE = ("lr", "l1_coef", "l0_coef", "aux_coef")
METRICS = ("loss", "mse", "fvu", "l0", "aux", "sparsity", "dead_frac", "dec_norm_err")
MEMBER_AXIS = "member"  # name of the vmapped member axis inside a chunk program
DIVERGENCE = 1e4
"""A member whose loss exceeds this many times its first-step loss has diverged: it is frozen at its
last good step and reported as failed, like a member whose loss or parameters turn non-finite."""
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


@dataclass
class TrainResult:
    """Stacked parameters (leading member axis), metric history and the bookkeeping to read them.

    Members are ordered hyper-parameter-major: member ``h * len(seeds) + i`` is seed ``seeds[i]``
    with the ``h``-th swept combination ``sweep_points[h]``.
    """

    sae_cfg: SAEConfig
    train_cfg: TrainConfig
    seeds: tuple[int, ...]
    sweep_points: tuple[dict, ...]
    params: dict  # leaves [M, ...], in normalised units
    scale: float  # input normaliser c (see sae.fold_scale)
    threshold: np.ndarray  # [M] BatchTopK threshold
    since_fired: np.ndarray  # [M, d_sae]
    history: dict  # name -> [M, n_logs]
    log_steps: np.ndarray  # [n_logs] step at the end of each window
    failed: dict = field(default_factory=dict)  # member -> first bad step
    seconds: float = 0.0

    @property
    def n_members(self) -> int:
        return len(self.seeds) * len(self.sweep_points)

    def select(self, h: int) -> "TrainResult":
        """The seeds of swept combination ``h`` only (leading axis = seeds)."""
        s = len(self.seeds)
        sl = slice(h * s, (h + 1) * s)
        return TrainResult(
            self.sae_cfg, self.train_cfg, self.seeds, (self.sweep_points[h],),
            jax.tree.map(lambda a: a[sl], self.params), self.scale, self.threshold[sl],
            self.since_fired[sl], {k: v[sl] for k, v in self.history.items()}, self.log_steps,
            {m - h * s: st for m, st in self.failed.items() if h * s <= m < (h + 1) * s}, self.seconds)

    def raw_params(self) -> dict:
        """Parameters in the units of the original activations (scale folded in)."""
        return sae.fold_scale(self.params, self.scale)

    def decoders(self) -> np.ndarray:
        """``[M, d_sae, d_in]`` decoder rows (directions are scale-invariant)."""
        return np.asarray(self.params["W_dec"])

    def encoders(self) -> np.ndarray:
        """``[M, d_sae, d_in]`` encoder columns as rows."""
        return np.asarray(self.params["W_enc"]).transpose(0, 2, 1)


# ----------------------------------------------------------------------------- one step
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
                      loss0=jnp.full((), -1.0, jnp.float32))


def train_step(sae_cfg: SAEConfig, tc: TrainConfig, total: int, state: TrainState, x: jax.Array,
               active: jax.Array, hp: dict, scale: jax.Array, axis_name: str | None = None):
    """One Adam step for one member. ``active`` False (padding past the last step) changes nothing.

    ``axis_name``: the vmapped member axis, if any; AuxK is then skipped while no member has a
    dead latent (see :func:`_loss_and_grads`).
    """
    x = x * scale
    ramp = jnp.minimum(1.0, (state.step + 1) / tc.sparsity_warmup_steps) if tc.sparsity_warmup_steps else 1.0
    dead = state.since_fired >= sae_cfg.dead_tokens
    (loss, (metrics, fired, min_kept)), grads = _loss_and_grads(sae_cfg, tc, state.params, x, hp, dead, ramp, axis_name)
    if sae_cfg.unit_norm_decoder:  # only the tangential part of the gradient moves a unit row
        w = state.params["W_dec"]
        g = grads["W_dec"]
        grads = {**grads, "W_dec": g - jnp.sum(g * w, axis=1, keepdims=True) * w}
    updates, opt = make_optimizer(tc).update(grads, state.opt, state.params)
    lr = hp["lr"] * lr_schedule(tc, total, state.step)
    params = optax.apply_updates(state.params, jax.tree.map(lambda u: -lr * u, updates))
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
    new = TrainState(params=params, opt=opt, step=state.step + 1, since_fired=since, threshold=threshold, loss0=loss0,
                     ok=state.ok & (finite | ~active),
                     bad_step=jnp.where(state.ok & active & ~finite, state.step, state.bad_step))
    kept = jax.tree.map(lambda a, b: jnp.where(take, a, b), new, state)
    kept = kept.replace(ok=new.ok, bad_step=new.bad_step)
    metrics = dict(metrics, dead_frac=jnp.mean(kept.since_fired >= sae_cfg.dead_tokens),
                   dec_norm_err=jnp.max(jnp.abs(jnp.linalg.norm(kept.params["W_dec"], axis=1) - 1.0)))
    return kept, metrics


def _loss_and_grads(sae_cfg, tc, params, x, hp, dead, ramp, axis_name):
    """``value_and_grad`` of :func:`saejax.sae.loss`, without AuxK's work while nothing is dead.

    AuxK is exactly 0, in value and gradient, while no latent is dead, yet its top-``n_aux`` and
    decode cost as much as the rest of a sparse step. The branch is taken on "any member has a
    dead latent" (a ``psum`` over the vmapped member axis): a predicate shared by all members
    keeps ``lax.cond`` a real branch under ``vmap`` instead of a select that runs both sides.
    """
    def run(cfg):
        fn = jax.value_and_grad(precision.in_compute_dtype(partial(sae.loss, cfg), tc.compute_dtype), has_aux=True)
        return fn(params, x, hp, dead, ramp)

    if sae_cfg.n_aux == 0:
        return run(sae_cfg)
    any_dead = jnp.any(dead).astype(jnp.int32)
    if axis_name is not None:
        any_dead = jax.lax.psum(any_dead, axis_name)
    return jax.lax.cond(any_dead > 0, lambda: run(sae_cfg), lambda: run(sae_cfg.replace(aux_k=0)))


def program_key(tc: TrainConfig) -> TrainConfig:
    """The train config as the compiled program sees it: the training length is a traced input,
    so runs of any length with otherwise equal configs share one compile."""
    return tc.replace(steps=1, epochs=None)


@lru_cache(maxsize=32)
def chunk_program(sae_cfg: SAEConfig, tc: TrainConfig, shared_data: bool):
    """``jit(vmap(scan(train_step)))`` for a chunk; cached so equal configs compile once. Steps
    past the end (``actives`` False) are skipped by a ``lax.cond`` on an unbatched predicate."""

    def member(state, xs, actives, hp, scale, total):
        TRACES[(sae_cfg, tc, shared_data)] += 1  # runs only while tracing

        def step(st, x):
            return train_step(sae_cfg, tc, total, st, x, jnp.ones((), bool), hp, scale, MEMBER_AXIS)

        def body(st, inp):
            skip = lambda: (st, jax.tree.map(jnp.zeros_like, jax.eval_shape(step, st, inp[0])[1]))  # noqa: E731
            return jax.lax.cond(inp[1], lambda: step(st, inp[0]), skip)

        state, m = jax.lax.scan(body, state, (xs, actives))
        w = actives.reshape(-1, tc.log_every).astype(jnp.float32)  # window means over active steps
        m = {k: jnp.sum(v.reshape(w.shape) * w, 1) / jnp.maximum(w.sum(1), 1) for k, v in m.items()}
        return state, m

    data_axis = None if shared_data else 0
    return jax.jit(jax.vmap(member, in_axes=(0, data_axis, None, 0, None, None), axis_name=MEMBER_AXIS),
                   donate_argnums=(0,))


# ----------------------------------------------------------------------------- driver
def sweep_grid(sae_cfg: SAEConfig, tc: TrainConfig, sweep: dict | None) -> tuple[dict, ...]:
    """Cartesian product of swept floats; unswept ones take the configs' values."""
    sweep = dict(sweep or {})
    for name, vals in sweep.items():
        check(name in SWEEPABLE, f"cannot sweep {name!r} inside one program; sweepable floats: {SWEEPABLE}{closest(name, SWEEPABLE)}")
        check(len(vals) > 0, f"sweep of {name!r} is empty")
    base = {"lr": tc.lr, "l1_coef": sae_cfg.l1_coef, "l0_coef": sae_cfg.l0_coef, "aux_coef": sae_cfg.aux_coef}
    names = list(sweep)
    return tuple({**base, **dict(zip(names, combo))} for combo in itertools.product(*(sweep[n] for n in names)))


def _check_seeds(seeds) -> tuple[int, ...]:
    seeds = tuple(seeds)
    check(len(seeds) > 0, "seed list is empty; give at least one integer seed")
    for s in seeds:
        check(isinstance(s, (int, np.integer)) and not isinstance(s, bool), f"seeds must be integers, got {s!r}")
    dup = [s for s, n in Counter(seeds).items() if n > 1]
    check(not dup, f"duplicate seeds {dup}: each seed must appear once")
    return tuple(int(s) for s in seeds)


def _init_sample(source: Source, tc: TrainConfig) -> np.ndarray:
    it = source.batches(min(tc.init_tokens, source.n_tokens or tc.init_tokens), seed=tc.data_seed)
    return np.asarray(next(it), np.float32)


def _fill(its, chunk: int, bs: int, d: int, remaining: int) -> tuple[np.ndarray, np.ndarray]:
    """Next chunk of batches ``[len(its), chunk, B, d]`` and the mask of real (non-padding) steps."""
    n = min(chunk, remaining)
    xs = np.zeros((len(its), chunk, bs, d), np.float32)
    for i, it in enumerate(its):
        for t in range(n):
            xs[i, t] = next(it)
    if not np.isfinite(xs).all():
        raise ConfigError(f"activation data contains NaN/inf values (in a batch before step {remaining}); clean the source")
    return xs, np.arange(chunk) < n


def train(sae_cfg: SAEConfig, tc: TrainConfig, source: Source, seeds, *, sweep: dict | None = None,
          progress: bool = True, max_group: int | None = None, stops=(), on_stop=None,
          checkpoint=None, mesh=None) -> TrainResult:
    """Train one SAE per (seed, swept combination) on ``source``, all in one compiled program.

    Args:
      sae_cfg, tc: the SAE and training configuration.
      source: an activation source (:mod:`saejax.data`); its ``d_in`` must equal ``sae_cfg.d_in``.
      seeds: distinct integer seeds; seed ``s`` initialises from ``fold_in(PRNGKey(tc.root_seed), s)``.
      sweep: optional ``{name: [values]}`` of floats in :data:`SWEEPABLE`, vmapped as a second axis.
      max_group: train at most this many members per compiled call (same results, less memory).
      stops: steps at which ``on_stop(group, step, state)`` sees the host copy of the state of
        that group of members (exactly at that step; 0 = before training), e.g. for stability
        snapshots during training.
      checkpoint: a :class:`saejax.checkpoint.Checkpointer`; a killed run resumes from its last save.
      mesh: a ``('members', 'batch')`` device mesh (:func:`saejax.sharding.make_mesh`) over which
        members and batches are sharded; ``None`` builds one per group from every device and
        ``tc.mesh_shape``. Results do not depend on it.
    """
    seeds = _check_seeds(seeds)
    check(source.d_in == sae_cfg.d_in, f"activations have d_in={source.d_in} but the SAE config says d_in={sae_cfg.d_in}")
    points = sweep_grid(sae_cfg, tc, sweep)
    total = tc.total_steps(source.n_tokens)
    sample = _init_sample(source, tc)
    scale = sae.input_scale(sae_cfg, sample)
    b_dec = sae.b_dec_init(sae_cfg, sample * scale)
    members = [(h, s) for h in range(len(points)) for s in seeds]
    check(max_group is None or max_group > 0, f"max_group must be positive, got {max_group!r}")
    group = max_group or auto_group_size(sae_cfg, tc, len(members))
    t0 = time.perf_counter()
    parts = [_train_group(sae_cfg, tc, source, members[i:i + group], points, total, scale, b_dec, progress,
                          i // group, stops, on_stop, checkpoint, mesh)
             for i in range(0, len(members), group)]
    state = jax.tree.map(lambda *a: np.concatenate(a), *[p[0] for p in parts])
    history = {k: np.concatenate([p[1][k] for p in parts]) for k in METRICS}
    log_steps = parts[0][2]
    bad = np.asarray(state.bad_step)
    failed = {int(m): int(bad[m]) for m in np.flatnonzero(bad >= 0)}
    for m, st in failed.items():
        h, s = members[m]
        print(f"warning: seed {s} (sweep point {h}: {points[h]}) failed at step {st} (non-finite or diverged "
              "loss or parameters); it is frozen at its last good step and left out of its cell's statistics")
    return TrainResult(sae_cfg, tc, seeds, points, state.params, scale, np.asarray(state.threshold),
                       np.asarray(state.since_fired), history, log_steps, failed, time.perf_counter() - t0)


# ----------------------------------------------------------------------------- memory
def member_bytes(sae_cfg: SAEConfig, tc: TrainConfig) -> int:
    """Estimated device bytes per member of a chunk program, before compiling it.

    Parameters, Adam's two moments and the gradient/update temporaries (``~5 P``), plus the
    step's activations: the dense path keeps about nine ``[B, d_sae]`` arrays alive (pre-
    activations, latents, their cotangents, AuxK's masked copy and scatter), the sparse path only
    ``[chunk, d_sae]`` encoder chunks, ``[B, k + n_aux]`` selections and bounded gather/scatter
    chunks. Calibrated against XLA's compiled memory analysis on CPU for every architecture and
    both kernels: it errs on the high side (by 5-90%; the dense TopK shapes by ~20%).
    """
    d, n, bs = sae_cfg.d_in, sae_cfg.d_sae, tc.batch_size
    arch = archs.get(sae_cfg.arch)
    extra = sum(int(np.prod(v.shape)) for v in jax.eval_shape(lambda: arch.extra_params(sae_cfg)).values())
    n_params = 2 * d * n + n + d + extra
    f32 = 4
    acts = 6 * bs * d
    if sae_cfg.kernel == "sparse":
        kk = sae_cfg.k + sae_cfg.n_aux
        acts += 3 * kernels.ENCODE_CHUNK * n + 8 * bs * kk + 2 * kernels.CHUNK_BYTES // f32
    else:
        acts += arch.dense_arrays * bs * n
    return f32 * (5 * n_params + acts)


def memory_budget() -> tuple[int, str]:
    """Bytes the chunk program may use, and where the figure comes from.

    Accelerators report ``bytes_limit`` and ``bytes_in_use`` (summed over the local devices, over
    which members are sharded); a CPU backend reports nothing, so 70% of the host's RAM is used.
    """
    stats = [dev.memory_stats() for dev in jax.local_devices()]
    if all(st and "bytes_limit" in st for st in stats):
        free = sum(st["bytes_limit"] - st.get("bytes_in_use", 0) for st in stats)
        return int(0.9 * free), f"{len(stats)} x {jax.local_devices()[0].device_kind} memory"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(0.7 * ram), "70% of host RAM"


def auto_group_size(sae_cfg: SAEConfig, tc: TrainConfig, n_members: int) -> int:
    """Largest balanced group size such that the fewest groups of members fit :func:`memory_budget`.

    Prints the split when one is needed; a single member that does not fit is tried anyway.
    """
    per = member_bytes(sae_cfg, tc)
    data = 2 * min(tc.chunk_bytes, tc.chunk_steps * tc.batch_size * sae_cfg.d_in * 4)  # this chunk and the next
    if not tc.same_data_order:
        per += data
        data = 0
    budget, where = memory_budget()
    fit = max(1, (budget - data) // per)
    if fit >= n_members:
        return n_members
    n_groups = -(-n_members // fit)
    group = -(-n_members // n_groups)
    gib = 2.0**30
    print(f"saejax: {n_members} SAEs need ~{(data + n_members * per) / gib:.1f} GiB (~{per / gib:.2f} GiB each) but "
          f"~{budget / gib:.1f} GiB is available ({where}); training them in {n_groups} groups of at most "
          f"{group} (same results, one group after another)")
    return group


def _train_group(sae_cfg, tc, source, members, points, total, scale, b_dec, progress, group=0,
                 stops=(), on_stop=None, checkpoint=None, mesh=None):
    # Members are padded to a multiple of the mesh's member axis (copies of the last one) and
    # trimmed whenever state or metrics leave the device, so callbacks and checkpoints never see
    # the padding and a checkpoint resumes on any mesh.
    n = len(members)
    mesh = mesh if mesh is not None else sharding.make_mesh(n, tc.batch_size, tc.mesh_shape)
    n_pad = sharding.padded_size(n, mesh)
    on_members = sharding.members_spec(mesh)
    rep = sharding.replicated(mesh)
    keys = jnp.stack([jax.random.fold_in(jax.random.PRNGKey(tc.root_seed), s) for _, s in members])
    hp = {k: jnp.asarray([points[h][k] for h, _ in members], jnp.float32) for k in points[0]}
    keys, hp = sharding.pad_members((keys, hp), n_pad)
    hp = sharding.put_tree(hp, on_members)
    init = jax.jit(jax.vmap(partial(init_state, sae_cfg, tc), in_axes=(0, None)), out_shardings=on_members)
    state = init(sharding.put(keys, rep), sharding.put(np.asarray(b_dec, np.float32), rep))

    def to_host(tree):
        return sharding.trim_members(sharding.to_host(tree), n)

    bs, d = tc.batch_size, sae_cfg.d_in
    shared = tc.same_data_order
    low = precision.compute_dtype(tc.compute_dtype)
    x_spec = sharding.data_spec(mesh, 3, 1) if shared else sharding.members_spec(mesh, 4, 2)

    def put_x(xs):  # bf16 activations travel and live on the device as bf16
        xs = xs[0] if shared else sharding.pad_members(xs, n_pad)
        return sharding.put(xs.astype(low) if low != jnp.float32 else xs, x_spec)

    per_chunk_cap = max(1, tc.chunk_bytes // (bs * d * 4 * (1 if shared else len(members))))
    chunk = max(tc.log_every, min(tc.chunk_steps, per_chunk_cap))  # not the length: one program for any length
    chunk -= chunk % tc.log_every
    if shared:
        its = [source.batches(bs, seed=tc.data_seed)]
    else:  # each seed its own order; swept copies of a seed see that same order
        its = [source.batches(bs, seed=own_order_seed(tc.data_seed, s)) for _, s in members]
    history = {k: np.zeros((len(members), 0), np.float32) for k in METRICS}
    log_steps, done = np.zeros(0, np.int64), 0
    like = jax.tree.map(lambda a: jax.ShapeDtypeStruct((n, *a.shape[1:]), a.dtype), state)
    if checkpoint is not None and (saved := checkpoint.restore(group, like)) is not None:
        done, state, history, log_steps = saved
        state = sharding.put_tree(sharding.pad_members(sharding.to_host(state), n_pad), on_members)
        for it in its:  # the data order is deterministic: skip what was already trained on
            for _ in range(done):
                next(it)
    stops = sorted({int(s) for s in stops if done <= s <= total} | {total})
    if stops[0] == 0 and done == 0 and on_stop is not None:
        on_stop(group, 0, to_host(state))
    program = chunk_program(sae_cfg, program_key(tc), shared)
    total_dev = sharding.put(np.int32(total), rep)
    bar = _progress(total, progress, len(members), bs, done)
    last_ckpt = done
    xs, act = _fill(its, chunk, bs, d, next(s for s in stops if s > done) - done) if done < total else (None, None)
    scale_dev = sharding.put(np.float32(scale), rep)
    while done < total:
        state, m = program(state, put_x(xs), sharding.put(act, rep), hp, scale_dev, total_dev)
        n_steps = int(act.sum())
        ends = done + np.minimum(np.arange(1, chunk // tc.log_every + 1) * tc.log_every, n_steps)
        real = np.concatenate([[True], ends[1:] > ends[:-1]])
        done += n_steps
        if done < total:  # prepare the next chunk while the device works
            xs, act = _fill(its, chunk, bs, d, next(s for s in stops if s > done) - done)
        m = to_host(m)
        history = {k: np.concatenate([history[k], m[k][:, real]], axis=1) for k in METRICS}
        log_steps = np.concatenate([log_steps, ends[real]])
        if on_stop is not None and done in stops:
            on_stop(group, done, to_host(state))
        if checkpoint is not None and done < total and done - last_ckpt >= checkpoint.every:
            checkpoint.save(group, done, to_host(state), history, log_steps)
            last_ckpt = done
        if bar is not None:
            bar.update(n_steps)
            bar.set_postfix(loss=f"{np.nanmean(m['loss'][:, real][:, -1]):.4g}", l0=f"{np.nanmean(m['l0'][:, real][:, -1]):.1f}")
    if bar is not None:
        bar.close()
    return to_host(state), history, log_steps


def own_order_seed(data_seed: int, seed: int) -> int:
    """Data-order seed of ``seed`` when seeds do not share one order (stable across machines)."""
    return int(np.random.SeedSequence([data_seed, seed]).generate_state(1)[0])


def _progress(total: int, enabled: bool, n_members: int, bs: int, done: int = 0):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, unit="step", desc=f"{n_members} SAEs x {bs} tok", leave=False,
                unit_scale=False, dynamic_ncols=True)


# ----------------------------------------------------------------------------- evaluation
@partial(jax.jit, static_argnums=0)
def _eval_member(sae_cfg: SAEConfig, params, threshold, x):
    z = sae.encode(sae_cfg, params, x, archs.get(sae_cfg.arch).threshold(threshold))
    err = sae.decode(params, z) - x
    return z, {"mse": jnp.mean(err**2), "fvu": jnp.sum(err**2) / jnp.sum((x - x.mean(0)) ** 2),
               "l0": jnp.mean(jnp.sum(z > 0, axis=1)), "fired": jnp.any(z > 0, axis=0)}


def evaluate(result: TrainResult, x: np.ndarray, *, batch: int = 4096, keep_latents: bool = False) -> dict:
    """Held-out metrics per member: ``mse`` (per element, normalised units), ``fvu``, ``ev``,
    ``l0``, ``alive`` (``[M, d_sae]``: fired at least once on ``x``), ``dead_frac``, and with
    ``keep_latents`` the latents ``[M, n, d_sae]``."""
    x = np.asarray(x, np.float32) * result.scale
    check(x.ndim == 2 and x.shape[1] == result.sae_cfg.d_in, f"held-out data must be [n, {result.sae_cfg.d_in}], got {x.shape}")
    fn = jax.vmap(partial(_eval_member, result.sae_cfg), in_axes=(0, 0, None))
    sse = np.zeros(result.n_members)
    l0 = np.zeros(result.n_members)
    alive = np.zeros((result.n_members, result.sae_cfg.d_sae), bool)
    lat = []
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        z, m = jax.device_get(fn(result.params, jnp.asarray(result.threshold), jnp.asarray(xb)))
        sse += m["mse"] * xb.size
        l0 += m["l0"] * len(xb)
        alive |= m["fired"]
        if keep_latents:
            lat.append(z)
    var = np.sum((x - x.mean(0)) ** 2)
    out = {"mse": sse / x.size, "fvu": sse / var, "l0": l0 / len(x), "alive": alive,
           "dead_frac": 1.0 - alive.mean(1)}
    out["ev"] = 1.0 - out["fvu"]
    if keep_latents:
        out["latents"] = np.concatenate(lat, axis=1)
    return out
