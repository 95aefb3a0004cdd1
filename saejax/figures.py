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
    """Every figure of the report, as ``(title, path)``; failed cells have nothing to draw."""
    records = [r for r in records if r.get("pwmcc") is not None]
    if not records:
        return []
    import matplotlib

    matplotlib.use("Agg")
    fdir = out / "figures"
    best = max(records, key=lambda r: r["pwmcc"])
    made = [_heatmap(best, out, fdir), _matched(best, out, fdir), _dynamics(records, out, fdir)]
    made += _versus(records, fdir)
    if any(r.get("loss_recovered") is not None for r in records):
        made.append(_loss_recovered(records, fdir))
    return made + [_ev_vs_l0(records, fdir)]


def _axes(size=(5, 3.4)):
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=size)


def _heatmap(best: dict, out: Path, fdir: Path):
    """Pairwise seed PWMCC of the most stable cell; the colour scale spans the data, chance marked."""
    rep = read_json(out / "cells" / best["cell"] / "report.json")
    mat = np.array(rep["matrices"]["pwmcc"], dtype=float)
    fig, ax = _axes((4.2, 3.6))
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
    bar.ax.axhline(best["random_pwmcc"], color="r", lw=2)
    bar.ax.text(1.05, best["random_pwmcc"], " chance", color="r", fontsize=7, transform=bar.ax.get_yaxis_transform())
    ax.set_title(f"PWMCC between seeds: {best['cell']}", fontsize=9)
    return "Pairwise seed PWMCC (most stable cell)", _save(fig, fdir / "heatmap.png")


def _matched(best: dict, out: Path, fdir: Path):
    matched = read_json(out / "cells" / best["cell"] / "matched.json")
    fig, ax = _axes()
    bins = np.linspace(0, 1, 41).tolist()  # a list: matplotlib's stubs take Sequence[float], not ndarray
    ax.hist(matched["trained"], bins=bins, alpha=0.7, density=True, label="trained")
    ax.hist(matched["random"], bins=bins, alpha=0.7, density=True, label="random control (untrained)")
    ax.set_xlabel(f"Hungarian-matched |cos|, seeds {matched['seeds'][0]} vs {matched['seeds'][1]}")
    ax.set_ylabel("density")
    ax.set_title(f"Matched cosines: {best['cell']}", fontsize=9)
    ax.legend()
    return "Matched cosines, trained vs random", _save(fig, fdir / "matched_hist.png")


def _dynamics(records: list[dict], out: Path, fdir: Path):
    """Cross-seed PWMCC at the snapshot steps, each run once, with its own chance level."""
    fig, ax = _axes()
    longest = {}  # shorter lengths are prefixes of the same run: plot each run once
    for r in records:
        key = (r["arch"], r["d_sae"], r["k"], r["sparsity_coef"], r.get("lr"))
        if key not in longest or r["steps"] > longest[key]["steps"]:
            longest[key] = r
    for r in longest.values():
        dyn = read_json(out / "cells" / r["cell"] / "history.json").get("dynamics") or []
        if dyn:
            label = r["cell"].rsplit("-len", 1)[0]
            line, = ax.plot([d["step"] for d in dyn], [d["pwmcc"] for d in dyn], marker="o", ms=3, label=label)
            ax.axhline(r["random_pwmcc"], color=line.get_color(), ls=":", lw=1)
    ax.plot([], [], color="k", ls=":", lw=1, label="chance (per cell, same colour)")
    ax.set_title("Cross-seed PWMCC during training", fontsize=9)
    ax.set_xlabel("training step")
    ax.set_ylabel("PWMCC across seeds")
    ax.legend(fontsize=6, ncol=2)
    return "Stability vs training steps", _save(fig, fdir / "dynamics.png")


def _versus(records: list[dict], fdir: Path) -> list:
    """Stability vs L0 and vs d_sae (effective rank marked), trained and chance per cell."""
    made = []
    for key, title, fname in (("l0", "Stability vs L0", "stability_vs_l0.png"),
                              ("d_sae", "Stability vs d_sae", "stability_vs_width.png")):
        fig, ax = _axes()
        for arch in sorted({r["arch"] for r in records}):
            rs = sorted((r for r in records if r["arch"] == arch), key=lambda r: r[key])
            ax.scatter([r[key] for r in rs], [r["pwmcc"] for r in rs], label=f"{arch} trained")
            ax.scatter([r[key] for r in rs], [r["random_pwmcc"] for r in rs], marker="x", label=f"{arch} chance")
        if key == "d_sae":
            ax.set_xscale("log", base=2)
            ax.axvline(records[0]["effective_rank_pr"], color="k", ls="--", lw=1, label="effective rank")
        ax.set_xlabel(key)
        ax.set_ylabel("PWMCC")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
        made.append((title, _save(fig, fdir / fname)))
    return made


def _loss_recovered(records: list[dict], fdir: Path):
    fig, ax = _axes()
    for arch in sorted({r["arch"] for r in records}):
        rs = [r for r in records if r["arch"] == arch and r.get("loss_recovered") is not None]
        ax.errorbar([r["pwmcc"] for r in rs], [r["loss_recovered"] for r in rs], fmt="o", label=arch,
                    yerr=[[r["loss_recovered"] - r["loss_recovered_ci_low"] for r in rs],
                          [r["loss_recovered_ci_high"] - r["loss_recovered"] for r in rs]])
    ax.set_xlabel("PWMCC across seeds (stability)")
    ax.set_ylabel("fraction of loss recovered (spliced)")
    ax.set_title("Loss recovered vs stability", fontsize=9)
    ax.legend(fontsize=7)
    return "Loss recovered vs stability", _save(fig, fdir / "loss_recovered_vs_stability.png")


def _ev_vs_l0(records: list[dict], fdir: Path):
    fig, ax = _axes()
    for arch in sorted({r["arch"] for r in records}):
        rs = [r for r in records if r["arch"] == arch]
        ax.scatter([r["l0"] for r in rs], [r["explained_variance"] for r in rs], label=arch)
    ax.set_xlabel("L0 (held-out)")
    ax.set_ylabel("explained variance (held-out)")
    ax.set_title("Explained variance vs L0", fontsize=9)
    ax.legend(fontsize=7)
    return "Explained variance vs L0", _save(fig, fdir / "ev_vs_l0.png")
