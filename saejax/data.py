"""Activation sources: anything that yields ``[batch, d_in]`` float32 batches for the trainer.

A source is a small object with this protocol (see :class:`Source`):

- ``d_in``: width of the activations.
- ``n_tokens``: number of training tokens (one epoch), or ``None`` for an endless generator.
- ``batches(batch_size, *, seed)``: an endless iterator of ``[batch_size, d_in]`` float32 numpy
  arrays. Finite sources walk a fresh permutation of the training tokens each epoch, drawn from
  ``(seed, epoch)``, so the same seed gives the same order on every machine.
- ``take(rows)`` (optional): the training rows at indices ``rows``, any order; a finite source
  with it gets whole chunks of batches in one call (``batches`` is then ``take`` of
  :class:`IndexStream`'s order, and the trainer relies on that).
- ``heldout()``: a fixed ``[n, d_in]`` evaluation split, never trained on.
- ``true_dictionary``: ``[n_features, d_in]`` ground-truth directions, or ``None``.

The trainer only ever calls these, so an on-disk cache, an in-memory array and the synthetic
model organism are interchangeable.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from saejax.errors import ConfigError, check


@runtime_checkable
class Source(Protocol):
    d_in: int
    n_tokens: int | None
    true_dictionary: np.ndarray | None

    def batches(self, batch_size: int, *, seed: int) -> Iterator[np.ndarray]: ...

    def heldout(self) -> np.ndarray: ...


@dataclass(frozen=True)
class SourcePlan:
    """What a source spec knows before anything is built: the dry run prints it, the plan uses it.

    Computed from configs and the cache only (no model is loaded, nothing is downloaded,
    extracted or trained), so every experiment can be planned offline.
    """

    d_in: int
    """Width of the activations."""
    n_tokens: int | None
    """Training tokens (one epoch) once built, or ``None`` for an endless source."""
    lines: tuple[str, ...] = ()
    """What building it will do: download, extract (tokens, disk size), or train; or that it is cached."""
    missing: str | None = None
    """One line saying what is missing to build it here (e.g. a model not downloaded while offline)."""


class IndexStream:
    """The training order over ``range(n)``: one fresh permutation per epoch (drawn from ``(seed,
    epoch)``), concatenated; :meth:`next` hands out the next ``count`` indices, so a whole chunk of
    batches is one call (batches run across epoch boundaries: every batch is full, no token skipped)."""

    def __init__(self, n: int, *, seed: int):
        check(n > 0, "the source has no training tokens")
        self.n, self.seed, self.epoch = n, seed, 0
        self.buf = np.empty(0, dtype=np.int64)

    def next(self, count: int) -> np.ndarray:
        parts, have = [self.buf], self.buf.size
        while have < count:
            parts.append(np.random.default_rng([self.seed, self.epoch]).permutation(self.n))
            have += self.n
            self.epoch += 1
        buf = np.concatenate(parts) if len(parts) > 1 else self.buf
        out, self.buf = buf[:count], buf[count:]
        return out

    def skip(self, count: int) -> None:
        """Advance past ``count`` indices without drawing the whole epochs in between."""
        if count <= self.buf.size:
            self.buf = self.buf[count:]
            return
        count -= self.buf.size
        self.epoch += count // self.n
        self.buf = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)[count % self.n:]
        self.epoch += 1


class Stream:
    """``source.batches(batch_size, seed=seed)``, a chunk at a time: :meth:`fill` writes the next
    ``len(out)`` batches into ``out`` (``[n, batch_size, d_in]``) with one ``take`` where the source
    has it (a vectorised gather, no loop over steps), else batch by batch; the same numbers either way."""

    def __init__(self, source: Source, batch_size: int, *, seed: int):
        self.source, self.bs = source, batch_size
        n = source.n_tokens
        self.order = IndexStream(n, seed=seed) if n and callable(getattr(source, "take", None)) else None
        self.it = None if self.order is not None else source.batches(batch_size, seed=seed)

    def fill(self, out: np.ndarray, rows: slice = slice(None)) -> None:
        """``rows``: the rows of each batch wanted (``out`` is ``[n, those rows, d_in]``); a source
        with ``take`` reads only those (a host of a batch-sharded run reads only its own part)."""
        if self.order is not None:
            idx = self.order.next(len(out) * self.bs).reshape(len(out), self.bs)[:, rows]
            out.reshape(-1, out.shape[-1])[:] = self.source.take(idx.ravel())  # type: ignore[attr-defined]
            return
        assert self.it is not None
        for t in range(len(out)):
            out[t] = next(self.it)[rows]

    def skip(self, steps: int) -> None:
        if self.order is not None:
            self.order.skip(steps * self.bs)
            return
        assert self.it is not None
        for _ in range(steps):
            next(self.it)


def epoch_indices(n: int, batch_size: int, *, seed: int) -> Iterator[np.ndarray]:
    """Endless stream of index batches over ``range(n)`` in :class:`IndexStream`'s order."""
    check(batch_size > 0, f"batch_size must be positive, got {batch_size}")
    stream = IndexStream(n, seed=seed)
    while True:
        yield stream.next(batch_size)


def check_finite(x: np.ndarray, what: str) -> None:
    bad = ~np.isfinite(x)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise ConfigError(f"{what} contains NaN/inf values (first at row {row}); clean the data first")


@dataclass
class ArraySource:
    """Activations already in memory: ``train`` ``[n, d_in]`` and an optional held-out split."""

    train: np.ndarray
    held: np.ndarray | None = None
    true_dictionary: np.ndarray | None = None

    def __post_init__(self):
        self.train = np.asarray(self.train, dtype=np.float32)
        check(self.train.ndim == 2, f"activations must be [tokens, d_in], got shape {self.train.shape}")
        check(self.train.shape[0] > 0, "activation array is empty (0 tokens)")
        check_finite(self.train, "activation array")
        if self.held is None:
            self.held = self.train[: min(4096, len(self.train))]
        self.held = np.asarray(self.held, dtype=np.float32)

    @property
    def d_in(self) -> int:
        return self.train.shape[1]

    @property
    def n_tokens(self) -> int:
        return self.train.shape[0]

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Training rows at indices ``rows`` (any order)."""
        return np.take(self.train, rows, axis=0)

    def batches(self, batch_size: int, *, seed: int) -> Iterator[np.ndarray]:
        for idx in epoch_indices(self.n_tokens, batch_size, seed=seed):
            yield self.take(idx)

    def heldout(self) -> np.ndarray:
        assert self.held is not None  # __post_init__ fills it from the training rows
        return self.held


@dataclass
class SyntheticSource:
    """Song et al. (2025, arXiv:2505.20254)'s model organism of superposition.

    A ground-truth dictionary of ``n_features`` unit-norm Gaussian directions in ``d`` dimensions;
    each sample has exactly ``s`` active features, chosen uniformly, with magnitudes ``|N(0, 1)|``;
    ``x = sum_i m_i f_i``. ``true_dictionary`` exposes the directions for GT-MCC. Samples are a
    pure function of ``(seed, batch index)``, so the stream is endless and reproducible.
    """

    d: int = 64
    n_features: int = 128
    s: int = 4
    dictionary_seed: int = 0
    n_heldout: int = 4096
    true_dictionary: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        from saejax.config import check_fields

        check_fields(self)
        check(self.d > 0, f"synthetic d must be positive, got {self.d}")
        check(self.n_features > 0, f"synthetic n_features must be positive, got {self.n_features}")
        check(0 < self.s <= self.n_features, f"synthetic s must be in [1, n_features={self.n_features}], got {self.s}")
        g = np.random.default_rng([self.dictionary_seed, 0]).standard_normal((self.n_features, self.d))
        self.true_dictionary = (g / np.linalg.norm(g, axis=1, keepdims=True)).astype(np.float32)

    @property
    def d_in(self) -> int:
        return self.d

    n_tokens = None

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        # argsort of uniform noise picks s distinct features per row without a Python loop
        active = np.argsort(rng.random((n, self.n_features)), axis=1)[:, : self.s]
        mags = np.abs(rng.standard_normal((n, self.s))).astype(np.float32)
        return np.einsum("ns,nsd->nd", mags, self.true_dictionary[active]).astype(np.float32)

    def batches(self, batch_size: int, *, seed: int) -> Iterator[np.ndarray]:
        check(batch_size > 0, f"batch_size must be positive, got {batch_size}")
        i = 0
        while True:
            yield self.sample(batch_size, np.random.default_rng([self.dictionary_seed, 1, seed, i]))
            i += 1

    def heldout(self) -> np.ndarray:
        return self.sample(self.n_heldout, np.random.default_rng([self.dictionary_seed, 2]))

    # as an experiment's source spec, the source is its own spec
    def build(self, cache_dir=None, progress: bool = True) -> "SyntheticSource":
        return self

    def plan(self, cache_dir=None) -> SourcePlan:
        return SourcePlan(self.d, None, (f"synthetic samples, generated on the fly ({self.n_features} features)",))

    def describe(self) -> str:
        return f"synthetic d={self.d} n_features={self.n_features} s={self.s}"
