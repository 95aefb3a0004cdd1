"""``saejax``: the command-line entry point.

  saejax run EXPERIMENT.py [options]   train and analyse an experiment (= python -m saejax.run)
  saejax compare DIR_A DIR_B           stability between two sets of SAEs (= python -m saejax.compare)
  saejax show RUN_DIR                  a finished run's findings and table, read from its summary.json
  saejax explore RUN_DIR [--open]      the run's feature explorer (explorer.html): built if missing, path printed
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

USAGE = (__doc__ or "\n\n").split("\n\n")[1]


def show(argv) -> int:
    from saejax.findings import findings
    from saejax.summary import table

    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: saejax show RUN_DIR", file=sys.stderr)
        return 2
    path = Path(argv[0]) / "summary.json"
    try:
        records = json.loads(path.read_text())["cells"]
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {str(path)!r} is not a finished run's summary ({type(e).__name__}); "
              "expected the --out directory of a completed `saejax run`", file=sys.stderr)
        return 2
    print("\n".join(findings(records)))
    print()
    print(table(records))
    return 0


def explore(argv) -> int:
    """Print the path of ``RUN_DIR/explorer.html`` (rebuilt from the cell files when missing, or
    with ``--rebuild``); ``--open`` also opens it in the default browser."""
    flags = {a for a in argv if a.startswith("-")}
    dirs = [a for a in argv if not a.startswith("-")]
    if len(dirs) != 1 or flags - {"--open", "--rebuild"}:
        print("usage: saejax explore RUN_DIR [--open] [--rebuild]", file=sys.stderr)
        return 2
    out = Path(dirs[0])
    page = out / "explorer.html"
    if "--rebuild" in flags or not page.is_file():
        from saejax.errors import ConfigError
        from saejax.explorer import write_explorer

        path = out / "summary.json"
        try:
            summary = json.loads(path.read_text())
            records = summary["cells"]
        except (OSError, ValueError, KeyError) as e:
            print(f"error: {str(path)!r} is not a finished run's summary ({type(e).__name__}); "
                  "expected the --out directory of a completed `saejax run`", file=sys.stderr)
            return 2
        try:
            write_explorer(out, records, title=summary.get("experiment", ""), description=summary.get("source", ""))
        except (ConfigError, OSError) as e:
            print(f"error: cannot build {str(page)!r}: {e}".replace("\n", " "), file=sys.stderr)
            return 2
    print(page)
    if "--open" in flags:
        import webbrowser

        webbrowser.open(page.resolve().as_uri())
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: saejax COMMAND ...\n\n{USAGE}")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "run":
        from saejax.run import main as run_main

        return run_main(rest, prog="saejax run")
    if cmd == "compare":
        from saejax.compare import main as compare_main

        return compare_main(rest)
    if cmd == "show":
        return show(rest)
    if cmd == "explore":
        return explore(rest)
    print(f"error: unknown command {cmd!r}; expected one of run, compare, show, explore (saejax --help)", file=sys.stderr)
    return 2


def entry() -> None:
    """The console script: exits as ``python -m saejax.run`` does (an interrupted run skips teardown)."""
    from saejax.run import exit_with

    exit_with(main())


if __name__ == "__main__":
    entry()
