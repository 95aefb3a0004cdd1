"""On-disk activation cache: sharded ``.npy`` arrays plus a ``manifest.json``, read lazily.

Layout of one cache entry (one model, one ``(layer, site)``, one corpus)::

    <root>/activations/<name>-<key>/
        manifest.json        fingerprint, d_in, dtype, token count, one record per shard
        shard_00000.npy      [rows, d_in] activations, C order
        shard_00001.npy      ...

``key`` is a hash of the fingerprint (everything that changes the numbers; see
:func:`saejax.activations.ExtractSpec.fingerprint`), so a changed spec gets a new entry and an
unchanged one is found again without loading the model.

Writing is atomic at the level of the entry: shards and manifest go into a hidden temporary
directory (``.tmp-<name>-<key>-<host>-<pid>-<nonce>``) that is renamed onto the final name with
``os.replace`` only once every shard is on disk and fsynced. A crash or a SIGKILL midway leaves
only the hidden directory, which is never taken for a cache and is swept by the next writer once
its process is gone. A shard that is truncated or altered afterwards is caught on open (size and
``.npy`` header always; sha256 with ``verify="full"``, the default) and reported as a
:class:`~saejax.errors.ConfigError` naming the shard.

The reader, :class:`CachedActivations`, implements the :class:`saejax.data.Source` protocol over
memory-mapped shards: batches are gathered with sorted fancy-index reads, so a cache larger than
RAM trains fine (only the pages touched are read).
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import secrets
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from saejax.data import epoch_indices
from saejax.errors import ConfigError, check

FORMAT = "saejax-activations"
FORMAT_VERSION = 1
SHARD_BYTES = 128 << 20  # ~128 MiB per shard: few files, and each one is cheap to re-verify
_VERIFIED: set[tuple] = set()  # (path, size, mtime_ns) of shards already hashed in this process


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The saejax cache directory: ``cache_dir``, else ``$SAEJAX_CACHE``, else
    ``$XDG_CACHE_HOME/saejax``, else ``~/.cache/saejax``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("SAEJAX_CACHE"):
        return Path(os.environ["SAEJAX_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "saejax"


COMPILE_MIN_SECONDS = 0.2  # programs that compile faster are not worth a disk round trip


def use_compile_cache(cache_dir: str | os.PathLike | None = None) -> Path | None:
    """Keep compiled XLA programs in ``<cache root>/xla`` (JAX's persistent compilation cache), so a
    re-run, or a second experiment with the same shapes, compiles nothing again; call it before the
    first compilation. A directory the user chose (``JAX_COMPILATION_CACHE_DIR``) is kept;
    ``SAEJAX_COMPILE_CACHE=0`` turns it off. Returns the directory in use, or ``None``."""
    import jax

    if os.environ.get("SAEJAX_COMPILE_CACHE", "1") == "0":
        return None
    chosen = jax.config.values.get("jax_compilation_cache_dir")
    if chosen:
        return Path(chosen)
    path = cache_root(cache_dir) / "xla"
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:  # else the user's threshold
        jax.config.update("jax_persistent_cache_min_compile_time_secs", COMPILE_MIN_SECONDS)
    return path


def fingerprint_key(fingerprint: dict) -> str:
    """Stable 20-hex-digit hash of a JSON-serialisable fingerprint (key order does not matter)."""
    blob = json.dumps(fingerprint, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def storage_dtype(name: str) -> np.dtype:
    """On-disk dtype of a stored dtype name; ``bfloat16`` is stored as its uint16 bit pattern."""
    return np.dtype(np.uint16) if name == "bfloat16" else np.dtype(name)


def to_bf16_bits(x) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def from_bf16_bits(b) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exactly."""
    return (np.asarray(b).astype(np.uint32) << 16).view(np.float32)


class _HashingFile:
    """Write-through file wrapper that hashes and counts the bytes numpy writes into it."""

    def __init__(self, f):
        self.f, self.sha, self.n = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.sha.update(b)
        self.n += len(b)
        return self.f.write(b)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(parent: Path) -> None:
    """Remove temporary entries left by writers on this host whose process is gone."""
    if not parent.is_dir():
        return
    host = socket.gethostname()
    for p in parent.glob(".tmp-*"):
        parts = p.name.rsplit("-", 3)  # .tmp-<name>-<key> | host | pid | nonce
        if len(parts) == 4 and parts[1] == host and parts[2].isdigit() and not _pid_alive(int(parts[2])):
            shutil.rmtree(p, ignore_errors=True)


class CacheWriter:
    """Streams ``[rows, d_in]`` blocks into shards of a fresh cache entry; atomic on :meth:`commit`.

    Use as a context manager: leaving the block with an exception (or never calling ``commit``)
    removes the temporary directory, so no partial entry ever carries the final name.
    """

    def __init__(self, final: Path, fingerprint: dict, d_in: int, *, dtype: str = "float32",
                 shard_rows: int | None = None):
        self.final, self.fingerprint, self.d_in = Path(final), fingerprint, int(d_in)
        self.dtype_name, self.dtype = str(dtype), storage_dtype(str(dtype))
        self.shard_rows = int(shard_rows or max(1, SHARD_BYTES // (self.d_in * self.dtype.itemsize)))
        check(self.shard_rows > 0, f"shard_rows must be positive, got {shard_rows}")
        self.final.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(self.final.parent)
        nonce = secrets.token_hex(4)
        self.tmp = self.final.parent / f".tmp-{self.final.name}-{socket.gethostname()}-{os.getpid()}-{nonce}"
        self.tmp.mkdir()
        self.buf = np.empty((self.shard_rows, self.d_in), self.dtype)
        self.fill = 0
        self.shards: list[dict] = []
        self.extras: dict[str, dict] = {}

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None or self.tmp.exists():
            self.abort()
        return False

    @property
    def n_rows(self) -> int:
        return sum(s["rows"] for s in self.shards) + self.fill

    def append(self, rows: np.ndarray) -> None:
        rows = to_bf16_bits(rows) if self.dtype_name == "bfloat16" else np.asarray(rows)
        check(rows.ndim == 2 and rows.shape[1] == self.d_in,
              f"cache rows must be [n, {self.d_in}], got shape {rows.shape}")
        while len(rows):
            take = min(len(rows), self.shard_rows - self.fill)
            self.buf[self.fill : self.fill + take] = rows[:take]
            self.fill += take
            rows = rows[take:]
            if self.fill == self.shard_rows:
                self._flush()

    def _write(self, name: str, arr: np.ndarray) -> dict:
        with open(self.tmp / name, "wb") as f:
            hf = _HashingFile(f)
            np.lib.format.write_array(hf, arr, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        return {"file": name, "rows": len(arr), "bytes": hf.n, "sha256": hf.sha.hexdigest()}

    def _flush(self) -> None:
        if self.fill:
            self.shards.append(self._write(f"shard_{len(self.shards):05d}.npy", self.buf[: self.fill]))
            self.fill = 0

    def add_array(self, name: str, arr: np.ndarray) -> None:
        """Store a side array (e.g. the token ids behind the rows) as ``<name>.npy``, checksummed."""
        self.extras[name] = self._write(f"{name}.npy", np.ascontiguousarray(arr))

    def commit(self, **extra) -> Path:
        """Write the last shard and the manifest, then rename the entry into place."""
        self._flush()
        check(self.shards, f"refusing to commit an empty cache entry {self.final.name}")
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "fingerprint": self.fingerprint,
            "d_in": self.d_in, "dtype": self.dtype_name, "n_tokens": self.n_rows,
            "shards": self.shards, "extras": self.extras, **extra,
        }
        with open(self.tmp / "manifest.json", "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.replace(self.tmp, self.final)
        except OSError:
            # another process finished the same entry first: theirs is as good as ours
            if not (self.final / "manifest.json").exists():
                raise
            shutil.rmtree(self.tmp, ignore_errors=True)
        return self.final

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _open_shard(path: Path, record: dict, d_in: int, dtype: np.dtype, verify: str) -> np.ndarray:
    bad = f"cache shard {path} is corrupted or truncated"
    if not path.is_file():
        raise ConfigError(f"cache shard {path} is missing; delete {path.parent} and extract again")
    st = path.stat()
    if st.st_size != record["bytes"]:
        raise ConfigError(f"{bad} ({st.st_size} bytes, manifest says {record['bytes']}); "
                          f"delete {path.parent} and extract again")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ConfigError(f"{bad} (unreadable .npy header: {e}); delete {path.parent} and extract again") from None
    if arr.shape != (record["rows"], d_in) or arr.dtype != dtype:
        raise ConfigError(f"{bad} (shape {arr.shape} {arr.dtype}, manifest says "
                          f"({record['rows']}, {d_in}) {dtype}); delete {path.parent} and extract again")
    stamp = (str(path), st.st_size, st.st_mtime_ns)
    if verify == "full" and stamp not in _VERIFIED:
        if sha256_file(path) != record["sha256"]:
            raise ConfigError(f"{bad} (sha256 mismatch); delete {path.parent} and extract again")
        _VERIFIED.add(stamp)
    return arr


def read_manifest(path: Path) -> dict | None:
    """The manifest of a complete entry, or ``None`` when ``path`` holds no valid-looking cache."""
    try:
        with open(Path(path) / "manifest.json") as f:
            m = json.load(f)
    except (OSError, ValueError):
        return None
    return m if m.get("format") == FORMAT and m.get("format_version") == FORMAT_VERSION else None


class CachedActivations:
    """A :class:`saejax.data.Source` over one cache entry, memory-mapped, never fully loaded.

    The last ``n_heldout`` rows (or ``heldout_frac`` of them; default: 10%, at most 8192) are the
    held-out split;
    training batches never touch them. Extraction writes contexts in corpus order, so the held-out
    rows are the corpus's last contexts (for the modular model, whose prompts are shuffled once
    before extraction, a uniformly random subset of prompts).

    ``batches(batch_size, seed=s)`` walks a fresh permutation of the training rows each epoch,
    drawn from ``(s, epoch)`` exactly as :class:`saejax.data.ArraySource` does, so a cache and the
    same array in memory give identical batches. Each batch is gathered shard by shard with sorted
    indices (sequential-ish page reads) and returned in permutation order as float32.
    """

    true_dictionary = None

    def __init__(self, path: str | os.PathLike, *, n_heldout: int | None = None, heldout_frac: float | None = None,
                 verify: str = "full"):
        self.path = Path(path)
        check(verify in ("full", "size"), f"verify must be 'full' or 'size', got {verify!r}")
        m = read_manifest(self.path)
        check(m is not None, f"no complete activation cache at {self.path} (missing or invalid manifest.json)")
        assert m is not None  # narrowing only: check raised otherwise
        self.manifest = m
        dtype = storage_dtype(m["dtype"])
        self._decode = from_bf16_bits if m["dtype"] == "bfloat16" else np.asarray
        self.shards = [_open_shard(self.path / r["file"], r, m["d_in"], dtype, verify) for r in m["shards"]]
        self._starts = np.cumsum([0] + [len(s) for s in self.shards])
        total = int(self._starts[-1])
        check(total == m["n_tokens"], f"cache {self.path} holds {total} rows, manifest says {m['n_tokens']}")
        check(n_heldout is None or heldout_frac is None, "give n_heldout or heldout_frac, not both")
        if heldout_frac is not None:
            check(0 < heldout_frac < 1, f"heldout_frac must be in (0, 1), got {heldout_frac}")
            n_heldout = max(1, int(round(heldout_frac * total)))
        if n_heldout is None:
            n_heldout = default_heldout(total)
        check(0 <= n_heldout < total, f"n_heldout must be in [0, {total}) for cache {self.path.name}, got {n_heldout}")
        self.n_total, self.n_heldout = total, int(n_heldout)
        self._held: np.ndarray | None = None

    @property
    def d_in(self) -> int:
        return int(self.manifest["d_in"])

    @property
    def n_tokens(self) -> int:
        """Training rows (one epoch); the held-out tail is excluded."""
        return self.n_total - self.n_heldout

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``[start, stop)`` of the whole entry (training and held-out), as float32."""
        stop = self.n_total if stop is None else stop
        return self.take(np.arange(start, stop))

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows at global indices ``rows`` (any order), gathered shard by shard, as float32."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size > 1 and not (np.diff(rows) >= 0).all():
            order = np.argsort(rows, kind="stable")
            out = np.empty((len(rows), self.d_in), np.float32)
            out[order] = self.take(rows[order])
            return out
        out = np.empty((len(rows), self.d_in), np.float32)
        cuts = np.searchsorted(rows, self._starts)
        for i, shard in enumerate(self.shards):
            lo, hi = cuts[i], cuts[i + 1]
            if hi > lo:
                local = rows[lo:hi] - self._starts[i]
                if (np.diff(local) == 1).all():  # one contiguous run: a slice, no gather
                    out[lo:hi] = self._decode(shard[local[0] : local[-1] + 1])
                else:
                    out[lo:hi] = self._decode(shard[local])
        return out

    def batches(self, batch_size: int, *, seed: int) -> Iterator[np.ndarray]:
        for idx in epoch_indices(self.n_tokens, batch_size, seed=seed):
            yield self.take(idx)

    def extra(self, name: str) -> np.ndarray:
        """A side array stored with the entry (``"tokens"``: contexts ``[n, L]``, ``"mask"``: which
        positions became rows, in row order), checksum-verified."""
        rec = self.manifest.get("extras", {}).get(name)
        check(rec is not None, f"cache {self.path.name} has no side array {name!r} "
                               f"(has: {sorted(self.manifest.get('extras', {}))})")
        path = self.path / rec["file"]
        check(path.is_file() and sha256_file(path) == rec["sha256"], f"cache file {path} is corrupted or truncated")
        return np.load(path, allow_pickle=False)

    def heldout(self) -> np.ndarray:
        if self._held is None:
            held = self.read(self.n_tokens, self.n_total)
            if not np.isfinite(held).all():  # the runner asks for this before training: a bad split costs no training
                row = self.n_tokens + int(np.argwhere(~np.isfinite(held))[0][0])
                i = int(np.searchsorted(self._starts, row, side="right")) - 1
                raise ConfigError(f"held-out row {row} of cache {self.path} ({self.manifest['shards'][i]['file']} row {row - int(self._starts[i])}) is NaN/inf; clean the source and extract again")
            self._held = held
        return self._held

    def __repr__(self) -> str:
        fp = self.manifest.get("fingerprint", {})
        return (f"CachedActivations({fp.get('model')!r}, layer={fp.get('layer')}, site={fp.get('site')!r}, "
                f"n_tokens={self.n_tokens}, n_heldout={self.n_heldout}, d_in={self.d_in})")


def prefetch(batches: Iterator, size: int = 2, *, to_device: bool = False) -> Iterator:
    """Run ``batches`` ``size`` items ahead in a background thread (disk reads overlap compute).

    With ``to_device=True`` each item is also ``jax.device_put`` in that thread, so the
    host-to-device copy overlaps the current step too. The thread stops when the consumer drops
    the returned generator.
    """
    check(size > 0, f"prefetch size must be positive, got {size}")
    q: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()
    done = object()

    def work():
        put = None
        if to_device:
            import jax

            put = jax.device_put
        try:
            for item in batches:
                item = put(item) if put else item
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as e:  # re-raised in the consumer
            q.put(e)
            return
        q.put(done)

    threading.Thread(target=work, daemon=True).start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def default_heldout(total: int) -> int:
    """Held-out rows of a cache of ``total`` rows when none are asked for: 10%, at most 8192."""
    return min(8192, max(1, total // 10))
