"""Attach per-example NEFTune noise to a model with two hooks, and take it off again.

An embedding's forward hook only sees token ids, but per-example scaling needs to know where
each example starts and ends.  So a forward pre-hook on the model (``with_kwargs=True``) captures
``attention_mask``, ``position_ids`` and ``cu_seq_lens_q`` from the call, and the forward hook on
the input embedding reads them to scale the noise (see :mod:`neftune.noise`).  Noise is added only
while the embedding module is in training mode, so ``model.eval()`` and generation are untouched.
A PEFT model running as its own reference (adapter disabled, as preference trainers do) gets no
noise either (:mod:`neftune.reference`).

Vision-language models: the positions of image/video/audio placeholder tokens (whose embeddings the
model replaces with the encoder's features) get no noise and do not count in ``L``; only text does
(:func:`multimodal_token_ids`).

Models that scale their embeddings (Gemma's ``embed_scale = sqrt(d)``, MiniCPM's ``scale_emb``) do
so inside the embedding module in transformers 5, so its output, where the noise is added, is what
the first transformer block receives: the paper's rule (alpha/sqrt(L*d) added to the first block's
input) holds as it stands, and the noise is 1/scale as large relative to the embeddings as it would
be on the unscaled table.  :func:`embedding_scale` reads the factor, for reports such as
``neftune audit``.

Works on transformers models, PEFT models, and models wrapped by DDP, FSDP, ``torch.compile`` or
accelerate; any other ``nn.Module`` works with ``embedding=`` pointing at the module whose output
are the input embeddings.

Randomness: every noised forward draws from a private generator seeded from
``(seed, rank, step, micro-batch index)``.  The same seed gives the same noise, ranks differ, and a
run resumed at step N draws exactly the noise the uninterrupted run drew there (the Trainer
callback sets ``step``).
"""

from __future__ import annotations

import hashlib
import inspect
import os
from typing import Any

import torch
from torch import nn

from neftune.choices import Distribution
from neftune.noise import check_alpha, noisy_embeddings
from neftune.reference import policy_probe

_HANDLE_ATTR = "_neftune_handle"
_CONTEXT_KEYS = ("attention_mask", "position_ids", "cu_seq_lens_q", "cu_seqlens", "cu_seq_lens", "input_ids")
# config attributes naming the placeholder tokens a multimodal model replaces with image/video/audio features
_PLACEHOLDER_KEYS = tuple(
    f"{kind}_token_{suffix}" for kind in ("image", "video", "audio") for suffix in ("id", "index")
)


class NEFTuneHandle:
    """Live NEFTune hooks on one model.  ``remove()`` (idempotent) or use as a context manager."""

    def __init__(
        self,
        root: nn.Module,
        embedding: nn.Module,
        alpha: float,
        distribution: Distribution,
        seed: int,
        rank: int,
    ) -> None:
        self.alpha = alpha
        self.distribution: Distribution = distribution
        self.seed = seed
        self.rank = rank
        self.step = 0
        self.micro_step = 0
        self.embedding = embedding
        self.root = root
        self._context: dict[str, Any] = {}
        self._generators: dict[torch.device, torch.Generator] = {}
        self._signature: inspect.Signature | None = None
        # None for a model that cannot run as its own reference (see neftune.reference)
        self._is_policy = policy_probe(root)
        self.placeholder_ids = multimodal_token_ids(root)
        self._handles = [
            root.register_forward_pre_hook(self._capture, with_kwargs=True),
            root.register_forward_hook(self._release, always_call=True),
            embedding.register_forward_hook(self._add_noise),
        ]
        setattr(embedding, _HANDLE_ATTR, self)

    @property
    def attached(self) -> bool:
        """True until :meth:`remove` is called."""
        return bool(self._handles)

    def set_step(self, step: int) -> None:
        """Key the noise of the following forward passes to optimizer step ``step``."""
        if step != self.step:
            self.step = int(step)
            self.micro_step = 0

    def remove(self) -> None:
        """Remove every hook this handle added; the model then behaves as if never attached."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._context = {}
        if getattr(self.embedding, _HANDLE_ATTR, None) is self:
            delattr(self.embedding, _HANDLE_ATTR)

    def __enter__(self) -> NEFTuneHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "attached" if self.attached else "removed"
        return f"NEFTuneHandle(alpha={self.alpha}, distribution={self.distribution!r}, seed={self.seed}, {state})"

    # -- hooks -------------------------------------------------------------------------------

    def _capture(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        context = {key: kwargs[key] for key in _CONTEXT_KEYS if kwargs.get(key) is not None}
        if args:  # positional call, e.g. model(input_ids, attention_mask): map by signature
            if self._signature is None:
                self._signature = inspect.signature(module.forward)
            try:
                bound = self._signature.bind_partial(*args, **kwargs).arguments
            except TypeError:
                bound = {}
            context.update({k: bound[k] for k in _CONTEXT_KEYS if bound.get(k) is not None})
        self._context = context

    def _release(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self._context = {}

    def _add_noise(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> torch.Tensor | None:
        if not module.training or self.alpha == 0.0:
            return None
        if self._is_policy is not None and not self._is_policy():
            return None  # a PEFT model's reference forward (adapter disabled or "ref" active): no noise
        if not torch.is_tensor(output) or not output.is_floating_point():
            raise TypeError(
                f"NEFTune expects the input embedding {type(module).__name__} to return a float tensor, "
                f"got {output.dtype if torch.is_tensor(output) else type(output).__name__}"
            )
        ctx = self._context
        mask = ctx.get("attention_mask")
        if mask is not None and (mask.dim() != 2 or tuple(mask.shape) != tuple(output.shape[:2])):
            mask = None  # 4-D or custom masks carry no per-row padding we can read reliably
        cu = ctx.get("cu_seq_lens_q", ctx.get("cu_seqlens", ctx.get("cu_seq_lens")))
        if self.placeholder_ids:
            mask = self._text_mask(args, output, mask)
        generator = self._generator(output.device)
        self.micro_step += 1
        return noisy_embeddings(
            output,
            self.alpha,
            attention_mask=mask,
            position_ids=ctx.get("position_ids"),
            cu_seq_lens=cu,
            distribution=self.distribution,
            generator=generator,
        )

    def _text_mask(self, args: tuple[Any, ...], output: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
        """``mask`` with the multimodal placeholder positions zeroed: they get no noise and do not count in L.

        The ids are the model call's ``input_ids`` (some models hand the embedding a copy with the
        placeholders replaced), else the embedding's own input.
        """
        ids = self._context.get("input_ids")
        if not torch.is_tensor(ids) or tuple(ids.shape) != tuple(output.shape[:2]):
            ids = args[0] if args and torch.is_tensor(args[0]) else None
        if ids is None or tuple(ids.shape) != tuple(output.shape[:2]):
            return mask
        placeholders = torch.tensor(self.placeholder_ids, device=ids.device)
        text = ~torch.isin(ids, placeholders)
        return text.long() if mask is None else (mask.to(text.device) != 0) & text

    def _generator(self, device: torch.device) -> torch.Generator:
        generator = self._generators.get(device)
        if generator is None:
            generator = self._generators[device] = torch.Generator(device=device)
        key = f"{self.seed}:{self.rank}:{self.step}:{self.micro_step}".encode()
        generator.manual_seed(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1)
        return generator


def attach(
    model: nn.Module,
    alpha: float,
    *,
    embedding: nn.Module | None = None,
    distribution: Distribution = "uniform",
    seed: int | None = None,
) -> NEFTuneHandle:
    """Add per-example NEFTune noise to ``model``'s input embeddings while it is training.

    Args:
        model: a transformers or PEFT model, possibly wrapped by DDP/FSDP/accelerate/compile,
            or any ``nn.Module`` when ``embedding`` is given.
        alpha: noise scale (the paper uses 5, 10, 15); 0 attaches hooks that add nothing.
        embedding: the module producing the input embeddings; found automatically if omitted.
        distribution: ``"uniform"`` (the paper) or ``"gaussian"`` (its ablation).
        seed: base seed of the noise stream; if omitted, one is drawn from torch's global RNG.

    Returns:
        a :class:`NEFTuneHandle`; call ``remove()`` or use it in a ``with`` block.

    Raises:
        ValueError: bad ``alpha`` or ``distribution``, no input embedding found, or NEFTune
            already attached (by neftune or by transformers' ``neftune_noise_alpha``).
    """
    alpha = check_alpha(alpha)
    if distribution not in ("uniform", "gaussian"):
        raise ValueError(f"distribution must be 'uniform' or 'gaussian', got {distribution!r}")
    root = unwrap_model(model)
    if embedding is None:
        embedding = find_input_embedding(root)
    if isinstance(getattr(embedding, _HANDLE_ATTR, None), NEFTuneHandle):
        raise ValueError("NEFTune is already attached to this model; remove() the first handle before attaching again")
    if hasattr(embedding, "neftune_noise_alpha"):
        raise ValueError(
            "this model already carries transformers' own NEFTune hook (neftune_noise_alpha is set on the "
            "Trainer); unset neftune_noise_alpha so the noise is not added twice"
        )
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    return NEFTuneHandle(root, embedding, alpha, distribution, int(seed), distributed_rank())


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP/FSDP/DataParallel/``torch.compile`` wrappers (PEFT models are kept: they forward)."""
    while True:
        inner = getattr(model, "_orig_mod", None)  # torch.compile
        if isinstance(inner, nn.Module):
            model = inner
            continue
        wrapped = getattr(model, "module", None)
        if isinstance(wrapped, nn.Module) and (
            isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel))
            or type(model).__name__ == "FullyShardedDataParallel"
        ):
            model = wrapped
            continue
        return model


def find_input_embedding(model: nn.Module) -> nn.Module:
    """Return the input embedding module of a transformers/PEFT model, or raise ``ValueError``."""
    getter = getattr(model, "get_input_embeddings", None)
    embedding = None
    if callable(getter):
        try:
            embedding = getter()
        except (NotImplementedError, AttributeError):
            embedding = None
    if not isinstance(embedding, nn.Module):
        raise ValueError(
            f"could not find the input embedding of {type(model).__name__}: it has no get_input_embeddings(); "
            "pass embedding=<the nn.Module whose output are the input embeddings>"
        )
    return embedding


def multimodal_token_ids(model: nn.Module) -> tuple[int, ...]:
    """Ids of the image/video/audio placeholder tokens of a multimodal model's config (empty for text models).

    A vision-language model merges its image features into the input embeddings at these positions;
    NEFTune is about text embeddings, so they get no noise and do not count in an example's length.
    """
    config = getattr(model, "config", None)
    found: set[int] = set()
    for key in _PLACEHOLDER_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            found.add(value)
    return tuple(sorted(found))


def embedding_scale(embedding: nn.Module) -> float:
    """The factor ``embedding`` multiplies its looked-up rows by (Gemma: sqrt(d)); 1.0 for a plain embedding.

    Reads transformers' ``scalar_embed_scale``/``embed_scale`` attributes, also through a PEFT
    wrapper's ``base_layer``.
    """
    for module in (embedding, getattr(embedding, "base_layer", None)):
        if module is None:
            continue
        for name in ("scalar_embed_scale", "embed_scale"):
            value = getattr(module, name, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if torch.is_tensor(value) and value.numel() == 1 and value.device.type != "meta":
                return float(value.item())
    return 1.0


def distributed_rank() -> int:
    """This process's global rank (0 when not distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))
