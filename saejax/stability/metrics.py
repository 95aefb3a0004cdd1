"""Stability metrics between two SAEs, and ground-truth / effective-rank diagnostics.

Every function takes plain arrays (dictionaries ``[n_latents, d_in]``: decoder rows ``W_dec``
or encoder rows ``W_enc.T``) and returns floats or a dict of floats.
"""

from __future__ import annotations

import numpy as np

from saejax.errors import check
from saejax.stability.kernel import PairStats, check_dictionary, check_mask, pair_stats
from saejax.stability.matching import Matching, _signed_cos, match

THRESHOLDS = (0.5, 0.7, 0.9)
CURVE = np.round(np.linspace(0.0, 1.0, 101), 2)


def pwmcc(a, b, *, alive_a=None, alive_b=None, chunk: int | None = None) -> float:
    """Pairwise maximum cosine correlation between dictionaries ``a`` and ``b``.

    ``PWMCC = 1/2 (mean_i max_j |cos(a_i, b_j)| + mean_j max_i |cos(a_i, b_j)|)``, the symmetric
    decoder-based stability score of the modular-arithmetic stability study (its
    ``compute_pwmcc``; ~0.30 for d_in=128, d_sae=1024 at chance). Pass encoder rows
    (``W_enc.T``) for the encoder-based variant. With ``alive_*`` masks, dead latents are left
    out of both the maxima and the means (live-only PWMCC). Widths may differ.
    """
    st = pair_stats(a, b, top_k=1, chunk=chunk, alive_a=alive_a, alive_b=alive_b)
    ok_a = check_mask(alive_a, np.shape(a)[:1], "alive_a")
    ok_b = check_mask(alive_b, np.shape(b)[:1], "alive_b")
    return pwmcc_from_stats(st, ok_a, ok_b)


def pwmcc_from_stats(stats: PairStats, alive_a=None, alive_b=None) -> float:
    """PWMCC from kernel outputs of one pair (means over live latents if masks are given)."""
    rows, cols = np.asarray(stats.row_max, np.float64), np.asarray(stats.col_max, np.float64)
    if alive_a is not None:
        rows = rows[np.asarray(alive_a)]
    if alive_b is not None:
        cols = cols[np.asarray(alive_b)]
    if rows.size == 0 or cols.size == 0:
        return float("nan")
    return float(0.5 * (rows.mean() + cols.mean()))


def matching_metrics(m: Matching, *, thresholds=THRESHOLDS, curve=CURVE) -> dict:
    """Summary of a one-to-one matching's matched |cos| values ``c_1..c_m``.

    ``hungarian_mean = mean(c)`` (Song et al. 2025's PW-MCC, arXiv:2505.20254),
    ``hungarian_median``, ``frac_ge_t = #{c_p >= t} / m`` for each threshold (Paulo & Belrose
    2025 use 0.7; the scale-control study 0.5/0.7/0.9) and ``curve`` (the fraction at every
    threshold in ``curve``), ``signed_mean`` (mean signed cosine of the same pairs),
    ``n_matched``, ``optimal`` and ``gap_bound``. The denominator ``m`` is the smaller (live) width.
    """
    c = np.asarray(m.abs_cos, np.float64)
    if c.size == 0:
        nan = float("nan")
        return {"hungarian_mean": nan, "hungarian_median": nan, **{f"frac_ge_{t}": nan for t in thresholds},
                "curve": [nan] * len(curve), "signed_mean": nan, "n_matched": 0, "optimal": True, "gap_bound": 0.0}
    out: dict = {"hungarian_mean": float(c.mean()), "hungarian_median": float(np.median(c))}
    out.update({f"frac_ge_{t}": float((c >= t).mean()) for t in thresholds})
    out["curve"] = [float((c >= t).mean()) for t in curve]
    out.update(signed_mean=float(np.mean(m.cos)), n_matched=int(c.size), optimal=bool(m.optimal),
               gap_bound=float(m.gap_bound))
    return out


def pw_mcc(a, b, *, signed: bool = False, **match_kwargs) -> float:
    """Song et al.'s PW-MCC (arXiv:2505.20254): mean cosine over a Hungarian matching.

    ``PW-MCC = (1/m) sum_i s(a_i, b_pi(i))`` with ``pi`` maximising ``sum_i s(a_i, b_pi(i))``;
    ``s = |cos|`` by default, the signed cosine (matched on signed cosine, as their code does)
    with ``signed=True``. ``match_kwargs`` go to :func:`~saejax.stability.match`.
    """
    m = match(a, b, signed=signed, **match_kwargs)
    return float(np.mean(m.score))


def shared_fraction(dec_a, dec_b, enc_a, enc_b, *, threshold: float = 0.7, matching: Matching | None = None,
                    **match_kwargs) -> float:
    """Paulo & Belrose 2025's shared-latent fraction (arXiv:2501.16615).

    Latents are paired by a Hungarian matching of the decoders (``matching``, or
    :func:`~saejax.stability.match` on ``dec_a, dec_b``); a pair is *shared* when both its
    decoder and its encoder |cos| exceed ``threshold`` (0.7 in the paper):
    ``shared = #{p : |cos(d_a, d_b)| > t and |cos(e_a, e_b)| > t} / m``.
    Encoders are given as rows (``W_enc.T``), shape ``[n_latents, d_in]`` like the decoders.
    """
    dec_a, dec_b = check_dictionary(dec_a, "dec_a"), check_dictionary(dec_b, "dec_b")
    enc_a, enc_b = check_dictionary(enc_a, "enc_a"), check_dictionary(enc_b, "enc_b")
    check(enc_a.shape == dec_a.shape and enc_b.shape == dec_b.shape,
          f"encoder rows must match decoder shapes, got {enc_a.shape} vs {dec_a.shape} and {enc_b.shape} vs {dec_b.shape}")
    if matching is None:
        matching = match(dec_a, dec_b, **match_kwargs)
    return shared_from_matching(matching, enc_a, enc_b, threshold)


def shared_from_matching(m: Matching, enc_a, enc_b, threshold: float = 0.7) -> float:
    """:func:`shared_fraction` given the decoder matching ``m`` and encoder rows."""
    if m.rows.size == 0:
        return float("nan")
    enc = np.abs(_signed_cos(enc_a, enc_b, m.rows, m.cols))
    return float(np.mean((m.abs_cos > threshold) & (enc > threshold)))


def activation_corr(acts_a, acts_b, m: Matching, *, block: int = 4096) -> np.ndarray:
    """Pearson correlation of matched latents' activations on the same held-out tokens.

    ``r_p = corr_t(f_a[t, rows_p], f_b[t, cols_p])`` for acts ``[n_tokens, d_sae]``; NaN where
    either latent is constant on these tokens (e.g. never fires). Activation similarity as in
    Anthropic's "Towards Monosemanticity" universality analysis and the scale-control study.
    """
    acts_a, acts_b = np.asarray(acts_a), np.asarray(acts_b)
    check(acts_a.ndim == 2 and acts_b.ndim == 2, f"latent activations must be [tokens, d_sae], got {acts_a.shape} and {acts_b.shape}")
    check(acts_a.shape[0] == acts_b.shape[0], f"latent activations must cover the same tokens, got {acts_a.shape[0]} and {acts_b.shape[0]}")
    check(acts_a.shape[0] >= 2, f"need at least 2 tokens for a correlation, got {acts_a.shape[0]}")
    out = np.empty(m.rows.size)
    for s in range(0, m.rows.size, block):
        x = acts_a[:, m.rows[s:s + block]].astype(np.float64)
        y = acts_b[:, m.cols[s:s + block]].astype(np.float64)
        x -= x.mean(axis=0)
        y -= y.mean(axis=0)
        den = np.sqrt((x * x).sum(axis=0) * (y * y).sum(axis=0))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[s:s + block] = np.where(den > 0, (x * y).sum(axis=0) / np.where(den > 0, den, 1.0), np.nan)
    return out


def gt_mcc(learned, true_dictionary, **match_kwargs) -> dict:
    """Recovery of a known dictionary ``true_dictionary`` ``[n_features, d_in]`` by ``learned``.

    ``gt_mcc``: mean |cos| over the Hungarian matching of true features to learned latents (the
    MCC of identifiability studies, used as GT-MCC by Song et al. 2025, arXiv:2505.20254);
    ``mmcs``: mean over true features of the best |cos| to any latent (Sharkey et al. 2022's
    mean max cosine similarity); ``frac_recovered_0.9``: fraction of true features matched at
    |cos| >= 0.9.
    """
    m = match(true_dictionary, learned, **match_kwargs)
    best = pair_stats(true_dictionary, learned, top_k=1).row_max
    return {"gt_mcc": float(m.abs_cos.mean()), "mmcs": float(np.mean(np.asarray(best, np.float64))),
            "frac_recovered_0.9": float(np.mean(m.abs_cos >= 0.9))}


def effective_rank(x, *, center: bool = True) -> dict:
    """Effective rank of activations ``x`` ``[n_samples, d]`` (the "matched regime" diagnostic).

    With singular values ``sigma_k`` of (centred) ``x`` and covariance eigenvalues
    ``lambda_k = sigma_k^2``: ``participation_ratio = (sum lambda)^2 / sum lambda^2`` and the
    entropy effective rank ``exp(-sum p_k log p_k)`` with ``p_k = sigma_k / sum sigma`` (Roy &
    Vetterli 2007). Both equal ``r`` for ``r`` equal non-zero singular values.
    """
    x = np.asarray(x, dtype=np.float64)
    check(x.ndim == 2 and x.shape[0] >= 2 and x.shape[1] >= 1, f"activations must be [n_samples >= 2, d], got {x.shape}")
    check(bool(np.isfinite(x).all()), "activations contain NaN/inf values; expected finite numbers")
    if center:
        x = x - x.mean(axis=0)
    sigma = np.linalg.svd(x, compute_uv=False)
    check(sigma.sum() > 0, "activations are constant; effective rank is undefined")
    lam = sigma**2
    p = sigma / sigma.sum()
    p = p[p > 0]
    return {"participation_ratio": float(lam.sum() ** 2 / (lam**2).sum()),
            "entropy_rank": float(np.exp(-(p * np.log(p)).sum()))}
