"""The metric registry: every fact about a metric, in one place.

Each metric an experiment measures is one :class:`MetricSpec`: its key (the name in ``results.json``,
in ``compare.primary`` and in a preset's ``primary_metric``), how the report shows it, which direction
is better, where its per-example values are kept, how two arms are tested on it and whether a verdict
may rest on it.  Scoring (:mod:`neftune.evaluate`), the verdicts (:mod:`neftune.report.verdicts`),
the paired effects (:mod:`neftune.report.analysis`), the presets (:mod:`neftune.data.presets`) and the
``compare.primary`` help text (:mod:`neftune.config`) all read this registry, so a new metric is a new
entry in :data:`METRICS` plus its scorer.

    spec = get_metric("exact_match")       # ConfigError, one line, for an unknown key
    [m.key for m in paired_metrics()]      # the metrics tested prompt by prompt, in report order

The order of :data:`METRICS` is the order the report and ``results.json`` list the metrics in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from neftune.errors import ConfigError

__all__ = [
    "METRICS",
    "PAIRED",
    "SEED_LEVEL",
    "UNTESTED",
    "MetricSpec",
    "arm_metrics",
    "declare_primary",
    "default_primaries",
    "get_metric",
    "judge_metrics",
    "paired_metrics",
    "primary_choices",
    "spoken_list",
]

TestKind = Literal["paired", "seed level", "untested"]

PAIRED: TestKind = "paired"
"""Tested prompt by prompt against the seed's baseline (exact McNemar for 0/1 values, else paired t)."""
SEED_LEVEL: TestKind = "seed level"
"""One number per seed (a judge's win rate), tested against a tie across seeds."""
UNTESTED: TestKind = "untested"
"""Reported per arm, never tested (descriptive)."""


@dataclass(frozen=True)
class MetricSpec:
    """Everything the package knows about one metric."""

    key: str
    """Name in ``results.json`` (an arm's ``eval`` or ``judge`` block, the analysis), ``compare.primary``
    and a preset's ``primary_metric``."""
    label: str
    """How the report names it."""
    unit: str
    """Unit of a difference after multiplying by :attr:`scale`, e.g. ``"points"``."""
    scale: float
    """Multiply a raw value or difference by this to show it, e.g. 100 for a share shown in points."""
    higher_is_better: bool | None
    """``None``: neither direction is better (length), so verdicts say longer or shorter."""
    test: TestKind = UNTESTED
    """How a treatment is tested against its baseline on this metric."""
    per_example: str | None = None
    """Key of its per-example values in an arm's ``eval.per_example`` (``None``: not kept per example)."""
    scored_at: tuple[str, ...] | None = None
    """Where :func:`neftune.evaluate.evaluate_outputs` (the ``neftune eval`` file) holds the arm's number,
    as a path of keys; ``None`` when the arm's ``eval`` block does not carry it."""
    by_family: bool = False
    """The arm's ``eval`` block also carries ``<key>_by_family``, the same number per task family."""
    ci_key: str | None = None
    """Seed-level metrics: key of the metric's interval in an arm's ``judge`` block."""
    primary_rank: int | None = None
    """Position among the metrics a verdict may rest on (``compare.primary``); ``None``: it may not."""
    default_primary: bool = False
    """When nothing was declared, the first of these (by :attr:`primary_rank`) that every arm measured."""

    @property
    def can_be_primary(self) -> bool:
        """Whether a verdict may rest on this metric (length has no better direction, so it may not)."""
        return self.primary_rank is not None


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(
        "exact_match", "exact match", "points", 100.0, True,
        test=PAIRED, per_example="correct", scored_at=("exact_match", "accuracy"), by_family=True,
        primary_rank=0, default_primary=True,
    ),
    MetricSpec("distinct_1", "distinct-1", "", 1.0, True, scored_at=("distinct_1",)),
    MetricSpec("distinct_2", "distinct-2", "", 1.0, True, scored_at=("distinct_2",)),
    MetricSpec("repetition_rate", "repetition rate", "", 1.0, False, scored_at=("repetition_4",)),
    MetricSpec(
        "rouge_l", "ROUGE-L", "points", 100.0, True,
        test=PAIRED, per_example="rouge_l", scored_at=("rouge_l", "mean"), primary_rank=3, default_primary=True,
    ),
    MetricSpec(
        "ifeval_prompt_strict", "IFEval prompt-level (strict)", "points", 100.0, True,
        test=PAIRED, per_example="ifeval_prompt_strict", primary_rank=1, default_primary=True,
    ),
    MetricSpec(
        "ifeval_prompt_loose", "IFEval prompt-level (loose)", "points", 100.0, True,
        test=PAIRED, per_example="ifeval_prompt_loose", primary_rank=2,
    ),
    MetricSpec("length_chars", "response length", "chars", 1.0, None, test=PAIRED, per_example="length_chars"),
    MetricSpec(
        "lc_win_rate", "judge LC win rate", "points", 100.0, True, test=SEED_LEVEL, ci_key="lc_ci", primary_rank=4
    ),
    MetricSpec("win_rate", "judge win rate", "points", 100.0, True, test=SEED_LEVEL, ci_key="ci"),
)  # fmt: skip
"""Every metric, in the order the report lists them."""


def get_metric(key: str) -> MetricSpec:
    """The spec registered under ``key``; a one-line :class:`ConfigError` naming the known keys otherwise."""
    for spec in METRICS:
        if spec.key == key:
            return spec
    raise ConfigError(f"unknown metric {key!r}; known metrics: {', '.join(m.key for m in METRICS)}")


def paired_metrics() -> tuple[MetricSpec, ...]:
    """The metrics tested prompt by prompt, in report order."""
    return tuple(m for m in METRICS if m.test == PAIRED)


def judge_metrics() -> tuple[MetricSpec, ...]:
    """The judge's measures, one number per seed, in report order."""
    return tuple(m for m in METRICS if m.test == SEED_LEVEL)


def arm_metrics() -> tuple[MetricSpec, ...]:
    """The metrics an arm's ``eval`` block carries as one number, in the block's order."""
    return tuple(m for m in METRICS if m.scored_at is not None)


def primary_choices() -> tuple[str, ...]:
    """The keys ``compare.primary`` accepts, in :attr:`MetricSpec.primary_rank` order."""
    ranked = sorted((m for m in METRICS if m.primary_rank is not None), key=lambda m: m.primary_rank or 0)
    return tuple(m.key for m in ranked)


def default_primaries() -> tuple[str, ...]:
    """When nothing was declared, the verdict rests on the first of these that every arm measured."""
    return tuple(k for k in primary_choices() if get_metric(k).default_primary)


def spoken_list(words: Sequence[str], last: str = "or") -> str:
    """``"a, b or c"``: ``words`` as a sentence lists them."""
    if len(words) < 2:
        return "".join(words)
    return f"{', '.join(words[:-1])} {last} {words[-1]}"


def declare_primary(
    chosen: str | None, judge: str, eval_name: str, preset_metric: str | None, has_references: bool
) -> dict[str, Any]:
    """The metric the verdict will rest on, declared before any arm is trained.

    ``chosen`` (``compare.primary``) when set; else the judge's length-controlled win rate when a judge is
    configured (falling back to the eval set's metric if the judge fails its reliability check);
    else the eval set's preset metric (exact match for builtin:skills, IFEval prompt-level strict
    for builtin:ifeval); else, for the user's own data, ROUGE-L against the reference answers.
    """
    preset = preset_metric
    data_default = preset or ("rouge_l" if has_references else None)
    judged = judge != "none"
    if chosen is not None:
        choices = primary_choices()
        if chosen not in choices:
            raise ConfigError(f"compare.primary must be one of {', '.join(choices)}, got {chosen!r}")
        if chosen == "lc_win_rate" and not judged:
            raise ConfigError("compare.primary=lc_win_rate needs a judge: set --judge")
        return {"metric": chosen, "source": "chosen with compare.primary", "fallback": None}
    if judged:
        return {
            "metric": "lc_win_rate",
            "source": f"the {judge} judge's length-controlled win rate",
            "fallback": data_default,
        }
    if preset:
        return {"metric": preset, "source": f"declared by {eval_name}", "fallback": None}
    return {"metric": data_default, "source": "the default for data without a preset", "fallback": None}
