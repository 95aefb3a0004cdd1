"""Probes on data with a known answer, and label profiles of matched latents."""

import numpy as np
import pytest

from saejax.errors import ConfigError
from saejax.probe import fit_probe, label_profiles, per_class_scores, probe_seeds, split, usage_table


def blobs(n, d, n_classes, sep, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    centers = rng.standard_normal((n_classes, d)) * sep
    return (centers[y] + rng.standard_normal((n, d))).astype(np.float32), y


@pytest.mark.parametrize("method", ["logistic", "ridge"])
def test_separable_classes_are_learned_and_noise_is_not(method):
    x, y = blobs(1200, 10, 3, sep=6.0)
    tr, te = split(len(y), seed=1)
    res = fit_probe(x[tr], y[tr], x[te], y[te], method=method)
    assert res["test_acc"] > 0.98 and res["n_classes"] == 3
    noise = np.random.default_rng(5).integers(0, 3, len(y))  # labels independent of x
    res = fit_probe(x[tr], noise[tr], x[te], noise[te], method=method)
    assert res["test_acc"] < 0.45 and res["chance"] < 0.45


def test_probe_seeds_compares_raw_and_latents():
    x, y = blobs(800, 8, 2, sep=4.0)
    informative = np.stack([np.maximum(x, 0), np.maximum(-x, 0)], 0).transpose(0, 1, 2)  # two "SAEs" keeping the signal
    useless = np.random.default_rng(3).random((3, 800, 16)).astype(np.float32)
    good = probe_seeds(x, informative, y)
    bad = probe_seeds(x, useless, y)
    assert good["raw"]["test_acc"] > 0.95 and good["sae_mean"] > 0.9
    assert bad["sae_mean"] < 0.7 < bad["raw"]["test_acc"]
    assert bad["sae_ci_low"] <= bad["sae_mean"] <= bad["sae_ci_high"]


def test_label_profiles_by_hand():
    z = np.array([[1, 0], [2, 0], [0, 3], [1, 1]], np.float32)
    y = np.array([0, 0, 1, 1])
    np.testing.assert_allclose(label_profiles(z, y, 2), [[1.0, 0.5], [0.0, 1.0]])


def test_matched_latents_share_profiles_in_a_permuted_copy():
    rng = np.random.default_rng(0)
    dec = rng.standard_normal((16, 8)).astype(np.float32)
    perm = rng.permutation(16)
    y = rng.integers(0, 3, 500)
    z = (rng.random((500, 16)) < (0.1 + 0.3 * (np.arange(16) % 3 == y[:, None]))).astype(np.float32)
    rows = usage_table(np.stack([z, z[:, perm]]), y, 3, decoders=np.stack([dec, dec[perm]]), top=4)
    assert len(rows) == 8
    for r in rows:
        other = np.argsort(perm)[r["latent"]] if r["seed_index"] == 0 else perm[r["latent"]]
        assert r["match_latent"] == other and r["match_cos"] == pytest.approx(1.0, abs=1e-5)
        assert r["profile_corr"] == pytest.approx(1.0)


def test_bad_input():
    with pytest.raises(ConfigError, match="at least 2 classes"):
        fit_probe(np.ones((4, 2)), np.zeros(4), np.ones((2, 2)), np.zeros(2))
    with pytest.raises(ConfigError, match="test features"):
        fit_probe(np.ones((4, 2)), np.array([0, 1, 0, 1]), np.ones((2, 3)), np.zeros(2))


def test_per_class_scores_equal_counting_by_hand():
    rng = np.random.default_rng(4)
    y, pred = rng.integers(0, 5, 300), rng.integers(0, 4, 300)  # class 4 is never predicted
    got = per_class_scores(y, pred, 6)  # class 5 absent
    for c in range(6):
        tp, fp, fn = np.sum((pred == c) & (y == c)), np.sum((pred == c) & (y != c)), np.sum((pred != c) & (y == c))
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        assert got["precision"][c] == pytest.approx(p) and got["recall"][c] == pytest.approx(r)
        assert got["f1"][c] == pytest.approx(2 * p * r / (p + r) if p + r else 0.0)
        assert got["support"][c] == np.sum(y == c)
    assert got["f1"][4] == 0.0 and got["support"][5] == 0


def test_pca_baseline_sees_only_the_top_components():
    """The label lives in a low-variance direction: a probe on the top-2 principal components
    misses it, one on all raw dimensions finds it; the default component count is the latents' L0."""
    rng = np.random.default_rng(0)
    n = 1000
    y = rng.integers(0, 2, n)
    x = np.concatenate([rng.standard_normal((n, 2)) * 10, (2 * y[:, None] - 1) * 1.0 + 0.1 * rng.standard_normal((n, 1))], 1)
    lat = np.zeros((2, n, 8), np.float32)
    lat[:, :, :2] = 1.0  # L0 = 2 in every row
    res = probe_seeds(x.astype(np.float32), lat, y, method="ridge")
    assert res["pca_components"] == 2
    assert res["raw"]["test_acc"] > 0.95 and res["pca"]["test_acc"] < 0.65
    assert res["raw"]["macro_f1"] > 0.95
    full = probe_seeds(x.astype(np.float32), lat, y, method="ridge", pca_components=3)
    assert full["pca"]["test_acc"] == pytest.approx(full["raw"]["test_acc"], abs=0.02)  # all components: raw's equal
