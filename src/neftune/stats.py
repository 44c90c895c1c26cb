"""Statistics for comparing finetuned arms: pure numpy/scipy, importing no other neftune stage.

Every verdict the report prints is computed here, so that each method can be calibrated by
simulation in ``tests/test_stats.py`` without a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["bootstrap_ci", "length_controlled_win_rate", "win_rate"]


def win_rate(scores: Sequence[float]) -> float:
    """Mean score of the candidate (1 win, 0.5 tie, 0 loss); NaN when there are no scores."""
    if len(scores) == 0:
        return float("nan")
    return float(np.mean(np.asarray(scores, dtype=float)))


def _bootstrap_indices(rng: np.random.Generator, n: int, n_boot: int, max_cells: int = 2_000_000):
    # Chunked so memory stays bounded (n_boot x n indices at once would be large for big n).
    rows = max(1, max_cells // max(n, 1))
    for start in range(0, n_boot, rows):
        yield rng.integers(0, n, size=(min(rows, n_boot - start), n))


def bootstrap_ci(
    scores: Sequence[float], n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of ``scores``.

    Resamples the scores with replacement ``n_boot`` times (numpy ``default_rng(seed)``) and returns
    the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the resampled means.  ``(nan, nan)``
    for no scores.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    values = np.asarray(scores, dtype=float)
    if values.size == 0 or n_boot < 1:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = np.concatenate([values[idx].mean(axis=1) for idx in _bootstrap_indices(rng, values.size, n_boot)])
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return (float(lo), float(hi))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _fit_logistic(
    x: np.ndarray, y: np.ndarray, l2_slope: float, l2_intercept: float, iterations: int = 100
) -> tuple[np.ndarray, np.ndarray]:
    """Penalised logistic regression ``P(y) = sigmoid(b + w x)`` fitted row-wise on (B, n) arrays.

    Minimises mean binary cross-entropy (``y`` may be fractional) plus ``l2_intercept * b^2 / 2 +
    l2_slope * w^2 / 2`` by damped Newton steps with backtracking, vectorised over the B rows so a
    whole bootstrap is one fit.  The penalties keep the optimum finite when the outcome is perfectly
    separated by ``x`` or constant.
    """
    rows = x.shape[0]
    b = np.zeros(rows)
    w = np.zeros(rows)

    def objective(b: np.ndarray, w: np.ndarray) -> np.ndarray:
        z = b[:, None] + w[:, None] * x
        return (np.logaddexp(0.0, z) - y * z).mean(axis=1) + 0.5 * (l2_intercept * b**2 + l2_slope * w**2)

    current = objective(b, w)
    for _ in range(iterations):
        p = _sigmoid(b[:, None] + w[:, None] * x)
        residual = p - y
        grad_b = residual.mean(axis=1) + l2_intercept * b
        grad_w = (residual * x).mean(axis=1) + l2_slope * w
        s = p * (1.0 - p)
        h_bb = s.mean(axis=1) + l2_intercept
        h_bw = (s * x).mean(axis=1)
        h_ww = (s * x * x).mean(axis=1) + l2_slope
        det = h_bb * h_ww - h_bw**2  # >= l2_intercept * l2_slope > 0 by Cauchy-Schwarz
        step_b = (h_ww * grad_b - h_bw * grad_w) / det
        step_w = (h_bb * grad_w - h_bw * grad_b) / det
        scale = np.ones(rows)
        for _ in range(40):
            trial = objective(b - scale * step_b, w - scale * step_w)
            worse = trial > current + 1e-15
            if not worse.any():
                break
            scale = np.where(worse, scale * 0.5, scale)
        else:
            scale = np.where(worse, 0.0, scale)
        b = b - scale * step_b
        w = w - scale * step_w
        current = objective(b, w)
        if np.max(np.abs(scale * step_b)) < 1e-10 and np.max(np.abs(scale * step_w)) < 1e-10:
            break
    return b, w


def length_controlled_win_rate(
    scores: Sequence[float],
    len_a: Sequence[float],
    len_b: Sequence[float],
    *,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    l2: float = 1.0,
) -> dict[str, Any]:
    """Win rate of B over A predicted for answers of equal length.

    Model: the score of pair ``i`` (1, 0.5 or 0, used as a fractional target) follows
    ``P(B wins) = sigmoid(b + w * x_i)`` with ``x_i = log((len_b_i + 1) / (len_a_i + 1)) / s``, the
    log length ratio divided by its standard deviation ``s`` over the pairs (not centred, so
    ``x = 0`` still means "same length").  It is fitted by maximum a posteriori estimation: the
    summed cross-entropy plus ``l2 * w**2 / 2`` (a Gaussian prior of precision ``l2`` on the slope
    per standard deviation of log length ratio, whose weight fades as pairs accumulate) plus
    ``1e-4 * b**2 / 2`` (a nearly flat prior on the intercept, only there so that all-win or
    all-loss resamples still give a finite fit).  The length-controlled win rate is the prediction at
    equal length, ``sigmoid(b)``; its confidence interval is the percentile bootstrap over pairs
    (same resampling scheme and seed as :func:`bootstrap_ci`), refitting the model on every resample.

    Consequences: with all lengths equal the slope has no effect and the result is the raw win rate;
    when B's wins are explained by B being longer, the result moves towards 0.5.  If the length
    ratio is the same for every pair, the length effect cannot be separated from the intercept; the
    prior then assigns it to the intercept, i.e. the raw rate is returned, and ``"identifiable"`` is
    False.  When outcomes are perfectly separated by length with no pair near equal length, the
    value at equal length is an extrapolation into the gap and should be read with care.

    Returns ``{"win_rate", "ci", "intercept", "slope", "scale", "n", "identifiable"}`` (``slope`` per
    standard deviation of the log length ratio).
    """
    y = np.asarray(scores, dtype=float)
    a = np.asarray(len_a, dtype=float)
    b_len = np.asarray(len_b, dtype=float)
    if not (y.shape == a.shape == b_len.shape) or y.ndim != 1:
        raise ValueError("scores, len_a and len_b must be 1-D and of equal length")
    if np.any(a < 0) or np.any(b_len < 0):
        raise ValueError("lengths must be non-negative")
    nan = float("nan")
    if y.size == 0:
        return {
            "win_rate": nan,
            "ci": (nan, nan),
            "intercept": nan,
            "slope": nan,
            "scale": nan,
            "n": 0,
            "identifiable": False,
        }
    x = np.log1p(b_len) - np.log1p(a)
    spread = float(x.std())
    identifiable = spread > 1e-12
    scale = spread if identifiable else 1.0
    xs = x / scale
    # _fit_logistic averages the loss over pairs, so the (summed-loss) prior precisions are divided by n.
    l2_slope, l2_intercept = l2 / y.size, 1e-4 / y.size
    intercept, slope = _fit_logistic(xs[None, :], y[None, :], l2_slope, l2_intercept)
    rate = float(_sigmoid(intercept)[0])

    lo = hi = nan
    if n_boot >= 1:
        rng = np.random.default_rng(seed)
        boot = []
        for idx in _bootstrap_indices(rng, y.size, n_boot):
            fitted_b, _ = _fit_logistic(xs[idx], y[idx], l2_slope, l2_intercept)
            boot.append(_sigmoid(fitted_b))
        lo, hi = (float(q) for q in np.quantile(np.concatenate(boot), [(1 - level) / 2, (1 + level) / 2]))
    return {
        "win_rate": rate,
        "ci": (lo, hi),
        "intercept": float(intercept[0]),
        "slope": float(slope[0]),
        "scale": scale,
        "n": int(y.size),
        "identifiable": identifiable,
    }
