"""Cross-seed stability of sparse autoencoders: do SAEs learn the same features when only the seed changes?

- :mod:`~saejax.stability.kernel`: the jitted all-pairs cosine kernel (max, argmax, top-k).
- :mod:`~saejax.stability.matching`: Hungarian matching (dense, or sparse with a proof of optimality).
- :mod:`~saejax.stability.metrics`: PWMCC, matched-cosine metrics, shared latents, activation
  correlation, ground-truth recovery, effective rank.
- :mod:`~saejax.stability.baseline`: the exact chance level of random dictionaries.
- :mod:`~saejax.stability.stats`: bootstrap and permutation over seeds, Cohen's d.
- :mod:`~saejax.stability.report`: :func:`stability_report` for N seeds.

Dictionaries are ``[n_latents, d_in]`` arrays of directions (decoder rows ``W_dec``; encoders as
``W_enc.T``), stacked ``[seeds, n_latents, d_in]`` for many seeds.
"""

from saejax.stability.baseline import expected_max_abs_cos, random_baseline, random_dictionaries, simulate_baseline
from saejax.stability.consensus import consensus
from saejax.stability.kernel import MASKED, AllPairs, PairStats, all_pairs, normalize, pair_stats
from saejax.stability.matching import Matching, match
from saejax.stability.metrics import activation_corr, effective_rank, gt_mcc, matching_metrics, pw_mcc, pwmcc, shared_fraction
from saejax.stability.report import StabilityReport, stability_report
from saejax.stability.stats import bootstrap_ci, bootstrap_pairwise, cohens_d, pairwise_mean, permutation_test, seed_scores

__all__ = [
    "MASKED", "AllPairs", "Matching", "PairStats", "StabilityReport", "activation_corr", "all_pairs",
    "bootstrap_ci", "bootstrap_pairwise", "cohens_d", "consensus", "effective_rank", "expected_max_abs_cos", "gt_mcc",
    "match", "matching_metrics", "normalize", "pairwise_mean", "pair_stats", "permutation_test", "pw_mcc",
    "pwmcc", "random_baseline", "random_dictionaries", "seed_scores", "shared_fraction", "simulate_baseline",
    "stability_report",
]
