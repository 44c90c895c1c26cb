"""Tolerant readers for the loosely typed results mapping.

Every part of ``results`` except ``arms`` may be missing, ``null`` or of the wrong type; these
helpers turn such parts into "absent" (``None`` or an empty mapping) instead of raising.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, TypeGuard

__all__ = ["arm_name", "as_float", "is_interval", "mapping_at"]


def as_float(x: Any) -> float | None:
    """``x`` as a finite float, or ``None`` (missing, boolean, non-numeric, NaN or infinite)."""
    if x is None or isinstance(x, bool):
        return None
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def is_interval(ci: Any) -> TypeGuard[Sequence[Any]]:
    """Whether ``ci`` is a ``[lo, hi]`` pair of finite numbers."""
    return (
        isinstance(ci, Sequence)
        and not isinstance(ci, str)
        and len(ci) == 2
        and as_float(ci[0]) is not None
        and as_float(ci[1]) is not None
    )


def mapping_at(obj: Mapping[str, Any] | None, key: str) -> Mapping[str, Any]:
    """Return ``obj[key]`` when it is a mapping, else an empty mapping (missing optional part)."""
    if not isinstance(obj, Mapping):
        return {}
    value = obj.get(key)
    return value if isinstance(value, Mapping) else {}


def arm_name(arm: Mapping[str, Any]) -> str:
    """The arm's ``name`` as a string (``"?"`` when it has none), for messages."""
    return str(arm.get("name", "?"))
