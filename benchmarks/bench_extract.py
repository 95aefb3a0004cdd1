"""Activation extraction benchmark: hooks + cache writing against a plain forward pass.

    python benchmarks/bench_extract.py                 # GPT-2-small-shaped random model + the modular model
    python benchmarks/bench_extract.py --quick         # fewer tokens, 1 repeat (about 1 min on 2 cores)
    python benchmarks/bench_extract.py --threads 1     # pin torch threads (recommended on a shared machine)

Models are built from configs with random weights (no hub access) and saved to a temporary
directory, so extraction goes through the public path: ``saejax.activations.extract`` with a
:class:`~saejax.activations.TokenIds` corpus (tokenization is not timed; it is the same for any
pipeline). For each model:

- ``plain forward, full model``: ``model(input_ids)`` over the same batches, nothing kept;
- ``plain forward, all blocks`` (the baseline every row is compared with): ``model.base_model``,
  i.e. every block and the final norm but no LM head;
- ``extract L<last> resid_post``: every block runs (the pass stops before the final norm and the LM
  head), the activations are copied to the host and written to checksummed shards, fsynced;
  **this is the overhead figure** (target: at most 20% slower than the baseline);
- ``extract L<mid> resid_post``: the study's middle layer; the pass stops after that block;
- ``extract 4 sites x 3 layers``: twelve points captured in the same single pass.

Throughput is tokens (stored rows) per second of the extraction loop, as recorded in the cache
manifest (writers opened to commit: forward, hooks, device-to-host copy, shard writing, checksums
and fsync); model loading and weight hashing are reported separately as ``setup_s``. Medians over
``--repeats`` runs into fresh cache directories; process CPU seconds are recorded too, since wall
time on a shared machine moves with other load. Writes ``benchmarks/results/extract.json`` with
machine, load average, versions and git commit, and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from saejax import activations as A  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def gpt2_small_shaped(n_layer: int = 12):
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024))


def modular():
    from saejax.models.modular import build_model, default_config

    return build_model(default_config("add"))


def plain_forward(model, ids: np.ndarray, batch: int) -> float:
    """Seconds for ``model(input_ids)`` over ``ids`` in batches, nothing kept."""
    import torch

    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(ids), batch):
            model(input_ids=torch.from_numpy(ids[i : i + batch]), use_cache=False)
    return time.perf_counter() - t0


def timed_extract(spec, rows: int) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        t0, c0 = time.perf_counter(), time.process_time()
        out = A.extract(spec, cache_dir=cache, progress=False)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        loop = next(iter(out.values())).manifest["seconds"]
        assert all(r.n_total == rows for r in out.values())
    return {"loop_s": loop, "wall_s": wall, "cpu_s": cpu}


def bench_model(name: str, model, ctx_len: int, n_ctx: int, batch: int, repeats: int, vocab: int, tmp: Path) -> list:
    model.eval()
    path = tmp / name
    model.save_pretrained(path)
    n = model.config.n_layer
    ids = np.random.default_rng(0).integers(0, vocab, (n_ctx, ctx_len))
    rows = ids.size
    plain_forward(model, ids[:batch], batch)  # warm-up
    layers = tuple(sorted({0, n // 2, n - 1}))
    cases = {f"extract L{l} resid_post": dict(layers=(l,), sites=("resid_post",)) for l in sorted({n - 1, n // 2}, reverse=True)}
    cases[f"extract {len(A.SITES)} sites x {len(layers)} layers"] = dict(layers=layers, sites=A.SITES)
    specs = {case: A.ExtractSpec(str(path), A.TokenIds(ids, name="bench"), n_tokens=None, drop_bos=False,
                                 batch_size=batch, **kw) for case, kw in cases.items()}
    runs: dict[str, list] = {"full": [], "body": [], **{c: [] for c in cases}}
    for _ in range(repeats):  # interleaved, so drifting load on a shared machine hits every case alike
        for key, m in (("full", model), ("body", model.base_model)):
            c0 = time.process_time()
            runs[key].append({"loop_s": plain_forward(m, ids, batch), "cpu_s": time.process_time() - c0})
        for case, spec in specs.items():
            runs[case].append(timed_extract(spec, rows))
    med = {k: {f: statistics.median(r[f] for r in v) for f in v[0]} for k, v in runs.items()}
    base = med["body"]["loop_s"]
    out = [{"model": name, "case": "plain forward, full model + LM head", "points": 0, **med["full"]},
           {"model": name, "case": "plain forward, all blocks, no LM head (baseline)", "points": 0, **med["body"]}]
    out += [{"model": name, "case": case, "points": len(specs[case].points), **med[case]} for case in cases]
    for r in out:
        r.update(tokens=rows, seconds=r["loop_s"], tokens_per_s=rows / r["loop_s"], overhead=r["loop_s"] / base - 1)
        if "wall_s" in r:
            r["setup_s"] = r.pop("wall_s") - r["loop_s"]
    return out


def machine() -> dict:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"description": f"{os.cpu_count()}-core {platform.machine()} CPU, " + (f"GPU {gpu}" if gpu else "no GPU"),
            "processor": platform.processor(), "cpu_count": os.cpu_count(), "gpu": gpu,
            "load_average": os.getloadavg(), "torch_threads": torch.get_num_threads()}


def versions() -> dict:
    import numpy
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": numpy.__version__}


def commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "saejax"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def table(results: list) -> str:
    lines = ["| model | case | tokens | tokens/s | time vs baseline | CPU s |", "|---|---|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['case']} | {r['tokens']} | {r['tokens_per_s']:,.0f} | "
                     f"{r['overhead']:+.1%} | {r['cpu_s']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer tokens and a single repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "extract.json"))
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    repeats = 1 if args.quick else args.repeats
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        results += bench_model("gpt2-small-shaped (random)", gpt2_small_shaped(), 128, 8 if args.quick else 32, 8,
                               repeats, 50257, Path(tmp))
        results += bench_model("modular (d128, 2 layers)", modular(), 3, 113 * 113, 4096, repeats, 116, Path(tmp))
    report = {"benchmark": "extract", "machine": machine(), "versions": versions(), "commit": commit(),
              "repeats": repeats, "results": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(report, indent=1))
    os.replace(tmp_out, out)
    print(f"{report['machine']['description']}, torch threads {report['machine']['torch_threads']}, "
          f"load average {report['machine']['load_average'][0]:.1f}")
    print(table(results))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
