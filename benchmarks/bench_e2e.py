"""End to end, as a user gets it: the public ``train()`` with its defaults against a plain PyTorch loop.

For each case (TopK shape, seed count S, batch B, steps), on the same in-memory tokens:

- ``saejax``: ``train(SAEConfig(d_in, d_sae, k=k), TrainConfig(batch_size=B, steps=steps),
  ArraySource(x), range(S))``, every other setting at its default (the kernel, chunking, data
  order); the wall time of the whole call: source checks, data-mean init, state init, batch
  assembly and transfer, the compiled chunks, metrics. The first call compiles and is reported
  apart (``first call``); the timed calls find the program compiled, as every later unit of a run
  does;
- ``torch``: ``benchmarks/torch_reference.py``'s plain dense TopK SAE with ``torch.optim.Adam``, one
  seed after another, each over the same batches (a fresh random order per seed is no cheaper), as
  the source studies and the PyTorch SAE libraries train;
- ``program``: saejax's compiled chunk program alone, with the batches already on the device
  (``bench_train.py``'s breakdown), so ``saejax / program`` is what the host side costs.

Rounds are interleaved (saejax, torch, saejax, torch, ..., saejax) with identical thread settings
(XLA and torch both on every core), medians reported. The load average is printed before and
after. The benchmark itself keeps every core busy, so the after figure includes its own threads:
the table is labelled "LOADED" (its figures must not be quoted as a quiet machine's) when the load
was above 1 before, or above 1 plus the core count after (other work joined during the run).

    python benchmarks/bench_e2e.py --quick   # the small case with fewer steps (~2 minutes, 2 cores)
    python benchmarks/bench_e2e.py           # both cases of benchmarks/README.md (~12 minutes, 2 cores)
    python benchmarks/bench_e2e.py --archs   # BatchTopK / Matryoshka: default train() vs kernel="dense"

Writes ``benchmarks/results/e2e.json`` (``e2e_quick.json``, ``e2e_archs.json``) and prints a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench_train  # noqa: E402
import torch  # noqa: E402
import torch_reference  # noqa: E402

from saejax import ArraySource, SAEConfig, TrainConfig, kernels  # noqa: E402
from saejax.train import train  # noqa: E402

# name -> ((d_in, d_sae, k), S, batch, steps, rounds of saejax (torch gets one fewer))
CASES = {"small": ((128, 1024, 32), 16, 1024, 60, 3), "large": ((768, 16384, 32), 8, 4096, 3, 2)}
QUICK = {"small": ((128, 1024, 32), 16, 1024, 20, 2)}
TARGET = {"small": 2.0, "large": 3.0}  # issue 21: default train() >= this x the plain PyTorch loop
QUIET = 1.0  # load average (beyond the benchmark's own threads) above which the table is labelled LOADED


def is_loaded(load: tuple) -> bool:
    """Other work on the machine: load above QUIET before, or above QUIET + the cores (this benchmark's
    own threads) after."""
    return load[0][0] > QUIET or load[1][0] > QUIET + (os.cpu_count() or 1)


def tokens(d_in: int, n: int) -> np.ndarray:
    x = np.random.default_rng(7).standard_normal((n, d_in), dtype=np.float32)
    return (x / np.sqrt(d_in)).astype(np.float32)


def run_saejax(shape, n_seeds: int, batch: int, steps: int, x: np.ndarray, **cfg_kw) -> tuple[float, str]:
    d, n, k = shape
    cfg = SAEConfig(d_in=d, d_sae=n, k=k, **cfg_kw)
    t = time.perf_counter()
    r = train(cfg, TrainConfig(batch_size=batch, steps=steps), ArraySource(x), list(range(n_seeds)), progress=False)
    seconds = time.perf_counter() - t
    assert np.isfinite(r.history["loss"]).all()
    return seconds, kernels.resolve(cfg)


def run_torch(shape, n_seeds: int, batch: int, steps: int, x: np.ndarray) -> float:
    d, n, k = shape
    xt = torch.from_numpy(x)
    t = time.perf_counter()
    order = torch.randperm(len(xt), generator=torch.Generator().manual_seed(0))
    for s in range(n_seeds):
        sae = torch_reference.TopKSAE(d, n, k, seed=s)
        opt = torch.optim.Adam(sae.parameters(), lr=3e-4, betas=(0.9, 0.999), eps=1e-8)
        for i in range(steps):
            torch_reference.train_step(sae, opt, xt[order[i * batch:(i + 1) * batch]])
    return time.perf_counter() - t


def program_seconds(shape, n_seeds: int, batch: int, kernel: str, rounds: int) -> float:
    """Seconds per step of the compiled chunk program alone (10 steps per call, data on the device)."""
    run = bench_train.ensemble(shape, n_seeds, kernel, 10, batch=batch)
    bench_train.warm(run)
    return statistics.median(bench_train.timed(run) for _ in range(rounds))


def bench_case(name: str, case) -> dict:
    shape, n_seeds, batch, steps, rounds = case
    x = tokens(shape[0], steps * batch)
    first, kernel = run_saejax(shape, n_seeds, batch, steps, x)
    ours, theirs = [], []
    for i in range(2 * rounds - 1):
        if i % 2 == 0:
            ours.append(run_saejax(shape, n_seeds, batch, steps, x)[0])
        else:
            theirs.append(run_torch(shape, n_seeds, batch, steps, x))
        print(f"  {name}: saejax {[f'{v:.1f}' for v in ours]} s, torch {[f'{v:.1f}' for v in theirs]} s", flush=True)
    prog = program_seconds(shape, n_seeds, batch, kernel, rounds) * steps
    a, b = statistics.median(ours), statistics.median(theirs)
    seed_tokens = n_seeds * batch * steps
    return {"case": name, "shape": shape, "S": n_seeds, "batch": batch, "steps": steps, "kernel": kernel,
            "saejax_s": ours, "torch_s": theirs, "first_call_s": first, "program_s": prog,
            "saejax_seed_tok_s": seed_tokens / a, "torch_seed_tok_s": seed_tokens / b,
            "speedup": b / a, "host_overhead": a / prog, "target": TARGET[name]}


def table(rows: list[dict], load: tuple) -> str:
    loaded = is_loaded(load)
    head = (f"load average {load[0][0]:.2f} before, {load[1][0]:.2f} after"
            + (" -- LOADED: not a quiet machine's figures, do not quote" if loaded else ""))
    lines = [head, "",
             "| shape (d_in, d_sae, k) | S | B | steps | kernel (auto) | saejax `train()` | plain PyTorch | speedup | target "
             "| first call (compiles) | compiled program alone | `train()` / program |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {tuple(r['shape'])} | {r['S']} | {r['batch']} | {r['steps']} | {r['kernel']} "
                     f"| {r['saejax_seed_tok_s']:,.0f} seed-tok/s | {r['torch_seed_tok_s']:,.0f} seed-tok/s "
                     f"| **{r['speedup']:.2f}x** | >= {r['target']:.0f}x: {'met' if r['speedup'] >= r['target'] else 'NOT met'} "
                     f"| {r['first_call_s']:.1f} s | {r['program_s']:.1f} s | {r['host_overhead']:.2f}x |")
    return "\n".join(lines)


# --archs: arch -> shapes ((d_in, d_sae, k), S, batch, steps, rounds), default kernel against dense
ARCH_CASES = {"batchtopk": [((128, 1024, 32), 16, 1024, 12, 3), ((128, 8192, 32), 4, 1024, 12, 3)],
              "matryoshka": [((128, 8192, 32), 4, 1024, 12, 3)]}


def bench_archs() -> list[dict]:
    """The other archs with a sparse step: default ``train()`` (``kernel="auto"``) against the same
    call with ``kernel="dense"``, interleaved, medians."""
    rows = []
    for arch, cases in ARCH_CASES.items():
        for shape, n_seeds, batch, steps, rounds in cases:
            x = tokens(shape[0], steps * batch)
            for kern in ("auto", "dense"):  # first calls compile
                run_saejax(shape, n_seeds, batch, steps, x, arch=arch, kernel=kern)
            times: dict[str, list[float]] = {"auto": [], "dense": []}
            for _ in range(rounds):
                for kern in times:
                    times[kern].append(run_saejax(shape, n_seeds, batch, steps, x, arch=arch, kernel=kern)[0])
            auto, dense = statistics.median(times["auto"]), statistics.median(times["dense"])
            kernel = kernels.resolve(SAEConfig(d_in=shape[0], d_sae=shape[1], k=shape[2], arch=arch))
            rows.append({"arch": arch, "shape": shape, "S": n_seeds, "batch": batch, "steps": steps, "kernel": kernel,
                         "auto_s": times["auto"], "dense_s": times["dense"], "speedup": dense / auto,
                         "auto_seed_tok_s": n_seeds * batch * steps / auto})
            print(f"  {arch} {shape}: auto ({kernel}) {auto:.1f} s, dense {dense:.1f} s: {dense / auto:.2f}x", flush=True)
    return rows


def arch_table(rows: list[dict], load: tuple) -> str:
    lines = [f"load average {load[0][0]:.2f} before, {load[1][0]:.2f} after"
             + (" -- LOADED: not a quiet machine's figures, do not quote" if is_loaded(load) else ""), "",
             "| arch | shape (d_in, d_sae, k) | S | B | steps | `train()` default | kernel=\"dense\" | default seed-tok/s | speedup |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arch']} | {tuple(r['shape'])} | {r['S']} | {r['batch']} | {r['steps']} "
                     f"| {statistics.median(r['auto_s']):.1f} s ({r['kernel']}) | {statistics.median(r['dense_s']):.1f} s "
                     f"| {r['auto_seed_tok_s']:,.0f} | **{r['speedup']:.2f}x** |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the small case, fewer steps and rounds")
    p.add_argument("--cases", nargs="*", choices=list(CASES), help="only these cases")
    p.add_argument("--archs", action="store_true", help="BatchTopK and Matryoshka: default kernel against dense")
    p.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/e2e[_quick].json)")
    a = p.parse_args(argv)
    plan = QUICK if a.quick else {k: v for k, v in CASES.items() if not a.cases or k in a.cases}
    out = a.out or HERE / "results" / ("e2e_archs.json" if a.archs else "e2e_quick.json" if a.quick else "e2e.json")
    torch.set_num_threads(os.cpu_count() or 1)
    info = bench_train.machine()
    before = os.getloadavg()
    print(f"{info['cpu']} ({info['cores']} cores), {info['device']}, jax {info['versions']['jax']}, torch "
          f"{info['versions']['torch']} ({torch.get_num_threads()} threads), commit {info['commit']}; "
          f"load average {before[0]:.2f}", flush=True)
    t0 = time.perf_counter()
    rows = bench_archs() if a.archs else [bench_case(name, case) for name, case in plan.items()]
    load = (before, os.getloadavg())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "load_before": load[0], "load_after": load[1],
                               "loaded": is_loaded(load), "rows": rows,
                               "seconds": time.perf_counter() - t0, "date": time.strftime("%Y-%m-%d %H:%M")}, indent=1))
    print()
    print(arch_table(rows, load) if a.archs else table(rows, load))
    print(f"\n{time.perf_counter() - t0:.0f} s in all; JSON in {out}")


if __name__ == "__main__":
    main()
