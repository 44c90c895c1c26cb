"""Turning a judge's token log-probabilities into the probability that an answer is the better one.

An OpenAI-compatible server asked for ``logprobs: true, top_logprobs: k`` returns, per generated
token, the ``k`` most likely tokens and their log-probabilities.  Two shapes exist in the wild:

* the chat format (OpenAI, vLLM, llama.cpp's ``llama-server``, llama-cpp-python >= 0.2.58)::

      {"content": [{"token": "A", "logprob": -0.1, "top_logprobs": [{"token": "A", "logprob": -0.1}, ...]}]}

* the completions format some older servers also return for chat::

      {"tokens": ["A"], "token_logprobs": [-0.1], "top_logprobs": [{"A": -0.1, "B": -2.4}]}

The verdict is read at the first reply token that spells a verdict (``"A"``, ``" B"``, ``"**A"``,
``" tie"``; see :func:`neftune.judge.parse.token_label`), after any ``</think>`` reasoning, and only
when that token agrees with the verdict parsed from the reply's text.  At that position the
probabilities of all top tokens spelling ``A``, ``B`` and ``tie`` are summed, renormalised over the
three, and ``P(first better) = P(A) + P(tie) / 2``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from neftune.judge.base import log_odds
from neftune.judge.parse import token_label

__all__ = ["label_probabilities", "p_candidate", "p_first_better", "pair_probability", "verdict_position"]


def _positions(logprobs: Any) -> list[tuple[str, dict[str, float]]]:
    """``[(chosen token, {top token: logprob})]`` per generated token, from either response shape."""
    if not isinstance(logprobs, Mapping):
        return []
    positions: list[tuple[str, dict[str, float]]] = []
    content = logprobs.get("content")
    if isinstance(content, Sequence) and not isinstance(content, str):
        for item in content:
            if not isinstance(item, Mapping) or not isinstance(item.get("token"), str):
                return []
            top: dict[str, float] = {}
            for alt in item.get("top_logprobs") or []:
                if isinstance(alt, Mapping) and isinstance(alt.get("token"), str):
                    _add(top, alt["token"], alt.get("logprob"))
            _add(top, item["token"], item.get("logprob"))
            positions.append((item["token"], top))
        return positions
    tokens, tops = logprobs.get("tokens"), logprobs.get("top_logprobs")
    if isinstance(tokens, Sequence) and isinstance(tops, Sequence):
        for token, alts in zip(tokens, tops, strict=False):
            top = {}
            if isinstance(alts, Mapping):
                for alt, value in alts.items():
                    _add(top, str(alt), value)
            positions.append((str(token), top))
    return positions


def _add(top: dict[str, float], token: str, value: Any) -> None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        top.setdefault(token, float(value))


def _content_start(positions: list[tuple[str, dict[str, float]]], content: str) -> int:
    """Index of the first position of ``content`` when the logprobs also cover text before it.

    A server with a reasoning parser moves the thinking out of ``content`` (into ``reasoning_content``)
    but may still return logprobs for every generated token: the content is then their tail.
    """
    need = len(content.strip())
    if len("".join(token for token, _ in positions).strip()) <= need:
        return 0
    text = ""
    for index in range(len(positions) - 1, -1, -1):
        text = positions[index][0] + text
        if len(text.strip()) >= need:
            return index
    return 0


def verdict_position(logprobs: Any, content: str | None = None) -> tuple[str, dict[str, float]] | None:
    """The first ``(token, top logprobs)`` of the reply ``content``, after any reasoning, whose token spells a verdict.

    None when there is no such token.
    """
    positions = _positions(logprobs)
    start = _content_start(positions, content) if content is not None else 0
    for index, (token, _) in enumerate(positions):
        if index >= start and ("</think>" in token or "</reasoning>" in token):
            start = index + 1
    for token, top in positions[start:]:
        if token_label(token) is not None:
            return token, top
    return None


def label_probabilities(top: Mapping[str, float]) -> dict[str, float]:
    """``{"A", "B", "tie"}`` -> probability mass of the top tokens spelling each (not renormalised)."""
    mass = {"A": 0.0, "B": 0.0, "tie": 0.0}
    for token, logprob in top.items():
        label = token_label(token)
        if label is not None:
            mass[label] += math.exp(logprob)
    return mass


def p_first_better(logprobs: Any, verdict: str, content: str | None = None) -> float | None:
    """P(the first answer shown is better) from a reply's logprobs, or None if they cannot say.

    ``verdict`` is the label parsed from the reply's text ``content``.  None when the response has no
    logprobs, no verdict token, a verdict token that disagrees with ``verdict``, or no mass on any
    verdict among the top tokens.
    """
    found = verdict_position(logprobs, content)
    if found is None or token_label(found[0]) != verdict:
        return None
    mass = label_probabilities(found[1])
    total = sum(mass.values())
    if total <= 0:
        return None
    return (mass["A"] + 0.5 * mass["tie"]) / total


def p_candidate(p_first: float, baseline_first: bool) -> float:
    """P(candidate better) in one order, given P(first shown better)."""
    return 1.0 - p_first if baseline_first else p_first


def pair_probability(p_first_ab: float, p_first_ba: float) -> float:
    """P(candidate better) for a pair: the mean of its two orders' log-odds, mapped back to a probability.

    ``p_first_ab`` is P(first better) with the baseline shown first, ``p_first_ba`` with the candidate
    shown first.  A judge that adds a constant ``b`` to the log-odds of whichever answer comes first
    moves the two orders' log-odds for the candidate by ``-b`` and ``+b``: the mean cancels it.
    """
    # log-odds(1 - p) = -log-odds(p), written so to avoid rounding in 1 - p: equal orders give exactly 0.5.
    z = 0.5 * (log_odds(p_first_ba) - log_odds(p_first_ab))
    return 1.0 / (1.0 + math.exp(-z))
