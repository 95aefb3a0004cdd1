"""Content hashes of files, memoised on disk, so a copied model or corpus hits the same cache.

:func:`file_digest` is the sha256 of a file's bytes. Hashing a multi-GB model at every dry run
would be slow, so digests are remembered in ``<cache>/file-hashes.json`` by ``(real path, size,
mtime_ns)``: a file is read again only when it changed (or moved: a copy is hashed once, and then
found by content like the original). The memo is a cache, never a source of truth: a lost or
unreadable memo only costs a re-hash.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from saejax.cache import cache_root, sha256_file

MEMO = "file-hashes.json"
_SEEN: dict[str, str] = {}  # this process's digests, by stamp


def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def _read_memo(memo: Path) -> dict:
    try:
        with open(memo) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def file_digest(path: str | os.PathLike, cache_dir=None) -> str:
    """sha256 hex digest of ``path``'s contents (memoised by real path, size and mtime)."""
    path = Path(path)
    stamp = _stamp(path)
    if stamp in _SEEN:
        return _SEEN[stamp]
    memo = cache_root(cache_dir) / MEMO
    known = _read_memo(memo)
    if stamp not in known:
        known[stamp] = sha256_file(path)
        try:  # atomic replace: concurrent writers may drop each other's entries, never corrupt the file
            memo.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo.with_name(f".{MEMO}.{os.getpid()}.{secrets.token_hex(4)}")
            tmp.write_text(json.dumps(known))
            os.replace(tmp, memo)
        except OSError:
            pass
    _SEEN[stamp] = known[stamp]
    return known[stamp]


def files_digest(files: list[Path], root: Path, cache_dir=None) -> str:
    """sha256 over the names (relative to ``root``) and contents of ``files``, in sorted order."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + file_digest(f, cache_dir).encode() + b"\0")
    return h.hexdigest()
