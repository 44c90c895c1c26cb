"""Arms -> the experiment's verdicts: seeds paired within, pooled per alpha, one primary metric, Holm.

The design: every alpha (and the alpha = 0 baseline) is trained once per seed and answers the same
eval prompts.  For each alpha and metric, :func:`build_verdicts` pairs the alpha's arm of seed ``s``
with the baseline of seed ``s``, prompt by prompt, and pools the seeds with
:func:`neftune.stats.compare_seeds` (an interval that includes training-seed variance).  The judge's
win rates, one number per seed, are pooled with a t test over seeds.  Baseline seed against baseline
seed (A/A) gives the noise floor.

One metric is primary, declared before looking (``results["primary"]``): the verdict sentence rests
on it alone, Holm-corrected across the alphas.  Every other metric is exploratory and counts as
significant only after Holm correction across the whole family of alpha x metric tests.  With one
seed the training-seed variance is unmeasured and no verdict claims help or harm.

Which metrics are tested, how (prompt by prompt or per seed), their labels, units and better
directions, and the order the primary metric is chosen in when none was declared all come from the
metric registry, :mod:`neftune.metrics`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from neftune.metrics import MetricSpec, default_primaries, judge_metrics, paired_metrics
from neftune.report.censoring import withheld_reason
from neftune.report.paired import per_example_values
from neftune.report.values import as_float, is_interval, mapping_at
from neftune.report.words import UNMEASURED, WITHHELD, verdict_word
from neftune.results import SCHEMA_VERSION
from neftune.stats import aa_floor, compare_seeds, holm, seed_level_test

__all__ = [
    "SCHEMA_VERSION",
    "SIGNIFICANCE",
    "UNMEASURED",
    "Pooled",
    "Verdicts",
    "build_verdicts",
]

#: Family-wise error rate of every verdict.
SIGNIFICANCE = 0.05


@dataclass
class Pooled:
    """One alpha's effect on one metric, pooled over seeds.

    ``estimate`` and ``ci`` are differences against the baseline (against 50% for judge win
    rates); ``baseline`` and ``arm`` are the means they compare.  ``p_holm`` is Holm-adjusted over
    the alphas for the primary metric and over the whole family otherwise.
    """

    alpha: float
    metric: str
    label: str
    unit: str
    scale: float
    higher_is_better: bool | None
    role: str  # "primary" or "exploratory"
    seeds: list[int]
    n: int  # prompts paired per seed (0 for judge rates)
    baseline: float
    arm: float
    estimate: float
    ci: tuple[float, float]
    p_value: float
    method: str
    per_seed: list[dict[str, Any]] = field(default_factory=list)
    components: dict[str, Any] = field(default_factory=dict)
    p_holm: float = float("nan")
    verdict: str = UNMEASURED
    withheld: str | None = None  # why no verdict is given (length: too many answers cut at the token cap)


@dataclass
class Verdicts:
    """Everything the verdict sentence and the effects tables rest on (``results.json["analysis"]``)."""

    primary: str | None
    primary_declared: str | None
    primary_source: str
    primary_note: str | None
    seeds: list[int]
    seed_variance_measured: bool
    pooled: dict[float, dict[str, Pooled]]  # alpha -> metric -> effect
    aa: dict[str, dict[str, Any]]  # metric -> aa_floor()
    family_size: int

    def primary_effects(self) -> list[Pooled]:
        """The primary metric's pooled effect for every alpha that has it, by alpha."""
        return [m[self.primary] for _, m in sorted(self.pooled.items()) if self.primary in m]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, keyed by alpha as text."""
        out = asdict(self)
        out["pooled"] = {f"{alpha:g}": {k: asdict(v) for k, v in m.items()} for alpha, m in sorted(self.pooled.items())}
        return out


def _metrics() -> Sequence[MetricSpec]:
    return paired_metrics()


def _matrix(arms: Sequence[Mapping[str, Any]], source: str) -> np.ndarray | None:
    """Per-example values of ``source`` as a (len(arms), n) array; prompts with any gap dropped."""
    rows = [per_example_values(arm, source) for arm in arms]
    if any(r is None for r in rows) or len({len(r) for r in rows if r is not None}) != 1:
        return None
    keep = [i for i in range(len(rows[0] or [])) if all(r[i] is not None for r in rows if r is not None)]
    if not keep:
        return None
    return np.array([[r[i] for i in keep] for r in rows if r is not None], dtype=float)


def _paired(
    alpha: float, metric: MetricSpec, treated: list[Mapping[str, Any]], bases: list[Mapping[str, Any]], seeds: list[int]
) -> Pooled | None:
    if metric.per_example is None:
        return None
    both = _matrix([*treated, *bases], metric.per_example)
    if both is None:
        return None
    t, b = both[: len(treated)], both[len(treated) :]
    result = compare_seeds(t, b)
    per_seed = [{**e.to_dict(), "seed": s} for e, s in zip(result.per_seed, seeds, strict=True)]
    pooled = result.pooled
    return Pooled(
        *_described(alpha, metric, seeds),
        int(t.shape[1]),
        float(b.mean()),
        float(t.mean()),
        pooled.estimate,
        pooled.ci,
        pooled.p_value,
        pooled.method,
        per_seed,
        result.to_dict()["components"],
    )


def _described(
    alpha: float, metric: MetricSpec, seeds: list[int]
) -> tuple[float, str, str, str, float, bool | None, str, list[int]]:
    """The leading fields of a :class:`Pooled`: which arm and metric, how it is shown, which seeds."""
    return (alpha, metric.key, metric.label, metric.unit, metric.scale, metric.higher_is_better, "exploratory", seeds)


def _judged(alpha: float, metric: MetricSpec, treated: list[Mapping[str, Any]], seeds: list[int]) -> Pooled | None:
    rates = [as_float(mapping_at(arm, "judge").get(metric.key)) for arm in treated]
    if any(r is None for r in rates):
        return None
    values = [float(r) for r in rates if r is not None]
    ci_key = metric.ci_key or "ci"
    per_seed = []
    for arm, seed, rate in zip(treated, seeds, values, strict=True):
        ci = mapping_at(arm, "judge").get(ci_key)
        interval = [float(c) - 0.5 for c in ci] if is_interval(ci) else None
        per_seed.append({"seed": seed, "estimate": rate - 0.5, "ci": interval})
    test = seed_level_test(values, 0.5)
    nan = float("nan")
    if test is None:  # one seed: the judge's own interval, no test across seeds
        ci = mapping_at(treated[0], "judge").get(ci_key)
        lo_hi = (float(ci[0]) - 0.5, float(ci[1]) - 0.5) if is_interval(ci) else (nan, nan)
        estimate, p, method = values[0] - 0.5, nan, "one seed: the judge's interval over pairs"
    else:
        lo_hi, estimate, p, method = (
            (test.ci[0] - 0.5, test.ci[1] - 0.5),
            test.estimate - 0.5,
            test.p_value,
            test.method,
        )
    return Pooled(
        *_described(alpha, metric, seeds),
        0,
        0.5,
        0.5 + estimate,
        estimate,
        lo_hi,
        p,
        method,
        per_seed,
    )


def _judge_reliable(treated: Sequence[Mapping[str, Any]], low: float) -> bool:
    values = [as_float(mapping_at(arm, "judge").get("consistency")) for arm in treated]
    return bool(values) and all(v is not None and v >= low for v in values)


def _verdict(effect: Pooled, p_holm: float, measured: bool) -> str:
    if effect.withheld is not None:
        return WITHHELD
    if not measured:
        return UNMEASURED
    significant = math.isfinite(p_holm) and p_holm < SIGNIFICANCE
    return verdict_word(significant, effect.estimate > 0, effect.higher_is_better)


def _declared(results: Mapping[str, Any]) -> tuple[str | None, str, str | None]:
    """(metric, source, fallback) as declared by ``results["primary"]`` or ``data.primary_metric``."""
    primary = mapping_at(results, "primary")
    if primary.get("metric"):
        return str(primary["metric"]), str(primary.get("source") or "declared before the run"), primary.get("fallback")
    preset = mapping_at(results, "data").get("primary_metric")
    if preset:
        return str(preset), "declared by the eval set's preset", None
    return None, "not declared", None


def build_verdicts(
    results: Mapping[str, Any], arms: Sequence[Mapping[str, Any]], *, low_consistency: float
) -> Verdicts:
    """Pool every alpha over seeds, pick the primary metric, correct for multiple comparisons."""
    bases = {int(a.get("seed") or 0): a for a in arms if as_float(a.get("alpha")) == 0.0}
    by_alpha: dict[float, dict[int, Mapping[str, Any]]] = {}
    for arm in arms:
        alpha = as_float(arm.get("alpha"))
        if alpha is not None and alpha != 0.0:
            by_alpha.setdefault(alpha, {})[int(arm.get("seed") or 0)] = arm
    pooled: dict[float, dict[str, Pooled]] = {}
    reliable = True
    for alpha, per_seed in sorted(by_alpha.items()):
        seeds = sorted(s for s in per_seed if s in bases)
        if not seeds:
            continue
        treated, base = [per_seed[s] for s in seeds], [bases[s] for s in seeds]
        effects = {m.key: e for m in _metrics() if (e := _paired(alpha, m, treated, base, seeds)) is not None}
        if "length_chars" in effects:
            effects["length_chars"].withheld = withheld_reason(base, treated)
        for judged in judge_metrics():
            if (e := _judged(alpha, judged, treated, seeds)) is not None:
                effects[judged.key] = e
        if "lc_win_rate" in effects:
            reliable = reliable and _judge_reliable(treated, low_consistency)
        pooled[alpha] = effects

    declared, source, fallback = _declared(results)
    measured_keys = set.intersection(*(set(m) for m in pooled.values())) if pooled else set()
    primary, note = declared, None
    if declared == "lc_win_rate" and (not reliable or declared not in measured_keys):
        primary = fallback if fallback in measured_keys else None
        why = "failed its reliability check" if declared in measured_keys else "gave no length-controlled win rate"
        note = f"The judge {why}, so the primary metric is the declared fallback" + (
            f", {primary}." if primary else ": none was measured."
        )
    elif declared is not None and declared not in measured_keys:
        primary, note = None, f"The declared primary metric {declared} was not measured for every alpha."
    elif declared is None:
        primary = next((k for k in default_primaries() if k in measured_keys), None)
        source = "not declared; the default for data without a preset"

    seeds_all = sorted(bases)
    measured = min((len(e.seeds) for m in pooled.values() for e in m.values()), default=0) >= 2
    family = [e for m in pooled.values() for e in m.values()]
    for e, p in zip(family, holm([e.p_value for e in family]) if family else [], strict=True):
        e.p_holm = float(p)
    if primary is not None:
        mains = [m[primary] for m in pooled.values() if primary in m]
        for e, p in zip(mains, holm([e.p_value for e in mains]), strict=True):
            e.role, e.p_holm = "primary", float(p)
    for e in family:
        e.verdict = _verdict(e, e.p_holm, len(e.seeds) >= 2)

    aa: dict[str, dict[str, Any]] = {}
    if len(seeds_all) >= 2:
        for m in _metrics():
            matrix = _matrix([bases[s] for s in seeds_all], m.per_example) if m.per_example else None
            if matrix is not None:
                aa[m.key] = aa_floor(matrix, seed_ids=seeds_all)
    return Verdicts(primary, declared, source, note, seeds_all, measured, pooled, aa, len(family))
