"""Arms compared across training seeds: per-seed paired effects, a pooled effect, and the A/A floor.

The design is crossed: every arm is trained once per seed and evaluated on the same prompts, so a
paired difference ``D[s, i] = treated[s, i] - baseline[s, i]`` (same seed ``s``, same prompt ``i``)
varies with the seed (``a_s``: this seed's training run happened to favour one arm), with the prompt
(``b_i``: some prompts gain more than others) and with their interaction (``e_si``)::

    D[s, i] = mu + a_s + b_i + e_si,   Var(mean D) = var_a / S + var_b / n + var_e / (S n)

:func:`compare_arms` estimates ``mu`` by the grand mean and its variance by the method of moments of
the two-way ANOVA without replication (mean squares ``MS_seed``, ``MS_prompt``, ``MS_resid``)::

    V = max(MS_seed + MS_prompt - MS_resid, MS_seed, MS_prompt) / (S n)

which is unbiased for ``Var(mean D)`` before the floor; the floor keeps it at or above the two
lower bounds ``E[MS_seed] / (S n)`` and ``E[MS_prompt] / (S n)``, so it is never negative.  The
test and interval use Student's t with Satterthwaite's degrees of freedom: with 2 or 3 seeds and a
large seed component these are close to ``S - 1``, so the interval widens as much as two seeds
warrant.  A two-level bootstrap would instead draw from only ``S`` seed values (3 possible resamples
with 2 seeds) and under-cover.  With one seed there is no ``MS_seed``: the result is the paired t
test over prompts, and ``seed_variance_measured`` is False -- nothing then says how much a second
training run would move the effect, so no help or harm should be claimed from it.

For 0/1 outcomes the pooled effect is additionally checked with the exact sign test on all
discordant pairs (:func:`neftune.stats.intervals.paired_binary`): the p-value is the larger of the
two and the interval their hull, so it keeps its level whichever approximation fails at small n.

:func:`aa_floor` compares baseline seed ``s`` with baseline seed ``s'``: identical settings, so any
difference is noise.  The largest A/A difference is the floor below which an effect is not news.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats as sps

from neftune.stats.intervals import FloatArray, paired_binary

__all__ = ["Effect", "SeedComparison", "aa_floor", "compare_arms", "compare_seeds", "is_binary", "seed_level_test"]


def is_binary(*arrays: ArrayLike) -> bool:
    """True when every value of every array is 0 or 1 (and there is at least one value)."""
    values = [np.asarray(a, dtype=float) for a in arrays]
    return any(v.size for v in values) and all(np.isin(v, (0.0, 1.0)).all() for v in values)


def _as_design(treated: ArrayLike, baseline: ArrayLike) -> tuple[FloatArray, FloatArray]:
    t = np.asarray(treated, dtype=float)
    b = np.asarray(baseline, dtype=float)
    if t.shape != b.shape or t.ndim < 2:
        raise ValueError(f"treated and baseline must both be (..., seeds, prompts); got {t.shape} and {b.shape}")
    if t.shape[-1] < 1 or t.shape[-2] < 1:
        raise ValueError("need at least one seed and one prompt")
    if not (np.isfinite(t).all() and np.isfinite(b).all()):
        raise ValueError("per-example values must be finite")
    return t, b


def _crossed(d: FloatArray) -> dict[str, FloatArray]:
    """Method-of-moments variance of the grand mean of ``d`` (..., S, n) in the crossed design."""
    s, n = d.shape[-2], d.shape[-1]
    grand = d.mean(axis=(-2, -1))
    seed_means = d.mean(axis=-1)
    prompt_means = d.mean(axis=-2)
    g = grand[..., None]
    zero = np.zeros_like(grand)
    ms_seed = n * ((seed_means - g) ** 2).sum(-1) / (s - 1) if s > 1 else zero
    ms_prompt = s * ((prompt_means - g) ** 2).sum(-1) / (n - 1) if n > 1 else zero
    if s > 1 and n > 1:
        resid = d - seed_means[..., None] - prompt_means[..., None, :] + grand[..., None, None]
        ms_resid = (resid**2).sum(axis=(-2, -1)) / ((s - 1) * (n - 1))
    else:
        ms_resid = zero
    if s == 1:  # paired t over prompts
        num, df = ms_prompt, np.full_like(grand, n - 1.0)
    else:  # seeds are the scarce level: t with S - 1 degrees of freedom
        num, df = ms_seed + np.maximum(ms_prompt - ms_resid, 0.0), np.full_like(grand, s - 1.0)
    return {
        "estimate": grand,
        "var": num / (s * n),
        "df": df,
        "seed_var": np.maximum((ms_seed - ms_resid) / n, 0.0) if s > 1 else np.full_like(grand, np.nan),
        "prompt_var": np.maximum((ms_prompt - ms_resid) / s, 0.0) if s > 1 else np.full_like(grand, np.nan),
        "resid_var": ms_resid if s > 1 else ms_prompt,
    }


def compare_arms(
    treated: ArrayLike, baseline: ArrayLike, *, binary: bool | None = None, level: float = 0.95
) -> dict[str, FloatArray]:
    """Pooled paired effect of ``treated`` over ``baseline``, vectorised over leading axes.

    Both arrays are ``(..., seeds, prompts)``, row ``s`` of each trained with seed ``s`` and column
    ``i`` the same prompt.  Returns arrays under ``"estimate"``, ``"ci"`` (stacked ``(lo, hi)``),
    ``"p_value"`` (two-sided), ``"df"``, ``"se"`` and the variance components ``"seed_var"``,
    ``"prompt_var"`` and ``"resid_var"`` (of the paired difference; the first two NaN with one seed).
    ``binary=None`` detects 0/1 outcomes.  See the module docstring for the method.
    """
    t, b = _as_design(treated, baseline)
    binary = is_binary(t, b) if binary is None else binary
    level_tail = (1 + level) / 2
    fit = _crossed(t - b)
    est, var, df = fit["estimate"], fit["var"], fit["df"]
    se = np.sqrt(var)
    with np.errstate(invalid="ignore", divide="ignore"):
        stat = np.abs(est) / se
        p = 2 * sps.t.sf(stat, df)
        half = sps.t.ppf(level_tail, df) * se
    no_spread = var <= 0
    p = np.where(no_spread, np.where(est == 0, 1.0, np.nan), p)
    lo = np.where(no_spread, np.where(est == 0, 0.0, np.nan), est - half)
    hi = np.where(no_spread, np.where(est == 0, 0.0, np.nan), est + half)
    if binary:
        flat = (*t.shape[:-2], t.shape[-2] * t.shape[-1])
        exact = paired_binary(t.reshape(flat), b.reshape(flat), level)
        p = np.where(np.isnan(p), exact["p_value"], np.maximum(p, exact["p_value"]))
        lo = np.fmin(lo, exact["ci"][0])
        hi = np.fmax(hi, exact["ci"][1])
    out = dict(fit)
    out.update({"ci": np.stack([lo, hi]), "p_value": p, "se": se})
    return out


@dataclass(frozen=True)
class Effect:
    """One paired effect of an arm over another: point estimate, interval, two-sided p-value."""

    estimate: float
    ci: tuple[float, float]
    p_value: float
    seeds: int
    prompts: int
    method: str
    df: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (NaN becomes None)."""
        return {k: _clean(v) for k, v in self.__dict__.items()}


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, tuple):
        return [_clean(v) for v in value]
    return value


def _effect(result: dict[str, FloatArray], seeds: int, prompts: int, method: str) -> Effect:
    lo, hi = result["ci"]
    df = result.get("df")
    return Effect(
        estimate=float(result["estimate"]),
        ci=(float(lo), float(hi)),
        p_value=float(result["p_value"]),
        seeds=seeds,
        prompts=prompts,
        method=method,
        df=None if df is None else float(df),
    )


def _one_seed(treated: FloatArray, baseline: FloatArray, binary: bool, level: float) -> Effect:
    if binary:
        return _effect(paired_binary(treated, baseline, level), 1, treated.size, "exact McNemar, Newcombe interval")
    return _effect(compare_arms(treated[None], baseline[None], binary=False, level=level), 1, treated.size, "paired t")


@dataclass(frozen=True)
class SeedComparison:
    """An arm against the baseline across seeds: the pooled effect and the effect within each seed.

    ``pooled`` is the verdict's effect.  With one seed it equals ``per_seed[0]`` and
    ``seed_variance_measured`` is False: the interval then covers prompt sampling only.
    ``components`` holds the variance components of the paired difference (seed, prompt, residual).
    """

    pooled: Effect
    per_seed: list[Effect]
    seed_variance_measured: bool
    binary: bool
    components: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "pooled": self.pooled.to_dict(),
            "per_seed": [e.to_dict() for e in self.per_seed],
            "seed_variance_measured": self.seed_variance_measured,
            "binary": self.binary,
            "components": {k: _clean(v) for k, v in self.components.items()},
        }


def compare_seeds(
    treated: ArrayLike, baseline: ArrayLike, *, binary: bool | None = None, level: float = 0.95
) -> SeedComparison:
    """:func:`compare_arms` for one experiment (``(seeds, prompts)`` arrays), plus each seed's own effect."""
    t, b = _as_design(treated, baseline)
    if t.ndim != 2:
        raise ValueError("compare_seeds takes (seeds, prompts) arrays; use compare_arms for batches")
    binary = is_binary(t, b) if binary is None else binary
    seeds, prompts = t.shape
    per_seed = [_one_seed(t[s], b[s], binary, level) for s in range(seeds)]
    if seeds == 1:
        pooled = per_seed[0]
        components = {"seed_var": float("nan"), "prompt_var": float("nan"), "resid_var": float("nan")}
    else:
        result = compare_arms(t, b, binary=binary, level=level)
        method = "crossed seeds x prompts, Satterthwaite t" + (" and exact sign test" if binary else "")
        pooled = _effect(result, seeds, prompts, method)
        components = {k: float(result[k]) for k in ("seed_var", "prompt_var", "resid_var")}
    return SeedComparison(pooled, per_seed, seeds > 1, binary, components)


def aa_floor(
    baseline: ArrayLike, *, seed_ids: Sequence[int] | None = None, binary: bool | None = None, level: float = 0.95
) -> dict[str, Any]:
    """Baseline seed against baseline seed (A/A): the noise floor of one comparison.

    ``baseline`` is ``(seeds, prompts)``.  Returns ``{"measured", "pairs", "floor", "seed_sd"}``:
    ``pairs`` lists ``{"seeds": [s, s'], **effect}`` for every pair of seeds (seed ``s'`` minus seed
    ``s``, paired by prompt, the per-seed method), ``floor`` is the largest absolute A/A difference
    and ``seed_sd`` the standard deviation of the baseline's per-seed means.  Seeds are named by
    ``seed_ids`` (default: their row numbers).  With one seed ``measured`` is False and the numbers
    are None.
    """
    b = np.asarray(baseline, dtype=float)
    if b.ndim != 2:
        raise ValueError("aa_floor takes a (seeds, prompts) array")
    binary = is_binary(b) if binary is None else binary
    ids = list(range(b.shape[0])) if seed_ids is None else [int(i) for i in seed_ids]
    if len(ids) != b.shape[0]:
        raise ValueError(f"{len(ids)} seed ids for {b.shape[0]} seeds")
    if b.shape[0] < 2:
        return {"measured": False, "pairs": [], "floor": None, "seed_sd": None}
    pairs = []
    for s, r in combinations(range(b.shape[0]), 2):
        effect = _one_seed(b[r], b[s], binary, level)
        pairs.append({**effect.to_dict(), "seeds": [ids[s], ids[r]]})
    return {
        "measured": True,
        "pairs": pairs,
        "floor": max(abs(p["estimate"]) for p in pairs),
        "seed_sd": float(np.std(b.mean(axis=1), ddof=1)),
    }


def seed_level_test(values: ArrayLike, null: float = 0.0, *, level: float = 0.95) -> Effect | None:
    """One number per seed (e.g. a judge's LC win rate of each seed's pair): their mean against ``null``.

    Student's t over the seeds (``S - 1`` degrees of freedom): the spread of the per-seed values
    holds both the within-seed sampling noise and the training-seed variance.  ``None`` with fewer
    than two finite values, where the seed variance is unmeasured.
    """
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size < 2:
        return None
    mean, sd, df = float(v.mean()), float(v.std(ddof=1)), v.size - 1.0
    if sd == 0:
        return Effect(mean, (mean, mean), 1.0 if mean == null else float("nan"), v.size, 0, "t over seeds", df)
    se = sd / float(np.sqrt(v.size))
    half = float(sps.t.ppf((1 + level) / 2, df)) * se
    p = float(2 * sps.t.sf(abs(mean - null) / se, df))
    return Effect(mean, (mean - half, mean + half), p, v.size, 0, "t over seeds", df)
