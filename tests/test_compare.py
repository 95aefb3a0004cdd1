"""Comparing saved SAEs of different widths (the Gemma Scope cross-width table)."""

import numpy as np
import pytest

from saejax import SAEConfig
from saejax.compare import compare, main
from saejax.io import load_saelens, save_saelens


def _save(path, w_dec, arch="relu", k=4):
    d_sae, d_in = w_dec.shape
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, arch=arch, k=k)
    params = {"W_enc": w_dec.T.copy(), "b_enc": np.zeros(d_sae, np.float32), "W_dec": w_dec,
              "b_dec": np.zeros(d_in, np.float32)}
    if arch == "jumprelu":
        params["log_threshold"] = np.full(d_sae, -3.0, np.float32)
    save_saelens(path, cfg, params)
    return cfg, params


def unit(rng, n, d):
    g = rng.standard_normal((n, d)).astype(np.float32)
    return g / np.linalg.norm(g, axis=1, keepdims=True)


def test_wider_sae_containing_the_smaller_one_matches_it_perfectly(tmp_path):
    rng = np.random.default_rng(0)
    small = unit(rng, 64, 32)
    extra = unit(rng, 192, 32)
    wide = np.concatenate([small * rng.choice([-1, 1], (64, 1)).astype(np.float32), extra])[rng.permutation(256)]
    _save(tmp_path / "small", small)
    _save(tmp_path / "wide", wide, arch="jumprelu")
    _save(tmp_path / "other", unit(rng, 128, 32), arch="topk")
    rows = {(r["d_sae_a"], r["d_sae_b"]): r for r in compare([tmp_path / "wide", tmp_path / "small", tmp_path / "other"])}
    hit = rows[(64, 256)]
    assert hit["mean_best_a_in_b"] == pytest.approx(1.0, abs=1e-5) and hit["frac_a_gt_0.9"] == 1.0
    rand = rows[(64, 128)]  # independent random dictionaries: at chance
    assert abs(rand["pwmcc"] - rand["random_pwmcc"]) < 0.05 and rand["frac_a_gt_0.8"] == 0.0


def test_saelens_round_trip_keeps_architecture(tmp_path):
    rng = np.random.default_rng(1)
    cfg, params = _save(tmp_path / "j", unit(rng, 16, 8), arch="jumprelu")
    cfg2, params2 = load_saelens(tmp_path / "j")
    assert cfg2.arch == "jumprelu" and cfg2.d_sae == 16 and cfg2.unit_norm_decoder
    for k in params:
        np.testing.assert_allclose(params2[k], params[k], rtol=1e-6)


def test_bad_input(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "at least 2 SAE directories" in capsys.readouterr().err
    rng = np.random.default_rng(2)
    _save(tmp_path / "a", unit(rng, 8, 4))
    _save(tmp_path / "b", unit(rng, 8, 6))
    assert main([str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert "d_in=4" in capsys.readouterr().err
    assert main([str(tmp_path / "a"), str(tmp_path / "missing")]) == 2
    assert "missing' does not exist" in capsys.readouterr().err
    (tmp_path / "b" / "sae_weights.safetensors").unlink()
    assert main([str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "not a recognised SAE directory (found cfg.json)" in err and err.count("\n") == 1
