"""Exact top-k along the last axis, cheaper than ``lax.top_k`` on wide rows (the stability kernel's
``[chunk, n]`` score tables, the TopK encoders' ``[tokens, d_sae]`` pre-activations)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

try:
    from jax.experimental.buffer_callback import buffer_callback
except ImportError:  # jax < 0.7: lax.top_k everywhere
    buffer_callback = None

HOST_MIN_ELEMENTS = 1 << 14
"""A float32 table (per vmapped member) with at least this many elements goes through
:func:`host_top_k` on a one-device CPU backend; smaller ones stay in XLA. XLA:CPU's TopK costs a
few microseconds per row however narrow the row, so even the default grid's narrow units gain:
``train()`` at d_sae 64 and 256 (k 32, 5 seeds x 512 tokens) ran 1.25-1.45x faster through the
host than at a 2^18 threshold. A program with a host callback is never written to JAX's
persistent compilation cache, so tiny tables, where the callback's fixed cost would eat the
gain, keep their cached compile. ``SAEJAX_HOST_TOPK=0`` keeps every top-k in XLA (read when a
program is traced)."""


def top_k_rows(s: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``lax.top_k(s, k)`` of a ``[rows, n]`` table, exactly, at a fraction of its cost on large ``n``.

    Columns are split into ``g`` interleaved blocks (block ``b`` holds columns ``b, b + w, b + 2w,
    ...``); a block's maximum is an elementwise ``maximum`` over ``g`` column slices, which every
    backend vectorises. The ``k`` blocks with the largest maxima hold the row's ``k`` largest
    values (any value outside them is below ``k`` distinct block maxima), so one ``top_k`` over
    ``w`` block maxima and one over the ``g * k`` gathered candidates replace a ``top_k`` over
    ``n``. Candidates are gathered in column order, so equal values keep the lowest index as
    ``lax.top_k`` does, except where exact ties span more than the ``k`` selected blocks (e.g. an
    all-zero row): then the columns named, even the first, can be other columns of the same
    score; the values are always exact. The block maxima are a tree of elementwise ``maximum``s
    because XLA:CPU reduces a middle or minor axis of this size ~10x slower. (XLA:CPU's ``top_k`` costs ~10 ns per element and a fixed
    amount per row; this cuts the elements ~10x at ``n = 16k``, ``k = 32``: 1.6x faster there, no
    faster below ``n = 256 k``, where plain :func:`top_k` is used. ``k = 1`` is ``max``/``argmax``.
    Every inner top-k is :func:`top_k`: on a one-device CPU, :func:`host_top_k`.)
    """
    rows, n = s.shape
    if k == 1:
        return jnp.max(s, axis=1, keepdims=True), jnp.argmax(s, axis=1, keepdims=True).astype(jnp.int32)
    w = 1 << max(0, int(np.sqrt(n * k)).bit_length() - 1)  # block count ~ sqrt(n k) minimises w + g k
    g = n // w
    if n < 256 * k:  # measured on XLA:CPU: below this the two top_k calls cost more than one
        return top_k(s, k)
    main = s[:, : g * w].reshape(rows, g, w)
    tail = jnp.pad(s[:, g * w:], ((0, 0), (0, w - (n - g * w))), constant_values=-jnp.inf)[:, None, :]
    parts = [main[:, j] for j in range(g)] + ([tail[:, 0]] if n > g * w else [])
    while len(parts) > 1:  # a balanced tree of elementwise maxima
        parts = [jnp.maximum(x, y) for x, y in zip(parts[::2], parts[1::2])] + parts[len(parts) // 2 * 2:]
    _, blocks = top_k(parts[0], k)
    blocks = jnp.sort(blocks, axis=1)[:, None, :]  # [rows, 1, k], ascending: candidates in column order
    cand = jnp.take_along_axis(main, blocks, axis=2)
    if n > g * w:
        cand = jnp.concatenate([cand, jnp.take_along_axis(tail, blocks, axis=2)], axis=1)
    v, pos = top_k(cand.reshape(rows, -1), k)
    col = (pos // k) * w + jnp.take_along_axis(blocks[:, 0], pos % k, axis=1)
    return v, col.astype(jnp.int32)


def top_k(s: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``lax.top_k(s, k)`` with int32 indices, exactly: through :func:`host_top_k` where
    :func:`use_host` says so (a one-device CPU), else ``lax.top_k`` itself."""
    if use_host(s, k):
        return host_top_k(s, k)
    v, i = lax.top_k(s, k)
    return v, i.astype(jnp.int32)


# ----------------------------------------------------------------------------- the CPU's host path
def use_host(s: jax.Array, k: int) -> bool:
    """Whether :func:`top_k` hands ``s`` to NumPy: float32, large enough, traced for a CPU
    backend of one device (a callback under a multi-device sharding would gather its operand)."""
    return (buffer_callback is not None and s.dtype == jnp.float32 and s.size >= HOST_MIN_ELEMENTS
            and k <= s.shape[-1] and os.environ.get("SAEJAX_HOST_TOPK", "1") != "0"
            and jax.default_backend() == "cpu" and jax.device_count() == 1)


@cache
def _pool() -> tuple[ThreadPoolExecutor, int]:
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return ThreadPoolExecutor(n, thread_name_prefix="saejax-topk"), n


def top_k_indices_np(a: np.ndarray, k: int, out: np.ndarray) -> None:
    """``out[:] = lax.top_k(a, k)[1]`` for a 2-D float32 array, in NumPy: the same columns in the
    same order (value descending, equal values by ascending column). ``partition`` (introselect
    on the values, ~2.5x cheaper than ``argpartition``'s indirect one) finds each row's ``k``-th
    and ``k + 1``-th largest values; where they differ, the row's ``k`` largest are exactly the
    entries at or above the ``k``-th, read off a mask in column order. The rare rows where they
    are equal (ties across the cut, or NaN) take a stable full sort, so ties resolve as
    ``lax.top_k`` resolves them. The ``k`` columns are then ordered by one integer sort of
    (value, column) keys."""
    rows, n = a.shape
    if k == n:
        idx, v = np.broadcast_to(np.arange(n), (rows, n)), a
    else:
        part = np.partition(a, n - k - 1, axis=1)
        kth = part[:, n - k:].min(axis=1)
        tied = ~(part[:, n - k - 1] < kth)
        mask = a >= kth[:, None]
        if not tied.any():
            flat = np.flatnonzero(mask)
            idx, v = (flat % n).reshape(rows, k), a.ravel()[flat].reshape(rows, k)
        else:
            mask[tied] = False
            flat = np.flatnonzero(mask)
            idx, v = np.empty((rows, k), np.int64), np.empty((rows, k), np.float32)
            idx[~tied] = (flat % n).reshape(-1, k)
            v[~tied] = a.ravel()[flat].reshape(-1, k)
            idx[tied] = np.argsort(-a[tied], axis=1, kind="stable")[:, :k]
            v[tied] = np.take_along_axis(a[tied], idx[tied], axis=1)
    b = v.view(np.uint32)
    desc = np.where(b >> 31, b, ~b & np.uint32(0x7FFFFFFF))  # unsigned keys ascending as v descends
    keys = np.sort((desc.astype(np.uint64) << np.uint64(32)) | idx.astype(np.uint64), axis=1)
    out[:] = keys & np.uint64(0xFFFFFFFF)


def _callback(_ctx, out, s) -> None:
    a = np.asarray(s)
    a = a.reshape(-1, a.shape[-1])
    o = np.asarray(out).reshape(a.shape[0], -1)  # views of XLA's buffers: nothing is copied
    k = o.shape[1]
    pool, workers = _pool()
    # NumPy's partition releases the GIL: spans of ~1 MiB (cache-sized: 1.5x faster than one span
    # per core at [4096, 1024]) shared among the cores
    step = max(1, min(-(-a.shape[0] // workers), (1 << 18) // a.shape[1]))
    list(pool.map(lambda lo: top_k_indices_np(a[lo:lo + step], k, o[lo:lo + step]), range(0, a.shape[0], step)))


def host_top_k(s: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``lax.top_k(s, k)`` of a float32 ``[..., n]`` table on the CPU, ~4x faster: the indices by
    :func:`top_k_indices_np` on every core, reading and writing XLA's buffers in place (a
    ``buffer_callback``), the values gathered back in XLA so gradients flow through them.

    XLA:CPU's TopK is a one-thread partial sort per row (~10 ns per element); NumPy's introselect on
    2 cores is 4.0x faster at [16384, 1024], k = 32 (``benchmarks/bench_topk.py``)."""
    if buffer_callback is None:
        raise RuntimeError("host_top_k needs jax.experimental.buffer_callback (jax >= 0.7)")
    spec = jax.ShapeDtypeStruct((*s.shape[:-1], k), jnp.int32)
    idx = buffer_callback(_callback, spec, vmap_method="expand_dims")(lax.stop_gradient(s))
    return jnp.take_along_axis(s, idx, axis=-1), idx
