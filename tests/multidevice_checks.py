"""Checks that need several devices; run as a script with 8 simulated CPU devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/multidevice_checks.py [names]

Prints one JSON object ``{check: result}``; ``tests/test_sharding.py`` runs it in a subprocess
(the device count is fixed when JAX starts, and the other test files use one device).
"""

import json
import sys

import jax
import numpy as np

from saejax import SAEConfig, SyntheticSource, TrainConfig, sharding
from saejax import train as train_mod
from saejax.data import SourcePlan

SRC = SyntheticSource(d=16, n_features=40, s=3, n_heldout=512)
ONE = sharding.make_mesh(devices=jax.devices()[:1])


def rel_err(a, b) -> float:
    return max(float(np.max(np.abs(x - y)) / (np.max(np.abs(y)) + 1e-12))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def spy():
    """Wrap the chunk program to record how its state and data arrive on the devices."""
    seen = {}
    real = train_mod.chunk_program

    def program(*a, **kw):
        fn = real(*a, **kw)

        def run(state, xs, *rest):
            w = state.params["W_dec"]
            seen.update(state_devices=len(w.sharding.device_set), state_shard=list(w.addressable_shards[0].data.shape),
                        state_shape=list(w.shape), data_shard=list(xs.addressable_shards[0].data.shape),
                        data_dtype=str(xs.dtype))
            return fn(state, xs, *rest)

        return run

    train_mod.chunk_program = program
    return seen, lambda: setattr(train_mod, "chunk_program", real)


def compare(seeds, arch="topk", resume=False, **tc_kw):
    """Train ``seeds`` on every device (default mesh) and on one device; relative difference.

    ``resume``: also restart the sharded run from its step-40 Orbax checkpoint (saved trimmed,
    restored padded) and compare with the uninterrupted run.
    """
    import tempfile

    from saejax.checkpoint import Checkpointer

    cfg = SAEConfig(d_in=16, d_sae=32, arch=arch, k=3, dead_tokens=2048)
    tc = TrainConfig(**{"batch_size": 64, "steps": 60, "lr": 3e-3, "log_every": 10, "chunk_steps": 40, **tc_kw})
    seen, undo = spy()
    extra = {}
    try:
        mesh = sharding.make_mesh(len(seeds), tc.batch_size, tc.mesh_shape)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = Checkpointer(tmp, 40) if resume else None
            many = train_mod.train(cfg, tc, SRC, seeds, progress=False, checkpoint=ckpt)
            if resume:
                ckpt = Checkpointer(tmp, 40)
                extra["resumed_from"] = ckpt._manager(0).latest_step()
                again = train_mod.train(cfg, tc, SRC, seeds, progress=False, checkpoint=ckpt)
                extra["resume_err"] = rel_err(again.params, many.params)
    finally:
        undo()
    one = train_mod.train(cfg, tc, SRC, seeds, progress=False, mesh=ONE)
    return {**extra, "mesh": sharding.describe_mesh(mesh), "mesh_shape": list(mesh.devices.shape),
            "params_shape": list(many.params["W_dec"].shape), "rel_err": rel_err(many.params, one.params),
            "hist_err": rel_err({k: many.history[k] for k in ("loss", "fvu", "l0")}, {k: one.history[k] for k in ("loss", "fvu", "l0")}), "finite": bool(all(np.isfinite(a).all() for a in jax.tree.leaves(many.params))),
            **seen}


def check_stability():
    from saejax.stability import kernel as K

    rng = np.random.default_rng(0)
    dicts = rng.standard_normal((5, 48, 16)).astype(np.float32)  # 10 pairs over 8 devices: uneven
    alive = rng.random((5, 48)) > 0.2
    out = {}
    for name, kw in {"plain": {}, "masked": {"alive": alive}, "chosen_pairs": {"pairs": [[0, 4], [3, 1], [2, 2]]}}.items():
        a = K.all_pairs(dicts, top_k=4, chunk=20, **kw)
        b = K.all_pairs(dicts, top_k=4, chunk=20, mesh=K.pair_mesh(), **kw)
        out[name] = {"pairs_equal": bool(np.array_equal(a.pairs, b.pairs)),
                     "max_abs": max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
                                    for x, y in zip(a.stats, b.stats))}
    out["report"] = _stability_report(dicts)
    return out


def _stability_report(dicts):
    """The full stability report with seed pairs sharded over the devices vs on one device."""
    from saejax import stability
    from saejax.stability import kernel as K

    rng = np.random.default_rng(1)
    enc = dicts + 0.3 * rng.standard_normal(dicts.shape).astype(np.float32)
    kw = dict(encoders=enc, alive=rng.random(dicts.shape[:2]) > 0.1, n_boot=200, n_perm=200, pair_block=3)
    one = stability.stability_report(dicts, **kw).to_dict()
    seen = []
    real = K._all_pairs_sharded

    def counting(*a, **k):  # prove the sharded kernel really ran
        seen.append(k["mesh"].size)
        return real(*a, **k)

    K._all_pairs_sharded = counting
    try:
        many = stability.stability_report(dicts, mesh=K.pair_mesh(), **kw).to_dict()
    finally:
        K._all_pairs_sharded = real
    return {"equal": json.dumps(one, sort_keys=True) == json.dumps(many, sort_keys=True),
            "sharded_calls": len(seen), "devices": sorted(set(seen)), "pwmcc": one["summary"]["pwmcc"]}


def check_notebook(path="experiments/colab_tpu.ipynb"):
    """Run the notebook's code cells (all but the one tagged ``tpu-install``) in quick mode."""
    import contextlib
    import io
    import os
    import tempfile

    import nbformat

    nb = nbformat.read(os.path.abspath(path), as_version=4)
    cells = [c for c in nb.cells if c.cell_type == "code" and "tpu-install" not in c.metadata.get("tags", [])]
    seen, undo = spy()
    printed = {}
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.update(SAEJAX_QUICK="1", SAEJAX_CACHE=tmp)
        os.chdir(tmp)
        try:
            ns = {"__name__": "__main__"}
            for c in cells:
                out = io.StringIO()
                with contextlib.redirect_stdout(out):
                    exec(compile(c.source, f"<notebook cell {c.get('id')}>", "exec"), ns)
                printed["runner" if "run.main(" in c.source else c.get("id")] = out.getvalue()
            from saejax import experiment  # the full (TPU) grid the notebook wrote is a valid experiment

            os.environ["SAEJAX_QUICK"] = "0"
            full = experiment.load(ns["EXPERIMENT"])
            units = [u.id for u in full.plan(SourcePlan(768, 10**6)).units]  # gpt2 width, without the hub
        finally:
            os.chdir(cwd)
            undo()
    return {"cells_run": len(cells), "skipped": len([c for c in nb.cells if c.cell_type == "code"]) - len(cells),
            "runner_mesh_lines": [ln for ln in printed.get("runner", "").splitlines() if "mesh:" in ln],
            "figures": len(ns.get("figures", [])), "full_grid": {"source": full.source.describe(), "units": units,
                                                               "seeds": len(full.seeds)}, **seen}


CHECKS = {
    "even": lambda: compare(list(range(8))),
    "uneven": lambda: compare([4, 9, 1, 7, 0, 2, 5, 11, 3, 6, 8, 10], resume=True, same_data_order=False),
    "members_x_batch": lambda: compare([0, 1, 2], arch="batchtopk"),
    "explicit_shape_bf16": lambda: compare(list(range(6)), mesh_shape=(4, -1), compute_dtype="bfloat16"),
    "stability": check_stability,
    "notebook": check_notebook,
}

if __name__ == "__main__":
    names = sys.argv[1:] or list(CHECKS)
    print(json.dumps({"devices": jax.device_count(), **{n: CHECKS[n]() for n in names}}))
