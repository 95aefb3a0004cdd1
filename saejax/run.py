"""``python -m saejax.run EXPERIMENT.py [--out DIR] [--set key=value ...] [--dry-run] [--fresh]``

Trains every cell of an experiment grid (all seeds of a cell in one compiled program), measures
cross-seed stability, and writes ``summary.json``, ``summary.csv``, figures and ``report.md``.
A killed run resumes: finished units are skipped, an unfinished one restarts from its checkpoint.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import threading
import time
from pathlib import Path

from saejax.errors import STOP, ConfigError, check


def parse_args(argv, prog: str = "python -m saejax.run"):
    p = argparse.ArgumentParser(prog=prog, description=(__doc__ or "\n\n").split("\n\n")[1])
    p.add_argument("experiment", help="experiment file with get_config(), e.g. experiments/grid.py")
    p.add_argument("--out", help="output directory (default: runs/<experiment name>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field: seeds=0,1,2  widths=64,128  train.lr=1e-3  source.task=mul")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan and what is cached; reads configs only: downloads, extracts and trains nothing")
    p.add_argument("--fresh", action="store_true", help="discard earlier results in the output directory")
    p.add_argument("--cache-dir", help="activation/model cache (default: $SAEJAX_CACHE or the user cache dir)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--wait", action="store_true", help="wait for another run on the same --out to finish")
    p.add_argument("-v", "--verbose", action="store_true", help="show third-party load reports and warnings")
    return p.parse_args(argv)


def writable_dir(path: Path, what: str) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"  # one per process: several may check at once
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{what} {str(path)!r} is not writable ({e.strerror})") from None
    return path


def print_plan(plan, store) -> None:
    from saejax.plan import unit_key

    exp, src = plan.experiment, plan.source
    print(f"experiment {exp.name}: {exp.source.describe()}; d_in={src.d_in}, {len(exp.seeds)} seeds "
          f"{list(exp.seeds)}, {f'{src.n_tokens:,}' if src.n_tokens else 'endless'} training tokens")
    for line in src.lines:
        print(f"  source: {line}")
    for u in plan.units:
        tokens = u.total * u.train.batch_size
        status = store.status(store.unit_dir(u.id, unit_key(exp, u)))
        print(f"  {u.id:<24} {u.n_members:>3} SAEs x {u.total:>6} steps ({tokens:,} tokens/seed)  "
              f"~{u.n_members * u.member_bytes / 2**20:8.1f} MiB on device  cells: "
              f"{', '.join(c.id for c in u.cells)}  [{status}]")


def _terminate(signum, frame):
    STOP.set()  # checked between chunks and cells, in case the exception below is swallowed
    raise KeyboardInterrupt  # SIGTERM (a scheduler's preemption) stops like Ctrl-C: checkpoint kept


def main(argv=None, prog: str = "python -m saejax.run") -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv, prog)
    STOP.clear()
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {sig: signal.signal(sig, _terminate) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _main(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = e.filename or (args.out or "the output or cache directory")
        print(f"error: no space left on the device writing {where}; finished results are intact, "
              "free some space and run the same command to resume", file=sys.stderr)
        return 2
    except Exception as e:
        if not _lost_a_process(e):
            raise
        print(f"error: another process of this {_n_processes()}-process run stopped ({str(e).splitlines()[0][:200]}); "
              "finished cells and the last checkpoint are kept: start every process again to resume", file=sys.stderr)
        sys.stderr.flush()
        os._exit(1)  # no interpreter teardown: jax.distributed's shutdown would wait for the lost peer
    except KeyboardInterrupt:
        print("\ninterrupted: finished cells and the last checkpoint are kept; run the same command to resume",
              file=sys.stderr)
        return 130
    finally:  # an in-process caller (a notebook, a test) gets its own handlers back
        for sig, h in handlers.items():
            signal.signal(sig, h)


def _main(args) -> int:
    from saejax import experiment, sharding
    from saejax.cells import check_analyses
    from saejax.contrasts import check_plan
    from saejax.plan import cell_config
    from saejax.store import RunStore

    if not args.dry_run:  # joins a multi-process job before anything touches a device (the plan does)
        sharding.maybe_initialize_distributed()
    exp = experiment.apply_overrides(experiment.load(args.experiment), args.set)
    cache_dir = Path(args.cache_dir).absolute() if args.cache_dir else None
    plans = []  # (experiment of one source, its plan)
    for sub in exp.variants():
        check_analyses(sub, cache_dir)
        source_plan = sub.source.plan(cache_dir)
        where = f" (source {sub.variant})" if sub.variant else ""
        check(source_plan.missing is None, f"cannot plan {exp.name}{where}: {source_plan.missing}")
        plans.append((sub, sub.plan(source_plan)))
    if len(plans) > 1:  # contrasts may pair cells of different sources
        check_plan(exp.contrasts, [cell_config(sub, u, c) for sub, plan in plans for u in plan.units for c in u.cells])
    out = Path(args.out or Path("runs") / exp.name)
    store = RunStore(out)
    for _, plan in plans:
        print_plan(plan, store)
    if args.dry_run:
        return 0
    return _run(args, exp, plans, store, cache_dir)


def _run(args, exp, plans, store, cache_dir) -> int:
    from saejax import sharding
    from saejax.cache import cache_root, use_compile_cache

    if args.verbose:
        from saejax import hf_models

        hf_models.VERBOSE = True

    if not sharding.is_main_process():  # every host computes the same; only process 0 writes the results
        import jax

        store = type(store)(store.out / f".process{jax.process_index()}")
    writable_dir(cache_root(cache_dir), "cache directory")
    use_compile_cache(cache_dir)  # before the first compilation
    writable_dir(store.out, "output directory")
    with store.lock(wait=args.wait):
        if args.fresh:
            store.clear()
        store.remove_partial_writes()
        code = _train_all(args, exp, plans, store, cache_dir)
    sharding.sync("saejax run finished")  # no process exits while another still needs the coordinator
    return code


def _build(sub, plan, cache_dir, progress: bool):
    """The built source of one plan, checked against it, and the record columns it adds."""
    import numpy as np

    from saejax.data import check_finite

    print(f"building the source{f' {sub.variant}' if sub.variant else ''}: {sub.source.describe()}", flush=True)
    source = sub.source.build(cache_dir, progress=progress)
    check(source.d_in == plan.source.d_in, f"the source has d_in={source.d_in}, its plan said {plan.source.d_in}")
    check(source.n_tokens == plan.source.n_tokens,
          f"the source has {source.n_tokens} training tokens, its plan said {plan.source.n_tokens}")
    # held-out rows are first used after training: a NaN there is found now (a cache names itself and the row)
    check_finite(np.asarray(source.heldout()[: sub.heldout_tokens], np.float32), f"the held-out split of {sub.source.describe()}")
    columns = getattr(sub.source, "columns", None)
    return source, (columns(cache_dir) if columns else {})


def _train_all(args, exp, plans, store, cache_dir) -> int:
    from saejax import progress, sharding, summary
    from saejax.cells import run_unit
    from saejax.io import write_json
    from saejax.plan import unit_key
    from saejax.progress import RunClock, run_order

    units = [(v, unit) for v, (_, plan) in enumerate(plans) for unit in plan.units]
    order = run_order([unit for _, unit in units])
    clock = RunClock(tuple(units[i][1] for i in order))
    if len(plans) > 1:  # HF sources sharing a model: one extraction pass for all (others are left alone)
        from saejax.activations import extract_together

        extract_together([sub.source for sub, _ in plans], cache_dir=cache_dir, progress=not args.no_progress)
    built = []
    for sub, plan in plans:
        t = time.perf_counter()
        built.append(_build(sub, plan, cache_dir, not args.no_progress))
        clock.stage(f"source {sub.variant}" if sub.variant else "source", time.perf_counter() - t)
    by_unit, last_mesh = {}, None
    for i, u in enumerate(order, 1):  # architectures in turn; results in plan order
        v, unit = units[u]
        sub, (source, columns) = plans[v][0], built[v]
        mesh = sharding.describe_mesh(n_members=unit.n_members, batch_size=unit.train.batch_size,
                                      shape=unit.train.mesh_shape)
        print(clock.line(i, unit) + (f"  {mesh}" if mesh != last_mesh else ""), flush=True)
        last_mesh = mesh
        t = time.perf_counter()
        trained = store.status(store.unit_dir(unit.id, unit_key(sub, unit))) != "done"
        at = []  # (steady training seconds, seconds until training ended)
        records = run_unit(sub, unit, source, store, progress=not args.no_progress, cache_dir=cache_dir,
                           on_trained=lambda r, t=t: at.append((r.steady_seconds, time.perf_counter() - t)))
        by_unit[u] = [{**r, **columns} for r in records]
        clock.unit_done(unit, time.perf_counter() - t, trained, *(at[0] if at else (None, None)))
    t = time.perf_counter()
    records = [r for u in range(len(units)) for r in by_unit[u]]
    print(f"writing the report (elapsed {progress.fmt(time.perf_counter() - clock.t0)})", flush=True)
    busy = progress.bar(1 + len(records), "report: summary, contrasts, figures, then the explorer", unit="part",
                        enabled=not args.no_progress)
    summary.write_all(exp, records, store.out)
    busy.update(1)
    from saejax.explorer import write_explorer

    write_explorer(store.out, records, by_source={sub.variant: (sub.source, src) for (sub, _), (src, _) in zip(plans, built)},
                   heldout_tokens=exp.heldout_tokens, title=exp.name, description=exp.describe_source(),
                   on_cell=lambda: busy.update(1))
    busy.close()
    clock.stage("report", time.perf_counter() - t)
    print(summary.table(records))
    print(f"\n{len(records)} cells; results in {store.out}/ (summary.json, summary.csv, report.md, explorer.html, figures/)")
    print(clock.summary())
    write_json(store.out / "timing.json", clock.to_dict())
    return 0


def _n_processes() -> int:
    jax = sys.modules.get("jax")
    return jax.process_count() if jax is not None and jax.distributed.is_initialized() else 1


def _lost_a_process(e: BaseException) -> bool:
    """A collective or the coordination service failed because a peer process is gone."""
    return type(e).__name__ == "JaxRuntimeError" and _n_processes() > 1


def exit_with(code: int):
    """Exit with ``code``; an interrupted run (130) skips interpreter teardown, which can hang
    under live XLA/Orbax threads mid-computation (or a lost peer process)."""
    if code == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    exit_with(main())
