"""One tree of typed settings: YAML files, ``key=value`` overrides and CLI flags all land here.

    cfg = load_config("configs/alpaca.yaml", overrides=["train.lr=1e-4", "noise.alpha=10"])
    cfg.validate()

Each field's ``help`` metadata is the documentation and the ``--help`` text.  ``validate()`` raises a
one-line :class:`~neftune.errors.ConfigError` naming the offending field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neftune.choices import (
    Attention,
    BadRecordPolicy,
    DataFormat,
    Distribution,
    Dtype,
    Loss,
    Method,
    choices_of,
)
from neftune.config_io import (
    SECRET_MARKERS,
    Flag,
    apply_overrides,
    command_flags,
    default_of,
    from_dict,
    iter_fields,
    merge_tree,
    read_yaml,
    recipe_path,
    to_dict,
    write_config,
)
from neftune.errors import ConfigError
from neftune.settings import reused, setting

__all__ = [
    "SECRET_MARKERS",
    "Config",
    "DataConfig",
    "Flag",
    "ModelConfig",
    "NoiseConfig",
    "TrainConfig",
    "apply_overrides",
    "check_choice",
    "check_positive",
    "command_flags",
    "default_of",
    "from_dict",
    "iter_fields",
    "load_config",
    "read_yaml",
    "reused",
    "setting",
    "to_dict",
    "write_config",
]


@dataclass
class ModelConfig:
    name: str = setting(
        "smollm2-135m", "hub id, local directory, .gguf file, or alias (smollm2-135m, tiny-random)", flag="--model"
    )
    dtype: Dtype = setting("auto", "auto (fp32 on CPU, bf16 on CUDA), float32, bfloat16 or float16")
    trust_remote_code: bool = setting(False, "allow model code from the hub to run; off unless you trust the repo")
    attention: Attention = setting(
        "auto",
        "auto (varlen for packed rows on CPU, else the model's default), varlen, sdpa, eager, "
        "flash_attention_2 or flex_attention",
    )
    lora: bool = setting(
        True, "train LoRA adapters (true) or all weights (false)", flag={"--lora": True, "--full": False}
    )
    lora_r: int = setting(16, "LoRA rank")
    lora_alpha: int = setting(32, "LoRA scaling alpha (not the NEFTune alpha)")
    lora_dropout: float = setting(0.0, "LoRA dropout")
    lora_targets: list[str] = setting([], "module names to adapt; empty = sensible default for the architecture")
    merge: bool = setting(False, "also write LoRA-merged full weights to <output>/merged", flag="--merge")


@dataclass
class DataConfig:
    train: str = setting(
        "builtin:skills",
        "training data: builtin:skills, builtin:sharegpt, a .json/.jsonl/.parquet file, a datasets directory "
        "(save_to_disk or a dataset repository) or a hub data set id (owner/name)",
        flag="--data",
    )
    split: str = setting(
        "train", "split of a datasets directory, dataset repository or hub data set to train on", flag="--data-split"
    )
    subset: str | None = setting(
        None, "configuration (subset) of a hub data set or dataset repository", flag="--data-subset"
    )
    eval: str | None = setting(
        None,
        "held-out data for loss (noise off) and answers (default: the held-out split of a built-in training set)",
        flag="--eval-data",
    )
    format: DataFormat = setting("auto", "auto, alpaca, sharegpt or messages", flag="--format")
    max_length: int = setting(512, "tokens per example; longer examples are right-truncated", flag="--max-length")
    packing: bool = setting(
        True,
        "padding-free packed rows (true) or padded batches (false)",
        flag={"--packing": True, "--no-packing": False},
    )
    on_bad_record: BadRecordPolicy = setting(
        "error", "error: stop at the first bad record; skip: skip and count them by reason", flag="--on-bad-record"
    )
    limit: int | None = setting(None, "use at most this many training examples")
    eval_limit: int | None = setting(64, "use at most this many held-out examples", flag="--eval-limit")
    eval_size: float | None = setting(
        None,
        "hold out this many (>= 1) or this share (< 1) of the training examples when there is no --eval-data, the "
        "same ones whatever the training seed (default: none for train; 0.1 for compare on data without a "
        "held-out split)",
        flag="--eval-size",
    )
    streaming: bool = setting(
        False,
        "stream the training data (datasets' IterableDataset, tokenized and packed on the fly): for sets larger "
        "than memory or disk; needs max_steps, shuffles within a buffer, and is not cached",
        flag={"--streaming": True},
    )
    shuffle_buffer: int = setting(10_000, "streaming: examples shuffled together (an exact shuffle needs no streaming)")
    cache_dir: str | None = setting(
        None,
        "where read and tokenized data is cached (default: $NEFTUNE_CACHE/data, else ~/.cache/neftune/data)",
        flag="--data-cache-dir",
    )
    num_proc: int | None = setting(
        None,
        "processes that tokenize (default: one per core, up to 8, from 5,000 examples on; else 1)",
        flag="--num-proc",
    )


@dataclass
class NoiseConfig:
    alpha: float = setting(5.0, "NEFTune alpha; 0 disables the noise", flag="--alpha")
    distribution: Distribution = setting("uniform", "uniform (the paper) or gaussian")


@dataclass
class TrainConfig:
    output: str = setting("runs/train", "output directory (model, checkpoints, metrics, config)", flag="--output")
    epochs: float | None = setting(
        None,
        "passes over the training data (default 1; when neither this nor max_steps is set, a built-in data "
        "set's own default steps apply: 40 for builtin:skills, to finish in minutes on a CPU)",
        flag="--epochs",
    )
    max_steps: int | None = setting(None, "optimizer steps; overrides epochs", flag="--max-steps")
    lr: float | None = setting(
        None, "peak learning rate (default 2e-4 for LoRA, 2e-5 for full finetuning)", flag="--lr"
    )
    batch_size: int = setting(8, "examples per optimizer step per process, before accumulation", flag="--batch-size")
    grad_accum: int = setting(1, "gradient accumulation steps")
    warmup_ratio: float = setting(0.03, "share of steps used for linear warmup")
    scheduler: str = setting("cosine", "learning-rate schedule (any transformers scheduler name)")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    seed: int = setting(0, "seed for initialisation, data order and noise", flag="--seed")
    save_steps: int = setting(50, "write a checkpoint every N steps")
    save_total_limit: int = setting(2, "checkpoints kept")
    eval_steps: int = setting(50, "measure held-out loss (noise off) every N steps")
    logging_steps: int = setting(5, "log training loss every N steps")
    resume: bool = setting(False, "continue from the last checkpoint in the output directory", flag="--resume")
    gradient_checkpointing: bool | None = setting(
        None, "recompute activations to save memory (default: on for CUDA, off for CPU)"
    )
    method: Method = setting(
        "sft",
        "sft: supervised finetuning on instruction data; dpo: preference training (TRL's DPOTrainer) on "
        "prompt/chosen/rejected records, the policy noised and the reference never (builtin:skills becomes "
        "generated pairs)",
        flag="--method",
    )
    dpo_beta: float = setting(0.1, "DPO beta: how far the policy may move from the reference (with --method dpo)")
    progress: bool = setting(True, "show progress bars", flag={"--no-progress": False})
    loss: Loss = setting(
        "auto",
        "labelled: LM head and cross-entropy only where there are labels, in chunks (no full logits tensor); "
        "full: the model's own loss; auto: labelled on CPU, where it is measured faster, else full",
    )


@dataclass
class Config:
    """Everything ``neftune train`` needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> Config:
        """Raise :class:`ConfigError` naming the first invalid field; return self."""
        a = self.noise.alpha
        if not isinstance(a, (int, float)) or isinstance(a, bool) or not math.isfinite(a) or a < 0:
            raise ConfigError(f"noise.alpha must be a finite number >= 0, got {a!r}")
        check_choice("noise.distribution", self.noise.distribution, Distribution)
        check_choice("data.format", self.data.format, DataFormat)
        check_choice("data.on_bad_record", self.data.on_bad_record, BadRecordPolicy)
        check_choice("model.dtype", self.model.dtype, Dtype)
        check_choice("train.loss", self.train.loss, Loss)
        check_choice("train.method", self.train.method, Method)
        b = self.train.dpo_beta
        if not isinstance(b, (int, float)) or isinstance(b, bool) or not math.isfinite(b) or b <= 0:
            raise ConfigError(f"train.dpo_beta must be a finite number > 0, got {b!r}")
        check_choice("model.attention", self.model.attention, Attention)
        for name, value in [
            ("data.max_length", self.data.max_length),
            ("train.batch_size", self.train.batch_size),
            ("train.grad_accum", self.train.grad_accum),
            ("train.save_steps", self.train.save_steps),
            ("train.eval_steps", self.train.eval_steps),
            ("train.logging_steps", self.train.logging_steps),
            ("model.lora_r", self.model.lora_r),
            ("data.shuffle_buffer", self.data.shuffle_buffer),
        ]:
            check_positive(name, value)
        optional: list[tuple[str, int | None]] = [
            ("data.limit", self.data.limit),
            ("data.eval_limit", self.data.eval_limit),
            ("data.num_proc", self.data.num_proc),
            ("train.max_steps", self.train.max_steps),
        ]
        for name, maybe in optional:
            if maybe is not None:
                check_positive(name, maybe)
        size = self.data.eval_size
        if size is not None and (
            isinstance(size, bool) or not isinstance(size, (int, float)) or not math.isfinite(size) or size <= 0
        ):
            raise ConfigError(f"data.eval_size must be a count >= 1 or a share in (0, 1), got {size!r}")
        if size is not None and size >= 1 and size != int(size):
            raise ConfigError(f"data.eval_size above 1 is a count of examples and must be whole, got {size!r}")
        if self.data.split != "train" and Path(self.data.train).expanduser().is_file():
            raise ConfigError(
                f"data.split={self.data.split!r} chooses a split of a datasets directory, dataset repository or hub "
                f"data set; {self.data.train} is a single file"
            )
        if size is not None and self.data.eval:
            raise ConfigError(
                "data.eval_size splits held-out examples off the training data; it cannot be combined with "
                f"data.eval (--eval-data {self.data.eval})"
            )
        if size is not None and _has_own_heldout_split(self.data.train):
            raise ConfigError(
                f"{self.data.train} has its own held-out split; data.eval_size applies to custom training data"
            )
        if self.data.streaming and self.train.max_steps is None:
            raise ConfigError("data.streaming needs train.max_steps (--max-steps): a stream has no known length")
        if self.data.streaming and size is not None and size < 1:
            raise ConfigError("data.streaming holds out a count of examples (data.eval_size >= 1), not a share")
        epochs = self.train.epochs
        if epochs is not None and not (epochs > 0 and math.isfinite(epochs)):
            raise ConfigError(f"train.epochs must be > 0, got {epochs}")
        if self.train.lr is not None and not (self.train.lr > 0 and math.isfinite(self.train.lr)):
            raise ConfigError(f"train.lr must be a positive number, got {self.train.lr}")
        if not 0 <= self.train.warmup_ratio < 1:
            raise ConfigError(f"train.warmup_ratio must be in [0, 1), got {self.train.warmup_ratio}")
        if not str(self.train.output).strip():
            raise ConfigError("train.output must be a directory path")
        if not str(self.model.name).strip():
            raise ConfigError("model.name must not be empty")
        return self


def check_choice(name: str, value: Any, kind: Any) -> None:
    """Raise :class:`ConfigError` unless ``value`` is one of the values of the ``Literal`` type ``kind``."""
    choices = choices_of(kind) or ()
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _has_own_heldout_split(spec: str) -> bool:
    from neftune.data.presets import get_preset

    preset = get_preset(spec)
    return preset is not None and preset.heldout_from_train


def check_positive(name: str, value: Any) -> None:
    """Raise :class:`ConfigError` unless ``value`` is an integer >= 1."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def load_config(
    cls: type = Config,
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    recipe: str | None = None,
) -> Any:
    """Defaults, then the recipe (:func:`recipe_path`), then the YAML file, then overrides; validated."""
    data = read_yaml(recipe_path(recipe)) if recipe else {}
    if path:
        merge_tree(data, read_yaml(path))
    apply_overrides(data, overrides or [])
    cfg = from_dict(cls, data)
    cfg.validate()
    return cfg
