"""Matryoshka BatchTopK and the gated SAE: ensemble = alone, export/reload, the runner, a NumPy
gated forward, gated beats ReLU-L1 at matched L0, Matryoshka's first prefix takes the strongest features."""

import json
from functools import cache
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax import ArraySource, ConfigError, SAEConfig, SyntheticSource, TrainConfig, archs, sae
from saejax.io import load_saelens, save_saelens
from saejax.run import main
from saejax.train import evaluate, train

ROOT = Path(__file__).parent.parent
NEW = ["matryoshka", "gated"]
SRC = SyntheticSource(d=8, n_features=12, s=2, n_heldout=256)


def small(arch, **kw):
    return SAEConfig(d_in=8, d_sae=16, arch=arch, k=2, l1_coef=3e-2, dead_tokens=512, **kw)


def rel_err(a, b):
    return max(float(np.max(np.abs(x - y)) / (np.max(np.abs(y)) + 1e-12))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@cache
def runs(arch):
    """Seeds (4, 1, 7) together and seed 1 alone, shared by the tests below (compiling is the cost)."""
    tc = TrainConfig(batch_size=64, steps=60, lr=3e-3, log_every=10, chunk_steps=30)
    return train(small(arch), tc, SRC, [4, 1, 7], progress=False), train(small(arch), tc, SRC, [1], progress=False)


@pytest.mark.parametrize("arch", NEW)
def test_seed_in_ensemble_equals_seed_alone_and_metrics(arch):
    many, alone = runs(arch)
    assert rel_err(jax.tree.map(lambda a: a[1], many.params), jax.tree.map(lambda a: a[0], alone.params)) <= 1e-5
    names = archs.get(arch).metrics(small(arch))
    assert names and set(names) <= set(many.history)
    for k in ("loss", *names):
        np.testing.assert_allclose(many.history[k][1], alone.history[k][0], rtol=1e-5)
    parts = sum(many.history[k] for k in names)
    np.testing.assert_allclose(parts, many.history["sparsity"], rtol=1e-5)  # the parts sum to the term
    assert many.history["loss"][:, -1].max() < many.history["loss"][:, 0].min()


def test_every_matryoshka_prefix_loss_is_recorded():
    cfg = small("matryoshka")
    assert archs.archs_extra.matryoshka_prefixes(cfg) == (2, 4, 8, 16)
    h = runs("matryoshka")[0].history
    losses = [h[f"prefix_loss_{m}"][:, -1] for m in (2, 4, 8)]
    losses.append(h["mse"][:, -1] * cfg.d_in)  # the whole dictionary's: the reconstruction term
    assert all(np.all(a > b) for a, b in zip(losses, losses[1:])), losses  # more latents, better reconstruction
    np.testing.assert_allclose(h["loss"][:, -1], sum(losses) + h["aux"][:, -1] / 32, rtol=1e-4)
    with pytest.raises(ConfigError, match="matryoshka_prefixes"):
        small("matryoshka", matryoshka_prefixes=(4, 2, 16))


@pytest.mark.parametrize("arch", NEW)
def test_export_reload_equal(arch, tmp_path):
    cfg, r = small(arch), runs(arch)[0]
    raw = {k: np.asarray(v[0]) for k, v in r.raw_params().items()}
    thr = archs.get(arch).threshold(np.float32(r.threshold[0]))
    save_saelens(tmp_path / arch, cfg, raw, threshold=None if thr is None else float(thr))
    cfg2, params2 = load_saelens(tmp_path / arch)
    x = SRC.heldout()
    z = sae.encode(cfg, raw, x, thr)
    z2 = sae.encode(cfg2, params2, x, archs.get(cfg2.arch).threshold(thr))
    assert float(jnp.mean(jnp.sum(z > 0, axis=1))) > 0.5
    np.testing.assert_allclose(z2, z, atol=1e-5)
    np.testing.assert_allclose(sae.decode(params2, z2), sae.decode(raw, z), atol=1e-5)
    saved = json.loads((tmp_path / arch / "cfg.json").read_text())
    assert saved["architecture"] == {"matryoshka": "jumprelu", "gated": "gated"}[arch]


@pytest.mark.parametrize("arch", NEW)
def test_runs_through_the_runner(arch, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    argv = ["experiments/smoke.py", "--set", f"archs={arch}", "--out", str(tmp_path / "out"), "--no-progress",
            "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 0


def _gated_params(rng, d, n):
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    return {"W_enc": f(d, n) / np.sqrt(d), "b_enc": 0.3 * f(n), "W_dec": f(n, d), "b_dec": 0.2 * f(d),
            "r_mag": 0.5 * f(n), "b_mag": 0.3 * f(n)}


def test_gated_forward_equals_numpy():
    rng = np.random.default_rng(0)
    p = _gated_params(rng, 8, 16)
    x = rng.standard_normal((64, 8)).astype(np.float32)
    xc = x.astype(np.float64) - p["b_dec"]
    pi_gate = xc @ p["W_enc"] + p["b_enc"]  # b_gate
    pi_mag = xc @ (p["W_enc"] * np.exp(p["r_mag"])) + p["b_mag"]
    f = (pi_gate > 0) * np.maximum(pi_mag, 0.0)
    assert 0 < (f > 0).mean() < 1
    cfg = SAEConfig(d_in=8, d_sae=16, arch="gated", normalize_input=False)
    z = sae.encode(cfg, p, x)
    np.testing.assert_allclose(z, f, atol=1e-5)
    np.testing.assert_allclose(sae.decode(p, z), f @ p["W_dec"] + p["b_dec"], atol=1e-5)


def test_loads_a_saelens_gated_directory(tmp_path):
    from safetensors.numpy import save_file

    p = _gated_params(np.random.default_rng(1), 8, 16)
    t = {"W_enc": p["W_enc"], "b_gate": p["b_enc"], "r_mag": p["r_mag"], "b_mag": p["b_mag"],
         "W_dec": p["W_dec"], "b_dec": p["b_dec"]}
    save_file(t, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({"architecture": "gated", "d_in": 8, "d_sae": 16,
                                                   "apply_b_dec_to_input": True}))
    cfg, params = load_saelens(tmp_path)
    x = np.random.default_rng(2).standard_normal((16, 8)).astype(np.float32)
    np.testing.assert_allclose(sae.encode(cfg, params, x), sae.encode(cfg.replace(arch="gated"), p, x), atol=1e-5)


def test_gated_beats_relu_at_matched_l0():
    src = SyntheticSource(d=16, n_features=32, s=3, n_heldout=2048)
    tc = TrainConfig(batch_size=256, steps=300, lr=3e-3, log_every=100, chunk_steps=300)
    ev = {}
    for arch, l1 in (("relu", 0.3), ("gated", 0.4)):  # coefficients tuned to L0 ~ 5 for both
        r = train(SAEConfig(d_in=16, d_sae=32, arch=arch, l1_coef=l1), tc, src, [0], progress=False)
        ev[arch] = evaluate(r, src.heldout())
    l0_r, l0_g = ev["relu"]["l0"][0], ev["gated"]["l0"][0]
    assert abs(l0_g / l0_r - 1) < 0.2, (l0_r, l0_g)
    assert ev["gated"]["mse"][0] < 0.9 * ev["relu"]["mse"][0], (ev["gated"]["mse"], ev["relu"]["mse"])


def test_matryoshka_first_prefix_takes_the_strongest_features():
    """Song et al.'s organism with feature scales falling geometrically from 1 to 0.05: the first
    prefix's latents align with the top-variance true features, not the weak ones."""
    truth = SyntheticSource(d=16, n_features=32, s=3).true_dictionary
    scales = np.geomspace(1.0, 0.05, 32).astype(np.float32)
    rng = np.random.default_rng(0)
    active = np.argsort(rng.random((16384, 32)), axis=1)[:, :3]
    mags = np.abs(rng.standard_normal((16384, 3))).astype(np.float32) * scales[active]
    src = ArraySource(np.einsum("ns,nsd->nd", mags, truth[active]), true_dictionary=truth)
    cfg = SAEConfig(d_in=16, d_sae=32, arch="matryoshka", k=3, matryoshka_prefixes=(4, 8, 16, 32))
    r = train(cfg, TrainConfig(batch_size=256, steps=300, lr=3e-3, log_every=50), src, [0, 1], progress=False)
    cos = np.abs(np.einsum("mjd,fd->mjf", r.decoders(), truth))  # [seed, latent, feature]
    first_top, first_low = cos[:, :4, :4].max(2).mean(), cos[:, :4, 8:].max(2).mean()
    last_top = cos[:, 16:, :4].max(2).mean()
    assert first_top > first_low + 0.1, (first_top, first_low)
    assert first_top > last_top + 0.1, (first_top, last_top)
