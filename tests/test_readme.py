"""The README as a newcomer reads it: every command it shows parses, every file it names exists,
and its fenced install/test commands are the ones CI runs."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_every_path_the_readme_names_exists():
    named = set(re.findall(r"(?<![\w/.])((?:experiments|benchmarks|docs|saejax|tests)/[\w./-]+\.(?:py|md|ipynb|png))", README))
    assert len(named) >= 5
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, missing


@pytest.mark.parametrize("module", sorted(set(re.findall(r"python -m (saejax\.\w+)", README)) | {"saejax.cli"}))
def test_every_entry_point_the_readme_names_has_help(module):
    r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and "usage:" in r.stdout, (module, r.stdout[-500:], r.stderr[-1000:])


def test_console_script_dispatches_like_the_modules(tmp_path, capsys):
    from saejax.cli import main

    assert main(["run", str(ROOT / "experiments" / "smoke.py"), "--dry-run", "--out", str(tmp_path)]) == 0
    assert "topk-w24-k2" in capsys.readouterr().out
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    assert main(["show", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "summary.json" in err


def test_readme_commands_are_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    assert any("python -m saejax.run experiments/grid.py" in b for b in blocks)
    assert any(b.strip() == "python -m pytest" for b in blocks) and "python -m pytest" in ci
    assert 'pip install -e ".[hf,test]"' in blocks[0] and 'pip install -q -e ".[hf,test]"' in ci
    assert "download.pytorch.org/whl/cpu" in blocks[0]  # a CPU-only machine never pulls CUDA wheels
    assert len(README.split("## More")[0].splitlines()) < 120
