"""AlpacaEval-format outputs files: validated reading and atomic writing.

An outputs file is AlpacaEval's ``model_outputs`` format: a JSON list of records with
``instruction``, ``output``, ``generator`` and ``dataset`` (``dataset`` is optional when reading, as in
AlpacaEval).  Records written by :func:`neftune.generate.generate_outputs` may carry three extra
keys: ``reference`` (the dataset's reference answer, a string), ``meta`` (a small dict of JSON scalars,
e.g. a builtin example's ``family`` and ``answer``) and ``reached_cap`` (``true`` when generation
stopped at ``max_new_tokens`` without an end token, i.e. the answer was cut off).  AlpacaEval accepts
such files unchanged: its head-to-head annotation keeps only the ``instruction`` and ``output``
columns of each file.  A record's ``instruction`` is its prompt's last user message
(:func:`instruction_of`), which is how two files' answers are paired up.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from neftune.errors import DataError
from neftune.io import atomic_write_json, not_a_regular_file
from neftune.jsonsafe import JSONProblem
from neftune.jsonsafe import loads as strict_loads

__all__ = ["REACHED_CAP", "REQUIRED_KEYS", "instruction_of", "read_outputs", "write_outputs"]

#: Keys every output record must have, with string values (``dataset``, also written, is optional).
REQUIRED_KEYS: tuple[str, ...] = ("instruction", "output", "generator")
#: The optional record key saying whether the answer stopped at the token cap without an end token.
REACHED_CAP = "reached_cap"


def instruction_of(messages: Sequence[Mapping[str, Any]]) -> str:
    """Return the instruction recorded for a prompt: the content of its last user message.

    For a multi-turn prompt this is the final user turn only; earlier turns (and any system message)
    are part of the prompt the model saw but not of the ``instruction`` field, which AlpacaEval and
    :mod:`neftune.judge` use to pair up two models' answers.
    """
    for message in reversed(messages):
        if message.get("role") == "user":
            return str(message.get("content", ""))
    raise ValueError("prompt has no user message")


def _validate_records(records: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(records, list):
        raise DataError(f"{where}: expected a JSON list of output records, got {type(records).__name__}")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f"{where}: record {index} is {type(record).__name__}, expected an object")
        for key in REQUIRED_KEYS:
            if key not in record:
                raise DataError(f"{where}: record {index} has no '{key}' field")
            if not isinstance(record[key], str):
                raise DataError(
                    f"{where}: record {index} field '{key}' must be a string, got {type(record[key]).__name__}"
                )
        if "dataset" in record and not isinstance(record["dataset"], str):
            raise DataError(f"{where}: record {index} field 'dataset' must be a string")
        if "reference" in record and record["reference"] is not None and not isinstance(record["reference"], str):
            raise DataError(f"{where}: record {index} field 'reference' must be a string or null")
        if "meta" in record and not isinstance(record["meta"], dict):
            raise DataError(f"{where}: record {index} field 'meta' must be an object")
        if REACHED_CAP in record and not isinstance(record[REACHED_CAP], bool):
            raise DataError(f"{where}: record {index} field '{REACHED_CAP}' must be true or false")
    return records


def write_outputs(path: str | os.PathLike[str], records: Iterable[Mapping[str, Any]]) -> Path:
    """Validate ``records`` and write them as an AlpacaEval JSON list to ``path`` (atomically).

    Parent directories are created.  Returns the path written.  Raises :class:`DataError` if a
    record lacks one of :data:`REQUIRED_KEYS` or has a non-string value there.
    """
    path = Path(path)
    data = _validate_records([dict(r) for r in records], str(path))
    # Atomic: an interrupted run never leaves half a file that a later `judge` would read as a
    # shorter outputs list.
    atomic_write_json(path, data)
    return path


def read_outputs(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read and validate an AlpacaEval outputs file written by :func:`write_outputs` (or AlpacaEval).

    Raises :class:`DataError` with a one-line message naming the file (and record index) when the
    file is missing, is not JSON, is not a list of objects, or a record lacks a required string
    field.
    """
    path = Path(path)
    problem = not_a_regular_file(path)
    if problem == "does not exist":
        raise DataError(f"{path}: outputs file not found")
    if problem:
        raise DataError(f"outputs file {path} {problem}; expected a JSON list of output records")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"{path}: cannot read outputs file ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise DataError(f"{path}: empty file; expected a JSON list of output records")
    try:
        data = strict_loads(text.removeprefix("\ufeff"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except JSONProblem as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    return _validate_records(data, str(path))
