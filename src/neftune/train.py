"""``neftune train``: instruction finetuning with per-example NEFTune noise.

    neftune train                                     # embedded default: SmolLM2-135M on builtin:skills
    neftune train --model DIR --data alpaca.json --alpha 5 --output runs/alpaca
    accelerate launch --num_processes 2 -m neftune train ...

From Python: ``neftune.train.run_training(config)``.  The pipeline is transformers' ``Trainer`` with
:class:`~neftune.callback.NEFTuneCallback`; nothing here re-implements a training loop.  The output
directory receives ``config.yaml`` (resolved, secrets redacted), ``metrics.jsonl``,
``tensorboard/``, ``checkpoints/`` and the final ``model/`` (LoRA adapters or full weights, with the
tokenizer), written to a temporary directory and renamed into place.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import IntervalStrategy, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from neftune.callback import NEFTuneCallback
from neftune.checkpoints import last_complete_checkpoint
from neftune.config import Config, write_config
from neftune.data.prepare import PreparedData, ReadData
from neftune.distributed import check_can_save, full_state_dict, max_over_ranks, sum_over_ranks
from neftune.errors import NeftuneError
from neftune.io import atomic_save_dir, atomic_write_text, check_output_dir
from neftune.preempt import PreemptionCallback
from neftune.resources import explain, explain_training
from neftune.train_setup import build_model, training_arguments
from neftune.trainer_parts import CountingCollator, HeldoutTrainer, MetricsCallback

if TYPE_CHECKING:
    from neftune.lmhead import LabelledLossHandle

log = logging.getLogger("neftune")


@dataclass
class TrainResult:
    """What a finished training run produced."""

    output_dir: Path
    model_dir: Path
    merged_dir: Path | None
    metrics: dict[str, Any]
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    heldout_curve: list[tuple[int, float]] = field(default_factory=list)
    model: Any = None
    tokenizer: Any = None


def is_main_process() -> bool:
    """True on the process that writes files (rank 0, or the only process)."""
    from neftune.attach import distributed_rank

    return distributed_rank() == 0


def read_training_data(cfg: Config) -> ReadData:
    """Read and validate the training and held-out examples before any model is loaded, so bad data
    fails in seconds; they are stored once in the data cache (:mod:`neftune.data.prepare`).

    The held-out examples are those every command and every arm sees, whatever the training seed.
    """
    from neftune.data.prepare import read_training_data as read

    return read(cfg.data, seed=cfg.train.seed, progress=cfg.train.progress)


def tokenize_training_data(cfg: Config, tokenizer: Any, read: ReadData) -> PreparedData:
    """Tokenize with assistant-only labels (or reuse the cached tokens): training rows, held-out rows, account."""
    from neftune.data.prepare import tokenize_training_data as tokenize

    return tokenize(cfg.data, tokenizer, read, seed=cfg.train.seed, progress=cfg.train.progress)


@dataclass
class RunStart:
    """Where a run writes, and the checkpoint it continues from (``None``: it starts afresh)."""

    out: Path
    resume_from: Path | None


@dataclass
class DataRead:
    """The examples, read and validated before any model is loaded, and the seconds that took."""

    read: ReadData
    seconds: float
    has_eval: bool
    """Whether the run measures a held-out loss: an eval set, a split of the training data, or a streamed one."""


@dataclass
class ModelSetup:
    """The run's ``TrainingArguments``, its model and tokenizer, and the labelled-loss hooks if asked for."""

    args: TrainingArguments
    model: Any
    tokenizer: Any
    labelled_loss: LabelledLossHandle | None = None


@dataclass
class TrainerSetup:
    """A built trainer with the collator and callbacks that count, log and stop its training."""

    trainer: Any
    collator: CountingCollator
    metrics_cb: MetricsCallback
    preempt: PreemptionCallback
    callbacks: list[TrainerCallback]
    """Those whose noise hooks :func:`run_trainer` removes when training ends."""
    info: dict[str, Any]
    """:func:`neftune.models.describe_model` of the model it trains."""


@dataclass
class Fitted:
    """A finished ``trainer.train()``: its own metrics, and time and throughput over every rank."""

    train_metrics: dict[str, Any]
    measures: dict[str, Any]


def start_run(cfg: Config) -> RunStart:
    """Check the output directory and find the checkpoint that ``--resume`` continues from."""
    out = Path(cfg.train.output)
    if is_main_process():
        check_output_dir(out)
    resume_from = None
    if cfg.train.resume:
        resume_from = last_complete_checkpoint(out / "checkpoints", tidy=is_main_process())
        if resume_from is None:
            log.warning("--resume: no checkpoint in %s/checkpoints, starting from scratch", out)
        else:
            log.info("resuming from %s", resume_from)
    return RunStart(out, resume_from)


def setup_data(cfg: Config) -> DataRead:
    """Read the training and held-out examples (:func:`read_training_data`), timed."""
    started = time.perf_counter()
    read = read_training_data(cfg)
    seconds = time.perf_counter() - started
    has_eval = read.eval is not None or read.eval_from_train or (cfg.data.streaming and bool(cfg.data.eval_size))
    return DataRead(read, seconds, has_eval)


def setup_model(cfg: Config, run: RunStart, data: DataRead, cleanup: ExitStack) -> ModelSetup:
    """The ``TrainingArguments``, then the model and tokenizer (:func:`build_model`).

    With ``train.loss`` asking for it the labelled-loss hooks (:mod:`neftune.lmhead`) go on the
    model; they come off when ``cleanup`` closes, however the run ends.
    """
    from neftune import lmhead

    # before the model: TrainingArguments start the process group and register a ZeRO-3 config
    args = training_arguments(cfg, run.out, has_eval=data.has_eval)
    model, tokenizer = build_model(cfg)
    labelled_loss = cleanup.enter_context(lmhead.attach(model)) if lmhead.loss_wanted(cfg.train.loss) else None
    if args.activation_checkpointing and cfg.model.lora:
        model.enable_input_require_grads()
    return ModelSetup(args, model, tokenizer, labelled_loss)


def tokenize_data(cfg: Config, setup: ModelSetup, data: DataRead) -> PreparedData:
    """Tokenize the examples read (:func:`tokenize_training_data`); the report's ``data_prepare_s``
    counts reading and tokenizing.  With no held-out row left, the run evaluates nothing."""
    started = time.perf_counter()
    prepared = tokenize_training_data(cfg, setup.tokenizer, data.read)
    prepared.report["data_prepare_s"] = round(data.seconds + time.perf_counter() - started, 3)  # read + tokenize
    if not prepared.eval_rows:  # every held-out example was dropped by tokenization
        setup.args.eval_strategy = IntervalStrategy.NO
    return prepared


def noise_callbacks(cfg: Config) -> list[TrainerCallback]:
    """The :class:`~neftune.callback.NEFTuneCallback` of ``cfg.noise``; none with alpha 0."""
    if not cfg.noise.alpha > 0:
        return []
    return [NEFTuneCallback(alpha=cfg.noise.alpha, distribution=cfg.noise.distribution, seed=cfg.train.seed)]


def start_outputs(cfg: Config, run: RunStart) -> TrainerCallback | None:
    """On the main process: write ``config.yaml``, start ``metrics.jsonl`` afresh unless resuming, and
    return the callback that writes ``tensorboard/``.  Other ranks write nothing and get None."""
    if not is_main_process():
        return None
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    tensorboard = TensorBoardCallback(SummaryWriter(log_dir=str(run.out / "tensorboard")))
    # the callback closes its writer at train end and opens a new one for the final evaluate();
    # without this that one would land in <output>/checkpoints/runs/
    tensorboard.logging_dir = str(run.out / "tensorboard")
    write_config(cfg, run.out / "config.yaml")
    if run.resume_from is None:  # a resumed run keeps the interrupted run's lines and continues them
        (run.out / "metrics.jsonl").unlink(missing_ok=True)
    return tensorboard


def ready_trainer(trainer: Any) -> None:
    """Check the trainer can save its checkpoints, and replace transformers' progress output with
    :class:`~neftune.trainer_parts.MetricsCallback`'s bar (tokens/s, ETA)."""
    check_can_save(trainer)
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)


def build_trainer(
    cfg: Config, run: RunStart, setup: ModelSetup, data: PreparedData, extra_callbacks: list | None
) -> TrainerSetup:
    """The :class:`~neftune.trainer_parts.HeldoutTrainer` with its collator and callbacks: noise,
    metrics, preemption, TensorBoard (main process), then ``extra_callbacks``."""
    from neftune.data.collate import PaddingCollator, packing_collator
    from neftune.models import describe_model

    inner = packing_collator() if cfg.data.packing else PaddingCollator(setup.tokenizer.pad_token_id)
    collator = CountingCollator(inner)
    metrics_cb = MetricsCallback(run.out / "metrics.jsonl", collator, cfg.train.progress)
    preempt = PreemptionCallback()  # SIGTERM / SIGUSR1: checkpoint after this step, then stop
    callbacks: list[TrainerCallback] = [*noise_callbacks(cfg), metrics_cb, preempt]
    tensorboard = start_outputs(cfg, run)
    callbacks += [tensorboard] if tensorboard is not None else []
    callbacks += extra_callbacks or []
    trainer = HeldoutTrainer(
        model=setup.model,
        args=setup.args,
        train_dataset=data.train,
        eval_dataset=data.eval_rows or None,
        data_collator=collator,
        processing_class=setup.tokenizer,
        callbacks=callbacks,
    )
    ready_trainer(trainer)
    info = describe_model(setup.model)
    log.info(
        "model %s: %s parameters, %s trainable; %s training examples",
        cfg.model.name,
        f"{info.get('n_params', 0):,}",
        f"{info.get('trainable_params', 0):,}",
        "streamed" if cfg.data.streaming else f"{len(data.train):,}",
    )
    return TrainerSetup(trainer, collator, metrics_cb, preempt, callbacks, info)


def fit(
    cfg: Config, run: RunStart, parts: TrainerSetup, gradient_checkpointing: bool, *, distributed_type: bool = True
) -> Fitted:
    """Train (:func:`run_trainer`), then measure the run over every rank: wall time, tokens per
    second, steps and processes (and, with ``distributed_type``, accelerate's kind of launch)."""
    trainer = parts.trainer
    result, train_time = run_trainer(
        trainer, cfg, run.resume_from, parts.preempt, parts.callbacks, gradient_checkpointing
    )
    # every rank's real tokens, over the slowest rank's time from the first to the last step
    real_tokens, trained_tokens = sum_over_ranks(trainer, [parts.collator.tokens, parts.metrics_cb.tokens_trained])
    seconds = max_over_ranks(trainer, parts.metrics_cb.seconds)
    measures: dict[str, Any] = {
        "train_time_s": train_time,
        "tokens_per_s": trained_tokens / seconds if seconds > 0 else 0.0,
        "learning_rate_used": trainer.args.learning_rate,
        "max_steps": trainer.state.max_steps,
        "world_size": trainer.accelerator.num_processes,
    }
    if distributed_type:
        measures["distributed_type"] = str(trainer.accelerator.distributed_type).rsplit(".", 1)[-1]
    measures["real_tokens"] = int(real_tokens)
    return Fitted(result.metrics, measures)


def finish(
    cfg: Config, setup: ModelSetup, data: PreparedData, parts: TrainerSetup, fitted: Fitted, *, keep_model: bool
) -> TrainResult:
    """Gather the run's metrics (training, throughput, data, model), measure the held-out loss at the
    last step if no evaluation did, and write everything (:func:`save_run`)."""
    trainer, metrics_cb = parts.trainer, parts.metrics_cb
    metrics: dict[str, Any] = {
        **fitted.train_metrics,
        **fitted.measures,
        **data.report,
        **(data.stream.report() if data.stream is not None else {}),
        "model": parts.info,
    }
    if data.eval_rows:
        step = trainer.state.global_step
        if not metrics_cb.heldout_curve or metrics_cb.heldout_curve[-1][0] != step:
            trainer.evaluate()  # not measured at the last step yet; logged like every evaluation
        metrics["heldout_loss"] = metrics_cb.heldout_curve[-1][1]
        metrics["heldout_perplexity"] = math.exp(min(metrics["heldout_loss"], 700.0))
    curves = {"loss_curve": metrics_cb.loss_curve, "heldout_curve": metrics_cb.heldout_curve}
    return save_run(cfg, trainer, setup.tokenizer, setup.args, metrics, curves, keep_model=keep_model)


def run_trainer(
    trainer: Any,
    cfg: Config,
    resume_from: Path | None,
    preempt: PreemptionCallback,
    callbacks: list[TrainerCallback],
    gradient_checkpointing: bool,
) -> tuple[Any, float]:
    """``trainer.train()`` as every neftune run calls it; its result and wall time in seconds.

    A signal that stopped it becomes :class:`~neftune.preempt.Preempted`, a full disk or an
    out-of-memory error one line saying what to do (:func:`~neftune.resources.explain_training`);
    whatever happens, the signal handlers are put back and the noise hooks removed.
    """
    started = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        preempt.raise_if_stopped(trainer)
    except BaseException as error:
        explained = explain_training(error, cfg, Path(cfg.train.output), gradient_checkpointing)
        if explained is not None:
            raise explained from error
        raise
    finally:
        preempt.uninstall()
        for callback in callbacks:
            if isinstance(callback, NEFTuneCallback):
                callback.remove()
    return result, time.perf_counter() - started


def run_training(cfg: Config, *, keep_model: bool = False, extra_callbacks: list | None = None) -> TrainResult:
    """Run a whole finetuning job described by ``cfg`` and return what it produced.

    The phases: :func:`start_run` (output directory, ``--resume``), :func:`setup_data` (read the
    examples), :func:`setup_model` (arguments, model, loss hooks), :func:`tokenize_data`,
    :func:`build_trainer`, :func:`fit` (train and measure) and :func:`finish` (final evaluation,
    summary, model).  Every hook of ours comes off the model whichever way the run ends.
    """
    cfg.validate()
    if cfg.train.method == "dpo":
        from neftune.preference import run_preference_training

        return run_preference_training(cfg, keep_model=keep_model, extra_callbacks=extra_callbacks)
    run = start_run(cfg)
    data = setup_data(cfg)
    with ExitStack() as cleanup:  # the labelled-loss hooks; run_trainer removes the noise hooks
        setup = setup_model(cfg, run, data, cleanup)
        prepared = tokenize_data(cfg, setup, data)
        parts = build_trainer(cfg, run, setup, prepared, extra_callbacks)
        fitted = fit(cfg, run, parts, bool(setup.args.activation_checkpointing))
        return finish(cfg, setup, prepared, parts, fitted, keep_model=keep_model)


def save_run(
    cfg: Config,
    trainer: Any,
    tokenizer: Any,
    args: Any,
    metrics: dict[str, Any],
    curves: dict[str, list],
    *,
    keep_model: bool = False,
) -> TrainResult:
    """Write the trained model (and the merged one with ``model.merge``) and ``train_summary.json``
    (``metrics`` and ``curves``); every rank calls it, since a sharded model is gathered to rank 0.
    Returns the run's :class:`TrainResult`, with the trained model and tokenizer if ``keep_model``."""
    out = Path(cfg.train.output)
    model_dir, merged_dir = out / "model", None
    state = full_state_dict(trainer)  # a sharded model is gathered to rank 0, every rank taking part
    if is_main_process():
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        _save_model(model_dir, unwrapped, tokenizer, state)
        if cfg.model.lora and cfg.model.merge:
            merged_dir = out / "merged"
            merged = unwrapped.merge_and_unload() if state is None else _merge_saved_adapter(cfg, model_dir, args)
            _save_model(merged_dir, merged, tokenizer)
        summary = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, dict, list))}
        atomic_write_text(out / "train_summary.json", json.dumps({**summary, **curves}, indent=2, default=str))
        log.info("model written to %s", model_dir)
    return TrainResult(
        output_dir=out,
        model_dir=model_dir,
        merged_dir=merged_dir,
        metrics=metrics,
        loss_curve=curves["loss_curve"],
        heldout_curve=curves.get("heldout_curve", []),
        model=trainer.accelerator.unwrap_model(trainer.model) if keep_model else None,
        tokenizer=tokenizer if keep_model else None,
    )


def _save_model(target: Path, model: Any, tokenizer: Any, state: dict | None = None) -> None:
    """Atomically write model + tokenizer to ``target``; a full disk etc. becomes a one-line error.

    ``state`` is the gathered state dict of a sharded model (:func:`neftune.distributed.full_state_dict`),
    written in place of the model's own (sharded) tensors.  Rank 0 alone writes, so the rename into
    place is atomic under every launcher; under sharding, only the gathering needs every rank.
    """
    try:
        atomic_save_dir(target, lambda tmp: _save(model, tokenizer, tmp, state))
    except Exception as e:  # a full disk, in Python's, torch's or safetensors' words
        explained = explain(e, target)
        if explained is not None:
            raise explained from e
        if isinstance(e, OSError):
            raise NeftuneError(f"could not write the model to {target}: {e.strerror or e}") from e
        raise


def _save(model: Any, tokenizer: Any, directory: Path, state: dict | None = None) -> None:
    model.save_pretrained(directory, safe_serialization=True, state_dict=state)
    tokenizer.save_pretrained(directory)


def _merge_saved_adapter(cfg: Config, adapter_dir: Path, args: TrainingArguments) -> Any:
    """LoRA-merged weights after a sharded run: the saved (gathered) adapter applied to a fresh copy
    of the base model on rank 0's CPU and merged there (LoRA leaves the base weights unchanged, so
    this equals merging the trained model)."""
    from neftune.distributed import zero3_init_off
    from neftune.models import load_model_and_tokenizer, resolve_dtype

    with zero3_init_off():
        merged, _ = load_model_and_tokenizer(
            str(adapter_dir),
            dtype=resolve_dtype(cfg.model.dtype, args.device),
            device="cpu",
            trust_remote_code=cfg.model.trust_remote_code,
            for_training=False,
        )
    return merged
