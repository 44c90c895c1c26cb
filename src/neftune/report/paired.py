"""The per-example metrics that are paired across arms, and their values read out of an arm.

:data:`PAIRED_METRICS` lists each metric an eval records per example (``eval.per_example``) that
the report pairs prompt by prompt (from the registry, :mod:`neftune.metrics`): one seed's effects (:func:`neftune.report.analysis.compute_effects`)
and the verdicts pooled over seeds (:mod:`neftune.report.verdicts`) both read them here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from neftune.errors import DataError
from neftune.metrics import paired_metrics
from neftune.report.values import arm_name, mapping_at

__all__ = ["PAIRED_METRICS", "per_example_values"]


#: The metrics paired prompt by prompt, as the metric registry (:mod:`neftune.metrics`) lists them.
PAIRED_METRICS = paired_metrics()


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
