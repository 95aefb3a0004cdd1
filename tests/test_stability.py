"""Stability engine: kernel = brute force, matching = dense optimum, baselines = closed forms."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment
from scipy.sparse import csr_array
from scipy.sparse.csgraph import min_weight_full_bipartite_matching
from scipy.special import gamma

from saejax.errors import ConfigError
from saejax.stability import (
    MASKED,
    activation_corr,
    all_pairs,
    effective_rank,
    expected_max_abs_cos,
    gt_mcc,
    match,
    matching_metrics,
    pair_stats,
    pw_mcc,
    pwmcc,
    random_baseline,
    random_dictionaries,
    shared_fraction,
    simulate_baseline,
    stability_report,
)
from saejax.stability.kernel import two_passes
from saejax.topk import top_k_rows


def rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def brute_scores(a, b, signed=False):
    s = unit(a) @ unit(b).T
    return s if signed else np.abs(s)


def check_topk(vals, idx, ref, k):
    """Values equal the reference's k best; indices point at entries holding those values."""
    vals, idx = np.asarray(vals, np.float64), np.asarray(idx)
    best = -np.sort(-ref, axis=1)[:, :k]
    np.testing.assert_allclose(vals, best, atol=2e-6)
    np.testing.assert_allclose(np.take_along_axis(ref, idx, axis=1), vals, atol=2e-6)
    assert all(len(set(r)) == k for r in idx.tolist())  # k distinct candidates
    # Where the reference has no near-tie, the indices themselves must agree.
    order = np.argsort(-ref, axis=1, kind="stable")[:, :k]
    gaps = np.diff(-np.sort(-ref, axis=1)[:, : k + 1], axis=1)
    clear = np.abs(gaps) > 1e-5
    assert (idx[clear] == order[clear]).all()


# --- kernel -----------------------------------------------------------------------------------

@pytest.mark.parametrize("n_a,n_b,d,k,chunk,signed", [
    (37, 53, 16, 5, 8, False),  # chunk divides neither width
    (64, 64, 32, 1, 64, False),
    (100, 29, 24, 7, 33, True),  # wider first dictionary, signed scores
    (5, 130, 8, 3, 2, False),
    (37, 53, 200, 5, 8, False),  # d > 16 k + 128: one pass, columns merged chunk by chunk
    (100, 29, 300, 7, 33, True),
])
def test_pair_kernel_equals_brute_force(n_a, n_b, d, k, chunk, signed):
    rng = np.random.default_rng(n_a * 1000 + n_b)
    a, b = rand(rng, n_a, d), rand(rng, n_b, d)
    st = pair_stats(a, b, top_k=k, chunk=chunk, signed=signed)
    ref = brute_scores(a, b, signed)
    np.testing.assert_allclose(st.row_max, ref.max(1), atol=2e-6)
    np.testing.assert_allclose(st.col_max, ref.max(0), atol=2e-6)
    np.testing.assert_array_equal(st.row_arg, ref.argmax(1))
    np.testing.assert_array_equal(st.col_arg, ref.argmax(0))
    check_topk(st.row_topk, st.row_topk_idx, ref, k)
    check_topk(st.col_topk, st.col_topk_idx, ref.T, k)


@pytest.mark.parametrize("rows,n,k", [(7, 16384, 32), (5, 2100, 8), (3, 5000, 16), (4, 777, 1), (6, 40, 5)])
def test_top_k_rows_equals_lax_top_k(rows, n, k):
    """The block-maxima top-k (used from 256 k columns up, with and without a ragged tail) against lax.top_k, on fresh
    random rows and on rows of heavily tied small integers (values must agree exactly)."""
    rng = np.random.default_rng(n + k)
    mostly_masked = np.where(rng.random((rows, n)) < 0.995, MASKED, rng.standard_normal((rows, n))).astype(np.float32)
    for s in (rng.standard_normal((rows, n)).astype(np.float32), rng.integers(0, 50, (rows, n)).astype(np.float32),
              mostly_masked, jnp.asarray(rng.standard_normal((rows, n)), jnp.bfloat16)):
        v, i = top_k_rows(jnp.asarray(s), k)
        rv, ri = jax.lax.top_k(jnp.asarray(s), k)
        np.testing.assert_array_equal(np.asarray(v), np.asarray(rv))
        np.testing.assert_array_equal(np.take_along_axis(np.asarray(s), np.asarray(i), axis=1), np.asarray(rv))
        assert all(len(set(r)) == k for r in np.asarray(i).tolist())  # k distinct columns
        if s.dtype == np.float32 and len(np.unique(s)) == s.size:  # no ties: the same columns
            np.testing.assert_array_equal(np.asarray(i), np.asarray(ri))


@pytest.mark.parametrize("n_a,n_b,d,k,chunk,masked", [
    (300, 2500, 24, 8, 128, False),  # rows of b through the block top-k
    (1100, 300, 24, 2, 128, True),  # two passes: the second pass's rows (of b) through the block top-k
    (1100, 700, 200, 2, 600, True),  # one pass: the chunk's column top-k through the block top-k, last chunk padded
    (2600, 40, 16, 4, 64, False),  # very unequal widths: the second pass takes 1 row of b per step
])
def test_pair_kernel_on_wide_dictionaries_equals_brute_force(n_a, n_b, d, k, chunk, masked):
    rng = np.random.default_rng(3)
    a, b = rand(rng, n_a, d), rand(rng, n_b, d)
    ok_a, ok_b = (rng.random(n_a) > 0.3, rng.random(n_b) > 0.3) if masked else (np.ones(n_a, bool), np.ones(n_b, bool))
    st = pair_stats(a, b, top_k=k, chunk=chunk, **(dict(alive_a=ok_a, alive_b=ok_b) if masked else {}))
    ref = brute_scores(a, b)
    rows, cols = np.where(ok_b[None, :], ref, MASKED), np.where(ok_a[:, None], ref, MASKED).T
    check_topk(st.row_topk, st.row_topk_idx, rows, k)
    check_topk(st.col_topk, st.col_topk_idx, cols, k)
    np.testing.assert_array_equal(st.row_arg, rows.argmax(1))
    np.testing.assert_array_equal(st.col_arg, cols.argmax(1))


def test_all_pairs_equals_brute_force_for_every_pair():
    rng = np.random.default_rng(1)
    dicts = rand(rng, 4, 45, 12)
    out = all_pairs(dicts, top_k=4, chunk=7)
    assert out.pairs.tolist() == [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]]
    for p, (i, j) in enumerate(out.pairs):
        ref = brute_scores(dicts[i], dicts[j])
        np.testing.assert_allclose(out.stats.row_max[p], ref.max(1), atol=2e-6)
        np.testing.assert_array_equal(out.stats.col_arg[p], ref.argmax(0))
        check_topk(out.stats.row_topk[p], out.stats.row_topk_idx[p], ref, 4)
        check_topk(out.stats.col_topk[p], out.stats.col_topk_idx[p], ref.T, 4)


@pytest.mark.parametrize("d", [8, 200])  # two passes, one pass
def test_kernel_masks_dead_latents(d):
    rng = np.random.default_rng(2)
    assert two_passes(d, 3) == (d == 8)  # both code paths are exercised
    a, b = rand(rng, 30, d), rand(rng, 40, d)
    ok_a, ok_b = rng.random(30) > 0.3, rng.random(40) > 0.3
    st = pair_stats(a, b, top_k=3, chunk=7, alive_a=ok_a, alive_b=ok_b)
    ref = brute_scores(a, b)
    sub = np.where(ok_b[None, :], ref, -np.inf)
    np.testing.assert_allclose(st.row_max, sub.max(1), atol=2e-6)
    np.testing.assert_array_equal(st.row_arg, sub.argmax(1))
    subc = np.where(ok_a[:, None], ref, -np.inf)
    np.testing.assert_array_equal(st.col_arg, subc.argmax(0))
    # Fewer live latents than k: the tail of the top-k is MASKED.
    st = pair_stats(a, b, top_k=5, alive_a=np.arange(30) < 2)
    assert (np.asarray(st.col_topk)[:, 2:] == MASKED).all()


# --- matching ---------------------------------------------------------------------------------

def permuted_flipped(rng, n, d):
    a = rand(rng, n, d)
    perm = rng.permutation(n)
    signs = rng.choice([-1.0, 1.0], size=(n, 1)).astype(np.float32)
    return a, (a * signs)[perm], perm


@pytest.mark.parametrize("method", ["dense", "sparse"])
def test_permuted_sign_flipped_copy_is_a_perfect_match(method):
    rng = np.random.default_rng(3)
    a, b, perm = permuted_flipped(rng, 300, 64)
    assert pwmcc(a, b) == pytest.approx(1.0, abs=1e-6)
    m = match(a, b, method=method, top_k=4)
    # b[q] = ±a[perm[q]]  =>  a[i] is matched with b[inverse_perm[i]]
    np.testing.assert_array_equal(m.rows, np.arange(300))
    np.testing.assert_array_equal(m.cols, np.argsort(perm))
    np.testing.assert_allclose(m.abs_cos, 1.0, atol=1e-6)
    assert m.optimal and m.method == method
    mm = matching_metrics(m)
    assert mm["hungarian_mean"] == pytest.approx(1.0) and mm["frac_ge_0.9"] == 1.0


def lsa_value(a, b, signed=False):
    w = brute_scores(a, b, signed)
    r, c = linear_sum_assignment(w, maximize=True)
    return w[r, c].sum(), r, c


@pytest.mark.parametrize("n,noise", [(256, 0.8), (1024, 1.0), (4096, 1.2)])
def test_sparse_reaches_dense_optimum_on_planted_instances(n, noise):
    rng = np.random.default_rng(n)
    a = rand(rng, n, 32)
    perm = rng.permutation(n)
    b = a[perm] + noise * rand(rng, n, 32)  # noisy: the planted permutation is not always optimal
    sparse = match(a, b, method="sparse", top_k=8)
    dense = match(a, b, method="dense")
    assert sparse.optimal and dense.optimal
    assert sparse.abs_cos.sum() == pytest.approx(dense.abs_cos.sum(), abs=1e-4)
    assert sparse.upper_bound >= sparse.value - 1e-9
    assert np.mean(sparse.cols == dense.cols) > 0.999  # identical up to float32 near-ties


def test_sparse_with_tiny_k_needs_and_passes_the_certificate():
    # Random dictionaries are the hardest case: with k=2 many optimal edges are not candidates,
    # so the solver must find them through the dual check and still prove optimality.
    rng = np.random.default_rng(5)
    a, b = rand(rng, 400, 16), rand(rng, 400, 16)
    best, _, _ = lsa_value(a, b)
    m = match(a, b, method="sparse", top_k=2)
    assert m.optimal
    assert m.abs_cos.sum() == pytest.approx(best, abs=1e-4)
    assert m.upper_bound == pytest.approx(best, abs=400 * 1e-5)


def test_row_only_topk_graph_without_perfect_matching():
    # Every row of a prefers the same 4 "hub" columns of b, so the row-only top-4 graph touches
    # only 4 columns and cannot match 60 rows; row ∪ column top-k must still find the optimum.
    rng = np.random.default_rng(6)
    d, n, k = 16, 60, 4
    hub = unit(rand(rng, d))
    a = (hub + 0.05 * rand(rng, n, d)).astype(np.float32)
    b = np.concatenate([hub + 0.01 * rand(rng, k, d), 0.2 * hub + rand(rng, n - k, d)]).astype(np.float32)
    st = pair_stats(a, b, top_k=k)
    assert set(np.asarray(st.row_topk_idx).ravel().tolist()) == set(range(k))
    rows = np.repeat(np.arange(n), k)
    graph = csr_array((np.asarray(st.row_topk).ravel() + 1.0, (rows, np.asarray(st.row_topk_idx).ravel())), shape=(n, n))
    with pytest.raises(ValueError):
        min_weight_full_bipartite_matching(graph, maximize=True)
    best, _, _ = lsa_value(a, b)
    m = match(a, b, method="sparse", top_k=k)
    assert m.optimal and m.abs_cos.sum() == pytest.approx(best, abs=1e-4)


@pytest.mark.parametrize("n_a,n_b", [(50, 80), (80, 50)])
@pytest.mark.parametrize("method", ["dense", "sparse"])
def test_rectangular_matching(n_a, n_b, method):
    rng = np.random.default_rng(n_a)
    a, b = rand(rng, n_a, 12), rand(rng, n_b, 12)
    best, r, c = lsa_value(a, b)
    m = match(a, b, method=method, top_k=3)
    assert m.rows.size == min(n_a, n_b) and m.optimal
    assert len(set(m.rows.tolist())) == m.rows.size and len(set(m.cols.tolist())) == m.cols.size
    assert m.abs_cos.sum() == pytest.approx(best, abs=1e-4)
    np.testing.assert_allclose(m.abs_cos, brute_scores(a, b)[m.rows, m.cols], atol=1e-6)


@pytest.mark.parametrize("method", ["dense", "sparse"])
def test_live_only_matching_equals_matching_the_live_subsets(method):
    rng = np.random.default_rng(8)
    a, b = rand(rng, 90, 10), rand(rng, 70, 10)
    ok_a, ok_b = rng.random(90) > 0.4, rng.random(70) > 0.2
    m = match(a, b, alive_a=ok_a, alive_b=ok_b, method=method, top_k=4)
    best, _, _ = lsa_value(a[ok_a], b[ok_b])
    assert ok_a[m.rows].all() and ok_b[m.cols].all()
    assert m.rows.size == min(ok_a.sum(), ok_b.sum())
    assert m.optimal and m.abs_cos.sum() == pytest.approx(best, abs=1e-4)


def test_signed_matching_maximises_signed_cosine():
    rng = np.random.default_rng(9)
    a, b = rand(rng, 120, 8), rand(rng, 120, 8)
    best, _, _ = lsa_value(a, b, signed=True)
    for method in ("dense", "sparse"):
        m = match(a, b, signed=True, method=method, top_k=4)
        assert m.optimal and m.cos.sum() == pytest.approx(best, abs=1e-4)
    assert pw_mcc(a, b, signed=True) == pytest.approx(best / 120, abs=1e-6)
    assert pw_mcc(a, b) == pytest.approx(lsa_value(a, b)[0] / 120, abs=1e-6)


# --- metrics ----------------------------------------------------------------------------------

def test_pwmcc_formula_and_live_variant():
    rng = np.random.default_rng(10)
    a, b = rand(rng, 40, 6), rand(rng, 55, 6)
    ref = brute_scores(a, b)
    assert pwmcc(a, b) == pytest.approx(0.5 * (ref.max(1).mean() + ref.max(0).mean()), abs=1e-6)
    ok_a, ok_b = rng.random(40) > 0.5, rng.random(55) > 0.5
    sub = ref[np.ix_(ok_a, ok_b)]
    assert pwmcc(a, b, alive_a=ok_a, alive_b=ok_b) == pytest.approx(0.5 * (sub.max(1).mean() + sub.max(0).mean()), abs=1e-6)


def test_threshold_fractions_and_curve():
    rng = np.random.default_rng(11)
    a, b = rand(rng, 200, 16), rand(rng, 200, 16)
    m = match(a, b)
    mm = matching_metrics(m)
    assert mm["frac_ge_0.5"] == pytest.approx(np.mean(m.abs_cos >= 0.5))
    assert mm["hungarian_median"] == pytest.approx(np.median(m.abs_cos))
    assert mm["curve"][0] == 1.0 and mm["curve"][-1] == 0.0
    assert all(x >= y for x, y in zip(mm["curve"], mm["curve"][1:]))  # non-increasing


def test_shared_fraction_needs_decoder_and_encoder_agreement():
    rng = np.random.default_rng(12)
    a, b, perm = permuted_flipped(rng, 100, 32)
    enc_a = a.copy()
    enc_b = b.copy()
    inv = np.argsort(perm)
    enc_b[inv[:30]] = rand(rng, 30, 32)  # the partners of a's first 30 latents get unrelated encoders
    assert shared_fraction(a, b, enc_a, enc_b) == pytest.approx(0.7)
    assert shared_fraction(a, b, enc_a, enc_a[perm]) == 1.0


def test_activation_corr_of_matched_latents():
    rng = np.random.default_rng(13)
    a, b, perm = permuted_flipped(rng, 20, 16)
    acts_a = np.maximum(rand(rng, 500, 20), 0)
    acts_b = 3.0 * acts_a[:, perm] + 1.0  # b's latent q is a's latent perm[q], rescaled
    acts_b[:, 0] = 0.0  # one dead latent: undefined correlation
    r = activation_corr(acts_a, acts_b, match(a, b))
    assert np.isnan(r).sum() == 1
    np.testing.assert_allclose(r[~np.isnan(r)], 1.0, atol=1e-9)


def test_gt_mcc_recovers_a_planted_dictionary():
    rng = np.random.default_rng(14)
    truth = rand(rng, 50, 24)
    learned = np.concatenate([truth[rng.permutation(50)] * -2.0, rand(rng, 30, 24)])
    g = gt_mcc(learned, truth)
    assert g["gt_mcc"] == pytest.approx(1.0, abs=1e-6) and g["mmcs"] == pytest.approx(1.0, abs=1e-6)
    assert gt_mcc(rand(rng, 50, 24), truth)["gt_mcc"] < 0.6


def test_effective_rank_known_spectra():
    rng = np.random.default_rng(15)
    q, _ = np.linalg.qr(rng.standard_normal((40, 40)))
    x = rng.standard_normal((2000, 7)) @ q[:7]  # rank 7, nearly equal spectrum
    u, _, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    flat = u[:, :7] @ vt[:7]  # exactly equal singular values
    er = effective_rank(flat, center=False)
    assert er["participation_ratio"] == pytest.approx(7.0) and er["entropy_rank"] == pytest.approx(7.0)
    spiked = effective_rank(np.diag([10.0, 1.0, 1.0, 0.0]), center=False)
    assert spiked["participation_ratio"] == pytest.approx(102.0**2 / 10002.0)


# --- baselines --------------------------------------------------------------------------------

@pytest.mark.parametrize("d", [2, 3, 10, 128])
def test_expected_abs_cos_closed_form_for_one_partner(d):
    # n = 1: E|cos| = Gamma(d/2) / (sqrt(pi) Gamma((d+1)/2)).
    exact = gamma(d / 2) / (math.sqrt(math.pi) * gamma((d + 1) / 2))
    assert expected_max_abs_cos(d, 1) == pytest.approx(exact, rel=1e-9)


@pytest.mark.parametrize("d,n", [(2, 5), (16, 30), (48, 100)])
def test_random_baseline_agrees_with_numpy_simulation(d, n):
    rng = np.random.default_rng(d + n)
    trials = 3000
    u = unit(rng.standard_normal((trials, 1, d)))
    v = unit(rng.standard_normal((trials, n, d)))
    mx = np.abs(np.sum(u * v, axis=-1)).max(axis=1)
    se = mx.std() / math.sqrt(trials)
    assert abs(expected_max_abs_cos(d, n) - mx.mean()) < 4 * se


@pytest.mark.parametrize("d,n_a,n_b", [(32, 500, 500), (128, 1024, 1024), (64, 300, 900)])
def test_random_dictionaries_pwmcc_matches_random_baseline(d, n_a, n_b):
    mean, se = simulate_baseline(d, n_a, n_b, trials=6, key=d)
    exact = random_baseline(d, n_a, n_b)
    assert abs(mean - exact) < 5 * se + 1e-4
    single = pwmcc(random_dictionaries((n_a, d), key=1), random_dictionaries((n_b, d), key=2))
    assert abs(single - exact) < 0.01
    if (d, n_a) == (128, 1024):
        assert exact == pytest.approx(0.30, abs=0.002)  # the modular-arithmetic study's chance level


# --- report -----------------------------------------------------------------------------------

REQUIRED = ["pwmcc", "pwmcc_ci_low", "pwmcc_ci_high", "random_pwmcc", "pwmcc_ratio", "hungarian_mean",
            "hungarian_median", "frac_ge_0.5", "frac_ge_0.7", "frac_ge_0.9", "shared_fraction", "live_pwmcc",
            "live_hungarian_mean", "live_frac_ge_0.7", "activation_corr", "gt_mcc", "p_value_vs_random"]


def _walk_plain(x):
    if isinstance(x, dict):
        return all(isinstance(k, str) and _walk_plain(v) for k, v in x.items())
    if isinstance(x, list):
        return all(_walk_plain(v) for v in x)
    return x is None or type(x) in (bool, int, float, str)


def test_report_on_permuted_copies_and_json():
    rng = np.random.default_rng(16)
    s, n, d = 4, 120, 24
    base = rand(rng, n, d)
    dec = np.stack([base[rng.permutation(n)] for _ in range(s)])
    alive = np.ones((s, n), bool)
    alive[:, :10] = False
    r = stability_report(dec, dec, alive=alive, latents=rand(rng, s, 50, n), true_dictionary=base,
                         seeds=[11, 12, 13, 14], n_boot=200, key=0)
    sm = r.summary
    for key in REQUIRED:
        assert key in sm
    assert sm["pwmcc"] == pytest.approx(1.0, abs=1e-6) and sm["hungarian_mean"] == pytest.approx(1.0, abs=1e-6)
    assert sm["frac_ge_0.9"] == 1.0 and sm["shared_fraction"] == 1.0 and sm["gt_mcc"] == pytest.approx(1.0, abs=1e-6)
    assert sm["pwmcc_ci_low"] <= sm["pwmcc"] <= sm["pwmcc_ci_high"]
    assert sm["pwmcc_ratio"] == pytest.approx(sm["pwmcc"] / sm["random_pwmcc"])
    assert sm["random_pwmcc"] == pytest.approx(random_baseline(d, n, n), abs=0.02)
    assert sm["p_value_vs_random"] == pytest.approx(1 / math.comb(8, 4))  # exact test, most extreme labelling
    assert sm["all_optimal"] and sm["alive_fraction"] == pytest.approx(110 / 120)
    assert r.matrices["pwmcc"].shape == (4, 4) and len(r.pairs) == 6
    assert r.pairs[0]["seed_a"] == 11 and r.examples["best"][0]["abs_cos"] == pytest.approx(1.0, abs=1e-6)
    data = r.to_dict()
    assert _walk_plain(data)
    assert json.loads(r.to_json())["summary"]["pwmcc"] == pytest.approx(sm["pwmcc"])


def test_report_without_optional_inputs_has_none_entries():
    rng = np.random.default_rng(17)
    r = stability_report(rand(rng, 3, 40, 8), random_control=False, n_boot=100)
    sm = r.summary
    for key in ("shared_fraction", "live_pwmcc", "activation_corr", "gt_mcc", "p_value_vs_random"):
        assert sm[key] is None
    assert sm["random_pwmcc"] == pytest.approx(random_baseline(8, 40, 40))
    assert 0.9 < sm["pwmcc_ratio"] < 1.1  # random "trained" dictionaries sit at chance
    assert _walk_plain(r.to_dict())


# --- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("call,fragment", [
    (lambda r: pwmcc(rand(r, 5, 8), rand(r, 5, 9)), "d_in=8"),
    (lambda r: match(np.zeros((0, 8), np.float32), rand(r, 5, 8)), "empty"),
    (lambda r: pair_stats(np.where(np.arange(8) == 3, np.nan, rand(r, 6, 8)), rand(r, 5, 8)), "NaN"),
    (lambda r: stability_report(rand(r, 1, 10, 8)), "at least 2 seeds"),
    (lambda r: stability_report(rand(r, 10, 8)), "stacked"),
    (lambda r: stability_report(rand(r, 2, 10, 8), rand(r, 2, 10, 9)), "encoders"),
    (lambda r: all_pairs(rand(r, 3, 10, 8), alive=np.ones((3, 9), bool)), "alive"),
    (lambda r: match(rand(r, 5, 8), rand(r, 5, 8), method="greedy"), "method"),
    (lambda r: pair_stats(rand(r, 5, 8), rand(r, 5, 8), top_k=0), "top_k"),
])
def test_bad_input_raises_one_line_config_error(call, fragment):
    with pytest.raises(ConfigError) as err:
        call(np.random.default_rng(0))
    msg = str(err.value)
    assert fragment in msg and "\n" not in msg


def test_report_keeps_each_pairs_matching():
    """The report's matched |cos| per pair equal a separate matching of that pair."""
    from saejax import stability

    d = np.random.default_rng(5).standard_normal((3, 20, 8)).astype(np.float32)
    rep = stability.stability_report(d, random_control=False, n_boot=50, n_perm=50)
    pairs = [(0, 1), (0, 2), (1, 2)]
    assert len(rep.matched) == 3 and "matched" not in rep.to_dict()
    for (i, j), got in zip(pairs, rep.matched):
        np.testing.assert_allclose(got, stability.match(d[i], d[j]).abs_cos, atol=1e-6)
