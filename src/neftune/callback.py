"""``NEFTuneCallback``: per-example NEFTune inside any transformers ``Trainer`` or TRL ``SFTTrainer``.

    trainer = SFTTrainer(..., callbacks=[NEFTuneCallback(alpha=5.0)])

The callback attaches at ``on_train_begin`` and removes at ``on_train_end``.  If ``train()`` raises
instead, the hooks are removed as well: when the callback is passed to the Trainer's constructor it
wraps that trainer's ``train`` method (on the instance, the class is not touched) in a
``try/finally``.  Noise is keyed to ``state.global_step``, so a resumed run draws the noise the
uninterrupted run would have drawn.  Evaluation inside training runs with the model in eval mode and
therefore gets no noise.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from neftune.attach import NEFTuneHandle, attach
from neftune.noise import Distribution, check_alpha


class NEFTuneCallback(TrainerCallback):
    """Add per-example NEFTune noise during ``Trainer.train()``.

    Args:
        alpha: noise scale (0 disables the noise but keeps the callback harmless).
        distribution: ``"uniform"`` (default, the paper) or ``"gaussian"``.
        seed: noise seed; defaults to the Trainer's ``args.seed``.
        embedding: the input-embedding module, for models without ``get_input_embeddings()``.
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

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        trainer = _calling_trainer()
        if trainer is not None:
            _guard_train(trainer, self)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self.remove()  # a previous train() that escaped our guard must not leave a second hook
        model = kwargs.get("model")
        if model is None:
            raise ValueError("NEFTuneCallback needs the Trainer to pass the model to on_train_begin")
        seed = self.seed if self.seed is not None else args.seed
        self.handle = attach(model, self.alpha, embedding=self.embedding, distribution=self.distribution, seed=seed)
        self.handle.set_step(state.global_step)

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self.handle is not None:
            self.handle.set_step(state.global_step)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self.remove()

    def remove(self) -> None:
        """Remove the hooks if attached (idempotent)."""
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def _calling_trainer() -> Trainer | None:
    """The Trainer whose ``__init__`` is running ``on_init_end`` (found on the call stack)."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, Trainer):
                return candidate
            frame = frame.f_back
    finally:
        del frame
    return None


def _guard_train(trainer: Trainer, callback: NEFTuneCallback) -> None:
    """Make ``trainer.train`` remove the callback's hooks however it exits."""
    train = trainer.train
    if getattr(train, "_neftune_guarded", None) is callback:
        return

    @functools.wraps(train)
    def guarded_train(*args: Any, **kwargs: Any) -> Any:
        try:
            return train(*args, **kwargs)
        finally:
            callback.remove()

    guarded_train._neftune_guarded = callback  # type: ignore[attr-defined]
    trainer.train = guarded_train  # type: ignore[method-assign]
