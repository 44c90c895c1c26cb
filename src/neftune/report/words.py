"""The words a verdict is given in, and the one rule that turns a significant effect into a direction.

Both the per-seed effects (:mod:`neftune.report.analysis`) and the pooled verdicts
(:mod:`neftune.report.verdicts`) decide significance their own way (an interval that excludes
zero; a Holm-adjusted p value), then name the effect with :func:`verdict_word`.  The renderers
compare verdicts against these constants.  This module imports nothing, so every report module
may import it.
"""

from __future__ import annotations

__all__ = ["BETTER", "LONGER", "NOISE", "SHORTER", "UNMEASURED", "WITHHELD", "WORSE", "verdict_word"]

BETTER, WORSE, NOISE, LONGER, SHORTER = "better", "worse", "within noise", "longer", "shorter"
#: The verdict a length effect gets in its place when too many answers were cut at the token cap
#: (:mod:`neftune.report.censoring`).
WITHHELD = "withheld"
#: The verdict of a pooled effect over fewer than two seeds: training-seed variance is unmeasured.
UNMEASURED = "seed variance unmeasured"


def verdict_word(significant: bool, up: bool, higher_is_better: bool | None) -> str:
    """:data:`NOISE` unless ``significant``; else :data:`BETTER` or :data:`WORSE` by whether the effect
    goes ``up`` in the better direction, or :data:`LONGER` / :data:`SHORTER` for a metric with no
    better direction (``higher_is_better`` is ``None``: length)."""
    if not significant:
        return NOISE
    if higher_is_better is None:
        return LONGER if up else SHORTER
    return BETTER if up == higher_is_better else WORSE
