"""Progress as a user sees it: an experiment run in a pseudo-terminal, every screen update
timestamped.

    python benchmarks/bench_progress.py                         # the default grid, empty cache
    python benchmarks/bench_progress.py experiments/smoke.py    # 30 s check

Measures (1) the longest gap between two screen updates (a bar redraw or a line), over the whole
run and after the first 5 s; (2) every overall ETA the runner prints (``[i/n] unit (elapsed E,
ETA T)``): predicted end E + T against the real end, as a relative error. The run uses a fresh
output directory and, unless ``--cache-dir`` is given, a fresh cache (so the embedded model and
its activations are built as on a first run). Writes ``benchmarks/results/progress.json`` with
the machine and load average and prints a summary.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import pty
import re
import select
import struct
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def seconds(text: str) -> float:
    m = re.fullmatch(r"(?:(\d+)m)?(\d+)s", text)
    assert m, text
    return 60 * int(m.group(1) or 0) + int(m.group(2))


def run_in_terminal(args: list[str]) -> tuple[int, list[tuple[float, bytes]]]:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 150, 0, 0))
    env = {**os.environ, "TERM": "xterm"}
    t0 = time.perf_counter()
    p = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, env=env, start_new_session=True)
    os.close(slave)
    events = []
    while True:
        r, _, _ = select.select([master], [], [], 0.2)
        if r:
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            events.append((time.perf_counter() - t0, data))
        elif p.poll() is not None:
            break
    p.wait()
    os.close(master)
    events.append((time.perf_counter() - t0, b""))
    return p.returncode, events


def analyse(events) -> dict:
    times = [t for t, _ in events]
    gaps = [b - a for a, b in zip(times, times[1:])]
    late = [b - a for a, b in zip(times, times[1:]) if a > 5.0]
    end = times[-1]
    etas, text = [], ""
    for t, data in events:
        text += data.decode("utf-8", "replace")
        for m in re.finditer(r"\[(\d+)/(\d+)\] (\S+)\s+\(elapsed (\S+?), ETA (\d+m\d+s|\d+s)\)", text):
            etas.append({"unit": int(m.group(1)), "of": int(m.group(2)), "printed_at_s": round(t, 1),
                         "predicted_end_s": round(t + seconds(m.group(5)), 1)})
        text = text[-400:] if "\n" in text[-400:] else text  # keep a tail for lines split across reads
    seen, uniq = set(), []
    for e in etas:
        if e["unit"] not in seen:
            seen.add(e["unit"])
            e["error"] = round((e["predicted_end_s"] - end) / end, 3)
            uniq.append(e)
    at = int(np.argmax(gaps))
    before = b"".join(d for _, d in events[max(0, at - 3):at + 1]).decode("utf-8", "replace")
    where = [ln.strip() for ln in re.split(r"[\r\n]", before) if ln.strip()][-1:] or [""]
    return {"runtime_s": round(end, 1), "max_gap_s": round(max(gaps), 2), "max_gap_after_5s": round(max(late or [0]), 2),
            "max_gap_at_s": round(times[at], 1), "max_gap_after": where[0][-160:], "updates": len(events), "etas": uniq}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("experiment", nargs="?", default="experiments/grid.py")
    ap.add_argument("--cache-dir", help="reuse this cache (default: a fresh one)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "progress.json"))
    args = ap.parse_args(argv)
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache_dir or str(Path(tmp) / "cache")
        code, events = run_in_terminal([sys.executable, "-m", "saejax.run", args.experiment, "--out",
                                        str(Path(tmp) / "out"), "--cache-dir", cache])
        timing = Path(tmp) / "out" / "timing.json"  # the runner's own clock: stages and units
        timing = json.loads(timing.read_text()) if timing.is_file() else None
    res = {"experiment": args.experiment, "exit": code, **analyse(events), "machine": platform.processor() or platform.machine(),
           "cpus": os.cpu_count(), "load_before": [round(x, 2) for x in load0],
           "load_after": [round(x, 2) for x in os.getloadavg()], "date": time.strftime("%Y-%m-%d %H:%M"),
           "timing": timing}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"{args.experiment}: exit {code}, {res['runtime_s']} s, longest gap between screen updates "
          f"{res['max_gap_s']} s ({res['max_gap_after_5s']} s after the first 5 s) at t={res['max_gap_at_s']} s after "
          f"{res['max_gap_after']!r}, load {res['load_before']} -> {res['load_after']}")
    for e in res["etas"]:
        print(f"  ETA at unit {e['unit']}/{e['of']} (t={e['printed_at_s']} s): end {e['predicted_end_s']} s, error {100 * e['error']:+.0f}%")
    return code


if __name__ == "__main__":
    sys.exit(main())
