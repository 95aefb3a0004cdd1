"""The architecture registry: one entry is all a new architecture needs."""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax import SAEConfig, SyntheticSource, TrainConfig, archs, sae
from saejax.io import load_saelens, save_saelens
from saejax.train import evaluate, train


def _clip_train(cfg, params, pre, hp, ramp):
    z = jnp.clip(pre, 0.0, 1.0)
    return z, jnp.zeros((), pre.dtype), jnp.zeros((), pre.dtype)


def _clip_infer(cfg, params, pre, threshold):
    return jnp.clip(pre, 0.0, 1.0)


@pytest.fixture
def toy_arch():
    entry = archs.register(archs.Arch("clip01", _clip_train, _clip_infer, dense_arrays=3))
    yield entry
    del archs.REGISTRY["clip01"]


def test_toy_architecture_trains_exports_and_reloads(toy_arch, tmp_path):
    src = SyntheticSource(d=8, n_features=12, s=2, n_heldout=256)
    cfg = SAEConfig(d_in=8, d_sae=12, arch="clip01")
    res = train(cfg, TrainConfig(batch_size=64, steps=30, lr=3e-3, log_every=10), src, [0, 1], progress=False)
    assert res.history["loss"][:, -1].max() < res.history["loss"][:, 0].min()  # it learned
    alone = train(cfg, TrainConfig(batch_size=64, steps=30, lr=3e-3, log_every=10), src, [1], progress=False)
    np.testing.assert_allclose(res.params["W_dec"][1], alone.params["W_dec"][0], atol=1e-5)  # ensemble equals alone
    raw = {k: np.asarray(v[0]) for k, v in res.raw_params().items()}
    save_saelens(tmp_path / "sae", cfg, raw)
    cfg2, params2 = load_saelens(tmp_path / "sae")
    assert cfg2.arch == "clip01"
    x = src.heldout()
    want = sae.decode(raw, sae.encode(cfg, raw, x))
    np.testing.assert_allclose(sae.decode(params2, sae.encode(cfg2, params2, x)), want, atol=1e-5)
    assert evaluate(res, x)["ev"].min() > 0


@pytest.mark.parametrize("name", ["topk", "batchtopk", "relu", "jumprelu", "matryoshka", "gated"])
def test_every_entry_exports_and_reloads(name, tmp_path):
    cfg = SAEConfig(d_in=8, d_sae=16, arch=name, k=3, normalize_input=False)
    params = jax.tree.map(np.asarray, sae.init(cfg, jax.random.PRNGKey(0), jnp.full(8, 0.1)))
    params["b_enc"] = np.linspace(-0.2, 0.3, 16).astype(np.float32)
    thr = 0.05
    save_saelens(tmp_path / name, cfg, params, threshold=thr)
    cfg2, params2 = load_saelens(tmp_path / name)
    x = np.random.default_rng(0).standard_normal((32, 8)).astype(np.float32)
    entry = archs.get(name)
    want = sae.encode(cfg, params, x, entry.threshold(np.float32(thr)))
    got = sae.encode(cfg2, params2, x, archs.get(cfg2.arch).threshold(np.float32(thr)))
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_no_architecture_switch_outside_the_registry():
    pkg = Path(archs.__file__).parent
    pattern = re.compile(r"""arch\s*(==|!=|in\b|not in\b)\s*[("'\[]""")
    hits = [f"{p.relative_to(pkg)}:{i}" for p in pkg.rglob("*.py") if not p.name.startswith("archs")
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, f"architecture tested by name outside saejax/archs.py: {hits}"
