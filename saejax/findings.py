"""The opening of ``report.md``: a few sentences generated from the cell records that answer the
question (which cells agree beyond chance, by how much, whether features recur), so the reader
does not have to work it out from the tables."""

from __future__ import annotations


def _ci(r: dict) -> str:
    return f"{r['pwmcc']:.3f} [{r['pwmcc_ci_low']:.3f}, {r['pwmcc_ci_high']:.3f}]"


def findings(records: list[dict]) -> list[str]:
    """Markdown bullet lines; every number comes from the records."""
    ok = [r for r in records if r.get("pwmcc") is not None]
    out = []
    if len(ok) < len(records):
        out.append(f"- {len(records) - len(ok)} of {len(records)} cells failed (fewer than 2 healthy seeds); see below.")
    if not ok:
        return out
    above = [r for r in ok if r["pwmcc_ci_low"] is not None and r["pwmcc_ci_low"] > r["random_pwmcc"]]
    out.append(f"- {len(above)} of {len(ok)} cells agree across seeds beyond chance (the 95% CI of PWMCC lies "
               "above the untrained control of the same shape); "
               + ("none do." if not above else f"the ratio to chance runs {min(r['pwmcc_ratio'] for r in above):.2f}x"
                  f"-{max(r['pwmcc_ratio'] for r in above):.2f}x."))
    best, worst = max(ok, key=lambda r: r["pwmcc_ratio"]), min(ok, key=lambda r: r["pwmcc_ratio"])
    out.append(f"- Most stable: `{best['cell']}`, PWMCC {_ci(best)} vs chance {best['random_pwmcc']:.3f} "
               f"({best['pwmcc_ratio']:.2f}x); least: `{worst['cell']}`, {_ci(worst)} vs {worst['random_pwmcc']:.3f} "
               f"({worst['pwmcc_ratio']:.2f}x).")
    for t in ("0.7", "0.9"):
        key = f"frac_ge_{t}"
        vals = [r for r in ok if r.get(key) is not None]
        if vals:
            top = max(vals, key=lambda r: r[key])
            none = sum(r[key] < 0.005 for r in vals)
            out.append(f"- Features that recur (one-to-one match at |cos| >= {t}): at most {100 * top[key]:.1f}% of "
                       f"latents (`{top['cell']}`); {none} of {len(vals)} cells have under 0.5%.")
    floors = [r for r in ok if r.get("p_value_vs_random") is not None and r.get("p_value_resolution")]
    if floors:
        r0 = floors[0]
        res = r0["p_value_resolution"]
        at = [r for r in floors if r["p_value_vs_random"] <= r["p_value_resolution"] + 1e-12]
        line = (f"- Permutation p-values resolve only down to {res:.4f} ({r0['n_seeds']} trained vs {r0['n_random']} "
                f"random seeds); {len(at)} of {len(floors)} cells sit at that floor.")
        if at and all(r.get("p_value_analytic") is not None for r in at):
            sig = [r for r in at if r["p_value_analytic"] < 0.05 / len(ok)]
            line += (f" The analytic test against the exact chance distribution (conservative, no floor) puts "
                     f"{len(sig)} of them below 0.05/{len(ok)} (Bonferroni over cells): p from "
                     f"{min(r['p_value_analytic'] for r in at):.1e} to {max(r['p_value_analytic'] for r in at):.1e}. It tests against isotropic dictionaries, so any "
                     "anisotropy of the trained ones rejects it too: it says 'not chance', the ratio says how far.")
        out.append(line)
    return out
