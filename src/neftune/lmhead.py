"""The LM head and the cross-entropy only where there are labels, in chunks.

A causal LM's forward runs the LM head at every position and its loss takes a log-softmax over the
whole vocabulary there, although instruction data labels only the answer: prompt tokens carry -100.
With this module attached, a forward that receives ``labels``

1. shifts the labels exactly as transformers' ``ForCausalLMLoss`` does (position t predicts label
   t + 1; ``shift_labels`` is used as given), so a packed row, whose collator sets each example's
   first label to -100 (``DataCollatorWithFlattening``), never trains one example's last token to
   predict the next example's first;
2. runs the model's own forward with ``logits_to_keep`` selecting a handful of those positions, and
   takes the decoder's last hidden states from a forward hook on the decoder;
3. computes the summed cross-entropy of the labelled positions with :class:`LinearCrossEntropy`,
   ``CHUNK_ELEMENTS`` logits at a time: each chunk's logits exist only inside the loop, and the
   gradients with respect to the hidden states and the head's weight are accumulated there, so the
   full ``tokens x vocabulary`` logits tensor (8.6 GB in fp32 for 8 x 2,048 tokens at a 128K
   vocabulary) is never made;
4. divides by ``num_items_in_batch`` when the Trainer passes it (gradient accumulation then averages
   over every labelled token of the optimizer step, as with the model's own loss), else by the
   number of labelled positions.

The output carries the loss and no logits.  Without ``labels`` (generation, scoring) the model runs
untouched.  The result equals the model's own loss and gradients (``tests/test_lmhead.py``).

Nothing is silently assumed about the model: :func:`attach` raises :class:`~neftune.errors.ModelError`
unless the forward takes ``labels`` and ``logits_to_keep``, the loss is transformers'
``ForCausalLMLoss`` and the head is a plain ``nn.Linear``; and every forward compares the logits the
model itself returned at the kept positions with the head applied to the captured hidden states, so a
model that changes its logits after the head (soft-capping, scaling, a wrapped head) fails loudly.

    handle = neftune.lmhead.attach(model)      # a transformers or PEFT causal LM
    ...train...
    handle.remove()
"""

from __future__ import annotations

import inspect
import os
from typing import Any, cast

import torch
from torch import nn

from neftune.errors import ConfigError, ModelError

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 2**25
"""Logits per chunk (rows x vocabulary): 128 MiB in fp32, 682 rows at SmolLM2's 49,152 tokens, 261 at 128,256
(measured on 2 CPU cores: smaller chunks run the head's matmuls slower)."""
CHECK_ROWS = 4
"""Labelled positions per forward whose logits the model computes itself, to check ours against."""
LOSS_CHOICES = ("auto", "labelled", "full")
_SCALING_FIELDS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
_TURN_OFF = "set train.loss=full to use the model's own loss"


class LinearCrossEntropy(torch.autograd.Function):
    """``sum_i CE(hidden_i @ weight.T + bias, target_i)`` without keeping the logits.

    The forward pass walks over chunks of rows; for each it computes the logits (in the weight's
    dtype, then fp32, as transformers' loss upcasts them), their log-sum-exp, and the gradient of
    the summed loss with respect to the logits (softmax minus one-hot), which it folds at once into
    the gradients of ``hidden``, ``weight`` and ``bias`` that autograd asks for.  Backward only scales
    those by the incoming gradient, so the head costs the same three matmuls as the unchunked path
    (two when the weight is frozen) and nothing of vocabulary width survives a chunk.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        chunk_rows: int,
    ) -> torch.Tensor:
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b and bias is not None else None
        hidden = hidden.to(weight.dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_rows):
                h = hidden[start : start + chunk_rows]
                target = targets[start : start + chunk_rows]
                logits = nn.functional.linear(h, weight, bias).float()
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse - logits.gather(1, target[:, None]).squeeze(1)).sum()
                if grad_h is None and grad_w is None and grad_b is None:
                    continue
                grad = logits.sub_(lse[:, None]).exp_()  # softmax in place: the chunk's one vocabulary-wide buffer
                grad[torch.arange(grad.shape[0], device=grad.device), target] -= 1.0
                if grad_b is not None:
                    grad_b += grad.sum(0)
                grad = grad.to(weight.dtype)
                if grad_h is not None:
                    grad_h[start : start + chunk_rows] = grad @ weight
                if grad_w is not None and grad_w.dtype == grad.dtype:
                    grad_w.addmm_(grad.t(), h)
                elif grad_w is not None:
                    grad_w += grad.t() @ h
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in (grad_h, grad_w, grad_b)))
        ctx.present = (grad_h is not None, grad_w is not None, grad_b is not None)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grads: list[torch.Tensor | None] = []
        for saved, present, dtype in zip(ctx.saved_tensors, ctx.present, ctx.dtypes, strict=True):
            grads.append((saved * grad_total).to(dtype) if present else None)
        return grads[0], grads[1], grads[2], None, None


def linear_cross_entropy_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Summed cross-entropy of ``hidden @ weight.T + bias`` against ``targets`` (no ignored entries),
    computed ``chunk_rows`` rows at a time (default: ``CHUNK_ELEMENTS`` logits per chunk)."""
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
    if not torch.is_grad_enabled():  # evaluation: no gradient work in the forward pass
        hidden, weight = hidden.detach(), weight.detach()
        bias = None if bias is None else bias.detach()
    return LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_rows)


def shifted_targets(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Position t's target is label t + 1; the last position of every row predicts nothing
    (transformers' ``ForCausalLMLoss``, which packed rows rely on through their first label)."""
    return nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def loss_wanted(setting: str) -> bool:
    """Whether ``train.loss`` (``auto``, ``labelled`` or ``full``) asks for the labelled-only loss.

    ``auto`` turns it on on CPU, where it is measured faster (BENCHMARKS.md), and leaves the model's
    own loss on CUDA until it is measured there.  Under FSDP or DeepSpeed the head's weight is
    sharded outside the head's own forward, so ``auto`` keeps the model's loss and ``labelled``
    is refused.
    """
    if setting not in LOSS_CHOICES:
        raise ConfigError(f"train.loss must be one of {', '.join(LOSS_CHOICES)}; got {setting!r}")
    sharded = any(
        os.environ.get(f"ACCELERATE_USE_{name}", "").lower() in ("1", "true") for name in ("FSDP", "DEEPSPEED")
    )
    if setting == "labelled" and sharded:
        raise ConfigError(
            "train.loss=labelled does not support FSDP or DeepSpeed (sharded LM head); use train.loss=full"
        )
    if setting == "auto":
        return not sharded and not torch.cuda.is_available()
    return setting == "labelled"


class LabelledLossHandle:
    """The hooks of :func:`attach` on one causal LM; ``remove()`` (idempotent) or use as a context manager."""

    def __init__(self, causal_lm: nn.Module, decoder: nn.Module, head: nn.Linear) -> None:
        self.causal_lm = causal_lm
        self.head = head
        self.vocab_size = head.out_features
        self._labels_position = list(inspect.signature(causal_lm.forward).parameters).index("labels")
        self._frame: dict[str, Any] | None = None
        self._handles = [
            causal_lm.register_forward_pre_hook(self._before, with_kwargs=True),
            decoder.register_forward_hook(self._capture_hidden),
            causal_lm.register_forward_hook(self._after),
        ]
        causal_lm._neftune_labelled_loss = self  # type: ignore[assignment]  # a marker attribute: attaching twice fails

    @property
    def attached(self) -> bool:
        """True until :meth:`remove` runs."""
        return bool(self._handles)

    def remove(self) -> None:
        """Take the hooks off; the model behaves exactly as before :func:`attach`."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._frame = None
        if getattr(self.causal_lm, "_neftune_labelled_loss", None) is self:
            del self.causal_lm._neftune_labelled_loss

    def __enter__(self) -> LabelledLossHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def _before(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        labels, shift = kwargs.get("labels"), kwargs.get("shift_labels")
        self._frame = None
        if labels is None and shift is None:
            if len(args) > self._labels_position and args[self._labels_position] is not None:
                raise ModelError("labelled-only loss: pass labels by keyword, as Trainer and PEFT do")
            return None
        keep_arg = kwargs.get("logits_to_keep", 0)
        if not (isinstance(keep_arg, int) and keep_arg == 0):
            raise ModelError("labelled-only loss: logits_to_keep cannot be combined with labels; " + _TURN_OFF)
        kwargs = dict(kwargs)
        kwargs.pop("labels", None)
        kwargs.pop("shift_labels", None)
        ignore_index = kwargs.pop("ignore_index", IGNORE_INDEX)
        frame = {"num_items": kwargs.pop("num_items_in_batch", None)}
        targets = shift if shift is not None else shifted_targets(labels, ignore_index)  # type: ignore[arg-type]  # _before returns early when neither labels nor shift_labels is given
        keep = targets != ignore_index
        # the model computes its own logits at the first CHECK_ROWS labelled positions: _after compares them
        check = keep & (keep.reshape(-1).cumsum(0) <= CHECK_ROWS).reshape(keep.shape)
        frame.update(targets=targets[keep], keep=keep, check_rows=int(check.sum()))
        kwargs["logits_to_keep"] = check
        self._frame = frame
        return args, kwargs

    def _capture_hidden(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._frame is not None:
            hidden = getattr(output, "last_hidden_state", None)
            self._frame["hidden"] = hidden if hidden is not None else output[0]

    def _after(self, module: nn.Module, args: tuple, output: Any) -> Any:
        frame, self._frame = self._frame, None
        if frame is None:
            return None
        if not hasattr(output, "items") or "hidden" not in frame:
            raise ModelError(
                f"labelled-only loss: {type(module).__name__} returned {type(output).__name__} "
                f"{'without running its decoder' if hasattr(output, 'items') else '(return_dict=False?)'}; " + _TURN_OFF
            )
        weight, bias = self.head.weight, self.head.bias
        if weight.dim() != 2 or weight.shape[0] != self.vocab_size:
            raise ModelError(
                f"labelled-only loss: the LM head's weight has shape {tuple(weight.shape)} outside its forward "
                "(sharded by FSDP or DeepSpeed?); " + _TURN_OFF
            )
        hidden = frame["hidden"][frame["keep"]]
        self._check(output.get("logits"), hidden[: frame["check_rows"]], weight, bias)
        total = linear_cross_entropy_sum(hidden, weight, frame["targets"].to(hidden.device), bias)
        count = frame["num_items"]
        if count is None:
            count = hidden.shape[0]
        elif torch.is_tensor(count):
            count = count.to(total.device)
        fields = {key: value for key, value in output.items() if key not in ("loss", "logits")}
        return type(output)(loss=total / count, **fields)

    def _check(
        self, logits: torch.Tensor | None, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> None:
        """The model's own logits at the checked positions must be the head applied to our hidden states."""
        if hidden.shape[0] == 0:
            return
        with torch.no_grad():
            ours = nn.functional.linear(hidden, weight, bias).float()
        tol = 1e-3 if logits is not None and logits.dtype == torch.float32 else 3e-2
        theirs = None if logits is None else logits.detach().reshape(-1, logits.shape[-1]).float()
        if theirs is None or theirs.shape != ours.shape or not torch.allclose(theirs, ours, rtol=tol, atol=tol):
            found = "no logits" if theirs is None else f"logits of shape {tuple(theirs.shape)}"
            if theirs is not None and theirs.shape == ours.shape:
                found = f"logits differing by up to {(theirs - ours).abs().max().item():.3g}"
            raise ModelError(
                f"labelled-only loss: {type(self.causal_lm).__name__} returned {found} where its LM head on the "
                f"last hidden states gives {tuple(ours.shape)}: it changes the logits after the head; " + _TURN_OFF
            )


def causal_lm_of(model: nn.Module) -> nn.Module:
    """The transformers ``*ForCausalLM`` inside ``model`` (DDP, compile and PEFT wrappers removed)."""
    from neftune.attach import unwrap_model

    model = unwrap_model(model)
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def attach(model: nn.Module) -> LabelledLossHandle:
    """Compute ``model``'s loss only at labelled positions, in chunks, whenever it is called with labels.

    Args:
        model: a transformers causal LM, or a PEFT model around one, possibly wrapped by DDP or
            ``torch.compile``.

    Returns:
        a :class:`LabelledLossHandle`; ``remove()`` restores the model's own loss.

    Raises:
        ModelError: the model is not a causal LM whose forward and loss this module knows (see the
            module docstring), or the loss is already attached.
    """
    from transformers.loss.loss_utils import ForCausalLMLoss

    causal_lm = causal_lm_of(model)
    name = type(causal_lm).__name__
    if isinstance(getattr(causal_lm, "_neftune_labelled_loss", None), LabelledLossHandle):
        raise ModelError(f"labelled-only loss is already attached to {name}; remove() the first handle")
    params = inspect.signature(causal_lm.forward).parameters
    missing = [p for p in ("labels", "logits_to_keep") if p not in params]
    if missing or not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        raise ModelError(
            f"labelled-only loss: {name}.forward has no {' or '.join(missing) or '**kwargs'} parameter; " + _TURN_OFF
        )
    config = getattr(causal_lm, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise ModelError(f"labelled-only loss supports decoder-only causal LMs, not {name}; " + _TURN_OFF)
    if getattr(causal_lm, "loss_function", None) is not ForCausalLMLoss:
        raise ModelError(f"labelled-only loss: {name}'s loss is not transformers' ForCausalLMLoss; " + _TURN_OFF)
    for field in _SCALING_FIELDS:
        value = getattr(config, field, None)
        if value not in (None, 1, 1.0):
            raise ModelError(f"labelled-only loss: {name} rescales its logits ({field}={value}); " + _TURN_OFF)
    head = cast(Any, causal_lm).get_output_embeddings()  # a transformers method, not an nn.Module attribute
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        raise ModelError(
            f"labelled-only loss needs a plain nn.Linear LM head; {name}'s is {type(head).__name__} "
            "(a LoRA-adapted lm_head?); " + _TURN_OFF
        )
    vocab = getattr(config, "vocab_size", head.out_features)
    if head.out_features != vocab:
        raise ModelError(
            f"labelled-only loss: {name}'s head has {head.out_features} outputs for a vocabulary of {vocab}"
        )
    decoder = cast(Any, causal_lm).get_decoder()
    if decoder is causal_lm or not isinstance(decoder, nn.Module):
        raise ModelError(f"labelled-only loss: cannot find the decoder of {name}; " + _TURN_OFF)
    return LabelledLossHandle(causal_lm, decoder, head)
