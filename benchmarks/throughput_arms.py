"""The arms of ``throughput.py`` as a table, the settings of a run and its presets (see ``throughput.py``).

Every difference between two arms is a field of :class:`ArmSpec`; the code that builds, runs and
reports an arm reads those fields and never tests an arm's name.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Literal

import torch

import neftune
from neftune.machine import versions

RANDOM_LLAMA = "random-llama-1b"


@dataclass(frozen=True)
class ArmSpec:
    """What one arm trains with, on the model, data, batch size, max length and lr every arm shares."""

    name: str
    label: str
    """The setup in words, as the report prints it."""
    trainer: Literal["trl", "neftune"]
    """TRL's ``SFTTrainer`` (its collators, its fused LM head) or a transformers ``Trainer`` set up as
    ``neftune train`` sets it up (the model's own loss unless ``labelled_loss``)."""
    batches: Literal["padded", "packed", "full rows"]
    """Padded rows; padding-free packed rows (TRL: ``packing=True``, strategy bfd, ``--trl-pack-rows``
    rows of ``max_length`` per step); or equal rows of ``ceiling_length`` random tokens, every one
    labelled, stacked as they are (no mask, no position ids)."""
    noise: bool
    """NEFTune at ``--alpha``: transformers' built-in ``neftune_noise_alpha`` under TRL, per-example
    ``NEFTuneCallback`` under neftune."""
    packed_attention: bool = False
    """The attention ``neftune train`` picks for packed rows (``model.attention=auto``), else ``--attn``."""
    labelled_loss: bool = False
    """The LM head and cross-entropy at labelled positions only (``neftune.lmhead``, ``train.loss=labelled``)."""
    every_batch_size: bool = True
    """Run at every ``--batch-sizes`` entry, else at the first only."""

    def __post_init__(self) -> None:
        if self.trainer == "trl" and (self.packed_attention or self.labelled_loss or self.batches == "full rows"):
            raise ValueError(f"arm {self.name}: a TRL arm runs TRL's own attention, loss and data")

    def setup(self, result: dict[str, Any], settings: dict[str, Any]) -> str:
        """The report's setup cell: the label, and the rows per step where they are not the batch's examples."""
        rows = result["per_device_train_batch_size"]
        if self.batches == "full rows":
            return f"{self.label} ({rows}x{settings['ceiling_length']})"
        if self.trainer == "trl" and self.batches == "packed":
            return f"{self.label} ({rows} rows of {settings['max_length']})"
        return self.label


ARM_SPECS: dict[str, ArmSpec] = {
    spec.name: spec
    for spec in (
        ArmSpec("a", "TRL SFTTrainer, padded, built-in NEFTune", "trl", "padded", noise=True),
        ArmSpec("b", "TRL SFTTrainer, packing=True (bfd, padding-free), built-in NEFTune", "trl", "packed", noise=True),
        ArmSpec(
            "c",
            "neftune train, packed (padding-free), per-example NEFTune, the model's own loss",
            "neftune",
            "packed",
            noise=True,
            packed_attention=True,
        ),
        ArmSpec("d", "neftune train --no-packing (padded), per-example NEFTune", "neftune", "padded", noise=True),
        ArmSpec("e", "neftune train, packed, no NEFTune", "neftune", "packed", noise=False, packed_attention=True),
        ArmSpec(
            "f",
            "neftune train, packed, per-example NEFTune, transformers' SDPA over the whole row",
            "neftune",
            "packed",
            noise=True,
        ),
        ArmSpec(
            "g",
            "neftune train, packed, per-example NEFTune, LM head and loss at labelled positions only",
            "neftune",
            "packed",
            noise=True,
            packed_attention=True,
            labelled_loss=True,
        ),
        ArmSpec(
            "ceiling",
            "fixed-shape ceiling: full rows, no mask, no NEFTune",
            "neftune",
            "full rows",
            noise=False,
            every_batch_size=False,
        ),
    )
}
ARMS = tuple(ARM_SPECS)
BASELINE = "a"
"""The arm every other one is measured against (``vs_a`` in the results, ``vs (a)`` in the report)."""

RATIOS: tuple[tuple[str, str, str, str], ...] = (
    ("c_over_a", "c", "a", "(c)/(a)"),
    ("c_over_b", "c", "b", "(c)/(b)"),
    ("b_over_a", "b", "a", "(b)/(a)"),
    ("c_over_d", "c", "d", "(c)/(d)"),
    ("c_over_f", "c", "f", "(c)/(f) varlen vs SDPA"),
    ("g_over_c", "g", "c", "(g)/(c) labelled-only loss"),
    ("g_over_a", "g", "a", "(g)/(a)"),
    ("packed_over_ceiling", "c", "ceiling", "packed (c)/ceiling"),
)
"""The headline ratios of real tokens/s: key, numerator arm, denominator arm, the report's words."""
NOISE_OVERHEAD = ("c", "e")
"""The arms whose ratio is NEFTune's overhead: the same setup with and without the noise."""


@dataclass
class Settings:
    """Everything one benchmark run does; presets fill it, flags override single fields."""

    preset: str
    model: str
    data: str
    batch_sizes: list[int]
    max_length: int
    warmup: int
    steps: int
    arms: list[str]
    lora: bool = True
    lora_r: int = 16
    alpha: float = 5.0
    trl_pack_rows: str = "match"
    ceiling_length: int = 2048
    attn: str = "sdpa"
    gradient_checkpointing: bool | None = None
    gen_prompts: int = 64
    gen_max_new_tokens: int = 32
    gen_batch_size: int = 16
    gen_prompt_max: int = 256
    seed: int = 0


PRESETS: dict[str, Settings] = {
    "smoke": Settings(
        preset="smoke",
        model="tiny-random",
        data="alpaca-like",
        batch_sizes=[4],
        max_length=256,
        warmup=1,
        steps=2,
        arms=list(ARMS),
        ceiling_length=256,
        gen_prompts=16,
        gen_max_new_tokens=8,
        gen_batch_size=4,
        gen_prompt_max=64,
    ),
    "cpu": Settings(
        preset="cpu",
        model="smollm2-135m",
        data="sharegpt",
        batch_sizes=[8],
        max_length=1024,
        warmup=2,
        steps=4,
        arms=["a", "b", "c", "d", "e", "f"],
    ),
    "gpu": Settings(
        preset="gpu",
        model=RANDOM_LLAMA,
        data="alpaca-like",
        batch_sizes=[8, 32],
        max_length=1024,
        warmup=3,
        steps=10,
        arms=list(ARMS),
        gen_max_new_tokens=128,
        gen_prompt_max=1024,
    ),
}


def one_line(error: BaseException) -> str:
    """An exception as ``Type: message`` on one line (the traceback goes to stderr)."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def log(message: str) -> None:
    """Progress goes to stderr, so stdout holds only the report."""
    print(message, file=sys.stderr, flush=True)


# -- shared by the throughput modules ---------------------------------------------------------


def cuda() -> bool:
    return torch.cuda.is_available()


def device() -> torch.device:
    return torch.device("cuda" if cuda() else "cpu")


PACKAGES = ("neftune", "torch", "transformers", "trl", "peft", "accelerate", "datasets")


def bench_versions() -> dict[str, str]:
    """Versions of Python, neftune (the code that runs, installed or not) and the libraries the arms run on."""
    return {**versions(PACKAGES, missing="not installed"), "neftune": neftune.__version__}
