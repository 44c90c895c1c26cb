"""What a pairwise judgement produced: per-pair verdicts and the summary statistics, as data, JSON and text."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from neftune.io import atomic_write_json

__all__ = ["JudgeResult", "PairVerdict"]


@dataclass
class PairVerdict:
    """Outcome of one pair.

    ``verdict_ab``: the judge's answer with the baseline shown first (A); ``verdict_ba``: with the
    candidate shown first.  ``winner_*`` translate them to ``"baseline"``, ``"candidate"`` or
    ``"tie"``.  ``verdict_score`` is the candidate's 1 / 0.5 / 0 from the two hard verdicts.
    ``p_ab`` / ``p_ba`` are the judge's probability that the candidate is better in each order (from
    token probabilities, None without them) and ``probability`` their averaged log-odds mapped back
    to a probability.  ``score`` is the number the statistics use: ``probability`` for judges that
    score by probability (the local judge), else ``verdict_score``; None if ``error``.
    """

    index: int
    instruction: str
    len_a: int
    len_b: int
    verdict_ab: str | None = None
    verdict_ba: str | None = None
    winner_ab: str | None = None
    winner_ba: str | None = None
    score: float | None = None
    consistent: bool | None = None
    error: str | None = None
    identical: bool = False
    verdict_score: float | None = None
    p_ab: float | None = None
    p_ba: float | None = None
    probability: float | None = None


def _pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.1f}%"


def _clean(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


@dataclass
class JudgeResult:
    """Everything :func:`~neftune.judge.judge_pairs` measured.  Rates are NaN when no pair could be scored.

    ``n`` counts scored pairs, ``n_failed`` pairs left out because a verdict was unavailable,
    ``n_identical`` pairs with identical answers (tied without asking, excluded from ``consistency``);
    ``n_wins``/``n_losses``/``n_ties`` split the scored pairs by their hard verdict score 1/0/0.5
    (``n_ties`` includes pairs whose two orders disagreed).

    ``win_rate``/``ci`` are the mean pair score (see ``score_basis``) with its bootstrap interval;
    ``verdict_win_rate`` is always the hard-verdict rate.  ``mean_probability``/``probability_ci``
    average the per-pair probabilities over the ``n_probability`` pairs that have one (NaN when none
    do).  ``lc_win_rate``/``lc_ci`` are the length-controlled rate; when ``lc_estimable`` is False
    they are NaN and ``lc_reason`` says why.  ``lc`` is the full dict the statistic returned;
    lengths are in characters.
    """

    judge: str
    pairs: list[PairVerdict]
    n: int
    n_failed: int
    n_wins: int
    n_losses: int
    n_ties: int
    win_rate: float
    ci: tuple[float, float]
    lc_win_rate: float
    lc_ci: tuple[float, float]
    consistency: float
    level: float
    n_identical: int = 0
    lc: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    lc_estimable: bool = True
    lc_reason: str | None = None
    score_basis: str = "verdicts"
    verdict_win_rate: float = float("nan")
    mean_probability: float = float("nan")
    probability_ci: tuple[float, float] = (float("nan"), float("nan"))
    n_probability: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (NaN becomes null)."""
        return _clean(asdict(self))

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_dict` as JSON to ``path`` atomically (parents created); return the path."""
        return atomic_write_json(path, self.to_dict())

    def _rate(self, value: float, ci: tuple[float, float]) -> str:
        if math.isnan(value):
            return "n/a"
        if any(math.isnan(bound) for bound in ci):  # e.g. every resample gives the same rate
            return f"{_pct(value)} (no interval)"
        return f"{_pct(value)} ({round(self.level * 100)}% CI {100 * ci[0]:.1f}-{100 * ci[1]:.1f})"

    def summary(self) -> str:
        """A few human-readable lines: win rates with CIs, length-controlled rate, consistency, failures."""
        lines = [
            f"judge: {self.judge}",
            f"pairs scored: {self.n} (wins {self.n_wins}, ties/disagreements {self.n_ties}, losses {self.n_losses})",
        ]
        if self.score_basis == "verdicts":
            lines.append(f"win rate of B over A: {self._rate(self.win_rate, self.ci)}")
        else:
            lines.append(
                f"win rate of B over A (averaged log-odds of both orders): {self._rate(self.win_rate, self.ci)}"
            )
            lines.append(f"hard-verdict win rate: {_pct(self.verdict_win_rate)}")
        if self.score_basis == "verdicts" and self.n_probability:
            lines.append(
                f"mean probability that B is better (logprobs, {self.n_probability} pairs): "
                + self._rate(self.mean_probability, self.probability_ci)
            )
        if self.lc_estimable or not self.n:
            lines.append(f"length-controlled win rate: {self._rate(self.lc_win_rate, self.lc_ci)}")
        else:
            lines.append(f"length-controlled win rate: not estimable ({self.lc_reason or 'no reason given'})")
        lines.append(
            f"position consistency: {_pct(self.consistency)} of {self.n - self.n_identical} judged pairs "
            f"({self.n_identical} identical pairs scored as ties unasked)"
        )
        if self.n_failed:
            lines.append(f"failed pairs: {self.n_failed} (excluded from all rates)")
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)
