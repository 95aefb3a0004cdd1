"""Tables and figures of an experiment: ``summary.json``, ``summary.csv``, ``figures/*.png``, ``report.md``."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from saejax.io import atomic_write, read_json, to_jsonable, write_json

TABLE = [("cell", "{}"), ("pwmcc", "{:.3f}"), ("random_pwmcc", "{:.3f}"), ("pwmcc_ratio", "{:.2f}x"),
         ("hungarian_mean", "{:.3f}"), ("frac_ge_0.7", "{:.3f}"), ("explained_variance", "{:.3f}"),
         ("l0", "{:.1f}"), ("dead_fraction", "{:.2f}")]
DOWNSTREAM = [("cell", "{}"), ("pwmcc", "{:.3f}"), ("ce_clean", "{:.3f}"), ("ce_spliced", "{:.3f}"),
              ("ce_zero_ablation", "{:.3f}"), ("loss_recovered", "{:.3f}"), ("loss_recovered_ci_low", "{:.3f}"),
              ("loss_recovered_ci_high", "{:.3f}"), ("acc_clean", "{:.3f}"), ("acc_spliced", "{:.3f}"),
              ("kl_spliced", "{:.4f}"), ("probe_answer_raw_acc", "{:.3f}"), ("probe_answer_sae_acc", "{:.3f}"),
              ("probe_op_raw_acc", "{:.3f}"), ("probe_op_sae_acc", "{:.3f}"), ("usage_profile_corr", "{:.3f}")]


def _fmt(fmt, v):
    return "-" if v is None else fmt.format(v)


def table(records: list[dict], markdown: bool = False, columns=TABLE) -> str:
    """The headline columns, one row per cell (terminal text or a markdown table)."""
    columns = [(n, f) for n, f in columns if any(r.get(n) is not None for r in records)]
    head = [name for name, _ in columns]
    rows = [[_fmt(f, r.get(n)) for n, f in columns] for r in records]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def write_all(exp, records: list[dict], out: Path) -> None:
    """Everything above, atomically; figures first so a written ``report.md`` has all it links."""
    figs = figures(records, out)
    write_csv(out / "summary.csv", records)
    write_json(out / "summary.json", {"experiment": exp.name, "source": exp.source.describe(),
                                      "seeds": list(exp.seeds), "cells": records})
    md = [f"# {exp.name}", "", f"Source: {exp.source.describe()}. Seeds: {list(exp.seeds)}.", "",
          table(records, markdown=True), "", "Columns are documented in the saejax README.", ""]
    if any("loss_recovered" in r or any(k.startswith("probe_") for k in r) for r in records):
        md += ["## Downstream: spliced reconstructions and probes", "", table(records, markdown=True, columns=DOWNSTREAM), ""]
    md += [f"## {title}\n\n![{title}]({path.relative_to(out)})\n" for title, path in figs]
    atomic_write(out / "report.md", "\n".join(md))


def write_csv(path: Path, records: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in records for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    for r in to_jsonable(records):
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in keys})
    atomic_write(path, buf.getvalue())


# ----------------------------------------------------------------------------- figures
def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    atomic_write(path, buf.getvalue())
    return path


def figures(records: list[dict], out: Path) -> list[tuple[str, Path]]:
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
    im = ax.imshow(mat, vmin=0, vmax=1, cmap="viridis")
    seeds = rep.get("seeds", list(range(len(mat))))
    ax.set_xticks(range(len(seeds)), seeds)
    ax.set_yticks(range(len(seeds)), seeds)
    for i in range(len(mat)):
        for j in range(len(mat)):
            if i != j:
                ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w")
    fig.colorbar(im, ax=ax, label="PWMCC")
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
            ax.plot([d["step"] for d in dyn], [d["pwmcc"] for d in dyn], marker="o", ms=3, label=label)
    ax.axhline(np.mean([r["random_pwmcc"] for r in records]), color="k", ls=":", lw=1, label="random")
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
