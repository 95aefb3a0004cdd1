"""``python -m saejax.run EXPERIMENT.py [--out DIR] [--set key=value ...] [--dry-run] [--fresh]``

Trains every cell of an experiment grid (all seeds of a cell in one compiled program), measures
cross-seed stability, and writes ``summary.json``, ``summary.csv``, figures and ``report.md``.
A killed run resumes: finished units are skipped, an unfinished one restarts from its checkpoint.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from saejax.errors import ConfigError, check


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m saejax.run", description=__doc__.split("\n\n")[1])
    p.add_argument("experiment", help="experiment file with get_config(), e.g. experiments/grid.py")
    p.add_argument("--out", help="output directory (default: runs/<experiment name>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field: seeds=0,1,2  widths=64,128  train.lr=1e-3  source.task=mul")
    p.add_argument("--dry-run", action="store_true", help="print the plan and what is cached, train nothing")
    p.add_argument("--fresh", action="store_true", help="discard earlier results in the output directory")
    p.add_argument("--cache-dir", help="activation/model cache (default: $SAEJAX_CACHE or the user cache dir)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def writable_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"output directory {str(path)!r} is not writable ({e.strerror})") from None
    return path


def plan(exp, units, source, out: Path) -> None:
    from saejax.cells import unit_steps

    n_tok = getattr(source, "n_tokens", None)
    print(f"experiment {exp.name}: {exp.source.describe()}; d_in={units[0].sae.d_in}, "
          f"{len(exp.seeds)} seeds {list(exp.seeds)}, {n_tok if n_tok else 'endless'} training tokens")
    for u in units:
        steps = unit_steps(exp, u, n_tok)
        per_seed = 4 * 3 * (2 * u.sae.d_in * u.sae.d_sae + u.sae.d_sae + u.sae.d_in)  # params + Adam m, v
        members = len(exp.seeds) * len(u.coefs)
        done = (out / "units" / u.id / "done.json").exists()
        resumable = (out / "units" / u.id / "ckpt").exists()
        tokens = max(steps) * exp.train_config(u.lengths[0]).batch_size
        print(f"  {u.id:<24} {members:>3} SAEs x {max(steps):>6} steps ({tokens:,} tokens/seed)  "
              f"params+Adam {members * per_seed / 2**20:8.1f} MiB  cells: "
              f"{', '.join(u.cell_id(c, l) for c in u.coefs for l in u.lengths)}  "
              f"[{'done' if done else 'resumes from checkpoint' if resumable else 'to train'}]")


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return _main(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished cells and the last checkpoint are kept; run the same command to resume",
              file=sys.stderr)
        return 130


def _main(args) -> int:
    from saejax import experiment, report
    from saejax.cells import run_unit

    from saejax import sharding

    sharding.maybe_initialize_distributed()
    exp = experiment.apply_overrides(experiment.load(args.experiment), args.set)
    out = Path(args.out or Path("runs") / exp.name)
    if not sharding.is_main_process():  # every host computes the same; only process 0 writes the results
        import jax

        out = out / f".process{jax.process_index()}"
    if args.cache_dir:
        os.environ["SAEJAX_CACHE"] = str(Path(args.cache_dir).absolute())
    if args.fresh and out.exists() and not args.dry_run:
        for sub in ("units", "cells", "figures"):
            shutil.rmtree(out / sub, ignore_errors=True)
    if not args.dry_run:
        writable_dir(out)
        for tmp in out.rglob(".*.tmp"):  # left by a run killed mid-write; never read
            tmp.unlink(missing_ok=True)
    print(sharding.describe_mesh())
    t0 = time.perf_counter()
    source = exp.source.build()
    check(source.d_in > 0, "the activation source has no width")
    units = exp.units(source.d_in)
    plan(exp, units, source, out)
    if args.dry_run:
        return 0
    records = []
    for i, unit in enumerate(units, 1):
        tc = exp.train_config(max(unit.lengths))
        mesh = sharding.describe_mesh(n_members=len(exp.seeds) * len(unit.coefs), batch_size=tc.batch_size,
                                      shape=tc.mesh_shape)
        print(f"[{i}/{len(units)}] {unit.id}  ({mesh})")
        records += run_unit(exp, unit, source, out, progress=not args.no_progress)
    report.write_all(exp, records, out)
    print(report.table(records))
    print(f"\n{len(records)} cells in {time.perf_counter() - t0:.0f} s; results in {out}/ "
          f"(summary.json, summary.csv, report.md, figures/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
