"""Exact per-token top-k on the CPU: XLA's ``lax.top_k`` against every alternative tried.

At the small training shape (d_sae 1024, k 32, S = 16 seeds x B = 1024 tokens = 16384 rows) the
top-k is about half of a sparse TopK step, and it is what keeps the default ``train()`` from 2x
the plain PyTorch loop there. This script times, on the same ``[rows, d_sae]`` float32 array,
each an exact method (its indices are checked against ``lax.top_k``'s as a set):

- ``lax.top_k``: XLA:CPU's TopK thunk, one thread, a partial sort per row;
- ``lax.top_k`` on 16 row blocks: independent ops XLA may run concurrently;
- block maxima: top-k of the 32-wide block maxima, then top-k of the k chosen blocks;
- radix select: the k-th largest key per row by 32 count passes, then compaction by cumsum;
- NumPy ``argpartition`` on every core, as a copying host callback (``jax.pure_callback``);
- ``saejax.topk.top_k_rows``, the library's default: on a CPU the same NumPy selection reading and
  writing XLA's buffers in place (``buffer_callback``, :func:`saejax.topk.host_top_k`), in exactly
  ``lax.top_k``'s order;
- ``torch.topk`` on every core (what the PyTorch loop uses);

and the encoder matmul ``x @ W_enc`` of the same rows as the scale.

    python benchmarks/bench_topk.py [--rows 16384] [--n 1024] [--k 32]

Writes ``benchmarks/results/topk.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax import lax

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_train  # noqa: E402

from saejax import topk  # noqa: E402

POOL = ThreadPoolExecutor(os.cpu_count() or 1)


def np_topk(a: np.ndarray, k: int) -> np.ndarray:
    out = np.empty((a.shape[0], k), np.int32)
    step = -(-a.shape[0] // (os.cpu_count() or 1))

    def part(lo):
        out[lo:lo + step] = np.argpartition(a[lo:lo + step], a.shape[1] - k, axis=1)[:, -k:]

    list(POOL.map(part, range(0, a.shape[0], step)))
    return out


def methods(k: int):
    def split(x, p=16):
        outs = [lax.top_k(c, k) for c in jnp.split(x, p)]
        return jnp.concatenate([o[1] for o in outs])

    def block_max(x, m=32):
        r, n = x.shape
        xg = x.reshape(r, n // m, m)
        _, gi = lax.top_k(xg.max(-1), k)
        gi = -lax.top_k(-gi, k)[0]  # chosen blocks in ascending order: ties as lax.top_k breaks them
        cand = jnp.take_along_axis(xg, gi[:, :, None], axis=1).reshape(r, k * m)
        j = lax.top_k(cand, k)[1]
        return jnp.take_along_axis(gi, j // m, axis=1) * m + j % m

    def radix(x):
        b = lax.bitcast_convert_type(x, jnp.int32)
        u = lax.bitcast_convert_type(b ^ ((b >> 31) & 0x7FFFFFFF), jnp.uint32) ^ jnp.uint32(0x80000000)

        def body(i, pre):
            cand = pre | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
            return jnp.where((u >= cand[:, None]).sum(-1) >= k, cand, pre)

        t = lax.fori_loop(0, 32, body, jnp.zeros(x.shape[0], jnp.uint32))
        gt, eq = u > t[:, None], u == t[:, None]
        sel = gt | (eq & (jnp.cumsum(eq, -1) <= (k - gt.sum(-1))[:, None]))
        cs = jnp.cumsum(sel.astype(jnp.int32), -1)
        return (cs[:, None, :] <= jnp.arange(k)[None, :, None]).sum(-1).astype(jnp.int32)

    def callback(x):
        return jax.pure_callback(lambda a: np_topk(np.asarray(a), k), jax.ShapeDtypeStruct((x.shape[0], k), jnp.int32), x)

    return {"lax.top_k": jax.jit(lambda x: lax.top_k(x, k)[1]), "lax.top_k, 16 row blocks": jax.jit(split),
            "block maxima (32 wide), two top_k": jax.jit(block_max), "radix select + cumsum compaction": jax.jit(radix),
            "NumPy argpartition, pure_callback (copies its operand)": jax.jit(callback),
            "saejax.topk.top_k_rows (host, in place)": jax.jit(lambda x: topk.top_k_rows(x, k)[1])}


def timed(f, reps: int) -> float:
    f()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=16384)
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--d-in", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args(argv)
    info, before = bench_train.machine(), os.getloadavg()
    x = jax.random.normal(jax.random.key(0), (a.rows, a.n))
    want = np.sort(np.asarray(lax.top_k(x, a.k)[1]), 1)
    rows = []
    for name, f in methods(a.k).items():
        got = np.sort(np.asarray(f(x)), 1)
        assert (got == want).all(), name  # exact: the same set of indices per row
        rows.append((name, timed(lambda f=f: jax.block_until_ready(f(x)), a.reps)))
    xt = torch.from_numpy(np.array(x))
    torch.set_num_threads(os.cpu_count() or 1)
    got = np.sort(torch.topk(xt, a.k, sorted=False)[1].numpy(), 1)
    assert (got == want).all(), "torch.topk"
    rows.append((f"torch.topk ({torch.get_num_threads()} threads), outside JAX", timed(lambda: torch.topk(xt, a.k, sorted=False), a.reps)))
    xe, w = jax.random.normal(jax.random.key(1), (a.rows, a.d_in)), jax.random.normal(jax.random.key(2), (a.d_in, a.n))
    mm = jax.jit(lambda u, v: u @ v)
    rows.append((f"scale: encoder matmul [{a.rows}, {a.d_in}] @ [{a.d_in}, {a.n}]", timed(lambda: jax.block_until_ready(mm(xe, w)), a.reps)))
    load = (before, os.getloadavg())
    base = rows[0][1]
    print(f"{info['cpu']} ({info['cores']} cores), jax {info['versions']['jax']}, commit {info['commit']}; "
          f"rows {a.rows}, n {a.n}, k {a.k}; load average {load[0][0]:.2f} before, {load[1][0]:.2f} after\n")
    print("| method (exact) | seconds | vs lax.top_k |\n|---|---|---|")
    for name, sec in rows:
        print(f"| {name} | {sec:.3f} | {base / sec:.2f}x |")
    out = HERE / "results" / "topk.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "load": load, "args": vars(a), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
