"""Test helpers: observe the embeddings a model's first decoder layer actually receives."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    raise AssertionError("no decoder layers found")


@contextlib.contextmanager
def record_noise(model: nn.Module) -> Iterator[list[dict]]:
    """Record, for every forward, ``noise = hidden_states entering layer 0 - clean embedding``.

    The clean embedding is recomputed from the embedding weights and the token ids of the call, so
    the recording is independent of any hook under test.
    """
    records: list[dict] = []
    embedding = model.get_input_embeddings()
    current: dict = {}

    def capture_ids(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        current["input_ids"] = ids
        current["training"] = module.training

    def capture_hidden(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        ids = current["input_ids"]
        with torch.no_grad():
            clean = embedding.weight[ids].to(hidden.dtype)
            records.append({"noise": (hidden.detach() - clean).float(), "input_ids": ids, "training": current["training"]})

    handles = [
        embedding.register_forward_pre_hook(capture_ids, with_kwargs=True),
        decoder_layers(model)[0].register_forward_pre_hook(capture_hidden, with_kwargs=True),
    ]
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


def hook_count(model: nn.Module) -> int:
    """Number of forward (pre-)hooks on all modules of ``model``."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
