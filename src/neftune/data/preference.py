"""Preference pairs (a prompt, a chosen and a rejected answer) for ``neftune train --method dpo``.

:func:`load_pairs` reads the same files as :func:`neftune.data.formats.load_examples` (JSON array,
JSON Lines, Parquet, a ``save_to_disk`` directory) with the same one-line errors, or, with
``on_bad_record="skip"``, the same skip-and-count.  Accepted records, as TRL's ``DPOTrainer`` takes
them:

* plain text: ``{"prompt": str, "chosen": str, "rejected": str}``;
* conversational, explicit prompt: ``"prompt"`` a list of messages (or a string, read as one user
  turn) and ``"chosen"``/``"rejected"`` lists of assistant messages;
* conversational, implicit prompt (UltraFeedback-binarized, Anthropic HH): ``"chosen"`` and
  ``"rejected"`` are whole conversations sharing their first turns; the shared turns are the prompt
  (a ``"prompt"`` string next to them, as UltraFeedback carries, is a copy of the first user turn).

Roles go through the same aliases as instruction data (``human``/``gpt``, ``from``/``value`` are
accepted).  ``builtin:skills`` becomes a generated preference set: each prompt's exact answer is
chosen and the answer of another prompt of the same task family is rejected.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from neftune.data.formats import (
    EMPTY_INSTRUCTION,
    EMPTY_RESPONSE,
    MISSING_FIELD,
    NOT_AN_OBJECT,
    WRONG_TYPE,
    _field,
    _kind,
    _turns,
    load_examples,
)
from neftune.data.presets import get_preset
from neftune.data.readers import BadRecord, Record, clip
from neftune.data.sources import open_records
from neftune.data.types import describe_counts, load_summary
from neftune.errors import ConfigError, DataError

__all__ = ["PreferenceLoad", "PreferencePair", "load_pairs"]

IDENTICAL = "chosen equals rejected"
NO_ANSWER = "no answer"
MIXED = "mixed layouts"

Messages = list[dict[str, str]]


@dataclass
class PreferencePair:
    """One preference: ``prompt`` and two answers, all plain strings or all message lists."""

    prompt: str | Messages
    chosen: str | Messages
    rejected: str | Messages
    source: str = ""

    @property
    def conversational(self) -> bool:
        """True when prompt and answers are message lists (the chat template applies)."""
        return isinstance(self.chosen, list)

    def to_trl(self) -> dict[str, Any]:
        """The record as TRL's ``DPOTrainer`` reads it."""
        return {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}


@dataclass
class PreferenceLoad:
    """The pairs of one load and an account of every record that was not used."""

    pairs: list[PreferencePair]
    total: int
    skipped: Counter[str]
    source: str
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line such as ``loaded 98 of 100 preference pairs from p.jsonl (skipped: 2 missing field)``."""
        return load_summary(len(self.pairs), "preference pairs", self)


def load_pairs(
    spec: str,
    *,
    split: str = "train",
    on_bad_record: str = "error",
    limit: int | None = None,
    seed: int = 0,
    subset: str | None = None,
) -> PreferenceLoad:
    """Load preference pairs from a file, a ``save_to_disk`` directory, a dataset repository or hub id
    (:mod:`neftune.data.sources`; ``split`` and ``subset`` choose its part) or ``builtin:skills``.

    Raises:
        DataError: unreadable source, a bad record in ``"error"`` mode (one line naming the file and
            record), a built-in set without rejected answers, or no usable pair at all.
        ConfigError: an invalid ``on_bad_record`` or ``limit``.
    """
    if on_bad_record not in ("error", "skip"):
        raise ConfigError(f"on_bad_record must be 'error' or 'skip', got {clip(on_bad_record)}")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be at least 1, got {limit}")
    if spec == "builtin:skills":
        return _skills_pairs(split, limit, seed)
    if get_preset(spec) is not None:
        raise DataError(
            f"{spec} has no rejected answers; --method dpo needs preference data (prompt/chosen/rejected records) "
            "or builtin:skills"
        )
    notes: list[str] = []
    opened = open_records(spec, split=split, subset=subset, notes=notes)  # a file, a directory or a hub id
    result = _collect(opened.records, opened.label, on_bad_record, limit)
    result.notes = notes
    return result


def _collect(records: Iterator[Record], label: str, on_bad_record: str, limit: int | None) -> PreferenceLoad:
    pairs: list[PreferencePair] = []
    skipped: Counter[str] = Counter()
    conversational: bool | None = None
    total = 0
    for source, where, record in records:
        total += 1
        try:
            if isinstance(record, BadRecord):
                raise record
            if not isinstance(record, dict):
                raise BadRecord(NOT_AN_OBJECT, f"record is {_kind(record)}, not an object")
            pair = _pair(record)
            if conversational is not None and pair.conversational != conversational:
                first = "conversations" if conversational else "plain strings"
                raise BadRecord(MIXED, f"'chosen' is {_kind(pair.chosen)}, but the first pair's answers are {first}")
        except BadRecord as bad:
            if on_bad_record == "error":
                raise DataError(f"{where}: {bad.detail}") from None
            skipped[bad.reason] += 1
            continue
        conversational = pair.conversational
        pair.source = source
        pairs.append(pair)
        if limit is not None and len(pairs) >= limit:
            break
    if not pairs:
        why = f" (skipped: {describe_counts(skipped)})" if skipped else ""
        raise DataError(f"{label}: no usable preference pairs{why}")
    return PreferenceLoad(pairs, total, skipped, label)


def _pair(record: dict[str, Any]) -> PreferencePair:
    for name in ("chosen", "rejected"):
        if record.get(name) is None:
            raise BadRecord(MISSING_FIELD, f"missing field {name!r}")
    if isinstance(record["chosen"], str):
        prompt = _field(record, "prompt", required=True)
        chosen, rejected = _field(record, "chosen", True), _field(record, "rejected", True)
        assert prompt is not None and chosen is not None and rejected is not None
        if not prompt.strip():
            raise BadRecord(EMPTY_INSTRUCTION, "empty instruction ('prompt' is blank)")
        for name, text in (("chosen", chosen), ("rejected", rejected)):
            if not text.strip():
                raise BadRecord(EMPTY_RESPONSE, f"empty response ('{name}' is blank)")
        return _checked(PreferencePair(prompt, chosen, rejected))
    chosen_turns, rejected_turns = _messages(record, "chosen"), _messages(record, "rejected")
    shared = 0
    while (
        shared < min(len(chosen_turns), len(rejected_turns)) - 1
        and chosen_turns[shared] == rejected_turns[shared]
        and any(t["role"] == "assistant" for t in chosen_turns[shared + 1 :])
    ):
        shared += 1
    if any(t["role"] == "user" for t in chosen_turns[:shared]):
        prompt_turns = chosen_turns[:shared]  # implicit prompt: the turns both conversations share
    elif isinstance(record.get("prompt"), list):
        prompt_turns = _messages(record, "prompt")
    else:
        prompt_text = _field(record, "prompt", required=True)
        assert prompt_text is not None
        if not prompt_text.strip():
            raise BadRecord(EMPTY_INSTRUCTION, "empty instruction ('prompt' is blank)")
        prompt_turns = [{"role": "user", "content": prompt_text}]
    answers = []
    for name, turns in (("chosen", chosen_turns[shared:]), ("rejected", rejected_turns[shared:])):
        if not turns or any(t["role"] != "assistant" for t in turns):
            raise BadRecord(NO_ANSWER, f"no answer: '{name}' must end in assistant turns after the prompt")
        answers.append(turns)
    return _checked(PreferencePair(prompt_turns, answers[0], answers[1]))


def _messages(record: dict[str, Any], key: str) -> Messages:
    """``record[key]`` as normalized messages (role aliases, ``from``/``value`` accepted), validated."""
    value = record.get(key)
    if not isinstance(value, list):
        raise BadRecord(WRONG_TYPE, f"wrong type: field {key!r} is {_kind(value)}, expected an array of messages")
    sharegpt = bool(value) and isinstance(value[0], dict) and "from" in value[0]
    turns = _turns(record, key, "from" if sharegpt else "role", "value" if sharegpt else "content")
    if not turns:
        raise BadRecord(EMPTY_RESPONSE, f"empty response ('{key}' has no messages)")
    for role, content, number in turns:
        if role != "system" and not content.strip():
            raise BadRecord(EMPTY_RESPONSE, f"empty {role} turn {number} in '{key}'")
    return [{"role": role, "content": content} for role, content, _ in turns]


def _checked(pair: PreferencePair) -> PreferencePair:
    if pair.chosen == pair.rejected:
        raise BadRecord(IDENTICAL, "chosen equals rejected: the pair prefers nothing")
    return pair


def _skills_pairs(split: str, limit: int | None, seed: int) -> PreferenceLoad:
    """builtin:skills as pairs: the exact answer chosen, another prompt's answer of the same family rejected."""
    loaded = load_examples("builtin:skills", split=split, seed=seed)
    families: dict[str, list[int]] = {}
    for index, example in enumerate(loaded.examples):
        families.setdefault(str(example.meta.get("family")), []).append(index)
    wrong: dict[int, str] = {}
    for members in families.values():
        answers = [loaded.examples[i].reference or "" for i in members]
        for k, index in enumerate(members):  # the next member (cyclically) with a different answer
            other = next((a for a in answers[k + 1 :] + answers[:k] if a != answers[k]), None)
            if other is not None:
                wrong[index] = other
    pairs: list[PreferencePair] = []
    skipped: Counter[str] = Counter()
    considered = 0
    for index, example in enumerate(loaded.examples):
        considered += 1
        if index not in wrong:
            skipped["no other answer in its family"] += 1
            continue
        pairs.append(
            PreferencePair(
                example.prompt_messages,
                [{"role": "assistant", "content": example.reference or ""}],
                [{"role": "assistant", "content": wrong[index]}],
                str(example.meta.get("source", "")),
            )
        )
        if limit is not None and len(pairs) >= limit:
            break
    if not pairs:
        raise DataError("builtin:skills: no family has two different answers to build a pair from")
    return PreferenceLoad(pairs, considered, skipped, "builtin:skills (generated preference pairs)")
