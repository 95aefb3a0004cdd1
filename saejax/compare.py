"""``python -m saejax.compare SAE SAE [SAE ...]``: stability between saved or pretrained SAEs.

Each SAE is a local directory or ``params.npz`` file in a format that
:func:`saejax.pretrained.load_sae` reads: Gemma Scope, SAELens (also the runner's exports),
EleutherAI sparsify (a hookpoint's subdirectory) or dictionary_learning; e.g. Gemma Scope widths
16k/32k/65k of one layer, or one width at several layers. For every pair, smaller dictionary
first: decoder PWMCC (both directions), the smaller SAE's mean best |cos| in the larger and its
fractions above 0.8 / 0.9 (the Gemma Scope notebook's cross-width table), and the exact random
baseline of the same shapes with the ratio.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from saejax.errors import ConfigError
from saejax.io import write_json
from saejax.pretrained import load_sae


def compare(dirs: list[str | Path]) -> list[dict]:
    """One record per pair of SAEs (see the module docstring)."""
    from saejax.stability import pair_stats, random_baseline

    if len(dirs) < 2:
        raise ConfigError(f"compare needs at least 2 SAE directories, got {len(dirs)}")
    loaded = [(str(d), load_sae(d)[:2]) for d in dirs]
    rows = []
    for i in range(len(loaded)):
        for j in range(i + 1, len(loaded)):
            (na, (ca, pa)), (nb, (cb, pb)) = sorted([loaded[i], loaded[j]], key=lambda t: t[1][0].d_sae)
            if ca.d_in != cb.d_in:
                raise ConfigError(f"{na} has d_in={ca.d_in} but {nb} has d_in={cb.d_in}; compare SAEs of one model width")
            st = pair_stats(pa["W_dec"], pb["W_dec"], top_k=1)
            row_max, col_max = np.asarray(st.row_max), np.asarray(st.col_max)
            pw = 0.5 * (row_max.mean() + col_max.mean())
            rand = random_baseline(ca.d_in, ca.d_sae, cb.d_sae)
            rows.append({"a": na, "b": nb, "d_sae_a": ca.d_sae, "d_sae_b": cb.d_sae, "pwmcc": float(pw),
                         "mean_best_a_in_b": float(row_max.mean()), "frac_a_gt_0.8": float(np.mean(row_max > 0.8)),
                         "frac_a_gt_0.9": float(np.mean(row_max > 0.9)), "random_pwmcc": float(rand),
                         "ratio": float(pw / rand)})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m saejax.compare", description=__doc__.split("\n\n")[1] if __doc__ else None)
    p.add_argument("dirs", nargs="+",
                   help="SAE directories or params.npz files (Gemma Scope, SAELens, sparsify, dictionary_learning)")
    p.add_argument("--json", help="also write the records to this file")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        rows = compare(args.dirs)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r in rows:
        print(f"{r['a']} ({r['d_sae_a']}) vs {r['b']} ({r['d_sae_b']}): PWMCC {r['pwmcc']:.3f} "
              f"(random {r['random_pwmcc']:.3f}, {r['ratio']:.2f}x); best match of the smaller: "
              f"mean {r['mean_best_a_in_b']:.3f}, >0.8 {100 * r['frac_a_gt_0.8']:.1f}%, >0.9 {100 * r['frac_a_gt_0.9']:.1f}%")
    if args.json:
        write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
