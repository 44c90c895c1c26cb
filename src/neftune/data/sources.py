"""Where records come from: files, ``datasets`` directories, dataset repositories and hub data sets.

:func:`open_records` turns a data spec that is not a built-in set into a stream of raw records
(``(source, where, record)`` triples, :mod:`neftune.data.readers`) without holding the data in
memory; :func:`source_identity` says what the records' content is, for cache keys and fingerprints.

A spec is, in this order:

* an existing ``.json`` / ``.jsonl`` / ``.parquet`` file;
* an existing directory written by ``datasets``' ``save_to_disk`` (it holds ``dataset_info.json``,
  ``state.json`` or ``dataset_dict.json``);
* an existing directory laid out as a dataset repository (a ``README.md`` dataset card, whose YAML
  header may list configs, a ``data/`` folder of data files, or data files at its top named after their
  splits, as ``train.jsonl`` / ``test.jsonl``), read by ``datasets.load_dataset`` exactly as a hub data
  set is;
* ``owner/name``: a data set on the Hugging Face hub, read by ``datasets.load_dataset(spec, subset,
  split=split)``, which downloads it once into the ``datasets`` cache (``HF_DATASETS_OFFLINE=1``
  reads that cache only).

A split or subset that does not exist, a data set that cannot be reached and a repository with no
readable data files each end in one line naming the spec.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neftune.data.readers import Record, dataset_records, one_line, read_records
from neftune.errors import DataError
from neftune.io import not_a_regular_file, sha256_files

__all__ = ["Opened", "is_hub_id", "open_records", "source_identity"]

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
_FILE_SUFFIXES = (".json", ".jsonl", ".ndjson", ".parquet", ".csv", ".arrow", ".txt")
"""A missing path with one of these suffixes is a missing file, not a hub id."""
_SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_REPOSITORY_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".arrow")
_SPLIT_NAMES = ("train", "test", "validation", "valid", "dev", "eval")


def _split_file(path: Path) -> bool:
    """A data file named after a split (``train.jsonl``, ``test-00000.parquet``): a folder holding one is
    read as ``datasets.load_dataset(folder)`` reads it; a folder of other files is not guessed at."""
    stem = path.name.lower().split(".", 1)[0]
    return path.is_file() and path.suffix.lower() in _REPOSITORY_SUFFIXES and stem.startswith(_SPLIT_NAMES)


@dataclass
class Opened:
    """An opened source: its name in messages, its records, and how many there are (if known)."""

    label: str
    records: Iterator[Record]
    size: int | None = None


def is_hub_id(spec: str) -> bool:
    """Whether ``spec`` has the shape of a hub data set id (``owner/name``)."""
    return bool(_HUB_ID.match(spec))


def _kind(spec: str) -> tuple[str, Path]:
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir():
            if any((path / marker).is_file() for marker in _SAVED_MARKERS):
                return "saved", path
            repository = (
                (path / "README.md").is_file()
                or (path / "data").is_dir()
                or any(_split_file(p) for p in path.iterdir())
            )
            # anything else is reported as a directory that save_to_disk did not write
            return ("repository" if repository else "saved"), path
        problem = not_a_regular_file(path)  # a FIFO or /dev/zero would never finish hashing
        if problem:
            raise DataError(f"{spec} {problem}")
        return "file", path
    if is_hub_id(spec) and path.suffix.lower() not in _FILE_SUFFIXES:
        return "hub", path
    raise DataError(f"{spec}: no such file or directory")


def open_records(spec: str, *, split: str, subset: str | None, notes: list[str], streaming: bool = False) -> Opened:
    """The raw records of ``spec`` (a file, a directory or a hub id; see the module docstring)."""
    kind, path = _kind(spec)
    if kind == "file":
        return Opened(spec, read_records(path, spec, split, notes), _count_hint(path))
    if kind == "saved":
        return Opened(spec, read_records(path, spec, split, notes))
    loaded = load_hub_dataset(spec, split=split, subset=subset, streaming=streaming)
    label = f"{spec}[{split}]"
    size = None if streaming else len(loaded)
    return Opened(label, dataset_records(loaded, label), size)


def load_hub_dataset(spec: str, *, split: str, subset: str | None, streaming: bool = False) -> Any:
    """``datasets.load_dataset`` for a hub id or a dataset repository, with one-line errors."""
    import datasets

    kind, path = _kind(spec)
    target = str(path) if kind == "repository" else spec
    try:
        return datasets.load_dataset(target, subset, split=split, streaming=streaming)
    except ValueError as err:  # an unknown split or config
        raise DataError(f"{spec}: {one_line(err)}") from None
    except Exception as err:  # datasets raises many types (offline, not found, no data files)
        offline = " (HF_DATASETS_OFFLINE is set: only the local datasets cache is read)" if _offline() else ""
        raise DataError(f"{spec}: cannot load the data set: {one_line(err)}{offline}") from None


def _offline() -> bool:
    import os

    return os.environ.get("HF_DATASETS_OFFLINE", "").lower() in ("1", "true", "yes") or os.environ.get(
        "HF_HUB_OFFLINE", ""
    ).lower() in ("1", "true", "yes")


def source_identity(spec: str, *, split: str, subset: str | None) -> dict[str, Any]:
    """What the records of ``spec`` are, for cache keys: a hash of a file's or directory's bytes, or a
    hub data set's ``datasets`` fingerprint (which changes with its downloaded files)."""
    kind, path = _kind(spec)
    if kind == "file":
        return {"file": sha256_files([path])}
    if kind in ("saved", "repository"):
        return {kind: sha256_files(p for p in path.rglob("*") if p.is_file()), "split": split, "subset": subset}
    loaded = load_hub_dataset(spec, split=split, subset=subset)
    return {"hub": spec, "split": split, "subset": subset, "fingerprint": loaded._fingerprint}


def _count_hint(path: Path) -> int | None:
    """The number of records a file probably holds (JSON Lines: its lines; Parquet: its rows)."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return int(pq.ParquetFile(path).metadata.num_rows)
        if suffix in (".jsonl", ".ndjson"):
            with path.open("rb") as handle:
                return sum(block.count(b"\n") for block in iter(lambda: handle.read(1 << 22), b"")) or None
    except Exception:  # only a progress hint: the reader reports a broken file properly
        return None
    return None
