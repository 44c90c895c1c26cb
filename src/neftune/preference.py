"""``neftune train --method dpo``: preference training (TRL's ``DPOTrainer``) with per-example NEFTune.

    neftune train --method dpo                                   # builtin:skills as generated pairs
    neftune train --method dpo --data pairs.jsonl --alpha 5 --output runs/dpo

The pieces are those of ``neftune train`` (model loading and LoRA, ``TrainingArguments``, metrics,
the atomic model write) around TRL's ``DPOTrainer``.  :class:`~neftune.callback.NEFTuneCallback`
adds the noise: each chosen and rejected row is scaled by its own length, and the reference
forward gets none.  With LoRA the reference is the same module with the adapter disabled
(:mod:`neftune.reference` keeps the noise out of it); with full finetuning it is a frozen copy
of the starting model, a separate module the hooks never touch.

The output directory receives ``config.yaml``, ``metrics.jsonl`` (loss, reward margins and
accuracies as TRL logs them), ``tensorboard/``, ``checkpoints/``, the final ``model/`` and
``train_summary.json``.  There is no held-out loss: the preference data has no eval split here.
Checkpoints, ``--resume``, SIGTERM/SIGUSR1 and a full disk behave as in ``neftune train``
(:mod:`neftune.checkpoints`, :mod:`neftune.preempt`, :mod:`neftune.resources`).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from neftune.callback import NEFTuneCallback
from neftune.checkpoints import AtomicCheckpoints, last_complete_checkpoint
from neftune.config import Config, write_config
from neftune.data.preference import PreferenceLoad, load_pairs
from neftune.distributed import check_can_save, max_over_ranks, sum_over_ranks
from neftune.io import check_output_dir
from neftune.preempt import PreemptionCallback
from neftune.trainer_parts import CountingCollator, MetricsCallback

if TYPE_CHECKING:
    from neftune.train import TrainResult

log = logging.getLogger("neftune")

# TRL's logged preference metrics copied into train_summary.json (their last logged value)
SUMMARY_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


class PairCountingCollator(CountingCollator):
    """Counts the real tokens of a preference batch: the prompt twice, the chosen and the rejected answer."""

    def __call__(self, features: list[dict]) -> dict:
        self.tokens += sum(2 * len(f["prompt_ids"]) + len(f["chosen_ids"]) + len(f["rejected_ids"]) for f in features)
        return self.inner(features)


def read_pairs(cfg: Config) -> PreferenceLoad:
    """Read and validate the preference pairs (before any model is loaded, so bad data fails in seconds)."""
    from neftune.data.presets import bad_record_policy

    pairs = load_pairs(
        cfg.data.train,
        on_bad_record=bad_record_policy(cfg.data.train, cfg.data.on_bad_record),
        limit=cfg.data.limit,
        seed=cfg.train.seed,
        split=cfg.data.split,
        subset=cfg.data.subset,
    )
    log.info(pairs.summary())
    for note in pairs.notes:
        log.warning(note)
    return pairs


def run_preference_training(
    cfg: Config, *, keep_model: bool = False, extra_callbacks: list | None = None
) -> TrainResult:
    """Run DPO as ``cfg`` describes (``cfg.train.method == "dpo"``) and return what it produced."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from neftune.models import describe_model
    from neftune.train import (  # train imports this module when it runs: import it lazily
        TrainResult,
        build_model,
        is_main_process,
        run_trainer,
        save_run,
        training_arguments,
    )

    cfg.validate()
    out = Path(cfg.train.output)
    if is_main_process():
        check_output_dir(out)
    resume_from = last_complete_checkpoint(out / "checkpoints", tidy=is_main_process()) if cfg.train.resume else None
    if cfg.train.resume and resume_from is None:
        log.warning("--resume: no checkpoint in %s/checkpoints, starting from scratch", out)
    if cfg.data.packing:
        log.info("--method dpo trains on padded batches (TRL's DPOTrainer has padding-free training disabled)")
    if cfg.data.eval or cfg.data.format != "auto":
        log.warning("--method dpo ignores data.eval and data.format: preference pairs have no held-out loss here")
    pairs = read_pairs(cfg)
    args = training_arguments(
        cfg,
        out,
        has_eval=False,
        args_class=DPOConfig,
        beta=cfg.train.dpo_beta,
        max_length=cfg.data.max_length,
        # DPOConfig turns gradient checkpointing on by default; keep neftune's choice (the same as for sft)
        gradient_checkpointing=cfg.train.gradient_checkpointing
        if cfg.train.gradient_checkpointing is not None
        else torch.cuda.is_available(),
        dataset_num_proc=None,
    )
    model, tokenizer = build_model(cfg)
    # full finetuning: the reference is a frozen copy of the starting weights (LoRA: the adapter disabled)
    ref_model = None if cfg.model.lora else copy.deepcopy(model)

    preempt = PreemptionCallback()  # SIGTERM / SIGUSR1: checkpoint after this step, then stop
    callbacks: list[TrainerCallback] = [preempt]
    if cfg.noise.alpha > 0:
        callbacks.append(
            NEFTuneCallback(alpha=cfg.noise.alpha, distribution=cfg.noise.distribution, seed=cfg.train.seed)
        )

    class Trainer(AtomicCheckpoints, DPOTrainer):  # checkpoints appear whole or not at all
        pass

    trainer = Trainer(
        model=model,
        ref_model=ref_model,
        args=cast(DPOConfig, args),
        train_dataset=Dataset.from_list([pair.to_trl() for pair in pairs.pairs]),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    collator = PairCountingCollator(trainer.data_collator)
    trainer.data_collator = collator
    metrics_cb = MetricsCallback(out / "metrics.jsonl", collator, cfg.train.progress)
    trainer.add_callback(metrics_cb)
    if is_main_process():
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        tensorboard = TensorBoardCallback(SummaryWriter(log_dir=str(out / "tensorboard")))
        tensorboard.logging_dir = str(out / "tensorboard")
        trainer.add_callback(tensorboard)
        write_config(cfg, out / "config.yaml")
        if resume_from is None:  # a resumed run keeps the interrupted run's lines and continues them
            (out / "metrics.jsonl").unlink(missing_ok=True)
    for callback in extra_callbacks or []:
        trainer.add_callback(callback)
    check_can_save(trainer)
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    info = describe_model(cast(torch.nn.Module, trainer.model))
    log.info(
        "model %s: %s trainable parameters; %d preference pairs; DPO beta %s",
        cfg.model.name,
        f"{info.get('trainable_params', 0):,}",
        len(pairs.pairs),
        cfg.train.dpo_beta,
    )

    result, train_time = run_trainer(trainer, cfg, resume_from, preempt, callbacks, bool(args.gradient_checkpointing))
    real_tokens, trained_tokens = sum_over_ranks(trainer, [collator.tokens, metrics_cb.tokens_trained])
    seconds = max_over_ranks(trainer, metrics_cb.seconds)
    logged = {k: v for entry in trainer.state.log_history for k, v in entry.items() if k in SUMMARY_METRICS}
    metrics: dict[str, Any] = {
        **result.metrics,
        **logged,
        "method": "dpo",
        "dpo_beta": cfg.train.dpo_beta,
        "reference": "adapter disabled" if cfg.model.lora else "frozen copy of the starting model",
        "train_time_s": train_time,
        "tokens_per_s": trained_tokens / seconds if seconds > 0 else 0.0,
        "learning_rate_used": args.learning_rate,
        "max_steps": trainer.state.max_steps,
        "world_size": trainer.accelerator.num_processes,
        "real_tokens": int(real_tokens),
        "train": cfg.data.train,
        "train_records": pairs.total,
        "train_pairs": len(pairs.pairs),
        "train_skipped": dict(pairs.skipped),
        "model": info,
    }

    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    if "ref" in getattr(unwrapped, "peft_config", {}):
        unwrapped.delete_adapter("ref")  # TRL's frozen copy of the starting adapter; the trained one is "default"
    model_dir, merged_dir = save_run(cfg, trainer, tokenizer, args, metrics, {"loss_curve": metrics_cb.loss_curve})
    return TrainResult(
        output_dir=out,
        model_dir=model_dir,
        merged_dir=merged_dir,
        metrics=metrics,
        loss_curve=metrics_cb.loss_curve,
        model=unwrapped if keep_model else None,
        tokenizer=tokenizer if keep_model else None,
    )
