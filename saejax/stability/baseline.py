"""Chance level: exact expected PWMCC of independent isotropic dictionaries, and simulations."""

from __future__ import annotations

import jax
import numpy as np
from scipy import integrate, special

from saejax.errors import check
from saejax.stability.kernel import pair_stats


def expected_max_abs_cos(d: int, n: int) -> float:
    """``E[max_{j<=n} |cos(u, v_j)|]`` for a fixed unit ``u`` and ``n`` independent uniform unit ``v_j`` in R^d.

    ``cos^2 ~ Beta(1/2, (d-1)/2)``, so ``P(|cos| <= t) = F(t) = I_{t^2}(1/2, (d-1)/2)``
    (regularised incomplete beta), and ``E[max] = int_0^1 (1 - F(t)^n) dt``. Integrated with
    quadrature split at quantiles of the maximum, where the integrand falls from 1 to 0.
    """
    check(int(d) >= 1 and int(n) >= 1, f"need d >= 1 and n >= 1, got d={d}, n={n}")
    d, n = int(d), int(n)
    if d == 1:
        return 1.0
    a, b = 0.5, (d - 1) / 2.0

    def tail(t):  # 1 - F(t)^n, accurate when F is close to 1 (log1p(-1) = -inf at t = 0 is fine)
        with np.errstate(divide="ignore"):
            return -np.expm1(n * np.log1p(-special.betaincc(a, b, t * t)))

    # Quantiles of the maximum: P(max <= t) = F(t)^n = q  <=>  1 - F(t) = 1 - q^(1/n).
    qs = (1e-15, 1e-6, 0.01, 0.5, 0.99, 1 - 1e-6, 1 - 1e-15)
    knots = [0.0] + [float(np.sqrt(special.betainccinv(a, b, -np.expm1(np.log(q) / n)))) for q in qs] + [1.0]
    knots = np.clip(np.sort(knots), 0.0, 1.0)
    return float(sum(integrate.quad(tail, lo, hi, limit=200, epsabs=1e-13, epsrel=1e-11)[0]
                     for lo, hi in zip(knots[:-1], knots[1:]) if hi > lo))


def var_max_abs_cos(d: int, n: int) -> float:
    """``Var[max_{j<=n} |cos(u, v_j)|]`` in the setting of :func:`expected_max_abs_cos`, from
    ``E[max^2] = int_0^1 2 t (1 - F(t)^n) dt`` (same quadrature)."""
    check(int(d) >= 1 and int(n) >= 1, f"need d >= 1 and n >= 1, got d={d}, n={n}")
    d, n = int(d), int(n)
    if d == 1:
        return 0.0
    a, b = 0.5, (d - 1) / 2.0

    def tail2(t):
        with np.errstate(divide="ignore"):
            return -2.0 * t * np.expm1(n * np.log1p(-special.betaincc(a, b, t * t)))

    qs = (1e-15, 1e-6, 0.01, 0.5, 0.99, 1 - 1e-6, 1 - 1e-15)
    knots = [0.0] + [float(np.sqrt(special.betainccinv(a, b, -np.expm1(np.log(q) / n)))) for q in qs] + [1.0]
    knots = np.clip(np.sort(knots), 0.0, 1.0)
    m2 = sum(integrate.quad(tail2, lo, hi, limit=200, epsabs=1e-13, epsrel=1e-11)[0]
             for lo, hi in zip(knots[:-1], knots[1:]) if hi > lo)
    return float(max(m2 - expected_max_abs_cos(d, n) ** 2, 0.0))


def analytic_p_value(pwmcc: float, d: int, n: int) -> float:
    """One-sided p-value of a mean PWMCC against the exact chance distribution of isotropic
    ``[n, d]`` dictionaries, with no resolution floor (a permutation test with 5 trained and 5
    random seeds cannot go below 1/252).

    ``z = (pwmcc - mu_0) / sigma_0``, ``p = 1 - Phi(z)``: ``mu_0`` is the exact chance PWMCC
    (:func:`random_baseline`) and ``sigma_0^2 = Var[max |cos|] / n`` (:func:`var_max_abs_cos`),
    the variance of one dictionary's mean of ``n`` row maxima. Conservative: it counts a pair's
    ``2n`` row and column maxima as only ``n`` independent values and the seed pairs as fully
    dependent, so it overstates the null variance of the mean over pairs (tested by simulation).
    The null is isotropy: dictionaries that merely share an anisotropy (both drawn towards the
    data's principal directions) reject it too, so read it with the ratio to chance.
    """
    mu0 = random_baseline(d, n, n)
    sd0 = np.sqrt(var_max_abs_cos(d, n) / n)
    if sd0 == 0:
        return 0.0 if pwmcc > mu0 else 1.0
    return float(special.ndtr(-(pwmcc - mu0) / sd0))


def random_baseline(d: int, n_a: int, n_b: int | None = None) -> float:
    """Exact expected PWMCC of two independent isotropic random dictionaries ``[n_a, d]``, ``[n_b, d]``.

    ``E[PWMCC] = 1/2 (E[max of n_b |cos|] + E[max of n_a |cos|])`` (see
    :func:`expected_max_abs_cos`): each row's maximum is over independent partners. This is the
    chance level the stability studies compare against (e.g. 0.30 for d=128, n=1024).
    """
    n_b = n_a if n_b is None else n_b
    return 0.5 * (expected_max_abs_cos(d, n_b) + expected_max_abs_cos(d, n_a))


def random_dictionaries(shape, *, key=0) -> np.ndarray:
    """Isotropic random dictionaries of ``shape`` (``[..., n, d]``): i.i.d. N(0, 1) rows, whose
    directions are uniform on the sphere. ``key``: a jax PRNG key or an int seed."""
    key = jax.random.PRNGKey(key) if isinstance(key, (int, np.integer)) else key
    return np.asarray(jax.random.normal(key, tuple(shape), dtype=np.float32))


def simulate_baseline(d: int, n_a: int, n_b: int | None = None, *, trials: int = 8, key=0) -> tuple[float, float]:
    """Monte Carlo check of :func:`random_baseline`: ``(mean, standard error)`` of
    ``PWMCC = 1/2 (mean_i max_j |cos| + mean_j max_i |cos|)`` over ``trials`` independent pairs of
    isotropic Gaussian dictionaries ``[n_a, d]``, ``[n_b, d]`` (computed with the kernel)."""
    n_b = n_a if n_b is None else n_b
    check(int(trials) >= 2, f"trials must be >= 2, got {trials}")
    key = jax.random.PRNGKey(key) if isinstance(key, (int, np.integer)) else key
    vals = []
    for k in jax.random.split(key, int(trials)):
        ka, kb = jax.random.split(k)
        st = pair_stats(random_dictionaries((n_a, d), key=ka), random_dictionaries((n_b, d), key=kb), top_k=1)
        vals.append(0.5 * (float(np.mean(st.row_max)) + float(np.mean(st.col_max))))
    vals = np.asarray(vals)
    return float(vals.mean()), float(vals.std(ddof=1) / np.sqrt(vals.size))
