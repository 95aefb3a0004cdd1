"""The declared summary schema: every column of ``summary.json`` / ``summary.csv``, its type and
meaning. Records are checked against it (:func:`check_record`), the report tables name its
columns, and ``docs/columns.md`` is generated from it (``python -m saejax.schema``; a test keeps
the checked-in page equal to the output)."""

from __future__ import annotations

import fnmatch
import sys
from dataclasses import dataclass

from saejax.errors import check


@dataclass(frozen=True)
class Column:
    name: str
    """A column name, or a shell pattern for a family (``frac_ge_*``)."""
    type: str
    meaning: str
    group: str = "stability"


C = Column
COLUMNS: tuple[Column, ...] = (
    C("cell", "str", "the cell id: architecture, width, k or coefficient, swept lr, training length", "config"),
    C("recipe", "str", "the experiment's named training recipe (only when it names recipes)", "config"),
    C("arch", "str", "SAE architecture (an entry of `saejax.archs`)", "config"),
    C("d_sae", "int", "number of latents", "config"),
    C("d_in", "int", "activation width", "config"),
    C("source", "str", "the named source of the cell, where the experiment names several", "config"),
    C("model_heldout_acc", "float", "held-out accuracy of the model the activations come from (embedded modular model)",
      "config"),
    C("k", "int", "latents per token (TopK family; empty otherwise)", "config"),
    C("sparsity_coef", "float", "the L1 or L0 coefficient (empty for the TopK family)", "config"),
    C("lr", "float", "the learning rate, when the experiment sweeps `lrs`", "config"),
    C("epochs", "float", "training length in epochs (experiments that give `epochs`)", "config"),
    C("steps", "int", "optimiser steps trained", "config"),
    C("n_seeds", "int", "seeds the statistics are over (failed seeds excluded)", "config"),
    C("status", "str", "`ok`, `N of M seeds failed` (left out), or `failed: ...` (no metrics)", "run"),
    C("failed_seeds", "list", "seeds that diverged or hit non-finite values (frozen at their last good step)", "run"),
    C("pwmcc", "float", "decoder PWMCC: per seed pair, the mean over both directions of each latent's best "
                        "\\|cos\\| in the other SAE; averaged over seed pairs"),
    C("pwmcc_ci_low", "float", "95% bootstrap CI of `pwmcc`, resampling seeds (not pairs); also `_ci_high`"),
    C("pwmcc_ci_high", "float", "upper end of the CI of `pwmcc`"),
    C("pwmcc_encoder", "float", "PWMCC on encoder rows"),
    C("pwmcc_ratio", "float", "`pwmcc / random_pwmcc`"),
    C("pwmcc_at_start", "float", "PWMCC at step 0 (the initialisation)"),
    C("random_pwmcc", "float", "the same metric on untrained, randomly initialised SAEs of the same shape (chance)"),
    C("random_pwmcc_analytic", "float", "the closed-form expectation for independent isotropic dictionaries"),
    C("random_hungarian_mean", "float", "`hungarian_mean` of the random control"),
    C("p_value_vs_random", "float", "permutation test of trained vs random per-seed values"),
    C("p_value_resolution", "float", "smallest p the permutation test can give: 1 / C(n_seeds + n_random, n_seeds) "
      "when every relabelling is enumerated, else 1 / (1 + n_perm)"),
    C("p_value_analytic", "float", "one-sided z-test of `pwmcc` against the exact chance distribution of isotropic "
      "dictionaries (conservative, no resolution floor; `saejax.stability.baseline.analytic_p_value`)"),
    C("cohens_d_vs_random", "float", "Cohen's d of trained vs random per-seed values"),
    C("n_random", "int", "random-control SAEs"),
    C("hungarian_mean", "float", "mean \\|cos\\| of one-to-one Hungarian-matched latents (Song et al.'s PW-MCC)"),
    C("hungarian_median", "float", "median \\|cos\\| of Hungarian-matched latents, all pairs pooled"),
    C("hungarian_median_ci_*", "float", "seed-bootstrap CI of `hungarian_median` (`_ci_low`, `_ci_high`; a seed drawn "
      "twice adds no pair with itself)"),
    C("hungarian_mean_ci_*", "float", "bootstrap CI of `hungarian_mean` (`_ci_low`, `_ci_high`)"),
    C("frac_ge_*", "float", "fraction of matched latents with \\|cos\\| at or above the threshold (and its CI)"),
    C("signed_mean", "float", "mean signed cosine of matched latents"),
    C("shared_fraction", "float", "Paulo & Belrose: matched latents whose decoder AND encoder cosines exceed 0.7"),
    C("live_*", "float", "the same metrics with latents dead on held-out data (in either SAE) excluded, each with "
      "its seed-bootstrap CI (`live_<metric>_ci_low`, `_ci_high`; empty where a seed has no live latent)"),
    C("alive_fraction", "float", "latents that fired on held-out data"),
    C("activation_corr", "float", "mean Pearson correlation of matched latents' activations on held-out tokens"),
    C("gt_mcc", "float", "mean best \\|cos\\| of each true feature to the SAE's latents (known dictionaries)"),
    C("gt_mmcs", "float", "mean max cosine similarity of the learned latents to the true features"),
    C("all_optimal", "bool", "every sparse Hungarian matching was proven optimal"),
    C("max_gap_bound", "float", "largest bound on a sparse matching's distance from the optimum"),
    C("n_latents", "int", "latents per SAE in the stability report"),
    C("effective_rank_*", "float", "participation ratio (`_pr`) and entropy (`_entropy`) effective rank of "
                                   "the held-out activations", "data"),
    C("explained_variance", "float", "held-out explained variance, mean over seeds", "data"),
    C("mse", "float", "held-out MSE per element (normalised units), mean over seeds", "data"),
    C("random_mse", "float", "held-out MSE of the untrained control SAEs (decoder bias at the data mean), "
      "mean over seeds: divide by `mse` for how much training gained", "data"),
    C("random_explained_variance", "float", "held-out explained variance of the untrained control SAEs", "data"),
    C("l0", "float", "held-out mean active latents per token", "data"),
    C("dead_fraction", "float", "latents that never fired on held-out data", "data"),
    C("resampled", "float", "latents resampled per seed, summed over the events up to this cell (`train.resample_steps`; "
      "per event and seed in `cells/<cell>/history.json`)", "data"),
    C("train_fvu", "float", "training fraction of variance unexplained in the last logging window", "data"),
    C("ce_*", "float", "next-token (or answer) cross-entropy: `ce_clean`, `ce_zero_ablation`, "
                       "`ce_mean_ablation`, `ce_spliced` (each seed's reconstruction spliced in, mean)", "downstream"),
    C("loss_recovered*", "float", "`(CE_zero - CE_spliced) / (CE_zero - CE_clean)` with a t-CI over seeds "
                                  "(`_ci_low`, `_ci_high`; `_vs_mean`: mean-ablation reference)", "downstream"),
    C("acc_*", "float", "accuracy clean / spliced", "downstream"),
    C("kl_spliced", "float", "KL(clean ‖ spliced) of the next-token distribution", "downstream"),
    C("probe_*", "float", "linear probe accuracy from raw activations (`_raw_acc`) vs each seed's latents "
                          "(`_sae_acc`, with CI) vs as many principal components of the raw activations as the "
                          "latents' mean L0 (`_pca_acc`, `_pca_components`), and macro F1 of each (`_raw_macro_f1`, "
                          "`_sae_macro_f1`, `_pca_macro_f1`; per-class precision, recall and F1 in "
                          "`cells/<cell>/probe.json`), per label", "downstream"),
    C("consensus_*", "float", "consensus over all seeds at each |cos| threshold (`consensus` analysis): "
                             "`frac_all` latents found in every seed, `groups` groups spanning every seed, "
                             "`found_in_mean` mean seeds per latent, `orphan_frac`, `inconsistent_frac`; "
                             "`consensus_random_*` the same for the untrained control", "consensus"),
    C("usage_profile_corr", "float", "correlation of matched latents' firing-by-label profiles", "downstream"),
)
_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "list": (list, tuple)}


def column(name: str) -> Column | None:
    """The declared column for ``name`` (exact names before patterns), or None."""
    for c in COLUMNS:
        if c.name == name:
            return c
    return next((c for c in COLUMNS if fnmatch.fnmatchcase(name, c.name)), None)


def check_record(record: dict) -> None:
    """Every key of a summary record is declared, with a value of its type (or None)."""
    for key, value in record.items():
        c = column(key)
        check(c is not None, f"summary column {key!r} is not declared in saejax.schema.COLUMNS")
        assert c is not None  # narrowing only: check raised otherwise
        check(value is None or isinstance(value, _TYPES[c.type]) or hasattr(value, "dtype"),
              f"summary column {key!r} should be {c.type}, got {type(value).__name__}")


def markdown() -> str:
    """The column reference (``docs/columns.md``)."""
    titles = {"config": "Configuration", "run": "Run health", "stability": "Stability across seeds",
              "data": "Reconstruction and data", "consensus": "Consensus across seeds (`consensus` analysis)",
              "downstream": "Downstream (`splice`, `probe` analyses)"}
    out = ["# `summary.json` / `summary.csv` columns", "",
           "Generated from `saejax/schema.py` (`python -m saejax.schema > docs/columns.md`).", ""]
    for group, title in titles.items():
        out += [f"## {title}", "", "| column | type | meaning |", "|---|---|---|"]
        out += [f"| `{c.name}` | {c.type} | {c.meaning} |" for c in COLUMNS if c.group == group] + [""]
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(markdown())
