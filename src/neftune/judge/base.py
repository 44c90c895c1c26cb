"""What every judge backend shares: the query and verdict types, the prompt, and the :class:`Judge` interface.

The prompt's wording lives in ``prompts/system.txt`` and ``prompts/pairwise.txt`` (package data, read
once through :mod:`importlib.resources`), so it can be read and reviewed as text.  Changing either
file changes every cache key, which is what should happen: a different prompt is a different judge.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from functools import cache
from importlib import resources
from typing import ClassVar, NamedTuple

__all__ = [
    "VERDICTS",
    "Judge",
    "JudgeUnreachable",
    "Query",
    "Verdict",
    "VerdictUnavailable",
    "judge_messages",
    "load_prompt",
    "log_odds",
]

VERDICTS: tuple[str, ...] = ("A", "B", "tie")


@cache
def load_prompt(name: str) -> str:
    """The text of ``prompts/<name>.txt`` shipped with the package (without its final newline)."""
    return (
        resources.files(__package__)
        .joinpath("prompts")
        .joinpath(f"{name}.txt")
        .read_text(encoding="utf-8")
        .rstrip("\n")
    )


def judge_messages(instruction: str, first: str, second: str) -> list[dict[str, str]]:
    """Return the chat messages asking which of ``first`` (A) and ``second`` (B) is better."""
    user = load_prompt("pairwise").format(instruction=instruction, first=first, second=second)
    return [{"role": "system", "content": load_prompt("system")}, {"role": "user", "content": user}]


def log_odds(p: float, eps: float = 1e-6) -> float:
    """``log(p / (1 - p))`` with ``p`` clipped to ``[eps, 1 - eps]`` so certainty stays finite."""
    p = min(max(p, eps), 1.0 - eps)
    return math.log(p) - math.log1p(-p)


class Query(NamedTuple):
    """One question to a judge: which of ``first`` (A) or ``second`` (B) better answers ``instruction``."""

    instruction: str
    first: str
    second: str
    reference: str | None = None


class Verdict(NamedTuple):
    """A judge's answer: ``label`` in :data:`VERDICTS` and the raw ``reply`` it was parsed from.

    ``p_first`` is the judge's probability that the *first* answer shown is the better one (a tie
    counts half), read from token probabilities; ``None`` when the backend has none.
    """

    label: str
    reply: str = ""
    p_first: float | None = None


class VerdictUnavailable(Exception):
    """A single verdict could not be obtained; its pair is counted as failed."""


class JudgeUnreachable(VerdictUnavailable):
    """The judge's server stopped answering for longer than its retry budget.

    Unlike other failed verdicts it stops the run (:func:`~neftune.judge.judge_pairs` raises
    :class:`~neftune.errors.JudgeError` once every verdict obtained so far is cached).
    """


#: What a judge gives for one query: a verdict, or why there is none.
Outcome = Verdict | VerdictUnavailable
#: Called with a query's position in its batch and its outcome, as soon as it has one.
OnResult = Callable[[int, Outcome], None]


class Judge(ABC):
    """A pairwise judge backend.

    Subclasses implement :meth:`judge` (one query) and may override :meth:`judge_batch` to batch or
    parallelise.  :attr:`identity` names the judge for the verdict cache: two judges with the same
    identity must give the same verdicts; ``None`` disables caching.
    """

    name: ClassVar[str] = "judge"
    #: How many queries :func:`~neftune.judge.judge_pairs` hands to :meth:`judge_batch` at once.
    chunk_size: int = 32
    #: True when a pair's score is the probability from both orders' averaged log-odds rather than the
    #: hard verdicts (the backend then gives :attr:`Verdict.p_first` for every verdict).
    scores_by_probability: ClassVar[bool] = False

    @property
    def identity(self) -> str | None:
        """A string naming the judge and every setting that affects its verdicts (never secrets)."""
        return self.name

    def begin_run(self) -> None:
        """Called by :func:`~neftune.judge.judge_pairs` before each run: forget the previous run's notes."""
        return None  # nothing to forget by default

    def notes(self) -> list[str]:
        """Things the backend learned during the current run that the result should say (e.g. a fallback)."""
        return []

    @abstractmethod
    def judge(self, query: Query) -> Verdict:
        """Return the verdict for ``query``; raise :class:`VerdictUnavailable` if none can be had."""

    def judge_batch(self, queries: Sequence[Query], on_result: OnResult | None = None) -> list[Outcome]:
        """Judge several queries; a failed one is returned as its :class:`VerdictUnavailable`.

        ``on_result(position, outcome)`` is called as each query is answered (from worker threads, in
        backends that have them), so a caller can keep each verdict before the batch ends.
        """
        results: list[Outcome] = []
        for position, query in enumerate(queries):
            try:
                results.append(self.judge(query))
            except VerdictUnavailable as exc:
                results.append(exc)
            if on_result is not None:
                on_result(position, results[-1])
        return results
