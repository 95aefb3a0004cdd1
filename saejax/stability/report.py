"""``stability_report``: every stability metric for N seeds, with seed-level statistics."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from saejax.errors import check
from saejax.io import to_jsonable as _plain
from saejax.stability.baseline import analytic_p_value, random_baseline, random_dictionaries
from saejax.stability.kernel import PairStats, all_pairs, check_dictionary, check_mask, check_stack
from saejax.stability.matching import Matching, match
from saejax.stability.metrics import (
    CURVE,
    THRESHOLDS,
    activation_corr,
    effective_rank,
    gt_mcc,
    matching_metrics,
    pwmcc_from_stats,
    shared_from_matching,
)
from saejax.stability.stats import bootstrap_ci, bootstrap_median_ci, cohens_d, permutation_test, seed_scores

MATRIX_KEYS = ("pwmcc", "hungarian_mean", "hungarian_median", *(f"frac_ge_{t}" for t in THRESHOLDS), "signed_mean")


@dataclass
class StabilityReport:
    """Result of :func:`stability_report`.

    ``summary``: flat dict of floats (keys documented in :func:`stability_report`).
    ``matrices``: ``[S, S]`` pairwise matrices (diagonal NaN) for heatmaps, keyed like the summary.
    ``pairs``: one dict per seed pair ``i < j`` with every per-pair value.
    ``curve``: ``{"thresholds": [...], "fraction": [...], "live_fraction": [...]}`` averaged over pairs.
    ``examples``: ``best``/``borderline``/``worst`` matched latent pairs across all seed pairs.
    """

    seeds: list
    summary: dict
    matrices: dict = field(default_factory=dict)
    pairs: list = field(default_factory=list)
    curve: dict = field(default_factory=dict)
    examples: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    matched: list = field(default_factory=list, repr=False)
    """Each seed pair's Hungarian-matched |cos| (pairs ``i < j`` in order); not in :meth:`to_dict`."""

    def to_dict(self) -> dict:
        """Plain JSON-ready Python: lists, floats, ints, bools, str and None (NaN -> None)."""
        return _plain({"seeds": self.seeds, "summary": self.summary, "matrices": self.matrices,
                       "pairs": self.pairs, "curve": self.curve, "examples": self.examples, "config": self.config})

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), allow_nan=False, **kwargs)


def stability_report(decoders, encoders=None, *, alive=None, latents=None, true_dictionary=None,
                     activations=None, seeds=None, random_control=None, n_random: int | None = None,
                     top_k: int = 32, method: str = "auto", dense_max: int = 2048, shared_threshold: float = 0.7,
                     n_boot: int = 2000, n_perm: int = 2000, level: float = 0.95, n_examples: int = 3,
                     pair_block: int = 8, key=0, mesh=None) -> StabilityReport:
    """Cross-seed stability of ``S >= 2`` SAEs: decoders ``[S, d_sae, d_in]`` (rows of ``W_dec``).

    Optional inputs: ``encoders`` ``[S, d_sae, d_in]`` (``W_enc.T``), ``alive`` ``[S, d_sae]`` bool
    (fired on held-out data), ``latents`` ``[S, n_tokens, d_sae]`` held-out latent activations,
    ``true_dictionary`` ``[n_features, d_in]``, ``activations`` ``[n, d_in]`` held-out inputs,
    ``seeds`` (labels), ``random_control``: ``None`` draws ``n_random`` (default ``min(S, 4)``,
    at least 2) isotropic random dictionaries of the same shape, an array ``[R, d_sae, d_in]``
    uses those (e.g. untrained SAE decoders), ``False`` skips the empirical control; ``mesh``: a
    1-D device mesh (:func:`~saejax.stability.kernel.pair_mesh`) over which seed pairs are sharded.

    Per seed pair: decoder PWMCC (:func:`~saejax.stability.pwmcc`) and a Hungarian matching
    (:func:`~saejax.stability.match`, ``top_k`` candidates) with :func:`matching_metrics`.
    Summary values are means over the ``S(S-1)/2`` pairs; CIs resample *seeds*
    (:func:`~saejax.stability.stats.bootstrap_ci`). Summary keys (float, or None when the input
    they need was not given):

    - ``pwmcc``, ``pwmcc_ci_low``, ``pwmcc_ci_high``: decoder PWMCC (study 000) and its CI.
    - ``pwmcc_encoder``: the same on encoder rows.
    - ``random_pwmcc``: mean PWMCC between random-control dictionaries (empirical; the closed form
      when ``random_control=False``); ``random_pwmcc_analytic``: :func:`random_baseline`;
      ``pwmcc_ratio = pwmcc / random_pwmcc``; ``random_hungarian_mean``: the control's matched mean.
    - ``hungarian_mean``, ``hungarian_median`` (each + ``_ci_low/_ci_high``): mean and median matched
      |cos| (median over all matched latents of all pairs); ``signed_mean``: mean signed cosine of
      the matched pairs (Song et al.'s PW-MCC uses signed cosines).
    - ``frac_ge_0.5``, ``frac_ge_0.7``, ``frac_ge_0.9`` (+ CIs): fraction of matched latents at or
      above each |cos| threshold; the full curve is in ``report.curve``.
    - ``shared_fraction``: Paulo & Belrose's shared latents (decoder and encoder matched |cos|
      > ``shared_threshold``).
    - ``live_*``: ``live_pwmcc``, ``live_hungarian_mean``, ``live_hungarian_median``,
      ``live_frac_ge_*``, ``live_shared_fraction`` (each + ``_ci_low/_ci_high``), computed on latents alive in both SAEs;
      ``alive_fraction``: mean fraction of live latents.
    - ``activation_corr``: mean Pearson r of decoder-matched latents' held-out activations (pairs
      where either latent is constant are left out).
    - ``gt_mcc``, ``gt_mmcs``: mean over seeds of ground-truth recovery (:func:`gt_mcc`).
    - ``effective_rank_pr``, ``effective_rank_entropy``: of ``activations``.
    - ``p_value_vs_random``: permutation test (seeds relabelled) that trained pairs agree more
      than random-control pairs on PWMCC; ``cohens_d_vs_random``: per-seed mean PWMCC, trained
      vs control.
    - ``all_optimal`` (bool), ``max_gap_bound``: whether every matching was proven optimal.
    - ``n_seeds``, ``n_latents``, ``d_in``, ``n_random``.
    """
    dec, enc, live, latents, truth, seeds = _checked_inputs(decoders, encoders, alive, latents, true_dictionary, seeds)
    opts = dict(top_k=top_k, method=method, dense_max=dense_max)
    pairs_fn = partial(all_pairs, mesh=mesh)
    res, live_res = _pair_results(dec, enc, live, latents, shared_threshold, pair_block, opts, n_examples, pairs_fn)
    summary, matrices = _matched_summary(res, n_boot, level, key)
    for part, mats in (_encoder_summary(enc, res, pair_block), _live_summary(live, live_res, enc is not None, n_boot, level, key),
                       _input_summary(res, latents, dec, truth, activations, opts)):
        summary.update(part)
        matrices.update(mats)
    summary.update(_random_control(dec, matrices["pwmcc"], random_control, n_random, n_perm, key, opts, pair_block, pairs_fn))
    summary.update(_closing_summary(summary, res, dec.shape))
    pairs, examples = _labelled(res, live_res, seeds)
    config = dict(opts, shared_threshold=shared_threshold, n_boot=n_boot, n_perm=n_perm, level=level, thresholds=list(THRESHOLDS))
    return StabilityReport(seeds, summary, matrices, pairs, _curve(res, live_res), examples, config, res["matched"])


def _checked_inputs(decoders, encoders, alive, latents, true_dictionary, seeds) -> tuple:
    """Validated :func:`stability_report` inputs: ``(dec, enc, live, latents, truth, seeds)``."""
    dec = check_stack(decoders, "decoders")
    s, n, d = dec.shape
    check(s >= 2, f"a multi-seed report needs at least 2 seeds, got {s}")
    enc = None
    if encoders is not None:
        enc = check_stack(encoders, "encoders")
        check(enc.shape == dec.shape, f"encoders must have the decoders' shape {dec.shape}, got {enc.shape}")
    live = None if alive is None else check_mask(alive, (s, n), "alive")
    if latents is not None:
        latents = np.asarray(latents)
        check(latents.ndim == 3 and latents.shape[0] == s and latents.shape[2] == n,
              f"latents must be [seeds={s}, tokens, d_sae={n}], got shape {latents.shape}")
    truth = None if true_dictionary is None else check_dictionary(true_dictionary, "true_dictionary")
    check(truth is None or truth.shape[1] == d, f"true_dictionary has d_in={truth.shape[1] if truth is not None else 0}, expected {d}")
    seeds = list(range(s)) if seeds is None else list(seeds)
    check(len(seeds) == s, f"seeds has {len(seeds)} labels for {s} seeds")
    return dec, enc, live, latents, truth, seeds


def _pair_results(dec, enc, live, latents, shared_threshold, pair_block, opts, n_examples, pairs_fn) -> tuple[dict, dict | None]:
    """:func:`_pairs` on all latents, and (given ``live``) on the latents alive in both SAEs of each pair."""
    res = _pairs(dec, enc, None, latents, shared_threshold, pair_block, opts, n_examples, pairs_fn)
    live_res = _pairs(dec, enc, live, None, shared_threshold, pair_block, opts, 0, pairs_fn) if live is not None else None
    return res, live_res


def _matched_summary(res: dict, n_boot: int, level: float, key) -> tuple[dict, dict]:
    """``(summary, matrices)`` of the decoder pairs: the mean over pairs of every :data:`MATRIX_KEYS`
    value, the median matched |cos| over all matched latents, and seed-bootstrap CIs."""
    summary: dict = {}
    matrices: dict = {}
    for name in MATRIX_KEYS:
        matrices[name] = res["matrix"][name]
        summary[name] = float(np.mean(res["values"][name]))
    summary["hungarian_median"], summary["hungarian_median_ci_low"], summary["hungarian_median_ci_high"] = \
        bootstrap_median_ci(res["matched"], res["matched_pairs"], len(matrices["pwmcc"]), n_boot=n_boot, level=level, key=key)
    for name in ("pwmcc", "hungarian_mean", *(f"frac_ge_{t}" for t in THRESHOLDS)):
        _, summary[f"{name}_ci_low"], summary[f"{name}_ci_high"] = bootstrap_ci(matrices[name], n_boot=n_boot, level=level, key=key)
    return summary, matrices


def _encoder_summary(enc, res: dict, pair_block: int) -> tuple[dict, dict]:
    """``pwmcc_encoder`` and ``shared_fraction`` (None without encoders), and their matrices."""
    if enc is None:
        return {"pwmcc_encoder": None, "shared_fraction": None}, {}
    pwmcc_encoder = _pwmcc_matrix(enc, None, pair_block)
    summary = {"pwmcc_encoder": float(np.mean(pwmcc_encoder[np.triu_indices(enc.shape[0], 1)])),
               "shared_fraction": float(np.mean(res["values"]["shared_fraction"]))}
    return summary, {"pwmcc_encoder": pwmcc_encoder, "shared_fraction": res["matrix"]["shared_fraction"]}


_LIVE_KEYS = ("pwmcc", "hungarian_mean", "hungarian_median", *(f"frac_ge_{t}" for t in THRESHOLDS), "shared_fraction")
"""Summary values recomputed on the latents alive in both SAEs of a pair (as ``live_<name>``)."""


def _live_summary(live, live_res: dict | None, has_encoders: bool, n_boot: int, level: float, key) -> tuple[dict, dict]:
    """The ``live_*`` values with their seed-bootstrap CIs, and ``alive_fraction``; None without
    ``alive``, and a CI is None where a pair is undefined (a seed with no live latent);
    ``live_shared_fraction`` needs encoders too."""
    summary: dict[str, float | None] = {f"live_{name}{end}": None for name in _LIVE_KEYS for end in ("", "_ci_low", "_ci_high")}
    summary["alive_fraction"] = None
    matrices: dict = {}
    if live is None or live_res is None:
        return summary, matrices
    for name in _LIVE_KEYS[:-1] + (("shared_fraction",) if has_encoders else ()):
        matrices[f"live_{name}"] = live_res["matrix"][name]
        summary[f"live_{name}"] = _nanmean(live_res["values"][name])
        if name != "hungarian_median" and np.isfinite(live_res["values"][name]).all():
            _, summary[f"live_{name}_ci_low"], summary[f"live_{name}_ci_high"] = bootstrap_ci(
                matrices[f"live_{name}"], n_boot=n_boot, level=level, key=key)
    summary["live_hungarian_median"] = None
    if live_res["matched"]:
        median = bootstrap_median_ci(live_res["matched"], live_res["matched_pairs"], live.shape[0], n_boot=n_boot,
                                     level=level, key=key)
        summary["live_hungarian_median"] = median[0]
        if len(live_res["matched"]) == len(live_res["pairs"]):
            summary["live_hungarian_median_ci_low"], summary["live_hungarian_median_ci_high"] = median[1:]
    summary["alive_fraction"] = float(live.mean())
    return summary, matrices


def _input_summary(res: dict, latents, dec, truth, activations, opts: dict) -> tuple[dict, dict]:
    """The values that need an optional input, None without it: ``activation_corr`` (``latents``,
    with its matrix), ``gt_mcc``/``gt_mmcs`` (``truth``) and the effective rank (``activations``)."""
    summary: dict = {"activation_corr": _nanmean(res["values"]["activation_corr"]) if latents is not None else None}
    matrices = {"activation_corr": res["matrix"]["activation_corr"]} if latents is not None else {}
    summary["gt_mcc"] = summary["gt_mmcs"] = None
    if truth is not None:
        per_seed = [gt_mcc(dec[i], truth, **opts) for i in range(dec.shape[0])]
        summary["gt_mcc"] = float(np.mean([g["gt_mcc"] for g in per_seed]))
        summary["gt_mmcs"] = float(np.mean([g["mmcs"] for g in per_seed]))
    summary["effective_rank_pr"] = summary["effective_rank_entropy"] = None
    if activations is not None:
        er = effective_rank(activations)
        summary["effective_rank_pr"], summary["effective_rank_entropy"] = er["participation_ratio"], er["entropy_rank"]
    return summary, matrices


def _closing_summary(summary: dict, res: dict, shape: tuple[int, int, int]) -> dict:
    """``pwmcc_ratio`` (needs the control's ``random_pwmcc``), the matchings' optimality and the sizes."""
    s, n, d = shape
    return {"pwmcc_ratio": summary["pwmcc"] / summary["random_pwmcc"],
            "all_optimal": bool(all(p["optimal"] for p in res["pairs"])),
            "max_gap_bound": float(max(p["gap_bound"] for p in res["pairs"])), "n_seeds": s, "n_latents": n, "d_in": d}


def _curve(res: dict, live_res: dict | None) -> dict:
    """The fraction of matched latents at or above each |cos| of :data:`CURVE`, averaged over pairs."""
    curve = {"thresholds": CURVE.tolist(), "fraction": np.mean(res["curves"], axis=0).tolist()}
    if live_res is not None:
        curve["live_fraction"] = np.nanmean(live_res["curves"], axis=0).tolist()
    return curve


def _labelled(res: dict, live_res: dict | None, seeds: list) -> tuple[list, dict]:
    """The per-pair dicts (with their ``live_*`` values) and the examples, seed indices replaced by ``seeds``."""
    pairs = res["pairs"]
    if live_res is not None:
        for p, lp in zip(pairs, live_res["pairs"]):
            p.update({f"live_{k}": v for k, v in lp.items() if k not in ("seed_a", "seed_b")})
    for p in pairs:
        p["seed_a"], p["seed_b"] = seeds[p["seed_a"]], seeds[p["seed_b"]]
    examples = {k: [{**e, "seed_a": seeds[e["seed_a"]], "seed_b": seeds[e["seed_b"]]} for e in v]
                for k, v in res["examples"].items()}
    return pairs, examples


def _nanmean(x) -> float | None:
    x = np.asarray(x, np.float64)
    return float(np.nanmean(x)) if np.isfinite(x).any() else None


def _blocks(pairs: np.ndarray, size: int):
    """Blocks of ``size`` pairs, the last one padded by repeating a pair (one compiled shape)."""
    size = max(1, min(int(size), len(pairs)))
    for start in range(0, len(pairs), size):
        block = pairs[start:start + size]
        yield np.concatenate([block, np.repeat(block[:1], size - len(block), axis=0)]), len(block)


def _slice(stats: PairStats, p: int) -> PairStats:
    return PairStats(*(np.asarray(f[p]) for f in stats))


def _pwmcc_matrix(dicts, alive, pair_block, pairs=None, pairs_fn=all_pairs) -> np.ndarray:
    s = dicts.shape[0]
    pairs = np.stack(np.triu_indices(s, 1), axis=1) if pairs is None else pairs
    out = np.full((s, s), np.nan)
    for block, valid in _blocks(pairs, 4 * pair_block):
        st = pairs_fn(dicts, top_k=1, pairs=block, alive=alive).stats
        for p, (i, j) in enumerate(block[:valid]):
            ok_i = None if alive is None else alive[i]
            ok_j = None if alive is None else alive[j]
            out[i, j] = out[j, i] = pwmcc_from_stats(_slice(st, p), ok_i, ok_j)
    return out


def _pairs(dec, enc, live, latents, shared_threshold, pair_block, opts, n_examples, pairs_fn=all_pairs) -> dict:
    """Kernel + matching for every seed pair, block by block (bounded memory)."""
    s, n, _ = dec.shape
    pairs = np.stack(np.triu_indices(s, 1), axis=1)
    dense = opts["method"] == "dense" or (opts["method"] == "auto" and n <= opts["dense_max"])
    k = 1 if dense else opts["top_k"]
    names = MATRIX_KEYS + ("shared_fraction", "activation_corr")
    matrix = {name: np.full((s, s), np.nan) for name in names}
    out = {"pairs": [], "matched": [], "matched_pairs": [], "curves": [], "matrix": matrix,
           "values": {name: [] for name in names}}
    candidates = []
    for block, valid in _blocks(pairs, pair_block):
        st = pairs_fn(dec, top_k=k, pairs=block, alive=live).stats
        for p, (i, j) in enumerate(block[:valid]):
            ok_i, ok_j = (None, None) if live is None else (live[i], live[j])
            one = _slice(st, p)
            row = {"seed_a": int(i), "seed_b": int(j), "pwmcc": pwmcc_from_stats(one, ok_i, ok_j)}
            if (ok_i is not None and not ok_i.any()) or (ok_j is not None and not ok_j.any()):
                m = None  # a seed with no live latent: live metrics are undefined for its pairs
                mm = matching_metrics(_empty_matching(n))
            else:
                m = match(dec[i], dec[j], alive_a=ok_i, alive_b=ok_j, stats=None if dense else one, **opts)
                mm = matching_metrics(m)
            out["curves"].append(mm.pop("curve"))
            row.update(mm)
            row["shared_fraction"] = shared_from_matching(m, enc[i], enc[j], shared_threshold) if enc is not None and m else float("nan")
            row["activation_corr"] = float("nan")
            if latents is not None and m is not None:
                r = activation_corr(latents[i], latents[j], m)
                row["activation_corr"] = float(np.nanmean(r)) if np.isfinite(r).any() else float("nan")
            for name in names:
                matrix[name][i, j] = matrix[name][j, i] = row[name]
                out["values"][name].append(row[name])
            if m is not None:
                out["matched"].append(m.abs_cos)
                out["matched_pairs"].append((int(i), int(j)))
                if n_examples:
                    candidates.extend(_example_candidates(m, i, j, n_examples, shared_threshold))
            out["pairs"].append(row)
    out["examples"] = _pick_examples(candidates, n_examples, shared_threshold)
    return out


def _empty_matching(n):
    z = np.zeros(0)
    return Matching(z.astype(int), z.astype(int), z, z, 0.0, 0.0, True, "none", None, n, n)


def _example_candidates(m, i, j, n_ex, thr):
    c = m.abs_cos
    order = np.argsort(c)
    pick = set(order[:n_ex].tolist()) | set(order[-n_ex:].tolist()) | set(np.argsort(np.abs(c - thr))[:n_ex].tolist())
    return [{"seed_a": int(i), "seed_b": int(j), "latent_a": int(m.rows[q]), "latent_b": int(m.cols[q]),
             "abs_cos": float(c[q]), "cos": float(m.cos[q])} for q in sorted(pick)]


def _pick_examples(cands, n_ex, thr) -> dict:
    if not cands:
        return {"best": [], "borderline": [], "worst": []}
    by = sorted(cands, key=lambda e: e["abs_cos"])
    return {"best": by[::-1][:n_ex], "borderline": sorted(cands, key=lambda e: abs(e["abs_cos"] - thr))[:n_ex],
            "worst": by[:n_ex]}


def _random_control(dec, trained, random_control, n_random, n_perm, key, opts, pair_block, pairs_fn=all_pairs) -> dict:
    s, n, d = dec.shape
    pw = float(np.mean(np.asarray(trained)[np.triu_indices(s, 1)]))
    out = {"random_pwmcc_analytic": random_baseline(d, n, n), "random_pwmcc": None, "random_hungarian_mean": None,
           "p_value_vs_random": None, "p_value_resolution": None, "p_value_analytic": analytic_p_value(pw, d, n),
           "cohens_d_vs_random": None, "n_random": 0}
    if random_control is False:
        out["random_pwmcc"] = out["random_pwmcc_analytic"]
        return out
    if random_control is None:
        r = max(2, min(s, 4) if n_random is None else int(n_random))
        rand = random_dictionaries((r, n, d), key=key)
    else:
        rand = check_stack(random_control, "random_control")
        check(rand.shape[1:] == dec.shape[1:], f"random_control must be [R, {n}, {d}] like the decoders, got {rand.shape}")
        check(rand.shape[0] >= 2, f"random_control needs at least 2 dictionaries, got {rand.shape[0]}")
    r = rand.shape[0]
    pooled = np.concatenate([dec, rand])
    full = np.full((s + r, s + r), np.nan)
    full[:s, :s] = trained
    todo = np.array([(i, j) for i in range(s + r) for j in range(i + 1, s + r) if j >= s], dtype=np.int32)
    full_new = _pwmcc_matrix(pooled, None, pair_block, pairs=todo, pairs_fn=pairs_fn)
    full[np.isnan(full)] = full_new[np.isnan(full)]
    rand_pw = full[s:, s:]
    rand_match = [matching_metrics(match(rand[i], rand[j], **opts))["hungarian_mean"] for i in range(r) for j in range(i + 1, r)]
    labels = np.arange(s + r) < s
    _, p = permutation_test(full, labels, n_perm=n_perm, key=key)
    out.update(random_pwmcc=float(np.mean(rand_pw[np.triu_indices(r, 1)])), random_hungarian_mean=float(np.mean(rand_match)),
               p_value_vs_random=p, p_value_resolution=1 / min(math.comb(s + r, s), 1 + n_perm), cohens_d_vs_random=cohens_d(seed_scores(trained), seed_scores(rand_pw)), n_random=r)
    return out
