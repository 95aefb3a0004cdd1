"""The all-pairs cosine kernel: per-row and per-column best matches between dictionaries.

For dictionaries ``A`` ``[n_a, d]`` and ``B`` ``[n_b, d]`` (rows are latent directions: decoder
rows ``W_dec``, or encoder rows ``W_enc.T``) the kernel scores every pair of rows by

    s_ij = |<a_i, b_j>| / (||a_i|| ||b_j||)        (or the signed cosine with ``signed=True``)

and returns, per row of ``A`` and per row of ``B`` ("column"), the best score, its index and the
``k`` best candidates. The ``[n_a, n_b]`` matrix is never held whole: rows of ``A`` are processed
in chunks inside a ``lax.scan`` (each row's top-k by :func:`saejax.topk.top_k_rows`; the columns'
either merged chunk by chunk or from a second pass of ``B`` against ``A``, whichever
:func:`two_passes` finds cheaper), and seed pairs are walked by ``lax.map``, so
memory is ``O(chunk * n_b)`` whatever the number of seeds. Matmuls run at
``Precision.HIGHEST`` (true float32; TPUs and recent GPUs otherwise use bf16 passes).
"""

from __future__ import annotations

from functools import lru_cache, partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from saejax.errors import check
from saejax.sharding import pad_members, put, to_host, trim_members
from saejax.topk import top_k_rows

HIGHEST = lax.Precision.HIGHEST
MASKED = -3.0
"""Score of a masked-out (dead) latent in the kernel's outputs: below any cosine. A top-k entry
with this value means "no candidate" (fewer live latents than ``k``)."""


class PairStats(NamedTuple):
    """Kernel outputs for one pair (or, with a leading ``[P]`` axis, for ``P`` pairs).

    ``row_*`` describe each row ``a_i`` of the first dictionary against all rows of the second;
    ``col_*`` describe each row ``b_j`` of the second against all rows of the first. Scores are
    |cos| (or signed cos) in float32, top-k sorted descending, indices int32. Fields are device
    arrays from the kernel, numpy once copied to the host.
    """

    row_max: np.ndarray | jax.Array  # [n_a]     max_j s_ij
    row_arg: np.ndarray | jax.Array  # [n_a]     argmax_j s_ij
    row_topk: np.ndarray | jax.Array  # [n_a, k]
    row_topk_idx: np.ndarray | jax.Array  # [n_a, k]
    col_max: np.ndarray | jax.Array  # [n_b]     max_i s_ij
    col_arg: np.ndarray | jax.Array  # [n_b]
    col_topk: np.ndarray | jax.Array  # [n_b, k]
    col_topk_idx: np.ndarray | jax.Array  # [n_b, k]


class AllPairs(NamedTuple):
    """:func:`all_pairs` output: ``pairs[p] = (i, j)`` with ``i < j``, and stats stacked on ``p``."""

    pairs: np.ndarray  # [P, 2] int
    stats: PairStats  # every field has a leading [P] axis


def check_dictionary(x, name: str = "dictionary") -> np.ndarray:
    """Validate one dictionary ``[n, d]`` and return it as float32 (one-line ConfigError if bad)."""
    x = np.asarray(x, dtype=np.float32)
    check(x.ndim == 2, f"{name} must be [n_latents, d_in], got shape {x.shape}")
    check(x.shape[0] > 0 and x.shape[1] > 0, f"{name} is empty (shape {x.shape}); expected at least one latent")
    _check_finite(x, name)
    return x


def check_stack(x, name: str = "dictionaries"):
    """Validate stacked dictionaries ``[S, n, d]``; float32, numpy (or jax, kept on device)."""
    if isinstance(x, (list, tuple)):
        shapes = {np.shape(xi) for xi in x}
        check(len(shapes) <= 1, f"{name} must all have the same shape to be stacked, got {sorted(shapes)}; "
              "use pair_stats/match for dictionaries of different widths")
    x = x.astype(jnp.float32) if isinstance(x, jax.Array) else np.asarray(x, dtype=np.float32)
    check(x.ndim == 3, f"{name} must be stacked [seeds, n_latents, d_in], got shape {x.shape}")
    check(x.size > 0, f"{name} is empty (shape {x.shape}); expected at least one seed and one latent")
    _check_finite(x, name)
    return x


def _check_finite(x, name: str) -> None:
    xp = jnp if isinstance(x, jax.Array) else np
    if not bool(xp.isfinite(x).all()):
        where = tuple(int(i) for i in np.argwhere(~np.isfinite(np.asarray(x)))[0][:-1])
        check(False, f"{name} has NaN/inf entries (first in row {where}); expected finite weights")


def check_same_width(a: np.ndarray, b: np.ndarray, names=("a", "b")) -> None:
    check(a.shape[-1] == b.shape[-1],
          f"{names[0]} has d_in={a.shape[-1]} but {names[1]} has d_in={b.shape[-1]}; expected the same d_in")


def check_mask(mask, shape, name: str) -> np.ndarray:
    """``None`` -> all True; else a boolean array of exactly ``shape``."""
    if mask is None:
        return np.ones(shape, dtype=bool)
    mask = np.asarray(mask)
    check(mask.shape == tuple(shape), f"{name} must have shape {tuple(shape)}, got {mask.shape}")
    check(mask.dtype == bool, f"{name} must be a boolean mask, got dtype {mask.dtype}")
    return mask


def normalize(x: jax.Array) -> jax.Array:
    """Rows scaled to unit L2 norm; an all-zero row stays zero (its cosine with anything is 0)."""
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    return x / jnp.maximum(norm, jnp.finfo(x.dtype).tiny)


def default_chunk(n_b: int) -> int:
    """Rows of ``A`` per scan step: about 64M scores (256 MB) per chunk, between 512 and 2048."""
    return int(min(2048, max(512, 1 << max(0, (2**26 // max(n_b, 1)).bit_length() - 1))))


def two_passes(d: int, k: int) -> bool:
    """Whether :func:`_pair_kernel` runs two directed passes (two matmuls, each row's top-k over a
    whole row) rather than one pass that merges every column's top-k chunk by chunk.

    Measured on a 2-core CPU at n = 4k and 16k (``benchmarks/README.md``): two passes win while the
    matmul is cheap next to the merges, up to about ``d = 256`` at ``k = 8`` and ``d = 600`` at
    ``k = 32`` (16k x 16k, d = 128, k = 32: 3.9 s -> 2.0 s; d = 768, k = 8: one pass 4.5 s, two 6.2 s).
    """
    return d <= 16 * k + 128


def _scan(a, b, row_ok, col_ok, *, k: int, chunk: int, signed: bool, masked: bool, columns: bool):
    """Rows of normalised ``a`` against all of normalised ``b``, ``chunk`` rows at a time: each row's
    ``k`` best scores and indices ``[n_a, k]`` (rows of ``b`` with ``col_ok`` False are never
    candidates); with ``columns``, also each row of ``b``'s ``k`` best over ``a`` ``[n_b, k]``,
    merged chunk by chunk (rows of ``a`` with ``row_ok`` False are never candidates), else None."""
    n_a, d = a.shape
    n_b = b.shape[0]
    n_chunks = -(-n_a // chunk)
    pad = n_chunks * chunk - n_a
    a_c = jnp.pad(a, ((0, pad), (0, 0))).reshape(n_chunks, chunk, d)
    ok_c = jnp.pad(row_ok, (0, pad)).reshape(n_chunks, chunk)  # padding rows are never candidates
    offsets = jnp.arange(n_chunks, dtype=jnp.int32) * chunk

    def step(carry, xs):
        ac, okc, off = xs
        s = lax.dot_general(ac, b, (((1,), (1,)), ((), ())), precision=HIGHEST)
        # Keeps XLA:CPU from fusing the matmul into its consumers (abs, top-k), which replaces the
        # library GEMM by a slower generated loop; costs nothing on accelerators.
        s = lax.optimization_barrier(s)
        if not signed:
            s = jnp.abs(s)
        rows = top_k_rows(jnp.where(col_ok[None, :], s, MASKED) if masked else s, k)
        if not columns:
            return carry, rows
        if masked or pad:
            s = jnp.where(okc[:, None], s, MASKED)
        cv, ci = top_k_rows(s.T, min(k, chunk))  # a chunk may hold fewer than k rows
        # Earlier chunks come first, so ties keep the lower row index (but see top_k_rows on ties).
        tv, pos = lax.top_k(jnp.concatenate([carry[0], cv], axis=1), k)
        return (tv, jnp.take_along_axis(jnp.concatenate([carry[1], ci + off], axis=1), pos, axis=1)), rows

    init = (jnp.full((n_b, k), 2 * MASKED, a.dtype), jnp.zeros((n_b, k), jnp.int32)) if columns else None
    cols, (v, i) = lax.scan(step, init, (a_c, ok_c, offsets))
    return v.reshape(n_chunks * chunk, k)[:n_a], i.reshape(n_chunks * chunk, k)[:n_a], cols


def _pair_kernel(a, b, row_ok, col_ok, *, k: int, chunk: int, signed: bool, masked: bool) -> PairStats:
    """Rows of ``a`` against ``b`` and rows of ``b`` against ``a``, in one or two passes
    (:func:`two_passes`); see the module docstring. With two passes the row and column scores of
    one pair come from two matmuls and can differ in the last float32 bit."""
    scan = partial(_scan, k=k, signed=signed, masked=masked)
    if two_passes(a.shape[1], k):
        rv, ri, _ = scan(a, b, row_ok, col_ok, chunk=chunk, columns=False)
        n_a, n_b = a.shape[0], b.shape[0]  # rows of b per step: the same chunk * n_b scores as the first pass
        cv, ci, _ = scan(b, a, col_ok, row_ok, chunk=max(1, min(n_b, chunk * n_b // n_a)), columns=False)
    else:
        rv, ri, cols = scan(a, b, row_ok, col_ok, chunk=chunk, columns=True)
        assert cols is not None  # returned with columns=True
        cv, ci = cols
    return PairStats(rv[:, 0], ri[:, 0], rv, ri, cv[:, 0], ci[:, 0], cv, ci)


@partial(jax.jit, static_argnames=("k", "chunk", "signed", "masked"))
def _pair_jit(a, b, row_ok, col_ok, *, k, chunk, signed, masked):
    return _pair_kernel(normalize(a), normalize(b), row_ok, col_ok, k=k, chunk=chunk, signed=signed, masked=masked)


@partial(jax.jit, static_argnames=("k", "chunk", "signed", "masked"))
def _all_pairs_jit(dicts, ok, pairs, *, k, chunk, signed, masked):
    dicts = normalize(dicts)  # once per seed, not once per pair

    def one(p):
        i, j = p[0], p[1]
        return _pair_kernel(dicts[i], dicts[j], ok[i], ok[j], k=k, chunk=chunk, signed=signed, masked=masked)

    return lax.map(one, pairs)


def pair_stats(a, b, *, top_k: int = 8, chunk: int | None = None, alive_a=None, alive_b=None,
               signed: bool = False) -> PairStats:
    """Best matches between two dictionaries of any widths ``a`` ``[n_a, d]``, ``b`` ``[n_b, d]``.

    ``s_ij = |cos(a_i, b_j)|`` (signed cosine if ``signed``); returns :class:`PairStats` with
    ``row_max[i] = max_j s_ij``, ``col_max[j] = max_i s_ij``, their arg-maxima and the ``k`` best
    ``(value, index)`` per row and per column, ``k = min(top_k, n_a, n_b)``. Latents whose
    ``alive_*`` entry is False are never candidates (score :data:`MASKED`). This is the cosine
    table behind decoder PWMCC (Paulo & Belrose 2025, arXiv:2501.16615; Song et al. 2025,
    arXiv:2505.20254), computed ``chunk`` rows at a time.
    """
    a = check_dictionary(a, "a")
    b = check_dictionary(b, "b")
    check_same_width(a, b)
    k = _check_k(top_k, a.shape[0], b.shape[0])
    chunk = _check_chunk(chunk, a.shape[0], b.shape[0])
    ok_a = check_mask(alive_a, a.shape[:1], "alive_a")
    ok_b = check_mask(alive_b, b.shape[:1], "alive_b")
    masked = alive_a is not None or alive_b is not None
    return _pair_jit(a, b, ok_a, ok_b, k=k, chunk=chunk, signed=bool(signed), masked=masked)


def all_pairs(dicts, *, top_k: int = 8, chunk: int | None = None, pairs=None, alive=None,
              signed: bool = False, mesh=None) -> AllPairs:
    """:func:`pair_stats` for every seed pair ``i < j`` of stacked dictionaries ``[S, n, d]``.

    One jitted program: dictionaries are normalised once, pairs are walked with ``lax.map`` and
    each pair's ``[n, n]`` cosine table is produced ``chunk`` rows at a time, so peak memory is
    ``O(chunk * n)`` plus the outputs (``O(P * n * k)``). ``pairs`` (``[P, 2]``) restricts the work to
    chosen pairs (e.g. only trained-vs-random pairs); ``alive`` (``[S, n]`` bool) masks dead latents.
    ``mesh``: a 1-D device mesh (:func:`pair_mesh`) over which the pair list is sharded (same values).
    """
    if mesh is not None and mesh.size > 1:
        return _all_pairs_sharded(dicts, mesh=mesh, top_k=top_k, chunk=chunk, pairs=pairs, alive=alive, signed=signed)
    dicts, pairs, k, chunk, ok = all_pairs_inputs(dicts, top_k, chunk, pairs, alive)
    stats = _all_pairs_jit(dicts, ok, pairs, k=k, chunk=chunk, signed=bool(signed), masked=alive is not None)
    return AllPairs(pairs, stats)


def all_pairs_inputs(dicts, top_k, chunk, pairs, alive):
    """Validated ``(dicts, pairs [P, 2] int32, k, chunk, alive mask)`` for :func:`all_pairs`."""
    dicts = check_stack(dicts)
    s, n, _ = dicts.shape
    if pairs is None:
        check(s >= 2, f"all_pairs needs at least 2 seeds, got {s}")
        pairs = np.stack(np.triu_indices(s, 1), axis=1)
    pairs = np.asarray(pairs, dtype=np.int32).reshape(-1, 2)
    check(len(pairs) > 0, "pairs is empty; expected at least one (i, j) pair")
    check(bool(((pairs >= 0) & (pairs < s)).all()), f"pairs must index seeds 0..{s - 1}, got {pairs.min()}..{pairs.max()}")
    return dicts, pairs, _check_k(top_k, n, n), _check_chunk(chunk, n, n), check_mask(alive, (s, n), "alive")


def _check_k(top_k, n_a: int, n_b: int) -> int:
    check(int(top_k) >= 1, f"top_k must be >= 1, got {top_k}")
    return int(min(int(top_k), n_a, n_b))


def _check_chunk(chunk, n_a: int, n_b: int) -> int:
    if chunk is None:
        chunk = default_chunk(n_b)
    check(int(chunk) >= 1, f"chunk must be >= 1, got {chunk}")
    return int(min(int(chunk), n_a))


# ----------------------------------------------------------------------------- sharded over devices
def pair_mesh(devices=None) -> Mesh:
    """A 1-D ``('pairs',)`` mesh over every device, for :func:`all_pairs` with ``mesh``."""
    devices = list(jax.devices() if devices is None else devices)
    return jax.make_mesh((len(devices),), ("pairs",), axis_types=(AxisType.Auto,), devices=devices)


@lru_cache(maxsize=64)
def _sharded_kernel(mesh: Mesh, k: int, chunk: int, signed: bool, masked: bool):
    axis = mesh.axis_names[0]
    kernel = partial(_all_pairs_jit, k=k, chunk=chunk, signed=signed, masked=masked)
    return jax.jit(jax.shard_map(kernel, mesh=mesh, in_specs=(P(), P(), P(axis)), out_specs=P(axis),
                                 check_vma=False))


def _all_pairs_sharded(dicts, *, mesh: Mesh | None = None, top_k: int = 8, chunk: int | None = None,
                      pairs=None, alive=None, signed: bool = False):
    """:func:`saejax.stability.kernel.all_pairs` with the seed-pair list sharded over devices.

    The ``P`` pairs are padded to a multiple of the device count (with copies of the first pair)
    and split into equal contiguous blocks; ``shard_map`` runs the same jitted kernel on every
    device over its block (stacked dictionaries replicated: ``S * n * d * 4`` bytes per device),
    and the padding is trimmed. Same arguments and outputs as ``all_pairs``; equal values.
    """
    mesh = pair_mesh() if mesh is None else mesh
    dicts, pairs, k, chunk, ok = all_pairs_inputs(dicts, top_k, chunk, pairs, alive)
    s, n, _ = dicts.shape
    n_dev = mesh.shape[mesh.axis_names[0]]
    padded = pad_members(pairs, -(-len(pairs) // n_dev) * n_dev)
    fn = _sharded_kernel(mesh, k, chunk, bool(signed), alive is not None)
    rep = NamedSharding(mesh, P())
    stats = fn(put(dicts, rep), put(ok, rep), put(padded, NamedSharding(mesh, P(mesh.axis_names[0]))))
    stats = trim_members(to_host(stats), len(pairs))
    return AllPairs(pairs, PairStats(*(jnp.asarray(a) for a in stats)))
