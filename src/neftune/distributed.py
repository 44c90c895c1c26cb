"""What ``neftune train`` does differently under a launcher (torchrun, ``accelerate launch``).

The training loop is transformers' ``Trainer`` on accelerate in every case; this module holds the
few decisions that depend on how the processes were launched:

* :func:`launched_strategy` reads the sharding strategy ``accelerate launch`` asks for from the
  environment it sets (``ACCELERATE_USE_FSDP``, ``ACCELERATE_USE_DEEPSPEED``).
* :func:`device_arguments` picks the ``TrainingArguments`` device fields.  accelerate 1.15 runs
  CPU processes as plain data parallel (its ``MULTI_CPU`` mode has no FSDP and no DeepSpeed), so
  an FSDP config launched without CUDA trains as DDP and says so, and a DeepSpeed one is kept out
  of that mode and runs DeepSpeed on gloo.
* :func:`is_sharded` and :func:`full_state_dict`: under FSDP or DeepSpeed ZeRO-3 no rank holds
  the whole model, so the final save gathers it with every rank taking part
  (``Accelerator.get_state_dict``) and rank 0 writes it; :func:`check_can_save` refuses, before
  training, a ZeRO-3 config that cannot gather it.
* :func:`sum_over_ranks`: tokens and seconds of every rank, for a tokens/s that counts them all.
* :func:`zero3_init_off`: loads a model on one rank without ZeRO-3's partitioned initialisation
  (merging LoRA weights after a sharded run).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch

from neftune.errors import ConfigError, NeftuneError

log = logging.getLogger("neftune")

_TRUE = ("1", "true", "yes", "on")


def launched_strategy() -> str | None:
    """``"fsdp"`` or ``"deepspeed"`` when ``accelerate launch`` was given such a config, else None."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in _TRUE:
        return "deepspeed"
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in _TRUE:
        return "fsdp"
    return None


def world_size() -> int:
    """Number of training processes (1 when not launched by a distributed launcher)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def device_arguments(cuda: bool) -> dict[str, Any]:
    """The ``TrainingArguments`` fields that choose the device: ``{"use_cpu": not cuda}`` in general.

    A DeepSpeed launch without CUDA keeps ``use_cpu`` off and asks for the gloo backend: accelerate's
    CPU mode would drop DeepSpeed (and train plain DDP on a model transformers had already
    partitioned for ZeRO-3), while DeepSpeed itself runs on CPUs with gloo.  A DeepSpeed launch
    without the ``deepspeed`` package is a :class:`ConfigError`.  An FSDP launch without CUDA logs a
    warning: accelerate runs it as DDP (every rank holds the whole model; the weights trained are
    the same, the memory saving is not there).
    """
    strategy = launched_strategy()
    if strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            "accelerate launch with a DeepSpeed config, but deepspeed is not installed: pip install deepspeed"
        )
    if not cuda and strategy == "deepspeed":
        return {"use_cpu": False, "ddp_backend": "gloo", "dataloader_pin_memory": False}
    if not cuda and strategy == "fsdp" and world_size() > 1:
        log.warning(
            "FSDP config on CPU processes: accelerate runs them as DDP (each rank holds the whole model); "
            "the weights trained are the same, the memory saving is not there"
        )
    return {"use_cpu": not cuda}


def is_sharded(trainer: Any) -> bool:
    """True when no single rank holds the whole model: FSDP, or DeepSpeed ZeRO stage 3."""
    if getattr(trainer, "is_fsdp_enabled", False):
        return True
    if getattr(trainer, "is_deepspeed_enabled", False):
        plugin = trainer.accelerator.state.deepspeed_plugin
        return getattr(plugin, "zero_stage", None) == 3
    return False


def check_can_save(trainer: Any) -> None:
    """Raise :class:`ConfigError` before training when the finished model could not be gathered:
    ZeRO-3 without ``zero3_save_16bit_model`` (``stage3_gather_16bit_weights_on_model_save``)."""
    if not (is_sharded(trainer) and getattr(trainer, "is_deepspeed_enabled", False)):
        return
    config = trainer.accelerator.state.deepspeed_plugin.deepspeed_config
    if not config.get("zero_optimization", {}).get("stage3_gather_16bit_weights_on_model_save", False):
        raise ConfigError(
            "DeepSpeed ZeRO-3 without zero3_save_16bit_model: true in the accelerate config cannot gather "
            "the trained model for saving; set it (configs/accelerate/deepspeed-zero3.yaml does)"
        )


def full_state_dict(trainer: Any) -> dict[str, torch.Tensor] | None:
    """The whole model's state dict on rank 0 after a sharded run (None on other ranks, and when
    the run was not sharded: then the unwrapped model holds every weight).

    Every rank must call this: gathering the shards is a collective operation.  Under DeepSpeed
    ZeRO-3 the weights come back in the training precision (16-bit with bf16 or fp16).
    """
    if not is_sharded(trainer):
        return None
    engine = trainer.deepspeed if getattr(trainer, "is_deepspeed_enabled", False) else trainer.model
    try:
        state = trainer.accelerator.get_state_dict(engine)
    except ValueError as error:  # ZeRO-3 with stage3_gather_16bit_weights_on_model_save off
        raise NeftuneError(
            f"could not gather the sharded model for saving: {' '.join(str(error).split())[:300]}"
        ) from error
    return state if trainer.accelerator.is_main_process else None


def sum_over_ranks(trainer: Any, values: list[float]) -> list[float]:
    """Each value summed over all training processes (every rank must call this)."""
    local = torch.tensor(values, dtype=torch.float64, device=trainer.args.device)
    if trainer.accelerator.num_processes == 1:
        return local.tolist()
    gathered = trainer.accelerator.gather(local[None])  # (ranks, len(values))
    return gathered.reshape(-1, len(values)).sum(dim=0).tolist()


def max_over_ranks(trainer: Any, value: float) -> float:
    """The largest of ``value`` over all training processes (every rank must call this)."""
    local = torch.tensor([value], dtype=torch.float64, device=trainer.args.device)
    if trainer.accelerator.num_processes == 1:
        return value
    return float(trainer.accelerator.gather(local).max().item())


@contextlib.contextmanager
def zero3_init_off() -> Iterator[None]:
    """Within the block ``from_pretrained`` loads whole weights even while a ZeRO-3 run is active.

    transformers partitions every model it loads while a DeepSpeed ZeRO-3 config is registered,
    which needs all ranks; a model that rank 0 alone loads (to merge LoRA weights) must not be.
    """
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:  # pragma: no cover - transformers always ships the module
        yield
        return
    saved = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved
