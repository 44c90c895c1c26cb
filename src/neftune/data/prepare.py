"""The data a training run reads, from its ``data`` settings: training rows, held-out rows, the account.

    read = read_training_data(cfg.data, seed=cfg.train.seed)        # before the model: bad data fails fast
    data = tokenize_training_data(cfg.data, tokenizer, read)         # after it: the tokenizer is known
    data.train, data.eval_rows, data.report

The held-out examples are, in this order: ``data.eval`` (its eval split), the held-out split of a
built-in set that has one, or an automatic split of the training data (``data.eval_size``, drawn
with a fixed seed, so every arm and every run holds out the same examples).  Everything goes
through the cached Arrow pipeline (:mod:`neftune.data.pipeline`) unless ``data.streaming`` is set,
in which case the training examples are read, tokenized and shuffled on the fly
(:mod:`neftune.data.streaming`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from neftune.data.pipeline import Normalized, Request, data_cache_dir, normalize, tokenize
from neftune.data.presets import bad_record_policy, defaults_for, get_preset
from neftune.data.types import LoadResult, describe_counts
from neftune.errors import DataError

__all__ = [
    "PreparedData",
    "ReadData",
    "auto_split",
    "heldout_examples",
    "heldout_name",
    "read_training_data",
    "tokenize_training_data",
]

log = logging.getLogger("neftune")


@dataclass
class ReadData:
    """The validated (and stored) training and held-out examples, before tokenization."""

    train: Normalized | None
    """None when streaming: the examples are read while training."""
    eval: Normalized | None
    eval_from_train: bool = False
    """The held-out examples are the automatic split of :attr:`train`."""


@dataclass
class PreparedData:
    """What the Trainer reads: training rows (a dataset), held-out rows (a list) and the account."""

    train: Any
    eval_rows: list[dict[str, Any]]
    report: dict[str, Any] = field(default_factory=dict)
    stream: Any = None
    """The streaming account (:class:`neftune.data.streaming.StreamAccount`): counts known after training."""


def auto_split(data: Any) -> bool:
    """Whether the held-out examples are split off the training data automatically (``data.eval_size``)."""
    if data.eval:
        return False
    preset = get_preset(data.train)
    return data.eval_size is not None and not (preset is not None and preset.heldout_from_train)


def train_request(data: Any, seed: int) -> Request:
    """The training examples ``data`` asks for.

    The seed only shapes a built-in set's generated examples; a file's examples do not depend on it,
    so every seed of a ``compare`` shares one cache entry.
    """
    preset = get_preset(data.train)
    return Request(
        spec=data.train,
        split=data.split,
        fmt=data.format,
        on_bad_record=bad_record_policy(data.train, data.on_bad_record),
        limit=data.limit,
        seed=seed if preset is not None else 0,
        subset=data.subset,
        holdout=data.eval_size if auto_split(data) else None,
    )


def eval_request(data: Any) -> Request | None:
    """The separate held-out examples (``data.eval`` or a built-in set's held-out split), if any."""
    preset = get_preset(data.train)
    spec = data.eval or (data.train if preset is not None and preset.heldout_from_train else None)
    if spec is None:
        return None
    return Request(
        spec=spec,
        split=defaults_for(spec).eval_split,
        fmt=data.format,
        on_bad_record=bad_record_policy(spec, data.on_bad_record),
        limit=data.eval_limit,
        seed=0,  # the same held-out examples whatever the training seed
        subset=data.subset,
    )


def read_training_data(data: Any, *, seed: int, progress: bool = False) -> ReadData:
    """Read and validate the training and held-out examples (stored once in the data cache)."""
    root = data_cache_dir(data.cache_dir)
    held_request = eval_request(data)
    held = normalize(held_request, root) if held_request is not None else None
    if data.streaming:
        return ReadData(None, held)
    train = normalize(train_request(data, seed), root, progress=progress)
    log.info(_summary(train))
    return ReadData(train, held, eval_from_train=auto_split(data))


def tokenize_training_data(
    data: Any, tokenizer: Any, read: ReadData, *, seed: int = 0, progress: bool = False
) -> PreparedData:
    """Tokenize (or reuse the tokenized) training and held-out examples; count every drop."""
    root = data_cache_dir(data.cache_dir)
    report: dict[str, Any] = {"train": data.train, "data_cache": str(root)}
    account = None
    tokenized = None
    eval_rows: list[dict[str, Any]] = []
    if read.train is None:
        from neftune.data.streaming import stream_training_rows

        train_rows, eval_rows, account = stream_training_rows(
            train_request(data, seed), tokenizer, data.max_length, seed=seed, shuffle_buffer=data.shuffle_buffer
        )
        report["train_streaming"] = True
        if eval_rows:
            report.update({"eval": heldout_name(data), "eval_examples": len(eval_rows)})
    else:
        tokenized = tokenize(read.train, tokenizer, data.max_length, root, num_proc=data.num_proc, progress=progress)
        train_rows, dropped = tokenized.part(read.train.train_indices())
        info = read.train.info
        report.update(
            {
                "train_records": info["records"],
                "train_examples": len(train_rows),
                "train_skipped": dict(info["skipped"]),
                "train_dropped": dict(dropped),
                "data_cache_entries": [str(read.train.directory), str(tokenized.directory)],
                "data_cache_reused": not (read.train.built or tokenized.built),
            }
        )
        if dropped:
            log.warning("dropped %s", describe_counts(dropped))
        if not len(train_rows):
            raise DataError(
                f"{data.train}: no example has a trainable response token within max_length={data.max_length}"
            )
    source = read.train if read.eval_from_train else read.eval
    if source is not None:
        indices = source.heldout_indices()[: data.eval_limit] if read.eval_from_train else _all(source)
        tokenized_eval = (
            tokenized
            if read.eval_from_train and tokenized is not None
            else tokenize(source, tokenizer, data.max_length, root, num_proc=1)
        )
        rows, eval_dropped = tokenized_eval.part(indices)
        eval_rows = rows.to_list()
        report.update(
            {
                "eval": heldout_name(data) if read.eval_from_train else source.info["spec"],
                "eval_examples": len(eval_rows),
                "eval_skipped": {} if read.eval_from_train else dict(source.info["skipped"]),
                "eval_dropped": dict(eval_dropped),
            }
        )
    return PreparedData(train_rows, eval_rows, report, account)


def heldout_examples(data: Any, *, limit: int | None) -> LoadResult:
    """The automatic held-out split's examples (for ``neftune compare``'s answers), at most ``limit``."""
    train = normalize(train_request(data, 0), data_cache_dir(data.cache_dir))
    indices = train.heldout_indices()
    chosen = indices if limit is None else indices[:limit]
    examples = train.examples(chosen)
    skipped = {"in the training split": int(train.info["rows"] - len(indices))}
    if len(chosen) < len(indices):
        skipped["beyond the limit"] = len(indices) - len(chosen)
    from collections import Counter

    return LoadResult(examples, int(train.info["rows"]), Counter(skipped), heldout_name(data))


def heldout_name(data: Any) -> str:
    """How the automatic held-out split is named in reports: ``"SPEC (held out: eval_size=X)"``."""
    return f"{data.train} (held out: eval_size={data.eval_size:g})"


def _all(normalized: Normalized) -> np.ndarray:
    return np.arange(int(normalized.info["rows"]), dtype=np.int64)


def _summary(normalized: Normalized) -> str:
    info = normalized.info
    line = f"loaded {info['rows']} of {info['records']} records from {info['spec']}"
    if info.get("skipped"):
        from collections import Counter

        line += " (skipped: " + describe_counts(Counter(info["skipped"])) + ")"
    if info.get("heldout"):
        line += f"; {info['heldout']} held out"
    return line
