"""Consensus over N seeds: planted structure recovered exactly, counts = brute-force Hungarian."""

import itertools
import json

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from saejax.errors import ConfigError
from saejax.io import load_saelens
from saejax.stability import consensus, random_dictionaries
from saejax.stability.consensus import ConsensusReport, export_consensus


def unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def planted(seed=0, s=6, n_all=10, n_filler=8, d=64, noise=0.01):
    """Seed ``i`` holds: ``n_all`` shared features, the 3-seed features ``f_j`` with ``i in {j, j+1, j+2}
    mod s``, and ``3 + n_filler`` directions of its own; rows permuted and sign-flipped, plus noise.
    Returns the stack and the planted groups as a set of frozensets of ``(seed, latent)``."""
    rng = np.random.default_rng(seed)
    pool = unit(rng.standard_normal((n_all + s, d)))
    rows, truth = [], {}
    for i in range(s):
        feats = list(range(n_all)) + [n_all + j for j in range(s) if (i - j) % s < 3]
        own = unit(rng.standard_normal((3 + n_filler, d)))
        x = np.concatenate([pool[feats], own])
        perm = rng.permutation(len(x))
        signs = rng.choice([-1.0, 1.0], size=(len(x), 1))
        rows.append((x * signs + noise * rng.standard_normal(x.shape))[perm])
        where = np.argsort(perm)  # latent of row r after permutation
        for r, f in enumerate(feats):
            truth.setdefault(f, set()).add((i, int(where[r])))
    return np.stack(rows).astype(np.float32), pool, {frozenset(v) for v in truth.values()}


def group_sets(groups):
    return {frozenset(groups.group(g).items()) for g in range(len(groups.members))}


@pytest.fixture(scope="module")
def planted_report():
    dec, pool, truth = planted()
    return dec, pool, truth, consensus(dec, thresholds=(0.7, 0.9), random_control=False, n_subsample=30)


def test_planted_histogram_and_groups(planted_report):
    dec, pool, truth, rep = planted_report
    s, n, _ = dec.shape
    expected = np.zeros(s, int)
    expected[s - 1], expected[2], expected[0] = 10 * s, 3 * s, (n - 13) * s
    for i, t in enumerate(rep.thresholds):
        np.testing.assert_array_equal(rep.histogram[i], expected)
        np.testing.assert_allclose(rep.histogram_frac[i].sum(), 1.0)
        g = rep.groups[i]
        assert group_sets(g) == truth
        assert g.inconsistent == 0 and (g.min_abs_cos >= t).all() and (g.min_abs_cos <= g.mean_abs_cos + 1e-12).all()
        assert sum(o.size for o in g.orphans) == (n - 13) * s
        assert sorted(np.bincount(g.n_seeds).nonzero()[0]) == [3, s]
        # mean directions are the planted features up to sign
        assert (np.abs(g.directions @ pool.T).max(axis=1) > 0.99).all()
        np.testing.assert_allclose(np.linalg.norm(g.directions, axis=1), 1.0, atol=1e-5)
        assert rep.dictionaries[i].shape == (10, dec.shape[2])
        assert rep.summary[f"consensus_frac_all_{t:g}"] == pytest.approx(10 / n)
        assert rep.summary[f"consensus_groups_{t:g}"] == 10 and rep.summary[f"groups_{t:g}"] == 10 + s


def test_reference_choice_does_not_change_groups(planted_report):
    dec, _, truth, rep = planted_report
    last = consensus(dec, thresholds=(0.7, 0.9), reference=dec.shape[0] - 1, random_control=False, n_subsample=30)
    for a, b in zip(rep.groups, last.groups):
        assert len(a.members) == len(b.members)
        assert group_sets(a) == group_sets(b) == truth


def test_copies_give_one_group_per_latent():
    rng = np.random.default_rng(1)
    base = rng.standard_normal((20, 16)).astype(np.float32)
    s = 5
    dec = np.stack([base[rng.permutation(20)] * rng.choice([-1, 1], size=(20, 1)).astype(np.float32) for _ in range(s)])
    rep = consensus(dec, thresholds=(0.5, 0.9, 1.0), random_control=False)
    for i in range(3):
        g = rep.groups[i]
        assert len(g.members) == 20 and (g.n_seeds == s).all() and np.allclose(g.min_abs_cos, 1.0)
        assert rep.histogram[i, -1] == 20 * s and rep.summary[f"consensus_frac_all_{rep.thresholds[i]:g}"] == 1.0
        assert all(o.size == 0 for o in g.orphans)
    np.testing.assert_allclose(np.abs(rep.dictionary(0.9) @ unit(base).T).max(axis=1), 1.0, atol=1e-5)
    assert rep.seed_curve["frac_all"]["0.9"]["mean"] == [1.0] * (s - 1)


def test_random_dictionaries_are_orphans():
    dec = random_dictionaries((4, 32, 64), key=3)
    rep = consensus(dec, thresholds=(0.7,), random_control=False)
    assert len(rep.groups[0].members) == 0 and rep.dictionary().shape == (0, 64)
    assert rep.histogram[0, 0] == 4 * 32 and rep.summary["orphan_frac_0.7"] == 1.0


def brute_force_found_in(dec, tau):
    """1 + number of other seeds in which each latent's Hungarian partner (|cos|, float64) has |cos| >= tau."""
    s, n, _ = dec.shape
    u = unit(dec)
    found = np.ones((s, n), int)
    for i, j in itertools.combinations(range(s), 2):
        c = np.abs(u[i] @ u[j].T)
        r, k = linear_sum_assignment(c, maximize=True)
        hit = c[r, k] >= tau
        found[i, r[hit]] += 1
        found[j, k[hit]] += 1
    return found


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_counts_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    s, n, d = 5, 24, 8
    base = rng.standard_normal((n, d))
    noise = rng.uniform(0.0, 1.2, size=(s, n, 1))  # |cos| to the shared row spread over (0, 1)
    dec = np.stack([(base + noise[i] * rng.standard_normal((n, d)))[rng.permutation(n)] for i in range(s)]).astype(np.float32)
    taus = (0.5, 0.7, 0.9)
    rep = consensus(dec, thresholds=taus, random_control=False, method="sparse" if seed == 3 else "auto", top_k=4)
    for i, t in enumerate(taus):
        found = brute_force_found_in(dec, t)
        np.testing.assert_array_equal(rep.found_in[i], found)
        np.testing.assert_array_equal(rep.histogram[i], np.bincount(found.ravel() - 1, minlength=s))
        g = rep.groups[i]
        for row in g.members:  # every group is pairwise matched at tau
            seeds = np.flatnonzero(row >= 0)
            assert all(found[a, row[a]] >= len(seeds) for a in seeds)
        assert (g.min_abs_cos >= t - 1e-6).all()
    # the curve at n = 2 enumerates all pairs: the mean fraction of matched latents at tau
    u = unit(dec)
    pair_frac = [np.mean(np.abs(u[a] @ u[b].T)[linear_sum_assignment(np.abs(u[a] @ u[b].T), maximize=True)] >= 0.7)
                 for a, b in itertools.combinations(range(s), 2)]
    assert rep.seed_curve["exhaustive"][0] and rep.seed_curve["frac_all"]["0.7"]["mean"][0] == pytest.approx(np.mean(pair_frac))
    assert rep.seed_curve["frac_all"]["0.7"]["mean"][-1] == pytest.approx(rep.summary["consensus_frac_all_0.7"])


def test_random_control_and_json(planted_report):
    dec = planted_report[0]
    rep = consensus(dec, thresholds=(0.5, 0.7), random_control=None, key=1, n_subsample=5)
    assert isinstance(rep, ConsensusReport) and isinstance(rep.random, ConsensusReport)
    assert rep.summary["random_consensus_frac_all_0.7"] == 0.0 and rep.summary["random_consensus_groups_0.7"] == 0.0
    assert rep.summary["n_random"] == dec.shape[0] and rep.random.histogram.shape == (2, dec.shape[0])
    assert rep.seed_curve["n_subsets"] == [5] * (dec.shape[0] - 2) + [1] and rep.seed_curve["exhaustive"][-1]
    lo, mean, hi = (rep.seed_curve["pwmcc"][k][0] for k in ("low", "mean", "high"))
    assert lo <= mean <= hi
    assert all(isinstance(v, float) for v in rep.summary.values())
    text = json.dumps(rep.to_dict(directions=True), allow_nan=False)
    assert json.loads(text)["random"]["summary"]["consensus_groups_0.7"] == 0.0
    own = consensus(dec, thresholds=(0.7,), random_control=random_dictionaries((3,) + dec.shape[1:], key=2))
    assert own.summary["n_random"] == 3.0 and own.random.min_seeds == 3


def test_export_round_trip(planted_report, tmp_path):
    dec, _, _, rep = planted_report
    export_consensus(rep, tmp_path / "sae", dec.shape[2], threshold=0.9)
    cfg, params = load_saelens(tmp_path / "sae")
    assert cfg.arch == "relu" and cfg.d_sae == 10 and cfg.d_in == dec.shape[2]
    np.testing.assert_allclose(params["W_dec"], rep.dictionary(0.9), atol=1e-7)
    np.testing.assert_allclose(params["W_enc"], rep.dictionary(0.9).T, atol=1e-7)
    empty = consensus(random_dictionaries((2, 8, 64)), thresholds=(0.9,), random_control=False)
    with pytest.raises(ConfigError, match="nothing to export"):
        export_consensus(empty, tmp_path / "none", 64)
    with pytest.raises(ConfigError, match="d_in"):
        export_consensus(rep, tmp_path / "bad", 3)


def test_encoders_restrict_matches():
    dec, _, _ = planted(n_all=4, n_filler=2)
    enc = random_dictionaries(dec.shape, key=5)  # encoders that agree nowhere: nothing is shared
    rep = consensus(dec, enc, thresholds=(0.7,), random_control=False)
    assert rep.summary["consensus_frac_all_0.7"] == 0.0 and len(rep.groups[0].members) == 0
    assert consensus(dec, dec, thresholds=(0.7,), random_control=False).summary["consensus_groups_0.7"] == 4


@pytest.mark.parametrize("kwargs, message", [
    (dict(decoders=np.zeros((1, 4, 3))), "between 2 and 64 seeds"),
    (dict(decoders=np.ones((4, 3))), "stacked"),
    (dict(thresholds=(0.0,)), r"\(0, 1\]"),
    (dict(thresholds=(1.5,)), r"\(0, 1\]"),
    (dict(thresholds="x"), r"\(0, 1\]"),
    (dict(reference=3), "reference"),
    (dict(min_seeds=1), "min_seeds"),
    (dict(encoders=np.ones((3, 5, 3))), "encoders"),
    (dict(random_control=np.ones((2, 5, 3))), "random_control"),
    (dict(n_subsample=0), "n_subsample"),
])
def test_bad_input(kwargs, message):
    args = dict(decoders=np.random.default_rng(0).standard_normal((3, 4, 3)), random_control=False)
    args.update(kwargs)
    with pytest.raises(ConfigError, match=message) as err:
        consensus(args.pop("decoders"), **args)
    assert "\n" not in str(err.value)


def test_consensus_runs_as_a_runner_analysis(tmp_path, monkeypatch):
    import json
    from pathlib import Path

    from saejax.run import main

    monkeypatch.chdir(Path(__file__).parent.parent)
    out = tmp_path / "out"
    assert main(["experiments/smoke.py", "--out", str(out), "--no-progress", "--set", "archs=topk", "--set", "steps=60,",
                 "--set", "analyses=stability,consensus", "--cache-dir", str(tmp_path / "cache")]) == 0
    cell = json.loads((out / "summary.json").read_text())["cells"][0]
    assert 0 <= cell["consensus_frac_all_0.7"] <= 1 and "consensus_random_frac_all_0.7" in cell
    full = json.loads((out / "cells" / cell["cell"] / "consensus.json").read_text())
    assert full["summary"]["consensus_frac_all_0.7"] == cell["consensus_frac_all_0.7"]
    assert (out / "figures" / "consensus_hist.png").stat().st_size > 0
    assert "figures/consensus_hist.png" in (out / "report.md").read_text()
