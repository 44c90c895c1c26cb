"""The row codec that the cached pipeline and streaming share.

What to read (:class:`Request`), the usable examples of a data spec one at a time
(:func:`examples_of`: the same one-line errors and counted skips as every loader), an example as a
row of the normalized Arrow table and back (:func:`to_row`, :func:`to_example`,
:func:`normalized_features`), and rows to token ids, labels and drop codes (:class:`Encoder`,
:func:`tokenized_features`, :data:`DROP_REASONS`). :mod:`neftune.data.pipeline` writes these rows
into its cached tables; :mod:`neftune.data.streaming` encodes them on the fly.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from neftune.data.formats import Validation, validate_records
from neftune.data.presets import get_preset
from neftune.data.readers import read_records
from neftune.data.sources import open_records
from neftune.data.template import (
    DROP_NO_ASSISTANT,
    DROP_TEMPLATE_ERROR,
    DROP_TEMPLATE_MISMATCH,
    DROP_TRUNCATED,
    encode_batch,
)
from neftune.data.types import Example

__all__ = [
    "DROP_REASONS",
    "Encoder",
    "Request",
    "examples_of",
    "normalized_features",
    "to_example",
    "to_row",
    "tokenized_features",
]

DROP_REASONS = ("", DROP_NO_ASSISTANT, DROP_TRUNCATED, DROP_TEMPLATE_ERROR, DROP_TEMPLATE_MISMATCH)
"""Drop reasons by their code in the tokenized table's ``drop`` column (0: kept)."""


@dataclass(frozen=True)
class Request:
    """What to read: a data spec and everything that decides which examples it yields."""

    spec: str
    split: str = "train"
    fmt: str = "auto"
    on_bad_record: str = "error"
    limit: int | None = None
    seed: int = 0
    subset: str | None = None
    require_response: bool = True
    holdout: float | None = None
    """Held out automatically: a count (>= 1) or a share (< 1) of the usable examples; None: none."""


def normalized_features() -> Any:
    """The columns of a normalized table."""
    import datasets

    string = datasets.Value("string")
    message = {"role": string, "content": string, "instruction": string, "input": string}
    return datasets.Features({"messages": datasets.List(message), "meta": string})


def to_row(example: Example) -> dict[str, Any]:
    """An example as a row of the normalized table."""
    messages = [
        {"role": m["role"], "content": m["content"], "instruction": m.get("instruction"), "input": m.get("input")}
        for m in example.messages
    ]
    return {"messages": messages, "meta": json.dumps(example.meta, ensure_ascii=False, default=str)}


def to_example(row: dict[str, Any]) -> Example:
    """A row of the normalized table as an :class:`Example` (absent optional keys left out)."""
    messages = [{k: v for k, v in m.items() if v is not None} for m in row["messages"]]
    return Example(messages, json.loads(row["meta"]))


def examples_of(request: Request, notes: list[str], *, streaming: bool = False) -> tuple[Iterator[Example], Validation]:
    """The usable examples of ``request`` one at a time, and the account that counts the rest.

    With an automatic held-out split every usable record is read (``limit`` then caps the
    training part), so that the split does not depend on the limit.
    """
    limit = None if request.holdout and not streaming else request.limit
    preset = get_preset(request.spec)
    if preset is not None and preset.path is None:
        loaded = preset.load_split(request.split, limit, request.seed)
        account = Validation(request.spec, notes)
        account.total, account.kept, account.skipped = loaded.total, len(loaded.examples), Counter(loaded.skipped)
        notes.extend(loaded.notes)
        return iter(loaded.examples), account
    fixed = None if request.fmt == "auto" else request.fmt
    expected: int | None = None
    if preset is not None and preset.path is not None:
        path = preset.path()
        label, records = path.name, read_records(path, path.name, request.split, notes)
        policy = "skip"  # a built-in set's bad records are not the user's to fix
    else:
        opened = open_records(
            request.spec, split=request.split, subset=request.subset, notes=notes, streaming=streaming
        )
        label, records, policy = opened.label, opened.records, request.on_bad_record
        expected = opened.size
    account = Validation(label, notes, expected)
    return validate_records(records, account, fixed, policy, limit, request.require_response), account


class Encoder:
    """The batched ``map`` function: normalized rows to token ids, labels and drop codes (picklable)."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        examples = [to_example({"messages": m, "meta": "{}"}) for m in batch["messages"]]
        results, mismatched = encode_batch(self.tokenizer, examples, self.max_length)
        ids: list[list[int]] = []
        labels: list[list[int]] = []
        drops: list[int] = []
        for result in results:
            if isinstance(result, str):
                ids.append([])
                labels.append([])
                drops.append(DROP_REASONS.index(result))
            else:
                ids.append(result["input_ids"])
                labels.append(result["labels"])
                drops.append(0)
        # the batch's count of prompt/answer boundary mismatches rides on its first row (summed later)
        counts = [mismatched] + [0] * (len(results) - 1)
        return {"input_ids": ids, "labels": labels, "drop": drops, "mismatched": counts}


def tokenized_features() -> Any:
    """The columns of a tokenized table."""
    import datasets

    return datasets.Features(
        {
            "input_ids": datasets.List(datasets.Value("int32")),
            "labels": datasets.List(datasets.Value("int32")),
            "drop": datasets.Value("int8"),
            "mismatched": datasets.Value("int32"),
        }
    )
