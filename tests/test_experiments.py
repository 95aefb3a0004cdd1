"""Every experiment file plans offline on an empty cache: exit 0, or exit 2 with one line naming
what is missing; nothing is downloaded, extracted or trained."""

from pathlib import Path

import pytest

from saejax.corpus import PythonDocs
from saejax.run import main

ROOT = Path(__file__).parent.parent
EXPERIMENTS = sorted(p.name for p in (ROOT / "experiments").glob("*.py"))
HUB = {"gpt2_seed_stability.py", "llama_pilot.py", "gemma_scope.py"}  # need a model from the hub


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_dry_run_offline(name, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "cache"
    rc = main([str(ROOT / "experiments" / name), "--dry-run", "--cache-dir", str(cache), "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    if name in HUB:
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and "huggingface-cli download" in lines[0], err
    else:
        assert rc == 0, err
        assert "[to train]" in out
    made = [p for p in cache.rglob("*") if p.is_file() and p.name != "file-hashes.json"] if cache.exists() else []
    assert not made, made  # nothing extracted, converted or trained
    assert not (tmp_path / "out").exists()


def test_python_docs_corpus_is_deterministic():
    a, b = PythonDocs(), PythonDocs()
    assert a.fingerprint() == b.fingerprint()
    docs = list(a.texts())
    assert len(docs) > 1000 and sum(map(len, docs)) > 500_000
