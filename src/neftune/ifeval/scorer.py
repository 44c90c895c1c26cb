"""IFEval scores: prompt-level and instruction-level accuracy, strict and loose, per family.

Definitions (Zhou et al. 2023, "Instruction-Following Evaluation for Large Language Models"):

* **strict**: an instruction is followed when its checker accepts the response as it is (an empty
  or blank response follows nothing);
* **loose**: it is followed when its checker accepts any of eight variants: the response, without
  its first line, without its last line, without both, and each of those four with every ``*``
  removed (markdown emphasis that trips exact checks);
* **prompt-level** accuracy: the share of prompts whose instructions are *all* followed;
  **instruction-level**: the share of all instructions followed, pooled over prompts.

An instruction id without a checker (see :func:`neftune.ifeval.checkers.unsupported_reason`) is
excluded: it is left out of every accuracy, counted under ``excluded`` and named there with the
reason.  A prompt all of whose instructions are excluded has no prompt-level result (``None``).
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from neftune.errors import DataError
from neftune.ifeval.checkers import build_checker, family_of, unsupported_reason

logger = logging.getLogger(__name__)

__all__ = ["PromptScore", "is_ifeval_example", "loose_variants", "score_ifeval", "score_response", "summary_line"]

PER_EXAMPLE_KEYS = (
    "ifeval_prompt_strict",
    "ifeval_prompt_loose",
    "ifeval_instruction_ids",
    "ifeval_instruction_strict",
    "ifeval_instruction_loose",
)
"""Keys :func:`score_ifeval` adds under ``per_example`` (lists aligned with the responses)."""


@dataclass
class PromptScore:
    """The verdicts for one response: one entry per scored instruction, in the prompt's order."""

    instruction_ids: list[str]
    strict: list[bool]
    loose: list[bool]
    excluded: list[str] = field(default_factory=list)
    """Instruction ids of the prompt that could not be scored (see the module docstring)."""
    errors: list[str] = field(default_factory=list)
    """Instruction ids whose checker raised on this response (counted as not followed)."""

    @property
    def prompt_strict(self) -> bool | None:
        """All scored instructions followed, strictly; ``None`` when none could be scored."""
        return all(self.strict) if self.instruction_ids else None

    @property
    def prompt_loose(self) -> bool | None:
        """All scored instructions followed, loosely; ``None`` when none could be scored."""
        return all(self.loose) if self.instruction_ids else None


def loose_variants(response: str) -> list[str]:
    """The eight texts the loose check tries (the response first); see the module docstring."""
    lines = response.split("\n")
    cut = [response, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return cut + [text.replace("*", "") for text in cut]


def _follows(checker: Any, text: str) -> bool:
    return bool(text.strip()) and bool(checker.check_following(text))


def score_response(
    response: str,
    instruction_ids: Sequence[str],
    kwargs: Sequence[Mapping[str, Any] | None],
    prompt: str = "",
    where: str = "response",
) -> PromptScore:
    """Check one response against its prompt's instructions, strictly and loosely.

    Args:
        response: the model's answer.
        instruction_ids: IFEval instruction ids (``"punctuation:no_comma"``, ...).
        kwargs: one dict of checker arguments per instruction (IFEval's ``kwargs``).
        prompt: the prompt, for checkers that read it.
        where: names the example in error messages.

    Raises:
        DataError: ``kwargs`` does not match ``instruction_ids`` or a checker's arguments are bad.
    """
    if len(kwargs) != len(instruction_ids):
        raise DataError(f"{where}: {len(instruction_ids)} instructions but {len(kwargs)} kwargs entries")
    variants = loose_variants(response)
    score = PromptScore([], [], [])
    for instruction_id, args in zip(instruction_ids, kwargs, strict=True):
        if unsupported_reason(instruction_id) is not None:
            score.excluded.append(instruction_id)
            continue
        checker = build_checker(instruction_id, args, prompt, where)
        try:
            strict = _follows(checker, response)
            loose = strict or any(_follows(checker, text) for text in variants[1:])
        except Exception as err:  # a checker bug must not stop a long evaluation; it is counted
            logger.warning(
                "%s: %s checker failed (%s: %s); counted as not followed",
                where,
                instruction_id,
                type(err).__name__,
                err,
            )
            score.errors.append(instruction_id)
            strict = loose = False
        score.instruction_ids.append(instruction_id)
        score.strict.append(strict)
        score.loose.append(loose)
    return score


def is_ifeval_example(example: Any) -> bool:
    """Whether ``example.meta`` carries IFEval instructions (``instruction_id_list``)."""
    return "instruction_id_list" in (getattr(example, "meta", None) or {})


def _instructions(example: Any, index: int) -> tuple[list[str], list[Any], str]:
    meta = example.meta
    ids, kwargs = meta.get("instruction_id_list"), meta.get("kwargs")
    where = f"example {index}"
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise DataError(f"{where}: meta 'instruction_id_list' must be a list of strings")
    if kwargs is None:
        kwargs = [{}] * len(ids)
    if not isinstance(kwargs, list) or not all(k is None or isinstance(k, dict) for k in kwargs):
        raise DataError(f"{where}: meta 'kwargs' must be a list of objects")
    users = [m["content"] for m in example.prompt_messages if m.get("role") == "user"]
    return ids, kwargs, users[-1] if users else ""


def _rate(hits: int, n: int) -> float | None:
    return hits / n if n else None


def _block(strict: int, loose: int, n: int) -> dict[str, Any]:
    return {"instructions": n, "strict": _rate(strict, n), "loose": _rate(loose, n)}


def score_ifeval(outputs: Sequence[str], examples: Sequence[Any]) -> dict[str, Any]:
    """IFEval accuracies of ``outputs`` (aligned with ``examples``); non-IFEval examples are skipped.

    Returns ``{"prompts", "instructions", "prompt_strict", "prompt_loose", "instruction_strict",
    "instruction_loose", "per_family", "per_instruction", "excluded", "checker_errors",
    "per_example"}``.  Accuracies are fractions (``None`` when nothing was scored); ``per_family`` and
    ``per_instruction`` map a family / instruction id to ``{"instructions", "strict", "loose"}``;
    ``excluded`` is ``{"instructions": n, "prompts": n, "ids": {id: count}, "reasons": {id: why}}``
    (``prompts`` counts prompts left with no scored instruction).  ``per_example`` holds the lists
    named in :data:`PER_EXAMPLE_KEYS`, aligned with ``outputs``: prompt results as 0/1 (``None`` for
    an example without IFEval instructions or with none scorable), and per instruction the scored
    ids and their pass/fail.
    """
    if len(outputs) != len(examples):
        raise DataError(f"IFEval: {len(outputs)} outputs for {len(examples)} examples")
    per_example: dict[str, list[Any]] = {key: [] for key in PER_EXAMPLE_KEYS}
    tallies: dict[str, dict[str, list[int]]] = {
        "family": defaultdict(lambda: [0, 0, 0]),
        "id": defaultdict(lambda: [0, 0, 0]),
    }
    prompts = prompt_strict = prompt_loose = 0
    excluded: Counter[str] = Counter()
    excluded_prompts = 0
    errors: Counter[str] = Counter()
    for index, (output, example) in enumerate(zip(outputs, examples, strict=True)):
        if not is_ifeval_example(example):
            for key in PER_EXAMPLE_KEYS:
                per_example[key].append(None)
            continue
        ids, kwargs, prompt = _instructions(example, index)
        score = score_response(str(output), ids, kwargs, prompt, where=f"example {index}")
        excluded.update(score.excluded)
        errors.update(score.errors)
        strict, loose = score.prompt_strict, score.prompt_loose
        per_example["ifeval_prompt_strict"].append(None if strict is None else int(strict))
        per_example["ifeval_prompt_loose"].append(None if loose is None else int(loose))
        per_example["ifeval_instruction_ids"].append(score.instruction_ids)
        per_example["ifeval_instruction_strict"].append([int(v) for v in score.strict])
        per_example["ifeval_instruction_loose"].append([int(v) for v in score.loose])
        if strict is None:
            excluded_prompts += 1
            continue
        prompts += 1
        prompt_strict += int(strict)
        prompt_loose += int(bool(loose))
        for instruction_id, s, lo in zip(score.instruction_ids, score.strict, score.loose, strict=True):
            for kind, name in (("family", family_of(instruction_id)), ("id", instruction_id)):
                tally = tallies[kind][name]
                tally[0] += int(s)
                tally[1] += int(lo)
                tally[2] += 1

    instructions = sum(t[2] for t in tallies["id"].values())
    return {
        "prompts": prompts,
        "instructions": instructions,
        "prompt_strict": _rate(prompt_strict, prompts),
        "prompt_loose": _rate(prompt_loose, prompts),
        "instruction_strict": _rate(sum(t[0] for t in tallies["id"].values()), instructions),
        "instruction_loose": _rate(sum(t[1] for t in tallies["id"].values()), instructions),
        "per_family": {name: _block(*tallies["family"][name]) for name in sorted(tallies["family"])},
        "per_instruction": {name: _block(*tallies["id"][name]) for name in sorted(tallies["id"])},
        "excluded": {
            "instructions": sum(excluded.values()),
            "prompts": excluded_prompts,
            "ids": dict(sorted(excluded.items())),
            "reasons": {i: unsupported_reason(i) for i in sorted(excluded)},
        },
        "checker_errors": dict(sorted(errors.items())),
        "per_example": per_example,
    }


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def summary_line(result: Mapping[str, Any]) -> str:
    """One line for a :func:`score_ifeval` result: both levels, strict and loose, and any exclusion."""
    line = (
        f"IFEval, {result['prompts']} prompts / {result['instructions']} instructions: prompt-level strict "
        f"{_percent(result['prompt_strict'])}, loose {_percent(result['prompt_loose'])}; instruction-level "
        f"strict {_percent(result['instruction_strict'])}, loose {_percent(result['instruction_loose'])}"
    )
    excluded = result["excluded"]
    if excluded["instructions"]:
        line += f"; excluded {excluded['instructions']} unsupported instructions ({', '.join(excluded['ids'])})"
    if result["checker_errors"]:
        line += f"; {sum(result['checker_errors'].values())} checker errors counted as not followed"
    return line
