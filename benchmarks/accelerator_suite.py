"""Accelerator suite: correctness on the device, then every speed figure, in one run.

    python benchmarks/accelerator_suite.py                   # one H100/H200 or TPU v5e, under 6 minutes
    python benchmarks/accelerator_suite.py --append-readme   # and append the table to benchmarks/README.md
    python benchmarks/accelerator_suite.py --quick           # the same code paths at tiny shapes (CI, CPU)

Correctness first, on the device (max |difference| / max |reference| per parameter <= 1e-5): a
seed in the vmapped ensemble = the seed alone; ``kernel="sparse"`` = ``"dense"``; sharded over
every device (``sharding.make_mesh``) = one device (skipped on one); ``all_pairs`` = a NumPy
brute-force |cos| max and top-8. A failure is printed, repeated at ``Precision.HIGHEST``
(reduced-precision matmuls or a code error?) and sets exit status 1; the measurements still run,
so one short lending yields every figure. Measurements: medians of interleaved rounds after
warm-up (each round times every variant of a section once); training steps are the trainer's
chunk program called directly (batch 4096, float32, fresh SAEs: no AuxK). Sections: ensemble vs a
Python loop of the one-seed program; large-shape step vs the encoder-forward limit (bench_train.
limit) and the matmul peak measured here (float32 at the default precision, bfloat16); dense vs
sparse kernel (winner -> ``"kernel_default"``); ``all_pairs`` vs one bare HIGHEST GEMM per pair;
sparse ``match``; SmolLM2 extraction from the packaged GGUF.

Writes ``benchmarks/results/accelerator_<backend>[_quick].json`` (machine, versions, git commit,
load average before and after) and prints a markdown table with the GPU targets. Exit status 1
also if a section raised (the JSON records the rest).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from functools import cache, partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import scipy

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
try:
    import bench_train as bt  # imports torch
except ImportError as e:
    raise SystemExit(f"accelerator_suite needs PyTorch (pip install 'saejax[hf]'): {e}") from None
import bench_stability as bs

from saejax import SAEConfig, SyntheticSource, TrainConfig, sharding
from saejax import train as train_mod
from saejax.activations import ExtractSpec, PythonDocs, extract, resolve_model
from saejax.cache import cache_root
from saejax.errors import ConfigError
from saejax.hf_locate import locate
from saejax.models.packaged import packaged_model
from saejax.stability import all_pairs, match

FULL = dict(small=(128, 1024, 32), s_small=32, large=(768, 16384, 32), s_large=8, steps=4, rounds=3,
            matmul=8192, pairs=(8, 16384), match=(16384, 65536), tokens=4096, extract_runs=(1, 2))
QUICK = dict(small=(16, 64, 4), s_small=4, large=(32, 256, 8), s_large=2, steps=2, rounds=2,
             matmul=512, pairs=(4, 1024), match=(1024,), tokens=128, extract_runs=(0, 1))
# extract_runs: (untimed warm-up extractions, timed ones); each loads the model afresh
TARGETS = {"ensemble_speedup": 10.0, "limit_over_step": 0.5, "match_s": 2.0}  # GPU targets
TOL = 1e-5
CHECK = (SyntheticSource(d=32, n_features=64, s=4, n_heldout=256), SAEConfig(d_in=32, d_sae=128, k=8, kernel="sparse"),
         TrainConfig(batch_size=512, steps=20, lr=1e-3, log_every=5, chunk_steps=20))
block = jax.block_until_ready


# ----------------------------------------------------------------------------- correctness
def rel_err(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))) / (np.max(np.abs(np.asarray(y))) + 1e-12))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@cache
def fit(seeds: tuple, mesh, kernel="sparse"):
    src, cfg, tc = CHECK
    return train_mod.train(cfg.replace(kernel=kernel), tc, src, list(seeds), progress=False, mesh=mesh).params


def all_pairs_error() -> float:
    """Largest |difference| of row/column max and top-8 |cos| against bench_stability's NumPy loop."""
    d = np.random.default_rng(0).standard_normal((4, 300, 64), dtype=np.float32)
    res = all_pairs(d, top_k=8)
    st = jax.device_get(res.stats)
    errs = [0.0]
    for p, (i, j) in enumerate(res.pairs):
        want = bs.naive_pair(d[i], d[j], 8)
        got = (st.row_max[p], st.col_max[p], st.row_topk[p], st.col_topk[p])
        errs += [float(np.max(np.abs(g - w))) for g, w in zip(got, (want[0], want[2], want[4], want[6]))]
    return max(errs)


def verdict(name: str, fn) -> dict:
    err = fn()
    out = {"ok": bool(err <= TOL), "rel_err": err, "tol": TOL}
    if not out["ok"]:
        fit.cache_clear()  # trained again at the other precision
        with jax.default_matmul_precision("highest"):
            out["rel_err_at_highest_precision"] = fn()
        fit.cache_clear()
        print(f"  FAIL {name}: error {err:.2e} > {TOL:g} (at HIGHEST precision: "
              f"{out['rel_err_at_highest_precision']:.2e})", flush=True)
    return out


def correctness() -> dict:
    one = sharding.make_mesh(devices=jax.devices()[:1])
    seeds = (0, 1, 2, 3)
    member = lambda tree, m: jax.tree.map(lambda a: a[m], tree)
    checks = {"ensemble_equals_alone": lambda: rel_err(member(fit(seeds, one), 2), member(fit((2,), one), 0)),
              "sparse_equals_dense": lambda: rel_err(fit(seeds, one), fit(seeds, one, "dense")),
              "all_pairs_equals_numpy": all_pairs_error}
    if jax.device_count() > 1:
        mesh = sharding.make_mesh(len(seeds), CHECK[2].batch_size)
        checks["sharded_equals_one_device"] = lambda: rel_err(fit(seeds, mesh), fit(seeds, one))
    out = {name: verdict(name, fn) for name, fn in checks.items()}
    if jax.device_count() > 1:
        out["sharded_equals_one_device"]["mesh"] = sharding.describe_mesh(mesh)
    else:
        out["sharded_equals_one_device"] = {"ok": None, "skipped": "one device: nothing to shard over"}
    return out


# ----------------------------------------------------------------------------- timing
def ensemble(shape, n_seeds: int, kernel: str, steps: int):
    """Dispatch ``steps`` training steps of ``n_seeds`` SAEs through the trainer's chunk program
    (data already on the device, the state donated and carried along); returns the new state."""
    d, n, k = shape
    cfg = SAEConfig(d_in=d, d_sae=n, k=k, kernel=kernel)
    tc = TrainConfig(batch_size=bt.BATCH, steps=steps, log_every=steps, chunk_steps=steps)
    program = train_mod.chunk_program(cfg, train_mod.program_key(tc), True)
    keys = jnp.stack([jax.random.fold_in(jax.random.PRNGKey(0), s) for s in range(n_seeds)])
    state = jax.jit(jax.vmap(partial(train_mod.init_state, cfg, tc), in_axes=(0, None)))(keys, jnp.zeros(d))
    hp = {name: jnp.full(n_seeds, v, jnp.float32) for name, v in train_mod.sweep_grid(cfg, tc, None)[0].items()}
    args = (jnp.asarray(bt.data(d, steps)), jnp.ones(steps, bool), hp, jnp.float32(1.0), jnp.int32(10**6))
    box = [state]

    def dispatch():
        box[0], _ = program(box[0], *args)
        return box[0]

    return dispatch


def interleaved(variants: dict, rounds: int) -> dict:
    """Warm-up (bench_train.warm), then ``rounds`` rounds timing every variant once (bench_train.timed)."""
    for v in variants.values():
        bt.warm(v)
    raw = {k: [] for k in variants}
    for _ in range(rounds):
        for k, v in variants.items():
            raw[k].append(bt.timed(v))
    return {"seconds": {k: float(np.median(t)) for k, t in raw.items()}, "raw_s": raw, "rounds": rounds}


def ensemble_vs_loop(p) -> dict:
    shape, s, steps = p["small"], p["s_small"], p["steps"]
    ens, one = ensemble(shape, s, "sparse", steps), ensemble(shape, 1, "sparse", steps)
    med = interleaved({"ensemble": (lambda: block(ens()), steps),
                       "looped": (lambda: block([one() for _ in range(s)][-1]), steps)}, p["rounds"])
    return {"shape": shape, "S": s, "steps_per_call": steps, **med, "speedup": med["seconds"]["looped"] / med["seconds"]["ensemble"]}


def matmul_peak(p) -> dict:
    n, f = p["matmul"], jax.jit(jnp.matmul)
    ab = {dt: [jax.random.normal(jax.random.PRNGKey(i), (n, n), dt) for i in (1, 2)] for dt in ("float32", "bfloat16")}
    med = interleaved({dt: (partial(lambda a, b: block(f(a, b)), *m), 1) for dt, m in ab.items()}, p["rounds"])
    return {"n": n, **med, "flops": {dt: 2 * n**3 / t for dt, t in med["seconds"].items()},
            "float32_precision": str(jax.config.jax_default_matmul_precision or "default")}


def large_step(p, peak: dict) -> dict:
    shape, s, steps = p["large"], p["s_large"], p["steps"]
    ens = ensemble(shape, s, "sparse", steps)
    med = interleaved({"step": (lambda: block(ens()), steps), "limit_full": bt.limit(shape, s),
                       "limit_chunked": bt.limit(shape, s, 512)}, p["rounds"])
    t = med["seconds"]
    limit = min(t["limit_full"], t["limit_chunked"])
    flops = 2 * bt.BATCH * shape[0] * shape[1] * s  # the encoder forward: the dense work of a TopK step
    return {"shape": shape, "S": s, "steps_per_call": steps, **med, "limit_s": limit, "limit_over_step": limit / t["step"],
            "step_encoder_flops": flops / t["step"], "step_fraction_of_peak": {dt: flops / t["step"] / f for dt, f in peak.items()}}


def kernels_section(p) -> dict:
    """Dense against sparse at the large shape, at the largest S (halving) whose dense ensemble fits one device."""
    shape, s, steps = p["large"], p["s_large"], p["steps"]
    dense_cfg = SAEConfig(d_in=shape[0], d_sae=shape[1], k=shape[2], kernel="dense")
    per_device = train_mod.memory_budget()[0] // len(jax.local_devices())
    while s > 1 and s * train_mod.member_bytes(dense_cfg, TrainConfig(batch_size=bt.BATCH, steps=1)) > per_device:
        s //= 2
    runs = {k: ensemble(shape, s, k, steps) for k in ("sparse", "dense")}
    med = interleaved({k: (lambda r=r: block(r()), steps) for k, r in runs.items()}, p["rounds"])
    t = med["seconds"]
    return {"shape": shape, "S": s, "steps_per_call": steps, **med, "winner": min(t, key=t.get),
            "dense_over_sparse": t["dense"] / t["sparse"]}


def all_pairs_section(p) -> dict:
    s, n = p["pairs"]
    dicts = jax.random.normal(jax.random.PRNGKey(2), (s, n, bs.D_IN), jnp.float32)
    pairs = np.stack(np.triu_indices(s, 1), axis=1).astype(np.int32)
    kernel = bs.compiled_all_pairs(dicts, pairs)
    gemm = jax.jit(lambda a, b: jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=jax.lax.Precision.HIGHEST))
    a, b = dicts[0], dicts[1]
    med = interleaved({"kernel": (lambda: block(kernel()), 1), "gemm_one_pair": (lambda: block(gemm(a, b)), 1)}, p["rounds"])
    gemm_all = med["seconds"]["gemm_one_pair"] * len(pairs)
    return {"seeds": s, "d_sae": n, "d_in": bs.D_IN, "pairs": len(pairs), "top_k": bs.TOP_K, **med,
            "gemm_all_pairs_s": gemm_all, "kernel_over_gemm": med["seconds"]["kernel"] / gemm_all}


def matching_section(p) -> dict:
    """Sparse matching (kernel + candidate graph + certificate) on trained-like (planted) pairs at
    each width and on independent (random) dictionaries at the smaller one."""
    cases = [("planted", n) for n in p["match"]] + [("random", p["match"][0])]
    last = {}
    med = interleaved({f"{k} {n}": (partial(match_into, last, f"{k} {n}", *bs.instance(k, n, n)), 1) for k, n in cases},
                      p["rounds"])
    rows = [{"instance": kind, "n": n, "seconds": med["seconds"][f"{kind} {n}"], "raw_s": med["raw_s"][f"{kind} {n}"],
             "optimal": last[f"{kind} {n}"].optimal, "gap_bound": last[f"{kind} {n}"].gap_bound} for kind, n in cases]
    return {"d_in": bs.D_IN, "rounds": p["rounds"], "rows": rows}


def match_into(last: dict, key: str, a, b) -> None:
    last[key] = match(a, b, method="sparse")


def one_extraction(spec) -> dict:
    with tempfile.TemporaryDirectory() as tmp:  # fresh activations; the converted model is shared
        (Path(tmp) / "models").symlink_to(cache_root() / "models")
        t = time.perf_counter()
        manifest = next(iter(extract(spec, cache_dir=tmp, progress=False).values())).manifest
        return {"loop_s": manifest["seconds"], "wall_s": time.perf_counter() - t, "device": manifest["device"]}


def extraction(p, quick: bool) -> dict:
    """Tokens/s of ``extract`` on SmolLM2-135M (last block's resid_post): the median loop time of
    fresh extractions into empty caches, after ``extract_runs[0]`` untimed ones."""
    try:
        gguf = packaged_model("smollm2")
    except ConfigError as e:
        return {"skipped": str(e)}
    ref = locate(gguf)
    if ref.path is None and quick:
        return {"skipped": "quick: the SmolLM2 GGUF conversion is not cached (a full run converts it once)"}
    t = time.perf_counter()
    resolve_model(gguf)  # converts the GGUF once into the saejax cache
    setup_s = time.perf_counter() - t
    layer = ref.info.n_layers - 1
    spec = ExtractSpec(model=gguf, dataset=PythonDocs(), layers=(layer,), ctx_len=128, n_tokens=p["tokens"], batch_size=16)
    warm, timed = p["extract_runs"]
    runs = [one_extraction(spec) for _ in range(warm + timed)][warm:]
    loop = float(np.median([r["loop_s"] for r in runs]))
    return {"model": ref.info.name, "layer": layer, "site": "resid_post", "tokens": p["tokens"], "warm_up_runs": warm, "loop_s": loop,
            "tokens_per_s": p["tokens"] / loop, "torch_device": runs[0]["device"], "setup_s": setup_s, "runs": runs}


# ----------------------------------------------------------------------------- report
def mark(ok: bool, quick: bool) -> str:
    return "n/a at --quick shapes" if quick else ("met" if ok else "NOT met")


def table(r: dict) -> str:
    lines = ["| measurement | figure | compared with | ratio | GPU target |", "|---|---|---|---|---|"]
    q = r["quick"]
    for name, c in r["correctness"].items():
        state = "skipped" if c["ok"] is None else "ok" if c["ok"] else "FAILED"
        detail = c.get("skipped") or f"error {c['rel_err']:.1e}"
        lines.append(f"| check: {name} | {state} | {detail} | | <= {TOL:g} |")
    if (e := r.get("ensemble_vs_loop")):
        ok = e["speedup"] >= TARGETS["ensemble_speedup"]
        lines.append(f"| ensemble, {tuple(e['shape'])}, S = {e['S']} | {e['seconds']['ensemble']:.3g} s/step | looped one-seed "
                     f"program {e['seconds']['looped']:.3g} s | {e['speedup']:.1f}x | >= 10x: {mark(ok, q)} |")
    if (m := r.get("matmul_peak")):
        lines.append(f"| matmul peak, {m['n']}^2 | float32 ({m['float32_precision']}) {m['flops']['float32'] / 1e12:.3g} TFLOP/s | "
                     f"bfloat16 {m['flops']['bfloat16'] / 1e12:.3g} TFLOP/s | | |")
    if (g := r.get("large_step")):
        frac = " / ".join(f"{v:.0%} of {k}" for k, v in g["step_fraction_of_peak"].items())
        lines.append(f"| step, {tuple(g['shape'])}, S = {g['S']} | {g['seconds']['step']:.3g} s/step | encoder-forward limit "
                     f"{g['limit_s']:.3g} s; step's encoder FLOP rate: {frac} peak | {g['limit_over_step']:.0%} of the limit | "
                     f">= 50%: {mark(g['limit_over_step'] >= TARGETS['limit_over_step'], q)} |")
    if (k := r.get("kernels")):
        lines.append(f"| kernels, {tuple(k['shape'])}, S = {k['S']} | sparse {k['seconds']['sparse']:.3g} s/step | dense "
                     f"{k['seconds']['dense']:.3g} s/step | dense/sparse {k['dense_over_sparse']:.2f}x: {k['winner']} wins | |")
    if (a := r.get("all_pairs")):
        lines.append(f"| all_pairs, {a['seeds']} seeds x {a['d_sae']} | {a['seconds']['kernel']:.3g} s | bare GEMM x {a['pairs']} "
                     f"pairs {a['gemm_all_pairs_s']:.3g} s | {a['kernel_over_gemm']:.2f}x the GEMM | |")
    for row in (r.get("matching") or {}).get("rows", []):
        tgt = f"< 2 s: {mark(row['seconds'] < TARGETS['match_s'], q)}" if row is r["matching"]["rows"][0] else ""
        lines.append(f"| match (sparse), {row['instance']}, n = {row['n']} | {row['seconds']:.3g} s | proven optimal: "
                     f"{row['optimal']} | | {tgt} |")
    if (x := r.get("extraction")):
        fig = x.get("skipped") or f"{x['tokens_per_s']:,.0f} tokens/s ({x['tokens']} tokens, torch on {x['torch_device']})"
        lines.append(f"| extraction, SmolLM2-135M GGUF | {fig} | | | |")
    lines += [f"| section failed: {name} | {err.splitlines()[0][:120]} | | | |" for name, err in r["errors"].items()]
    return "\n".join(lines)


def run_sections(p: dict, quick: bool) -> tuple[dict, dict]:
    res, errors = {}, {}
    sections = {"ensemble_vs_loop": lambda: ensemble_vs_loop(p), "matmul_peak": lambda: matmul_peak(p),
                "large_step": lambda: large_step(p, res["matmul_peak"]["flops"]), "kernels": lambda: kernels_section(p),
                "all_pairs": lambda: all_pairs_section(p), "matching": lambda: matching_section(p),
                "extraction": lambda: extraction(p, quick)}
    for name, fn in sections.items():
        t = time.perf_counter()
        try:
            res[name] = fn() | {"wall_s": time.perf_counter() - t}
        except Exception as e:  # record it, keep measuring: the device may be lent only once
            traceback.print_exc()
            errors[name] = f"{type(e).__name__}: {e}"
        print(f"  {name}: {time.perf_counter() - t:.1f} s{' (FAILED)' if name in errors else ''}", flush=True)
    return res, errors


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CI on CPU, under 2 minutes)")
    ap.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/accelerator_<backend>[_quick].json)")
    ap.add_argument("--append-readme", action="store_true", help="append the table to benchmarks/README.md")
    a = ap.parse_args(argv)
    if a.quick and a.append_readme:
        ap.error("--append-readme records real shapes only; drop --quick")
    backend, dev = jax.default_backend(), jax.devices()[0]
    out = a.out or HERE / "results" / f"accelerator_{backend}{'_quick' if a.quick else ''}.json"
    t0, load0 = time.perf_counter(), os.getloadavg()
    info = bt.machine() | {"backend": backend, "device_kind": dev.device_kind}
    info["versions"]["scipy"] = scipy.__version__
    print(f"{dev.device_kind} ({backend}, {jax.device_count()} devices), jax {jax.__version__}, commit {info['commit']}, "
          f"load average {load0[0]:.1f}", flush=True)
    checks = correctness()
    print(f"  correctness: {time.perf_counter() - t0:.1f} s", flush=True)
    res, errors = run_sections(QUICK if a.quick else FULL, a.quick)
    info["versions"]["transformers"] = getattr(sys.modules.get("transformers"), "__version__", None)  # if extraction ran
    r = {"suite": "accelerator", "quick": a.quick, "machine": info, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
         "correctness": checks, **res, "errors": errors, "load_average_start": load0, "load_average_end": os.getloadavg()}
    if "kernels" in res:
        r["kernel_default"] = {backend: res["kernels"]["winner"]}
    r["wall_s"] = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=1))
    text = table(r)
    print("\n" + text + f"\n\nload average {load0[0]:.1f} -> {r['load_average_end'][0]:.1f}; {r['wall_s']:.0f} s; wrote {out}")
    if a.append_readme:
        head = (f"\n### {dev.device_kind} ({backend}, {jax.device_count()} device(s)), {r['date'][:10]}, commit {info['commit']}\n\n"
                f"jax {jax.__version__}; load average {load0[0]:.1f} -> {r['load_average_end'][0]:.1f}; {r['wall_s']:.0f} s.\n\n")
        with open(HERE / "README.md", "a") as f:
            f.write(head + text + "\n")
    failed = [n for n, c in checks.items() if c["ok"] is False] + list(errors)
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
