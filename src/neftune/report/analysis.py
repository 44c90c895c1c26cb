"""Results -> analysis: which arm is the baseline, which are treatments, their paired effects.

:func:`analyse` validates the ``arms`` of a results mapping (schema in :mod:`neftune.report`) and
returns an :class:`Analysis`: the arms that ran and those that failed, the baseline, readable
labels, and for every treatment its paired per-example effects against the baseline
(:func:`compute_effects`).  :func:`quality_facts` lists the verdicts the report's summary rests on.
Every statistic comes from :mod:`neftune.stats`; nothing here formats text for a reader.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from neftune.errors import DataError
from neftune.report.values import arm_name, as_float, is_interval, mapping_at
from neftune.stats import bootstrap_ci

__all__ = [
    "BETTER",
    "CI_LEVEL",
    "LONGER",
    "LOW_CONSISTENCY",
    "NOISE",
    "PAIRED_METRICS",
    "SHORTER",
    "WORSE",
    "Analysis",
    "Metric",
    "QualityFact",
    "analyse",
    "arm_labels",
    "compute_effects",
    "judge_of",
    "judge_unreliable",
    "judge_verdict",
    "per_example_values",
    "quality_facts",
]

#: Below this judge position consistency the report warns that the judge is unreliable: a judge
#: that changes its verdict when the two answers swap places is largely reacting to position.
LOW_CONSISTENCY = 0.6

#: Confidence level of every interval in the report.
CI_LEVEL = 0.95

BETTER, WORSE, NOISE, LONGER, SHORTER = "better", "worse", "within noise", "longer", "shorter"


@dataclass(frozen=True)
class Metric:
    """A per-example metric that can be paired across arms."""

    key: str  # key in the returned effects
    source: str  # key of the per-example values in eval.per_example
    label: str
    higher_is_better: bool | None  # None: neither direction is better (length)
    scale: float  # multiply a raw difference by this for display
    unit: str  # unit of the scaled difference


PAIRED_METRICS = (
    Metric("exact_match", "correct", "exact match", True, 100.0, "points"),
    Metric("rouge_l", "rouge_l", "ROUGE-L", True, 100.0, "points"),
    Metric("ifeval_prompt_strict", "ifeval_prompt_strict", "IFEval prompt-level (strict)", True, 100.0, "points"),
    Metric("ifeval_prompt_loose", "ifeval_prompt_loose", "IFEval prompt-level (loose)", True, 100.0, "points"),
    Metric("length_chars", "length_chars", "response length", None, 1.0, "chars"),
)


def per_example_values(arm: Mapping[str, Any], key: str) -> list[float | None] | None:
    """Return the per-example values of ``key`` as floats (``None`` kept), or ``None`` if absent.

    Non-finite numbers become ``None``; a value that is not a number raises :class:`DataError`.
    """
    values = mapping_at(mapping_at(arm, "eval"), "per_example").get(key)
    if values is None:
        return None
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise DataError(f"arm {arm_name(arm)!r}: eval.per_example.{key} must be a list, got {type(values).__name__}")
    out: list[float | None] = []
    for i, v in enumerate(values):
        if v is None:
            out.append(None)
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise DataError(f"arm {arm_name(arm)!r}: eval.per_example.{key}[{i}] is not a number: {v!r}") from None
        out.append(f if math.isfinite(f) else None)
    return out


def _verdict(lo: float, hi: float, higher_is_better: bool | None) -> str:
    """Plain-language verdict for a difference whose CI is ``[lo, hi]`` (inclusive of 0 = noise).

    An interval that could not be computed (a bound is NaN) decides nothing: noise.
    """
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo <= 0.0 <= hi:
        return NOISE
    up = lo > 0.0
    if higher_is_better is None:
        return LONGER if up else SHORTER
    return BETTER if up == higher_is_better else WORSE


def compute_effects(
    baseline_arm: Mapping[str, Any],
    arm: Mapping[str, Any],
    *,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = CI_LEVEL,
) -> dict[str, dict[str, Any]]:
    """Return the paired per-example effect of ``arm`` against ``baseline_arm``, per metric.

    Metrics: ``"exact_match"`` (from ``per_example.correct``), ``"rouge_l"``, IFEval's
    ``"ifeval_prompt_strict"`` and ``"ifeval_prompt_loose"`` and ``"length_chars"``; a metric is present only when both arms recorded it per example.  Each
    value is a dict with ``metric`` (the key), ``label``, ``unit`` and ``scale`` (display: ``diff * scale`` in ``unit``),
    ``n`` (pairs used), ``baseline`` and ``arm`` (means over those pairs), ``diff`` (mean of
    ``arm - baseline``), ``ci`` (bootstrap ``[lo, hi]`` of that mean at ``level``, from :func:`neftune.stats.bootstrap_ci`),
    ``significant`` (the CI exists and excludes 0) and ``verdict``: ``"better"``, ``"worse"`` or
    ``"within noise"``.  Length has no better direction, so its verdict is ``"longer"``,
    ``"shorter"`` or ``"within noise"``, and it also carries ``ratio`` (arm mean / baseline mean).

    Raises :class:`DataError` when the two arms hold different numbers of per-example values,
    since then they were not evaluated on the same examples and cannot be paired.
    """
    effects: dict[str, dict[str, Any]] = {}
    for metric in PAIRED_METRICS:
        key = metric.source
        base, other = per_example_values(baseline_arm, key), per_example_values(arm, key)
        if base is None or other is None:
            continue
        if len(base) != len(other):
            raise DataError(
                f"arm {arm_name(arm)!r}: eval.per_example.{key} has {len(other)} values but baseline "
                f"{arm_name(baseline_arm)!r} has {len(base)}; paired effects need the same eval examples"
            )
        pairs = [(b, a) for b, a in zip(base, other, strict=False) if b is not None and a is not None]
        if not pairs:
            continue
        diffs = [a - b for b, a in pairs]
        n = len(pairs)
        mean_base = math.fsum(b for b, _ in pairs) / n
        mean_arm = math.fsum(a for _, a in pairs) / n
        lo, hi = bootstrap_ci(diffs, n_boot=n_boot, seed=seed, level=level)
        lo, hi = float(lo), float(hi)
        verdict = _verdict(lo, hi, metric.higher_is_better)
        effect: dict[str, Any] = {
            "metric": metric.key,
            "label": metric.label,
            "unit": metric.unit,
            "scale": metric.scale,
            "higher_is_better": metric.higher_is_better,
            "n": n,
            "baseline": mean_base,
            "arm": mean_arm,
            "diff": math.fsum(diffs) / n,
            "ci": [lo, hi],
            "level": level,
            "significant": verdict != NOISE,
            "verdict": verdict,
        }
        if metric.key == "length_chars":
            effect["ratio"] = mean_arm / mean_base if mean_base > 0 else None
        effects[metric.key] = effect
    return effects


def judge_of(arm: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """The arm's ``judge`` result, or an empty mapping when it has none."""
    return mapping_at(arm, "judge")


def judge_unreliable(judge: Mapping[str, Any]) -> bool:
    """Whether the judge's measured position consistency is below :data:`LOW_CONSISTENCY`."""
    consistency = as_float(judge.get("consistency"))
    return consistency is not None and consistency < LOW_CONSISTENCY


def judge_verdict(ci: Sequence[float] | None) -> str | None:
    """Verdict of a win rate against a tie (50%), from its CI; ``None`` when there is no CI."""
    if not is_interval(ci):
        return None
    lo, hi = float(ci[0]), float(ci[1])  # type: ignore[index]
    return _verdict(lo - 0.5, hi - 0.5, True)


def arm_labels(arms: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Readable arm labels: ``α=5``; with the seed appended when two arms share an alpha."""
    alphas = [as_float(a.get("alpha")) for a in arms]
    labels: dict[str, str] = {}
    for arm, alpha in zip(arms, alphas, strict=False):
        name = arm_name(arm)
        if alpha is None:
            labels[name] = name
            continue
        label = f"\u03b1={alpha:g}"
        if alphas.count(alpha) > 1:
            label += f" seed {arm.get('seed', '?')}" if arm.get("seed") is not None else f" ({name})"
        labels[name] = label
    if len(set(labels.values())) < len(labels):  # still ambiguous: the names are unique by validation
        return {arm_name(arm): arm_name(arm) for arm in arms}
    return labels


@dataclass
class Analysis:
    """What the report says about one results mapping, before any of it is formatted."""

    results: Mapping[str, Any]  # the input, as given
    arms: list[Mapping[str, Any]]  # arms that ran, in input order
    failed: list[Mapping[str, Any]]  # arms with an "error", in input order
    baseline: Mapping[str, Any] | None  # the baseline arm when it ran
    baseline_name: str | None  # its name, also when it failed or is missing
    treatments: list[Mapping[str, Any]]  # arms that ran, other than the baseline
    labels: dict[str, str]  # arm name -> readable label, for every arm, in input order
    effects: dict[str, dict[str, dict[str, Any]]]  # arm name -> metric -> compute_effects() entry
    compare_errors: dict[str, str]  # arm name -> why it could not be paired with the baseline

    def n_eval(self) -> int | None:
        """The eval set's size: ``data.n_eval``, else the most pairs any effect used."""
        n = as_float(mapping_at(self.results, "data").get("n_eval"))
        if n is not None:
            return int(n)
        sizes = [e["n"] for effects in self.effects.values() for e in effects.values()]
        return max(sizes) if sizes else None


def _validated_arms(results: Mapping[str, Any]) -> Sequence[Mapping[str, Any]]:
    raw_arms = results.get("arms")
    if raw_arms is None:
        raw_arms = []
    if isinstance(raw_arms, (str, bytes)) or not isinstance(raw_arms, Sequence):
        raise DataError(f"results.arms must be a list, got {type(raw_arms).__name__}")
    for i, arm in enumerate(raw_arms):
        if not isinstance(arm, Mapping) or not isinstance(arm.get("name"), str) or not arm["name"]:
            raise DataError(f"results.arms[{i}] must be an object with a non-empty string 'name'")
    names = [a["name"] for a in raw_arms]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(f"results.arms: arm names must be unique, repeated: {', '.join(dupes)}")
    return raw_arms


def analyse(results: Mapping[str, Any], *, n_boot: int = 2000, seed: int = 0) -> Analysis:
    """Validate ``results["arms"]`` and pair every treatment with the baseline.

    The baseline is ``results["baseline"]``, else the first arm with ``alpha == 0``.  An arm that
    cannot be paired (see :func:`compute_effects`) is recorded in ``compare_errors`` rather than
    raised, so one malformed arm does not cost the reader the rest of the report.  Raises
    :class:`DataError` when ``arms`` is not a list of objects with unique non-empty names.
    """
    raw_arms = _validated_arms(results)
    arms = [a for a in raw_arms if not a.get("error")]
    failed = [a for a in raw_arms if a.get("error")]
    baseline_name = results.get("baseline")
    if not isinstance(baseline_name, str) or not baseline_name:
        zero = [a for a in raw_arms if as_float(a.get("alpha")) == 0.0]
        baseline_name = zero[0]["name"] if zero else None
    baseline = next((a for a in arms if a["name"] == baseline_name), None)
    treatments = [a for a in arms if a is not baseline]

    effects: dict[str, dict[str, dict[str, Any]]] = {}
    compare_errors: dict[str, str] = {}
    if baseline is not None:
        for arm in treatments:
            try:
                effects[arm["name"]] = compute_effects(baseline, arm, n_boot=n_boot, seed=seed)
            except DataError as exc:
                compare_errors[arm["name"]] = str(exc)
    labels = arm_labels(raw_arms)
    return Analysis(results, arms, failed, baseline, baseline_name, treatments, labels, effects, compare_errors)


@dataclass(frozen=True)
class QualityFact:
    """One quality verdict of one arm against the baseline."""

    measure: str  # e.g. "exact match", "length-controlled win rate"
    verdict: str  # BETTER, WORSE or NOISE
    counts: bool  # whether it counts toward the overall verdict
    effect: Mapping[str, Any] | None = None  # the compute_effects() entry, for paired metrics
    rate: float | None = None  # the win rate, for judge measures


def quality_facts(a: Analysis, arm: Mapping[str, Any]) -> list[QualityFact]:
    """The arm's quality verdicts: exact match, ROUGE-L and the judge's length-controlled win rate.

    The length-controlled win rate of an unreliable judge is listed but does not count.
    """
    facts = []
    for key in ("exact_match", "rouge_l"):
        effect = a.effects.get(arm["name"], {}).get(key)
        if effect:
            facts.append(QualityFact(effect["label"], effect["verdict"], True, effect=effect))
    judge = judge_of(arm)
    verdict = judge_verdict(judge.get("lc_ci"))
    if verdict is not None:
        rate = as_float(judge.get("lc_win_rate"))
        facts.append(QualityFact("length-controlled win rate", verdict, not judge_unreliable(judge), rate=rate))
    return facts
