"""The pieces ``neftune train`` plugs into transformers' ``Trainer``: token counting, metrics, held-out loss.

* :class:`CountingCollator` counts the real (non-padding) tokens each batch carries.
* :class:`MetricsCallback` writes ``metrics.jsonl`` and drives the progress bar (loss, tokens/s, ETA).
* :class:`HeldoutTrainer` makes ``evaluate()`` report neftune's one held-out loss (and writes
  checkpoints atomically).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from neftune.checkpoints import AtomicCheckpoints


class CountingCollator:
    """Wraps a collator and counts real (non-padding) tokens, for honest tokens/s."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.tokens = 0

    def __call__(self, features: list[dict]) -> dict:
        self.tokens += sum(len(f["input_ids"]) for f in features)
        return self.inner(features)


class MetricsCallback(TrainerCallback):
    """Writes every log line to ``metrics.jsonl`` and drives a progress bar with loss, tokens/s, ETA."""

    def __init__(self, path: Path, counter: CountingCollator, progress: bool) -> None:
        self.path = path
        self.counter = counter
        self.progress = progress
        self.bar = None
        self.loss_curve: list[tuple[int, float]] = []
        self.heldout_curve: list[tuple[int, float]] = []
        self._t0 = self._tokens0 = 0.0
        self.tokens_per_s = self.seconds = 0.0
        self.tokens_trained = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._t0, self._tokens0 = time.perf_counter(), self.counter.tokens
        if self.progress and state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=state.max_steps, initial=state.global_step, desc="train", unit="step", dynamic_ncols=True
            )

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds = time.perf_counter() - self._t0
        self.tokens_trained = self.counter.tokens - self._tokens0
        # this rank's tokens times the ranks: the live estimate of the bar and metrics.jsonl; the run's
        # tokens/s (the "done" line, train_summary.json) sums the tokens every rank counted
        world = max(args.world_size, 1)
        self.tokens_per_s = self.tokens_trained * world / self.seconds if self.seconds > 0 else 0.0
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)
            self.bar.set_postfix(tok_s=f"{self.tokens_per_s:.0f}", refresh=False)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        if "loss" in logs:
            self.loss_curve.append((state.global_step, float(logs["loss"])))
        if "eval_loss" in logs:
            self.heldout_curve.append((state.global_step, float(logs["eval_loss"])))
        if not state.is_world_process_zero:
            return
        if self.bar is not None and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.3f}", tok_s=f"{self.tokens_per_s:.0f}")
        record = {
            "step": state.global_step,
            "epoch": state.epoch,
            "time": time.time(),
            "tokens_per_s": round(self.tokens_per_s, 2),
            **logs,
        }
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class HeldoutTrainer(AtomicCheckpoints):
    """transformers' ``Trainer`` whose ``evaluate()`` reports neftune's held-out loss, and whose
    checkpoints appear whole or not at all (:class:`~neftune.checkpoints.AtomicCheckpoints`).

    The ``eval_loss`` it logs (to ``metrics.jsonl`` and TensorBoard, at every ``eval_steps`` and at
    the end) is :func:`neftune.evaluate.labelled_loss`: the mean cross-entropy per assistant token
    of the held-out set, noise off, the number ``neftune eval`` and ``neftune compare`` report.
    The Trainer's own evaluation loop would average per-batch means instead.
    """

    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        from neftune.evaluate import labelled_loss, pad_token_id

        rows = self.eval_dataset if eval_dataset is None else eval_dataset
        held = labelled_loss(
            self.model,
            rows,  # type: ignore[arg-type]  # train passes its tokenized examples as the eval dataset
            pad_id=pad_token_id(self.processing_class),
            batch_size=self.args.per_device_eval_batch_size,
        )
        metrics = {f"{metric_key_prefix}_loss": held["loss"], f"{metric_key_prefix}_tokens": held["tokens"]}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
