"""Model + corpus -> token contexts and the mask of positions that become activation rows.

``spec`` is a :class:`saejax.activations.ExtractSpec`. Window layouts and readers are
:mod:`saejax.corpus`; the tokenizer is loaded here (text needs one), never the model, so a corpus
smaller than the token budget is reported before any weights are read.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from saejax.corpus import TokenFile, TokenIds, Window, keep_mask, pack, token_chunks
from saejax.errors import check
from saejax.hf_locate import ModelInfo


def _special(tok, cfg: dict, name: str):
    v = getattr(tok, name, None) if tok is not None else cfg.get(name)
    return v if isinstance(v, int) else None


def _either(a, b):
    return a if a is not None else b


def _tokenizer(model_dir: Path, spec, info: ModelInfo):
    """The tokenizer: required for text; for token ids only encoders use it (for [CLS]/[SEP])."""
    if not spec.packed and not info.encoder:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:
        check(isinstance(spec.dataset, (TokenIds, TokenFile)),
              f"model {spec.model} has no usable tokenizer ({type(e).__name__}); text corpora need one, or pass TokenIds")
        return None


def window_for(spec, info: ModelInfo, tok, cfg: dict) -> Window:
    """The window layout (see :mod:`saejax.corpus`) of ``spec`` on this model."""
    pad = getattr(spec.dataset, "pad_id", None)
    eos = _special(tok, cfg, "eos_token_id")
    if info.encoder:
        start = _either(_special(tok, cfg, "cls_token_id"), _special(tok, cfg, "bos_token_id"))
        end = _either(_special(tok, cfg, "sep_token_id"), eos)
        return Window(() if start is None else (start,), () if end is None else (end,), eos if eos is not None else end, pad)
    bos = _special(tok, cfg, "bos_token_id")
    use = spec.prepend_bos or not spec.packed  # given contexts: BOS is only recognised
    return Window((bos,) if bos is not None and use else (), (), eos, pad)


def _contexts_needed(spec, window: Window) -> int | None:
    if spec.n_tokens is None:
        return None
    row = np.array([list(window.prefix) + [-1] * (spec.ctx_len - len(window.prefix) - len(window.suffix))
                    + list(window.suffix)])
    per_ctx = int(keep_mask(row, window, spec.positions, spec.drop_bos).sum())
    check(per_ctx > 0, f"positions {spec.positions} keep no token of a {spec.ctx_len}-token context")
    return -(-spec.n_tokens // per_ctx)


def _raw_contexts(spec, tok, window: Window) -> np.ndarray:
    ds, n_ctx = spec.dataset, _contexts_needed(spec, window)
    if isinstance(ds, TokenIds):
        return ds.ids
    if isinstance(ds, TokenFile):
        arr = ds.array()
        if arr.ndim == 2:
            return arr
        chunks = (arr[i : i + 65536].tolist() for i in range(0, len(arr), 65536))
        return pack(chunks, spec.ctx_len, window, n_ctx)
    return pack(token_chunks(ds.texts(), tok, window.sep), spec.ctx_len, window, n_ctx)


def contexts(spec, model_dir: Path, info: ModelInfo) -> tuple[np.ndarray, np.ndarray, Window]:
    """Token contexts ``[n, L]``, the keep mask ``[n, L]`` holding exactly ``spec.n_tokens`` kept
    positions, and the window layout; a corpus smaller than the budget is a one-line error."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    tok = _tokenizer(Path(model_dir), spec, info)
    window = window_for(spec, info, tok, cfg)
    ids = _raw_contexts(spec, tok, window)
    counts, masks, n = 0, [], 0
    for start in range(0, len(ids), 4096):  # given contexts may be a large memory map: read what is needed
        block = np.asarray(ids[start : start + 4096], np.int64)
        masks.append(keep_mask(block, window, spec.positions, spec.drop_bos))
        counts += int(masks[-1].sum())
        n = start + len(block)
        if spec.n_tokens is not None and counts >= spec.n_tokens:
            break
    mask = np.concatenate(masks) if masks else np.zeros((0, spec.ctx_len), bool)
    what = spec.dataset.describe()
    check(counts > 0, f"{what} yields no tokens at ctx_len {spec.ctx_len} (documents too short for one context?)")
    want = counts if spec.n_tokens is None else spec.n_tokens
    check(want <= counts, f"token budget {want} exceeds the corpus: {what} has only {counts} tokens "
                          f"at ctx_len {spec.ctx_len} (after dropping special tokens/padding)")
    cum = np.cumsum(mask.sum(1))
    n = int(np.searchsorted(cum, want)) + 1  # contexts needed; trim the last one's extra positions
    ids, mask = np.array(ids[:n], np.int64), mask[:n].copy()
    extra = int(cum[n - 1]) - want
    if extra:
        mask[n - 1, np.flatnonzero(mask[n - 1])[-extra:]] = False
    return ids, mask, window
