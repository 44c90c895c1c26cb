"""The data model every stage shares: :class:`Example` (one conversation) and :class:`LoadResult`
(the examples of one load, with an account of every record that was not used).

This module imports nothing else from :mod:`neftune`, so loaders, presets, templates and metrics
can all depend on it without depending on one another.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["Example", "LoadResult", "describe_counts"]


@dataclass
class Example:
    """One conversation: normalized ``messages`` plus free-form ``meta``.

    ``messages`` are dicts with ``role`` in ``{"system", "user", "assistant"}`` and a ``content``
    string.  A user turn read from an Alpaca record also keeps its two parts under the optional keys
    ``instruction`` and ``input``, so the Alpaca prompt can show its ``### Input:`` section; chat
    templates only read ``role`` and ``content``.
    """

    messages: list[dict[str, str]]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        """The messages the answer responds to: all but a final assistant turn.

        A conversation that ends with the user (a prompt set) is all prompt.
        """
        if self.messages and self.messages[-1]["role"] == "assistant":
            return list(self.messages[:-1])
        return list(self.messages)

    @property
    def reference(self) -> str | None:
        """The final assistant turn's content; ``None`` when the conversation ends otherwise."""
        if self.messages and self.messages[-1]["role"] == "assistant":
            return self.messages[-1]["content"]
        return None


@dataclass
class LoadResult:
    """The examples of one load and an account of every record that was not used."""

    examples: list[Example]
    total: int
    """Records examined (a load with ``limit`` stops examining once it has enough)."""
    skipped: Counter[str]
    """Skipped records by reason; ``len(examples) + sum(skipped.values()) == total``."""
    source: str
    notes: list[str] = field(default_factory=list)
    """Things the user should know that are not per-record failures (e.g. a truncated file)."""

    def summary(self) -> str:
        """One line such as ``loaded 980 of 1000 records from x.jsonl (skipped: 20 empty response)``.

        :attr:`notes` are not part of it; show them on their own lines.
        """
        return load_summary(len(self.examples), "records", self)


class LoadAccount(Protocol):
    """What a load examined, from where, and the records it skipped by reason."""

    total: int
    skipped: Counter[str]
    source: str


def load_summary(used: int, what: str, load: LoadAccount) -> str:
    """``loaded <used> of <total> <what> from <source>``, then the skipped records by reason, for a
    load's account (:class:`LoadResult`, :class:`neftune.data.preference.PreferenceLoad`)."""
    line = f"loaded {used} of {load.total} {what} from {load.source}"
    if load.skipped:
        line += " (skipped: " + describe_counts(load.skipped) + ")"
    return line


def describe_counts(counts: Counter[str]) -> str:
    """``Counter({"empty response": 3, "unknown role": 1})`` -> ``"3 empty response, 1 unknown role"``."""
    return ", ".join(f"{n} {reason}" for reason, n in counts.most_common())
