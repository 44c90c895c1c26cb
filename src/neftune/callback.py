"""``NEFTuneCallback``: per-example NEFTune inside any transformers ``Trainer`` or TRL ``SFTTrainer``.

    trainer = SFTTrainer(..., callbacks=[NEFTuneCallback(alpha=5.0)])

The hooks live only inside each optimizer step: the callback attaches them at ``on_step_begin``
and removes them once the step's forward and backward passes are done (``on_pre_optimizer_step``,
and again at ``on_step_end`` and ``on_train_end``).  So evaluation, logging and checkpointing
inside ``train()`` never see them, and an exception raised anywhere outside a step's forward or
backward pass (in any callback, while saving or evaluating) leaves no hook behind.  Noise is keyed
to ``state.global_step``, so a resumed run draws the noise the uninterrupted run would have drawn.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from neftune.attach import NEFTuneHandle, attach
from neftune.choices import Distribution
from neftune.noise import check_alpha


class NEFTuneCallback(TrainerCallback):
    """Add per-example NEFTune noise during ``Trainer.train()``.

    Args:
        alpha: noise scale (0 disables the noise but keeps the callback harmless).
        distribution: ``"uniform"`` (default, the paper) or ``"gaussian"``.
        seed: noise seed; defaults to the Trainer's ``args.seed``.
        embedding: the input-embedding module, for models without ``get_input_embeddings()``.

    An exception raised inside a step's forward or backward pass (out of memory, Ctrl-C) can leave
    that step's hooks on the model until the next ``train()`` or :meth:`remove`; they add noise only
    in training mode, so evaluation and generation are unaffected.  To remove them however
    ``train()`` exits, use the callback as a context manager::

        with callback:
            trainer.train()
    """

    def __init__(
        self,
        alpha: float = 5.0,
        *,
        distribution: Distribution = "uniform",
        seed: int | None = None,
        embedding: nn.Module | None = None,
    ) -> None:
        self.alpha = check_alpha(alpha)
        if distribution not in ("uniform", "gaussian"):
            raise ValueError(f"distribution must be 'uniform' or 'gaussian', got {distribution!r}")
        self.distribution: Distribution = distribution
        self.seed = seed
        self.embedding = embedding
        self.handle: NEFTuneHandle | None = None
        self._model: nn.Module | None = None
        self._seed = 0

    # The Trainer hands a callback neither itself nor an exception event, so a callback cannot wrap
    # train() in try/finally (short of walking the call stack to find the Trainer); keeping the hooks
    # inside each step is what makes an exception elsewhere in train() leave none behind.

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.remove()  # hooks left by a train() that raised mid-step must not stay or double up
        model = kwargs.get("model")
        if model is None:
            raise ValueError("NEFTuneCallback needs the Trainer to pass the model to on_train_begin")
        self._model = model
        self._seed = self.seed if self.seed is not None else args.seed
        self._attach(state.global_step)  # a model NEFTune cannot attach to fails here, before any step
        self.remove()

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.handle is None:
            self._attach(state.global_step)
        else:  # a later micro-batch of gradient accumulation: the step's hooks are still on
            self.handle.set_step(state.global_step)

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.remove()  # forward and backward of every micro-batch of this step are done

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.remove()

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.remove()
        self._model = None

    def remove(self) -> None:
        """Remove the hooks if attached (idempotent)."""
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def __enter__(self) -> NEFTuneCallback:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.remove()

    def _attach(self, step: int) -> None:
        if self._model is None:
            raise ValueError("NEFTuneCallback: a step began before on_train_begin")
        self.handle = attach(
            self._model, self.alpha, embedding=self.embedding, distribution=self.distribution, seed=self._seed
        )
        self.handle.set_step(step)
