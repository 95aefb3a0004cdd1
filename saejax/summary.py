"""The results of a run: ``summary.json``, ``summary.csv`` and ``report.md`` (figures: :mod:`saejax.figures`)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from saejax.io import atomic_write, to_jsonable, write_json
from saejax.schema import check_record

TABLE = [("cell", "{}"), ("n_seeds", "{}"), ("pwmcc", "{:.3f}"), ("random_pwmcc", "{:.3f}"), ("pwmcc_ratio", "{:.2f}x"),
         ("hungarian_mean", "{:.3f}"), ("frac_ge_0.7", "{:.3f}"), ("explained_variance", "{:.3f}"),
         ("random_explained_variance", "{:.3f}"), ("l0", "{:.1f}"), ("dead_fraction", "{:.2f}")]
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
    """Everything above, atomically; figures first so a written ``report.md`` has all it links.
    Every record's columns are checked against :mod:`saejax.schema` first."""
    for r in records:
        check_record(r)
    from saejax.figures import figures

    figs = figures(records, out)
    write_csv(out / "summary.csv", records)
    write_json(out / "summary.json", {"experiment": exp.name, "source": exp.describe_source(),
                                      "seeds": list(exp.seeds), "cells": records})
    from saejax import contrasts
    from saejax.findings import findings

    rows = contrasts.compute(exp.contrasts, records, out)
    found = findings(records) + [line for line in [contrasts.finding(rows)] if line]
    md = [f"# {exp.name}", "", f"Source: {exp.describe_source()}. Seeds: {list(exp.seeds)}.", "",
          "## Findings", "", *found, "", "## Cells", "", table(records, markdown=True), "", "Columns are documented in saejax's `docs/columns.md`.", ""]
    if rows:
        write_json(out / "contrasts.json", rows)
        md += ["## Contrasts", "", "Differences a - b with 95% seed-bootstrap CIs; p: two-sided permutation test on "
               "per-seed scores, with the smallest p it can give.", "", contrasts.table(rows), ""]
    bad = [r for r in records if r.get("status", "ok") != "ok"]
    if bad:
        md += ["## Failed seeds and cells", "", "Failed seeds are left out of their cell's statistics "
               "(`n_seeds` counts the rest); a cell with fewer than 2 healthy seeds has no metrics.", ""]
        md += [f"- `{r['cell']}`: {r['status']} (seeds {r['failed_seeds']})" for r in bad] + [""]
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
