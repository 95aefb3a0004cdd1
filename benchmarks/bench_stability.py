"""Stability kernel and matching benchmark.

    python benchmarks/bench_stability.py            # full grid (about 10-15 min on a 2-core CPU)
    python benchmarks/bench_stability.py --quick    # under 2 min

1. All-pairs kernel (``saejax.stability.all_pairs``: per-row/column max, argmax and top-8 of
   |cos| for every seed pair) for 8/16/32 seeds at d_sae 4096/16384, d_in 768, against a naive
   per-pair NumPy loop (normalise, ``a @ b.T``, abs, max/argmax, ``argpartition`` top-k, both
   directions), and against the bare NumPy GEMM ``a @ b.T`` (the floor both share). The naive
   loop is timed on 2 pairs (1 at 16k) and extrapolated per pair; all-pairs runs predicted to
   exceed ``--kernel-budget`` seconds are extrapolated per pair from the largest measured run at
   that width (``kernel_extrapolated`` in the JSON, ``*`` in the table).
2. Matching (``saejax.stability.match``) at n = 1k/4k/16k (dense and sparse) and 65k (sparse
   only) on two instances: ``planted`` (b = a permuted + noise, trained-like) and ``random``
   (independent dictionaries: the hardest case for the sparse solver). Reported: dense time,
   sparse time (kernel + solve + certificate), the objective gap dense - sparse, and the sparse
   solver's proven gap bound.

Timings are medians over repeats after a warm-up (compilation excluded), ``block_until_ready``
on all outputs; process CPU seconds are recorded too, as wall time on a shared machine moves
with other load. Results go to ``benchmarks/results/stability.json`` with the machine, load
average, versions and git commit; a markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import scipy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from saejax.stability import all_pairs, match, pair_stats  # noqa: E402
from saejax.stability.kernel import _all_pairs_jit, default_chunk  # noqa: E402

D_IN = 768
TOP_K = 8


def naive_pair(a: np.ndarray, b: np.ndarray, k: int):
    """What one would write per pair in NumPy: the full |cos| table, then reductions."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    c = np.abs(a @ b.T)
    out = [c.max(1), c.argmax(1), c.max(0), c.argmax(0)]
    for m in (c, c.T):
        idx = np.argpartition(-m, k, axis=1)[:, :k]
        val = np.take_along_axis(m, idx, axis=1)
        order = np.argsort(-val, axis=1)
        out += [np.take_along_axis(val, order, 1), np.take_along_axis(idx, order, 1)]
    return out


CPU = {}  # process CPU seconds (all threads) of the last timed() call: robust to other load


def timed(fn, repeats: int) -> float:
    """Median wall seconds of ``fn`` (outputs blocked on); its CPU seconds go to ``CPU["last"]``."""
    times, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    CPU["last"] = float(np.median(cpu))
    return float(np.median(times))


def compiled_all_pairs(dicts, pairs):
    """The jitted all-pairs program behind ``all_pairs``, compiled ahead of time, so timing a
    large configuration needs no separate warm-up run."""
    s, n, _ = dicts.shape
    ok = np.ones((s, n), bool)
    chunk = default_chunk(n)
    exe = _all_pairs_jit.lower(dicts, ok, pairs, k=TOP_K, chunk=chunk, signed=False, masked=False).compile()
    return lambda: exe(dicts, ok, pairs)


def bench_kernel(seeds, widths, budget, naive_pairs, key):
    rows = []
    for n in widths:
        dicts_all = jax.random.normal(jax.random.fold_in(key, n), (max(seeds), n, D_IN), dtype=np.float32)
        pairs_all = np.stack(np.triu_indices(max(seeds), 1), axis=1).astype(np.int32)
        host = np.asarray(dicts_all)
        n_naive = naive_pairs if n <= 4096 else 1
        reps = 3 if n <= 4096 else 1
        t_gemm = timed(lambda: [host[i] @ host[j].T for i, j in pairs_all[:n_naive]], reps) / n_naive
        c_gemm = CPU["last"] / n_naive
        t_naive = timed(lambda: [naive_pair(host[i], host[j], TOP_K) for i, j in pairs_all[:n_naive]], reps) / n_naive
        c_naive = CPU["last"] / n_naive
        # Public call once on a small block: checks the wrapper adds nothing measurable.
        block = pairs_all[:8]
        jax.block_until_ready(all_pairs(dicts_all, top_k=TOP_K, pairs=block).stats)
        t_public = timed(lambda: all_pairs(dicts_all, top_k=TOP_K, pairs=block).stats, 1) / len(block)
        per_pair = timed(compiled_all_pairs(dicts_all, block), 1) / len(block)
        cpu_pair = CPU["last"] / len(block)
        for s in seeds:
            dicts = dicts_all[:s]
            n_pairs = s * (s - 1) // 2
            if per_pair * n_pairs <= budget:
                reps = 3 if per_pair * n_pairs < 5 else 1
                t_kernel, measured = timed(compiled_all_pairs(dicts, pairs_all[:n_pairs]), reps), n_pairs
                per_pair, cpu_pair = t_kernel / n_pairs, CPU["last"] / n_pairs
            else:
                t_kernel, measured = per_pair * n_pairs, None
            rows.append(dict(seeds=s, d_sae=n, d_in=D_IN, pairs=n_pairs, top_k=TOP_K, kernel_s=t_kernel,
                             kernel_cpu_s=cpu_pair * n_pairs, kernel_extrapolated=measured is None,
                             public_call_per_pair_s=t_public, naive_s=t_naive * n_pairs,
                             naive_cpu_s=c_naive * n_pairs, naive_measured_pairs=n_naive,
                             numpy_gemm_only_s=t_gemm * n_pairs, numpy_gemm_only_cpu_s=c_gemm * n_pairs,
                             speedup=t_naive * n_pairs / t_kernel, speedup_cpu=c_naive / cpu_pair,
                             kernel_over_gemm=t_kernel / (t_gemm * n_pairs)))
            print(f"kernel S={s} n={n}: {t_kernel:.2f}s ({'extrapolated' if measured is None else 'measured'}), "
                  f"naive {t_naive * n_pairs:.1f}s, NumPy GEMM alone {t_gemm * n_pairs:.1f}s -> "
                  f"{rows[-1]['speedup']:.1f}x", flush=True)
    return rows


def instance(kind, n, key):
    rng = np.random.default_rng(key)
    a = rng.standard_normal((n, D_IN), dtype=np.float32)
    if kind == "planted":  # trained-like: a shared dictionary under noise, matched |cos| ~ 0.7
        return a, a[rng.permutation(n)] + rng.standard_normal((n, D_IN), dtype=np.float32)
    return a, rng.standard_normal((n, D_IN), dtype=np.float32)


def bench_matching(widths, dense_widths, kinds, top_k, save):
    rows = []
    for n in widths:
        for kind in kinds:
            a, b = instance(kind, n, n)
            reps = 3 if n <= 1024 else 1
            if n <= 16384:  # warm-up: compile the kernel for this shape (at 65k it is ~1% of a run)
                match(a, b, method="sparse", top_k=top_k)
            stats = [None]

            def run_kernel():
                stats[0] = pair_stats(a, b, top_k=top_k)
                return stats[0]

            t_k = timed(run_kernel, reps)
            sparse = [None]

            def run_solve():  # the candidate graph, solver and certificate, from the kernel's output
                sparse[0] = match(a, b, method="sparse", top_k=top_k, stats=stats[0])
                return 0

            t_solve = timed(run_solve, reps)
            sp = sparse[0]
            row = dict(n=n, instance=kind, top_k=top_k, sparse_s=t_k + t_solve, sparse_kernel_s=t_k,
                       sparse_solve_s=t_solve, sparse_value=sp.value, sparse_optimal=sp.optimal,
                       sparse_gap_bound=sp.gap_bound, mean_matched_cos=float(sp.abs_cos.mean()),
                       dense_s=None, dense_value=None, gap=None)
            if n in dense_widths:
                dense = [None]

                def run_dense():
                    dense[0] = match(a, b, method="dense")
                    return 0

                if n <= 1024:
                    run_dense()  # compile the dense score function for this shape
                t_dense = timed(run_dense, reps)
                row.update(dense_s=t_dense, dense_value=dense[0].value,
                           gap=float(dense[0].abs_cos.sum() - sp.abs_cos.sum()))
            rows.append(row)
            save(rows)
            print(f"match n={n} {kind}: sparse {row['sparse_s']:.2f}s (kernel {t_k:.2f}s + solve {t_solve:.2f}s) "
                  f"optimal={sp.optimal} bound={sp.gap_bound:.2e}; dense {row['dense_s']} gap {row['gap']}", flush=True)
    return rows


def machine() -> dict:
    root = Path(__file__).resolve().parents[1]

    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, cwd=root).stdout.strip()
        except OSError:
            return None

    dirty = git("status", "--porcelain", "--", "saejax/stability", "benchmarks/bench_stability.py")
    return dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                cpu_count=os.cpu_count(), jax_devices=[str(d) for d in jax.devices()],
                python=platform.python_version(), jax=jax.__version__, numpy=np.__version__,
                scipy=scipy.__version__, git_commit=git("rev-parse", "HEAD"),
                git_dirty=None if dirty is None else bool(dirty))


def table(kernel_rows, match_rows) -> str:
    out = ["| seeds | d_sae | pairs | kernel (s) | naive NumPy loop (s) | speedup (wall / CPU time) | NumPy GEMM alone (s) |",
           "|---|---|---|---|---|---|---|"]
    for r in kernel_rows:
        k = f"{r['kernel_s']:.1f}" + (" *" if r["kernel_extrapolated"] else "")
        out.append(f"| {r['seeds']} | {r['d_sae']} | {r['pairs']} | {k} | {r['naive_s']:.1f} † | "
                   f"{r['speedup']:.1f}x / {r['speedup_cpu']:.1f}x | {r['numpy_gemm_only_s']:.1f} † |")
    out += ["", "| n | instance | dense (s) | sparse total (s) | = kernel (s) | + solve & certify (s) | dense - sparse objective | proven gap bound | optimal |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in match_rows:
        dense = "—" if r["dense_s"] is None else f"{r['dense_s']:.2f}"
        gap = "—" if r["gap"] is None else f"{r['gap']:.1e}"
        out.append(f"| {r['n']} | {r['instance']} | {dense} | {r['sparse_s']:.2f} | {r['sparse_kernel_s']:.2f} | "
                   f"{r['sparse_solve_s']:.2f} | {gap} | {r['sparse_gap_bound']:.1e} | {r['sparse_optimal']} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small grid, under 2 minutes")
    ap.add_argument("--only", choices=["kernel", "matching"], help="run one section, keep the other from --out")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "stability.json"))
    ap.add_argument("--kernel-budget", type=float, default=120.0,
                    help="seconds; longer all-pairs runs are extrapolated per pair from measured ones")
    args = ap.parse_args(argv)
    out = Path(args.out)
    result = json.loads(out.read_text()) if args.only and out.exists() else {"kernel": [], "matching": []}
    result.update(benchmark="stability", quick=args.quick, machine=machine(), loadavg_start=os.getloadavg())
    t0 = time.perf_counter()

    def save(section):
        def write(rows):
            result[section] = rows
            result.update(loadavg_end=os.getloadavg(), wall_s=time.perf_counter() - t0)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1))
        return write

    key = jax.random.PRNGKey(0)
    seeds, widths = ([8], [2048]) if args.quick else ([8, 16, 32], [4096, 16384])
    m_widths = [1024, 4096] if args.quick else [1024, 4096, 16384, 65536]
    if args.only in (None, "kernel"):
        save("kernel")(bench_kernel(seeds, widths, args.kernel_budget, 2, key))
    if args.only in (None, "matching"):
        bench_matching(m_widths, {1024, 4096, 16384}, ["planted", "random"], 32, save("matching"))
    print(table(result["kernel"], result["matching"]))
    print("* extrapolated per pair from the largest measured run at that d_sae; "
          "† timed on 2 pairs (1 at 16k) and extrapolated per pair")
    print(f"load average {result['loadavg_start'][0]:.1f} -> {os.getloadavg()[0]:.1f}; wrote {out}")


if __name__ == "__main__":
    main()
