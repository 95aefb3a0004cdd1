"""Consensus benchmark: ``saejax.stability.consensus`` end to end on S seeds.

    python benchmarks/bench_consensus.py            # 8 seeds x 4096 and 16384 latents, d_in 128
    python benchmarks/bench_consensus.py --quick    # 8 seeds x 1024 and 4096 latents

Instance: a trained-like stack. Each seed holds 60% of its rows from a shared pool of directions
(permuted, sign-flipped, plus Gaussian noise of norm ~0.3 relative to the unit rows) and 40% of its
own; the random control is ``S`` isotropic dictionaries of the same shape (drawn by ``consensus``).
One call per configuration, timed wall and process CPU seconds, compilation included (a consensus
run is one call in practice). The pairwise matchings (``all_pairs`` kernel + ``match``) are timed
apart, for the trained stack and the control, by wrapping the internal pair-table function; the
rest (grouping, statistics, seed curve) is the remainder. Results go to
``benchmarks/results/consensus.json`` with the machine, load average and versions; a markdown
table is printed.
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
from saejax.stability.consensus import consensus  # noqa: E402

consensus_module = sys.modules["saejax.stability.consensus"]  # the package re-exports the function under this name

TIMES: list = []


def timed_pair_table(fn):
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        TIMES.append(time.perf_counter() - t)
        return out
    return wrapper


def instance(s: int, n: int, d: int, seed: int = 0, shared: float = 0.6, noise: float = 0.3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal((n, d)).astype(np.float32)
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    n_shared = int(shared * n)
    rows = []
    for _ in range(s):
        own = rng.standard_normal((n - n_shared, d)).astype(np.float32)
        x = np.concatenate([pool[rng.choice(n, n_shared, replace=False)], own / np.linalg.norm(own, axis=1, keepdims=True)])
        x = x * rng.choice([-1.0, 1.0], size=(n, 1)).astype(np.float32)
        x = x + noise / np.sqrt(d) * rng.standard_normal((n, d)).astype(np.float32)
        rows.append(x[rng.permutation(n)])
    return np.stack(rows)


def run(s: int, n: int, d: int, top_k: int) -> dict:
    dec = instance(s, n, d)
    TIMES.clear()
    t, c = time.perf_counter(), time.process_time()
    rep = consensus(dec, top_k=top_k, key=0)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    control_s, trained_s = TIMES  # the control is analysed first
    sm = rep.summary
    return dict(seeds=s, d_sae=n, d_in=d, pairs=s * (s - 1) // 2, top_k=top_k, wall_s=wall, cpu_s=cpu,
                trained_pairs_s=trained_s, control_pairs_s=control_s, rest_s=wall - trained_s - control_s,
                method="dense" if n <= 2048 else "sparse", all_optimal=bool(sm["all_optimal"]),
                random_all_optimal=bool(sm["random_all_optimal"]),
                **{k: sm[k] for k in sm if k.startswith(("consensus_", "random_consensus_", "inconsistent_frac"))},
                pwmcc=sm["pwmcc"], random_pwmcc=sm["random_pwmcc"])


def machine() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    except OSError:
        commit = None
    return dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                cpu_count=os.cpu_count(), jax_devices=[str(x) for x in jax.devices()], python=platform.python_version(),
                jax=jax.__version__, numpy=np.__version__, scipy=scipy.__version__, git_commit=commit)


def table(rows) -> str:
    out = ["| seeds | d_sae | d_in | matching | total (s) | trained pairs (s) | control pairs (s) | rest (s) | CPU (s) "
           "| frac in all S @0.7 | random @0.7 | groups @0.7 | proven optimal |",
           "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        out.append(f"| {r['seeds']} | {r['d_sae']} | {r['d_in']} | {r['method']} | {r['wall_s']:.1f} | "
                   f"{r['trained_pairs_s']:.1f} | {r['control_pairs_s']:.1f} | {r['rest_s']:.1f} | {r['cpu_s']:.1f} | "
                   f"{r['consensus_frac_all_0.7']:.3f} | {r['random_consensus_frac_all_0.7']:.3f} | "
                   f"{int(r['consensus_groups_0.7'])} | {r['all_optimal'] and r['random_all_optimal']} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1024 and 4096 latents instead of 4096 and 16384")
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--d-in", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=32)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "consensus.json"))
    args = ap.parse_args()
    consensus_module._pair_table = timed_pair_table(consensus_module._pair_table)
    widths = (1024, 4096) if args.quick else (4096, 16384)
    load0, t0 = os.getloadavg(), time.perf_counter()
    rows = []
    for n in widths:
        rows.append(run(args.seeds, n, args.d_in, args.top_k))
        print(json.dumps(rows[-1]), flush=True)
    result = dict(benchmark="consensus", quick=args.quick, rows=rows, machine=machine(), loadavg_start=list(load0),
                  loadavg_end=list(os.getloadavg()), wall_s=time.perf_counter() - t0)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
