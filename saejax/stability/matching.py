"""One-to-one (Hungarian) matching of latents between two dictionaries, with an optimality proof.

The matching maximises ``sum_i s(i, pi(i))`` over one-to-one maps ``pi`` from the smaller
dictionary into the larger, where ``s`` is |cos| (or the signed cosine) between directions, as in
Paulo & Belrose 2025 (arXiv:2501.16615) and Song et al. 2025 (arXiv:2505.20254).

- ``dense``: the full score table and ``scipy.optimize.linear_sum_assignment``; exact.
- ``sparse``: a candidate graph holding each row's and each column's top-k partners (from the
  kernel), solved with ``scipy.sparse.csgraph.min_weight_full_bipartite_matching``. If the graph
  has no full matching, ``k`` grows (and the dense solver is the last resort).

A sparse solution is then *certified* with LP duality. Bellman-Ford on the residual graph gives
duals ``u_i + v_j >= s_ij`` on every candidate edge with ``sum u + sum v`` = matched value. An edge
missing from the graph has ``s_ij <= min(t_i, c_j)``, where ``t_i`` and ``c_j`` are the k-th best
scores of its row and column, so rows with ``u_i + v_j >= min(t_i, c_j)`` for all ``j`` are
proven; the remaining rows are checked against their exact scores, and violated edges are added
and the graph re-solved. ``upper_bound`` is the dual objective after these checks, so
``optimal=True`` is a proof (up to float32 rounding), not a heuristic.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import csr_array
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

from saejax.errors import check
from saejax.stability.kernel import (
    HIGHEST,
    MASKED,
    PairStats,
    check_dictionary,
    check_mask,
    check_same_width,
    normalize,
    pair_stats,
)

EDGE_TOL = 1e-5
"""Score slack treated as float32 rounding: a matching is "optimal" when its mean score is
within this of the proven upper bound (cosines are float32, ~1e-7 relative error each)."""


@dataclass(frozen=True)
class Matching:
    """A one-to-one matching of ``m = min(n_a, n_b)`` latents (live ones, if masks were given).

    ``rows[p]`` (into ``a``) is matched with ``cols[p]`` (into ``b``), sorted by ``rows``.
    ``abs_cos``/``cos`` are recomputed (float64 accumulation) from the inputs. ``value`` is the optimised
    objective (sum of the kernel's float32 scores) and ``upper_bound`` a proven bound on the best
    possible value; ``optimal`` means ``upper_bound - value <= EDGE_TOL * m``. ``method`` is the
    solver that produced it ("dense" or "sparse"); ``k`` the candidates per row and column of the
    final sparse graph (None for dense).
    """

    rows: np.ndarray
    cols: np.ndarray
    abs_cos: np.ndarray
    cos: np.ndarray
    value: float
    upper_bound: float
    optimal: bool
    method: str
    k: int | None
    n_a: int
    n_b: int
    signed: bool = False

    @property
    def score(self) -> np.ndarray:
        """The matched scores the matching maximised: ``cos`` if signed, else ``abs_cos``."""
        return self.cos if self.signed else self.abs_cos

    @property
    def gap_bound(self) -> float:
        """Proven bound on how far ``value`` can be below the optimum (0 when dense)."""
        return max(0.0, self.upper_bound - self.value)


def match(a, b, *, signed: bool = False, alive_a=None, alive_b=None, method: str = "auto",
          top_k: int = 32, dense_max: int = 2048, chunk: int | None = None,
          stats: PairStats | None = None, max_rounds: int = 20) -> Matching:
    """Maximum-weight one-to-one matching between the latents of ``a`` ``[n_a, d]`` and ``b`` ``[n_b, d]``.

    Solves ``max_pi sum_i s(i, pi(i))`` with ``s = |cos|`` (``signed=True``: the signed cosine, as
    Song et al.'s code) over injective ``pi`` from the smaller dictionary into the larger
    (Hungarian matching of Paulo & Belrose 2025, arXiv:2501.16615). Latents with ``alive_*``
    False are left out (the live-only variant of the scale-control study). ``method``: "dense"
    (``linear_sum_assignment``), "sparse" (top-k candidate graph + duality certificate, see the
    module docstring) or "auto" (dense when the larger live side is at most ``dense_max``).
    ``stats``: precomputed :func:`~saejax.stability.kernel.pair_stats` for this pair computed
    with the same ``signed``/alive masks (as :func:`~saejax.stability.all_pairs` returns).
    """
    a = check_dictionary(a, "a")
    b = check_dictionary(b, "b")
    check_same_width(a, b)
    check(method in ("auto", "dense", "sparse"), f"method must be 'auto', 'dense' or 'sparse', got {method!r}")
    ia = np.flatnonzero(check_mask(alive_a, a.shape[:1], "alive_a"))
    ib = np.flatnonzero(check_mask(alive_b, b.shape[:1], "alive_b"))
    check(ia.size > 0 and ib.size > 0, f"no live latents to match ({ia.size} in a, {ib.size} in b)")
    swap = ia.size > ib.size  # the solver matches its rows (the smaller side) into its columns
    problem = _Problem(b, a, ib, ia, alive_b, alive_a) if swap else _Problem(a, b, ia, ib, alive_a, alive_b)
    if stats is not None and swap:
        stats = PairStats(*stats[4:], *stats[:4])
    if method == "dense" or (method == "auto" and ib.size <= dense_max and ia.size <= dense_max):
        r, c, value, ub, opt, k, kind = _solve_dense(problem, signed)
    else:
        r, c, value, ub, opt, k, kind = _solve_sparse(problem, signed, top_k, chunk, stats, max_rounds)
    rows, cols = (c, r) if swap else (r, c)
    order = np.argsort(rows, kind="stable")
    rows, cols = rows[order], cols[order]
    cos = _signed_cos(a, b, rows, cols)
    return Matching(rows, cols, np.abs(cos), cos, float(value), float(ub), bool(opt), kind, k,
                    a.shape[0], b.shape[0], bool(signed))


@dataclass
class _Problem:
    """Rows ``x[ix]`` matched into columns ``y[iy]`` (``len(ix) <= len(iy)``), full index space."""

    x: np.ndarray
    y: np.ndarray
    ix: np.ndarray
    iy: np.ndarray
    alive_x: object
    alive_y: object


@partial(jax.jit, static_argnames=("signed",))
def _dense_scores(x, y, signed):
    s = jnp.dot(normalize(x), normalize(y).T, precision=HIGHEST)
    return s if signed else jnp.abs(s)


def _signed_cos(a, b, rows, cols) -> np.ndarray:
    """Cosine of each matched pair, accumulated in float64."""
    x, y = a[rows], b[cols]
    dot = np.einsum("ij,ij->i", x, y, dtype=np.float64)
    nx = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    ny = np.sqrt(np.einsum("ij,ij->i", y, y, dtype=np.float64))
    return dot / np.maximum(nx * ny, np.finfo(np.float64).tiny)


def _solve_dense(p: _Problem, signed: bool):
    # Scores of the full dictionaries, then the live sub-table: one compiled shape per pair shape.
    w = np.asarray(_dense_scores(p.x, p.y, signed), dtype=np.float64)[np.ix_(p.ix, p.iy)]
    r, c = linear_sum_assignment(w, maximize=True)
    value = float(w[r, c].sum())
    return p.ix[r], p.iy[c], value, value, True, None, "dense"


def _solve_sparse(p: _Problem, signed, top_k, chunk, stats, max_rounds):
    """Sparse solve, then the duality certificate; edges that break it are added and re-solved."""
    n_r, n_c = p.ix.size, p.iy.size
    k = min(int(top_k), n_r, n_c)
    if stats is None or stats.row_topk.shape[-1] < k:
        stats = pair_stats(p.x, p.y, top_k=k, chunk=chunk, alive_a=p.alive_x, alive_b=p.alive_y, signed=signed)
    while True:
        graph = _Graph.from_stats(p, stats)
        try:
            r, c = graph.solve()
            break
        except ValueError:  # no full matching in the candidate graph: widen it
            k = 4 * stats.row_topk.shape[-1]
            if k >= n_c:
                return _solve_dense(p, signed)
            stats = pair_stats(p.x, p.y, top_k=k, chunk=chunk, alive_a=p.alive_x, alive_b=p.alive_y, signed=signed)
    k = int(stats.row_topk.shape[-1])
    exact = _ExactRows(p, signed)
    for _ in range(max_rounds):
        value = float(graph.weight_of(r, c).sum())
        duals = _duals(graph, r, c)
        if duals is None:  # Bellman-Ford did not settle: fall back to the simple bound
            break
        u, v = duals
        u_cert = np.maximum(u, _row_bounds(v, graph.t, graph.c_kth))
        need = np.flatnonzero(u_cert > u + EDGE_TOL)
        u_cert[need], new_edges = exact.check(need, u[need], v)
        if not new_edges[0].size:
            ub = min(float(u_cert.sum() + v.sum()), graph.simple_bound())
            return p.ix[r], p.iy[c], value, ub, ub - value <= EDGE_TOL * n_r, k, "sparse"
        graph.merge(*new_edges)
        r, c = graph.solve()
    value = float(graph.weight_of(r, c).sum())
    ub = graph.simple_bound()
    return p.ix[r], p.iy[c], value, ub, ub - value <= EDGE_TOL * n_r, k, "sparse"


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.finfo(np.float32).tiny)


@dataclass
class _Graph:
    """Candidate edges in compact indices (rows ``0..n_r-1``, cols ``0..n_c-1``), sorted by
    ``r * n_c + c``, with the bounds that cover every edge left out."""

    n_r: int
    n_c: int
    r: np.ndarray
    c: np.ndarray
    w: np.ndarray
    t: np.ndarray  # per row: every edge of the row outside the graph scores <= t
    c_kth: np.ndarray  # per column: every edge of the column outside the graph scores <= c_kth
    row_best: np.ndarray
    col_best: np.ndarray

    @classmethod
    def from_stats(cls, p: _Problem, stats: PairStats) -> "_Graph":
        pos_x = np.full(p.x.shape[0], -1)
        pos_x[p.ix] = np.arange(p.ix.size)
        pos_y = np.full(p.y.shape[0], -1)
        pos_y[p.iy] = np.arange(p.iy.size)
        rv, ri = np.asarray(stats.row_topk)[p.ix], np.asarray(stats.row_topk_idx)[p.ix]
        cv, ci = np.asarray(stats.col_topk)[p.iy], np.asarray(stats.col_topk_idx)[p.iy]
        k = rv.shape[1]
        r = np.concatenate([np.repeat(np.arange(p.ix.size), k), pos_x[ci.ravel()]])
        c = np.concatenate([pos_y[ri.ravel()], np.repeat(np.arange(p.iy.size), k)])
        w = np.concatenate([rv.ravel(), cv.ravel()]).astype(np.float64)
        keep = (w > MASKED / 2) & (r >= 0) & (c >= 0)
        g = cls(p.ix.size, p.iy.size, np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0),
                rv[:, -1].astype(np.float64), cv[:, -1].astype(np.float64),
                rv[:, 0].astype(np.float64), cv[:, 0].astype(np.float64))
        g.merge(r[keep], c[keep], w[keep])
        return g

    def merge(self, r, c, w) -> None:
        """Add edges; a duplicate keeps the score already held."""
        key = np.concatenate([self.r * self.n_c + self.c, r.astype(np.int64) * self.n_c + c])
        key, first = np.unique(key, return_index=True)
        self.r, self.c, self.w = key // self.n_c, key % self.n_c, np.concatenate([self.w, w])[first]

    def solve(self):
        # Every full matching has n_r edges, so shifting all scores by +2 (making them > 0, as the
        # solver requires non-zero weights) does not change the optimum.
        m = csr_array((self.w + 2.0, (self.r, self.c)), shape=(self.n_r, self.n_c))
        return min_weight_full_bipartite_matching(m, maximize=True)

    def weight_of(self, r, c) -> np.ndarray:
        key = self.r * self.n_c + self.c
        return self.w[np.searchsorted(key, r.astype(np.int64) * self.n_c + c)]

    def simple_bound(self) -> float:
        """``min(sum of row maxima, sum of the n_r largest column maxima)``: no matching beats it."""
        cols = np.sort(self.col_best)[::-1][: self.n_r]
        return float(min(self.row_best.sum(), cols.sum()))


class _ExactRows:
    """Exact score rows ``s_i. = score(x_i, y)`` on demand, cached up to ``budget`` floats."""

    def __init__(self, p: _Problem, signed, budget: int = 2**26, block: int = 1024):
        self.p, self.signed, self.budget, self.block = p, signed, budget, block
        self.cache: dict[int, np.ndarray] = {}
        self.xn = self.yn = None

    def _rows(self, rows):
        if self.xn is None and rows.size:  # normalise lazily: most certificates never get here
            self.xn, self.yn = _unit(self.p.x[self.p.ix]), _unit(self.p.y[self.p.iy])
        missing = np.array([i for i in rows if i not in self.cache], dtype=np.int64)
        for start in range(0, missing.size, self.block):
            assert self.xn is not None and self.yn is not None  # normalised above: rows is not empty here
            rb = missing[start:start + self.block]
            s = self.xn[rb] @ self.yn.T
            s = s if self.signed else np.abs(s)
            if (len(self.cache) + rb.size) * s.shape[1] <= self.budget:
                self.cache.update(zip(rb.tolist(), s))
            else:
                yield rb, s
        cached = np.array([i for i in rows if i in self.cache], dtype=np.int64)
        for start in range(0, cached.size, self.block):
            rb = cached[start:start + self.block]
            yield rb, np.stack([self.cache[i] for i in rb.tolist()])

    def check(self, rows, u_rows, v):
        """Exact dual for ``rows`` (``max_j s_ij - v_j``) and their edges with ``s_ij > u_i + v_j``."""
        pos = dict(zip(rows.tolist(), range(rows.size)))
        u_new = np.empty(rows.size)
        out_r, out_c, out_w = [], [], []
        for rb, s in self._rows(rows):
            at = np.array([pos[i] for i in rb.tolist()], dtype=np.int64)
            slack = s - v[None, :]
            u_new[at] = np.maximum(u_rows[at], slack.max(axis=1))
            i, j = np.nonzero(slack - u_rows[at, None] > EDGE_TOL)
            out_r.append(rb[i]), out_c.append(j), out_w.append(s[i, j].astype(np.float64))
        cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)
        return u_new, (cat(out_r, np.int64), cat(out_c, np.int64), cat(out_w, np.float64))


def _duals(g: _Graph, r, c, max_iter: int = 100_000):
    """Duals ``u, v >= 0`` with ``u_i + v_j >= w_ij`` on graph edges, equality on matched ones.

    Shortest-path potentials on the residual graph (unmatched edge ``i -> j`` costs ``-w_ij``,
    matched edge ``j -> i`` costs ``+w_ij``, every column starts at distance 0): ``u_i = d_i``,
    ``v_j = -d_j``. Finite because an optimal matching leaves no negative cycle. Label-correcting
    Bellman-Ford that only rescans rows whose distance changed.
    """
    match_col = np.empty(g.n_r, dtype=np.int64)
    match_col[r] = c
    row_of_col = np.full(g.n_c, -1)
    row_of_col[c] = r
    w_match = g.weight_of(r, c)[np.argsort(r)]
    free = g.c != match_col[g.r]
    er, ec, ew = g.r[free], g.c[free], g.w[free]  # sorted by row
    indptr = np.searchsorted(er, np.arange(g.n_r + 1))
    d_col = np.zeros(g.n_c)
    d_row = w_match.copy()
    frontier = np.arange(g.n_r)
    for _ in range(max_iter):
        lo, hi = indptr[frontier], indptr[frontier + 1]
        counts = hi - lo
        total = int(counts.sum())
        if total == 0:
            return d_row, -d_col
        idx = np.repeat(lo - np.cumsum(counts) + counts, counts) + np.arange(total)
        cand = d_row[er[idx]] - ew[idx]
        best = np.full(g.n_c, np.inf)
        np.minimum.at(best, ec[idx], cand)
        improved = np.flatnonzero(best < d_col - 1e-12)
        if improved.size == 0:
            return d_row, -d_col
        d_col[improved] = best[improved]
        frontier = row_of_col[improved]
        frontier = np.unique(frontier[frontier >= 0])
        d_row[frontier] = d_col[match_col[frontier]] + w_match[frontier]
    return None


def _row_bounds(v, t, c_kth) -> np.ndarray:
    """``max_j (min(t_i, c_j) - v_j)`` per row: the ``u_i`` that covers every non-candidate edge.

    Columns sorted by ``c_j``; those with ``c_j <= t_i`` contribute ``c_j - v_j`` (a prefix
    maximum), the others ``t_i - v_j`` (a suffix minimum of ``v``). O((n_r + n_c) log n_c).
    """
    order = np.argsort(c_kth)
    cs, vs = c_kth[order], v[order]
    prefix = np.maximum.accumulate(cs - vs)
    suffix = np.minimum.accumulate(vs[::-1])[::-1]
    p = np.searchsorted(cs, t, side="right")
    low = np.where(p > 0, prefix[np.maximum(p - 1, 0)], -np.inf)
    high = np.where(p < cs.size, t - suffix[np.minimum(p, cs.size - 1)], -np.inf)
    return np.maximum(low, high)
