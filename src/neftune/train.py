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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import IntervalStrategy, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from neftune.callback import NEFTuneCallback
from neftune.checkpoints import last_complete_checkpoint
from neftune.config import Config, write_config
from neftune.data.prepare import PreparedData, ReadData
from neftune.data.presets import defaults_for
from neftune.distributed import (
    check_can_save,
    device_arguments,
    full_state_dict,
    max_over_ranks,
    sum_over_ranks,
)
from neftune.errors import NeftuneError
from neftune.io import atomic_save_dir, atomic_write_text, check_output_dir
from neftune.preempt import PreemptionCallback
from neftune.resources import explain, explain_training
from neftune.trainer_parts import CountingCollator, HeldoutTrainer, MetricsCallback

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


def choose_attention(cfg: Config) -> str | None:
    """The attention implementation to train with, or None to keep the model's own.

    ``auto`` picks :mod:`neftune.varlen` for packed rows on CPU, where it is measured faster than
    SDPA over the whole row (BENCHMARKS.md); on CUDA it keeps the model's default until measured.
    """
    choice: str | None = cfg.model.attention
    if choice == "auto":
        choice = "varlen" if cfg.data.packing and not torch.cuda.is_available() else None
    if choice == "varlen":
        from neftune.varlen import register

        return register()
    return choice


def build_model(cfg: Config) -> tuple[Any, Any]:
    """Load model and tokenizer, wrap in LoRA if asked.

    The model is loaded on the CPU and the Trainer places it (on ``cuda:<local rank>`` under DDP);
    under FSDP and DeepSpeed accelerate places and shards it.  Call this after the run's
    ``TrainingArguments`` exist: they register a DeepSpeed ZeRO-3 config, which makes
    ``from_pretrained`` load each rank's partition only, and start the process group that
    FSDP's rank-0-only loading (``fsdp_cpu_ram_efficient_loading``) needs.
    """
    from neftune.models import default_lora_targets, load_model_and_tokenizer, resolve_dtype

    model, tokenizer = load_model_and_tokenizer(
        cfg.model.name,
        dtype=resolve_dtype(cfg.model.dtype, "cuda" if torch.cuda.is_available() else "cpu"),  # the training device's
        device="cpu",
        trust_remote_code=cfg.model.trust_remote_code,
        for_training=True,
    )
    attention = choose_attention(cfg)
    if attention is not None:
        model.set_attn_implementation(attention)
    if cfg.model.lora:
        from peft import LoraConfig, get_peft_model
        from transformers import set_seed

        # LoRA's A matrices are drawn from the global RNG: make them a function of train.seed, so
        # two runs with one seed (compare's arms, a crashed run and its rerun) start identical
        set_seed(cfg.train.seed)
        targets = cfg.model.lora_targets or default_lora_targets(model)
        model = get_peft_model(
            model,
            LoraConfig(
                r=cfg.model.lora_r,
                lora_alpha=cfg.model.lora_alpha,
                lora_dropout=cfg.model.lora_dropout,
                target_modules=targets,
                task_type="CAUSAL_LM",
            ),
        )
    return model, tokenizer


def training_budget(cfg: Config) -> tuple[int | None, float]:
    """``(max_steps, epochs)`` to train for: the user's steps or epochs when either is set, else the
    training data's default steps (:mod:`neftune.data.presets`) or one epoch."""
    max_steps, epochs = cfg.train.max_steps, cfg.train.epochs
    if max_steps is None and epochs is None:
        max_steps = defaults_for(cfg.data.train).default_steps
    return max_steps, 1.0 if epochs is None else epochs


def training_arguments(
    cfg: Config, out: Path, has_eval: bool, args_class: type[TrainingArguments] = TrainingArguments, **extra: Any
) -> TrainingArguments:
    """Map our settings onto transformers' TrainingArguments (or a subclass such as TRL's
    ``DPOConfig``, given its own fields in ``extra``), with device-aware precision."""
    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported() and cfg.model.dtype in ("auto", "bfloat16")
    lr = cfg.train.lr if cfg.train.lr is not None else (2e-4 if cfg.model.lora else 2e-5)
    max_steps, epochs = training_budget(cfg)
    grad_ckpt = cfg.train.gradient_checkpointing if cfg.train.gradient_checkpointing is not None else cuda
    return args_class(
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=cfg.train.batch_size,
        per_device_eval_batch_size=cfg.train.batch_size,
        gradient_accumulation_steps=cfg.train.grad_accum,
        learning_rate=lr,
        num_train_epochs=epochs,
        max_steps=max_steps if max_steps is not None else -1,
        lr_scheduler_type=cfg.train.scheduler,
        warmup_steps=cfg.train.warmup_ratio,
        weight_decay=cfg.train.weight_decay,
        seed=cfg.train.seed,
        data_seed=cfg.train.seed,
        logging_steps=cfg.train.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=cfg.train.save_steps,
        save_total_limit=cfg.train.save_total_limit,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=cfg.train.eval_steps if has_eval else None,
        report_to=[],
        disable_tqdm=True,
        **device_arguments(cuda),
        bf16=bf16,
        activation_checkpointing=grad_ckpt,
        activation_checkpointing_kwargs={"use_reentrant": False} if grad_ckpt else None,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        **extra,
    )


def run_trainer(
    trainer: Any,
    cfg: Config,
    resume_from: Path | None,
    preempt: PreemptionCallback,
    callbacks: list[TrainerCallback],
    gradient_checkpointing: bool,
    *,
    on_failure: Callable[[], object] | None = None,
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
        if on_failure is not None:
            on_failure()
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
    """Run a whole finetuning job described by ``cfg`` and return what it produced."""
    from neftune import lmhead
    from neftune.data.collate import PaddingCollator, packing_collator
    from neftune.models import describe_model

    cfg.validate()
    if cfg.train.method == "dpo":
        from neftune.preference import run_preference_training

        return run_preference_training(cfg, keep_model=keep_model, extra_callbacks=extra_callbacks)
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

    data_started = time.perf_counter()
    read = read_training_data(cfg)
    data_seconds = time.perf_counter() - data_started
    # before the model: TrainingArguments start the process group and register a ZeRO-3 config
    has_eval = read.eval is not None or read.eval_from_train or (cfg.data.streaming and bool(cfg.data.eval_size))
    args = training_arguments(cfg, out, has_eval=has_eval)
    model, tokenizer = build_model(cfg)
    labelled_loss = lmhead.attach(model) if lmhead.loss_wanted(cfg.train.loss) else None
    data_started = time.perf_counter()
    prepared = tokenize_training_data(cfg, tokenizer, read)
    train_rows, eval_rows, data_report = prepared.train, prepared.eval_rows, prepared.report
    data_report["data_prepare_s"] = round(data_seconds + time.perf_counter() - data_started, 3)  # read + tokenize
    if not eval_rows:  # every held-out example was dropped by tokenization
        args.eval_strategy = IntervalStrategy.NO
    if args.activation_checkpointing and cfg.model.lora:
        model.enable_input_require_grads()

    inner = packing_collator() if cfg.data.packing else PaddingCollator(tokenizer.pad_token_id)
    collator = CountingCollator(inner)
    metrics_cb = MetricsCallback(out / "metrics.jsonl", collator, cfg.train.progress)
    preempt = PreemptionCallback()  # SIGTERM / SIGUSR1: checkpoint after this step, then stop
    callbacks: list[TrainerCallback] = [metrics_cb, preempt]
    if cfg.noise.alpha > 0:
        callbacks.insert(
            0,
            NEFTuneCallback(alpha=cfg.noise.alpha, distribution=cfg.noise.distribution, seed=cfg.train.seed),
        )
    if is_main_process():
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        tensorboard = TensorBoardCallback(SummaryWriter(log_dir=str(out / "tensorboard")))
        # the callback closes its writer at train end and opens a new one for the final evaluate();
        # without this that one would land in <output>/checkpoints/runs/
        tensorboard.logging_dir = str(out / "tensorboard")
        callbacks.append(tensorboard)
        write_config(cfg, out / "config.yaml")
        if resume_from is None and (out / "metrics.jsonl").exists():
            (out / "metrics.jsonl").unlink()
    callbacks.extend(extra_callbacks or [])

    trainer = HeldoutTrainer(
        model=model,
        args=args,
        train_dataset=train_rows,
        eval_dataset=eval_rows or None,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    check_can_save(trainer)
    trainer.remove_callback(ProgressCallback)  # replaced by MetricsCallback's bar (tokens/s, ETA)
    trainer.remove_callback(PrinterCallback)
    info = describe_model(model)
    log.info(
        "model %s: %s parameters, %s trainable; %s training examples",
        cfg.model.name,
        f"{info.get('n_params', 0):,}",
        f"{info.get('trainable_params', 0):,}",
        "streamed" if cfg.data.streaming else f"{len(train_rows):,}",
    )

    result, train_time = run_trainer(
        trainer,
        cfg,
        resume_from,
        preempt,
        callbacks,
        bool(args.activation_checkpointing),
        on_failure=labelled_loss.remove if labelled_loss is not None else None,  # leave no hook of ours behind
    )
    # every rank's real tokens, over the slowest rank's time from the first to the last step
    real_tokens, trained_tokens = sum_over_ranks(trainer, [collator.tokens, metrics_cb.tokens_trained])
    seconds = max_over_ranks(trainer, metrics_cb.seconds)

    metrics: dict[str, Any] = {
        **result.metrics,
        "train_time_s": train_time,
        "tokens_per_s": trained_tokens / seconds if seconds > 0 else 0.0,
        "learning_rate_used": args.learning_rate,
        "max_steps": trainer.state.max_steps,
        "world_size": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type).rsplit(".", 1)[-1],
        "real_tokens": int(real_tokens),
        **data_report,
        **(prepared.stream.report() if prepared.stream is not None else {}),
        "model": info,
    }
    if eval_rows:
        step = trainer.state.global_step
        if not metrics_cb.heldout_curve or metrics_cb.heldout_curve[-1][0] != step:
            trainer.evaluate()  # not measured at the last step yet; logged like every evaluation
        metrics["heldout_loss"] = metrics_cb.heldout_curve[-1][1]
        metrics["heldout_perplexity"] = math.exp(min(metrics["heldout_loss"], 700.0))

    curves = {"loss_curve": metrics_cb.loss_curve, "heldout_curve": metrics_cb.heldout_curve}
    model_dir, merged_dir = save_run(cfg, trainer, tokenizer, args, metrics, curves)
    if labelled_loss is not None:
        labelled_loss.remove()  # a returned model computes its logits as usual again
    return TrainResult(
        output_dir=out,
        model_dir=model_dir,
        merged_dir=merged_dir,
        metrics=metrics,
        loss_curve=metrics_cb.loss_curve,
        heldout_curve=metrics_cb.heldout_curve,
        model=trainer.accelerator.unwrap_model(trainer.model) if keep_model else None,
        tokenizer=tokenizer if keep_model else None,
    )


def save_run(
    cfg: Config, trainer: Any, tokenizer: Any, args: Any, metrics: dict[str, Any], curves: dict[str, list]
) -> tuple[Path, Path | None]:
    """Write the trained model (and the merged one with ``model.merge``) and ``train_summary.json``
    (``metrics`` and ``curves``); every rank calls it, since a sharded model is gathered to rank 0.
    Returns the model directory and the merged one (None without ``model.merge``)."""
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
    return model_dir, merged_dir


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
