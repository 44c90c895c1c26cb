"""AlpacaEval's length-controlled win rate for one pair of models ("length_controlled_minimal").

AlpacaEval 2 (``alpaca_eval/metrics/glm_winrate.py``, version 0.6.6) fits a logistic GLM to the
verdicts of one model against a baseline.  Its ``length_controlled_minimal`` formula, the one that
needs no precomputed instruction difficulties, is::

    P(model wins pair i) = sigmoid(theta_len * tanh(delta_i / sd(delta)) + theta_model)
    delta_i = len(baseline answer i) - len(model answer i)   (characters; sd with ddof 1, not centred)

The estimator reproduced here is theirs in every respect that changes the number:

* a tie counts as half a win: each pair enters twice, as a win with weight ``y`` and a loss with
  weight ``1 - y`` (their ``is_ytrue_proba`` path);
* both coefficients carry an L1 penalty (liblinear, no separate intercept): the objective is
  ``|theta_len| + |theta_model| + C * sum_i [y_i log(1/p_i) + (1 - y_i) log(1/(1 - p_i))]``;
* ``C`` is chosen from ``numpy.logspace(-4, 4, 10)`` by 5-fold cross-validation over pairs
  (``GroupKFold``: pair ``i`` in fold ``(n - 1 - i) mod 5``), scored by held-out mean log-loss with
  fractional targets, and the model is refitted on all pairs with the best ``C``;
* the length-controlled win rate is the prediction at ``delta = 0``, i.e. ``sigmoid(theta_model)``.

Two things are ours.  The interval: AlpacaEval reports none for this formula; we give the BCa
bootstrap over pairs, refitting at the chosen ``C`` with the standardisation recomputed on each
resample.  And a refusal: when the verdicts are separated by length (one side of some length
difference holds every win, the other every loss), the data cannot say what happens at equal
length and the penalty alone would decide, so the result is "not estimable" instead of a number.
The same applies to fewer than 5 pairs (too few for the 5 folds) and to a length difference that is
the same in every pair.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats as sps

from neftune.stats.intervals import FloatArray

__all__ = ["CS", "FOLDS", "SEPARATED", "fit_l1_logistic", "length_controlled_win_rate", "length_features"]

#: The grid of inverse penalty strengths that LogisticRegressionCV(Cs=10) searches.
CS = np.logspace(-4, 4, 10)
#: Cross-validation folds (AlpacaEval's ``n_splits``).
FOLDS = 5
SEPARATED = "the verdicts are separated by length"


def _sigmoid(z: FloatArray) -> FloatArray:
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * z)), dtype=float)


def length_features(len_a: FloatArray, len_b: FloatArray) -> FloatArray:
    """``tanh(delta / sd(delta))`` along the last axis, ``delta = len_a - len_b``.

    ``sd`` is the sample standard deviation (ddof 1), not centred as in AlpacaEval.  Where every
    ``delta`` of a row is equal, ``sd`` is 0 and the feature is the sign of ``delta``.
    """
    delta = len_a - len_b
    sd = delta.std(axis=-1, ddof=1, keepdims=True) if delta.shape[-1] > 1 else np.zeros_like(delta[..., :1])
    return np.where(sd > 0, np.tanh(delta / np.where(sd > 0, sd, 1.0)), np.sign(delta))


def _objective(theta: FloatArray, u: FloatArray, y: FloatArray, wt: FloatArray, c: FloatArray) -> FloatArray:
    z = theta[:, :1] + theta[:, 1:] * u
    loss = (wt * (np.logaddexp(0.0, z) - y * z)).sum(axis=1)
    return np.asarray(np.abs(theta).sum(axis=1) + c * loss, dtype=float)


def _lasso_2d(h: FloatArray, q: FloatArray) -> FloatArray:
    """Exact minimiser of ``v'Hv / 2 + q'v + |v_1| + |v_2|`` per row (H: (R, 2, 2), q: (R, 2)).

    The minimiser lies in the relative interior of one face of the sign pattern: both zero, one
    zero (soft threshold along the other axis), or both non-zero with given signs (a 2x2 solve
    that must reproduce those signs).  Every face is tried and the best valid one kept.
    """
    rows = q.shape[0]
    candidates = [np.zeros((rows, 2))]
    for k in (0, 1):
        v = np.zeros((rows, 2))
        v[:, k] = -np.sign(q[:, k]) * np.maximum(np.abs(q[:, k]) - 1.0, 0.0) / h[:, k, k]
        candidates.append(v)
    valid = [np.ones(rows, bool)] * 3
    det = h[:, 0, 0] * h[:, 1, 1] - h[:, 0, 1] ** 2
    for signs in ((1, 1), (1, -1), (-1, 1), (-1, -1)):
        r = -(q + np.array(signs, dtype=float))
        v = np.stack(
            [(h[:, 1, 1] * r[:, 0] - h[:, 0, 1] * r[:, 1]) / det, (h[:, 0, 0] * r[:, 1] - h[:, 0, 1] * r[:, 0]) / det],
            axis=1,
        )
        candidates.append(v)
        valid.append((np.sign(v) == np.array(signs)).all(axis=1))
    stacked = np.stack(candidates, axis=1)  # (R, 7, 2)
    quad = 0.5 * np.einsum("rki,rij,rkj->rk", stacked, h, stacked)
    value = quad + np.einsum("rki,ri->rk", stacked, q) + np.abs(stacked).sum(axis=2)
    value = np.where(np.stack(valid, axis=1), value, np.inf)
    return np.asarray(stacked[np.arange(rows), value.argmin(axis=1)], dtype=float)


def fit_l1_logistic(
    u: FloatArray,
    y: FloatArray,
    weight: FloatArray,
    c: FloatArray,
    *,
    start: FloatArray | None = None,
    max_iter: int = 200,
) -> FloatArray:
    """Minimise ``|b| + |w| + c * sum_i weight_i * logloss(y_i, sigmoid(b + w u_i))`` row-wise.

    ``u``, ``y``, ``weight`` broadcast to (R, n); ``c`` is (R,).  Proximal Newton: each step
    minimises the exact L1 term plus the quadratic model of the loss (:func:`_lasso_2d`), then
    backtracks until the objective drops by a quarter of the predicted decrease.  Returns ``(R, 2)``
    rows of ``(b, w)``, starting from ``start`` (a ``(b, w)`` pair; default zeros).  The objective
    is convex and the L1 term keeps the optimum finite even for separated data.
    """
    c = np.asarray(c, dtype=float)
    u, y, weight = np.broadcast_arrays(*(np.asarray(a, dtype=float) for a in (u, y, weight)))
    rows = max(u.shape[0], c.shape[0])
    u, y, weight = (np.broadcast_to(a, (rows, a.shape[1])) for a in (u, y, weight))
    c = np.broadcast_to(c, (rows,))
    theta = np.zeros((rows, 2)) if start is None else np.tile(np.asarray(start, dtype=float), (rows, 1))
    current = _objective(theta, u, y, weight, c)
    active = np.ones(rows, bool)
    for _ in range(max_iter):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        th, uu, yy, ww, cc = theta[idx], u[idx], y[idx], weight[idx], c[idx]
        p = _sigmoid(th[:, :1] + th[:, 1:] * uu)
        resid, curv = ww * (p - yy), ww * p * (1 - p)
        grad = cc[:, None] * np.stack([resid.sum(1), (resid * uu).sum(1)], axis=1)
        h01 = cc * (curv * uu).sum(1)
        h = np.empty((idx.size, 2, 2))
        h[:, 0, 0] = cc * curv.sum(1) + 1e-12
        h[:, 1, 1] = cc * (curv * uu * uu).sum(1) + 1e-12
        h[:, 0, 1] = h[:, 1, 0] = h01
        q = grad - np.einsum("rij,rj->ri", h, th)
        step = _lasso_2d(h, q) - th
        decrease = (grad * step).sum(1) + np.abs(th + step).sum(1) - np.abs(th).sum(1)
        scale = np.ones(idx.size)
        base = current[idx]
        trial = _objective(th + step, uu, yy, ww, cc)
        for _ in range(50):
            short = trial > base + 0.25 * scale * np.minimum(decrease, 0.0) + 1e-12 * np.abs(base)
            if not short.any():
                break
            scale = np.where(short, 0.5 * scale, scale)
            trial = np.where(short, _objective(th + scale[:, None] * step, uu, yy, ww, cc), trial)
        new = th + scale[:, None] * step
        theta[idx], current[idx] = new, np.minimum(trial, base)
        active[idx] = (np.abs(new - th).max(1) > 1e-10) & (decrease < -1e-13 * (1 + np.abs(base)))
    return theta


def _choose_c(u: FloatArray, y: FloatArray) -> float:
    """AlpacaEval's cross-validated ``C``: best summed held-out score, first of ties."""
    n = y.size
    fold = (n - 1 - np.arange(n)) % FOLDS
    held_out = fold[None, :] == np.arange(FOLDS)[:, None]  # (FOLDS, n)
    weight = np.repeat(~held_out, CS.size, axis=0).astype(float)  # rows: fold-major, C-minor
    cs = np.tile(CS, FOLDS)
    theta = fit_l1_logistic(u[None, :], y[None, :], weight, cs)
    p = np.clip(_sigmoid(theta[:, :1] + theta[:, 1:] * u[None, :]), 1e-15, 1 - 1e-15)
    loglik = y * np.log(p) + (1 - y) * np.log(1 - p)
    mask = np.repeat(held_out, CS.size, axis=0)
    score = (loglik * mask).sum(1) / mask.sum(1)
    return float(CS[score.reshape(FOLDS, CS.size).sum(0).argmax()])


def _separated(y: FloatArray, delta: FloatArray) -> bool:
    wins, losses = y > 0, y < 1
    if not (wins.any() and losses.any()) or np.ptp(delta) == 0:
        return False
    return bool(delta[losses].max() <= delta[wins].min() or delta[wins].max() <= delta[losses].min())


def length_controlled_win_rate(
    scores: Sequence[float] | FloatArray,
    len_a: Sequence[float] | FloatArray,
    len_b: Sequence[float] | FloatArray,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """Win rate of B (the model) over A (the baseline) at equal length, AlpacaEval's estimator.

    ``scores`` are B's results per pair (1 win, 0.5 tie, 0 loss); ``len_a``/``len_b`` the answers'
    lengths in characters.  See the module docstring for the model.  Returns ``{"win_rate", "ci",
    "n", "estimable", "reason", "C", "model_coef", "length_coef", "identifiable"}``: when
    ``estimable`` is False, ``win_rate`` and ``ci`` are NaN and ``reason`` says why (for a judge
    that always prefers the longer answer: "the verdicts are separated by length");
    ``identifiable`` is False when the length difference is the same in every pair.  The interval
    is BCa over ``n_boot`` resamples of pairs (``numpy.random.default_rng(seed)``); NaN where the
    resamples do not vary.
    """
    y = np.asarray(scores, dtype=float)
    a = np.asarray(len_a, dtype=float)
    b = np.asarray(len_b, dtype=float)
    if not (y.shape == a.shape == b.shape) or y.ndim != 1:
        raise ValueError("scores, len_a and len_b must be 1-D and of equal length")
    if np.any((y < 0) | (y > 1)) or np.any(a < 0) or np.any(b < 0):
        raise ValueError("scores must lie in [0, 1] and lengths must be non-negative")
    nan = float("nan")
    delta = a - b
    identifiable = y.size > 1 and np.ptp(delta) > 0
    out: dict[str, Any] = {
        "win_rate": nan,
        "ci": (nan, nan),
        "n": int(y.size),
        "estimable": False,
        "reason": None,
        "C": nan,
        "model_coef": nan,
        "length_coef": nan,
        "identifiable": bool(identifiable),
    }
    if y.size < FOLDS:
        out["reason"] = f"fewer than {FOLDS} scored pairs, too few for the cross-validation"
        return out
    if np.ptp(delta) == 0 and delta[0] != 0:
        out["reason"] = "every pair has the same length difference, so length and model cannot be told apart"
        return out
    if _separated(y, delta):
        out["reason"] = SEPARATED
        return out
    u = length_features(a, b)
    c = _choose_c(u, y)
    theta = fit_l1_logistic(u[None, :], y[None, :], np.ones((1, y.size)), np.array([c]))[0]
    out.update(
        estimable=True,
        win_rate=float(_sigmoid(theta[:1])[0]),
        C=c,
        model_coef=float(theta[0]),
        length_coef=float(theta[1]),
    )
    if n_boot >= 1:
        out["ci"] = _bootstrap(y, a, b, c, theta, n_boot=n_boot, seed=seed, level=level)
    return out


def _bootstrap(
    y: FloatArray, a: FloatArray, b: FloatArray, c: float, start: FloatArray, *, n_boot: int, seed: int, level: float
) -> tuple[float, float]:
    def statistic(yy: FloatArray, aa: FloatArray, bb: FloatArray, axis: int = -1) -> FloatArray:
        lead = yy.shape[:-1]
        flat = [np.moveaxis(v, axis, -1).reshape(-1, yy.shape[axis]) for v in (yy, aa, bb)]
        u = length_features(flat[1], flat[2])
        theta = fit_l1_logistic(u, flat[0], np.ones_like(flat[0]), np.full(len(flat[0]), c), start=start)
        return _sigmoid(theta[:, 0]).reshape(lead)

    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        # Resamples that do not vary make BCa undefined: scipy warns and returns NaN, passed on as "no interval".
        warnings.simplefilter("ignore", category=sps.DegenerateDataWarning)
        warnings.simplefilter("ignore", category=RuntimeWarning)
        result = sps.bootstrap(
            (y, a, b),
            statistic,
            n_resamples=n_boot,
            batch=max(1, 400_000 // y.size),
            paired=True,
            vectorized=True,
            confidence_level=level,
            method="BCa",
            rng=np.random.default_rng(seed),
        )
    lo, hi = float(result.confidence_interval.low), float(result.confidence_interval.high)
    return (lo, hi) if hi > lo else (float("nan"), float("nan"))
