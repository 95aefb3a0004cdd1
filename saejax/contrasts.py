"""Comparisons between cells: is one condition more stable than another?

An experiment names contrasts (``Experiment.contrasts``), e.g. ``Contrast("arch", "topk", "relu")``
(TopK vs ReLU at the same width and length) or ``Contrast("d_sae", 128, 512)``. Each pairs every
cell with ``field == a`` with every cell with ``field == b`` that agrees on ``within``, and reports
for ``a - b``:

- the difference in PWMCC and in ``frac_ge_<tau>``, with a percentile CI from a seed-level
  bootstrap (each cell's seeds resampled independently, the pairwise mean recomputed with
  :func:`saejax.stability.stats.pairwise_mean`, never resampling pairs);
- a two-sided permutation p-value on the per-seed scores (:func:`~saejax.stability.stats.seed_scores`),
  every relabelling enumerated when there are at most ``n_perm`` (exact), with its resolution
  (``1 / C(S_a + S_b, S_a)``: 1/252 for 5 vs 5 seeds);
- Cohen's d on the same per-seed scores.

Cells come from ``summary.json`` records and their ``cells/<cell>/report.json`` matrices.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from saejax.errors import ConfigError, check
from saejax.io import read_json
from saejax.stability.stats import cohens_d, pairwise_mean, pairwise_means, seed_scores

CONFIG = ("source", "recipe", "arch", "d_sae", "k", "sparsity_coef", "lr", "epochs", "steps")
"""Config columns a contrast can vary or hold fixed."""
_NATURE = {"arch": ("arch", "recipe", "k", "sparsity_coef"), "recipe": ("arch", "recipe", "k", "sparsity_coef"),
           "epochs": ("steps",), "steps": ("epochs",), "source": ("steps",)}
"""Columns that differ with the varied one by nature (a ReLU cell has no k, a longer run more steps)."""


@dataclass(frozen=True)
class Contrast:
    """``a`` vs ``b`` in config column ``field``, between cells equal on ``within`` (``None``: every
    other config column that does not change with ``field`` by nature)."""

    field: str
    a: Any
    b: Any
    within: tuple[str, ...] | None = None

    def __post_init__(self):
        check(self.field in CONFIG, f"contrast field must be one of {CONFIG}, got {self.field!r}")
        check(self.a != self.b, f"a contrast compares two different values, got {self.a!r} twice")
        for w in self.within or ():
            check(w in CONFIG and w != self.field, f"contrast within must name config columns other than "
                                                   f"{self.field!r} from {CONFIG}, got {w!r}")

    @property
    def name(self) -> str:
        return f"{self.field}: {self.a} vs {self.b}"

    def held(self) -> tuple[str, ...]:
        if self.within is not None:
            return tuple(self.within)
        return tuple(c for c in CONFIG if c != self.field and c not in _NATURE.get(self.field, ()))


def _same(x, y) -> bool:
    if isinstance(x, (int, float)) and isinstance(y, (int, float)):
        return math.isclose(x, y, rel_tol=1e-9)
    return x == y


def pairs(contrast: Contrast, configs: list[dict]) -> list[tuple[dict, dict]]:
    """Every ``(cell a, cell b)`` of the contrast among config dicts (records or planned cells)."""
    side_a = [c for c in configs if _same(c.get(contrast.field), contrast.a)]
    side_b = [c for c in configs if _same(c.get(contrast.field), contrast.b)]
    return [(x, y) for x in side_a for y in side_b if all(_same(x.get(w), y.get(w)) for w in contrast.held())]


def check_plan(contrasts, configs: list[dict]) -> None:
    """Before anything runs: every contrast must pair at least one couple of planned cells."""
    for c in contrasts:
        if not pairs(c, configs):
            values = sorted({str(r.get(c.field)) for r in configs})
            raise ConfigError(f"contrast {c.name!r} pairs no cells (values of {c.field}: {', '.join(values)}; "
                              f"held equal: {', '.join(c.held()) or 'nothing'}); drop contrasts with --set contrasts=()")


def permutation_p(x, y, *, n_perm: int = 2000, key: int = 0) -> tuple[float, float]:
    """Two-sided permutation test of equal means of two samples: ``(p, resolution)``."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    pooled, k = np.concatenate([x, y]), x.size
    stat = abs(x.mean() - y.mean())
    total = math.comb(pooled.size, k)

    def hits(masks):  # how many relabellings differ at least as much as the observed labels
        masks = np.asarray(masks, bool)
        d = np.abs((masks @ pooled) / k - (~masks @ pooled) / (pooled.size - k))
        return int(np.sum(d >= stat - 1e-12))

    if total <= n_perm:
        masks = np.zeros((total, pooled.size), bool)
        for r, c in enumerate(itertools.combinations(range(pooled.size), k)):
            masks[r, list(c)] = True
        return hits(masks) / total, 1.0 / total
    rng = np.random.default_rng(key)
    base = np.arange(pooled.size) < k
    return (1 + hits([rng.permutation(base) for _ in range(n_perm)])) / (1 + n_perm), 1.0 / (1 + n_perm)


def compare(ma: dict, mb: dict, *, n_boot: int = 2000, level: float = 0.95, n_perm: int = 2000, key: int = 0) -> dict:
    """The statistics of one pair of cells from their ``{metric: [S, S]}`` matrices."""
    rng = np.random.default_rng(key)
    sa, sb = np.asarray(ma["pwmcc"]).shape[0], np.asarray(mb["pwmcc"]).shape[0]
    draws = [(rng.integers(sa, size=sa), rng.integers(sb, size=sb)) for _ in range(n_boot)]
    lo_q, hi_q = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    out = {}
    for name in [n for n in ma if n == "pwmcc" or n.startswith("frac_ge_")]:
        if name not in mb or ma[name] is None or mb[name] is None:
            continue
        a, b = _matrix(ma[name]), _matrix(mb[name])
        boot = pairwise_means(a, [d[0] for d in draws]) - pairwise_means(b, [d[1] for d in draws])
        out[f"{name}_diff"] = pairwise_mean(a) - pairwise_mean(b)
        out[f"{name}_diff_ci_low"], out[f"{name}_diff_ci_high"] = (float(v) for v in np.percentile(boot, [lo_q, hi_q]))
    ha, hb = seed_scores(_matrix(ma["pwmcc"])), seed_scores(_matrix(mb["pwmcc"]))
    out["p_value"], out["p_value_resolution"] = permutation_p(ha, hb, n_perm=n_perm, key=key)
    out["cohens_d"] = cohens_d(ha, hb)
    return out


def _matrix(m) -> np.ndarray:
    return np.asarray([[np.nan if v is None else v for v in row] for row in m], np.float64)


def compute(contrasts, records: list[dict], out: Path) -> list[dict]:
    """One row per pair of cells of every contrast (failed cells give a row with a status)."""
    rows = []
    for c in contrasts:
        for ra, rb in pairs(c, records):
            row = {"contrast": c.name, "a": ra["cell"], "b": rb["cell"], "pwmcc_a": ra.get("pwmcc"), "pwmcc_b": rb.get("pwmcc")}
            if ra.get("pwmcc") is None or rb.get("pwmcc") is None:
                rows.append({**row, "status": "a cell failed: no comparison"})
                continue
            ma = read_json(out / "cells" / ra["cell"] / "report.json")["matrices"]
            mb = read_json(out / "cells" / rb["cell"] / "report.json")["matrices"]
            rows.append({**row, **compare(ma, mb), "status": "ok"})
    return rows


def table(rows: list[dict]) -> str:
    """The report's markdown table."""
    head = "| contrast | a | b | PWMCC a | PWMCC b | a - b [95% CI] | frac>=0.7 a - b [CI] | p (resolution) | Cohen's d |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['contrast']} | `{r['a']}` | `{r['b']}` | | | {r['status']} | | | |")
            continue
        f7 = (f"{r['frac_ge_0.7_diff']:+.3f} [{r['frac_ge_0.7_diff_ci_low']:+.3f}, {r['frac_ge_0.7_diff_ci_high']:+.3f}]"
              if "frac_ge_0.7_diff" in r else "")
        lines.append(f"| {r['contrast']} | `{r['a']}` | `{r['b']}` | {r['pwmcc_a']:.3f} | {r['pwmcc_b']:.3f} | "
                     f"{r['pwmcc_diff']:+.3f} [{r['pwmcc_diff_ci_low']:+.3f}, {r['pwmcc_diff_ci_high']:+.3f}] | {f7} | "
                     f"{r['p_value']:.4f} ({r['p_value_resolution']:.4f}) | {r['cohens_d']:+.2f} |")
    return "\n".join(lines)


def finding(rows: list[dict]) -> str | None:
    """One findings bullet: which contrasts have a CI excluding 0."""
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return None
    clear = [r for r in ok if r["pwmcc_diff_ci_low"] > 0 or r["pwmcc_diff_ci_high"] < 0]
    parts = [f"`{r['a']}` {'above' if r['pwmcc_diff'] > 0 else 'below'} `{r['b']}` by {abs(r['pwmcc_diff']):.3f} "
             f"[{r['pwmcc_diff_ci_low']:+.3f}, {r['pwmcc_diff_ci_high']:+.3f}]" for r in clear[:4]]
    return (f"- Contrasts: {len(clear)} of {len(ok)} cell pairs differ in PWMCC (95% seed-bootstrap CI excludes 0)"
            + (": " + "; ".join(parts) + ("; ..." if len(clear) > 4 else "") + "." if parts else "."))
