"""Training data at scale: records → one Arrow schema → tokenized Arrow columns, cached on disk.

Two stages, each an entry of the data cache (``data.cache_dir``, default ``$NEFTUNE_CACHE/data``):

1. :func:`normalize` reads and validates the records (:mod:`neftune.data.sources`,
   :mod:`neftune.data.formats`: the same one-line errors and counted skips as every loader) and
   writes them, batch by batch, as one Arrow table of ``messages`` and ``meta``: no record outlives
   its batch in memory, whatever the size of the set.  It draws the automatic held-out split
   (``data.eval_size``) with a fixed seed.  Keyed by the data's bytes (or a hub data set's
   fingerprint), the split, subset, format, bad-record policy, limit and held-out size.
2. :func:`tokenize` renders and tokenizes that table with ``Dataset.map(batched=True,
   num_proc=N)`` (:func:`neftune.data.template.encode_batch`: loss on assistant tokens only) into
   ``input_ids``, ``labels`` and a drop-reason code.  Keyed by stage 1's key, the tokenizer (its
   vocabulary, special tokens and chat template) and ``max_length``.

Both keys also hold a hash of this package's data code, so a change to the labelling rules
rebuilds.  Entries are written to a temporary directory and renamed into place once complete
(:func:`neftune.io.build_once`): a run killed at any moment leaves nothing that a later run would
read.  A second run, and every arm of ``neftune compare``, memory-maps the finished entries.

What a row is, and how one becomes token ids, is :mod:`neftune.data.rows` (streaming uses it too).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from neftune.data.layout import bos_ids
from neftune.data.presets import get_preset
from neftune.data.rows import (
    DROP_REASONS,
    Encoder,
    Request,
    examples_of,
    normalized_features,
    to_example,
    to_row,
    tokenized_features,
)
from neftune.data.sources import source_identity
from neftune.data.template import warn_mismatches
from neftune.data.types import Example
from neftune.errors import DataError
from neftune.io import build_once, cache_root, sha256_files

__all__ = [
    "HOLDOUT_SEED",
    "Normalized",
    "Request",
    "Tokenized",
    "data_cache_dir",
    "normalize",
    "tokenize",
    "tokenizer_fingerprint",
]

log = logging.getLogger("neftune")

HOLDOUT_SEED = 20231010
"""Seed of the automatic held-out split: the same examples are held out whatever the training seed."""

_MARKER = "entry.json"
_EXAMPLES = "examples.arrow"
_HELDOUT = "heldout.npy"
_BATCH = 2000
_PARALLEL_FROM = 5_000  # rows from which tokenization uses several processes by default


@dataclass
class Normalized:
    """A finished normalization entry: the examples as Arrow, and the account of the read."""

    directory: Path
    key: str
    info: dict[str, Any]
    built: bool = False

    def dataset(self) -> Any:
        """The examples as a memory-mapped ``datasets.Dataset`` (``messages``, ``meta``)."""
        import datasets

        return datasets.Dataset.from_file(str(self.directory / _EXAMPLES))

    def heldout_indices(self) -> np.ndarray:
        """Rows held out by the automatic split (empty without one), in row order."""
        path = self.directory / _HELDOUT
        return np.load(path) if path.is_file() else np.zeros(0, dtype=np.int64)

    def train_indices(self) -> np.ndarray:
        """Rows that train: all but the held-out ones, at most ``limit`` of them."""
        rows = np.ones(self.info["rows"], dtype=bool)
        rows[self.heldout_indices()] = False
        kept = np.flatnonzero(rows)
        limit = self.info.get("train_limit")
        return kept if limit is None else kept[:limit]

    def examples(self, indices: Iterable[int]) -> list[Example]:
        """The examples at ``indices`` (for small parts such as the held-out prompts)."""
        rows = self.dataset().select(list(indices), keep_in_memory=True)
        return [to_example(row) for row in rows]


@dataclass
class Tokenized:
    """A finished tokenization entry over a :class:`Normalized` table, row for row."""

    directory: Path
    info: dict[str, Any]
    built: bool = False
    _drops: np.ndarray | None = field(default=None, repr=False)

    def dataset(self) -> Any:
        """All rows (``input_ids``, ``labels``, ``drop``) as one memory-mapped ``datasets.Dataset``."""
        import datasets

        parts = [datasets.Dataset.from_file(str(self.directory / name)) for name in self.info["files"]]
        return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)

    def drops(self) -> np.ndarray:
        """Each row's drop code (0: kept; see :data:`DROP_REASONS`)."""
        if self._drops is None:
            self._drops = self.dataset().data.column("drop").to_numpy()
        return self._drops

    def part(self, indices: np.ndarray) -> tuple[Any, Counter[str]]:
        """The kept rows among ``indices`` as a dataset of ``input_ids`` and ``labels``, and the drops."""
        codes = self.drops()[indices]
        dropped = Counter(
            {DROP_REASONS[c]: int(n) for c, n in zip(*np.unique(codes, return_counts=True), strict=True) if c}
        )
        kept = indices[codes == 0]
        rows = self.dataset().select(kept, keep_in_memory=True).select_columns(["input_ids", "labels"])
        return rows, dropped


def data_cache_dir(configured: str | None) -> Path:
    """The data cache: ``data.cache_dir`` when set, else ``data/`` in the neftune cache."""
    return Path(configured).expanduser() if configured else cache_root() / "data"


def normalize(request: Request, root: Path, *, progress: bool = False) -> Normalized:
    """Read, validate and store ``request``'s examples as Arrow, or reuse the stored entry."""
    identity = _identity(request)
    key = _digest({"stage": "normalized", "code": _code_hash(), "source": identity, "request": request.__dict__})
    label = request.spec
    account_box: dict[str, Any] = {}

    def build(tmp: Path) -> None:
        account_box.update(_write_examples(request, tmp, progress))

    def describe(seconds: float) -> dict[str, Any]:
        return {**account_box, "spec": request.spec, "seconds": round(seconds, 2)}

    directory, built = build_once(root / "normalized", key, build, marker=_MARKER, describe=describe, error=DataError)
    info = json.loads((directory / _MARKER).read_text(encoding="utf-8"))
    if not built:
        for note in info.get("notes", []):
            log.warning(note)
        log.info("data: reusing %s (%d examples of %s)", directory, info["rows"], label)
    return Normalized(directory, key, info, built)


def tokenize(
    normalized: Normalized,
    tokenizer: Any,
    max_length: int,
    root: Path,
    *,
    num_proc: int | None = None,
    progress: bool = False,
) -> Tokenized:
    """Tokenize every row of ``normalized`` with assistant-only labels, or reuse the stored entry."""
    key = _digest(
        {
            "stage": "tokenized",
            "code": _code_hash(),
            "normalized": normalized.key,
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "max_length": max_length,
        }
    )
    rows = int(normalized.info["rows"])
    procs = num_proc if num_proc is not None else (min(os.cpu_count() or 1, 8) if rows >= _PARALLEL_FROM else 1)
    procs = max(1, min(procs, rows))
    facts: dict[str, Any] = {}

    def build(tmp: Path) -> None:
        facts.update(_tokenize_into(normalized, tokenizer, max_length, tmp, key, procs, progress))

    def describe(seconds: float) -> dict[str, Any]:
        return {**facts, "max_length": max_length, "num_proc": procs, "seconds": round(seconds, 2)}

    directory, built = build_once(root / "tokenized", key, build, marker=_MARKER, describe=describe, error=DataError)
    info = json.loads((directory / _MARKER).read_text(encoding="utf-8"))
    if built and info.get("mismatched"):
        warn_mismatches(info["mismatched"], rows)
    if not built:
        log.info("data: reusing tokenized %s", directory)
    return Tokenized(directory, info, built)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything about ``tokenizer`` that changes token ids or labels: its vocabulary and
    merges, special tokens, chat template and begin-of-sequence behaviour."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    facts = [
        type(tokenizer).__name__,
        getattr(tokenizer, "chat_template", None),
        getattr(tokenizer, "special_tokens_map", None),
        bos_ids(tokenizer),
    ]
    digest.update(json.dumps(facts, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:32]


# --------------------------------------------------------------------------------------------
# Stage 1: records to Arrow.


def _write_examples(request: Request, directory: Path, progress: bool) -> dict[str, Any]:
    import pyarrow as pa
    from tqdm import tqdm

    notes: list[str] = []
    examples, account = examples_of(request, notes)
    schema = normalized_features().arrow_schema
    rows = 0
    with (
        pa.OSFile(str(directory / _EXAMPLES), "wb") as sink,
        pa.ipc.new_stream(sink, schema) as writer,
        tqdm(
            desc=f"reading {account.label}", total=account.expected, unit=" records", disable=not progress, leave=False
        ) as bar,
    ):
        batch: list[dict[str, Any]] = []
        for example in examples:
            batch.append(to_row(example))
            if len(batch) >= _BATCH:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                rows += len(batch)
                bar.update(account.total - bar.n)  # records read, skipped ones included: the ETA's unit
                batch = []
        if batch:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
            rows += len(batch)
    account.finish()
    info: dict[str, Any] = {
        "label": account.label,
        "records": account.total,
        "rows": rows,
        "skipped": dict(account.skipped),
        "notes": notes,
        "train_limit": None,
    }
    if request.holdout:
        held = _holdout(rows, request.holdout, account.label)
        np.save(directory / _HELDOUT, held)
        info["heldout"] = len(held)
        info["train_limit"] = request.limit
    return info


def holdout_size(size: float, rows: int) -> int:
    """How many of ``rows`` examples ``data.eval_size`` holds out: a count (>= 1) or a share (< 1)."""
    return int(size) if size >= 1 else max(1, round(size * rows))


def _holdout(rows: int, size: float, label: str) -> np.ndarray:
    count = holdout_size(size, rows)
    if count >= rows:
        raise DataError(
            f"{label}: data.eval_size={size:g} would hold out {count} of {rows} usable examples, leaving none to train on"
        )
    chosen = np.random.default_rng(HOLDOUT_SEED).choice(rows, size=count, replace=False)
    return np.sort(chosen).astype(np.int64)


# --------------------------------------------------------------------------------------------
# Stage 2: Arrow to token ids.


def _tokenize_into(
    normalized: Normalized, tokenizer: Any, max_length: int, directory: Path, key: str, procs: int, progress: bool
) -> dict[str, Any]:
    import datasets

    features = tokenized_features()
    source = normalized.dataset()
    enabled = datasets.utils.logging.is_progress_bar_enabled()
    if not progress:
        datasets.disable_progress_bars()
    try:
        out = source.map(
            Encoder(tokenizer, max_length),
            batched=True,
            batch_size=1000,
            num_proc=procs if procs > 1 else None,
            remove_columns=source.column_names,
            features=features,
            cache_file_name=str(directory / "tokens.arrow"),
            load_from_cache_file=False,
            new_fingerprint=key,
            desc="tokenizing",
        )
    finally:
        if enabled and not progress:
            datasets.enable_progress_bars()
    files = sorted(Path(f["filename"]).name for f in out.cache_files)
    mismatched = int(np.asarray(out.data.column("mismatched").to_numpy()).sum())
    return {"files": files, "rows": len(out), "mismatched": mismatched}


# --------------------------------------------------------------------------------------------
# Keys.


def _identity(request: Request) -> dict[str, Any]:
    preset = get_preset(request.spec)
    if preset is None:
        return source_identity(request.spec, split=request.split, subset=request.subset)
    if preset.path is not None:
        return {"preset": preset.name, "file": sha256_files([preset.path()])}
    return {"preset": preset.name, "generated": True}  # by this package's code, hashed in every key


@functools.lru_cache(maxsize=1)
def _code_hash() -> str:
    """A hash of the data package's source: reading, validation, presets, templates and labelling."""
    return sha256_files(Path(__file__).parent.glob("*.py"))


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:24]
