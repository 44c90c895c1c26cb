"""Strict JSON decoding for files a user hands in: hostile input fails with one clear reason.

Python's :mod:`json` accepts things that are not JSON or not safe to pass on: ``NaN`` and
``Infinity`` literals, numbers that overflow to ``inf``, duplicate keys (the last one silently
wins), and it raises :class:`RecursionError` (deep nesting) or a bare :class:`ValueError`
(an integer of more than 4300 digits) instead of a decoding error.  The decoder here turns each of
those into a :class:`JSONProblem`, a :class:`ValueError` carrying a short reason, so that every
reader can name the file and line and say what is wrong.
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["JSONProblem", "loads", "raw_decode"]


class JSONProblem(ValueError):
    """JSON that neftune refuses; ``str(error)`` is a short reason (no file name)."""


def _short(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise JSONProblem(f"duplicate key {_short(key)} in an object")
            seen.add(key)
    return obj


def _constant(name: str) -> float:
    raise JSONProblem(f"{name} is not valid JSON (use null or a string)")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JSONProblem(f"number {_short(text, 20)} is out of range")
    return value


_DECODER = json.JSONDecoder(object_pairs_hook=_object, parse_constant=_constant, parse_float=_float)


def raw_decode(text: str, idx: int = 0) -> tuple[Any, int]:
    """Decode one JSON value starting at ``text[idx]``; return it and the index after it.

    Raises :class:`json.JSONDecodeError` for malformed JSON (with line and column) and
    :class:`JSONProblem` for well-formed text neftune refuses (see the module docstring).
    """
    try:
        return _DECODER.raw_decode(text, idx)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise JSONProblem("JSON nested too deeply") from None
    except JSONProblem:
        raise
    except ValueError as err:  # int() of a number with too many digits
        raise JSONProblem(f"unreadable number ({' '.join(str(err).split())[:80]})") from None


def loads(text: str) -> Any:
    """Decode a whole JSON document strictly (as :func:`raw_decode`); trailing data is an error."""
    start = len(text) - len(text.lstrip(" \t\n\r"))
    if text.startswith("\ufeff", start):
        raise JSONProblem("a byte-order mark (U+FEFF) inside the file (were files concatenated?)")
    value, end = raw_decode(text, start)
    rest = len(text) - len(text[end:].lstrip(" \t\n\r"))
    if rest < len(text):
        raise json.JSONDecodeError("Extra data", text, rest)
    return value
