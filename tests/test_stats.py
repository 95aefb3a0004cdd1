"""Seed-level statistics checked on data with known answers."""

import itertools
import math

import numpy as np
import pytest

from saejax.errors import ConfigError
from saejax.stability import bootstrap_ci, bootstrap_pairwise, cohens_d, pairwise_mean, permutation_test, seed_scores
from saejax.stability.stats import impute_diagonal


def additive(x):
    """``M_ij = x_i + x_j``: pairwise values driven only by per-seed effects."""
    m = x[:, None] + x[None, :]
    m[np.diag_indices(x.size)] = np.nan  # the diagonal is never read as data
    return m


def test_pairwise_mean_is_the_off_diagonal_mean():
    m = np.arange(16, dtype=float).reshape(4, 4)
    m = m + m.T
    iu = np.triu_indices(4, 1)
    assert pairwise_mean(m) == pytest.approx(m[iu].mean())
    assert pairwise_mean(m, [2, 0, 3]) == pytest.approx(np.mean([m[0, 2], m[2, 3], m[0, 3]]))


def test_imputed_diagonal_is_exact_for_additive_matrices():
    x = np.array([0.1, 0.4, -0.2, 0.3, 0.0])
    x = x - x.mean() + 0.35
    np.testing.assert_allclose(np.diag(impute_diagonal(additive(x))), 2 * x)
    # A seed drawn twice contributes as two independent copies would: 2 x_i.
    assert pairwise_mean(additive(x), [1, 1, 3]) == pytest.approx(np.mean([2 * x[1], x[1] + x[3], x[1] + x[3]]))


def test_bootstrap_replicates_equal_the_bootstrap_of_seed_means():
    # For M_ij = x_i + x_j every replicate must be exactly 2 * mean(x[resampled seeds]).
    rng = np.random.default_rng(0)
    x = rng.normal(0.3, 0.05, 9)
    reps = bootstrap_pairwise(additive(x), n_boot=300, key=7)
    idx = np.random.default_rng(7).integers(0, 9, size=(300, 9))
    np.testing.assert_allclose(reps, 2 * x[idx].mean(axis=1), atol=1e-12)


def test_bootstrap_ci_of_a_constant_matrix_is_a_point():
    est, lo, hi = bootstrap_ci(np.full((5, 5), 0.42), n_boot=200)
    assert est == pytest.approx(0.42) and lo == pytest.approx(0.42) and hi == pytest.approx(0.42)


def test_seed_bootstrap_covers_where_pair_bootstrap_does_not():
    # Shared seed effects make pairs dependent: resampling pairs gives far too narrow intervals.
    rng = np.random.default_rng(1)
    s, mu, trials = 10, 0.4, 150
    seed_hits = pair_hits = 0
    for t in range(trials):
        a = rng.normal(0, 0.05, s)
        e = rng.normal(0, 0.01, (s, s))
        m = mu + a[:, None] + a[None, :] + (e + e.T) / 2
        _, lo, hi = bootstrap_ci(m, n_boot=400, key=t)
        seed_hits += lo <= mu <= hi
        v = m[np.triu_indices(s, 1)]
        lo2, hi2 = np.quantile(rng.choice(v, (400, v.size)).mean(axis=1), [0.025, 0.975])
        pair_hits += lo2 <= mu <= hi2
    assert seed_hits / trials > 0.85
    assert pair_hits / trials < 0.65


def test_exact_permutation_test_on_separated_groups():
    n, k = 8, 4
    labels = np.arange(n) < k
    m = np.full((n, n), 0.5)
    m[np.ix_(labels, labels)] = 0.9  # trained seeds agree with each other
    m[np.ix_(~labels, ~labels)] = 0.3
    stat, p = permutation_test(m, labels)
    assert stat == pytest.approx(0.6)
    assert p == pytest.approx(1 / math.comb(n, k))  # only the true labelling is as extreme
    # Brute-force the same p-value.
    a, b = np.triu_indices(n, 1)
    def diff(lab):
        return m[a, b][lab[a] & lab[b]].mean() - m[a, b][~lab[a] & ~lab[b]].mean()
    alls = [diff(np.isin(np.arange(n), c)) for c in itertools.combinations(range(n), k)]
    assert p == pytest.approx(np.mean(np.array(alls) >= stat - 1e-12))


def test_permutation_test_is_calibrated_under_the_null():
    rng = np.random.default_rng(2)
    ps = []
    for _ in range(200):
        m = rng.normal(size=(8, 8))
        ps.append(permutation_test((m + m.T) / 2, np.arange(8) < 4)[1])
    ps = np.array(ps)
    assert 0.05 < np.mean(ps <= 0.1) < 0.16
    assert 0.3 < np.mean(ps <= 0.5) < 0.7


def test_monte_carlo_permutation_p_value():
    rng = np.random.default_rng(3)
    n = 30
    labels = np.arange(n) < 15
    m = rng.normal(size=(n, n))
    m = (m + m.T) / 2
    m[np.ix_(labels, labels)] += 3.0
    stat, p = permutation_test(m, labels, n_perm=199, key=0)
    assert p == pytest.approx(1 / 200)  # math.comb(30, 15) > 199: sampled, never beaten


def test_cohens_d_known_values():
    assert cohens_d([1, 2, 3], [4, 5, 6]) == pytest.approx(-3.0)
    x, y = [2.0, 4.0, 6.0, 8.0], [1.0, 2.0, 3.0]
    pooled = math.sqrt((3 * np.var(x, ddof=1) + 2 * np.var(y, ddof=1)) / 5)
    assert cohens_d(x, y) == pytest.approx((5.0 - 2.0) / pooled)


def test_seed_scores_are_row_means_without_the_diagonal():
    m = np.array([[9.0, 1.0, 2.0], [1.0, 9.0, 3.0], [2.0, 3.0, 9.0]])
    np.testing.assert_allclose(seed_scores(m), [1.5, 2.0, 2.5])


@pytest.mark.parametrize("call,fragment", [
    (lambda: bootstrap_ci(np.ones((1, 1))), "at least 2 seeds"),
    (lambda: bootstrap_ci(np.ones((3, 4))), "square"),
    (lambda: bootstrap_ci(np.array([[1.0, np.nan], [np.nan, 1.0]])), "NaN"),
    (lambda: permutation_test(np.ones((5, 5)), np.arange(5) < 1), "at least 2 members"),
    (lambda: cohens_d([1.0], [2.0, 3.0]), "at least 2 values"),
])
def test_bad_statistics_input(call, fragment):
    with pytest.raises(ConfigError) as err:
        call()
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_analytic_p_value_is_calibrated_and_has_no_floor():
    """Row maxima of |cos| against n isotropic partners: the exact variance matches Monte Carlo;
    the analytic test rejects random dictionaries at most at its level (it is conservative) and
    gives a shared dictionary a p far below the 1/252 floor of a 5-vs-5 permutation test."""
    from saejax.stability.baseline import analytic_p_value, expected_max_abs_cos, var_max_abs_cos

    rng = np.random.default_rng(0)
    d, n, s = 16, 64, 5

    def unit(a):
        return a / np.linalg.norm(a, axis=-1, keepdims=True)

    u, v = unit(rng.normal(size=(4000, d))), unit(rng.normal(size=(4000, n, d)))
    mx = np.abs(np.einsum("td,tnd->tn", u, v)).max(1)
    assert abs(mx.mean() - expected_max_abs_cos(d, n)) < 4 * mx.std() / np.sqrt(mx.size)
    assert abs(mx.var() - var_max_abs_cos(d, n)) < 0.08 * mx.var()

    def pwmcc(dicts):
        vals = []
        for i in range(len(dicts)):
            for j in range(i + 1, len(dicts)):
                c = np.abs(dicts[i] @ dicts[j].T)
                vals.append(0.5 * (c.max(1).mean() + c.max(0).mean()))
        return float(np.mean(vals))

    ps = [analytic_p_value(pwmcc(unit(rng.normal(size=(s, n, d)))), d, n) for _ in range(200)]
    assert np.mean(np.asarray(ps) < 0.05) <= 0.05 and np.mean(np.asarray(ps) < 0.5) < 0.7
    base = unit(rng.normal(size=(n, d)))
    shared = unit(base[None] + 0.6 * rng.normal(size=(s, n, d)) / np.sqrt(d))
    assert analytic_p_value(pwmcc(shared), d, n) < 1e-6 < 1 / 252


def test_median_bootstrap_equals_pooling_the_drawn_pairs_by_hand():
    """Each replicate's median from weighted per-pair histograms equals np.median of the values of
    every drawn pair of distinct seeds, concatenated (to the histogram's bin width)."""
    from saejax.stability.stats import _rng, bootstrap_median_ci

    rng = np.random.default_rng(7)
    s = 5
    pairs = list(itertools.combinations(range(s), 2))
    shift = rng.random(s) * 0.3  # seed effects, so replicates differ
    values = [np.clip(rng.beta(2, 5, size=int(rng.integers(500, 2000))) + shift[i] + shift[j], 0, 1) for i, j in pairs]
    est, lo, hi = bootstrap_median_ci(values, pairs, s, n_boot=300, key=3, bins=4000)
    assert est == pytest.approx(np.median(np.concatenate(values)))
    idx = _rng(3).integers(0, s, size=(300, s))
    by_pair = dict(zip(pairs, values))
    reps = []
    for row in idx:
        drawn = [by_pair[(min(a, b), max(a, b))] for a, b in itertools.combinations(row, 2) if a != b]
        reps.append(np.median(np.concatenate(drawn)) if drawn else np.nan)
    want = np.nanquantile(reps, [0.025, 0.975])
    assert lo == pytest.approx(want[0], abs=2 / 4000) and hi == pytest.approx(want[1], abs=2 / 4000)
    assert lo < est < hi
