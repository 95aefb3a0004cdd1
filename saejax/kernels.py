"""Sparse TopK kernels: the only dense work of a step is the encoder forward ``x @ W_enc``.

For a TopK SAE each token keeps ``k`` of ``d_sae`` latents, so everything after the encoder
matmul touches only ``k`` rows per token (Gao et al. 2024, arXiv:2406.04093, appendix; EleutherAI
sparsify's fused encoder):

- decode: ``x_hat[b] = sum_j v[b, j] W_dec[i[b, j]]``, a gather of ``k`` decoder rows;
- decoder gradient: ``dW_dec[i[b, j]] += v[b, j] g[b]``, a scatter-add into ``k`` rows;
- latent gradient: ``dv[b, j] = <W_dec[i[b, j]], g[b]>``;
- encoder gradient: ``dpre`` is non-zero at the ``k`` kept entries only, so
  ``dW_enc[:, i[b, j]] += dpre[b, j] (x[b] - b_dec)``, a scatter-add into ``k`` columns, and
  ``db_enc``/``db_dec`` follow from the same ``[B, k]`` values.

A dense implementation spends ``2 B d_in d_sae`` FLOPs on each of the decode, the two decoder-
gradient matmuls and the encoder-gradient matmul, on top of the encoder forward: about 5x the
necessary work. Here the extra work is ``O(B k d_in)``.

Two ``custom_vjp`` functions carry this: :func:`topk_encode` (encode -> top-k, with the optional
AuxK top-k among dead latents; without it JAX's ``top_k`` JVP makes a dense ``[B, d_sae]``
cotangent and a dense ``x^T g`` matmul) and :func:`sparse_decode`. Gathers and scatters run over
token chunks so no ``[B, k, d_in]`` intermediate is ever materialised (400 MB per seed at
B=4096, k=32, d_in=768). The top-k is exact (:func:`saejax.topk.top_k_rows`, which is
``lax.top_k`` below ``d_sae = 256 k`` and block maxima above; ties spanning more than ``k`` blocks
can name other columns of the same value, which for the non-positive values of such ties changes
nothing). On a one-device CPU its selections run in NumPy on every core
(:func:`saejax.topk.host_top_k`, ~4x faster than XLA:CPU's one-thread TopK; ``SAEJAX_HOST_TOPK=0``
keeps them in XLA). ``lax.approx_max_k`` is approximate only on TPU and falls back to sort-and-slice on CPU
and GPU, where it was not faster; ``benchmarks/bench_topk.py`` times the other exact methods tried.
"""

from __future__ import annotations

from functools import cache, partial

import jax
import jax.numpy as jnp

from saejax.topk import top_k_rows

CHUNK_BYTES = 4 * 2**20
"""Gathers and scatters run over chunks of tokens whose ``[chunk, k, d_in]`` gathered rows (or
scatter updates) take at most about this much (256 tokens at k=32, d_in=768)."""
MAX_CHUNK = 1024
ENCODE_CHUNK = 512
"""Tokens per encoder chunk (matmul + top-k); 256-1024 measured within noise of each other on CPU."""


def _chunked(n: int, chunk: int) -> tuple[int, int]:
    """Chunk size (at most ``chunk``) and number of chunks covering ``n`` rows."""
    c = max(1, min(chunk, n))
    return c, -(-n // c)


def _row_chunk(n: int, k: int, d: int) -> tuple[int, int]:
    """Token chunk for ``[chunk, k, d]`` float32 intermediates of about :data:`CHUNK_BYTES`."""
    c = max(8, min(MAX_CHUNK, CHUNK_BYTES // max(1, 4 * k * d)))
    return _chunked(n, 1 << (c.bit_length() - 1))


def _pad_rows(a: jax.Array, rows: int) -> jax.Array:
    return a if a.shape[0] == rows else jnp.pad(a, [(0, rows - a.shape[0])] + [(0, 0)] * (a.ndim - 1))


def _members_flat(axis_size, in_batched, *args):
    """Broadcast unbatched arguments to the member axis."""
    return [a if bat else jnp.broadcast_to(a, (axis_size, *a.shape)) for a, bat in zip(args, in_batched)]


def _offset(idx: jax.Array, n_rows: int) -> jax.Array:
    """Indices of member ``s`` into a table of ``S * n_rows`` rows, flattened to ``[S * B, k]``."""
    s = idx.shape[0]
    return (idx + (jnp.arange(s, dtype=idx.dtype) * n_rows).reshape(s, *[1] * (idx.ndim - 1))).reshape(-1, idx.shape[-1])


def _flatten_members() -> bool:
    # Under vmap, XLA:CPU runs gathers and scatters with a member batch dimension 2-4x slower per
    # member than unbatched ones, so on CPU the members' tables are stacked into one table
    # ([S * rows, d]) with offset indices. Elsewhere the batched form stays: it is fast on GPU, and
    # XLA's partitioner knows its member dimension is parallel when members are sharded.
    return jax.default_backend() == "cpu"


@jax.custom_batching.custom_vmap
def gather_rows(v: jax.Array, idx: jax.Array, w: jax.Array) -> jax.Array:
    """``out[b] = sum_j v[b, j] w[idx[b, j]]``: ``[B, k] x [B, k] x [R, d] -> [B, d]``."""
    b, k = v.shape
    c, n = _row_chunk(b, 1, w.shape[1])
    vs = _pad_rows(v, c * n).reshape(n, c, k)
    ix = _pad_rows(idx, c * n).reshape(n, c, k)

    def body(_, inp):  # one gathered row per token at a time: fused gather-multiply-add
        vc, ic = inp

        def add_row(acc, j):
            return acc + vc[:, j, None].astype(jnp.float32) * w[ic[:, j]].astype(jnp.float32), None

        acc, _ = jax.lax.scan(add_row, jnp.zeros((c, w.shape[1]), jnp.float32), jnp.arange(k), unroll=min(k, 8))
        return None, acc

    _, out = jax.lax.scan(body, None, (vs, ix))
    return out.reshape(c * n, w.shape[1])[:b].astype(jnp.result_type(v, w))


@gather_rows.def_vmap
def _gather_rows_vmap(axis_size, in_batched, v, idx, w):
    if not _flatten_members():
        return jax.vmap(gather_rows.fun)(*_members_flat(axis_size, in_batched, v, idx, w)), True
    v, idx, w = _members_flat(axis_size, in_batched, v, idx, w)
    s, b, k = v.shape
    out = gather_rows(v.reshape(s * b, k), _offset(idx, w.shape[1]), w.reshape(s * w.shape[1], -1))
    return out.reshape(s, b, -1), True


@jax.custom_batching.custom_vmap
def row_dots(idx: jax.Array, w: jax.Array, g: jax.Array) -> jax.Array:
    """``out[b, j] = <w[idx[b, j]], g[b]>``: ``[B, k] x [R, d] x [B, d] -> [B, k]``."""
    b, k = idx.shape
    c, n = _row_chunk(b, k, w.shape[1])
    ix = _pad_rows(idx, c * n).reshape(n, c, k)
    gs = _pad_rows(g, c * n).reshape(n, c, g.shape[1])

    def body(_, inp):
        ic, gc = inp
        return None, jnp.einsum("ckd,cd->ck", w[ic], gc, preferred_element_type=jnp.float32)

    _, out = jax.lax.scan(body, None, (ix, gs))
    return out.reshape(c * n, k)[:b].astype(jnp.result_type(w, g))


@row_dots.def_vmap
def _row_dots_vmap(axis_size, in_batched, idx, w, g):
    if not _flatten_members():
        return jax.vmap(row_dots.fun)(*_members_flat(axis_size, in_batched, idx, w, g)), True
    idx, w, g = _members_flat(axis_size, in_batched, idx, w, g)
    s, b, k = idx.shape
    out = row_dots(_offset(idx, w.shape[1]), w.reshape(s * w.shape[1], -1), g.reshape(s * b, -1))
    return out.reshape(s, b, k), True


def scatter_rows(v: jax.Array, idx: jax.Array, g: jax.Array, n_rows: int) -> jax.Array:
    """``out[r] = sum_{b, j: idx[b, j] = r} v[b, j] g[b]``: ``-> [n_rows, d]``; equals
    ``scatter(v)^T @ g`` for the dense ``[B, n_rows]`` scatter of ``v``. Accumulates in float32."""
    return _scatter_rows(n_rows)(v, idx, g)


@cache
def _scatter_rows(n_rows: int):
    @jax.custom_batching.custom_vmap
    def scatter(v, idx, g):
        b, k = v.shape
        d = g.shape[1]
        c, n = _row_chunk(b, k, d)
        vs = _pad_rows(v, c * n).reshape(n, c, k)  # padded tokens carry v = 0: they add nothing
        ix = _pad_rows(idx, c * n).reshape(n, c, k)
        gs = _pad_rows(g, c * n).reshape(n, c, d)

        def body(acc, inp):
            vc, ic, gc = inp
            upd = (vc[:, :, None].astype(jnp.float32) * gc[:, None, :].astype(jnp.float32)).reshape(c * k, d)
            return acc.at[ic.reshape(-1)].add(upd, mode="promise_in_bounds"), None

        out, _ = jax.lax.scan(body, jnp.zeros((n_rows, d), jnp.float32), (vs, ix, gs))
        return out.astype(jnp.result_type(v, g))

    @scatter.def_vmap
    def _vmap(axis_size, in_batched, v, idx, g):
        v, idx, g = _members_flat(axis_size, in_batched, v, idx, g)
        if not _flatten_members():
            return jax.vmap(scatter.fun)(v, idx, g), True
        s, b, k = v.shape
        out = _scatter_rows(s * n_rows)(v.reshape(s * b, k), _offset(idx, n_rows), g.reshape(s * b, -1))
        return out.reshape(s, n_rows, -1), True

    return scatter


def scatter_sum(v: jax.Array, idx: jax.Array, n: int) -> jax.Array:
    """``out[r] = sum_{b, j: idx[b, j] = r} v[b, j]`` -> ``[n]``."""
    out = jnp.zeros(n, jnp.float32).at[idx.reshape(-1)].add(v.reshape(-1).astype(jnp.float32), mode="promise_in_bounds")
    return out.astype(v.dtype)


# ----------------------------------------------------------------------------- decode
@jax.custom_vjp
def sparse_decode(vals: jax.Array, idx: jax.Array, w_dec: jax.Array) -> jax.Array:
    """``sum_j vals[b, j] W_dec[idx[b, j]]`` (no bias): equals ``scatter(vals, idx) @ W_dec``.

    Backward: ``dvals = <W_dec[idx], g>`` (gather), ``dW_dec = scatter-add of vals * g``.
    """
    return gather_rows(vals, idx, w_dec)


def _decode_fwd(vals, idx, w_dec):
    return gather_rows(vals, idx, w_dec), (vals, idx, w_dec)


def _decode_bwd(res, g):
    vals, idx, w_dec = res
    return row_dots(idx, w_dec, g), None, scatter_rows(vals, idx, g, w_dec.shape[0])


sparse_decode.defvjp(_decode_fwd, _decode_bwd)


# ----------------------------------------------------------------------------- encode
@partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def topk_encode(x, w_enc, b_enc, b_dec, dead, k: int, n_aux: int):
    """TopK encoder with a sparse backward pass.

    ``pre = (x - b_dec) @ W_enc + b_enc``; ``vals, idx = relu(top_k(pre, k))``. With ``n_aux > 0``
    also the AuxK selection among ``dead`` latents (Gao et al. 2024):
    ``aux_vals, aux_idx = top_k(where(dead, pre, -inf), n_aux)`` with non-finite values (fewer
    than ``n_aux`` dead latents) and negative ones set to 0. Returns ``(vals, idx, aux_vals,
    aux_idx)``; the aux pair is ``[B, 0]`` when ``n_aux == 0`` (``dead`` is unused then and may be
    ``None``: while at most ``n_aux`` latents are dead, :func:`saejax.sae.sparse_topk_step` computes
    AuxK from the shared dead set instead, see :class:`saejax.sae.DeadSet`).

    The values equal the dense computation; the gradient with respect to ``W_enc``, ``b_enc``,
    ``b_dec`` and ``x`` touches only the ``k + n_aux`` selected latents of each token.
    """
    return _encode(x, w_enc, b_enc, b_dec, dead, k, n_aux)[0]


def _encode(x, w_enc, b_enc, b_dec, dead, k, n_aux):
    # Token chunks: the [chunk, d_sae] pre-activations stay in cache and the full [B, d_sae]
    # array is never written (268 MB per seed at B=4096, d_sae=16384); measured faster on CPU
    # than one big matmul followed by top_k.
    xc = x - b_dec
    b = x.shape[0]
    c, n = _chunked(b, ENCODE_CHUNK)

    def body(_, xs):
        pre = xs @ w_enc + b_enc
        raw, idx = top_k_rows(pre, k)  # lax.top_k's values; 1.7x faster at d_sae 16k, k 32
        if n_aux == 0:
            return None, (raw, idx)
        araw, aidx = top_k_rows(jnp.where(dead, pre, -jnp.inf), n_aux)
        return None, (raw, idx, araw, aidx)

    _, outs = jax.lax.scan(body, None, _pad_rows(xc, c * n).reshape(n, c, -1))
    outs = [o.reshape(c * n, -1)[:b] for o in outs]
    raw, idx = outs[:2]
    if n_aux > 0:
        araw, aidx = outs[2:]
        alive = jnp.isfinite(araw) & (araw > 0)
    else:
        araw = jnp.zeros((b, 0), raw.dtype)
        aidx = jnp.zeros((b, 0), jnp.int32)
        alive = araw > 0
    out = (jax.nn.relu(raw), idx, jnp.where(alive, araw, 0.0), aidx)
    return out, (xc, w_enc, raw > 0, idx, alive, aidx)


def _encode_fwd(x, w_enc, b_enc, b_dec, dead, k, n_aux):
    return _encode(x, w_enc, b_enc, b_dec, dead, k, n_aux)


def _encode_bwd(k, n_aux, res, cts):
    xc, w_enc, pos, idx, alive, aidx = res
    g_vals, _, g_aux, _ = cts
    gp = jnp.where(pos, g_vals, 0.0)  # relu' at the kept entries; 0 elsewhere by construction
    ix = idx
    if n_aux > 0:
        gp = jnp.concatenate([gp, jnp.where(alive, g_aux, 0.0)], axis=1)
        ix = jnp.concatenate([idx, aidx], axis=1)
    d_sae = w_enc.shape[1]
    d_w_enc = scatter_rows(gp, ix, xc, d_sae).T
    d_b_enc = scatter_sum(gp, ix, d_sae)
    d_x = gather_rows(gp, ix, w_enc.T)  # dropped by XLA when x is data, as in training
    d_b_dec = -(w_enc @ d_b_enc)  # = -sum_b d_x[b]
    return d_x, d_w_enc, d_b_enc, d_b_dec, None


topk_encode.defvjp(_encode_fwd, _encode_bwd)


AUTO_MIN_RATIO = {"cpu": 8}
"""``kernel="auto"``: per backend, the smallest ``d_sae / k`` at which the sparse kernel is used. On
a 2-core CPU through the public ``train()`` (dense over sparse seconds): TopK 0.85x at d_sae/k = 2,
1.08x at 8, 1.7-1.9x at 32; BatchTopK (:mod:`saejax.kernels_batch`) 0.97x at 8, 1.49x at 32,
1.69x at 256 (Matryoshka 1.69x at 256). A backend not listed (not yet measured) uses the dense
kernel."""


def resolve(cfg) -> str:
    """The kernel ``cfg`` trains with: ``cfg.kernel``, or for ``"auto"`` the measured choice for
    this backend and shape (dense for an architecture without a sparse step)."""
    if cfg.kernel != "auto":
        return cfg.kernel
    from saejax import archs

    ratio = AUTO_MIN_RATIO.get(jax.default_backend())
    sparse = archs.get(cfg.arch).sparse_step is not None and ratio is not None and cfg.d_sae >= ratio * cfg.k
    return "sparse" if sparse else "dense"
