"""Batch collators for tokenized examples (``input_ids`` + ``labels``).

:class:`PaddingCollator` pads a batch to its longest example; :func:`packing_collator` returns
transformers' padding-free collator, which concatenates a batch into one row whose
``position_ids`` restart at every example (attention kernels that read them keep examples apart).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

from neftune.data.template import IGNORE_INDEX


class PaddingCollator:
    """Pad ``input_ids`` with ``pad_token_id`` and ``labels`` with -100; add ``attention_mask``.

    Features without ``labels`` get labels equal to their ``input_ids``.  ``padding_side`` is
    ``"right"`` for training and ``"left"`` for batched generation.
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right") -> None:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        ids = [torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features]
        labels = [torch.as_tensor(f["labels"] if "labels" in f else f["input_ids"], dtype=torch.long) for f in features]
        mask = [torch.ones(len(x), dtype=torch.long) for x in ids]
        side = self.padding_side
        return {
            "input_ids": pad_sequence(ids, True, self.pad_token_id, padding_side=side),
            "attention_mask": pad_sequence(mask, True, 0, padding_side=side),
            "labels": pad_sequence(labels, True, IGNORE_INDEX, padding_side=side),
        }


def packing_collator() -> Any:
    """transformers' ``DataCollatorWithFlattening`` with ``position_ids`` (padding-free batches).

    The batch is one row; each example's first label is -100 so no example is trained to
    continue the previous one.
    """
    from transformers import DataCollatorWithFlattening

    return DataCollatorWithFlattening(return_position_ids=True)
