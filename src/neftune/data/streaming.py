"""Streaming training data (``data.streaming``): read, validated, shuffled and tokenized on the fly.

For sets larger than memory or disk.  The records come from the same readers and validation as the
cached pipeline (:func:`neftune.data.rows.examples_of`; a hub data set is opened with
``streaming=True``), become a ``datasets.IterableDataset`` and are tokenized batch by batch as the
Trainer draws them; the padding-free collator packs each batch into one row as usual.

What streaming gives up, and says in docs/data.md:

* **a known epoch length**: training needs ``train.max_steps``; when the stream ends first it
  starts again (a new epoch, reshuffled);
* **an exact shuffle**: examples are shuffled within a buffer of ``data.shuffle_buffer``;
* **a resume position**: ``--resume`` replays the stream from its start and skips the batches
  already trained on, which is exact when the source yields the same records in the same order
  (a local file, a hub data set at a fixed revision) and costs the time to read them again;
* **a cache**: nothing is stored, so every run reads and tokenizes again;
* **counts up front**: skipped and dropped records are counted as they are read.

An automatic held-out split (``data.eval_size``, a count) holds out the first usable examples.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Any

from neftune.data.formats import Validation
from neftune.data.rows import DROP_REASONS, Encoder, Request, examples_of, to_row, tokenized_features
from neftune.data.template import encode_batch

__all__ = ["StreamAccount", "stream_training_rows"]


class StreamAccount:
    """Records read, skipped and dropped so far by a stream (filled in while training reads it)."""

    def __init__(self) -> None:
        self.validation: Validation | None = None
        self.dropped: Counter[str] = Counter()
        self.heldout = 0

    def report(self) -> dict[str, Any]:
        """The counts so far, in ``train_summary.json``'s names."""
        account = self.validation
        return {
            "train_records_read": account.total if account else 0,
            "train_examples_read": account.kept - self.heldout if account else 0,
            "train_skipped": dict(account.skipped) if account else {},
            "train_dropped": dict(self.dropped),
        }


def stream_training_rows(
    request: Request, tokenizer: Any, max_length: int, *, seed: int, shuffle_buffer: int
) -> tuple[Any, list[dict[str, Any]], StreamAccount]:
    """The training rows as an ``IterableDataset``, the held-out rows of an automatic split (a count
    of first examples), and the account the stream fills in."""
    import datasets

    account = StreamAccount()
    held_count = int(request.holdout or 0)
    eval_rows: list[dict[str, Any]] = []
    if held_count:
        examples, _ = examples_of(replace(request, holdout=None, limit=held_count), [], streaming=True)
        held = list(examples)
        results, _ = encode_batch(tokenizer, held, max_length)
        eval_rows = [r for r in results if not isinstance(r, str)]
    account.heldout = held_count

    def rows() -> Any:
        notes: list[str] = []
        limit = None if request.limit is None else request.limit + held_count
        examples, validation = examples_of(replace(request, holdout=None, limit=limit), notes, streaming=True)
        account.validation = validation
        for number, example in enumerate(examples):
            if number >= held_count:
                yield to_row(example)

    encoder = Encoder(tokenizer, max_length)

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        out = encoder(batch)
        account.dropped.update(DROP_REASONS[code] for code in out["drop"] if code)
        return out

    stream = datasets.IterableDataset.from_generator(rows)
    stream = stream.shuffle(seed=seed, buffer_size=shuffle_buffer)
    stream = stream.map(encode, batched=True, batch_size=256, remove_columns=["messages", "meta"])
    stream = stream.cast(tokenized_features())
    stream = stream.filter(lambda row: row["drop"] == 0).select_columns(["input_ids", "labels"])
    return stream, eval_rows, account
