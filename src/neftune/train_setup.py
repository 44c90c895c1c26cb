"""What a training run is built from: its ``TrainingArguments`` and its model (LoRA, attention).

Shared by ``neftune train`` (:mod:`neftune.train`) and ``--method dpo`` (:mod:`neftune.preference`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments

from neftune.config import Config
from neftune.data.presets import defaults_for
from neftune.distributed import device_arguments


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
