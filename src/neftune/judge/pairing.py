"""Pair two outputs files for judging, by instruction, as AlpacaEval merges them.

Two files answer the same prompts when they hold the same instructions, in any order: the
candidate's records are put in the baseline's order.  Anything else is refused with one line naming
the file and the first record that does not fit: an empty file, an instruction only one file has,
or an instruction repeated within a file (which cannot be paired unless both files list the
instructions in the same order).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from neftune.errors import DataError

__all__ = ["pair_outputs"]

logger = logging.getLogger(__name__)


def _clip(text: str, limit: int = 50) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def pair_outputs(
    baseline: Sequence[Mapping[str, Any]],
    candidate: Sequence[Mapping[str, Any]],
    baseline_label: str,
    candidate_label: str,
) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """``(baseline, candidate)`` with the candidate's records in the baseline's instruction order.

    Records are AlpacaEval records (:func:`neftune.outputs.read_outputs`); the labels name the
    files in messages.  Raises :class:`DataError` when a file is empty, when the two files do not
    hold the same instructions, or when a repeated instruction makes the pairing ambiguous.
    """
    for label, records in ((baseline_label, baseline), (candidate_label, candidate)):
        if not records:
            raise DataError(f"{label}: no output records (an empty list); nothing to judge")
    order_a = [r["instruction"] for r in baseline]
    order_b = [r["instruction"] for r in candidate]
    if order_a == order_b:
        return list(baseline), list(candidate)
    for label, order, other_label, other in (
        (candidate_label, order_b, baseline_label, order_a),
        (baseline_label, order_a, candidate_label, order_b),
    ):
        known = set(other)
        missing = [i for i, text in enumerate(order) if text not in known]
        if missing:
            raise DataError(
                f"{label}: {len(missing)} of its {len(order)} instructions are not in {other_label} "
                f"(first: record {missing[0]}, {_clip(order[missing[0]])}); judge answers to the same prompts"
            )
    for label, order in ((baseline_label, order_a), (candidate_label, order_b)):
        repeated = [text for text, n in Counter(order).items() if n > 1]
        if repeated:
            first = order.index(repeated[0])
            again = order.index(repeated[0], first + 1)
            raise DataError(
                f"{label}: record {again} repeats the instruction of record {first} ({_clip(repeated[0])}), "
                "so the files cannot be paired by instruction; list the prompts in the same order in both files"
            )
    by_instruction = {r["instruction"]: r for r in candidate}
    logger.info(
        "%s lists the instructions in another order than %s: paired by instruction", candidate_label, baseline_label
    )
    return list(baseline), [by_instruction[text] for text in order_a]
