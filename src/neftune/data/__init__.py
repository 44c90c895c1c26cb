"""Instruction data: the shared types (:mod:`.types`), file readers (:mod:`.readers`), data specs to
records (:mod:`.sources`: files, ``datasets`` directories, dataset repositories, hub ids), record layouts
and loading (:mod:`.formats`), registered built-in sets and their defaults (:mod:`.presets`), the
generated skills set (:mod:`.builtin`), prompt rendering and assistant-only tokenization
(:mod:`.template`), the cached Arrow pipeline (:mod:`.pipeline`), a run's training data
(:mod:`.prepare`), streamed training rows (:mod:`.streaming`) and batch collators (:mod:`.collate`).
"""

from __future__ import annotations

from typing import Any

from neftune.data.builtin import check_answer, check_example, skills_examples
from neftune.data.formats import load_eval_examples, load_examples
from neftune.data.presets import DataDefaults, DataPreset, defaults_for, get_preset, register_preset
from neftune.data.template import (
    IGNORE_INDEX,
    encode_example,
    encode_examples,
    encode_prompt,
    has_chat_template,
    prompt_and_target_lengths,
    render_prompt,
)
from neftune.data.types import Example, LoadResult

__all__ = [
    "IGNORE_INDEX",
    "DataDefaults",
    "DataPreset",
    "Example",
    "LoadResult",
    "PaddingCollator",
    "check_answer",
    "check_example",
    "defaults_for",
    "encode_example",
    "encode_examples",
    "encode_prompt",
    "get_preset",
    "has_chat_template",
    "load_eval_examples",
    "load_examples",
    "packing_collator",
    "prompt_and_target_lengths",
    "register_preset",
    "render_prompt",
    "skills_examples",
]


def __getattr__(name: str) -> Any:
    # The collators need torch; importing it only when they are asked for keeps loading data and
    # rendering prompts quick to start.
    if name in ("PaddingCollator", "packing_collator"):
        from neftune.data import collate

        return getattr(collate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
