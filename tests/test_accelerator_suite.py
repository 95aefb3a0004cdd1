"""benchmarks/accelerator_suite.py --quick: every section runs with finite figures and every check is ok,
so the suite meant for a lent accelerator does not rot between lendings."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("correctness", "ensemble_vs_loop", "matmul_peak", "large_step", "kernels", "all_pairs", "matching", "extraction")


def numbers(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from numbers(v)
    elif isinstance(tree, list):
        for v in tree:
            yield from numbers(v)
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield tree


@pytest.mark.slow
def test_quick_suite_runs_every_section_and_every_check_passes(tmp_path):
    out = tmp_path / "x.json"
    # two CPU devices, so the sharded-training check runs instead of being skipped
    flags = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "accelerator_suite.py"), "--quick", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["errors"] == {} and r["quick"] is True
    assert {name: c["ok"] for name, c in r["correctness"].items()} == {
        "ensemble_equals_alone": True, "sparse_equals_dense": True, "all_pairs_equals_numpy": True,
        "sharded_equals_one_device": True}
    for name in SECTIONS:
        if name == "extraction" and "skipped" in r[name]:  # SmolLM2 not installed, or its conversion not cached
            continue
        values = list(numbers(r[name]))
        assert values and all(math.isfinite(v) for v in values), (name, r[name])
    assert r["kernel_default"] == {"cpu": r["kernels"]["winner"]} and r["kernels"]["winner"] in ("sparse", "dense")
    assert all(row["optimal"] for row in r["matching"]["rows"])
    assert all(math.isfinite(v) for v in r["load_average_start"] + r["load_average_end"])
    assert r["machine"]["device_kind"] and r["machine"]["commit"]
    assert "| check: sharded_equals_one_device | ok |" in proc.stdout
