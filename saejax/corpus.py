"""Corpora, streamed: text files, directories, hub datasets, token ids; packing into windows.

Readers yield documents lazily, so only what the token budget needs is ever read:

- :class:`TextFiles`: ``.txt`` (documents separated by blank lines), ``.jsonl`` (one JSON object a
  line, the document in ``column``), ``.parquet`` (column ``column``; needs ``pyarrow``), or a
  directory (every such file below it, in sorted path order);
- :class:`HFDataset`: a Hugging Face ``datasets`` corpus, streamed;
- :class:`TokenIds` (an array) and :class:`TokenFile` (a ``.npy`` file, memory-mapped): 2-D
  ``[n, L]`` contexts used as given (no packing, no special tokens added), or, for a 1-D
  :class:`TokenFile`, one token stream packed into windows like text.

Packing (:func:`pack`): documents are tokenized without special tokens and joined with a
separator (EOS, else [SEP]); the stream is cut into bodies so that every window is
``prefix + body + suffix`` of exactly ``ctx_len`` tokens, never padded. Decoders: prefix ``[BOS]``
(when ``prepend_bos`` and the tokenizer has one), no suffix. Encoders: ``[CLS] ... [SEP]``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import cast

import numpy as np

from saejax.digests import file_digest
from saejax.errors import ConfigError, check

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")


def _txt_docs(p: Path) -> Iterator[str]:
    buf: list[str] = []
    with open(p, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                buf.append(line)
            elif buf:
                yield "".join(buf).strip()
                buf = []
    if buf:
        yield "".join(buf).strip()


def _jsonl_docs(p: Path, column: str) -> Iterator[str]:
    with open(p, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise ConfigError(f"{p}:{i} is not valid JSON") from None
            check(isinstance(row, dict) and column in row,
                  f"{p}:{i} has no field {column!r} (fields: {sorted(row) if isinstance(row, dict) else type(row).__name__})")
            if str(row[column]).strip():
                yield str(row[column])


def _parquet_docs(p: Path, column: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"reading {p} needs pyarrow, which is not installed: pip install pyarrow") from None
    f = pq.ParquetFile(p)
    check(column in f.schema_arrow.names, f"{p} has no column {column!r} (columns: {f.schema_arrow.names})")
    for batch in f.iter_batches(columns=[column], batch_size=1024):
        for v in batch.column(0).to_pylist():
            if v is not None and str(v).strip():
                yield str(v)


@dataclass(frozen=True)
class TextFiles:
    """Local text: ``.txt``, ``.jsonl`` and ``.parquet`` files and directories of them."""

    paths: tuple[str, ...]
    column: str = "text"

    def __post_init__(self):
        paths = (self.paths,) if isinstance(self.paths, (str, os.PathLike)) else tuple(self.paths)
        object.__setattr__(self, "paths", tuple(str(p) for p in paths))
        check(len(self.paths) > 0, "TextFiles.paths is empty: give at least one .txt, .jsonl or .parquet file or a directory")
        for p in self.paths:
            check(p.endswith(TEXT_SUFFIXES) or os.path.isdir(p),
                  f"TextFiles: {p!r} is neither a .txt, .jsonl or .parquet file nor a directory")

    def files(self) -> list[tuple[Path, str]]:
        """``(file, name)`` pairs in reading order; ``name`` is the path relative to its directory
        argument, and empty for a file given directly (a renamed copy is the same corpus)."""
        out = []
        for p in map(Path, self.paths):
            if p.is_dir():
                found = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(TEXT_SUFFIXES))
                check(found, f"dataset directory {p} holds no .txt, .jsonl or .parquet file")
                out += [(f, f.relative_to(p).as_posix()) for f in found]
            else:
                check(p.is_file(), f"dataset file not found: {p}")
                out.append((p, ""))
        return out

    def fingerprint(self, cache_dir=None) -> dict:
        return {"kind": "files", "column": self.column,
                "files": [[name, file_digest(f, cache_dir)] for f, name in self.files()]}

    def texts(self) -> Iterator[str]:
        for f, _ in self.files():
            n = 0
            docs = (_txt_docs(f) if f.name.endswith(".txt") else _jsonl_docs(f, self.column)
                    if f.name.endswith(".jsonl") else _parquet_docs(f, self.column))
            for doc in docs:
                n += 1
                yield doc
            check(n > 0, f"dataset file {f} is empty (no text)")

    def describe(self) -> str:
        return ", ".join(self.paths)


PYTHON_DOCS_MODULES = (
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "collections", "concurrent.futures",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message", "enum",
    "fractions", "functools", "glob", "gzip", "hashlib", "heapq", "html.parser", "http.client", "inspect", "io",
    "ipaddress", "itertools", "json", "logging", "math", "mimetypes", "operator", "os", "pathlib", "pickle",
    "pprint", "queue", "random", "re", "sched", "secrets", "shelve", "shutil", "socket", "sqlite3", "statistics",
    "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize",
    "traceback", "typing", "unittest", "urllib.parse", "uuid", "warnings", "weakref", "xml.etree.ElementTree",
    "zipfile", "zoneinfo")


@dataclass(frozen=True)
class PythonDocs:
    """A corpus every machine has, offline: the docstrings of :data:`PYTHON_DOCS_MODULES` of the
    running Python's standard library (each module's, then each public member's, in sorted order;
    a few MB of English prose about code). Its fingerprint hashes the text, so another Python
    version is another corpus. Select it with ``dataset="python-docs"``."""

    modules: tuple[str, ...] = PYTHON_DOCS_MODULES

    def fingerprint(self, cache_dir=None) -> dict:
        import hashlib

        h = hashlib.sha256()
        for doc in self.texts():
            h.update(doc.encode() + b"\0")
        return {"kind": "python-docs", "modules": list(self.modules), "sha256": h.hexdigest()}

    def texts(self) -> Iterator[str]:
        import importlib
        import inspect
        import warnings

        for name in self.modules:
            with warnings.catch_warnings():  # deprecated aliases warn when touched
                warnings.simplefilter("ignore")
                try:
                    mod = importlib.import_module(name)
                except ImportError:  # absent from this build of Python: part of the fingerprint
                    continue
                docs = [inspect.getdoc(getattr(mod, a, None)) for a in sorted(dir(mod)) if not a.startswith("_")]
                names = [a for a in sorted(dir(mod)) if not a.startswith("_")]
            if mod.__doc__:
                yield inspect.cleandoc(mod.__doc__)
            for attr, doc in zip(names, docs):
                if doc and len(doc) > 40:
                    yield f"{name}.{attr}: {doc}"

    def describe(self) -> str:
        return "python-docs (standard-library docstrings)"


@dataclass(frozen=True)
class HFDataset:
    """A Hugging Face ``datasets`` corpus (needs ``pip install 'saejax[datasets]'``)."""

    name: str
    config: str | None = None
    split: str = "train"
    column: str = "text"
    streaming: bool = True  # read lazily: only the documents the token budget needs are fetched
    revision: str | None = None

    def fingerprint(self, cache_dir=None) -> dict:
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
        for row in cast("Iterable[dict]", ds):  # one named split: a (streaming) Dataset, rows are dicts
            check(self.column in row, f"dataset {self.name!r} has no column {self.column!r} (columns: {sorted(row)})")
            if row[self.column]:
                yield row[self.column]

    def describe(self) -> str:
        return f"dataset {self.name}"


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

    def fingerprint(self, cache_dir=None) -> dict:
        return {"kind": "tokens", "name": self.name, "shape": list(self.ids.shape), "pad_id": self.pad_id,
                "sha256": hashlib.sha256(self.ids.tobytes()).hexdigest()}

    def describe(self) -> str:
        return f"TokenIds {self.name!r}"


@dataclass(frozen=True)
class TokenFile:
    """Token ids in a ``.npy`` file, memory-mapped: 2-D contexts used as given, or a 1-D stream
    packed into windows (the stream's own EOS tokens separate its documents)."""

    path: str
    pad_id: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "path", str(self.path))
        check(self.path.endswith(".npy"), f"TokenFile: {self.path!r} is not a .npy file")

    def array(self) -> np.ndarray:
        check(os.path.isfile(self.path), f"token file not found: {self.path}")
        ids = np.load(self.path, mmap_mode="r", allow_pickle=False)
        check(ids.ndim in (1, 2) and ids.size > 0 and np.issubdtype(ids.dtype, np.integer),
              f"token file {self.path} must hold a non-empty 1-D or 2-D integer array, got {ids.dtype} {ids.shape}")
        return ids

    def fingerprint(self, cache_dir=None) -> dict:
        self.array()
        return {"kind": "token-file", "pad_id": self.pad_id, "sha256": file_digest(Path(self.path), cache_dir)}

    def describe(self) -> str:
        return f"token file {self.path}"


# ----------------------------------------------------------------------------- windows and masks
@dataclass(frozen=True)
class Window:
    """Token layout of one packed window: ``prefix + body + suffix``; ``sep`` joins documents."""

    prefix: tuple[int, ...] = ()
    suffix: tuple[int, ...] = ()
    sep: int | None = None
    pad: int | None = None


def token_chunks(docs: Iterable[str], tok, sep: int | None, batch: int = 256) -> Iterator[list[int]]:
    """Token ids of ``docs``, tokenized ``batch`` documents at a time, each followed by ``sep``."""
    buf: list[str] = []

    def run():
        for ids in tok(buf, add_special_tokens=False, verbose=False)["input_ids"]:
            yield list(ids) + ([sep] if sep is not None else [])

    for doc in docs:
        buf.append(doc)
        if len(buf) == batch:
            yield from run()
            buf = []
    if buf:
        yield from run()


def pack(chunks: Iterable, ctx_len: int, window: Window, n_ctx: int | None) -> np.ndarray:
    """Windows ``[<= n_ctx, ctx_len]`` cut from the concatenated ``chunks`` (all of them if ``n_ctx``
    is None); reading stops as soon as ``n_ctx`` windows are full."""
    body = ctx_len - len(window.prefix) - len(window.suffix)
    check(body > 0, f"ctx_len {ctx_len} leaves no room between the special tokens {window.prefix} and {window.suffix}")
    stream: list[int] = []
    blocks: list[np.ndarray] = []
    have = 0
    for chunk in chunks:
        stream.extend(chunk)
        k = len(stream) // body if n_ctx is None else min(len(stream) // body, n_ctx - have)
        if k > 0:
            b = np.asarray(stream[: k * body], np.int64).reshape(k, body)
            ends = [np.full((k, len(part)), part, np.int64) for part in (window.prefix, window.suffix)]
            blocks.append(np.concatenate([ends[0], b, ends[1]], axis=1))
            del stream[: k * body]
            have += k
        if n_ctx is not None and have >= n_ctx:
            break
    return np.concatenate(blocks) if blocks else np.zeros((0, ctx_len), np.int64)


def special_mask(ids: np.ndarray, window: Window) -> np.ndarray:
    """Positions holding the window's added tokens: a leading prefix token at position 0 and a
    trailing suffix token at the last non-pad position (``[n, L]`` bool)."""
    out = np.zeros(ids.shape, bool)
    if window.prefix:
        out[:, 0] = ids[:, 0] == window.prefix[0]
    if window.suffix:
        real = ids != window.pad if window.pad is not None else np.ones(ids.shape, bool)
        last = ids.shape[1] - 1 - np.argmax(real[:, ::-1], axis=1)
        rows = np.arange(len(ids))
        out[rows, last] |= ids[rows, last] == window.suffix[-1]
    return out


def keep_mask(ids: np.ndarray, window: Window, positions, drop_special: bool) -> np.ndarray:
    """Which positions become activation rows. ``positions``: ``None``/``"all"`` every position,
    ``"last"`` the last kept one of each context, or a tuple of offsets (negative from the end).
    Padding never counts; with ``drop_special`` neither do the window's added tokens."""
    length = ids.shape[1]
    eligible = ids != window.pad if window.pad is not None else np.ones(ids.shape, bool)
    if drop_special:
        eligible &= ~special_mask(ids, window)
    if positions is None or positions == "all":
        return eligible
    if positions == "last":
        out = np.zeros(ids.shape, bool)
        any_ = eligible.any(1)
        out[np.flatnonzero(any_), length - 1 - np.argmax(eligible[any_, ::-1], axis=1)] = True
        return out
    check(all(-length <= p < length for p in positions), f"positions {positions} out of range for contexts of {length} tokens")
    out = np.zeros(ids.shape, bool)
    out[:, list(positions)] = True
    return out & eligible
