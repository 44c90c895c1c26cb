"""Raw records from files: JSON arrays, JSON Lines, Parquet and ``datasets`` directories.

:func:`read_records` yields ``(source, where, record)`` triples: ``source`` goes into an example's
``meta["source"]``, ``where`` prefixes error messages, and a record that could not even be parsed
arrives as a :class:`BadRecord` (counted or raised by the caller, see :mod:`neftune.data.formats`).
A JSON array that was cut off keeps every complete record and says in ``notes``, and in a logged
warning, how much of its tail was dropped.
"""

from __future__ import annotations

import codecs
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from neftune.errors import DataError
from neftune.io import not_a_regular_file
from neftune.jsonsafe import JSONProblem
from neftune.jsonsafe import loads as strict_loads
from neftune.jsonsafe import raw_decode as strict_raw_decode

logger = logging.getLogger(__name__)

MALFORMED_JSON = "malformed JSON"
INVALID_UTF8 = "invalid UTF-8"

_JSON_SUFFIXES = (".json", ".jsonl", ".ndjson")


class BadRecord(Exception):
    """A record that cannot be used: ``reason`` is its skip category, ``detail`` the message."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


Record = tuple[str, str, Any]
"""``(source, where, record)``; ``record`` is the parsed JSON value or a :class:`BadRecord`."""


def read_records(path: Path, label: str, split: str, notes: list[str]) -> Iterator[Record]:
    """The records of a JSON/JSONL/Parquet file or a ``save_to_disk`` directory (its ``split``).

    ``label`` names the file in messages; notes about the file as a whole are appended to ``notes``.
    """
    if path.is_dir():
        return _dataset_records(path, label, split)
    problem = not_a_regular_file(path)
    if problem:
        raise DataError(f"{label} {problem}")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _parquet_records(path, label)
    if suffix in _JSON_SUFFIXES:
        return _json_records(path, label, notes)
    raise DataError(
        f"{label}: unsupported file type {path.suffix or '(none)'!r}; expected .json, .jsonl, "
        ".parquet or a directory saved with datasets' save_to_disk"
    )


def _json_records(path: Path, label: str, notes: list[str]) -> Iterator[Record]:
    try:
        handle = path.open("rb")
    except OSError as err:
        raise DataError(f"{label}: cannot read: {err.strerror or err}") from None
    with handle:
        bom = len(codecs.BOM_UTF8) if handle.read(len(codecs.BOM_UTF8)) == codecs.BOM_UTF8 else 0
        handle.seek(bom)
        first = _first_data(handle)
    if first is None:
        raise DataError(f"{label}: empty file")
    if first == b"[":
        # A JSON array is decoded as one text (records are found by the decoder, not by lines).
        try:
            raw = path.read_bytes()
        except OSError as err:
            raise DataError(f"{label}: cannot read: {err.strerror or err}") from None
        try:
            text = raw[bom:].decode("utf-8")
        except UnicodeDecodeError as err:
            offset = bom + err.start
            line = raw.count(b"\n", 0, offset) + 1
            raise DataError(f"{label}:{line}: invalid UTF-8 (byte offset {offset})") from None
        del raw
        return _array_records(text, label, notes)
    return _jsonl_records(path, bom, label)


def _first_data(handle: Any) -> bytes | None:
    """The first non-whitespace byte from the handle's position on (``None``: the rest is blank)."""
    for block in iter(lambda: handle.read(1 << 16), b""):
        body = block.lstrip()
        if body:
            return body[:1]
    return None


def _jsonl_records(path: Path, bom: int, label: str) -> Iterator[Record]:
    """JSON Lines read line by line: memory does not grow with the file."""
    with path.open("rb") as handle:
        handle.seek(bom)
        offset = bom
        for number, line in enumerate(handle, start=1):
            where = f"{label}:{number}"
            line_offset, offset = offset, offset + len(line)
            line = line.rstrip(b"\n")
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as err:
                yield where, where, BadRecord(INVALID_UTF8, f"invalid UTF-8 (byte offset {line_offset + err.start})")
                continue
            try:
                record = strict_loads(text)
            except json.JSONDecodeError as err:
                if number == 1:
                    _reject_single_object(path, bom, label)
                yield where, where, BadRecord(MALFORMED_JSON, f"malformed JSON: {err.msg} (column {err.colno})")
                continue
            except JSONProblem as err:
                yield where, where, BadRecord(MALFORMED_JSON, f"malformed JSON: {err}")
                continue
            yield where, where, record


_SINGLE_OBJECT_LIMIT = 64 << 20


def _reject_single_object(path: Path, bom: int, label: str) -> None:
    """A pretty-printed JSON object is neither JSON Lines nor a record array: say so."""
    try:
        if path.stat().st_size > _SINGLE_OBJECT_LIMIT:
            return  # a file this large whose first line fails is JSON Lines with a bad first line
        whole = strict_loads(path.read_bytes()[bom:].decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):  # JSONDecodeError and JSONProblem are ValueErrors
        return
    if isinstance(whole, dict):
        raise DataError(
            f"{label}: the file is a single JSON object; expected a JSON array of records or "
            "JSON Lines (one record per line)"
        )


_WHITESPACE = re.compile(r"[ \t\n\r]*")


def _skip_ws(text: str, pos: int) -> int:
    """Index of the first non-whitespace character at or after ``pos`` (JSON whitespace)."""
    match = _WHITESPACE.match(text, pos)
    return match.end() if match else pos


_PARTIAL_LITERAL = re.compile(r"(?:t(?:r(?:ue?)?)?|f(?:a(?:l(?:se?)?)?)?|n(?:u(?:ll?)?)?|[-+.0-9eE]*)\s*")


def _array_records(text: str, label: str, notes: list[str]) -> Iterator[Record]:
    """Decode a top-level JSON array record by record, recovering from a truncated tail."""
    idx = _skip_ws(text, text.index("[") + 1)
    line, counted = 1, 0
    index = 0
    closed = idx < len(text) and text[idx] == "]"
    while not closed and idx < len(text):
        line += text.count("\n", counted, idx)
        counted = idx
        try:
            record, end = strict_raw_decode(text, idx)
        except JSONProblem as err:
            raise DataError(f"{label}:{line}: malformed JSON in record #{index}: {err}") from None
        except json.JSONDecodeError as err:
            if _cut_off(text, err):
                break
            raise DataError(
                f"{label}:{err.lineno}: malformed JSON in record #{index}: {err.msg} (column {err.colno})"
            ) from None
        yield f"{label}:{line}", f"{label}:{line} (record #{index})", record
        index += 1
        idx = _skip_ws(text, end)
        if idx >= len(text):
            break
        if text[idx] == ",":
            idx = _skip_ws(text, idx + 1)
        elif text[idx] == "]":
            closed = True
        else:
            at_line = text.count("\n", 0, idx) + 1
            raise DataError(f"{label}:{at_line}: malformed JSON after record #{index - 1}: expected ',' or ']'")
    if closed:
        rest = _skip_ws(text, idx + 1)
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


def _parquet_records(path: Path, label: str) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{label}: not a readable Parquet file ({one_line(err)})") from None
    index = 0
    for batch in parquet.iter_batches():
        for row in batch.to_pylist():
            where = f"{label}[#{index}]"
            yield where, where, row
            index += 1


def _dataset_records(path: Path, label: str, split: str) -> Iterator[Record]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as err:
        raise DataError(f"{label}: not a data set directory saved with save_to_disk ({one_line(err)})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{label}: no split {split!r}; it has {', '.join(loaded)}")
        loaded = loaded[split]
        label = f"{label}[{split}]"
    return dataset_records(loaded, label)


def dataset_records(loaded: Any, label: str) -> Iterator[Record]:
    """The rows of a ``datasets`` ``Dataset`` or ``IterableDataset``, each named ``label[#index]``."""
    index = 0
    for batch in loaded.iter(batch_size=1000):
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns), strict=True):
            where = f"{label}[#{index}]"
            yield where, where, dict(zip(columns, values, strict=True))
            index += 1


def one_line(err: BaseException) -> str:
    """An exception's message on one line of at most about 200 characters."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 200 else text[:200] + "..."


def clip(value: str, limit: int = 40) -> str:
    """``value`` quoted for a one-line message: escaped, and cut short if it is long."""
    if len(value) > limit:
        quoted = repr(value[:limit])
        return quoted[:-1] + "..." + quoted[-1]
    return repr(value)
