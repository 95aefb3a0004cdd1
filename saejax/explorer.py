"""The feature explorer: one self-contained ``OUT/explorer.html`` per run (opens from ``file://``:
no server, no network; HTML, CSS, vanilla JS and the data, as JSON, in one file).

Per cell (:func:`cell_page`): the seeds' exported SAEs (``cells/<cell>/saes/seed<N>``), the
consensus groups at ``tau`` from ``consensus.json`` (computed here when the run did not ask for the
``consensus`` analysis) and their members' pairwise |cos|; with the source, the held-out rows are
encoded once for all seeds by a jitted top-k over rows (:func:`topk_activations`, streamed in
blocks) giving every latent's activation density and top-activating rows. Rows become contexts:
for token sources the token in its surrounding text, for the modular model the ``a op b =``
prompt, otherwise the row index. Each cell's page data is kept as ``cells/<cell>/explorer.json``
and reused while its SAEs are unchanged, so ``saejax explore RUN_DIR`` rebuilds the page offline.
"""

from __future__ import annotations

import functools
import html
import json
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from saejax.io import atomic_write, load_saelens, read_json, to_jsonable, write_json


@dataclass(frozen=True)
class Options:
    tau: float = 0.7  # consensus threshold of the groups shown
    k: int = 8  # contexts per latent
    max_features: int = 300  # groups per cell on the page (most seeds, then highest mean |cos|, first)
    max_orphans: int = 200  # orphans per cell (densest first)
    left: int = 12  # text tokens shown before / after the activating one
    right: int = 4


# ----------------------------------------------------------------------------- top-k over rows
@functools.lru_cache(maxsize=32)
def _block_fn(cfg, k: int, with_threshold: bool):
    from saejax import sae

    def step(params, thr, xb, valid, start, best_v, best_r, count):
        enc = lambda p, t: sae.encode(cfg, p, xb, t if with_threshold else None)  # noqa: E731
        z = jax.vmap(enc)(params, thr)  # [S, B, d_sae]
        z = jnp.where(valid[None, :, None], z, -jnp.inf)
        count = count + jnp.sum(z > 0, axis=1, dtype=jnp.int32)
        z = jnp.swapaxes(z, 1, 2)  # [S, d_sae, B]
        rows = jnp.broadcast_to(start + jnp.arange(xb.shape[0], dtype=jnp.int32), z.shape)
        v, i = jax.lax.top_k(jnp.concatenate([best_v, z], 2), k)  # ties: the earlier row first
        return v, jnp.take_along_axis(jnp.concatenate([best_r, rows], 2), i, 2), count

    return jax.jit(step)


def topk_activations(cfg, params: dict, x, *, k: int = 8, threshold=None, block: int | None = None):
    """Each latent's ``k`` largest activations over the rows of ``x`` ``[n, d_in]`` for ``S`` SAEs
    (``params`` stacked, leading seed axis; ``threshold [S]`` for an architecture that infers with
    one): ``(values [S, d_sae, k], rows [S, d_sae, k], density [S, d_sae])``. One jitted program per
    block of rows merges into a running top-k; a slot without a firing row has value 0, row -1;
    ``density``: fraction of rows where the latent fires (> 0)."""
    x = np.asarray(x, np.float32)
    n, s, d = len(x), int(np.shape(params["W_dec"])[0]), cfg.d_sae
    block = int(block or max(64, (1 << 25) // max(1, s * d)))
    block = max(1, min(block, n))
    fn = _block_fn(cfg, int(k), threshold is not None)
    thr = jnp.zeros(s) if threshold is None else jnp.asarray(threshold, jnp.float32)
    p = {name: jnp.asarray(v) for name, v in params.items()}
    best_v = jnp.full((s, d, k), -jnp.inf, jnp.float32)
    best_r = jnp.full((s, d, k), -1, jnp.int32)
    count = jnp.zeros((s, d), jnp.int32)
    for start in range(0, n, block):
        xb = x[start : start + block]
        m = len(xb)
        if m < block:  # the last block padded to the same shape: one compilation
            xb = np.concatenate([xb, np.zeros((block - m, x.shape[1]), np.float32)])
        valid = jnp.arange(block) < m
        best_v, best_r, count = fn(p, thr, jnp.asarray(xb), valid, jnp.int32(start), best_v, best_r, count)
    v, r, c = (np.asarray(a) for a in jax.device_get((best_v, best_r, count)))
    fired = v > 0
    return np.where(fired, v, 0.0).astype(np.float32), np.where(fired, r, -1), c / max(n, 1)


# ----------------------------------------------------------------------------- rows -> contexts
def _tokenizer_decode(model_dir):
    """``ids -> strings`` with the model's tokenizer, or ``#id`` when it has none (test models)."""
    tok = None
    if model_dir:
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(model_dir)
        except Exception:  # no (usable) tokenizer: ids are shown
            tok = None
    if tok is None:
        return lambda ids: [f"#{i}" for i in ids]
    pieces = any(t.startswith("##") for t in tok.get_vocab())  # WordPiece: words carry no space of their own
    fix = (lambda s: s[2:] if s.startswith("##") else " " + s) if pieces else (lambda s: s)
    return lambda ids: [fix(tok.decode([int(i)])) for i in ids]


def context_renderer(spec, source, opts: Options, decode=None):
    """``(kind, render)``: ``render(rows) -> [(token strings, index of the activating token)]`` for
    held-out rows; kind ``text``, ``prompt`` (modular) or ``row`` (no tokens: the row index only)."""
    if not (hasattr(source, "extra") and hasattr(source, "n_tokens") and "tokens" in source.manifest.get("extras", {})):
        return "row", None
    from saejax.experiment import Modular

    tokens, mask = source.extra("tokens"), source.extra("mask")
    ends = np.cumsum(mask.sum(1))  # rows are the mask's True positions, context by context
    width = tokens.shape[1]
    modular = isinstance(spec, Modular)
    if modular:
        from saejax.models.modular import default_config

        p = default_config(spec.task).p
        names = {p: "+", p + 1: "*", p + 2: "="}
        decode = lambda ids: [names.get(int(i), str(int(i))) for i in ids]  # noqa: E731
        op = "*" if spec.task == "mul" else "+"
    elif decode is None:
        decode = _tokenizer_decode(source.manifest.get("model_dir"))
    memo: dict[int, str] = {}

    def render(rows):
        g = int(source.n_tokens) + np.asarray(rows, np.int64)
        ctx = np.searchsorted(ends, g, side="right")
        nth = g - np.where(ctx > 0, ends[np.maximum(ctx - 1, 0)], 0)
        pos = np.array([np.flatnonzero(mask[c])[i] for c, i in zip(ctx, nth)], np.int64)
        lo = np.zeros_like(pos) if modular else np.maximum(pos - opts.left, 0)
        hi = np.full_like(pos, width) if modular else np.minimum(pos + opts.right + 1, width)
        need = sorted({int(t) for c, a, b in zip(ctx, lo, hi) for t in tokens[c, a:b]} - memo.keys())
        memo.update(zip(need, (t.replace("\n", "\u21b5") for t in decode(need))))
        out = []
        for c, a, b, q in zip(ctx, lo, hi, pos):
            strs, at = [memo[int(t)] for t in tokens[c, a:b]], int(q - a)
            if modular and len(strs) == 3:  # a b =: the op is implicit in a one-op task
                strs, at = [strs[0], op, *strs[1:]], at + (at >= 1)
            out.append((strs, at))
        return out

    return ("prompt" if modular else "text"), render


# ----------------------------------------------------------------------------- one cell
def load_cell_saes(cdir: Path):
    """``(seeds, cfg, params stacked over seeds)`` from ``cells/<cell>/saes/seed<N>``, in the
    cell's seed order (``history.json``), or None when the cell exported none."""
    dirs = {int(p.name[4:]): p for p in (cdir / "saes").glob("seed*") if p.name[4:].isdigit()}
    if len(dirs) < 2:
        return None
    order = read_json(cdir / "history.json").get("seeds") if (cdir / "history.json").is_file() else None
    seeds = [s for s in (order or sorted(dirs)) if s in dirs]
    loaded = [load_saelens(dirs[s]) for s in seeds]
    params = {k: np.stack([p[k] for _, p in loaded]) for k in loaded[0][1]}
    return seeds, loaded[0][0], params


def _stamp(cdir: Path, opts: Options) -> dict:
    files = sorted(cdir.glob("saes/seed*/sae_weights.safetensors")) + sorted(cdir.glob("consensus.json"))
    return {"options": asdict(opts), "files": {str(f.relative_to(cdir)): [f.stat().st_size, f.stat().st_mtime_ns]
                                               for f in files}}


def _groups(cdir: Path, dec, enc, tau: float) -> dict:
    path = cdir / "consensus.json"
    if path.is_file():
        for g in read_json(path).get("groups", []):
            if abs(g["threshold"] - tau) < 1e-9:
                return g
    from saejax.stability.consensus import consensus

    return to_jsonable(consensus(dec, enc, thresholds=(tau,), random_control=False).groups[0].to_dict())


def _r(x, nd=4):
    return None if x is None or not np.isfinite(x) else round(float(x), nd)


def cell_page(cdir: Path, record: dict, *, spec=None, source=None, heldout=None, opts: Options = Options(),
              decode=None) -> dict:
    """The page data of one cell (see the module docstring); contexts only with ``source`` and
    ``heldout`` (the rows the run evaluated on), and only for the latents the page lists."""
    page = {"id": record.get("cell", cdir.name), "status": record.get("status", "ok"), "tau": opts.tau,
            "kind": "none", "features": [], "orphans": [], "latents": {}, "strings": [], "notes": []}
    saes = load_cell_saes(cdir)
    if saes is None:
        page["notes"].append("no exported SAEs for this cell (fewer than 2 healthy seeds)")
        return page
    seeds, cfg, params = saes
    dec, enc = params["W_dec"], params["W_enc"].transpose(0, 2, 1)
    g = _groups(cdir, dec, enc, opts.tau)
    members, n_seeds = np.asarray(g["members"], np.int64).reshape(-1, len(seeds)), np.asarray(g["n_seeds"])
    density = vals = rows = None
    if source is not None and heldout is not None and len(heldout):
        vals, rows, density = topk_activations(cfg, params, heldout, k=opts.k)
    order = sorted(range(len(members)), key=lambda i: (-n_seeds[i], -g["mean_abs_cos"][i], i))
    shown = order[: opts.max_features]
    unit = dec / np.maximum(np.linalg.norm(dec, axis=2, keepdims=True), 1e-12)
    m = members[shown]
    u = unit[np.arange(len(seeds))[None, :], np.maximum(m, 0)]  # [G, S, d_in]
    cos = np.abs(np.einsum("gsd,gtd->gst", u, u)) if len(shown) else np.zeros((0, len(seeds), len(seeds)))
    for j, gi in enumerate(shown):
        here = m[j] >= 0
        d = None if density is None else float(np.mean(density[here.nonzero()[0], m[j][here]]))
        page["features"].append({
            "id": int(gi), "seeds": int(n_seeds[gi]), "mean_cos": _r(g["mean_abs_cos"][gi]),
            "min_cos": _r(g["min_abs_cos"][gi]), "density": _r(d, 6), "members": m[j].tolist(),
            "cos": [[_r(cos[j, a, b], 3) if here[a] and here[b] else None for b in range(len(seeds))]
                    for a in range(len(seeds))]})
    orphans = [(s, int(a)) for s, lat in enumerate(g["orphans"]) for a in lat]
    if density is not None:
        orphans.sort(key=lambda sa: -density[sa[0], sa[1]])
    page["orphans"] = [{"seed": s, "latent": a, "density": None if density is None else _r(density[s, a], 6)}
                       for s, a in orphans[: opts.max_orphans]]
    page.update(seeds=seeds, arch=cfg.arch, d_sae=cfg.d_sae, n_groups=len(members), n_orphans=len(orphans),
                n_rows=0 if heldout is None else len(heldout))
    if len(members) > len(shown) or len(orphans) > opts.max_orphans:
        page["notes"].append(f"capped: showing {len(shown)} of {len(members)} groups and "
                             f"{min(len(orphans), opts.max_orphans)} of {len(orphans)} orphans")
    if vals is None or rows is None or density is None:
        page["notes"].append("no contexts: the held-out activations were not available when this page was built")
        return page
    want = sorted({(s, int(a)) for f in page["features"] for s, a in enumerate(f["members"]) if a >= 0}
                  | {(o["seed"], o["latent"]) for o in page["orphans"]})
    kind, render = context_renderer(spec, source, opts, decode)
    page["kind"] = kind
    strings: dict[str, int] = {}
    for s, a in want:
        hit = rows[s, a] >= 0
        ctx = [[_r(v), int(r)] for v, r in zip(vals[s, a][hit], rows[s, a][hit])]
        if render is not None and ctx:
            for c, (toks, at) in zip(ctx, render(rows[s, a][hit])):
                c += [[strings.setdefault(t, len(strings)) for t in toks], at]
        page["latents"][f"{s}:{a}"] = {"density": _r(density[s, a], 6), "contexts": ctx}
    page["strings"] = list(strings)
    return page


# ----------------------------------------------------------------------------- the run
def build_cells(out: Path, records: list[dict], *, spec=None, source=None, heldout=None, opts: Options = Options(),
                decode=None, on_cell=None) -> list[dict]:
    """Every cell's page data, reused from ``cells/<cell>/explorer.json`` while its SAEs (and the
    options) are unchanged and it has contexts whenever ``source`` could give them; ``on_cell()``
    is called after each cell (progress)."""
    cells = []
    for rec in records:
        if on_cell is not None and cells:
            on_cell()
        cdir = Path(out) / "cells" / rec["cell"]
        stamp, cache = _stamp(cdir, opts), cdir / "explorer.json"
        old = read_json(cache) if cache.is_file() else None
        if old and old.get("stamp") == stamp and old.get("status") == rec.get("status", "ok") and (
                source is None or (old["kind"] != "none" and old.get("n_rows") == (0 if heldout is None else len(heldout)))):
            cells.append(old)
            continue
        page = {**cell_page(cdir, rec, spec=spec, source=source, heldout=heldout, opts=opts, decode=decode),
                "stamp": stamp}
        if cdir.is_dir():
            write_json(cache, page)
        cells.append(to_jsonable(page))
    if on_cell is not None and cells:
        on_cell()
    return cells


def render_html(data: dict) -> str:
    """The page: ``data`` embedded as JSON (``<``, ``>``, ``&`` escaped, so no text ends the script)."""
    blob = json.dumps(to_jsonable(data), separators=(",", ":"), allow_nan=False)
    blob = blob.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    title = html.escape(f"saejax explorer: {data.get('title', '')}")
    page = resources.files("saejax").joinpath("explorer_page.html").read_text(encoding="utf-8")
    return page.replace("__TITLE__", title).replace("__DATA__", blob)


def write_explorer(out, records: list[dict], *, spec=None, source=None, heldout_tokens: int | None = None,
                   title: str = "", description: str = "", opts: Options = Options(), decode=None,
                   on_cell=None, by_source: dict | None = None) -> Path:
    """Write ``OUT/explorer.html`` (atomically) for the run's cell ``records``; with the built
    ``source`` (and its spec) the contexts are gathered from its first ``heldout_tokens`` held-out rows.
    ``by_source``: ``{record["source"]: (spec, source)}`` where the run has several named sources."""
    out = Path(out)
    cells = []
    for name, (spec_, source_) in (by_source or {None: (spec, source)}).items():
        heldout = None if source_ is None else np.asarray(source_.heldout()[:heldout_tokens], np.float32)
        mine = records if by_source is None else [r for r in records if r.get("source") == name]
        cells += build_cells(out, mine, spec=spec_, source=source_, heldout=heldout, opts=opts, decode=decode,
                             on_cell=on_cell)
    for c in cells:
        c.pop("stamp", None)
    data = {"title": title, "source": description, "tau": opts.tau, "k": opts.k, "cells": cells}
    return atomic_write(out / "explorer.html", render_html(data))
