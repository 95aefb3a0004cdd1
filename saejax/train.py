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
import time
from dataclasses import dataclass, field
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from saejax import archs, precision, sae, sharding
from saejax.config import SAEConfig, TrainConfig, check_seeds, closest
from saejax.data import Source, Stream
from saejax.errors import ConfigError, check, stop_if_requested
from saejax.memory import auto_group_size, member_bytes, memory_budget  # noqa: F401  (re-exported)
from saejax.progress import bar as progress_bar
from saejax.step import (  # noqa: F401
    DIVERGENCE,
    MEMBER_AXIS,
    METRICS,
    TRACES,
    TrainState,
    chunk_program,
    init_program,
    init_state,
    lr_schedule,
    make_optimizer,
    metric_names,
    program_key,
    train_step,
)

SWEEPABLE = ("lr", "l1_coef", "l0_coef", "aux_coef")


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
    resampled: np.ndarray | None = None  # [M, n_events] latents resampled per event (resample_steps)
    steady_seconds: float | None = None  # training time net of compilation: steps x steady time per step

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
            {m - h * s: st for m, st in self.failed.items() if h * s <= m < (h + 1) * s}, self.seconds,
            None if self.resampled is None else self.resampled[sl])

    def raw_params(self) -> dict:
        """Parameters in the units of the original activations (scale folded in)."""
        return sae.fold_scale(self.params, self.scale)

    def decoders(self) -> np.ndarray:
        """``[M, d_sae, d_in]`` decoder rows (directions are scale-invariant)."""
        return np.asarray(self.params["W_dec"])

    def encoders(self) -> np.ndarray:
        """``[M, d_sae, d_in]`` encoder columns as rows."""
        return np.asarray(self.params["W_enc"]).transpose(0, 2, 1)


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


def _init_sample(source: Source, tc: TrainConfig) -> np.ndarray:
    it = source.batches(min(tc.init_tokens, source.n_tokens or tc.init_tokens), seed=tc.data_seed)
    return np.asarray(next(it), np.float32)


def _fill(streams, chunk: int, rows: slice, d: int, n: int, start: int) -> tuple[np.ndarray, np.ndarray]:
    """The next ``n`` steps' batches (their ``rows``), padded to ``[len(streams), chunk, rows, d]``,
    and the mask of real (non-padding) steps; ``start`` is the number of steps already trained (for
    the error message). A stream listed twice (a padding member) is read once."""
    xs = np.zeros((len(streams), chunk, rows.stop - rows.start, d), np.float32)
    first: dict = {}
    finite = np.ones(chunk, bool)
    # one member at a time, so that no single NumPy call holds the GIL for long while the device
    # runs the previous chunk (its host top-k, saejax.topk.host_top_k, needs the GIL)
    for i, stream in enumerate(streams):
        if id(stream) in first:
            xs[i] = xs[first[id(stream)]]
        else:
            first[id(stream)] = i
            stream.fill(xs[i, :n], rows)
            finite &= np.isfinite(xs[i]).all(axis=(1, 2))
    if not finite.all():
        step = start + int(np.argmin(finite)) + 1
        raise ConfigError(f"activation data contains NaN/inf values (in the training batch of step {step}); clean the source")
    return xs, np.arange(chunk) < n


class _Pace:
    """Steps per compiled call: the program is compiled for ``chunk`` steps, but each call runs only
    as many as take about ``target`` seconds (a multiple of ``log_every``; the rest are masked and
    skipped), so progress moves every few seconds however slow a step is. The first two calls
    (prepared before any timing; the first includes compilation) run the whole chunk.
    Results do not depend on it: every call starts and ends on a logging-window boundary."""

    def __init__(self, chunk: int, log_every: int, target: float = 2.0):
        self.chunk, self.unit, self.target = chunk, log_every, target
        self.per_step: float | None = None  # of the last call, for the next one's length
        self.calls, self.t = 0, time.perf_counter()
        self.timed = [0.0, 0]  # seconds and steps of every call after the first (steady state)

    def steps(self, remaining: int) -> int:
        n = self.chunk
        if self.per_step is not None:
            n = int(self.target / max(self.per_step, 1e-9)) // self.unit * self.unit
        return min(max(n, self.unit), self.chunk, remaining)

    def ran(self, n_steps: int) -> None:
        now = time.perf_counter()
        if self.calls >= 1:  # the first call's time includes compilation
            self.per_step = (now - self.t) / max(n_steps, 1)
            self.timed = [self.timed[0] + now - self.t, self.timed[1] + n_steps]
        self.calls, self.t = self.calls + 1, now

    def steady(self, steps: int) -> float | None:
        """Seconds ``steps`` take at the mean steady rate (``None`` before a call after the first)."""
        return self.timed[0] / self.timed[1] * steps if self.timed[1] else None


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
    seeds = check_seeds(seeds)
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
    history = {k: np.concatenate([p[1][k] for p in parts]) for k in metric_names(sae_cfg)}
    log_steps = parts[0][2]
    steady = [p[3] for p in parts]
    bad = np.asarray(state.bad_step)
    failed = {int(m): int(bad[m]) for m in np.flatnonzero(bad >= 0)}
    for m, st in failed.items():
        h, s = members[m]
        print(f"warning: seed {s} (sweep point {h}: {points[h]}) failed at step {st} (non-finite or diverged "
              "loss or parameters); it is frozen at its last good step and left out of its cell's statistics")
    return TrainResult(sae_cfg, tc, seeds, points, state.params, scale, np.asarray(state.threshold),
                       np.asarray(state.since_fired), history, log_steps, failed, time.perf_counter() - t0,
                       np.asarray(state.resampled)[:, :len(tc.resample_steps)] if tc.resample_steps else None,
                       None if any(v is None for v in steady) else float(sum(v for v in steady if v is not None)))


def _train_group(sae_cfg, tc, source, members, points, total, scale, b_dec, progress, group=0,
                 stops=(), on_stop=None, checkpoint=None, mesh=None):
    # Members are padded to a multiple of the mesh's member axis (copies of the last one) and
    # trimmed whenever state or metrics leave the device, so callbacks and checkpoints never see
    # the padding and a checkpoint resumes on any mesh.
    n = len(members)
    mesh = mesh if mesh is not None else sharding.make_mesh(n, tc.batch_size, tc.mesh_shape)
    n_pad = sharding.padded_size(n, mesh)
    on_members, rep = sharding.members_spec(mesh), sharding.replicated(mesh)
    state, hp = _init_members(sae_cfg, tc, members, points, b_dec, n_pad, on_members, rep)

    def to_host(tree):
        return sharding.trim_members(sharding.to_host(tree), n)

    bs, d = tc.batch_size, sae_cfg.d_in
    shared = tc.same_data_order
    low = precision.compute_dtype(tc.compute_dtype)
    x_spec = sharding.data_spec(mesh, 3, 1) if shared else sharding.members_spec(mesh, 4, 2)

    chunk = _chunk_len(tc, d, 1 if shared else len(members))
    streams = _streams(source, tc, members)
    # this host's part of each chunk: its members' streams (padding members copy the last) and its batch rows
    x_shape = (chunk, bs, d) if shared else (n_pad, chunk, bs, d)
    block = sharding.local_block(x_spec, x_shape)
    mine = streams if shared else [streams[min(j, n - 1)] for j in range(block[0].start, block[0].stop)]

    def put_x(xs):  # bf16 activations travel and live on the device as bf16
        xs = xs[0] if shared else xs
        return sharding.put_block(xs.astype(low) if low != jnp.float32 else xs, block, x_spec, x_shape)

    history = {k: np.zeros((n, 0), np.float32) for k in metric_names(sae_cfg)}
    done, state, history, log_steps = _resume(checkpoint, group, state, history, streams, n, n_pad, on_members)
    stops = sorted({int(s) for s in stops if done <= s <= total} | {total})
    if stops[0] == 0 and done == 0 and on_stop is not None:
        on_stop(group, 0, to_host(state))
    program = chunk_program(sae_cfg, program_key(tc), shared)
    total_dev, scale_dev = sharding.put(np.int32(total), rep), sharding.put(np.float32(scale), rep)
    bar = progress_bar(total, f"{len(members)} SAEs x {bs} tok", enabled=progress, initial=done)
    pace, last_ckpt, start = _Pace(chunk, tc.log_every), done, done
    fill = lambda: _fill(mine, chunk, block[-2], d, pace.steps(next(s for s in stops if s > done) - done), done)  # noqa: E731
    xs, act = fill() if done < total else (None, None)
    while done < total:
        state, m = program(state, put_x(xs), sharding.put(act, rep), hp, scale_dev, total_dev)
        assert act is not None  # filled before the loop and at the end of every call that is not the last
        n_steps = int(act.sum())
        ends = done + np.minimum(np.arange(1, chunk // tc.log_every + 1) * tc.log_every, n_steps)
        real = np.concatenate([[True], ends[1:] > ends[:-1]])
        done += n_steps
        if done < total:  # prepare the next chunk while the device works
            xs, act = fill()
        m = to_host(m)
        pace.ran(n_steps)
        history = {k: np.concatenate([history[k], m[k][:, real]], axis=1) for k in metric_names(sae_cfg)}
        log_steps = np.concatenate([log_steps, ends[real]])
        if on_stop is not None and done in stops:
            on_stop(group, done, to_host(state))
        if checkpoint is not None and done < total and done - last_ckpt >= checkpoint.every:
            checkpoint.save(group, done, to_host(state), history, log_steps)
            last_ckpt = done
        bar.set_postfix(loss=f"{np.nanmean(m['loss'][:, real][:, -1]):.4g}", l0=f"{np.nanmean(m['l0'][:, real][:, -1]):.1f}")
        bar.update(n_steps)
        stop_if_requested()
    bar.close()
    steady = pace.steady(total - start)
    return to_host(state), history, log_steps, steady


def _resume(checkpoint, group, state, history, streams, n, n_pad, on_members):
    """``(done, state, history, log_steps)`` from the group's last checkpoint (iterators advanced
    past the batches already trained on: the data order is deterministic), or a fresh start.
    Several processes resume from process 0's checkpoint, whatever their own files hold."""
    like = jax.tree.map(lambda a: jax.ShapeDtypeStruct((n, *a.shape[1:]), a.dtype), state)
    saved = None if checkpoint is None else checkpoint.restore(group, like)
    if jax.process_count() > 1:
        saved = _main_checkpoint(saved, like, list(history))
    if saved is None:
        return 0, state, history, np.zeros(0, np.int64)
    done, state, history, log_steps = saved
    for stream in streams:
        stream.skip(done)
    return done, sharding.put_tree(sharding.pad_members(sharding.to_host(state), n_pad), on_members), history, log_steps


def _main_checkpoint(saved, like, names):
    step = sharding.agree(-1 if saved is None else saved[0])
    if step < 0:
        return None
    n_logs = sharding.agree(0 if saved is None else len(saved[3]))
    n = jax.tree.leaves(like)[0].shape[0]
    zeros = (jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), like),
             {k: np.zeros((n, n_logs), np.float32) for k in names}, np.zeros(n_logs, np.int32))
    mine = zeros if saved is None else (sharding.to_host(saved[1]), saved[2], np.asarray(saved[3], np.int32))
    state, history, log_steps = sharding.from_main(mine, zeros)
    return step, state, history, log_steps.astype(np.int64)


def _init_members(sae_cfg, tc, members, points, b_dec, n_pad, on_members, rep):
    """Each member's initial state (from its seed's key) and swept floats, padded and placed."""
    keys = jnp.stack([jax.random.fold_in(jax.random.PRNGKey(tc.root_seed), s) for _, s in members])
    hp = {k: jnp.asarray([points[h][k] for h, _ in members], jnp.float32) for k in points[0]}
    keys, hp = sharding.pad_members((keys, hp), n_pad)
    init = init_program(sae_cfg, program_key(tc), on_members)
    state = init(sharding.put(keys, rep), sharding.put(np.asarray(b_dec, np.float32), rep))
    return state, sharding.put_tree(hp, on_members)


def _chunk_len(tc: TrainConfig, d: int, n_streams: int) -> int:
    """Steps per compiled call: ``chunk_steps``, capped by ``chunk_bytes`` of host batches, a multiple
    of ``log_every``; not the run's length, so one program serves runs of any length."""
    cap = max(1, tc.chunk_bytes // (tc.batch_size * d * 4 * n_streams))
    chunk = max(tc.log_every, min(tc.chunk_steps, cap))
    return chunk - chunk % tc.log_every


def _streams(source, tc: TrainConfig, members) -> list[Stream]:
    if tc.same_data_order:
        return [Stream(source, tc.batch_size, seed=tc.data_seed)]
    # each seed its own order; swept copies of a seed see that same order
    return [Stream(source, tc.batch_size, seed=own_order_seed(tc.data_seed, s)) for _, s in members]


def own_order_seed(data_seed: int, seed: int) -> int:
    """Data-order seed of ``seed`` when seeds do not share one order (stable across machines)."""
    return int(np.random.SeedSequence([data_seed, seed]).generate_state(1)[0])


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
