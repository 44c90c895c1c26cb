"""Attention for padding-free packed rows that costs sum(L_i^2) instead of T^2.

transformers runs packed rows (``position_ids`` restarting per example) through SDPA with a
block-diagonal T x T mask: correct, but every example attends over the whole row's length and the
masked blocks are computed anyway.  This attention implementation, registered with transformers as
``"neftune_varlen"``, gathers each example of a packed row into its own right-padded sequence and
runs SDPA with ``is_causal=True`` once over the stack of examples.  Anything else (padded batches,
a KV cache, a single example) goes to transformers' own SDPA function unchanged.

    model.set_attn_implementation(neftune.varlen.register())
"""

from __future__ import annotations

from typing import Any

import torch

NAME = "neftune_varlen"


def segment_index(position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """For a packed row ``(1, T)`` return ``(index, valid)`` of shape ``(n_examples, L_max)``.

    ``index[i, j]`` is the row position of token ``j`` of example ``i`` (clamped where ``valid`` is
    False).  Returns None when the row holds a single example (plain causal attention is then exact).
    """
    pos = position_ids[0]
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[1:] = pos[1:] != pos[:-1] + 1
    start_idx = starts.nonzero().flatten()
    if start_idx.numel() <= 1:
        return None
    lengths = torch.diff(start_idx, append=torch.tensor([pos.numel()], device=pos.device))
    offsets = torch.arange(int(lengths.max()), device=pos.device)
    valid = offsets[None, :] < lengths[:, None]
    index = (start_idx[:, None] + offsets[None, :]).clamp(max=pos.numel() - 1)
    return index, valid


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention interface: ``query`` (B, H, T, D) -> output (B, T, H, D)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    segments = None
    if (
        position_ids is not None
        and query.shape[0] == 1
        and query.shape[2] == key.shape[2]
        and position_ids.shape[-1] == query.shape[2]
    ):
        segments = segment_index(position_ids.reshape(1, -1))
    if segments is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )

    index, valid = segments
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    # (1, H, T, D) -> (n, H, L_max, D): one right-padded sequence per example.  With is_causal the
    # padded keys sit after every real query, so no real token ever attends to padding.
    q, k, v = (t[0][:, index].transpose(0, 1) for t in (query, key, value))
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, dropout_p=dropout if module.training else 0.0, is_causal=True, scale=scaling
    )
    # (n, H, L_max, D) -> (n, L_max, H, D) -> keep real tokens, in row order -> (1, T, H, D)
    out = out.transpose(1, 2)[valid]
    return out.unsqueeze(0), None


def register() -> str:
    """Register the implementation (and SDPA's mask builder under its name); return its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(NAME, varlen_attention_forward)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return NAME
