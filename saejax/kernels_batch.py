"""Sparse kernels for the BatchTopK family (``batchtopk``, ``matryoshka``): a flat list of entries.

BatchTopK keeps the ``k * B`` largest ReLU'd pre-activations of the whole batch, so a token keeps
anywhere from 0 to ``d_sae`` latents and the ``[B, k]`` layout of :mod:`saejax.kernels` does not
apply. Here the selection is ``E = k * B`` entries ``(tok[e], lat[e], val[e])`` and every product
after the encoder forward is one of two primitives over them:

- :func:`pair_scatter`: ``out[dst[e]] += v[e] * src[src_idx[e]]``: the decode (``W_dec`` rows
  into tokens), the decoder gradient (``g`` rows into latents), the encoder gradient (``x - b_dec``
  rows into latents) and the input gradient;
- :func:`pair_dots`: ``<a[a_idx[e]], b[b_idx[e]]>``: the gradient of the kept values.

Both run over chunks of entries (no ``[E, d_in]`` intermediate: 400 MB at E = 131k, d_in = 768)
and, on CPU, fold the member axis of a vmap into one table with offset indices, as the TopK
kernels do. The encoder forward and the batch top-k itself are the dense computation's: values
and gradients equal the dense path (tested), and the decode and backward cost ``O(E d_in)``
instead of four ``2 B d_sae d_in`` matmuls.
"""

from __future__ import annotations

from functools import cache, partial

import jax
import jax.numpy as jnp

from saejax import kernels, topk
from saejax.kernels import _chunked, _flatten_members, _members_flat, _pad_rows


def _entry_chunk(e: int, d: int) -> tuple[int, int]:
    """Entries per chunk so that a chunk's ``[c, d]`` float32 rows take about ``CHUNK_BYTES``."""
    c = max(8, kernels.CHUNK_BYTES // max(1, 4 * d))
    return _chunked(e, 1 << (c.bit_length() - 1))


def pair_scatter(v: jax.Array, src_idx: jax.Array, dst_idx: jax.Array, src: jax.Array, n_dst: int) -> jax.Array:
    """``out[dst_idx[e]] += v[e] * src[src_idx[e]]``: ``[E] x [E] x [E] x [R, d] -> [n_dst, d]``,
    accumulated in float32."""
    return _pair_scatter(n_dst)(v, src_idx, dst_idx, src)


@cache
def _pair_scatter(n_dst: int):
    @jax.custom_batching.custom_vmap
    def scatter(v, src_idx, dst_idx, src):
        c, n = _entry_chunk(v.shape[0], src.shape[1])
        vs, si, di = (_pad_rows(a, c * n).reshape(n, c) for a in (v, src_idx, dst_idx))  # padding: v = 0

        def body(acc, inp):
            vc, sc, dc = inp
            upd = vc[:, None].astype(jnp.float32) * src[sc].astype(jnp.float32)
            return acc.at[dc].add(upd, mode="promise_in_bounds"), None

        out, _ = jax.lax.scan(body, jnp.zeros((n_dst, src.shape[1]), jnp.float32), (vs, si, di))
        return out.astype(jnp.result_type(v, src))

    @scatter.def_vmap
    def _vmap(axis_size, in_batched, v, src_idx, dst_idx, src):
        v, src_idx, dst_idx, src = _members_flat(axis_size, in_batched, v, src_idx, dst_idx, src)
        if not _flatten_members():
            return jax.vmap(scatter.fun)(v, src_idx, dst_idx, src), True
        s, r = src.shape[:2]
        out = _pair_scatter(s * n_dst)(v.reshape(-1), _offset(src_idx, r), _offset(dst_idx, n_dst),
                                       src.reshape(s * r, -1))
        return out.reshape(s, n_dst, -1), True

    return scatter


@jax.custom_batching.custom_vmap
def pair_dots(a_idx: jax.Array, a: jax.Array, b_idx: jax.Array, b: jax.Array) -> jax.Array:
    """``out[e] = <a[a_idx[e]], b[b_idx[e]]>``: ``[E] x [Ra, d] x [E] x [Rb, d] -> [E]``."""
    c, n = _entry_chunk(a_idx.shape[0], a.shape[1])
    ai, bi = (_pad_rows(i, c * n).reshape(n, c) for i in (a_idx, b_idx))

    def body(_, inp):
        ac, bc = inp
        return None, jnp.einsum("cd,cd->c", a[ac], b[bc], preferred_element_type=jnp.float32)

    _, out = jax.lax.scan(body, None, (ai, bi))
    return out.reshape(-1)[:a_idx.shape[0]].astype(jnp.result_type(a, b))


@pair_dots.def_vmap
def _pair_dots_vmap(axis_size, in_batched, a_idx, a, b_idx, b):
    a_idx, a, b_idx, b = _members_flat(axis_size, in_batched, a_idx, a, b_idx, b)
    if not _flatten_members():
        return jax.vmap(pair_dots.fun)(a_idx, a, b_idx, b), True
    s = a.shape[0]
    out = pair_dots(_offset(a_idx, a.shape[1]), a.reshape(-1, a.shape[2]), _offset(b_idx, b.shape[1]),
                    b.reshape(-1, b.shape[2]))
    return out.reshape(s, -1), True


def _offset(idx: jax.Array, n_rows: int) -> jax.Array:
    """Indices ``[S, E]`` of member ``s`` into a table of ``S * n_rows`` rows, flattened to ``[S * E]``."""
    return kernels._offset(idx, n_rows).reshape(-1)


# ----------------------------------------------------------------------------- decode
@partial(jax.custom_vjp, nondiff_argnums=(4,))
def decode_entries(vals: jax.Array, tok: jax.Array, lat: jax.Array, w_dec: jax.Array, n_tok: int) -> jax.Array:
    """``x_hat[t] = sum_{e: tok[e] = t} vals[e] W_dec[lat[e]]`` (no bias) -> ``[n_tok, d_in]``: equals
    ``z @ W_dec`` for the dense ``z`` holding the entries."""
    return pair_scatter(vals, lat, tok, w_dec, n_tok)


def _decode_fwd(vals, tok, lat, w_dec, n_tok):
    return pair_scatter(vals, lat, tok, w_dec, n_tok), (vals, tok, lat, w_dec)


def _decode_bwd(n_tok, res, g):
    vals, tok, lat, w_dec = res
    return pair_dots(lat, w_dec, tok, g), None, None, pair_scatter(vals, tok, lat, g, w_dec.shape[0])


decode_entries.defvjp(_decode_fwd, _decode_bwd)


# ----------------------------------------------------------------------------- encode
@partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def batchtopk_encode(x, w_enc, b_enc, b_dec, dead, k: int, n_aux: int):
    """BatchTopK encoder with a sparse backward pass.

    ``pre = (x - b_dec) @ W_enc + b_enc``; the ``k * B`` largest of ``relu(pre)`` over the batch
    (the dense path's own ``top_k``, so the same entries) as ``(vals, tok, lat)`` ``[k * B]`` each;
    with ``n_aux > 0`` also each token's AuxK selection among ``dead`` latents, as
    :func:`saejax.kernels.topk_encode` (``[B, 0]`` when ``n_aux == 0``). Returns ``(vals, tok,
    lat, aux_vals, aux_idx)``; the gradient touches only the selected entries.
    """
    return _encode(x, w_enc, b_enc, b_dec, dead, k, n_aux)[0]


def _encode(x, w_enc, b_enc, b_dec, dead, k, n_aux):
    xc = x - b_dec
    pre = xc @ w_enc + b_enc
    b, d_sae = pre.shape
    vals, flat = topk.top_k(jax.nn.relu(pre).reshape(-1), k * b)
    tok, lat = flat // d_sae, flat % d_sae
    if n_aux > 0:
        araw, aidx = topk.top_k(jnp.where(dead, pre, -jnp.inf), n_aux)
        alive = jnp.isfinite(araw) & (araw > 0)
    else:
        araw, aidx = jnp.zeros((b, 0), pre.dtype), jnp.zeros((b, 0), jnp.int32)
        alive = araw > 0
    out = (vals, tok, lat, jnp.where(alive, araw, 0.0), aidx)
    return out, (xc, w_enc, vals > 0, tok, lat, alive, aidx)


def _encode_bwd(k, n_aux, res, cts):
    xc, w_enc, pos, tok, lat, alive, aidx = res
    g_vals, _, _, g_aux, _ = cts
    gp = jnp.where(pos, g_vals, 0.0)  # relu' at the kept entries; 0 elsewhere by construction
    if n_aux > 0:  # each token's aux picks as entries of their own
        gp = jnp.concatenate([gp, jnp.where(alive, g_aux, 0.0).reshape(-1)])
        tok = jnp.concatenate([tok, jnp.repeat(jnp.arange(xc.shape[0], dtype=tok.dtype), n_aux)])
        lat = jnp.concatenate([lat, aidx.reshape(-1).astype(lat.dtype)])
    d_sae = w_enc.shape[1]
    d_w_enc = pair_scatter(gp, tok, lat, xc, d_sae).T
    d_b_enc = kernels.scatter_sum(gp, lat, d_sae)
    d_x = pair_scatter(gp, lat, tok, w_enc.T, xc.shape[0])  # dropped by XLA when x is data
    d_b_dec = -(w_enc @ d_b_enc)
    return d_x, d_w_enc, d_b_enc, d_b_dec, None


batchtopk_encode.defvjp(_encode, _encode_bwd)
