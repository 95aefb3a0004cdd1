"""Consensus features over ``S`` seeds: which latents recur, as what groups, and at what chance level.

Every seed pair ``i < j`` is matched once (kernel + Hungarian :func:`~saejax.stability.match` on
|cos| of decoder rows); everything below is read from those ``S(S-1)/2`` matchings. Latent ``a`` of
seed ``s`` is *matched at tau* in seed ``t`` when the Hungarian partner ``b = pi_st(a)`` has
``|cos(d_sa, d_tb)| >= tau`` (with encoders also ``|cos(e_sa, e_tb)| >= tau``, Paulo & Belrose's
shared latents). Comparisons use a slack of ``COS_TOL`` so that ``tau = 1`` accepts exact copies.

- ``found_in[tau][s, a] = 1 + #{t != s: a matched at tau in t}``: "found in exactly k seeds"
  (k = 1: only its own), histogrammed over all ``S * d_sae`` latents (Paulo & Belrose 2025,
  arXiv:2501.16615, their curve over seeds).
- Groups: sets of latents, at most one per seed, *pairwise* matched at tau. Seeds are taken in
  turn as reference (``reference``, then the next ones cyclically); each free latent of the
  reference collects its free partners, and members inconsistent with each other are dropped
  greedily (most conflicts first, ties: lowest |cos| to the reference) until all pairs match.
  A latent in no group of >= 2 seeds is an *orphan*.
- Reference tolerance: when every connected component of the "matched at tau" graph is a clique
  with one latent per seed, the groups are exactly those components, whatever the reference.
  Only latents of the other components (``inconsistent_frac_<tau>`` of all latents) can be
  grouped differently by another reference.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from scipy.sparse import coo_array
from scipy.sparse.csgraph import connected_components

from saejax.config import SAEConfig
from saejax.errors import check
from saejax.io import save_saelens, to_jsonable
from saejax.stability.baseline import random_dictionaries
from saejax.stability.kernel import all_pairs, check_stack, normalize
from saejax.stability.matching import _signed_cos, match
from saejax.stability.metrics import pwmcc_from_stats
from saejax.stability.report import _blocks, _slice
from saejax.stability.stats import _rng

THRESHOLDS = (0.5, 0.7, 0.9)
COS_TOL = 1e-6
"""Slack on ``|cos| >= tau`` (float rounding), so that exact copies count at ``tau = 1``."""


@dataclass(frozen=True, eq=False)
class ConsensusGroups:
    """Groups at one threshold. ``members[g, s]``: latent of seed ``s`` in group ``g`` (-1: none);
    ``n_seeds[g]``: seeds spanned (>= 2); ``min_abs_cos``/``mean_abs_cos``: min and mean |cos| over
    the member pairs; ``directions[g]``: unit-norm mean of the members' unit decoder rows, each
    sign-aligned to the group's ``anchor`` member (the reference latent that formed it);
    ``orphans[s]``: latents of seed ``s`` in no group; ``inconsistent``: latents in components of
    the match graph that are not one-per-seed cliques (the reference-dependent part)."""

    threshold: float
    members: np.ndarray
    anchor: np.ndarray
    n_seeds: np.ndarray
    min_abs_cos: np.ndarray
    mean_abs_cos: np.ndarray
    directions: np.ndarray
    orphans: tuple
    inconsistent: int

    def group(self, g: int) -> dict:
        """``{seed: latent}`` of group ``g``."""
        return {int(s): int(a) for s, a in enumerate(self.members[g]) if a >= 0}

    def to_dict(self, directions: bool = False) -> dict:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if directions or k != "directions"}
        return {**out, "orphans": list(self.orphans)}


@dataclass(frozen=True, eq=False)
class ConsensusReport:
    """Result of :func:`consensus`. Arrays are indexed by threshold position ``i`` (``thresholds[i]``):
    ``found_in [T, S, d_sae]``; ``histogram [T, S]`` (column ``k-1``: latents found in exactly ``k``
    seeds) and ``histogram_frac`` (over ``S * d_sae``); ``groups`` and ``dictionaries`` (the
    directions of groups spanning >= ``min_seeds`` seeds, ``[n, d_in]``) per threshold;
    ``seed_curve``: stability against the number of seeds; ``pwmcc [S, S]`` (diagonal 1);
    ``summary``: flat floats (see :func:`consensus`); ``random``: the same report for the control."""

    thresholds: tuple
    found_in: np.ndarray
    histogram: np.ndarray
    histogram_frac: np.ndarray
    groups: tuple
    dictionaries: tuple
    min_seeds: int
    seed_curve: dict
    pwmcc: np.ndarray
    summary: dict
    random: ConsensusReport | None = None
    config: dict = field(default_factory=dict)

    def index(self, threshold=None) -> int:
        """Position of ``threshold`` (default: 0.7 if present, else the middle one)."""
        if threshold is None:
            return self.thresholds.index(0.7) if 0.7 in self.thresholds else len(self.thresholds) // 2
        hit = [i for i, t in enumerate(self.thresholds) if abs(t - float(threshold)) < 1e-9]
        check(bool(hit), f"threshold {threshold} is not in the report's thresholds {list(self.thresholds)}")
        return hit[0]

    def dictionary(self, threshold=None) -> np.ndarray:
        """The consensus dictionary ``[n, d_in]`` at ``threshold`` (see :meth:`index`)."""
        return self.dictionaries[self.index(threshold)]

    def to_dict(self, groups: bool = True, directions: bool = False) -> dict:
        """JSON-ready Python (``saejax.io.to_jsonable``); ``groups``/``directions`` add the bulky parts."""
        out = {"thresholds": self.thresholds, "histogram": self.histogram, "histogram_frac": self.histogram_frac,
               "min_seeds": self.min_seeds, "seed_curve": self.seed_curve, "pwmcc": self.pwmcc,
               "summary": self.summary, "config": self.config,
               "random": None if self.random is None else self.random.to_dict(False, False)}
        if groups:
            out["groups"] = [g.to_dict(directions) for g in self.groups]
        return to_jsonable(out)


def consensus(decoders, encoders=None, *, thresholds=THRESHOLDS, reference: int = 0, min_seeds: int | None = None,
              random_control=None, key=0, n_subsample: int = 200, level: float = 0.95, top_k: int = 32,
              method: str = "auto", dense_max: int = 2048, pair_block: int = 8) -> ConsensusReport:
    """Consensus analysis of ``S >= 2`` SAEs: decoders ``[S, d_sae, d_in]``, encoders (``W_enc.T``) optional.

    Definitions are in the module docstring. ``min_seeds`` (default ``S``): groups spanning at least
    this many seeds form the consensus dictionary. ``random_control``: ``[R, d_sae, d_in]`` untrained
    dictionaries, ``None`` to draw ``S`` isotropic ones (:func:`random_dictionaries`, ``key``), or
    ``False`` to skip. ``seed_curve``: for ``n = 2..S``, every ``n``-subset of seeds when there are at
    most ``n_subsample``, else ``n_subsample`` random ones; per subset the mean PWMCC over its pairs
    and the fraction of its ``n * d_sae`` latents matched at tau in all its other seeds; mean and
    ``level`` percentile interval over subsets. ``top_k``, ``method``, ``dense_max``: as in
    :func:`~saejax.stability.match`. Summary keys, per tau (``f"{tau:g}"``):
    ``consensus_frac_all_<tau>`` (fraction of all ``S * d_sae`` latents found in all S seeds),
    ``consensus_groups_<tau>`` (groups spanning >= ``min_seeds`` seeds), ``groups_<tau>`` (all
    groups), ``orphan_frac_<tau>``, ``inconsistent_frac_<tau>``, ``found_in_mean_<tau>``, and the
    same with a ``random_`` prefix for the control (None with ``random_control=False``); also ``pwmcc``, ``all_optimal``,
    ``max_gap_bound``, ``n_seeds``, ``n_latents``, ``d_in``, ``min_seeds``, ``n_random``.
    """
    dec = np.asarray(check_stack(decoders, "decoders"))
    enc, taus, min_seeds = _check_args(dec, encoders, thresholds, reference, min_seeds, n_subsample, level)
    opts = dict(top_k=top_k, method=method, dense_max=dense_max, pair_block=pair_block)
    rest = dict(n_subsample=int(n_subsample), level=float(level), key=key)
    ctrl = _control(random_control, dec, key)
    rand = None if ctrl is None else _analyse(ctrl, None, taus, 0, min(min_seeds, ctrl.shape[0]), opts, **rest)
    rep = _analyse(dec, enc, taus, int(reference), min_seeds, opts, **rest)
    summary = dict(rep.summary)
    for k, v in (rand.summary if rand is not None else dict.fromkeys(rep.summary)).items():
        if k not in ("n_latents", "d_in"):
            summary[f"random_{k}"] = v
    summary["n_random"] = float(0 if ctrl is None else ctrl.shape[0])
    config = dict(thresholds=list(taus), reference=int(reference), min_seeds=min_seeds, n_subsample=int(n_subsample),
                  level=float(level), encoders=enc is not None, **opts)
    return replace(rep, summary=summary, random=rand, config=config)


def _check_args(dec, encoders, thresholds, reference, min_seeds, n_subsample, level):
    """One-line ConfigErrors for bad input; returns ``(encoders or None, thresholds, min_seeds)``."""
    s = dec.shape[0]
    check(2 <= s <= 64, f"consensus needs between 2 and 64 seeds, got {s}")
    enc = None if encoders is None else np.asarray(check_stack(encoders, "encoders"))
    check(enc is None or enc.shape == dec.shape,
          f"encoders must have the decoders' shape {dec.shape}, got {None if enc is None else enc.shape}")
    is_int = lambda x: isinstance(x, (int, np.integer)) and not isinstance(x, bool)  # noqa: E731
    check(is_int(reference) and 0 <= reference < s, f"reference must be a seed index in 0..{s - 1}, got {reference!r}")
    min_seeds = s if min_seeds is None else min_seeds
    check(is_int(min_seeds) and 2 <= min_seeds <= s, f"min_seeds must be an integer in 2..{s}, got {min_seeds!r}")
    check(is_int(n_subsample) and n_subsample >= 1, f"n_subsample must be a positive integer, got {n_subsample!r}")
    check(isinstance(level, (int, float)) and 0.0 < level < 1.0, f"level must be in (0, 1), got {level!r}")
    return enc, _check_thresholds(thresholds), int(min_seeds)


def _control(random_control, dec, key):
    """The control stack: ``None`` -> ``S`` isotropic dictionaries, ``False`` -> none, else checked."""
    if random_control is False:
        return None
    if random_control is None:
        return random_dictionaries(dec.shape, key=key)
    ctrl = np.asarray(check_stack(random_control, "random_control"))
    check(ctrl.shape[1:] == dec.shape[1:] and ctrl.shape[0] >= 2,
          f"random_control must be [R >= 2, {dec.shape[1]}, {dec.shape[2]}] like the decoders, got {ctrl.shape}")
    return ctrl


def export_consensus(report: ConsensusReport, directory, d_in: int, *, threshold=None,
                     metadata: dict | None = None) -> Path:
    """Write ``report``'s consensus dictionary at ``threshold`` in the SAELens layout (``save_saelens``).

    A ``relu`` SAE with ``W_dec = directions`` ``[n, d_in]``, ``W_enc = directions.T`` and zero
    biases: only the directions are meaningful (no trained encoder, bias or scale stands behind
    them), e.g. for probing or for matching against further seeds.
    """
    check(isinstance(report, ConsensusReport), f"report must be a ConsensusReport, got {type(report).__name__}")
    i = report.index(threshold)
    w = np.asarray(report.dictionaries[i], np.float32)
    check(w.shape[1] == int(d_in), f"d_in={d_in} does not match the consensus dictionary's d_in={w.shape[1]}")
    check(w.shape[0] >= 1, f"no consensus features at tau={report.thresholds[i]} spanning >= {report.min_seeds} seeds; "
                           "nothing to export")
    cfg = SAEConfig(d_in=int(d_in), d_sae=int(w.shape[0]), arch="relu")
    params = {"W_enc": np.ascontiguousarray(w.T), "b_enc": np.zeros(w.shape[0], np.float32), "W_dec": w,
              "b_dec": np.zeros(int(d_in), np.float32)}
    meta = {"consensus": True, "threshold": report.thresholds[i], "min_seeds": report.min_seeds,
            "n_seeds": int(report.found_in.shape[1]), "note": "only the directions (W_dec rows) are meaningful",
            **(metadata or {})}
    return save_saelens(directory, cfg, params, metadata=meta)


def _check_thresholds(thresholds) -> tuple:
    try:
        taus = tuple(np.atleast_1d(np.asarray(thresholds, dtype=np.float64)).ravel().tolist())
    except (TypeError, ValueError):
        taus = (float("nan"),)
    check(len(taus) > 0, "thresholds is empty; expected values in (0, 1]")
    check(all(0.0 < t <= 1.0 for t in taus), f"thresholds must lie in (0, 1], got {list(taus)}")
    return tuple(sorted(set(taus)))


def _pair_table(dec, enc, top_k, method, dense_max, pair_block):
    """Every pair's matching: ``partner[s, t, a]`` (latent of ``t`` matched to ``(s, a)``), signed decoder
    ``cos`` and thresholded ``edge`` score of that pair, each ``[S, S, d_sae]`` and symmetric."""
    s, n, _ = dec.shape
    pairs = np.stack(np.triu_indices(s, 1), axis=1)
    dense = method == "dense" or (method == "auto" and n <= dense_max)
    partner = np.full((s, s, n), -1, np.int64)
    cos, edge = np.zeros((s, s, n)), np.zeros((s, s, n))
    partner[np.arange(s), np.arange(s)] = np.arange(n)
    cos[np.arange(s), np.arange(s)] = edge[np.arange(s), np.arange(s)] = 1.0
    pw, gaps, optimal = np.eye(s), [], True
    size = -(-len(pairs) // -(-len(pairs) // max(1, pair_block)))  # equal blocks: no padded pairs to compute
    for block, valid in _blocks(pairs, size):
        st = all_pairs(dec, top_k=1 if dense else top_k, pairs=block).stats
        for p, (i, j) in enumerate(block[:valid]):
            one = _slice(st, p)
            pw[i, j] = pw[j, i] = pwmcc_from_stats(one)
            m = match(dec[i], dec[j], stats=None if dense else one, top_k=top_k, method=method, dense_max=dense_max)
            e = m.abs_cos if enc is None else np.minimum(m.abs_cos, np.abs(_signed_cos(enc[i], enc[j], m.rows, m.cols)))
            for (x, y, rx, ry) in ((i, j, m.rows, m.cols), (j, i, m.cols, m.rows)):
                partner[x, y, rx], cos[x, y, rx], edge[x, y, rx] = ry, m.cos, e
            gaps.append(m.gap_bound)
            optimal &= m.optimal
    return partner, cos, edge, pw, bool(optimal), float(max(gaps))


def _analyse(dec, enc, taus, reference, min_seeds, opts, *, n_subsample, level, key) -> ConsensusReport:
    """Everything for one stack (trained or control), from one pass of pairwise matchings."""
    s, n, d = dec.shape
    partner, cos, edge, pw, optimal, gap = _pair_table(dec, enc, **opts)
    unit = np.asarray(normalize(jnp.asarray(dec)))
    order = [(reference + i) % s for i in range(s)]
    oks = [edge >= t - COS_TOL for t in taus]
    found = np.stack([ok.sum(axis=1) for ok in oks])
    hist = np.stack([np.bincount(f.ravel() - 1, minlength=s) for f in found])
    groups = tuple(_groups_at(t, partner, ok, edge, cos, unit, order) for t, ok in zip(taus, oks))
    dicts = tuple(g.directions[g.n_seeds >= min_seeds] for g in groups)
    curve = _seed_curve(oks, pw, taus, n_subsample, level, _rng(key))
    summary = {"pwmcc": float(pw[np.triu_indices(s, 1)].mean())}
    for i, (t, g) in enumerate(zip(taus, groups)):
        values = dict(consensus_frac_all=hist[i, -1] / (s * n), consensus_groups=len(dicts[i]), groups=len(g.members),
                      orphan_frac=sum(o.size for o in g.orphans) / (s * n), inconsistent_frac=g.inconsistent / (s * n),
                      found_in_mean=found[i].mean())
        summary.update({f"{k}_{t:g}": float(v) for k, v in values.items()})
    summary.update(all_optimal=float(optimal), max_gap_bound=gap, n_seeds=float(s), n_latents=float(n),
                   d_in=float(d), min_seeds=float(min_seeds))
    return ConsensusReport(taus, found, hist, hist / (s * n), groups, dicts, min_seeds, curve, pw, summary)


def _groups_at(tau, partner, ok, edge, cos, unit, order) -> ConsensusGroups:
    """Reference passes (module docstring), then each group's statistics and mean direction."""
    s, _, n = partner.shape
    free = np.ones((s, n), bool)
    found, anchors = [np.zeros((0, s), np.int64)], [np.zeros(0, np.int64)]
    for r in order:
        a = np.flatnonzero(free[r])
        mem = partner[r][:, a].T  # [m, S]: the reference latent's partner in every seed
        cand = ok[r][:, a].T & free[np.arange(s)[None, :], np.maximum(mem, 0)]
        cand = _prune(partner, ok, mem, cand, edge[r][:, a].T)
        keep = cand.sum(axis=1) >= 2
        free[r, a] = False
        g = np.where(cand[keep], mem[keep], -1)
        free[np.nonzero(g.T >= 0)[0], g.T[g.T >= 0]] = False
        found.append(g), anchors.append(np.full(len(g), r, np.int64))
    members, anchor = np.concatenate(found), np.concatenate(anchors)
    in_group = np.zeros((s, n), bool)
    in_group[np.nonzero(members.T >= 0)[0], members.T[members.T >= 0]] = True
    mn, mean = _pair_cos(members, cos)
    return ConsensusGroups(float(tau), members, anchor, (members >= 0).sum(axis=1), mn, mean,
                           _directions(members, anchor, cos, unit), tuple(np.flatnonzero(~in_group[t]) for t in range(s)),
                           _inconsistent(partner, ok))


def _prune(partner, ok, mem, cand, ref_edge) -> np.ndarray:
    """Drop candidates until every pair of kept members is matched: each round, per row, the member
    with the most conflicts (ties: lowest |cos| to the reference), which is never the reference."""
    m, s = mem.shape
    safe = np.maximum(mem, 0)
    agree = np.ones((m, s, s), bool)
    for t in range(s):
        for u in range(t + 1, s):
            agree[:, t, u] = agree[:, u, t] = (partner[t, u][safe[:, t]] == mem[:, u]) & ok[t, u][safe[:, t]]
    for _ in range(s):
        conflicts = (cand[:, :, None] & cand[:, None, :] & ~agree).sum(axis=2)
        rows = np.flatnonzero(conflicts.any(axis=1))
        if rows.size == 0:
            break
        worst = (2.0 * conflicts[rows] + (1.0 - ref_edge[rows])).argmax(axis=1)
        cand[rows, worst] = False
    return cand


def _pair_cos(members, cos):
    """Min and mean |cos| over the member pairs of every group (one seed pair at a time)."""
    g, s = members.shape
    mn, total, count = np.full(g, np.inf), np.zeros(g), np.zeros(g)
    for t in range(s):
        for u in range(t + 1, s):
            both = (members[:, t] >= 0) & (members[:, u] >= 0)
            c = np.abs(cos[t, u][members[both, t]])
            mn[both], total[both], count[both] = np.minimum(mn[both], c), total[both] + c, count[both] + 1
    return mn, total / np.maximum(count, 1)


def _directions(members, anchor, cos, unit) -> np.ndarray:
    """Unit-norm mean of the members' unit rows, each times ``sign(cos)`` with the anchor member."""
    g, s = members.shape
    ref = members[np.arange(g), anchor]
    out = np.zeros((g, unit.shape[-1]))
    for t in range(s):
        has = members[:, t] >= 0
        sign = np.where(cos[anchor[has], t, ref[has]] < 0, -1.0, 1.0)
        out[has] += sign[:, None] * unit[t][members[has, t]]
    return (out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-30)).astype(np.float32)


def _inconsistent(partner, ok) -> int:
    """Latents in connected components of the match graph that are not cliques with one latent per seed."""
    s, _, n = partner.shape
    src, dst = [], []
    for t in range(s):
        for u in range(t + 1, s):
            a = np.flatnonzero(ok[t, u])
            src.append(t * n + a), dst.append(u * n + partner[t, u, a])
    src, dst = np.concatenate(src), np.concatenate(dst)
    graph = coo_array((np.ones(src.size), (src, dst)), shape=(s * n, s * n)).tocsr()
    n_comp, label = connected_components(graph, directed=False)
    size = np.bincount(label, minlength=n_comp)
    edges = np.bincount(label[src], minlength=n_comp)
    seeds = np.bincount(np.unique(label * s + np.repeat(np.arange(s), n)) // s, minlength=n_comp)
    bad = (edges != size * (size - 1) // 2) | (seeds != size)
    return int(size[bad].sum())


def _seed_curve(oks, pw, taus, n_subsample, level, rng) -> dict:
    """Mean PWMCC and fraction found in all ``n`` seeds over seed subsets, for ``n = 2..S``.

    A latent's match set is a bitmask over seeds; it is found in all of subset ``T`` (mask ``m``)
    iff ``bits & m == m``. Bit patterns are counted once per seed, so a subset costs ``O(|T| * patterns)``.
    """
    s = pw.shape[0]
    weight = np.left_shift(np.uint64(1), np.arange(s, dtype=np.uint64))
    patterns = [[np.unique((ok[t] * weight[:, None]).sum(axis=0, dtype=np.uint64), return_counts=True)
                 for t in range(s)] for ok in oks]
    n_lat = oks[0].shape[-1]
    q = [(1 - level) / 2, (1 + level) / 2]
    out = {"n": [], "n_subsets": [], "exhaustive": [], "pwmcc": {"mean": [], "low": [], "high": []},
           "frac_all": {f"{t:g}": {"mean": [], "low": [], "high": []} for t in taus}}
    for k in range(2, s + 1):
        exhaustive = math.comb(s, k) <= n_subsample
        subsets = np.array(list(itertools.combinations(range(s), k))) if exhaustive else \
            np.sort(np.stack([rng.choice(s, k, replace=False) for _ in range(n_subsample)]), axis=1)
        a, b = np.triu_indices(k, 1)
        values = {"pwmcc": pw[subsets[:, a], subsets[:, b]].mean(axis=1)}
        masks = weight[subsets].sum(axis=1, dtype=np.uint64)
        for t, pat in zip(taus, patterns):
            values[f"{t:g}"] = np.array([sum(int(c[(v & m) == m].sum()) for v, c in (pat[i] for i in sub))
                                         for sub, m in zip(subsets, masks)]) / (k * n_lat)
        out["n"].append(k), out["n_subsets"].append(len(subsets)), out["exhaustive"].append(exhaustive)
        for name, v in values.items():
            slot = out["pwmcc"] if name == "pwmcc" else out["frac_all"][name]
            lo, hi = np.quantile(v, q)
            slot["mean"].append(float(v.mean())), slot["low"].append(float(lo)), slot["high"].append(float(hi))
    return out
