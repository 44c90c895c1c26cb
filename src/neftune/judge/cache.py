"""The on-disk verdict cache: a rerun of the same judgement asks the judge nothing it already answered.

One JSONL line per verdict, or per failure that asking again would repeat::

    {"key": "<sha256>", "verdict": "A", "judge": "<identity>", "reply": "<first 200 chars>", "p_first": 0.83}
    {"key": "<sha256>", "failed": "reply names no single answer (A, B or tie): 'A, B'", "judge": "<identity>"}

The key hashes the judge's identity (backend, URL, model and every setting that changes verdicts,
never a secret) and the exact messages shown, so each order of a pair is its own entry.  Appends are
line-sized and locked, so an interrupted run leaves at most one cut-off last line, which is skipped.
Failures that a retry could cure (network, overload) are not cached: a rerun asks only for them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
from pathlib import Path

from neftune.errors import JudgeError
from neftune.judge.base import VERDICTS, Query, Verdict, VerdictUnavailable, judge_messages

__all__ = ["VerdictCache", "cache_key"]

logger = logging.getLogger(__name__)


def cache_key(identity: str, query: Query) -> str:
    """The cache key of ``query`` put to the judge named ``identity``."""
    # The rendered prompt contains the instruction and both answers in their shown order, so the
    # order is part of the key; the reference is added because some judges read it.
    material = json.dumps(
        {
            "judge": identity,
            "messages": judge_messages(query.instruction, query.first, query.second),
            "reference": query.reference,
        },
        ensure_ascii=False,
        sort_keys=True,
    )
    return hashlib.sha256(material.encode("utf-8")).hexdigest()


def _probability(value: object) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value <= 1:
        return float(value)
    return None


class VerdictCache:
    """Append-only JSONL of verdicts, and of final failures, in ``directory/verdicts.jsonl``."""

    FILENAME = "verdicts.jsonl"

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.path = Path(directory) / self.FILENAME
        self.entries: dict[str, Verdict | VerdictUnavailable] = {}
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise JudgeError(f"{self.path.parent}: cannot create judge cache directory ({exc.strerror})") from None
        if self.path.exists():
            with self.path.open(encoding="utf-8") as handle:
                for number, line in enumerate(handle, start=1):
                    try:
                        self._read(json.loads(line))
                    except (ValueError, KeyError, TypeError):
                        # A line cut short by an interrupted run: skip it, the query is simply re-asked.
                        logger.warning("%s:%d: ignoring unreadable cache line", self.path, number)

    def _read(self, entry: dict[str, object]) -> None:
        key = str(entry["key"])
        if isinstance(entry.get("failed"), str):
            self.entries[key] = VerdictUnavailable(str(entry["failed"]), final=True)
        elif entry["verdict"] in VERDICTS:
            label, reply = str(entry["verdict"]), str(entry.get("reply", ""))
            self.entries[key] = Verdict(label, reply, _probability(entry.get("p_first")))

    def get(self, key: str) -> Verdict | VerdictUnavailable | None:
        """The cached verdict (or final failure) for ``key``, or None."""
        return self.entries.get(key)

    def put(self, key: str, outcome: Verdict | VerdictUnavailable, judge: str) -> None:
        """Record a verdict, or a final failure, under ``key`` (in memory and on disk)."""
        entry: dict[str, str | float] = {"key": key}
        if isinstance(outcome, VerdictUnavailable):
            entry.update(failed=str(outcome), judge=judge)
        else:
            entry.update(verdict=outcome.label, judge=judge, reply=outcome.reply[:200])
            if outcome.p_first is not None:
                entry["p_first"] = outcome.p_first
        line = json.dumps(entry, ensure_ascii=False)
        with self._lock:
            self.entries[key] = outcome
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(line + "\n")
