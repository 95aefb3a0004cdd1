"""Hugging Face causal LM -> hooked activations -> on-disk cache. The only torch/transformers user.

Sites, for block ``L`` of any decoder-only model (the names follow TransformerLens, and
``blocks.L.hook_<site>`` is accepted as a spelling of ``(L, site)``):

- ``resid_pre``  the residual stream entering block ``L`` (= ``output_hidden_states[L]``);
- ``resid_post`` the residual stream leaving block ``L`` (= ``output_hidden_states[L + 1]``, except
  for the last block, where Hugging Face applies the final norm to that entry and we do not);
- ``attn_out`` / ``mlp_out`` what the attention / MLP sublayer adds to the residual stream, so
  ``resid_post = resid_pre + attn_out + mlp_out`` for sequential and parallel blocks alike. That is
  the sublayer module's output, or, in sandwich-norm families (Gemma-2/3, OLMo-2), the output of
  the norm after it (``post_attention_layernorm`` / ``post_feedforward_layernorm``).

Every requested ``(layer, site)`` is captured in ONE forward pass by forward hooks on the block
list, and the pass stops right after the deepest block needed (later blocks and the LM head never
run). Blocks are found generically: GPT-2 ``transformer.h``, GPT-NeoX/Pythia ``gpt_neox.layers``,
Llama/Gemma/Qwen/Mistral ``model.layers`` and a few more (:data:`BLOCK_PATHS`).

Corpus handling: documents are tokenized without special tokens, joined with EOS, and packed into
contexts of ``ctx_len`` tokens, each starting with BOS when ``prepend_bos``; packing means there is
never padding. ``drop_bos`` drops position 0 when it holds BOS (its activations are outliers that
dominate SAE training). ``TokenIds`` corpora are used as given (one row = one context), with an
optional ``pad_id`` whose positions are masked and dropped. The token budget counts stored rows.

The setups of the source studies, as plain constructor calls (they need the hub)::

    owt = HFDataset("Skylion007/openwebtext")
    ExtractSpec("gpt2", owt, sites=("blocks.0.hook_resid_pre",), ctx_len=128, n_tokens=1_000_000)
    ExtractSpec("gpt2", owt, layers=(6,), sites=("resid_post",), ctx_len=128, n_tokens=1_000_000)
    ExtractSpec("meta-llama/Llama-3.2-1B", owt, layers=(4, 8, 14), sites=("resid_post",), dtype="bfloat16")
    ExtractSpec("google/gemma-2-2b", owt, layers=(12,), sites=("resid_post",), dtype="bfloat16")

and ``extract(spec)`` returns one :class:`~saejax.cache.CachedActivations` per ``(layer, site)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Union

import numpy as np

from saejax.cache import CachedActivations, CacheWriter, cache_root, fingerprint_key, read_manifest, sha256_file
from saejax.errors import ConfigError, check

EXTRACT_VERSION = 1  # bump when a change here alters the stored numbers: old caches then miss
SITES = ("resid_pre", "resid_post", "mlp_out", "attn_out")
DTYPES = ("float32", "float16", "bfloat16")
BLOCK_PATHS = ("transformer.h", "gpt_neox.layers", "model.layers", "model.decoder.layers",
               "model.language_model.layers", "transformer.layers", "transformer.blocks", "backbone.layers")
ATTN_NAMES = ("attn", "self_attn", "attention", "self_attention", "mixer")
MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")


# ----------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class TextFiles:
    """Local corpus files. ``.txt``: documents separated by blank lines. ``.jsonl``: one JSON
    object per line, the document in field ``column``."""

    paths: tuple[str, ...]
    column: str = "text"

    def __post_init__(self):
        paths = (self.paths,) if isinstance(self.paths, (str, os.PathLike)) else tuple(self.paths)
        object.__setattr__(self, "paths", tuple(str(p) for p in paths))
        check(len(self.paths) > 0, "TextFiles.paths is empty: give at least one .txt or .jsonl file")
        for p in self.paths:
            check(p.endswith((".txt", ".jsonl")), f"TextFiles: {p!r} is neither a .txt nor a .jsonl file")

    def fingerprint(self) -> dict:
        for p in self.paths:
            check(os.path.isfile(p), f"dataset file not found: {p}")
        return {"kind": "files", "column": self.column,
                "files": [[os.path.basename(p), sha256_file(Path(p))] for p in self.paths]}

    def texts(self) -> Iterator[str]:
        for p in self.paths:
            n = 0
            with open(p, encoding="utf-8") as f:
                if p.endswith(".txt"):
                    for doc in f.read().split("\n\n"):
                        if doc.strip():
                            n += 1
                            yield doc.strip()
                else:
                    for i, line in enumerate(f, 1):
                        if not line.strip():
                            continue
                        try:
                            row = json.loads(line)
                        except ValueError:
                            raise ConfigError(f"{p}:{i} is not valid JSON") from None
                        check(isinstance(row, dict) and self.column in row,
                              f"{p}:{i} has no field {self.column!r} (fields: {sorted(row) if isinstance(row, dict) else type(row).__name__})")
                        if str(row[self.column]).strip():
                            n += 1
                            yield str(row[self.column])
            check(n > 0, f"dataset file {p} is empty (no text)")


@dataclass(frozen=True)
class HFDataset:
    """A Hugging Face ``datasets`` corpus (needs ``pip install 'saejax[datasets]'``)."""

    name: str
    config: str | None = None
    split: str = "train"
    column: str = "text"
    streaming: bool = True  # read lazily: only the documents the token budget needs are fetched
    revision: str | None = None

    def fingerprint(self) -> dict:
        d = asdict(self)
        d.pop("streaming")  # same documents in the same order either way
        return {"kind": "hf", **d}

    def texts(self) -> Iterator[str]:
        try:
            import datasets
        except ImportError:
            raise ConfigError(f"HFDataset({self.name!r}) needs the 'datasets' package: pip install 'saejax[datasets]'") from None
        try:
            ds = datasets.load_dataset(self.name, self.config, split=self.split, streaming=self.streaming,
                                       revision=self.revision)
        except Exception as e:  # network, unknown name, bad split: one line, not a traceback
            raise ConfigError(f"cannot load dataset {self.name!r} (config {self.config!r}, split {self.split!r}): "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        for row in ds:
            check(self.column in row, f"dataset {self.name!r} has no column {self.column!r} (columns: {sorted(row)})")
            if row[self.column]:
                yield row[self.column]


@dataclass(frozen=True, eq=False)
class TokenIds:
    """Pre-tokenized contexts ``[n_contexts, length]``, used as given (no BOS added, no packing)."""

    ids: np.ndarray
    name: str = "tokens"
    pad_id: int | None = None  # positions holding it are masked from attention and dropped

    def __post_init__(self):
        ids = np.asarray(self.ids)
        check(ids.ndim == 2 and ids.size > 0 and np.issubdtype(ids.dtype, np.integer),
              f"TokenIds.ids must be a non-empty 2-D integer array, got {ids.dtype} {ids.shape}")
        object.__setattr__(self, "ids", ids.astype(np.int64))

    def fingerprint(self) -> dict:
        return {"kind": "tokens", "name": self.name, "shape": list(self.ids.shape), "pad_id": self.pad_id,
                "sha256": hashlib.sha256(self.ids.tobytes()).hexdigest()}


Dataset = Union[TextFiles, HFDataset, TokenIds]


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
    """Hub id (``"gpt2"``, ``"meta-llama/Llama-3.2-1B"``) or a local ``save_pretrained`` directory."""
    dataset: Dataset
    """:class:`TextFiles`, :class:`HFDataset` or :class:`TokenIds`."""
    layers: tuple[int, ...] = (0,)
    """Block indices crossed with every bare site name in ``sites``."""
    sites: tuple[str, ...] = ("resid_post",)
    """Bare sites (:data:`SITES`) and/or TransformerLens names such as ``"blocks.6.hook_resid_post"``."""
    revision: str | None = None
    """Hub branch, tag or commit; ``None`` is the default branch. Ignored for local directories."""
    dtype: str = "float32"
    """Model weights dtype: ``float32``, ``float16`` or ``bfloat16``."""
    ctx_len: int = 128
    """Tokens per context for text corpora (TokenIds contexts keep their own length)."""
    n_tokens: int | None = 1_000_000
    """Token budget: activation rows stored per point. ``None``: the whole corpus (finite corpora)."""
    prepend_bos: bool = True
    """Start every text context with BOS (when the tokenizer has one)."""
    drop_bos: bool = True
    """Do not store position 0 when it holds BOS."""
    positions: tuple[int, ...] | None = None
    """Store only these context positions (negative counts from the end); ``None``: all positions."""
    store_dtype: str = "float32"
    """On-disk dtype: ``float32`` or ``float16`` (half the disk, ~3 significant digits)."""
    batch_size: int = 8
    """Contexts per forward pass (speed and memory only; not part of the cache key)."""

    def __post_init__(self):
        tup = lambda v: (v,) if isinstance(v, (int, str)) else tuple(v)  # noqa: E731
        object.__setattr__(self, "layers", tup(self.layers))
        object.__setattr__(self, "sites", tup(self.sites))
        if self.positions is not None:
            object.__setattr__(self, "positions", tup(self.positions))
        check(isinstance(self.model, str) and self.model, f"model must be a hub id or a path, got {self.model!r}")
        check(isinstance(self.dataset, (TextFiles, HFDataset, TokenIds)),
              f"dataset must be TextFiles, HFDataset or TokenIds, got {type(self.dataset).__name__}")
        check(all(isinstance(l, int) and l >= 0 for l in self.layers), f"layers must be non-negative ints, got {self.layers}")
        check(len(self.sites) > 0, "sites is empty: give at least one of " + ", ".join(SITES))
        check(self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        check(self.store_dtype in ("float32", "float16"), f"store_dtype must be float32 or float16, got {self.store_dtype!r}")
        check(self.ctx_len > 1, f"ctx_len must be at least 2, got {self.ctx_len}")
        check(self.n_tokens is None or self.n_tokens > 0, f"n_tokens must be positive or None, got {self.n_tokens}")
        check(self.batch_size > 0, f"batch_size must be positive, got {self.batch_size}")
        check(len(self.points) > 0, f"no (layer, site) to extract: sites {self.sites} with layers {self.layers}")

    @property
    def points(self) -> tuple[tuple[int, str], ...]:
        """The distinct ``(layer, site)`` pairs, in request order."""
        pts = [p for s in self.sites for p in parse_hook(s, self.layers)]
        return tuple(dict.fromkeys(pts))

    def fingerprint(self, layer: int, site: str, weights: str) -> dict:
        """Everything that changes the stored numbers of one point (the cache key hashes this)."""
        tokens = isinstance(self.dataset, TokenIds)
        return {"extract_version": EXTRACT_VERSION, "model": self.model, "revision": self.revision,
                "weights": weights, "layer": layer, "site": site, "dataset": self.dataset.fingerprint(),
                "ctx_len": None if tokens else self.ctx_len, "n_tokens": self.n_tokens,
                "prepend_bos": None if tokens else self.prepend_bos, "drop_bos": self.drop_bos,
                "positions": self.positions, "dtype": self.dtype, "store_dtype": self.store_dtype}


# ----------------------------------------------------------------------------- models

_HASHES: dict[tuple, str] = {}
_IGNORE = ["*.msgpack", "*.h5", "*.onnx", "*.onnx_data", "*.ot", "*.tflite", "*.gguf", "original/*", "onnx/*",
           "flax_model*", "tf_model*", "rust_model*", "coreml/*", "*.pth"]


def resolve_model(model: str, revision: str | None = None) -> tuple[Path, str]:
    """A local model directory and a weights identity: ``hub:<commit>`` or ``sha256:<files hash>``."""
    p = Path(model).expanduser()
    if p.is_dir():
        check((p / "config.json").is_file(), f"model directory {model} has no config.json (not a save_pretrained directory)")
        files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
        stamp = tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
        if stamp not in _HASHES:
            h = hashlib.sha256()
            for f in files:
                h.update(f.name.encode() + b"\0" + sha256_file(f).encode())
            _HASHES[stamp] = "sha256:" + h.hexdigest()[:32]
        return p, _HASHES[stamp]
    check(not p.exists(), f"model path {model} is not a directory (expected a save_pretrained directory)")
    check(not (model.startswith((".", "/", "~")) or model.count("/") > 1),
          f"model path {model} does not exist (expected a save_pretrained directory or a hub id like 'gpt2')")
    try:
        from huggingface_hub import snapshot_download

        kw = dict(revision=revision, ignore_patterns=_IGNORE)
        path = Path(snapshot_download(model, **kw, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]))
        if not any(path.glob("*.safetensors")):
            path = Path(snapshot_download(model, **kw, allow_patterns=["*.json", "*.bin", "*.model", "*.txt", "*.tiktoken"]))
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else ""
        raise ConfigError(f"unknown model {model!r}: not a local directory and not loadable from the hub "
                          f"({type(e).__name__}: {msg})") from None
    return path, "hub:" + path.name  # snapshots/<commit>: a content hash of the repository


def n_layers_of(model_dir: Path) -> int:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    n = getattr(cfg, "num_hidden_layers", None)
    check(isinstance(n, int), f"cannot tell how many layers {model_dir} has (no num_hidden_layers in its config)")
    return n


def device_name() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(model_dir: Path, dtype: str = "float32", device: str | None = None):
    """``AutoModelForCausalLM`` in eval mode on ``device`` (CUDA when present, else CPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    return model.to(device or device_name()).eval()


def find_blocks(model):
    """The model's list of decoder blocks, found by trying :data:`BLOCK_PATHS` in turn."""
    import torch

    for path in BLOCK_PATHS:
        mod = model
        for part in path.split("."):
            mod = getattr(mod, part, None)
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > 0:
            return mod
    raise ConfigError(f"unknown model layout {type(model).__name__}: no decoder block list at any of "
                      f"{', '.join(BLOCK_PATHS)}; add its path to saejax.activations.BLOCK_PATHS")


def site_module(block, site: str):
    """``(module, 'pre' | 'out')``: where a hook on ``block`` reads ``site``."""
    if site in ("resid_pre", "resid_post"):
        return block, "pre" if site == "resid_pre" else "out"
    sandwich = hasattr(block, "post_feedforward_layernorm")  # Gemma-2/3, OLMo-2: sublayer -> norm -> residual
    if sandwich:
        return getattr(block, "post_attention_layernorm" if site == "attn_out" else "post_feedforward_layernorm"), "out"
    for name in ATTN_NAMES if site == "attn_out" else MLP_NAMES:
        if hasattr(block, name):
            return getattr(block, name), "out"
    raise ConfigError(f"unknown block layout {type(block).__name__}: no {site} submodule among "
                      f"{', '.join(ATTN_NAMES if site == 'attn_out' else MLP_NAMES)}")


class _Stop(Exception):
    """Raised by the last hook to skip the rest of the forward pass."""


def capture(model, input_ids, points, attention_mask=None, *, stop_early: bool = True) -> dict:
    """One forward pass; returns ``{(layer, site): [batch, seq, d_model] tensor}`` for every point."""
    import torch

    blocks = find_blocks(model)
    n = len(blocks)
    for layer, site in points:
        check(0 <= layer < n, f"layer {layer} is out of range for a {n}-layer model: valid layers are 0..{n - 1}")
        check(site in SITES, f"unknown site {site!r}: expected one of {', '.join(SITES)}")
    out, handles = {}, []

    def keep(key, pre):
        def hook(mod, args, *rest):
            if pre:
                out[key] = args[0] if args else rest[0]["hidden_states"]
            else:
                o = rest[-1]
                out[key] = o[0] if isinstance(o, (tuple, list)) else o
        return hook

    def stop(*_):
        raise _Stop

    try:
        for layer, site in points:
            mod, when = site_module(blocks[layer], site)
            if when == "pre":
                handles.append(mod.register_forward_pre_hook(keep((layer, site), True), with_kwargs=True))
            else:
                handles.append(mod.register_forward_hook(keep((layer, site), False)))
        if stop_early:  # registered last, so it runs after the captures on the same block
            last = max(l for l, _ in points)
            if all(s == "resid_pre" for l, s in points if l == last):
                handles.append(blocks[last].register_forward_pre_hook(stop))
            else:
                handles.append(blocks[last].register_forward_hook(stop))
        with torch.no_grad():  # not inference_mode: callers may feed the tensors to autograd code
            try:
                model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return out


# ----------------------------------------------------------------------------- corpus -> contexts


def _text_contexts(spec: ExtractSpec, tok, n_ctx: int | None) -> np.ndarray:
    """Pack the corpus into ``[<=n_ctx, ctx_len]`` contexts (all complete contexts if ``n_ctx`` is None)."""
    bos = tok.bos_token_id if spec.prepend_bos else None
    body = spec.ctx_len - (bos is not None)
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    stream: list[int] = []
    blocks: list[np.ndarray] = []
    have = 0

    def pack(docs: list[str]) -> None:
        nonlocal have
        for ids in tok(docs, add_special_tokens=False, verbose=False)["input_ids"]:
            stream.extend(ids + eos)
        k = len(stream) // body if n_ctx is None else min(len(stream) // body, n_ctx - have)
        if k > 0:
            block = np.asarray(stream[: k * body], np.int64).reshape(k, body)
            if bos is not None:
                block = np.concatenate([np.full((k, 1), bos, np.int64), block], axis=1)
            blocks.append(block)
            del stream[: k * body]
            have += k

    docs: list[str] = []
    for doc in spec.dataset.texts():
        docs.append(doc)
        if len(docs) == 256:
            pack(docs)
            docs = []
            if n_ctx is not None and have >= n_ctx:
                break
    if docs:
        pack(docs)
    return np.concatenate(blocks) if blocks else np.zeros((0, spec.ctx_len), np.int64)


def _keep_mask(spec: ExtractSpec, ids: np.ndarray, bos_id: int | None, pad_id: int | None) -> np.ndarray:
    length = ids.shape[1]
    mask = np.ones(ids.shape, bool)
    if spec.positions is not None:
        check(all(-length <= p < length for p in spec.positions),
              f"positions {spec.positions} out of range for contexts of {length} tokens")
        mask[:] = False
        mask[:, list(spec.positions)] = True
    if pad_id is not None:
        mask &= ids != pad_id
    if spec.drop_bos and bos_id is not None:
        mask[:, 0] &= ids[:, 0] != bos_id
    return mask


def contexts(spec: ExtractSpec, model_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Token contexts ``[n, L]`` and keep mask ``[n, L]`` holding exactly ``spec.n_tokens`` kept
    positions; raises :class:`ConfigError` (before any model is loaded) if the corpus is smaller."""
    from transformers import AutoConfig

    ds = spec.dataset
    cfg = AutoConfig.from_pretrained(model_dir)
    if isinstance(ds, TokenIds):
        ids, pad, bos, what = ds.ids, ds.pad_id, getattr(cfg, "bos_token_id", None), f"TokenIds {ds.name!r}"
    else:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(model_dir)
        except Exception as e:
            raise ConfigError(f"model {spec.model} has no usable tokenizer ({type(e).__name__}); "
                              f"text corpora need one, or pass TokenIds") from None
        bos = tok.bos_token_id
        n_ctx = None
        if spec.n_tokens is not None:  # contexts needed: every packed context keeps the same positions
            row = np.full((1, spec.ctx_len), -1)
            row[0, 0] = bos if spec.prepend_bos and bos is not None else -1
            per_ctx = int(_keep_mask(spec, row, bos, None).sum())
            check(per_ctx > 0, f"positions {spec.positions} keep no token of a {spec.ctx_len}-token context")
            n_ctx = -(-spec.n_tokens // per_ctx)
        name = ds.name if isinstance(ds, HFDataset) else ", ".join(ds.paths)
        ids, pad, what = _text_contexts(spec, tok, n_ctx), None, f"dataset {name}"
    mask = _keep_mask(spec, ids, bos, pad)
    counts = np.cumsum(mask.sum(1))
    have = int(counts[-1]) if len(counts) else 0
    want = have if spec.n_tokens is None else spec.n_tokens
    check(have > 0, f"{what} yields no tokens at ctx_len {spec.ctx_len} (documents too short for one context?)")
    check(want <= have, f"token budget {want} exceeds the corpus: {what} has only {have} tokens "
                        f"at ctx_len {spec.ctx_len} (after dropping BOS/padding)")
    n = int(np.searchsorted(counts, want)) + 1  # contexts needed; trim the last one's extra positions
    ids, mask = ids[:n], mask[:n].copy()
    extra = int(counts[n - 1]) - want
    if extra:
        mask[n - 1, np.flatnonzero(mask[n - 1])[-extra:]] = False
    return ids, mask


# ----------------------------------------------------------------------------- extraction


def cache_path(spec: ExtractSpec, layer: int, site: str, weights: str, cache_dir=None) -> Path:
    name = f"{Path(spec.model).name or 'model'}-L{layer}-{site}"
    return cache_root(cache_dir) / "activations" / f"{name}-{fingerprint_key(spec.fingerprint(layer, site, weights))}"


def extract(spec: ExtractSpec, *, cache_dir=None, shard_rows: int | None = None, progress: bool = True,
            device: str | None = None, **reader_kw) -> dict[tuple[int, str], CachedActivations]:
    """Extract every point of ``spec`` (one forward pass per batch for all of them) into the cache.

    Points already cached are not recomputed, and if all are cached the model is never loaded.
    Returns ``{(layer, site): CachedActivations}``; ``reader_kw`` (``n_heldout``, ``heldout_frac``,
    ``verify``) go to each reader.
    """
    model_dir, weights = resolve_model(spec.model, spec.revision)
    n = n_layers_of(model_dir)
    for layer, _ in spec.points:
        check(layer < n, f"layer {layer} is out of range for {spec.model} ({n} layers): valid layers are 0..{n - 1}")
    paths = {pt: cache_path(spec, *pt, weights, cache_dir) for pt in spec.points}
    todo = [pt for pt, p in paths.items() if read_manifest(p) is None]
    if todo:
        _run(spec, model_dir, weights, {pt: paths[pt] for pt in todo}, shard_rows, progress, device)
    return {pt: CachedActivations(p, **reader_kw) for pt, p in paths.items()}


def extract_one(spec: ExtractSpec, **kw) -> CachedActivations:
    """:func:`extract` for a spec with exactly one point; returns its reader."""
    check(len(spec.points) == 1, f"extract_one needs exactly one (layer, site), spec has {list(spec.points)}")
    return extract(spec, **kw)[spec.points[0]]


def _run(spec, model_dir, weights, paths, shard_rows, progress, device) -> None:
    import torch
    from tqdm.auto import tqdm

    ids, mask = contexts(spec, model_dir)
    model = load_model(model_dir, spec.dtype, device)
    dev = next(model.parameters()).device
    d = model.get_input_embeddings().weight.shape[1]
    pad = spec.dataset.pad_id if isinstance(spec.dataset, TokenIds) else None
    t0 = time.time()
    writers = {pt: CacheWriter(p, spec.fingerprint(*pt, weights), d, dtype=spec.store_dtype, shard_rows=shard_rows)
               for pt, p in paths.items()}
    try:
        bar = tqdm(total=int(mask.sum()), unit="tok", unit_scale=True, disable=not progress,
                   desc=f"extract {Path(spec.model).name}")
        for i in range(0, len(ids), spec.batch_size):
            x = torch.from_numpy(ids[i : i + spec.batch_size]).to(dev)
            m = torch.from_numpy(mask[i : i + spec.batch_size]).to(dev)
            am = (x != pad).long() if pad is not None else None
            acts = capture(model, x, list(paths), attention_mask=am)
            for pt, w in writers.items():
                w.append(acts[pt][m].float().cpu().numpy())
            bar.update(int(m.sum()))
        bar.close()
        same = bool((mask[:-1] == mask[0]).all())  # every context keeps the same positions (last may be trimmed)
        positions = np.flatnonzero(mask[0]).tolist() if same else None
        for w in writers.values():
            w.add_array("tokens", ids.astype(np.int32))
            w.add_array("mask", mask)
            w.commit(model_dir=str(model_dir), n_contexts=len(ids), context_len=int(ids.shape[1]),
                     positions=positions, seconds=round(time.time() - t0, 3), device=str(dev))
    finally:
        for w in writers.values():
            if w.tmp.exists():
                w.abort()


def hf_source(src, *, cache_dir=None) -> CachedActivations:
    """Reader for an experiment-file source with fields ``model``, ``hook`` (``"6.resid_post"`` or
    ``"blocks.6.hook_resid_post"``), ``dataset`` (hub name, or a ``.txt``/``.jsonl`` path) and optional
    ``revision``, ``dataset_config``, ``split``, ``text_column``, ``ctx_len``, ``n_tokens``, ``dtype``,
    ``drop_bos``, ``heldout_frac`` (see :class:`saejax.experiment.HF`)."""
    get = lambda name, default=None: getattr(src, name, default)  # noqa: E731
    hook = str(src.hook)
    layer, _, site = hook.partition(".")
    layers, sites = ((int(layer),), (site,)) if layer.isdigit() and site in SITES else ((), (hook,))
    ds, column = str(src.dataset), get("text_column", "text")
    dataset = (TextFiles((ds,), column) if ds.endswith((".txt", ".jsonl"))
               else HFDataset(ds, get("dataset_config"), get("split", "train"), column))
    spec = ExtractSpec(src.model, dataset, layers=layers, sites=sites, revision=get("revision"),
                       dtype=get("dtype", "float32"), ctx_len=get("ctx_len", 128), n_tokens=get("n_tokens", 1_000_000),
                       drop_bos=get("drop_bos", True))
    frac = get("heldout_frac")
    return extract_one(spec, cache_dir=cache_dir, **({"heldout_frac": frac} if frac else {}))


# ----------------------------------------------------------------------------- patched forward (splicing)
def patched_logits(model, input_ids, layer: int, site: str, replace, *, positions=None) -> np.ndarray:
    """Logits ``[n, T, vocab]`` (float32 numpy) of a forward pass in which the activation at
    ``(layer, site)`` is replaced by ``replace(acts)`` (numpy ``[m, d]`` -> ``[m, d]``) on
    ``positions`` (None = all). ``replace=None`` runs the clean model."""
    import torch

    ids = torch.as_tensor(np.asarray(input_ids), device=next(model.parameters()).device)
    handle = None
    if replace is not None:
        blocks = find_blocks(model)
        check(0 <= layer < len(blocks), f"layer {layer} is out of range for a {len(blocks)}-layer model: valid layers are 0..{len(blocks) - 1}")
        check(site in SITES, f"unknown site {site!r}: expected one of {', '.join(SITES)}")
        mod, when = site_module(blocks[layer], site)

        def swap(h):
            sel = h if positions is None else h[:, positions]
            new = replace(sel.reshape(-1, sel.shape[-1]).float().cpu().numpy())
            new = torch.as_tensor(np.array(new), dtype=h.dtype, device=h.device).reshape(sel.shape)
            if positions is None:
                return new
            h = h.clone()
            h[:, positions] = new
            return h

        if when == "pre":
            def hook(mod, args, kwargs):
                if args:
                    return (swap(args[0]), *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": swap(kwargs["hidden_states"])}
            handle = mod.register_forward_pre_hook(hook, with_kwargs=True)
        else:
            def hook(mod, args, out):
                return (swap(out[0]), *out[1:]) if isinstance(out, (tuple, list)) else swap(out)
            handle = mod.register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
    finally:
        if handle is not None:
            handle.remove()
    return logits.float().cpu().numpy()
