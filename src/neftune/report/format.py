"""Number formatting for the report: fixed decimals, percentages, intervals, durations, counts.

Negative numbers use a true minus sign (U+2212) so they read as numbers, not hyphens, and a value
that rounds to zero never prints as "-0.0" or "+0.0".  A missing value prints as an em dash.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from neftune.report.values import as_float

__all__ = [
    "DASH",
    "MINUS",
    "fmt_bound",
    "fmt_count",
    "fmt_duration",
    "fmt_interval",
    "fmt_number",
    "fmt_percent",
    "fmt_value",
]

MINUS = "\u2212"
DASH = "\u2014"


def fmt_number(x: float, digits: int = 1, signed: bool = False) -> str:
    """``x`` with ``digits`` decimals and thousands separators; ``signed`` adds "+" to positives."""
    text = f"{x:+,.{digits}f}" if signed else f"{x:,.{digits}f}"
    if text.lstrip("+-") == f"{0:.{digits}f}":
        return text.lstrip("+-")  # "-0.0" and "+0.0" both read as a change where there is none
    return text.replace("-", MINUS)


def fmt_value(x: Any, digits: int = 3, scale: float = 1.0, suffix: str = "") -> str:
    """``x * scale`` via :func:`fmt_number` plus ``suffix``, or an em dash when ``x`` is not a number."""
    v = as_float(x)
    return DASH if v is None else fmt_number(v * scale, digits) + suffix


def fmt_percent(x: Any, digits: int = 1) -> str:
    """A fraction ``x`` as a percentage, e.g. ``0.312`` -> ``"31.2%"``."""
    return fmt_value(x, digits, 100.0, "%")


def fmt_bound(x: float, digits: int, signed: bool) -> str:
    """Like :func:`fmt_number`, with up to 3 more decimals while a nonzero ``x`` would print as zero.

    A CI bound of 0.004 shown as "0.0" next to the verdict "better" would read as a contradiction.
    A bound that could not be computed (NaN) prints as an em dash.
    """
    if not math.isfinite(x):
        return DASH
    while x != 0 and round(x, digits) == 0 and digits < 4:
        digits += 1
    return fmt_number(x, digits, signed)


def fmt_interval(
    ci: Sequence[float], scale: float = 1.0, digits: int = 1, suffix: str = "", signed: bool = True
) -> str:
    """A ``[lo, hi]`` interval scaled by ``scale``, e.g. ``[−1.2, +7.1]`` or ``[40.1%, 55.0%]``."""
    lo, hi = (float(c) * scale for c in ci)
    return f"[{fmt_bound(lo, digits, signed)}{suffix}, {fmt_bound(hi, digits, signed)}{suffix}]"


def fmt_duration(seconds: Any) -> str:
    """E.g. ``"42.0 s"``, ``"3 min 07 s"`` or ``"1 h 05 min"``."""
    s = as_float(seconds)
    if s is None:
        return DASH
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(round(s), 60)
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {sec:02d} s"


def fmt_count(x: Any) -> str:
    """A large count with a unit: ``"135.00M"``, ``"1.20k"``, or ``"999"``."""
    v = as_float(x)
    if v is None:
        return DASH
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.2f}{unit}"
    return f"{v:,.0f}"
