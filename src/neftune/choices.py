"""The closed sets of values a setting or flag may take, each a ``Literal`` type.

A config field annotated with one of these types gets its allowed values from the type: the
command line offers them (``typing.get_args``), :meth:`neftune.config.Config.validate` checks them,
and the code that reads the setting is type-checked against them.  No set is written out twice.
This module imports nothing of neftune's, so the noise code and the config share it without the
config importing torch.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal

__all__ = [
    "Attention",
    "BadRecordPolicy",
    "BatchMode",
    "DataFormat",
    "Distribution",
    "Dtype",
    "GenerateBackend",
    "JudgeBackend",
    "JudgeSetting",
    "Loss",
    "Method",
    "Server",
    "choices_of",
]

Distribution = Literal["uniform", "gaussian"]
"""NEFTune's noise: uniform (the paper) or gaussian (its ablation)."""
DataFormat = Literal["auto", "alpaca", "sharegpt", "messages"]
BadRecordPolicy = Literal["error", "skip"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Attention = Literal["auto", "varlen", "sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"]
Loss = Literal["auto", "labelled", "full"]
Method = Literal["sft", "dpo"]
GenerateBackend = Literal["hf", "vllm", "openai", "auto"]
"""Who generates the answers: transformers in-process, a vLLM server neftune starts, or a server at a URL."""
Server = Literal["vllm", "sglang", "llama.cpp", "other"]
"""What serves an OpenAI-compatible URL; decides how the prompt and the repetition penalty are sent."""
JudgeBackend = Literal["local", "http", "length"]
"""The judges ``neftune judge`` can use."""
JudgeSetting = Literal["none", JudgeBackend]
"""``judge.backend`` of an experiment: a judge, or none (objective metrics only)."""
BatchMode = Literal["padded", "packed"]
"""How a framework batches examples: padded to the longest, or packed into one padding-free row."""


def choices_of(hint: Any) -> tuple[str, ...] | None:
    """The values a ``Literal`` type (or an optional one) allows, in order; None for any other type."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(inner) != 1:
            return None
        hint = inner[0]
    if typing.get_origin(hint) is Literal:
        return tuple(str(v) for v in typing.get_args(hint))
    return None
