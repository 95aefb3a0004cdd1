"""Training speed: saejax's vmapped ensemble against the alternatives and the hardware limit.

For each TopK SAE shape (d_in, d_sae, k) and seed count S, at batch 4096, after warm-up, the
median seconds per training step (all S seeds) of:

- ``sparse``: saejax's vmapped ensemble, ``kernel="sparse"`` (gather decode, scatter-add
  gradients; see saejax.kernels), timed by calling the compiled chunk program directly (a few
  steps per call) with the data already on the device;
- ``dense``: the same ensemble with ``kernel="dense"`` (dense matmuls, as the PyTorch libraries);
- ``looped``: the same sparse JAX step, one seed after another (S x the one-seed step, timed in
  the same rounds);
- ``torch``: a plain dense PyTorch TopK SAE + Adam (benchmarks/torch_reference.py), seed after
  seed (S x its one-seed step);
- ``limit``: the encoder-forward matmul alone, ``x @ W_enc`` for S seeds (vmapped), the only
  dense work a TopK step must do.

Variants are timed interleaved, round by round, so that a machine shared with other work slows
them alike. Each variant's step is reported as seed-tokens/s and as a multiple of ``limit``.
Optionally (``aux`` rows) the sparse ensemble with AuxK active (dead latents present; while none
is dead saejax skips AuxK, as PyTorch does here; half the latents dead, more than ``n_aux``, so
the per-token AuxK runs). This is the breakdown; the public ``train()`` end to end, as a user gets
it, is ``bench_e2e.py``.

``--auxk``: the sparse step at (128, 1024, 32) S=16 and (768, 4096, 32) S=8 with no dead latent,
and with ``n_aux`` dead latents through the per-token AuxK (``saejax.step.SHARED_AUXK`` off) and
through the shared dead set (the default; see ``saejax.sae.DeadSet``), side by side; the target
is AuxK active <= 1.5x the step without dead latents.

    python benchmarks/bench_train.py --quick   # < 3 minutes on a 2-core CPU
    python benchmarks/bench_train.py --auxk    # < 4 minutes on a 2-core CPU
    python benchmarks/bench_train.py           # the table in benchmarks/README.md (~15 min on 2 cores)

Writes ``benchmarks/results/train.json`` (``train_quick.json`` with ``--quick``) with the machine,
device, library versions and git commit, and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
import torch_reference  # noqa: E402

from saejax import SAEConfig, TrainConfig  # noqa: E402
from saejax import step as step_mod  # noqa: E402
from saejax import train as train_mod  # noqa: E402

BATCH = 4096
SHAPES = {"small": (128, 1024, 32), "medium": (768, 4096, 32), "large": (768, 16384, 32)}
# shape -> (seed counts, seed counts that also run the dense ensemble, steps per call, rounds,
# the seed count that also runs the AuxK-active ensemble)
FULL = {
    "small": ((1, 4, 16, 32), (1, 16), 2, 3, 16),
    "medium": ((1, 8, 16), (8,), 1, 3, 8),
    "large": ((1, 8), (1,), 1, 2, None),
}
QUICK = {"small": ((1, 16), (1,), 2, 3, 16)}
AUXK = {"small": (16, 1, 3), "medium": (8, 1, 1)}  # --auxk: shape -> (S, steps per call, timed rounds after a warm one)


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    dev = jax.devices()[0]
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(ram, 1), "os": platform.platform(),
            "device": f"{dev.platform}: {dev.device_kind}", "n_devices": jax.device_count(),
            "versions": {"python": platform.python_version(), "jax": jax.__version__,
                         "jaxlib": jaxlib.__version__,
                         "numpy": np.__version__, "torch": torch.__version__},
            "torch_threads": torch.get_num_threads(), "commit": git_commit()}


def git_commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               capture_output=True, text=True).stdout.strip()
        return rev + ("+dirty" if dirty else "") if rev else "unknown"
    except OSError:
        return "unknown"


# ----------------------------------------------------------------------------- runners
def data(d_in: int, steps: int, batch: int = BATCH) -> np.ndarray:
    x = np.random.default_rng(0).standard_normal((steps, batch, d_in), dtype=np.float32)
    return (x / np.sqrt(d_in)).astype(np.float32)  # unit mean squared norm, as after saejax's input normalisation


@contextmanager
def per_token_auxk():
    """Programs traced inside take the per-token AuxK even while at most ``n_aux`` latents are dead."""
    step_mod.SHARED_AUXK = False
    try:
        yield
    finally:
        step_mod.SHARED_AUXK = True


def ensemble(shape, n_seeds: int, kernel: str, steps: int, *, aux_active: bool = False, n_dead: int | None = None,
             per_token: bool = False, batch: int = BATCH):
    """A closure running ``steps`` training steps of ``n_seeds`` SAEs through the chunk program.

    ``aux_active``: half the latents dead; ``n_dead``: that many. Dead latents stay dead (a bias that
    keeps them out of the top k). ``per_token``: compiled with ``saejax.step.SHARED_AUXK`` off.
    """
    d, n, k = shape
    cfg = SAEConfig(d_in=d, d_sae=n, k=k, kernel=kernel)
    tc = TrainConfig(batch_size=batch, steps=10**6, log_every=steps, chunk_steps=steps)
    total = jnp.int32(10**6)
    keys = jnp.stack([jax.random.fold_in(jax.random.PRNGKey(0), s) for s in range(n_seeds)])
    state = jax.jit(jax.vmap(partial(train_mod.init_state, cfg, tc), in_axes=(0, None)))(keys, jnp.zeros(d))
    if aux_active or n_dead:
        dead = np.arange(n) % 2 == 1 if aux_active else np.isin(np.arange(n), np.linspace(0, n - 1, n_dead).round())
        params = {**state.params, "b_enc": jnp.where(dead, -1e3, state.params["b_enc"])}
        state = state.replace(params=params, since_fired=jnp.where(dead, cfg.dead_tokens, state.since_fired))
    hp = {name: jnp.full(n_seeds, v, jnp.float32) for name, v in
          {"lr": tc.lr, "l1_coef": 0.0, "l0_coef": 0.0, "aux_coef": cfg.aux_coef}.items()}
    xs, act, scale = jnp.asarray(data(d, steps, batch)), jnp.ones(steps, bool), jnp.float32(1.0)
    if per_token:  # its own program (the cached one may have the shared path), traced under the switch
        with per_token_auxk():
            program = step_mod.chunk_program.__wrapped__(cfg, train_mod.program_key(tc), True).lower(
                state, xs, act, hp, scale, total).compile()
    else:
        program = train_mod.chunk_program(cfg, train_mod.program_key(tc), True)
    box = [state, None]

    def run():
        box[0], box[1] = program(box[0], xs, act, hp, scale, total)  # the state is donated: carry it along
        jax.block_until_ready(box)

    run.metrics = lambda: jax.device_get(box[1])
    return run, steps


def limit(shape, n_seeds: int, chunk: int | None = None):
    """``x @ W_enc`` for ``n_seeds`` encoders: the one dense matmul a TopK step needs.

    ``chunk``: the same matmul over token chunks whose outputs are reduced at once (a row max, to
    keep XLA from dropping them), so the ``[S, B, d_sae]`` result is never written to memory.
    The limit reported is the faster of the two forms.
    """
    d, n, _ = shape
    w = jnp.asarray(np.random.default_rng(1).standard_normal((n_seeds, d, n), dtype=np.float32))
    x = jnp.asarray(data(d, 1)[0])
    if chunk is None:
        f = jax.jit(jax.vmap(lambda w_: x @ w_))
    else:
        def chunked(w_):
            return jax.lax.map(lambda xc: jnp.max(xc @ w_, axis=1), x.reshape(-1, chunk, d))
        f = jax.jit(jax.vmap(chunked))
    return (lambda: jax.block_until_ready(f(w))), 1


def torch_seed(shape):
    d, n, k = shape
    sae = torch_reference.TopKSAE(d, n, k)
    opt = torch.optim.Adam(sae.parameters(), lr=3e-4, betas=(0.9, 0.999), eps=1e-8)
    x = torch.from_numpy(data(d, 1)[0])
    return (lambda: torch_reference.train_step(sae, opt, x)), 1


def timed(run_steps) -> float:
    run, steps = run_steps
    t = time.perf_counter()
    run()
    return (time.perf_counter() - t) / steps


def warm(run_steps, *, again_below: float = 2.0) -> None:
    """First call compiles; a cheap variant gets one more untimed call."""
    if timed(run_steps) < again_below:
        timed(run_steps)


# ----------------------------------------------------------------------------- the table
def bench_shape(name: str, plan, log) -> list[dict]:
    shape = SHAPES[name]
    seeds, dense_seeds, steps, rounds, aux_s = plan
    per_seed = {"looped": ensemble(shape, 1, "sparse", steps), "torch": torch_seed(shape)}
    for v in per_seed.values():
        warm(v)
    rows = []
    for s in seeds:
        t0 = time.perf_counter()
        variants = {"limit_full": limit(shape, s), "limit_chunked": limit(shape, s, 512),
                    "sparse": ensemble(shape, s, "sparse", steps)}
        if s in dense_seeds:
            variants["dense"] = ensemble(shape, s, "dense", steps)
        if s == aux_s:
            variants["sparse_auxk"] = ensemble(shape, s, "sparse", steps, aux_active=True)
        compile_s = {}
        for k, v in variants.items():
            t = time.perf_counter()
            warm(v)
            compile_s[k] = time.perf_counter() - t
        times = {k: [] for k in [*variants, *per_seed]}
        for _ in range(rounds):  # interleaved: each round times every variant once
            for k, v in {**variants, **per_seed}.items():
                times[k].append(timed(v))
        if "sparse_auxk" in variants:  # AuxK really ran in the timed steps
            assert np.all(variants["sparse_auxk"][0].metrics()["aux"] > 0)
        med = {k: float(np.median(v)) for k, v in times.items()}
        for k in per_seed:  # seed after seed: S times one seed's step
            med[k] *= s
        med["limit"] = min(med["limit_full"], med["limit_chunked"])
        row = {"shape": name, "d_in": shape[0], "d_sae": shape[1], "k": shape[2], "S": s, "batch": BATCH,
               "rounds": rounds, "steps_per_call": steps, "step_s": med,
               "seed_tokens_per_s": {k: s * BATCH / v for k, v in med.items()},
               "x_limit": {k: v / med["limit"] for k, v in med.items()},
               "raw_s": times, "warmup_s": compile_s, "wall_s": time.perf_counter() - t0}
        rows.append(row)
        log(row)
        del variants
    return rows


def bench_auxk(name: str, n_seeds: int, steps: int, rounds: int, log) -> dict:
    """The sparse step with no dead latent, and with ``n_aux`` dead through the per-token and the
    shared-dead-set AuxK, timed interleaved after one untimed call each."""
    shape = SHAPES[name]
    n_aux = SAEConfig(d_in=shape[0], d_sae=shape[1], k=shape[2]).n_aux
    t0 = time.perf_counter()
    compile_s = {}
    variants = {}
    for k, kw in {"no_dead": {}, "auxk_per_token": {"n_dead": n_aux, "per_token": True},
                  "auxk_shared": {"n_dead": n_aux}}.items():
        t = time.perf_counter()
        variants[k] = ensemble(shape, n_seeds, "sparse", steps, **kw)
        warm(variants[k], again_below=0.0)  # compiles (no_dead and auxk_shared share a program), one untimed call
        compile_s[k] = time.perf_counter() - t
    times = {k: [] for k in variants}
    for _ in range(rounds):
        for k, v in variants.items():
            times[k].append(timed(v))
    for k in ("auxk_per_token", "auxk_shared"):  # AuxK really ran in the timed steps
        assert np.all(variants[k][0].metrics()["aux"] > 0), k
    med = {k: float(np.median(v)) for k, v in times.items()}
    row = {"shape": name, "d_in": shape[0], "d_sae": shape[1], "k": shape[2], "S": n_seeds, "n_aux": n_aux,
           "n_dead": n_aux, "batch": BATCH, "rounds": rounds, "steps_per_call": steps, "step_s": med,
           "x_no_dead": {k: v / med["no_dead"] for k, v in med.items()}, "raw_s": times, "warmup_s": compile_s,
           "wall_s": time.perf_counter() - t0}
    log(row)
    return row


def auxk_table(rows: list[dict]) -> str:
    head = ("| shape (d_in, d_sae, k) | S | n_aux = n_dead | no dead latent | AuxK per-token (old) "
            "| AuxK shared dead set (new) | old / no dead | new / no dead | old / new |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        t, x = r["step_s"], r["x_no_dead"]
        lines.append(f"| ({r['d_in']}, {r['d_sae']}, {r['k']}) | {r['S']} | {r['n_aux']} "
                     f"| {t['no_dead']:.3g} s | {t['auxk_per_token']:.3g} s | {t['auxk_shared']:.3g} s "
                     f"| {x['auxk_per_token']:.2f}x | {x['auxk_shared']:.2f}x "
                     f"| {t['auxk_per_token'] / t['auxk_shared']:.2f}x |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    def cell(r, k):
        if k not in r["step_s"]:
            return "-"
        return f"{r['step_s'][k]:.3g} s ({r['x_limit'][k]:.2g}x)"

    head = ("| shape (d_in, d_sae, k) | S | limit: x @ W_enc | saejax sparse | saejax dense | looped JAX | PyTorch dense "
            "| sparse, AuxK active | sparse seed-tok/s | sparse / PyTorch | sparse / looped |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        tok = dict.fromkeys(["torch", "looped"], float("nan")) | r["seed_tokens_per_s"]
        lines.append(f"| ({r['d_in']}, {r['d_sae']}, {r['k']}) | {r['S']} | {r['step_s']['limit']:.3g} s | {cell(r, 'sparse')} "
                     f"| {cell(r, 'dense')} | {cell(r, 'looped')} | {cell(r, 'torch')} | {cell(r, 'sparse_auxk')} "
                     f"| {tok['sparse']:,.0f} | {tok['sparse'] / tok['torch']:.2f}x | {tok['sparse'] / tok['looped']:.2f}x |")
    return "\n".join(lines)


def targets(rows: list[dict]) -> list[str]:
    out = []
    by = {(r["shape"], r["S"]): r for r in rows if "torch" in r["step_s"]}
    if (r := by.get(("large", 8))) is not None:
        x, sp = r["x_limit"]["sparse"], r["seed_tokens_per_s"]["sparse"] / r["seed_tokens_per_s"]["torch"]
        out.append(f"(768, 16384, 32), S=8: sparse step {x:.2f}x the encoder-forward limit (target <= 2): "
                   f"{'met' if x <= 2 else 'NOT met'}; {sp:.1f}x PyTorch's seed-tokens/s (target >= 4): "
                   f"{'met' if sp >= 4 else 'NOT met'}")
    if (r := by.get(("small", 16))) is not None:
        tok = r["seed_tokens_per_s"]
        a, b = tok["sparse"] / tok["torch"], tok["sparse"] / tok["looped"]
        out.append(f"(128, 1024, 32), S=16: {a:.1f}x PyTorch (target >= 2): {'met' if a >= 2 else 'NOT met'}; "
                   f"{b:.2f}x the looped JAX step (target >= 1): {'met' if b >= 1 else 'NOT met'}")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="two shapes, few seed counts (< 3 minutes on CPU)")
    p.add_argument("--shapes", nargs="*", choices=list(SHAPES), help="only these shapes")
    p.add_argument("--auxk", action="store_true",
                   help="only AuxK: no dead latent vs n_aux dead, per-token vs shared dead set (< 4 minutes on CPU)")
    p.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/train[_quick|_auxk].json)")
    a = p.parse_args(argv)
    plan = AUXK if a.auxk else QUICK if a.quick else FULL
    if a.shapes:
        plan = {k: v for k, v in plan.items() if k in a.shapes}
    out = a.out or HERE / "results" / ("train_quick.json" if a.quick else "train_auxk.json" if a.auxk else "train.json")
    t0 = time.perf_counter()
    info = machine()
    print(f"{info['cpu']} ({info['cores']} cores), {info['device']}, jax {jax.__version__}, torch {torch.__version__}, "
          f"commit {info['commit']}; load average {os.getloadavg()[0]:.1f}", flush=True)

    def log(r):
        print(f"  {r['shape']:6s} S={r['S']:<3d} " + "  ".join(f"{k} {v:.3g}s" for k, v in r["step_s"].items())
              + f"  ({r['wall_s']:.0f} s, warm-up " + " ".join(f"{k} {v:.0f}s" for k, v in r["warmup_s"].items()) + ")",
              flush=True)

    if a.auxk:
        return auxk_main(plan, out, info, t0)
    rows = [row for name, pl in plan.items() for row in bench_shape(name, pl, log)]
    _save(out, t0, {"machine": info, "batch": BATCH, "quick": a.quick, "rows": rows})
    print()
    print(table(rows))
    for line in targets(rows):
        print(line)
    print(f"\n{time.perf_counter() - t0:.0f} s in all; JSON in {out.relative_to(HERE.parent) if out.is_relative_to(HERE.parent) else out}")


def _save(out: Path, t0: float, result: dict) -> None:
    result.update(load_average=os.getloadavg(), wall_s=time.perf_counter() - t0, date=time.strftime("%Y-%m-%d %H:%M:%S"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))


def auxk_main(plan: dict, out: Path, info: dict, t0: float) -> None:
    load0 = os.getloadavg()

    def log(r):
        print(f"  {r['shape']:6s} S={r['S']:<3d} " + "  ".join(f"{k} {v:.3g}s" for k, v in r["step_s"].items())
              + f"  ({r['wall_s']:.0f} s, warm-up " + " ".join(f"{k} {v:.0f}s" for k, v in r["warmup_s"].items()) + ")",
              flush=True)

    rows = [bench_auxk(name, *pl, log) for name, pl in plan.items()]
    _save(out, t0, {"machine": info, "batch": BATCH, "auxk": True, "rows": rows, "load_average_before": load0})
    print()
    print(auxk_table(rows))
    for r in rows:
        x = r["x_no_dead"]["auxk_shared"]
        print(f"({r['d_in']}, {r['d_sae']}, {r['k']}), S={r['S']}: AuxK active {x:.2f}x the step without dead latents "
              f"(target <= 1.5): {'met' if x <= 1.5 else 'NOT met'}")
    print(f"\nload average {load0[0]:.2f} before, {os.getloadavg()[0]:.2f} after; {time.perf_counter() - t0:.0f} s in all; "
          f"JSON in {out.relative_to(HERE.parent) if out.is_relative_to(HERE.parent) else out}")


if __name__ == "__main__":
    main()
