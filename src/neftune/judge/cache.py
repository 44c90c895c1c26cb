"""The on-disk verdict cache: a rerun of the same judgement asks the judge nothing it already answered.

One JSONL line per successful verdict::

    {"key": "<sha256>", "verdict": "A", "p_first": 0.83, "judge": "<identity>", "reply": "<first 200 chars>"}

The key hashes the judge's identity (backend, URL, model and every setting that changes verdicts,
never a secret) and the exact messages shown, so each order of a pair is its own entry.  Appends are
line-sized and locked, so an interrupted run leaves at most one cut-off last line, which is skipped.
Failed queries are never cached: a rerun asks only for them.
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
from neftune.judge.base import VERDICTS, Query, Verdict, judge_messages

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
    """Append-only JSONL of successful verdicts in ``directory/verdicts.jsonl``."""

    FILENAME = "verdicts.jsonl"

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.path = Path(directory) / self.FILENAME
        self.entries: dict[str, Verdict] = {}
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise JudgeError(f"{self.path.parent}: cannot create judge cache directory ({exc.strerror})") from None
        if self.path.exists():
            with self.path.open(encoding="utf-8") as handle:
                for number, line in enumerate(handle, start=1):
                    try:
                        entry = json.loads(line)
                        if entry["verdict"] in VERDICTS:
                            verdict = Verdict(
                                entry["verdict"], str(entry.get("reply", "")), _probability(entry.get("p_first"))
                            )
                            self.entries[str(entry["key"])] = verdict
                    except (ValueError, KeyError, TypeError):
                        # A line cut short by an interrupted run: skip it, the query is simply re-asked.
                        logger.warning("%s:%d: ignoring unreadable cache line", self.path, number)

    def get(self, key: str) -> Verdict | None:
        """The cached verdict for ``key``, or None."""
        return self.entries.get(key)

    def put(self, key: str, verdict: Verdict, judge: str) -> None:
        """Record ``verdict`` under ``key`` (in memory and on disk)."""
        entry: dict[str, str | float] = {"key": key, "verdict": verdict.label, "judge": judge}
        entry["reply"] = verdict.reply[:200]
        if verdict.p_first is not None:
            entry["p_first"] = verdict.p_first
        line = json.dumps(entry, ensure_ascii=False)
        with self._lock:
            self.entries[key] = verdict
            try:
                with self.path.open("a", encoding="utf-8") as handle:
                    handle.write(line + "\n")
            except OSError as error:  # a full disk: say which file (write() names none)
                error.filename = error.filename or str(self.path)
                raise
