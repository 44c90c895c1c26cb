"""``builtin:skills``: generated instruction tasks whose answers can be checked exactly.

Each task family (arithmetic, string edits, counting, unit conversion, extraction, date format,
...) draws its values from ``random.Random`` and states the task in one of several phrasings.  The
last two phrasings of every family are held out: the ``test`` split uses only those, the ``train``
split never does, so a test score measures following instructions worded in an unseen way rather
than recalling training prompts.  The two splits also draw their values from different random
streams.  Answers are bare (``"42"``, ``"05/03/2024"``) and are compared by :func:`check_answer`.
"""

from __future__ import annotations

import random
import re

from neftune.data.skills_tasks import FAMILIES
from neftune.data.types import Example
from neftune.errors import DataError

DEFAULT_SIZES = {"train": 2000, "test": 200}
"""Examples per split when ``builtin:skills`` is loaded without a limit."""

HELD_OUT_PHRASINGS = 2
"""The last this-many phrasings of each family appear only in the test split."""

__all__ = [
    "DEFAULT_SIZES",
    "FAMILIES",
    "HELD_OUT_PHRASINGS",
    "check_answer",
    "check_example",
    "phrasing_ids",
    "skills_examples",
]


def phrasing_ids(split: str) -> range:
    """Indices into a family's phrasings that ``split`` draws from."""
    n = len(FAMILIES[0].phrasings)
    if split == "train":
        return range(0, n - HELD_OUT_PHRASINGS)
    if split == "test":
        return range(n - HELD_OUT_PHRASINGS, n)
    raise DataError(f"builtin:skills has no split {split!r}; use one of {', '.join(DEFAULT_SIZES)}")


def skills_examples(split: str, n: int, seed: int = 0) -> list[Example]:
    """Generate ``n`` examples of ``split`` (``"train"`` or ``"test"``), deterministic in ``seed``.

    Families take turns, so any ``n`` is balanced across them, and a shorter list is a prefix of
    a longer one with the same seed.  ``meta`` holds ``family``, ``answer``, ``phrasing_id`` (index
    into the family's phrasings), ``case_sensitive`` and ``source``.
    """
    ids = phrasing_ids(split)
    # Distinct streams for the two splits, and for every seed.
    rng = random.Random(2 * seed + (split == "test"))
    examples = []
    for i in range(n):
        family = FAMILIES[i % len(FAMILIES)]
        phrasing_id = rng.choice(ids)
        fields, answer = family.draw(rng)
        instruction = family.phrasings[phrasing_id].format(**fields)
        examples.append(
            Example(
                [{"role": "user", "content": instruction}, {"role": "assistant", "content": answer}],
                {
                    "family": family.name,
                    "answer": answer,
                    "phrasing_id": phrasing_id,
                    "case_sensitive": family.case_sensitive,
                    "source": f"builtin:skills[{split}#{i}]",
                },
            )
        )
    return examples


_QUOTES = "\"'`*\u201c\u201d\u2018\u2019"


def _normalize(text: str, case_sensitive: bool) -> str:
    text = " ".join(text.split())
    previous = None
    while text != previous:
        previous = text
        text = text.strip().strip(_QUOTES)
        if text.endswith(".") and not text.endswith(".."):
            text = text[:-1]
    text = re.sub(r"\s*,\s*", ", ", text)
    return text if case_sensitive else text.casefold()


def check_answer(expected: str, output: str, *, case_sensitive: bool = False) -> bool:
    """Whether a model ``output`` states exactly the ``expected`` answer.

    Only the first non-empty line of ``output`` counts.  Both sides are compared after collapsing
    whitespace, normalizing the spacing around commas (``"1,2"`` equals ``"1, 2"``), and removing
    surrounding quotes, backticks or asterisks and a trailing period; case is ignored unless
    ``case_sensitive``.
    """
    line = next((ln for ln in output.splitlines() if ln.strip()), "")
    return _normalize(line, case_sensitive) == _normalize(expected, case_sensitive)


def check_example(example: Example, output: str) -> bool:
    """:func:`check_answer` against ``example.meta["answer"]``, honouring its ``case_sensitive``."""
    if "answer" not in example.meta:
        where = example.meta.get("source", "example")
        raise DataError(f"{where}: has no reference answer (meta 'answer') to check against")
    return check_answer(
        str(example.meta["answer"]),
        output,
        case_sensitive=bool(example.meta.get("case_sensitive", False)),
    )
