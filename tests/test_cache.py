"""The activation cache: exact round trips, reuse without the model, atomic writes, damage detection."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from saejax import cache as C
from saejax.data import ArraySource, Source
from saejax.errors import ConfigError

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_activations import save_tiny, write_corpus  # noqa: E402  (tests/ is on sys.path)

from saejax import activations as A  # noqa: E402


def write_entry(root: Path, arr: np.ndarray, shard_rows: int, name: str = "e") -> Path:
    with C.CacheWriter(root / name, {"test": name}, arr.shape[1], shard_rows=shard_rows) as w:
        for i in range(0, len(arr), 37):  # blocks that do not line up with shards
            w.append(arr[i : i + 37])
        return w.commit()


def test_round_trip_is_exact_and_batches_match_an_in_memory_source(tmp_path):
    arr = np.random.default_rng(0).standard_normal((1000, 6)).astype(np.float32)
    path = write_entry(tmp_path, arr, shard_rows=128)
    src = C.CachedActivations(path, n_heldout=100)
    assert isinstance(src, Source) and len(src.shards) == 8 and src.true_dictionary is None
    np.testing.assert_array_equal(src.read(), arr)
    np.testing.assert_array_equal(src.heldout(), arr[900:])
    ref = ArraySource(arr[:900], arr[900:])
    mine, theirs = src.batches(64, seed=3), ref.batches(64, seed=3)
    seen = []
    for _ in range(30):  # > 2 epochs, across epoch boundaries
        b = next(mine)
        np.testing.assert_array_equal(b, next(theirs))
        seen.append(b)
    first_epoch = np.concatenate(seen)[:900]
    held = {r.tobytes() for r in arr[900:]}
    assert not any(r.tobytes() in held for r in np.concatenate(seen))  # held-out rows are never trained on
    assert len({r.tobytes() for r in first_epoch}) == 900  # one epoch visits every training row once
    assert not np.array_equal(next(src.batches(64, seed=4)), next(src.batches(64, seed=3)))
    rows = np.array([0, 0, 2, 130, 131, 131, 999])  # sorted, with repeats (batches that straddle epochs)
    np.testing.assert_array_equal(src.take(rows), arr[rows])
    np.testing.assert_array_equal(src.take(rows[::-1]), arr[rows[::-1]])  # and in any order


@pytest.mark.parametrize("kind", ["array", "cache"])
def test_chunked_stream_equals_the_batch_iterator(tmp_path, kind):
    """The trainer's whole-chunk gathers (one ``take`` per chunk) give exactly the batches of
    ``batches()``, in order, across epoch boundaries; ``skip`` (resuming) equals consuming."""
    from saejax.data import Stream

    arr = np.random.default_rng(5).standard_normal((700, 6)).astype(np.float32)
    src = ArraySource(arr) if kind == "array" else C.CachedActivations(write_entry(tmp_path, arr, 128), n_heldout=50)
    it, stream = src.batches(64, seed=9), Stream(src, 64, seed=9)
    assert stream.order is not None  # the vectorised path
    for n in (3, 1, 17, 5):  # 26 steps: > 2 epochs of 650-700 rows
        out = np.empty((n, 64, 6), np.float32)
        stream.fill(out)
        np.testing.assert_array_equal(out, np.stack([next(it) for _ in range(n)]))
    for skip in (0, 4, 30):  # within the buffer, and whole epochs ahead
        ahead, ref = Stream(src, 64, seed=9), src.batches(64, seed=9)
        ahead.skip(skip)
        for _ in range(skip):
            next(ref)
        out = np.empty((2, 64, 6), np.float32)
        ahead.fill(out)
        np.testing.assert_array_equal(out, np.stack([next(ref), next(ref)]))


def test_float16_storage_and_memmap_reads(tmp_path):
    arr = np.random.default_rng(1).standard_normal((300, 4)).astype(np.float32)
    with C.CacheWriter(tmp_path / "h", {}, 4, dtype="float16", shard_rows=100) as w:
        w.append(arr)
        w.commit()
    src = C.CachedActivations(tmp_path / "h", heldout_frac=0.1)
    assert isinstance(src.shards[0], np.memmap) and src.n_heldout == 30
    np.testing.assert_array_equal(src.read(), arr.astype(np.float16).astype(np.float32))
    assert src.read().dtype == np.float32 and next(src.batches(8, seed=0)).dtype == np.float32


def test_truncated_or_corrupted_shard_is_detected(tmp_path):
    arr = np.arange(600, dtype=np.float32).reshape(200, 3)
    path = write_entry(tmp_path, arr, shard_rows=64)
    shard = path / "shard_00001.npy"
    data = shard.read_bytes()
    shard.write_bytes(data[:-12])
    with pytest.raises(ConfigError, match="shard_00001.npy is corrupted or truncated"):
        C.CachedActivations(path)
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF  # same size, different bytes: only the checksum can tell
    shard.write_bytes(bytes(flipped))
    with pytest.raises(ConfigError, match="shard_00001.npy is corrupted or truncated .*sha256"):
        C.CachedActivations(path)
    C.CachedActivations(path, verify="size")  # the cheap check alone passes
    shard.unlink()
    with pytest.raises(ConfigError, match="shard_00001.npy is missing"):
        C.CachedActivations(path)


def test_an_exception_midway_leaves_no_entry(tmp_path):
    with pytest.raises(RuntimeError):
        with C.CacheWriter(tmp_path / "x", {}, 3, shard_rows=10) as w:
            w.append(np.ones((25, 3), np.float32))
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="no complete activation cache"):
        C.CachedActivations(tmp_path / "x")


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("SAEJAX_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert C.cache_root() == tmp_path / "xdg" / "saejax"
    monkeypatch.setenv("SAEJAX_CACHE", str(tmp_path / "env"))
    assert C.cache_root() == tmp_path / "env"
    assert C.cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("SAEJAX_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert C.cache_root() == Path.home() / ".cache" / "saejax"


def test_fingerprint_key_ignores_key_order():
    assert C.fingerprint_key({"a": 1, "b": [1, 2]}) == C.fingerprint_key({"b": [1, 2], "a": 1})
    assert C.fingerprint_key({"a": 1}) != C.fingerprint_key({"a": 2})


def test_prefetch_keeps_order_and_puts_on_device(tmp_path):
    items = [np.full((2, 2), i, np.float32) for i in range(7)]
    assert [int(x[0, 0]) for x in C.prefetch(iter(items), 2)] == list(range(7))
    jax = pytest.importorskip("jax")
    got = list(C.prefetch(iter(items), 3, to_device=True))
    assert all(isinstance(x, jax.Array) for x in got) and float(got[-1][0, 0]) == 6

    def boom():
        yield items[0]
        raise ValueError("bad batch")

    with pytest.raises(ValueError, match="bad batch"):
        list(C.prefetch(boom()))


# ----------------------------------------------------------------------------- through extraction


@pytest.fixture()
def tiny(tmp_path):
    return save_tiny(tmp_path / "m"), write_corpus(tmp_path / "c.txt", n_docs=80), tmp_path / "cache"


def spec_for(model, corpus, **kw):
    return A.ExtractSpec(**{"model": model, "dataset": A.TextFiles(corpus), "layers": (1,),
                            "sites": ("resid_post",), "ctx_len": 8, "n_tokens": 200, **kw})


def count_loads(monkeypatch):
    loads = []
    real = A.load_model

    def counting(*a, **kw):
        loads.append(a)
        return real(*a, **kw)

    monkeypatch.setattr(A, "load_model", counting)
    return loads


def test_second_extraction_does_not_load_the_model(tiny, monkeypatch):
    model, corpus, root = tiny
    first = A.extract_one(spec_for(model, corpus), cache_dir=root, progress=False).read()

    def refuse(*a, **kw):
        raise AssertionError("the model was loaded although the cache holds this spec")

    monkeypatch.setattr(A, "load_model", refuse)
    again = A.extract_one(spec_for(model, corpus), cache_dir=root, progress=False)
    np.testing.assert_array_equal(again.read(), first)
    # a point extracted as part of a multi-point pass is found again on its own, and vice versa
    monkeypatch.undo()
    loads = count_loads(monkeypatch)
    both = A.extract(spec_for(model, corpus, sites=("resid_post", "mlp_out")), cache_dir=root, progress=False)
    assert len(loads) == 1  # mlp_out was missing: one load, one pass, resid_post reused
    np.testing.assert_array_equal(both[(1, "resid_post")].read(), first)


def test_changed_spec_gets_a_new_cache(tiny, monkeypatch, tmp_path):
    model, corpus, root = tiny
    loads = count_loads(monkeypatch)
    base = A.extract_one(spec_for(model, corpus), cache_dir=root, progress=False).path
    paths = {base}
    for change in (dict(n_tokens=150), dict(layers=(0,)), dict(sites=("attn_out",)), dict(ctx_len=12),
                   dict(drop_bos=False), dict(dtype="bfloat16"), dict(store_dtype="float16")):
        paths.add(A.extract_one(spec_for(model, corpus, **change), cache_dir=root, progress=False).path)
    assert len(paths) == 8 and len(loads) == 8
    Path(corpus).write_text(Path(corpus).read_text() + "\n\nw1 w2 w3 w4 w5 w6 w7 w8 w9\n")  # corpus edited
    paths.add(A.extract_one(spec_for(model, corpus), cache_dir=root, progress=False).path)
    save_tiny(Path(model), seed=1)  # retrained weights at the same path
    paths.add(A.extract_one(spec_for(model, corpus), cache_dir=root, progress=False).path)
    assert len(paths) == 10 and len(loads) == 10
    assert A.extract_one(spec_for(model, corpus, batch_size=3), cache_dir=root, progress=False).path in paths


def test_truncated_shard_is_reported_by_extract_not_trained_on(tiny):
    model, corpus, root = tiny
    src = A.extract_one(spec_for(model, corpus), cache_dir=root, progress=False, shard_rows=50)
    shard = src.path / "shard_00002.npy"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ConfigError, match="shard_00002.npy is corrupted or truncated"):
        A.extract_one(spec_for(model, corpus), cache_dir=root, progress=False)


def test_failure_during_extraction_leaves_no_valid_cache(tiny, monkeypatch):
    model, corpus, root = tiny
    real, n = C.CacheWriter.append, []

    def fail_on_third(self, rows):
        n.append(1)
        if len(n) == 3:
            raise KeyboardInterrupt
        return real(self, rows)

    monkeypatch.setattr(C.CacheWriter, "append", fail_on_third)
    with pytest.raises(KeyboardInterrupt):
        A.extract(spec_for(model, corpus, batch_size=2), cache_dir=root, progress=False, shard_rows=10)
    assert list((root / "activations").iterdir()) == []  # neither an entry nor a temporary directory
    monkeypatch.undo()
    assert A.extract_one(spec_for(model, corpus), cache_dir=root, progress=False).n_total == 200


CHILD = """
import sys, time
from saejax import activations as A, cache as C
real = C.CacheWriter._flush
def slow_flush(self):
    real(self)
    print("flushed", flush=True)
    time.sleep(0.5)
C.CacheWriter._flush = slow_flush
spec = A.ExtractSpec(sys.argv[1], A.TextFiles(sys.argv[2]), layers=(1,), sites=("resid_post",), ctx_len=8,
                     n_tokens=200, batch_size=1)
A.extract(spec, cache_dir=sys.argv[3], shard_rows=7, progress=False)
print("finished", flush=True)
"""


def test_sigkill_midway_leaves_no_valid_looking_cache(tiny):
    model, corpus, root = tiny
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(CHILD), model, corpus, str(root)],
                             stdout=subprocess.PIPE, text=True, env=env)
    try:
        for _ in range(3):  # wait until three shards are on disk, then kill -9 mid-extraction
            assert child.stdout.readline().strip() == "flushed"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        child.kill()
    leftovers = list((root / "activations").iterdir())
    assert leftovers and all(p.name.startswith(".tmp-") for p in leftovers)  # the partial write is there...
    assert all(C.read_manifest(p) is None for p in leftovers)  # ...but never looks like a cache
    src = A.extract_one(spec_for(model, corpus), cache_dir=root, progress=False)
    assert src.n_total == 200
    assert [p for p in (root / "activations").iterdir()] == [src.path]  # the dead writer's debris was swept
    assert json.loads((src.path / "manifest.json").read_text())["n_tokens"] == 200
