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
    made += [_heatmaps(records, out, fdir), _ratio_vs_width(records, fdir)]
    if (out / "cells" / best["cell"] / "consensus.json").exists():
        made.append(_consensus_hist(best, out, fdir))
    if any(r.get("loss_recovered") is not None for r in records):
        made.append(_loss_recovered(records, fdir))
    if len({r.get("model_heldout_acc") for r in records}) > 1 and all(r.get("model_heldout_acc") is not None for r in records):
        made.append(_vs_model_quality(records, fdir))
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


def _heatmaps(records: list[dict], out: Path, fdir: Path):
    """The pairwise seed PWMCC of every cell on one colour scale, each titled with its chance level."""
    import matplotlib.pyplot as plt

    mats = [np.array(read_json(out / "cells" / r["cell"] / "report.json")["matrices"]["pwmcc"], dtype=float) for r in records]
    vals = np.concatenate([m[~np.isnan(m)] for m in mats])
    lo, hi = min(vals.min(), min(r["random_pwmcc"] for r in records)), vals.max()
    cols = int(np.ceil(np.sqrt(len(records))))
    rows = int(np.ceil(len(records) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.2 * rows + 0.4), squeeze=False)
    for ax, r, m in zip(axes.ravel(), records, mats):
        im = ax.imshow(m, vmin=lo, vmax=hi, cmap="viridis")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{r['cell']}\nchance {r['random_pwmcc']:.3f}", fontsize=6)
    for ax in axes.ravel()[len(records):]:
        ax.axis("off")
    fig.colorbar(im, ax=axes.ravel().tolist(), label="PWMCC", shrink=0.8)
    fig.suptitle("PWMCC between seeds, every cell (one colour scale)", fontsize=9)
    return "Pairwise seed PWMCC, every cell", _save(fig, fdir / "heatmaps.png")


def _ratio_vs_width(records: list[dict], fdir: Path):
    """PWMCC over its own cell's chance level vs d_sae, one line per series and training length."""
    fig, ax = _axes()
    length = "epochs" if "epochs" in records[0] else "steps"
    keys = sorted({(series(r), r.get(length)) for r in records}, key=str)
    for i, (name, n) in enumerate(keys):
        rs = sorted((r for r in records if (series(r), r.get(length)) == (name, n)), key=lambda r: r["d_sae"])
        ax.plot([r["d_sae"] for r in rs], [r["pwmcc_ratio"] for r in rs], marker="os^vD"[i % 5], ls="-" if i % 2 else "--",
                label=f"{name}, {n:g} {length}")
    ax.axhline(1.0, color="k", ls=":", lw=1, label="chance (ratio 1)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("d_sae")
    ax.set_ylabel("PWMCC / chance (per cell)")
    ax.set_title("Stability over chance vs width", fontsize=9)
    ax.legend(fontsize=6)
    return "Ratio to chance vs d_sae", _save(fig, fdir / "ratio_vs_width.png")


def _consensus_hist(best: dict, out: Path, fdir: Path):
    """Paulo & Belrose's curve for the most stable cell: latents found in exactly k seeds, trained vs control."""
    rep = read_json(out / "cells" / best["cell"] / "consensus.json")
    fig, ax = _axes()
    s = len(rep["histogram_frac"][0])
    ks = np.arange(1, s + 1)
    width = 0.8 / (2 * len(rep["thresholds"]))
    for i, tau in enumerate(rep["thresholds"]):
        ax.bar(ks + (2 * i - len(rep["thresholds"])) * width, rep["histogram_frac"][i], width, label=f"trained, |cos| >= {tau}")
        if rep.get("random"):
            rf = rep["random"]["histogram_frac"][i]  # the control may have fewer seeds
            ax.bar(np.arange(1, len(rf) + 1) + (2 * i + 1 - len(rep["thresholds"])) * width, rf, width,
                   hatch="//", alpha=0.5, label=f"random control, {tau}")
    ax.set_xticks(ks)
    ax.set_xlabel("found in exactly k seeds")
    ax.set_ylabel("fraction of latents")
    ax.set_title(f"Consensus: {best['cell']}", fontsize=9)
    ax.legend(fontsize=6)
    return "Consensus across seeds (found in k seeds)", _save(fig, fdir / "consensus_hist.png")


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


def series(r: dict) -> str:
    """A record's series in figures: its recipe where the experiment names recipes, else its arch;
    prefixed by its source where the experiment names several."""
    return (f"{r['source']}: " if r.get("source") else "") + (r.get("recipe") or r["arch"])


def _vs_model_quality(records: list[dict], fdir: Path):
    """PWMCC over its own cell's chance level vs the held-out accuracy of the model the
    activations come from, one line per architecture, width and training length."""
    fig, ax = _axes()
    keys = sorted({(r.get("recipe") or r["arch"], r["d_sae"], r.get("epochs"), r.get("steps")) for r in records}, key=str)
    for key in keys:
        rs = sorted((r for r in records if (r.get("recipe") or r["arch"], r["d_sae"], r.get("epochs"), r.get("steps")) == key),
                    key=lambda r: r["model_heldout_acc"])
        ax.plot([r["model_heldout_acc"] for r in rs], [r["pwmcc"] / r["random_pwmcc"] for r in rs], marker="o",
                label=f"{key[0]} w{key[1]}" + (f" {key[2]:g} ep" if key[2] is not None else f" {key[3]} steps"))
    ax.axhline(1.0, color="k", ls=":", lw=1, label="chance")
    ax.set_xlabel("model held-out accuracy")
    ax.set_ylabel("PWMCC / chance (per cell)")
    ax.set_title("Stability vs model quality", fontsize=9)
    ax.legend(fontsize=7)
    return "Stability vs model quality", _save(fig, fdir / "stability_vs_model_quality.png")


def _dynamics(records: list[dict], out: Path, fdir: Path):
    """Cross-seed PWMCC at the snapshot steps, each run once, with its own chance level."""
    fig, ax = _axes()
    longest = {}  # shorter lengths are prefixes of the same run: plot each run once
    for r in records:
        key = (series(r), r["d_sae"], r["k"], r["sparsity_coef"], r.get("lr"))
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
        for arch in sorted({series(r) for r in records}):
            rs = sorted((r for r in records if series(r) == arch), key=lambda r: r[key])
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
    for arch in sorted({series(r) for r in records}):
        rs = [r for r in records if series(r) == arch and r.get("loss_recovered") is not None]
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
    for arch in sorted({series(r) for r in records}):
        rs = [r for r in records if series(r) == arch]
        ax.scatter([r["l0"] for r in rs], [r["explained_variance"] for r in rs], label=arch)
    ax.set_xlabel("L0 (held-out)")
    ax.set_ylabel("explained variance (held-out)")
    ax.set_title("Explained variance vs L0", fontsize=9)
    ax.legend(fontsize=7)
    return "Explained variance vs L0", _save(fig, fdir / "ev_vs_l0.png")
