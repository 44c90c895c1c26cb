"""Pairwise LLM-as-judge comparison of two outputs files, with position-bias control and statistics.

Typical use::

    from neftune.outputs import read_outputs
    from neftune.judge import judge_pairs, make_judge

    judge = make_judge("http", base_url="http://127.0.0.1:8080/v1", model="judge")
    result = judge_pairs(read_outputs("runs/a/outputs.json"),      # baseline  (A)
                         read_outputs("runs/b/outputs.json"),      # candidate (B)
                         judge, cache_dir="runs/judge-cache")
    print(result.summary()); result.save("runs/judge.json")

Modules, one job each:

* :mod:`~neftune.judge.base` -- :class:`Query`, :class:`Verdict`, the :class:`Judge` interface and
  the prompt (``prompts/*.txt``, package data).
* :mod:`~neftune.judge.protocol` -- :func:`judge_pairs`: both orders of every pair, pair scores,
  failures, statistics (computed by :mod:`neftune.stats`).
* :mod:`~neftune.judge.result` -- :class:`JudgeResult` and :class:`PairVerdict`.
* :mod:`~neftune.judge.cache` -- the on-disk verdict cache (a rerun asks nothing it has).
* :mod:`~neftune.judge.parse` -- :func:`parse_verdict`, reading a verdict out of free text.
* :mod:`~neftune.judge.logprobs` -- token log-probabilities to P(first answer better), and the
  two orders' averaged log-odds.
* Backends (:data:`JUDGES`, built by :func:`make_judge` / :func:`build_judge`):
  :mod:`~neftune.judge.http` (any OpenAI-compatible endpoint: llama.cpp server, vLLM, Ollama,
  OpenAI), :mod:`~neftune.judge.local` (a transformers model, scored), :mod:`~neftune.judge.length`
  (deterministic stand-in, also ``dummy``).
"""

from __future__ import annotations

from neftune.judge.base import VERDICTS, Judge, JudgeUnreachable, Query, Verdict, VerdictUnavailable, judge_messages
from neftune.judge.http import HttpJudge
from neftune.judge.length import LengthJudge
from neftune.judge.local import LocalJudge
from neftune.judge.parse import parse_verdict
from neftune.judge.protocol import judge_pairs
from neftune.judge.registry import JUDGES, build_judge, make_judge
from neftune.judge.result import JudgeResult, PairVerdict
from neftune.stats import bootstrap_ci, length_controlled_win_rate, win_rate

__all__ = [
    "JUDGES",
    "VERDICTS",
    "HttpJudge",
    "Judge",
    "JudgeResult",
    "JudgeUnreachable",
    "LengthJudge",
    "LocalJudge",
    "PairVerdict",
    "Query",
    "Verdict",
    "VerdictUnavailable",
    "bootstrap_ci",
    "build_judge",
    "judge_messages",
    "judge_pairs",
    "length_controlled_win_rate",
    "make_judge",
    "parse_verdict",
    "win_rate",
]
