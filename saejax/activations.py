"""Any Transformers model + a corpus -> hooked activations -> the on-disk cache; and dry-run plans.

The model side (Auto class, block lists, sites, hooks) is :mod:`saejax.hf_models`; locating a
model and reading its config is :mod:`saejax.hf_locate`; corpora and packing are
:mod:`saejax.corpus`. This module ties them together:

- :class:`ExtractSpec`: one model, one corpus, any number of ``(layer, site)`` points;
- :func:`extract`: every missing point in ONE forward pass per batch, into the cache; points
  already cached are read back without loading (or converting, or downloading) the model;
- :func:`plan`: what :func:`extract` would do, from configs and the cache only (no weights).

Validation happens before any model is loaded, one line each: unknown site, layer out of range
(from the config), corpus smaller than the token budget (after tokenizing, before loading).

Positions (``positions``): ``None``/``"all"`` every position, ``"last"`` the last kept token of
each context, or a tuple of offsets; ``drop_bos`` (default) never stores the window's added
special tokens (decoders: BOS at position 0; encoders: [CLS] and [SEP]); padding never counts.

The setups of the source studies, as plain constructor calls (they need the hub)::

    owt = HFDataset("Skylion007/openwebtext")
    ExtractSpec("gpt2", owt, sites=("blocks.0.hook_resid_pre",), ctx_len=128, n_tokens=1_000_000)
    ExtractSpec("meta-llama/Llama-3.2-1B", owt, layers=(4, 8, 14), sites=("resid_post",), dtype="bfloat16")
    ExtractSpec("google/gemma-2-2b", owt, layers=(12,), sites=("resid_post",), dtype="bfloat16")
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from saejax.cache import CachedActivations, CacheWriter, cache_root, default_heldout, fingerprint_key, read_manifest
from saejax.contexts import contexts, window_for  # noqa: F401
from saejax.corpus import HFDataset, PythonDocs, TextFiles, TokenFile, TokenIds
from saejax.data import SourcePlan
from saejax.errors import ConfigError, check
from saejax.hf_locate import ModelInfo, ModelRef, has_mlm_head, locate
from saejax.hf_models import (  # noqa: F401
    DTYPES,
    SITES,
    capture,
    find_blocks,
    load_model,
    materialize,
    patched_logits,
    resolve_model,
    site_module,
)

EXTRACT_VERSION = 2  # bump when a change here alters the stored numbers: old caches then miss
STORE_DTYPES = ("float32", "float16", "bfloat16")
Dataset = TextFiles | HFDataset | TokenIds | TokenFile | PythonDocs


def parse_hook(name: str, layers: tuple[int, ...] = ()) -> list[tuple[int, str]]:
    """``'resid_post'`` (crossed with ``layers``) or ``'blocks.6.hook_resid_post'`` -> ``[(layer, site)]``."""
    if name in SITES:
        return [(int(l), name) for l in layers]
    parts = name.split(".")
    if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit() and parts[2].startswith("hook_"):
        site = parts[2][len("hook_"):]
        if site in SITES:
            return [(int(parts[1]), site)]
    raise ConfigError(f"unknown site {name!r}: expected one of {', '.join(SITES)} "
                      f"or a hook name like 'blocks.6.hook_resid_post'")


@dataclass(frozen=True)
class ExtractSpec:
    """What to extract: one model, one corpus, any number of ``(layer, site)`` points, one pass each batch."""

    model: str
    """Hub id (``"gpt2"``), a local ``save_pretrained`` directory, or a ``.gguf`` file."""
    dataset: Dataset
    """:class:`TextFiles`, :class:`HFDataset`, :class:`TokenIds` or :class:`TokenFile`."""
    layers: tuple[int, ...] = (0,)
    """Block indices crossed with every bare site name in ``sites``."""
    sites: tuple[str, ...] = ("resid_post",)
    """Bare sites (:data:`SITES`) and/or TransformerLens names such as ``"blocks.6.hook_resid_post"``."""
    revision: str | None = None
    """Hub branch, tag or commit; ``None`` is the default branch. Ignored for local models."""
    dtype: str = "float32"
    """Model weights dtype: ``float32``, ``float16`` or ``bfloat16``."""
    ctx_len: int = 128
    """Tokens per packed window (2-D token contexts keep their own length)."""
    n_tokens: int | None = 1_000_000
    """Token budget: activation rows stored per point. ``None``: the whole corpus (finite corpora)."""
    prepend_bos: bool = True
    """Decoders: start every packed window with BOS (when the tokenizer has one). Encoders always get [CLS] ... [SEP]."""
    drop_bos: bool = True
    """Do not store the window's added special tokens (BOS; [CLS] and [SEP])."""
    positions: str | tuple[int, ...] | None = None
    """``None``/``"all"``, ``"last"`` or a tuple of context offsets (negative from the end)."""
    store_dtype: str = "float32"
    """On-disk dtype: ``float32``, ``float16`` or ``bfloat16`` (stored as its uint16 bits)."""
    batch_size: int = 8
    """Contexts per forward pass (speed and memory only; not part of the cache key)."""
    blocks: str | None = None
    """Path of the block list (e.g. ``"model.layers"``) for layouts the rules do not find."""

    def __post_init__(self):
        tup = lambda v: (v,) if isinstance(v, (int, str)) else tuple(v)  # noqa: E731
        object.__setattr__(self, "layers", tup(self.layers))
        object.__setattr__(self, "sites", tup(self.sites))
        if self.positions is not None and not isinstance(self.positions, str):
            object.__setattr__(self, "positions", tup(self.positions))
        check(isinstance(self.model, str) and self.model, f"model must be a hub id, a directory or a .gguf file, got {self.model!r}")
        check(isinstance(self.dataset, (TextFiles, HFDataset, TokenIds, TokenFile, PythonDocs)),
              f"dataset must be TextFiles, HFDataset, TokenIds or TokenFile, got {type(self.dataset).__name__}")
        check(all(isinstance(l, int) and l >= 0 for l in self.layers), f"layers must be non-negative ints, got {self.layers}")
        check(len(self.sites) > 0, "sites is empty: give at least one of " + ", ".join(SITES))
        check(self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        check(self.store_dtype in STORE_DTYPES, f"store_dtype must be one of {', '.join(STORE_DTYPES)}, got {self.store_dtype!r}")
        check(not isinstance(self.positions, str) or self.positions in ("all", "last"),
              f"positions must be 'all', 'last', None or a tuple of offsets, got {self.positions!r}")
        check(self.ctx_len > 1, f"ctx_len must be at least 2, got {self.ctx_len}")
        check(self.n_tokens is None or self.n_tokens > 0, f"n_tokens must be positive or None, got {self.n_tokens}")
        check(self.batch_size > 0, f"batch_size must be positive, got {self.batch_size}")
        check(len(self.points) > 0, f"no (layer, site) to extract: sites {self.sites} with layers {self.layers}")

    @property
    def points(self) -> tuple[tuple[int, str], ...]:
        """The distinct ``(layer, site)`` pairs, in request order."""
        pts = [p for s in self.sites for p in parse_hook(s, self.layers)]
        return tuple(dict.fromkeys(pts))

    @property
    def packed(self) -> bool:
        """Text (or a 1-D token stream) packed into ``ctx_len`` windows, vs 2-D contexts used as given."""
        return not isinstance(self.dataset, TokenIds) and not (isinstance(self.dataset, TokenFile)
                                                               and self.dataset.array().ndim == 2)

    def fingerprint(self, layer: int, site: str, weights: str, cache_dir=None) -> dict:
        """Everything that changes the stored numbers of one point (the cache key hashes this).
        The model enters by content (``weights``), never by path or name."""
        packed = self.packed
        return {"extract_version": EXTRACT_VERSION, "weights": weights, "layer": layer, "site": site,
                "dataset": self.dataset.fingerprint(cache_dir), "ctx_len": self.ctx_len if packed else None,
                "n_tokens": self.n_tokens, "prepend_bos": self.prepend_bos if packed else None,
                "drop_bos": self.drop_bos, "positions": self.positions, "dtype": self.dtype,
                "store_dtype": self.store_dtype, "blocks": self.blocks}


def check_points(spec: ExtractSpec, info: ModelInfo) -> None:
    """Layer range from the config, before any model is loaded."""
    for layer, _ in spec.points:
        check(layer < info.n_layers, f"layer {layer} is out of range for {info.name} ({info.n_layers} layers): "
                                     f"valid layers are 0..{info.n_layers - 1}")


# ----------------------------------------------------------------------------- extraction
def cache_path(spec: ExtractSpec, layer: int, site: str, name: str, weights: str, cache_dir=None) -> Path:
    """The entry of one point: an existing complete entry with this key (whatever model name it
    was written under: copies find it), else ``<name>-L<layer>-<site>-<key>``."""
    parent = cache_root(cache_dir) / "activations"
    key = fingerprint_key(spec.fingerprint(layer, site, weights, cache_dir))
    found = [p for p in sorted(parent.glob(f"*-{key}")) if read_manifest(p) is not None] if parent.is_dir() else []
    return found[0] if found else parent / f"{name}-L{layer}-{site}-{key}"


def _located(spec: ExtractSpec, cache_dir) -> ModelRef:
    ref = locate(spec.model, spec.revision, cache_dir=cache_dir)
    check(ref.missing is None, ref.missing or "")
    assert ref.info is not None  # a model that is not missing has its config read
    check_points(spec, ref.info)
    return ref


def extract(spec: ExtractSpec, *, cache_dir=None, shard_rows: int | None = None, progress: bool = True,
            device: str | None = None, **reader_kw) -> dict[tuple[int, str], CachedActivations]:
    """Extract every point of ``spec`` (one forward pass per batch for all of them) into the cache.

    Points already cached are not recomputed, and if all are cached the model is never loaded,
    converted or downloaded. Returns ``{(layer, site): CachedActivations}``; ``reader_kw``
    (``n_heldout``, ``heldout_frac``, ``verify``) go to each reader.
    """
    ref = _located(spec, cache_dir)
    assert ref.info is not None and ref.weights is not None  # _located checked the model is found
    paths = {pt: cache_path(spec, *pt, ref.info.name, ref.weights, cache_dir) for pt in spec.points}
    todo = {pt: p for pt, p in paths.items() if read_manifest(p) is None}
    if todo:
        model_dir, _ = materialize(ref, cache_dir)
        _run(spec, ref, model_dir, todo, shard_rows, progress, device, cache_dir)
    return {pt: CachedActivations(p, **reader_kw) for pt, p in paths.items()}


def extract_one(spec: ExtractSpec, **kw) -> CachedActivations:
    """:func:`extract` for a spec with exactly one point; returns its reader."""
    check(len(spec.points) == 1, f"extract_one needs exactly one (layer, site), spec has {list(spec.points)}")
    return extract(spec, **kw)[spec.points[0]]


def _run(spec, ref, model_dir, paths, shard_rows, progress, device, cache_dir) -> None:
    import torch

    from saejax.progress import bar as progress_bar

    ids, mask, window = contexts(spec, model_dir, ref.info)  # before loading: a small corpus fails fast
    model = load_model(model_dir, spec.dtype, device)
    dev = next(model.parameters()).device
    t0 = time.time()
    writers = {pt: CacheWriter(p, spec.fingerprint(*pt, ref.weights, cache_dir), ref.info.d_model,
                               dtype=spec.store_dtype, shard_rows=shard_rows) for pt, p in paths.items()}
    try:
        bar = progress_bar(int(mask.sum()), f"extract {ref.info.name}", unit="tok", enabled=progress)
        for i in range(0, len(ids), spec.batch_size):
            x = torch.from_numpy(ids[i : i + spec.batch_size]).to(dev)
            m = torch.from_numpy(mask[i : i + spec.batch_size]).to(dev)
            am = (x != window.pad).long() if window.pad is not None else None
            acts = capture(model, x, list(paths), attention_mask=am, blocks=spec.blocks)
            for pt, w in writers.items():
                w.append(acts[pt][m].float().cpu().numpy())
            bar.update(int(m.sum()))
        bar.close()
        same = bool((mask[:-1] == mask[0]).all())  # every context keeps the same positions (last may be trimmed)
        positions = np.flatnonzero(mask[0]).tolist() if same else None
        for w in writers.values():
            w.add_array("tokens", ids.astype(np.int32))
            w.add_array("mask", mask)
            w.commit(model=ref.info.name, model_dir=str(model_dir), n_contexts=len(ids), context_len=int(ids.shape[1]),
                     positions=positions, seconds=round(time.time() - t0, 3), device=str(dev))
    finally:
        for w in writers.values():
            if w.tmp.exists():
                w.abort()


# ----------------------------------------------------------------------------- planning (no weights)
def _train_tokens(total: int, heldout_frac: float | None) -> int:
    held = max(1, int(round(heldout_frac * total))) if heldout_frac else default_heldout(total)
    return total - held


def plan(spec: ExtractSpec, *, cache_dir=None, heldout_frac: float | None = None) -> SourcePlan:
    """What :func:`extract` would do, from configs and the cache only: no weights are read and
    nothing is downloaded, converted or extracted. Training tokens assume ``heldout_frac``."""
    ref = locate(spec.model, spec.revision, cache_dir=cache_dir)
    if ref.missing is not None:
        return SourcePlan(0, None, (), missing=ref.missing)
    info = ref.info
    assert info is not None and ref.weights is not None  # a model that is not missing has both
    check_points(spec, info)
    lines = []
    if ref.path is None:
        lines.append(f"convert {ref.gguf} (dequantise once into the cache)" if ref.kind == "gguf"
                     else f"download {spec.model} from the hub")
    totals, what = [], spec.dataset.describe()
    for layer, site in spec.points:
        path = cache_path(spec, layer, site, info.name, ref.weights, cache_dir)
        m = read_manifest(path)
        totals.append(m["n_tokens"] if m else spec.n_tokens)
        if m:
            lines.append(f"cached: {path.name} ({m['n_tokens']:,} tokens)")
        elif spec.n_tokens is None:
            lines.append(f"extract {info.name} L{layer} {site}: every token of {what}")
        else:
            mib = spec.n_tokens * info.d_model * (4 if spec.store_dtype == "float32" else 2) / 2**20
            lines.append(f"extract {info.name} L{layer} {site}: {spec.n_tokens:,} tokens x {info.d_model} "
                         f"({mib:,.1f} MiB as {spec.store_dtype}) from {what}")
    total = totals[0]
    return SourcePlan(info.d_model, None if total is None else _train_tokens(total, heldout_frac), tuple(lines))


# ----------------------------------------------------------------------------- experiment-file sources
def dataset_of(src: HF) -> Dataset:
    """An :class:`HF` source's ``dataset`` string: ``python-docs``, a ``.npy`` token file, a
    ``.txt``/``.jsonl``/``.parquet`` file or a directory (:class:`TextFiles`), else a hub dataset name."""
    name = str(src.dataset)
    if name == "python-docs":
        return PythonDocs()
    if name.endswith(".npy"):
        return TokenFile(name)
    if name.endswith((".txt", ".jsonl", ".parquet")) or os.path.isdir(name):
        return TextFiles((name,), src.text_column)
    return HFDataset(name, src.dataset_config, src.split, src.text_column)


def spec_from_source(src: HF) -> tuple[ExtractSpec, dict]:
    """:class:`ExtractSpec` and reader options of an :class:`HF` source (its ``hook`` is
    ``"6.resid_post"`` or ``"blocks.6.hook_resid_post"``); every value is the source's own field."""
    hook = str(src.hook)
    layer, _, site = hook.partition(".")
    layers, sites = ((int(layer),), (site,)) if layer.isdigit() and site in SITES else ((), (hook,))
    spec = ExtractSpec(src.model, dataset_of(src), layers=layers, sites=sites, revision=src.revision,
                       dtype=src.dtype, ctx_len=src.ctx_len, n_tokens=src.n_tokens, drop_bos=src.drop_bos,
                       positions=src.positions, store_dtype=src.store_dtype, blocks=src.blocks,
                       batch_size=src.batch_size)
    return spec, ({"heldout_frac": src.heldout_frac} if src.heldout_frac else {})


def extract_together(sources, *, cache_dir=None, progress: bool = True) -> int:
    """Extract the :class:`HF` sources among ``sources`` that share a model, corpus and settings
    (differing only in their hook) in one pass each group: one forward per batch for every hook.
    Each source's ``build`` then finds its cache. Returns the number of passes made."""
    groups: dict[str, list[ExtractSpec]] = {}
    for src in sources:
        if isinstance(src, HF):
            spec, kw = spec_from_source(src)
            groups.setdefault(repr((replace(spec, layers=(0,), sites=("resid_post",)), kw)), []).append(spec)
    passes = 0
    for specs in groups.values():
        points = list(dict.fromkeys(p for s in specs for p in s.points))
        if len(points) < 2:
            continue
        merged = replace(specs[0], layers=(), sites=tuple(f"blocks.{layer}.hook_{site}" for layer, site in points))
        extract(merged, cache_dir=cache_dir, progress=progress)
        passes += 1
    return passes


def hf_source(src: HF, *, cache_dir=None, progress: bool = True) -> CachedActivations:
    """The reader of an experiment-file source (see :func:`spec_from_source`), extracted on first use."""
    spec, kw = spec_from_source(src)
    return extract_one(spec, cache_dir=cache_dir, progress=progress, **kw)


def hf_plan(src: HF, *, cache_dir=None) -> SourcePlan:
    """:func:`plan` of an experiment-file source: configs and the cache only, no weights."""
    spec, kw = spec_from_source(src)
    return plan(spec, cache_dir=cache_dir, heldout_frac=kw.get("heldout_frac"))


@dataclass(frozen=True)
class HF:
    """An experiment's Hugging Face source: activations of any Transformers model (a hub id, a local
    directory or a ``.gguf`` file), extracted once and cached. ``hook``: ``"<layer>.<site>"`` or
    ``"blocks.6.hook_resid_post"``; ``dataset``: see :func:`dataset_of`; the rest as in
    :class:`ExtractSpec`. ``probe_dataset``: a ``.jsonl`` with ``text`` and ``probe_label`` fields
    for the ``probe`` analysis (:func:`saejax.downstream.hf_downstream`)."""

    model: str
    hook: str
    dataset: str
    revision: str | None = None
    dataset_config: str | None = None
    split: str = "train"
    text_column: str = "text"
    ctx_len: int = 128
    n_tokens: int = 1_000_000
    dtype: str = "float32"
    store_dtype: str = "float32"
    drop_bos: bool = True
    positions: Any = None
    blocks: str | None = None
    batch_size: int = 8
    heldout_frac: float = 0.05
    probe_dataset: str | None = None
    probe_label: str = "label"

    def __post_init__(self):
        from saejax.config import check_fields

        check_fields(self)
        spec_from_source(self)  # every field checked now, before anything is located or loaded

    def build(self, cache_dir=None, progress: bool = True) -> CachedActivations:
        return hf_source(self, cache_dir=cache_dir, progress=progress)

    def plan(self, cache_dir=None) -> SourcePlan:
        return hf_plan(self, cache_dir=cache_dir)

    def describe(self) -> str:
        return f"{self.model} {self.hook} on {self.dataset} ({self.n_tokens:,} tokens)"

    def supports(self, analysis: str, cache_dir=None) -> str | None:
        """Why ``analysis`` cannot run on this source (from configs only), or None."""
        if analysis == "probe":
            return None if self.probe_dataset else "give probe_dataset= (a .jsonl of texts with a label field)"
        ref = locate(self.model, self.revision, cache_dir=cache_dir)
        if analysis == "splice" and ref.info is not None and ref.info.encoder and ref.path is not None \
                and not has_mlm_head(ref.path, ref.info):
            return f"{ref.info.name} is an encoder without a masked-LM head, so there is no loss to splice into"
        return None

    def downstream(self, cfg, raw_params, thresholds, seeds, *, analyses, cache_dir=None) -> tuple[dict, dict]:
        from saejax.downstream import hf_downstream

        return hf_downstream(self, cfg, raw_params, thresholds, seeds, analyses=analyses, cache_dir=cache_dir)
