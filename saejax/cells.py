"""The cell pipeline: train one unit of a plan (or resume it), then run the experiment's
analyses on each of its cells and return one summary record per cell.

Analyses come from :data:`ANALYSES` (a registry: name -> :class:`Analysis`); ``stability`` always
runs, the others (``splice``, ``probe``) ask the source spec, which says at plan time whether it
supports them (:func:`check_analyses`). Files go through :class:`saejax.store.RunStore`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from saejax import sae, sharding, stability
from saejax.checkpoint import Checkpointer
from saejax.data import Source
from saejax.errors import ConfigError, stop_if_requested
from saejax.experiment import Cell, Experiment, Unit
from saejax.plan import cell_config, unit_key
from saejax.progress import bar as progress_bar
from saejax.stability.kernel import pair_mesh
from saejax.stability.metrics import pwmcc_from_stats
from saejax.store import RunStore
from saejax.train import TrainResult, evaluate, train


@dataclass(frozen=True)
class CellContext:
    """Everything an analysis of one cell may read."""

    exp: Experiment
    unit: Unit
    cell: Cell
    seeds: tuple[int, ...]  # the cell's seeds that trained without failing
    view: TrainResult  # those seeds (leading axis = seeds), at the cell's step
    ev: dict  # :func:`saejax.train.evaluate` on the held-out rows, with latents
    heldout: np.ndarray
    source: Source  # the built source
    rand: dict  # random control: decoders, encoders
    store: RunStore
    cache_dir: object = None


@dataclass(frozen=True)
class Analysis:
    name: str
    run: Callable[[CellContext], dict]
    """``ctx -> record columns``; may write files through ``ctx.store``."""
    needs_source: bool = False
    """Asks the source spec (``supports(name)`` / ``downstream(...)``), e.g. a model to splice into."""


def _stability(ctx: CellContext) -> dict:
    dec, enc = ctx.view.decoders(), ctx.view.encoders()
    seeds = list(ctx.seeds)
    report = stability.stability_report(dec, enc, alive=ctx.ev["alive"], latents=ctx.ev["latents"],
                                        true_dictionary=ctx.source.true_dictionary, seeds=seeds,
                                        random_control=ctx.rand["decoders"], mesh=pair_mesh())
    ctx.store.write_cell(ctx.cell.id, "report", report.to_dict())
    ctx.store.write_cell(ctx.cell.id, "matched", {  # first seed pair, trained and random, for the histogram
        "seeds": seeds[:2], "trained": report.matched[0],  # the report's own matching of seeds 0 and 1
        "random": stability.match(ctx.rand["decoders"][0], ctx.rand["decoders"][1]).abs_cos})
    return report.summary


def _consensus(ctx: CellContext) -> dict:
    """Which features recur: :func:`saejax.stability.consensus` over the cell's seeds, against the
    random control; columns ``consensus_<metric>_<tau>`` and ``consensus_random_<metric>_<tau>``."""
    from saejax.stability.consensus import consensus

    n = len(ctx.seeds)
    rep = consensus(ctx.view.decoders(), ctx.view.encoders(), random_control=ctx.rand["decoders"][:max(n, 2)])
    ctx.store.write_cell(ctx.cell.id, "consensus", rep.to_dict())
    keep = ("frac_all_", "groups_", "found_in_mean_", "orphan_frac_", "inconsistent_frac_")
    out = {}
    for key, value in rep.summary.items():
        rand = key.startswith("random_")
        base = key.removeprefix("random_").removeprefix("consensus_")
        if base.startswith(keep) and not (key.startswith(("groups_", "random_groups_"))):
            out[f"consensus_{'random_' if rand else ''}{base}"] = value
    return out


def _downstream(name: str) -> Callable[[CellContext], dict]:
    def run(ctx: CellContext) -> dict:
        raw = ctx.view.raw_params()
        cols, full = ctx.exp.source.downstream(ctx.unit.sae, raw, ctx.view.threshold, list(ctx.seeds),
                                               analyses=(name,), cache_dir=ctx.cache_dir)
        ctx.store.write_cell(ctx.cell.id, name, full)
        return cols

    return run


ANALYSES: dict[str, Analysis] = {
    "stability": Analysis("stability", _stability),
    "consensus": Analysis("consensus", _consensus),
    "splice": Analysis("splice", _downstream("splice"), needs_source=True),
    "probe": Analysis("probe", _downstream("probe"), needs_source=True),
}


def check_analyses(exp: Experiment, cache_dir=None) -> None:
    """Every requested analysis is supported by the source, or one :class:`ConfigError` says why."""
    for name in exp.analyses:
        if not ANALYSES[name].needs_source:
            continue
        supports = getattr(exp.source, "supports", None)
        why = supports(name, cache_dir) if supports else f"{type(exp.source).__name__} sources have no model to run it on"
        if why:
            raise ConfigError(f"analysis {name!r} is not available for source {exp.source.describe()}: {why}")


# ----------------------------------------------------------------------------- one unit
def random_control(cfg, seeds, d_in: int, root_seed: int) -> dict:
    """Untrained, randomly initialised SAEs of the same shape (the empirical chance level)."""
    keys = jnp.stack([jax.random.fold_in(jax.random.PRNGKey(root_seed + 1_000_003), s) for s in seeds])
    params = jax.vmap(lambda k: sae.init(cfg, k, jnp.zeros(d_in, jnp.float32)))(keys)
    return {"decoders": np.asarray(params["W_dec"]), "encoders": np.asarray(params["W_enc"]).transpose(0, 2, 1),
            "params": jax.tree.map(np.asarray, params)}


def untrained_metrics(view: TrainResult, rand: dict, heldout: np.ndarray) -> dict:
    """Held-out MSE and explained variance of the untrained control SAEs (decoder bias at the
    held-out mean, the trained seeds' inference thresholds), next to the trained ones: study 000's
    "trained SAEs reconstruct 4-8x better than untrained"."""
    n = len(view.seeds)
    params = {k: v[:n] for k, v in rand["params"].items()}
    params["b_dec"] = np.broadcast_to(heldout.mean(0) * view.scale, params["b_dec"].shape).astype(np.float32)
    ev = evaluate(dataclasses.replace(view, params=params), heldout)
    return {"random_mse": float(np.mean(ev["mse"])), "random_explained_variance": float(np.mean(ev["ev"]))}


def run_unit(exp: Experiment, unit: Unit, source, store: RunStore, *, progress: bool = True, log=print,
             cache_dir=None, on_trained=None) -> list[dict]:
    """Train ``unit`` (or resume it) and return one summary record per cell; ``on_trained(result)``
    is called once training is done (the runner's clock reads the steady training time)."""
    udir = store.unit_dir(unit.id, unit_key(exp, unit))
    done = store.done(udir)
    if sharding.agree(done is not None) != (done is not None):  # several processes: process 0 decides
        if done is None:  # only this process's own copy lacks the unit; process 0 has its results
            return []
        done = None  # process 0 trains it again, and every process takes part
    if done is not None:
        return done
    lengths_steps = {c.step for c in unit.cells}
    ckpt = Checkpointer(udir / "ckpt", exp.checkpoint_every)
    result = train(unit.sae, unit.train, source, exp.seeds, sweep=unit.sweep, progress=progress,
                   stops=unit.stops, checkpoint=ckpt,
                   on_stop=lambda g, step, st: store.save_snapshot(udir, g, step, st, step in lengths_steps))
    ckpt.close()
    if on_trained is not None:
        on_trained(result)
    heldout = np.asarray(source.heldout()[: exp.heldout_tokens], np.float32)
    rand = random_control(unit.sae, exp.seeds, unit.sae.d_in, unit.train.root_seed)
    eff_rank = stability.effective_rank(heldout[:4096])
    records = []
    busy = progress_bar(len(unit.cells), f"analyse {unit.id}", unit="cell", enabled=progress)
    for cell in unit.cells:
        busy.set_postfix(cell=cell.id)
        view = _cell_view(result, store, udir, unit, cell, len(exp.seeds))
        keep = [i for i in range(len(exp.seeds)) if view.failed.get(i, cell.step) >= cell.step]
        failed = [exp.seeds[i] for i in range(len(exp.seeds)) if i not in keep]
        if len(keep) < 2:
            records.append(_failed_record(exp, unit, cell, failed, store))
        else:
            view = _members(view, keep)
            ctx = CellContext(exp, unit, cell, view.seeds, view, evaluate(view, heldout, keep_latents=True), heldout,
                              source, rand, store, cache_dir)
            dyn = _dynamics(store, udir, unit, cell, len(exp.seeds), keep)
            records.append({**_record(ctx, eff_rank, dyn), "failed_seeds": failed,
                            "status": "ok" if not failed else f"{len(failed)} of {len(exp.seeds)} seeds failed"})
            store.write_cell(cell.id, "cell", records[-1])
        busy.update(1)
        stop_if_requested()
    busy.close()
    for r in records:  # after the bar is gone, so lines and bar never share a row
        log(headline(r))
    store.finish(udir, records)
    return records


def _cell_view(result: TrainResult, store: RunStore, udir, unit: Unit, cell: Cell, n: int) -> TrainResult:
    view = result.select(cell.point)
    if cell.step == unit.total:
        return view
    snap = store.load_snapshot(udir, cell.step)
    sl = slice(cell.point * n, (cell.point + 1) * n)
    return dataclasses.replace(view, params={k: v[sl] for k, v in snap["params"].items()}, threshold=snap["threshold"][sl])


def _members(view: TrainResult, keep: list[int]) -> TrainResult:
    """The seeds ``keep`` (indices) of a one-point view."""
    if len(keep) == len(view.seeds):
        return dataclasses.replace(view, failed={})
    idx = np.asarray(keep)
    return dataclasses.replace(
        view, seeds=tuple(view.seeds[i] for i in keep), params=jax.tree.map(lambda a: a[idx], view.params),
        threshold=view.threshold[idx], since_fired=view.since_fired[idx],
        history={k: v[idx] for k, v in view.history.items()}, failed={},
        resampled=None if view.resampled is None else view.resampled[idx])


def _failed_record(exp: Experiment, unit: Unit, cell: Cell, failed: list, store: RunStore) -> dict:
    """A cell with fewer than 2 healthy seeds: its configuration, the failure, and no metrics."""
    record = {**cell_config(exp, unit, cell), "n_seeds": len(exp.seeds) - len(failed), "failed_seeds": failed,
              "status": f"failed: {len(failed)} of {len(exp.seeds)} seeds diverged or hit non-finite values"}
    store.write_cell(cell.id, "cell", record)
    return record


def _dynamics(store: RunStore, udir, unit: Unit, cell: Cell, n: int, keep: list[int]) -> list[dict]:
    """Cross-seed PWMCC at each snapshot step up to the cell's (training dynamics), with the kernel."""
    rows = []
    idx = cell.point * n + np.asarray(keep)
    for step in unit.stops:
        if step > cell.step:
            break
        ap = stability.all_pairs(store.load_snapshot(udir, step)["params"]["W_dec"][idx], top_k=1)
        per_pair = [pwmcc_from_stats(jax.tree.map(lambda a, p=p: a[p], ap.stats))
                    for p in range(len(ap.pairs))]
        rows.append({"step": step, "pwmcc": float(np.mean(per_pair))})
    return rows


def _record(ctx: CellContext, eff_rank: dict, dynamics: list[dict]) -> dict:
    exp, unit, cell, view, ev = ctx.exp, ctx.unit, ctx.cell, ctx.view, ctx.ev
    at = int(np.searchsorted(view.log_steps, cell.step, side="right"))
    events = [i for i, s in enumerate(unit.train.resample_steps) if s <= cell.step]
    resampled = None if view.resampled is None else view.resampled[:, events]  # [seed, event] up to this cell
    ctx.store.write_cell(cell.id, "history", {
        "step": view.log_steps[:at], **{k: v[:, :at] for k, v in view.history.items()}, "dynamics": dynamics,
        "seeds": list(ctx.seeds), **({"resample_steps": [unit.train.resample_steps[i] for i in events],
                                      "resampled": resampled} if resampled is not None else {})})
    ctx.store.export_saes(cell.id, unit.sae, view.raw_params(), view.threshold, ctx.seeds,
                          {"cell": cell.id, "step": cell.step, "source": exp.source.describe()})
    record = {**cell_config(exp, unit, cell), "n_seeds": len(ctx.seeds)}
    if resampled is not None:
        record["resampled"] = float(np.mean(resampled.sum(axis=1)))
    for name in dict.fromkeys(("stability", *exp.analyses)):
        record.update(ANALYSES[name].run(ctx))
    last = at - 1
    record.update({
        "effective_rank_pr": eff_rank["participation_ratio"], "effective_rank_entropy": eff_rank["entropy_rank"],
        "explained_variance": float(np.mean(ev["ev"])), "mse": float(np.mean(ev["mse"])),
        "l0": float(np.mean(ev["l0"])), "dead_fraction": float(np.mean(ev["dead_frac"])),
        **untrained_metrics(view, ctx.rand, ctx.heldout),
        "train_fvu": float(np.mean(view.history["fvu"][:, last])) if last >= 0 else None})
    if dynamics:
        record["pwmcc_at_start"] = dynamics[0]["pwmcc"]
    return record


def headline(r: dict) -> str:
    if r.get("pwmcc") is None:
        return f"  {r['cell']:<28} {r['status']} (seeds {r['failed_seeds']})"
    return (f"  {r['cell']:<28} PWMCC {r['pwmcc']:.3f} [{r['pwmcc_ci_low']:.3f}, {r['pwmcc_ci_high']:.3f}]"
            f"  random {r['random_pwmcc']:.3f}  ratio {r['pwmcc_ratio']:.2f}x  Hungarian {r['hungarian_mean']:.3f}"
            f"  EV {r['explained_variance']:.3f}  L0 {r['l0']:.1f}  dead {r['dead_fraction']:.2f}")
