"""Check a model or adapter directory's files before transformers reads them.

transformers and safetensors report a damaged file with exceptions of many kinds (a
``SafetensorError``, a ``TypeError`` for a config that is a JSON list, an ``AttributeError`` for a
tokenizer config that is a string) and rarely name the file.  :func:`check_model_files` reads only
what is cheap (the JSON files and each safetensors header) and raises :class:`ModelError` naming
the file and what is wrong with it: truncated, not JSON, not a JSON object, not a regular file.
"""

from __future__ import annotations

import json
from pathlib import Path

from neftune.errors import ModelError
from neftune.io import not_a_regular_file

__all__ = ["JSON_FILES", "check_model_files", "check_safetensors"]

#: The JSON files of a model or adapter directory; each, when present, must hold a JSON object.
JSON_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "adapter_config.json",
    "model.safetensors.index.json",
)

# A safetensors header is a few kilobytes per hundred tensors; the format itself caps it at 100 MB.
_MAX_HEADER = 100 * 1024 * 1024


def check_model_files(directory: Path, *, weights: bool = True) -> None:
    """Raise :class:`ModelError` naming the first damaged file among ``directory``'s model files.

    ``weights=False`` checks only the JSON files (enough for a caller that loads just the tokenizer).
    """
    for name in JSON_FILES:
        path = directory / name
        if path.exists() or path.is_symlink():
            _check_json_object(path)
    for path in sorted(directory.glob("*.safetensors")) if weights else ():
        check_safetensors(path)


def _check_json_object(path: Path) -> None:
    problem = not_a_regular_file(path)
    if problem:
        raise ModelError(f"{path} {problem}")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ModelError(f"{path}: not UTF-8 text (byte {error.start}); the file is damaged") from None
    except json.JSONDecodeError as error:
        at_end = error.pos >= len(error.doc.rstrip()) or error.msg.startswith("Unterminated string")
        cut = " (truncated?)" if at_end else ""
        raise ModelError(f"{path}:{error.lineno}: not valid JSON{cut}: {error.msg} (column {error.colno})") from None
    except RecursionError:
        raise ModelError(f"{path}: not usable JSON (nested too deeply)") from None
    except ValueError as error:  # an integer too long to convert
        raise ModelError(f"{path}: not usable JSON ({' '.join(str(error).split())[:80]})") from None
    except OSError as error:
        raise ModelError(f"{path}: cannot be read ({error.strerror or error})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object, got a JSON {_json_type(data)}")


def _json_type(value: object) -> str:
    names = {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def check_safetensors(path: Path) -> None:
    """Raise :class:`ModelError` unless ``path`` has a whole safetensors header and all its tensor bytes."""
    problem = not_a_regular_file(path)
    if problem:
        raise ModelError(f"weights file {path} {problem}")
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            raw = handle.read(length) if 0 <= length <= min(_MAX_HEADER, size - 8) else b""
    except OSError as error:
        raise ModelError(f"weights file {path} cannot be read ({error.strerror or error})") from None
    if length < 0:
        raise ModelError(f"weights file {path} is truncated: {size} bytes, shorter than a safetensors header")
    if length > _MAX_HEADER or length > size - 8:
        raise ModelError(
            f"weights file {path} is truncated or not a safetensors file: its header claims {length} bytes "
            f"but the file has {size}"
        )
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        header = None
    if not isinstance(header, dict):
        raise ModelError(f"weights file {path} is not a safetensors file (its header is not a JSON object)")
    ends = [_data_end(path, name, entry) for name, entry in header.items() if name != "__metadata__"]
    needed, held = max(ends, default=0), size - 8 - length
    if needed > held:
        raise ModelError(
            f"weights file {path} is truncated: its tensors need {needed} bytes of data but the file holds {held} "
            "(an interrupted download or copy?)"
        )


def _data_end(path: Path, name: str, entry: object) -> int:
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    valid = isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)
    if not valid or offsets[0] > offsets[1]:  # type: ignore[index]  # valid implies a list of two ints
        raise ModelError(
            f"weights file {path} is not a valid safetensors file (tensor {name[:60]!r} has no data offsets)"
        )
    return int(offsets[1])  # type: ignore[index]  # valid implies a list of two ints
