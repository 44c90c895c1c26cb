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
from typing import TYPE_CHECKING, Any, cast

import torch
from transformers import TrainerCallback

from neftune.checkpoints import AtomicCheckpoints
from neftune.config import Config
from neftune.data.preference import PreferenceLoad, load_pairs
from neftune.preempt import PreemptionCallback
from neftune.train_setup import build_model, training_arguments
from neftune.trainer_parts import CountingCollator, MetricsCallback

if TYPE_CHECKING:
    from neftune.train import RunStart, TrainerSetup, TrainResult

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
    """Run DPO as ``cfg`` describes (``cfg.train.method == "dpo"``) and return what it produced.

    The phases are :func:`neftune.train.run_training`'s, with preference pairs for data and
    :func:`build_preference_trainer` for the trainer.
    """
    from neftune.train import fit, save_run, start_run  # train imports this module when it runs: import it lazily

    cfg.validate()
    run = start_run(cfg)
    if cfg.data.packing:
        log.info("--method dpo trains on padded batches (TRL's DPOTrainer has padding-free training disabled)")
    if cfg.data.eval or cfg.data.format != "auto":
        log.warning("--method dpo ignores data.eval and data.format: preference pairs have no held-out loss here")
    pairs = read_pairs(cfg)
    parts = build_preference_trainer(cfg, run, pairs, extra_callbacks)
    trainer = parts.trainer
    fitted = fit(cfg, run, parts, bool(trainer.args.gradient_checkpointing), distributed_type=False)
    logged = {k: v for entry in trainer.state.log_history for k, v in entry.items() if k in SUMMARY_METRICS}
    metrics: dict[str, Any] = {
        **fitted.train_metrics,
        **logged,
        "method": "dpo",
        "dpo_beta": cfg.train.dpo_beta,
        "reference": "adapter disabled" if cfg.model.lora else "frozen copy of the starting model",
        **fitted.measures,
        "train": cfg.data.train,
        "train_records": pairs.total,
        "train_pairs": len(pairs.pairs),
        "train_skipped": dict(pairs.skipped),
        "model": parts.info,
    }
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    if "ref" in getattr(unwrapped, "peft_config", {}):
        unwrapped.delete_adapter("ref")  # TRL's frozen copy of the starting adapter; the trained one is "default"
    curves = {"loss_curve": parts.metrics_cb.loss_curve}
    return save_run(cfg, trainer, trainer.processing_class, trainer.args, metrics, curves, keep_model=keep_model)


def build_preference_trainer(
    cfg: Config, run: RunStart, pairs: PreferenceLoad, extra_callbacks: list | None
) -> TrainerSetup:
    """TRL's ``DPOTrainer`` (checkpoints written atomically) on the model of :func:`neftune.train_setup.build_model`,
    with the callbacks of ``neftune train``: preemption, noise, metrics, TensorBoard, ``extra_callbacks``."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from neftune.models import describe_model
    from neftune.train import TrainerSetup, noise_callbacks, ready_trainer, start_outputs

    args = training_arguments(
        cfg,
        run.out,
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
    callbacks: list[TrainerCallback] = [preempt, *noise_callbacks(cfg)]

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
    metrics_cb = MetricsCallback(run.out / "metrics.jsonl", collator, cfg.train.progress)
    for callback in [metrics_cb, start_outputs(cfg, run), *(extra_callbacks or [])]:
        if callback is not None:
            trainer.add_callback(callback)
    ready_trainer(trainer)
    info = describe_model(cast(torch.nn.Module, trainer.model))
    log.info(
        "model %s: %s trainable parameters; %d preference pairs; DPO beta %s",
        cfg.model.name,
        f"{info.get('trainable_params', 0):,}",
        len(pairs.pairs),
        cfg.train.dpo_beta,
    )
    return TrainerSetup(trainer, collator, metrics_cb, preempt, callbacks, info)
