"""Instruction data in the Alpaca, ShareGPT and chat-messages layouts, and :func:`load_examples`.

:func:`load_examples` reads a registered built-in set (:mod:`neftune.data.presets`), a JSON array
or JSON Lines file, a Parquet file, or a directory written by ``datasets``' ``save_to_disk``
(:mod:`neftune.data.readers`).  Records in the Alpaca, ShareGPT or chat-messages layout (detected
from the first record's keys) become :class:`~neftune.data.types.Example` objects with normalized
roles.  A record that cannot be used either stops the load with a one-line
:class:`~neftune.errors.DataError` naming the file and line (or record index) and the reason, or,
with ``on_bad_record="skip"``, is skipped and counted under that reason in
:attr:`LoadResult.skipped`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

from neftune.data.presets import bad_record_policy, defaults_for, get_preset
from neftune.data.readers import INVALID_UTF8, MALFORMED_JSON, BadRecord, Record, clip, read_records
from neftune.data.sources import Opened, open_records
from neftune.data.types import Example, LoadResult, describe_counts
from neftune.errors import ConfigError, DataError

__all__ = [
    "FORMATS",
    "ROLE_ALIASES",
    "Example",
    "LoadResult",
    "describe_counts",
    "load_eval_examples",
    "load_examples",
]

FORMATS = ("alpaca", "sharegpt", "messages")
"""Record layouts accepted by :func:`load_examples` (``fmt="auto"`` detects one of them)."""

# Reasons a record is rejected; they are the keys of LoadResult.skipped.
NOT_AN_OBJECT = "not an object"
MISSING_FIELD = "missing field"
WRONG_TYPE = "wrong type"
EMPTY_INSTRUCTION = "empty instruction"
EMPTY_RESPONSE = "empty response"
UNKNOWN_ROLE = "unknown role"
NO_RESPONSE = "no response"
NO_USER_TURN = "no user turn"
REASONS = (
    NOT_AN_OBJECT,
    MISSING_FIELD,
    WRONG_TYPE,
    EMPTY_INSTRUCTION,
    EMPTY_RESPONSE,
    UNKNOWN_ROLE,
    NO_RESPONSE,
    NO_USER_TURN,
    MALFORMED_JSON,
    INVALID_UTF8,
)

ROLE_ALIASES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
}
"""Speaker names (ShareGPT ``from`` or chat ``role``, case-insensitive) and their normalized role."""

_MAX_KEYS_SHOWN = 10


def load_examples(
    spec: str,
    *,
    fmt: str = "auto",
    split: str = "train",
    on_bad_record: str = "error",
    limit: int | None = None,
    seed: int = 0,
    require_response: bool = True,
    subset: str | None = None,
) -> LoadResult:
    """Load instruction examples from ``spec``.

    Args:
        spec: a registered built-in set such as ``builtin:skills`` or ``builtin:sharegpt`` (see
            :mod:`neftune.data.presets`), a ``.json`` (array or JSON Lines), ``.jsonl`` or
            ``.parquet`` file, a directory saved with ``save_to_disk``, a dataset repository
            directory or a hub id (:mod:`neftune.data.sources`).
        fmt: ``"auto"`` (from the first record's keys), ``"alpaca"``, ``"sharegpt"`` or
            ``"messages"``.
        split: split of a built-in set (e.g. ``"train"``/``"test"``) or of a saved ``DatasetDict``.
        on_bad_record: ``"error"`` raises :class:`DataError` at the first unusable record;
            ``"skip"`` skips and counts it by reason.
        limit: keep only the first ``limit`` usable examples.
        seed: seed of generated sets (``builtin:skills``).
        require_response: reject conversations without a final assistant answer; pass ``False``
            for prompt sets, where a conversation may end with the user.
        subset: the configuration (subset) of a hub data set or dataset repository.

    Raises:
        DataError: unknown or unreadable source, malformed data, a bad record in ``"error"`` mode,
            or no usable record at all.
        ConfigError: an invalid ``fmt``, ``on_bad_record`` or ``limit``.
    """
    if fmt != "auto" and fmt not in FORMATS:
        raise ConfigError(f"unknown data format {clip(fmt)}; expected auto, {', '.join(FORMATS)}")
    if on_bad_record not in ("error", "skip"):
        raise ConfigError(f"on_bad_record must be 'error' or 'skip', got {clip(on_bad_record)}")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be at least 1, got {limit}")

    preset = get_preset(spec)
    if preset is not None and preset.path is None:
        return preset.load_split(split, limit, seed)
    notes: list[str] = []
    if preset is not None and preset.path is not None:
        path = preset.path()
        opened = Opened(path.name, read_records(path, path.name, split, notes))
    else:
        opened = open_records(spec, split=split, subset=subset, notes=notes)
    fixed = None if fmt == "auto" else fmt
    result = _collect(opened.records, opened.label, fixed, on_bad_record, limit, require_response, notes)
    result.source = spec
    return result


def load_eval_examples(
    spec: str,
    *,
    fmt: str = "auto",
    on_bad_record: str = "error",
    limit: int | None = None,
    require_response: bool = True,
    subset: str | None = None,
) -> LoadResult:
    """The held-out or eval examples of ``spec``, the same for every command and every arm.

    Reads the data's eval split (``test`` unless its preset says otherwise) with seed 0, whatever
    the training seed, and skips-and-counts the bad records of built-in sets.
    """
    return load_examples(
        spec,
        fmt=fmt,
        split=defaults_for(spec).eval_split,
        on_bad_record=bad_record_policy(spec, on_bad_record),
        limit=limit,
        seed=0,
        require_response=require_response,
        subset=subset,
    )


# --------------------------------------------------------------------------------------------
# Validation and normalization.


class Validation:
    """The running account of :func:`validate_records`: records seen, skips by reason, repairs, notes."""

    def __init__(self, label: str, notes: list[str], expected: int | None = None) -> None:
        self.label = label
        self.expected = expected
        """How many records the source probably holds (for a progress bar's ETA), if known."""
        self.total = 0
        self.kept = 0
        self.skipped: Counter[str] = Counter()
        self.repairs: Counter[str] = Counter()
        self.notes = notes

    def finish(self) -> None:
        """Add the repairs to the notes; raise when no record was usable."""
        if self.repairs:
            fixes = ", ".join(f"{reason} in {n} records" for reason, n in self.repairs.most_common())
            self.notes.append(f"{self.label}: {fixes}")
        if not self.kept:
            why = f" (skipped: {describe_counts(self.skipped)})" if self.skipped else ""
            raise DataError(f"{self.label}: no usable records{why}")


def validate_records(
    records: Iterator[Record],
    account: Validation,
    fmt: str | None,
    on_bad_record: str,
    limit: int | None,
    require_response: bool,
) -> Iterator[Example]:
    """The usable records of ``records`` as examples, one at a time; the rest counted in ``account``.

    A bad record raises :class:`DataError` naming where it is (``on_bad_record="error"``) or is
    counted under its reason (``"skip"``).  The format is detected from the first object record when
    ``fmt`` is ``None``.  Stops after ``limit`` usable examples.
    """
    for source, where, record in records:
        account.total += 1
        try:
            if isinstance(record, BadRecord):
                raise record
            if not isinstance(record, dict):
                raise BadRecord(NOT_AN_OBJECT, f"record is {_kind(record)}, not an object")
            if fmt is None:
                fmt = _detect(record, where)
            example = _NORMALIZERS[fmt](record, require_response, account.repairs)
        except BadRecord as bad:
            if on_bad_record == "error":
                raise DataError(f"{where}: {bad.detail}") from None
            account.skipped[bad.reason] += 1
            continue
        example.meta["source"] = source
        account.kept += 1
        yield example
        if limit is not None and account.kept >= limit:
            break


def _collect(
    records: Iterator[Record],
    label: str,
    fmt: str | None,
    on_bad_record: str,
    limit: int | None,
    require_response: bool,
    notes: list[str],
) -> LoadResult:
    account = Validation(label, notes)
    examples = list(validate_records(records, account, fmt, on_bad_record, limit, require_response))
    account.finish()
    return LoadResult(examples, account.total, account.skipped, label, notes)


def _detect(record: dict[str, Any], where: str) -> str:
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record:
        return "alpaca"
    names = sorted(map(str, record))
    keys = ", ".join(clip(k)[1:-1] for k in names[:_MAX_KEYS_SHOWN]) or "none"
    if len(names) > _MAX_KEYS_SHOWN:
        keys += f", ... ({len(names)} keys)"
    raise DataError(
        f"{where}: cannot tell the data format from the keys ({keys}); expected 'instruction' "
        "(alpaca), 'conversations' (sharegpt) or 'messages' (messages), or set the format"
    )


def _kind(value: Any) -> str:
    return {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _field(record: dict[str, Any], name: str, required: bool, where: str = "") -> str | None:
    """The string field ``name``; ``None`` when absent (or null) and not required."""
    value = record.get(name)
    if value is None:
        if required:
            raise BadRecord(MISSING_FIELD, f"missing field {name!r}{where}")
        return None
    if not isinstance(value, str):
        raise BadRecord(WRONG_TYPE, f"wrong type: field {name!r}{where} is {_kind(value)}, expected a string")
    return value


def _extra_meta(record: dict[str, Any], used: tuple[str, ...]) -> dict[str, Any]:
    # Scalar side fields (an id, a reference answer, a category) travel along for evaluation.
    return {
        k: v for k, v in record.items() if k not in used and k != "source" and isinstance(v, (str, int, float, bool))
    }


def _alpaca(record: dict[str, Any], require_response: bool, repairs: Counter[str]) -> Example:
    instruction = _field(record, "instruction", required=True)
    inp = _field(record, "input", required=False) or ""
    output = _field(record, "output", required=require_response)
    system = _field(record, "system", required=False) or ""
    assert instruction is not None
    if not instruction.strip():
        raise BadRecord(EMPTY_INSTRUCTION, "empty instruction")
    if require_response and not (output or "").strip():
        raise BadRecord(EMPTY_RESPONSE, "empty response ('output' is blank)")
    user: dict[str, str] = {"role": "user", "content": instruction}
    if inp.strip():
        user = {
            "role": "user",
            "content": f"{instruction}\n\n{inp}",
            "instruction": instruction,
            "input": inp,
        }
    messages = [{"role": "system", "content": system}] if system.strip() else []
    messages.append(user)
    if output and output.strip():
        messages.append({"role": "assistant", "content": output})
    return Example(messages, _extra_meta(record, ("instruction", "input", "output", "system")))


def _turns(record: dict[str, Any], key: str, speaker: str, text: str) -> list[tuple[str, str, int]]:
    """``(role, content, turn number)`` of a conversation list, validated."""
    turns = record.get(key)
    if turns is None:
        raise BadRecord(MISSING_FIELD, f"missing field {key!r}")
    if not isinstance(turns, list):
        raise BadRecord(WRONG_TYPE, f"wrong type: field {key!r} is {_kind(turns)}, expected an array")
    out = []
    for number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            raise BadRecord(WRONG_TYPE, f"wrong type: {key} turn {number} is {_kind(turn)}, expected an object")
        where = f" in {key} turn {number}"
        name = _field(turn, speaker, required=True, where=where)
        content = _field(turn, text, required=True, where=where)
        assert name is not None and content is not None
        role = ROLE_ALIASES.get(name.strip().lower())
        if role is None:
            raise BadRecord(UNKNOWN_ROLE, f"unknown role {clip(name)}{where}")
        out.append((role, content, number))
    return out


def _conversation(
    turns: list[tuple[str, str, int]], key: str, require_response: bool, repairs: Counter[str]
) -> list[dict[str, str]]:
    for role, content, number in turns:
        if role != "system" and not content.strip():
            reason = EMPTY_INSTRUCTION if role == "user" else EMPTY_RESPONSE
            raise BadRecord(reason, f"{reason} ({role} turn {number} of {key} is blank)")
    # Empty system prompts say nothing; leaving them out changes no text the model sees.
    turns = [t for t in turns if t[0] != "system" or t[1].strip()]
    first_user = next((k for k, t in enumerate(turns) if t[0] == "user"), None)
    if first_user is None:
        detail = "no user turn" + ("" if turns else f" ({key} is empty)")
        raise BadRecord(NO_USER_TURN, detail)
    leading = [k for k, t in enumerate(turns[:first_user]) if t[0] == "assistant"]
    if leading:
        # Many ShareGPT dumps start mid-conversation with an answer to an unseen question; that
        # answer cannot be learned from, the rest of the conversation can.
        repairs["removed an answer before the first user turn"] += 1
        turns = [t for k, t in enumerate(turns) if k not in leading]
    if require_response and turns[-1][0] != "assistant":
        raise BadRecord(NO_RESPONSE, f"no response (the conversation ends with a {turns[-1][0]} turn)")
    return [{"role": role, "content": content} for role, content, _ in turns]


def _sharegpt(record: dict[str, Any], require_response: bool, repairs: Counter[str]) -> Example:
    turns = _turns(record, "conversations", "from", "value")
    messages = _conversation(turns, "conversations", require_response, repairs)
    return Example(messages, _extra_meta(record, ("conversations",)))


def _messages(record: dict[str, Any], require_response: bool, repairs: Counter[str]) -> Example:
    turns = _turns(record, "messages", "role", "content")
    messages = _conversation(turns, "messages", require_response, repairs)
    return Example(messages, _extra_meta(record, ("messages",)))


_NORMALIZERS = {"alpaca": _alpaca, "sharegpt": _sharegpt, "messages": _messages}
