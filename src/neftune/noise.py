"""NEFTune noise, per example: the whole method in one pure-torch function.

    noisy = X + (alpha / sqrt(L_i * d)) * eps,    eps ~ U(-1, 1)

``d`` is the embedding width and ``L_i`` the number of real tokens of the example a token belongs
to (prompt + response, padding excluded).  Padding tokens get exactly zero noise.  A row may hold
one example (padded batches) or several (padding-free packing); segments are read from
``cu_seq_lens`` when given, else from ``position_ids`` restarting, else the row is one example.

Trainers that copied the paper's README snippet use the padded or packed *row* length for ``L``: in
a packed row of T tokens an example of length L_i then gets ``alpha * sqrt(L_i / T)`` instead of
``alpha``.  This module is what the paper's own training code did, generalised to packing.

``distribution="gaussian"`` (the paper's ablation) draws ``eps ~ N(0, 1)`` with the same
multiplier, so each coordinate has standard deviation ``alpha / sqrt(L_i * d)`` (sqrt(3) times the
uniform noise's standard deviation) and no bound.
"""

from __future__ import annotations

import math

import torch

from neftune.choices import Distribution


def check_alpha(alpha: float) -> float:
    """Return ``alpha`` as a float, or raise ``ValueError`` if it is negative, NaN or infinite."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a number, got {type(alpha).__name__} {alpha!r}")
    alpha = float(alpha)
    if not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha}")
    return alpha


def example_lengths(
    shape: tuple[int, int],
    *,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    cu_seq_lens: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Return a ``(batch, seq)`` float tensor: for each token, the real length of its example.

    Padding tokens (``attention_mask == 0``, or past ``cu_seq_lens[-1]``) get length 0.
    ``cu_seq_lens`` holds cumulative example boundaries over the flattened batch, as produced by
    padding-free collators (``[0, l1, l1 + l2, ...]``).  ``position_ids`` start a new example
    wherever they do not continue the previous token's position by exactly one, which covers
    restarts at 0 and the constant position ids that generation gives left padding.
    """
    batch, seq = shape
    n_tokens = batch * seq
    index = torch.arange(n_tokens, device=device)
    valid = torch.ones(n_tokens, dtype=torch.bool, device=device)
    if attention_mask is not None:
        if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, seq):
            raise ValueError(
                f"attention_mask must have shape (batch, seq) = {(batch, seq)}, got {tuple(attention_mask.shape)}"
            )
        valid &= attention_mask.reshape(-1).to(device=device) != 0

    if cu_seq_lens is not None:
        bounds = cu_seq_lens.reshape(-1).to(device=device, dtype=torch.long)
        segment = torch.searchsorted(bounds[1:], index, right=True)
        valid &= index < bounds[-1]
        segment = segment.clamp(max=max(bounds.numel() - 2, 0))
    elif position_ids is not None:
        pos = position_ids.to(device=device).expand(batch, seq)
        starts = torch.ones(batch, seq, dtype=torch.bool, device=device)
        starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
        segment = starts.reshape(-1).cumsum(0) - 1
    else:
        segment = index // seq

    counts = torch.zeros(n_tokens, device=device).index_add_(0, segment, valid.float())
    return torch.where(valid, counts[segment], 0.0).reshape(batch, seq)


def noisy_embeddings(
    embeddings: torch.Tensor,
    alpha: float,
    *,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    cu_seq_lens: torch.Tensor | None = None,
    distribution: Distribution = "uniform",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Return ``embeddings`` (batch, seq, d) plus NEFTune noise scaled per example.

    The noise is drawn in fp32 (fp64 for fp64 inputs), added at that precision and the sum cast
    back to the embeddings' dtype.  It
    does not require grad, so gradients flow to the embeddings unchanged and autograd keeps no
    extra tensor alive.  ``alpha == 0`` returns ``embeddings`` itself.
    """
    alpha = check_alpha(alpha)
    if distribution not in ("uniform", "gaussian"):
        raise ValueError(f"distribution must be 'uniform' or 'gaussian', got {distribution!r}")
    if not torch.is_tensor(embeddings) or not embeddings.is_floating_point():
        raise TypeError(f"NEFTune needs floating-point embeddings, got {_describe(embeddings)}")
    if embeddings.dim() == 2:  # a single unbatched sequence
        return noisy_embeddings(
            embeddings[None],
            alpha,
            attention_mask=_unsqueeze(attention_mask),
            position_ids=_unsqueeze(position_ids),
            cu_seq_lens=cu_seq_lens,
            distribution=distribution,
            generator=generator,
        )[0]
    if embeddings.dim() != 3:
        raise ValueError(f"embeddings must have shape (batch, seq, d), got {tuple(embeddings.shape)}")
    if alpha == 0.0:
        return embeddings

    batch, seq, width = embeddings.shape
    lengths = example_lengths(
        (batch, seq),
        attention_mask=attention_mask,
        position_ids=position_ids,
        cu_seq_lens=cu_seq_lens,
        device=embeddings.device,
    )
    # alpha / sqrt(L * d) per token; 0 on padding (clamp only avoids dividing by zero there).
    scale = torch.where(lengths > 0, alpha / torch.sqrt(lengths.clamp(min=1) * width), 0.0)

    compute = torch.promote_types(embeddings.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
    eps = torch.empty(embeddings.shape, device=embeddings.device, dtype=compute)
    if distribution == "uniform":
        eps.uniform_(-1.0, 1.0, generator=generator)
    else:
        eps.normal_(0.0, 1.0, generator=generator)
    # one fused pass: embeddings + eps * scale, in fp32, then back to the embeddings' dtype
    return torch.addcmul(embeddings.to(compute), eps, scale.to(compute).unsqueeze(-1)).to(embeddings.dtype)


def _unsqueeze(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None or t.dim() != 1 else t[None]


def _describe(x: object) -> str:
    if torch.is_tensor(x):
        return f"a tensor of dtype {x.dtype}"
    return type(x).__name__
