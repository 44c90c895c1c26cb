"""Intervals and tests for one sample or one pair of arms, and Holm's correction over a family.

* :func:`bootstrap_ci` -- BCa bootstrap interval of a mean (``scipy.stats.bootstrap``); no interval
  (NaN) from values that do not vary, since nothing measures their spread.
* :func:`wilson_ci` -- Wilson score interval of a proportion.
* :func:`paired_binary` -- paired 0/1 outcomes of two arms on the same examples: difference of the
  proportions, exact McNemar (sign) test on the discordant pairs, and an interval that is the hull
  of Newcombe's hybrid score interval (his method 10) and the exact Clopper-Pearson interval of the
  discordant split, so that it contains 0 whenever the exact test does not reject.
* :func:`holm` -- Holm-Bonferroni adjusted p-values.

The binary functions are vectorised over leading axes so that ``tests/test_stats.py`` can
calibrate them on thousands of simulated experiments at once.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import stats as sps

__all__ = ["FloatArray", "bootstrap_ci", "holm", "paired_binary", "wilson_ci", "win_rate"]

FloatArray = NDArray[np.float64]


def _z(level: float) -> float:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return float(sps.norm.ppf((1 + level) / 2))


def win_rate(scores: Sequence[float]) -> float:
    """Mean score of the candidate (1 win, 0.5 tie, 0 loss); NaN when there are no scores."""
    if len(scores) == 0:
        return float("nan")
    return float(np.mean(np.asarray(scores, dtype=float)))


def bootstrap_ci(
    scores: Sequence[float] | FloatArray, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """BCa bootstrap confidence interval of the mean of ``scores``.

    ``scipy.stats.bootstrap(method="BCa")`` with ``n_boot`` resamples drawn from
    ``numpy.random.default_rng(seed)``.  BCa corrects the percentile interval's bias and skew, which
    matters at small n.  Returns ``(nan, nan)`` when there are fewer than two scores or they are all
    equal: three wins out of three say nothing about how much the mean could vary, and a zero-width
    interval would read as certainty.  For 0/1 outcomes prefer :func:`wilson_ci` or
    :func:`paired_binary`, which stay calibrated at any n.
    """
    _z(level)
    values = np.asarray(scores, dtype=float).ravel()
    nan = float("nan")
    if values.size < 2 or n_boot < 1 or np.ptp(values) == 0:
        return (nan, nan)
    with warnings.catch_warnings():
        # A resample set with no spread makes BCa undefined; scipy warns and returns NaN, which we pass on.
        warnings.simplefilter("ignore", category=sps.DegenerateDataWarning)
        result = sps.bootstrap(
            (values,),
            np.mean,
            n_resamples=n_boot,
            confidence_level=level,
            method="BCa",
            vectorized=True,
            rng=np.random.default_rng(seed),
        )
    return (float(result.confidence_interval.low), float(result.confidence_interval.high))


def wilson_ci(successes: ArrayLike, n: ArrayLike, level: float = 0.95) -> tuple[FloatArray, FloatArray]:
    """Wilson score interval of ``successes / n`` (vectorised); ``(0, 1)`` where ``n`` is 0."""
    z = _z(level)
    k = np.asarray(successes, dtype=float)
    m = np.asarray(n, dtype=float)
    safe = np.where(m > 0, m, 1.0)
    p = k / safe
    centre = (p + z * z / (2 * safe)) / (1 + z * z / safe)
    half = z * np.sqrt(p * (1 - p) / safe + z * z / (4 * safe * safe)) / (1 + z * z / safe)
    lo = np.where((m > 0) & (k > 0), np.clip(centre - half, 0.0, 1.0), 0.0)
    hi = np.where((m > 0) & (k < m), np.clip(centre + half, 0.0, 1.0), 1.0)
    return lo, hi


def _sign_test(wins: FloatArray, losses: FloatArray) -> FloatArray:
    """Exact two-sided sign test (exact McNemar): ``min(1, 2 P(X <= min(wins, losses)))``, X ~ Bin(m, 1/2)."""
    m = wins + losses
    tail = sps.binom.cdf(np.minimum(wins, losses), m, 0.5)
    return np.where(m > 0, np.minimum(1.0, 2.0 * tail), 1.0)


def _clopper_pearson(k: FloatArray, m: FloatArray, level: float) -> tuple[FloatArray, FloatArray]:
    tail = (1 - level) / 2
    with np.errstate(invalid="ignore"):
        lo = np.where(k > 0, sps.beta.ppf(tail, np.maximum(k, 1e-300), m - k + 1), 0.0)
        hi = np.where(k < m, sps.beta.ppf(1 - tail, k + 1, np.maximum(m - k, 1e-300)), 1.0)
    return np.nan_to_num(lo, nan=0.0), np.nan_to_num(hi, nan=1.0)


def paired_binary(treated: ArrayLike, baseline: ArrayLike, level: float = 0.95) -> dict[str, FloatArray]:
    """Paired comparison of 0/1 outcomes of two arms on the same examples (last axis = examples).

    Returns arrays (shape = the leading axes) under ``"estimate"`` (proportion of ``treated`` minus
    proportion of ``baseline``), ``"ci"`` (a ``(lo, hi)`` pair), ``"p_value"`` (exact McNemar test),
    ``"wins"``/``"losses"`` (discordant pairs won by ``treated`` / by ``baseline``) and ``"n"``.

    The interval is the hull of two intervals: Newcombe's hybrid score interval for the difference
    of paired proportions (Stat Med 1998;17:2127, method 10) and ``q (2 pi - 1)``, where ``q`` is
    the observed share of discordant pairs and ``pi`` runs over the Clopper-Pearson interval of
    ``wins / (wins + losses)``.  The second is the inversion of the exact test, so the hull contains
    0 whenever the exact test does not reject; three wins out of three give about ``(-0.42, 1.0)``.
    """
    t = np.asarray(treated, dtype=float)
    b = np.asarray(baseline, dtype=float)
    if t.shape != b.shape or t.ndim < 1:
        raise ValueError("treated and baseline must have the same shape, examples on the last axis")
    if not (np.isin(t, (0.0, 1.0)).all() and np.isin(b, (0.0, 1.0)).all()):
        raise ValueError("paired_binary needs outcomes that are all 0 or 1")
    n = np.full(t.shape[:-1], float(t.shape[-1]))
    both = (t * b).sum(-1)
    wins = (t * (1 - b)).sum(-1)
    losses = ((1 - t) * b).sum(-1)
    neither = n - both - wins - losses
    safe_n = np.maximum(n, 1.0)
    p_t, p_b = (both + wins) / safe_n, (both + losses) / safe_n
    estimate = p_t - p_b
    lt, ut = wilson_ci(both + wins, n, level)
    lb, ub = wilson_ci(both + losses, n, level)
    margins = (both + wins) * (neither + losses) * (both + losses) * (neither + wins)
    # Newcombe's phi, with his refinement for positive association: AD - BC shrunk by N/2 (not below 0).
    assoc = both * neither - wins * losses
    assoc = np.where(assoc > 0, np.maximum(assoc - n / 2, 0.0), assoc)
    with np.errstate(invalid="ignore", divide="ignore"):
        phi = np.where(margins > 0, assoc / np.sqrt(margins), 0.0)
    phi = np.clip(phi, -1.0, 1.0)
    down = np.sqrt(np.maximum((p_t - lt) ** 2 - 2 * phi * (p_t - lt) * (ub - p_b) + (ub - p_b) ** 2, 0.0))
    up = np.sqrt(np.maximum((ut - p_t) ** 2 - 2 * phi * (ut - p_t) * (p_b - lb) + (p_b - lb) ** 2, 0.0))
    pi_lo, pi_hi = _clopper_pearson(wins, wins + losses, level)
    share = (wins + losses) / safe_n
    lo = np.minimum(estimate - down, share * (2 * pi_lo - 1))
    hi = np.maximum(estimate + up, share * (2 * pi_hi - 1))
    return {
        "estimate": estimate,
        "ci": np.stack([np.maximum(lo, -1.0), np.minimum(hi, 1.0)]),
        "p_value": _sign_test(wins, losses),
        "wins": wins,
        "losses": losses,
        "n": n,
    }


def holm(p_values: Sequence[float] | FloatArray) -> FloatArray:
    """Holm-Bonferroni adjusted p-values, in the input order.

    The family is every p-value that is not NaN (a NaN means "not tested" and stays NaN).  With
    ``m`` tests sorted ascending, ``p_adj(i) = max_{j <= i} min(1, (m - j + 1) p(j))``: rejecting
    where ``p_adj < alpha`` controls the family-wise error rate at ``alpha`` under any dependence.
    """
    p = np.asarray(p_values, dtype=float)
    if p.ndim != 1:
        raise ValueError("holm takes a 1-D sequence of p-values")
    if np.any((p < 0) | (p > 1)):
        raise ValueError("p-values must lie in [0, 1]")
    out = np.full(p.shape, np.nan)
    tested = np.flatnonzero(~np.isnan(p))
    order = tested[np.argsort(p[tested], kind="stable")]
    m = order.size
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(scaled)
    return out
