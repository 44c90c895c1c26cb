"""Results -> analysis: which arms are baselines, which are treatments, their paired effects.

:func:`analyse` validates the ``arms`` of a results mapping (schema in :mod:`neftune.report`) and
returns an :class:`Analysis`: the arms that ran and those that failed, the baseline of every seed,
readable labels, for every treatment its paired per-example effects against the baseline of its own
seed (:func:`compute_effects`, one seed's view), and the experiment's verdicts pooled over seeds
(:mod:`neftune.report.verdicts`).  Every statistic comes from :mod:`neftune.stats`; nothing here
formats text for a reader.  The verdict words (:mod:`neftune.report.words`) and the paired metrics
(:mod:`neftune.report.paired`) live below this module and :mod:`~neftune.report.verdicts`, and are
re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from neftune.errors import DataError
from neftune.metrics import paired_metrics
from neftune.report.censoring import cut_share, withheld_reason
from neftune.report.paired import PAIRED_METRICS, per_example_values
from neftune.report.values import arm_name, as_float, is_interval, mapping_at
from neftune.report.verdicts import SIGNIFICANCE, Verdicts, build_verdicts
from neftune.report.words import BETTER, LONGER, NOISE, SHORTER, WITHHELD, WORSE, verdict_word
from neftune.results import ArmResult
from neftune.stats import compare_seeds

__all__ = [
    "BETTER",
    "CI_LEVEL",
    "LONGER",
    "LOW_CONSISTENCY",
    "NOISE",
    "PAIRED_METRICS",
    "SHORTER",
    "WITHHELD",
    "WORSE",
    "Analysis",
    "analyse",
    "arm_labels",
    "compute_effects",
    "judge_of",
    "judge_unreliable",
    "judge_verdict",
    "per_example_values",
]

#: Below this judge position consistency the report warns that the judge is unreliable: a judge
#: that changes its verdict when the two answers swap places is largely reacting to position.
LOW_CONSISTENCY = 0.6

#: Confidence level of every interval in the report.
CI_LEVEL = 0.95


def _verdict(lo: float, hi: float, higher_is_better: bool | None) -> str:
    """Plain-language verdict for a difference whose CI is ``[lo, hi]`` (inclusive of 0 = noise).

    An interval that could not be computed (a bound is NaN) decides nothing: noise.
    """
    excludes_zero = math.isfinite(lo) and math.isfinite(hi) and not lo <= 0.0 <= hi
    return verdict_word(excludes_zero, lo > 0.0, higher_is_better)


def compute_effects(
    baseline_arm: ArmResult | Mapping[str, Any],
    arm: ArmResult | Mapping[str, Any],
    *,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = CI_LEVEL,
) -> dict[str, dict[str, Any]]:
    """Return the paired per-example effect of ``arm`` against ``baseline_arm``, per metric.

    Metrics: the registry's paired ones (:func:`neftune.metrics.paired_metrics`): ``"exact_match"`` (from
    ``per_example.correct``), ``"rouge_l"``, IFEval's ``"ifeval_prompt_strict"`` and
    ``"ifeval_prompt_loose"`` and ``"length_chars"``; a metric is present only when both arms recorded it per example.  Each
    value is a dict with ``metric`` (the key), ``label``, ``unit`` and ``scale`` (display: ``diff * scale`` in ``unit``),
    ``n`` (pairs used), ``baseline`` and ``arm`` (means over those pairs), ``diff`` (mean of
    ``arm - baseline``), ``ci`` (``[lo, hi]`` at ``level``) and ``p_value``: for 0/1 metrics the
    exact McNemar test with an interval that holds 0 whenever that test does not reject, otherwise
    the paired t test (:func:`neftune.stats.compare_seeds` with one seed).  ``significant`` is
    ``p_value < 0.05``, uncorrected: this is one seed's view, and the report's verdict comes from
    the pooled, corrected effects of :mod:`neftune.report.verdicts`.  ``verdict`` is ``"better"``,
    ``"worse"`` or ``"within noise"``; length has no better direction, so its verdict is
    ``"longer"``, ``"shorter"`` or ``"within noise"``, and it also carries ``ratio`` (arm mean /
    baseline mean) and ``reached_cap`` (``{"baseline", "arm"}``: the shares of answers cut off at the
    token cap, ``None`` where not recorded); when more than 10% of either side was cut its verdict
    is ``"withheld"`` and ``withheld`` says why (:mod:`neftune.report.censoring`).  ``n_boot`` and ``seed`` are accepted for compatibility and unused.

    Raises :class:`DataError` when the two arms hold different numbers of per-example values,
    since then they were not evaluated on the same examples and cannot be paired.  Either arm may be
    an :class:`~neftune.results.ArmResult` or its JSON entry.
    """
    if isinstance(baseline_arm, ArmResult):
        baseline_arm = baseline_arm.to_json()
    if isinstance(arm, ArmResult):
        arm = arm.to_json()
    effects: dict[str, dict[str, Any]] = {}
    for metric in paired_metrics():
        key = metric.per_example
        if key is None:
            continue
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
        paired = np.array([[[a for _, a in pairs]], [[b for b, _ in pairs]]], dtype=float)
        one = compare_seeds(paired[0], paired[1], level=level).pooled
        lo, hi = one.ci
        verdict = _verdict(lo, hi, metric.higher_is_better) if one.p_value < SIGNIFICANCE else NOISE
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
            "p_value": one.p_value,
            "method": one.method,
            "level": level,
            "significant": verdict != NOISE,
            "verdict": verdict,
        }
        if metric.key == "length_chars":
            effect["ratio"] = mean_arm / mean_base if mean_base > 0 else None
            effect["reached_cap"] = {"baseline": cut_share(baseline_arm), "arm": cut_share(arm)}
            reason = withheld_reason([baseline_arm], [arm])
            if reason is not None:
                effect.update(verdict=WITHHELD, significant=False, withheld=reason)
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
    lo, hi = float(ci[0]), float(ci[1])
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
    baseline: Mapping[str, Any] | None  # the baseline arm when it ran (the first seed's)
    baseline_name: str | None  # its name, also when it failed or is missing
    treatments: list[Mapping[str, Any]]  # arms that ran with alpha > 0 (not a baseline of any seed)
    labels: dict[str, str]  # arm name -> readable label, for every arm, in input order
    effects: dict[str, dict[str, dict[str, Any]]]  # arm name -> metric -> compute_effects() vs its seed's baseline
    compare_errors: dict[str, str]  # arm name -> why it could not be paired with the baseline
    verdicts: Verdicts | None = None  # pooled over seeds, primary metric, Holm (None without a baseline)
    paired_with: dict[str, str] = field(default_factory=dict)  # treatment name -> its baseline's name

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
    # every alpha = 0 arm is a baseline (of its seed); a treatment is paired with its own seed's baseline
    seed_baselines = {a.get("seed"): a for a in arms if as_float(a.get("alpha")) == 0.0}
    treatments = [a for a in arms if a is not baseline and as_float(a.get("alpha")) != 0.0]

    effects: dict[str, dict[str, dict[str, Any]]] = {}
    compare_errors: dict[str, str] = {}
    paired_with: dict[str, str] = {}
    if baseline is not None:
        for arm in treatments:
            own = seed_baselines.get(arm.get("seed"), baseline)
            paired_with[arm["name"]] = own["name"]
            try:
                effects[arm["name"]] = compute_effects(own, arm, n_boot=n_boot, seed=seed)
            except DataError as exc:
                compare_errors[arm["name"]] = str(exc)
    labels = arm_labels(raw_arms)
    verdicts = None
    if baseline is not None:
        try:
            verdicts = build_verdicts(results, arms, low_consistency=LOW_CONSISTENCY)
        except DataError as exc:  # arms that cannot be paired are already listed in compare_errors
            compare_errors.setdefault(baseline["name"], str(exc))
    return Analysis(
        results,
        arms,
        failed,
        baseline,
        baseline_name,
        treatments,
        labels,
        effects,
        compare_errors,
        verdicts,
        paired_with,
    )
