"""The figures of a run's report (``figures/*.png``), drawn from the cell records and cell files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from saejax.io import atomic_write, read_json


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    atomic_write(path, buf.getvalue())
    return path


def figures(records: list[dict], out: Path) -> list[tuple[str, Path]]:
    records = [r for r in records if r.get("pwmcc") is not None]  # failed cells have nothing to draw
    if not records:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fdir = out / "figures"
    made = []
    best = max(records, key=lambda r: r["pwmcc"])
    rep = read_json(out / "cells" / best["cell"] / "report.json")
    # pairwise seed heatmap of the most stable cell
    mat = np.array(rep["matrices"]["pwmcc"], dtype=float)
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    vals = mat[~np.isnan(mat)]
    im = ax.imshow(mat, vmin=min(vals.min(), best["random_pwmcc"]), vmax=vals.max(), cmap="viridis")
    seeds = rep.get("seeds", list(range(len(mat))))
    ax.set_xticks(range(len(seeds)), seeds)
    ax.set_yticks(range(len(seeds)), seeds)
    for i in range(len(mat)):
        for j in range(len(mat)):
            if i != j:
                ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w")
    bar = fig.colorbar(im, ax=ax, label="PWMCC")
    bar.ax.axhline(best["random_pwmcc"], color="r", lw=2)  # chance, marked on the colour scale
    bar.ax.text(1.05, best["random_pwmcc"], " chance", color="r", fontsize=7, transform=bar.ax.get_yaxis_transform())
    ax.set_title(f"PWMCC between seeds: {best['cell']}", fontsize=9)
    made.append(("Pairwise seed PWMCC (most stable cell)", _save(fig, fdir / "heatmap.png")))
    # matched cosines, trained vs random control
    matched = read_json(out / "cells" / best["cell"] / "matched.json")
    fig, ax = plt.subplots(figsize=(5, 3.4))
    bins = np.linspace(0, 1, 41)
    ax.hist(matched["trained"], bins=bins, alpha=0.7, density=True, label="trained")
    ax.hist(matched["random"], bins=bins, alpha=0.7, density=True, label="random control (untrained)")
    ax.set_xlabel(f"Hungarian-matched |cos|, seeds {matched['seeds'][0]} vs {matched['seeds'][1]}")
    ax.set_ylabel("density")
    ax.set_title(best["cell"], fontsize=9)
    ax.legend()
    made.append(("Matched cosines, trained vs random", _save(fig, fdir / "matched_hist.png")))
    # stability vs training steps
    fig, ax = plt.subplots(figsize=(5, 3.4))
    longest = {}  # shorter lengths are prefixes of the same run: plot each run once
    for r in records:
        key = (r["arch"], r["d_sae"], r["k"], r["sparsity_coef"])
        if key not in longest or r["steps"] > longest[key]["steps"]:
            longest[key] = r
    for r in longest.values():
        dyn = read_json(out / "cells" / r["cell"] / "history.json").get("dynamics") or []
        if dyn:
            label = r["cell"].rsplit("-len", 1)[0]
            line, = ax.plot([d["step"] for d in dyn], [d["pwmcc"] for d in dyn], marker="o", ms=3, label=label)
            ax.axhline(r["random_pwmcc"], color=line.get_color(), ls=":", lw=1)  # this cell's own chance
    ax.plot([], [], color="k", ls=":", lw=1, label="chance (per cell, same colour)")
    ax.set_title("Cross-seed PWMCC during training", fontsize=9)
    ax.set_xlabel("training step")
    ax.set_ylabel("PWMCC across seeds")
    ax.legend(fontsize=6, ncol=2)
    made.append(("Stability vs training steps", _save(fig, fdir / "dynamics.png")))
    # stability vs L0, vs d_sae (effective rank marked), EV vs L0
    for key, title, fname in (("l0", "Stability vs L0", "stability_vs_l0.png"),
                              ("d_sae", "Stability vs d_sae", "stability_vs_width.png")):
        fig, ax = plt.subplots(figsize=(5, 3.4))
        for arch in sorted({r["arch"] for r in records}):
            rs = sorted((r for r in records if r["arch"] == arch), key=lambda r: r[key])
            ax.scatter([r[key] for r in rs], [r["pwmcc"] for r in rs], label=f"{arch} trained")
            ax.scatter([r[key] for r in rs], [r["random_pwmcc"] for r in rs], marker="x", label=f"{arch} random")
        if key == "d_sae":
            ax.set_xscale("log", base=2)
            ax.axvline(records[0]["effective_rank_pr"], color="k", ls="--", lw=1, label="effective rank")
        ax.set_xlabel(key)
        ax.set_ylabel("PWMCC")
        ax.legend(fontsize=7)
        made.append((title, _save(fig, fdir / fname)))
    if any(r.get("loss_recovered") is not None for r in records):
        fig, ax = plt.subplots(figsize=(5, 3.4))
        for arch in sorted({r["arch"] for r in records}):
            rs = [r for r in records if r["arch"] == arch and r.get("loss_recovered") is not None]
            ax.errorbar([r["pwmcc"] for r in rs], [r["loss_recovered"] for r in rs], fmt="o", label=arch,
                        yerr=[[r["loss_recovered"] - r["loss_recovered_ci_low"] for r in rs],
                              [r["loss_recovered_ci_high"] - r["loss_recovered"] for r in rs]])
        ax.set_xlabel("PWMCC across seeds (stability)")
        ax.set_ylabel("fraction of loss recovered (spliced)")
        ax.legend(fontsize=7)
        made.append(("Loss recovered vs stability", _save(fig, fdir / "loss_recovered_vs_stability.png")))
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for arch in sorted({r["arch"] for r in records}):
        rs = [r for r in records if r["arch"] == arch]
        ax.scatter([r["l0"] for r in rs], [r["explained_variance"] for r in rs], label=arch)
    ax.set_xlabel("L0 (held-out)")
    ax.set_ylabel("explained variance (held-out)")
    ax.legend(fontsize=7)
    made.append(("Explained variance vs L0", _save(fig, fdir / "ev_vs_l0.png")))
    return made
