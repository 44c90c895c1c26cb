"""The per-example metrics that are paired across arms, and their values read out of an arm.

:data:`PAIRED_METRICS` lists each metric an eval records per example (``eval.per_example``) that
the report pairs prompt by prompt: one seed's effects (:func:`neftune.report.analysis.compute_effects`)
and the verdicts pooled over seeds (:mod:`neftune.report.verdicts`) both read them here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from neftune.errors import DataError
from neftune.report.values import arm_name, mapping_at

__all__ = ["PAIRED_METRICS", "Metric", "per_example_values"]


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
