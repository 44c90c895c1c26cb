"""The pairwise protocol: ask both orders of every pair, score each pair, and summarise.

Every pair is asked twice, once with the baseline shown first and once with the candidate shown
first, and the judge answers ``A`` (first answer better), ``B`` (second better) or ``tie``.  The two
answers, translated back to "baseline"/"candidate"/"tie", give the pair's hard score for the
candidate: 1 if both orders prefer the candidate, 0 if both prefer the baseline, 0.5 otherwise (a tie
in either order, or the two orders disagreeing -- the signature of position bias).  Position
consistency is the share of *judged* pairs whose two orders agree.  Two identical outputs are scored
0.5 without asking the judge and are left out of the consistency (they would inflate it).

When the judge also gives probabilities (token log-probabilities), each pair gets the mean of its two
orders' log-odds mapped back to a probability, which cancels a constant position bias.  The local
judge's pair score *is* that probability; for the http judge it is reported beside the hard-verdict
win rate.

A verdict that cannot be obtained makes its pair *failed*: it is counted in ``n_failed``, listed, and
left out of every statistic -- never scored as a tie.  Successful verdicts are cached on disk as they
arrive (:mod:`neftune.judge.cache`), so rerunning a judgement only asks for what is missing.  A server
that stops answering for longer than its retry budget stops the run (:class:`JudgeStopped`) with one
line saying how much was kept.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from neftune import stats
from neftune.errors import JudgeError
from neftune.judge.base import Judge, JudgeUnreachable, Outcome, Query, Verdict, VerdictUnavailable
from neftune.judge.cache import VerdictCache, cache_key
from neftune.judge.logprobs import p_candidate, pair_probability
from neftune.judge.registry import make_judge
from neftune.judge.result import JudgeResult, PairVerdict

__all__ = ["judge_pairs"]

logger = logging.getLogger(__name__)

_NAN = float("nan")


class JudgeStopped(JudgeError):
    """The judge's server went away: the line says what was kept and what a rerun will ask."""

    elide = False  # the command line prints it whole


def _winner(label: str, baseline_first: bool) -> str:
    if label == "tie":
        return "tie"
    first_won = label == "A"
    return "baseline" if first_won == baseline_first else "candidate"


def _check_records(records_a: Sequence[Mapping[str, Any]], records_b: Sequence[Mapping[str, Any]]) -> None:
    for side, records in (("A", records_a), ("B", records_b)):
        for index, record in enumerate(records):
            if not isinstance(record, Mapping):
                raise JudgeError(f"outputs {side}: record {index} is not an object")
            for key in ("instruction", "output"):
                if not isinstance(record.get(key), str):
                    raise JudgeError(f"outputs {side}: record {index} has no string '{key}'")
    if len(records_a) != len(records_b):
        raise JudgeError(f"outputs A has {len(records_a)} records but outputs B has {len(records_b)}")
    for index, (ra, rb) in enumerate(zip(records_a, records_b, strict=True)):
        if ra["instruction"] != rb["instruction"]:
            raise JudgeError(
                f"outputs A and B differ in instruction at index {index}: not the same prompts in the same order"
            )


def _score(pair: PairVerdict, ab: Verdict, ba: Verdict, by_probability: bool) -> None:
    """Fill ``pair`` from its two verdicts (``ab``: baseline shown first)."""
    pair.verdict_ab, pair.verdict_ba = ab.label, ba.label
    pair.winner_ab, pair.winner_ba = _winner(ab.label, True), _winner(ba.label, False)
    pair.consistent = pair.winner_ab == pair.winner_ba
    if pair.consistent and pair.winner_ab == "candidate":
        pair.verdict_score = 1.0
    elif pair.consistent and pair.winner_ab == "baseline":
        pair.verdict_score = 0.0
    else:
        pair.verdict_score = 0.5
    if ab.p_first is not None:
        pair.p_ab = p_candidate(ab.p_first, baseline_first=True)
    if ba.p_first is not None:
        pair.p_ba = p_candidate(ba.p_first, baseline_first=False)
    if ab.p_first is not None and ba.p_first is not None:
        pair.probability = pair_probability(ab.p_first, ba.p_first)
    use_probability = by_probability and pair.probability is not None
    pair.score = pair.probability if use_probability else pair.verdict_score


class _Asker:
    """Collects the verdicts of one run: from the cache, or asked in chunks with failure accounting."""

    def __init__(self, judge: Judge, cache: VerdictCache | None, max_consecutive_failures: int) -> None:
        self.judge = judge
        self.identity = judge.identity
        self.cache = cache if self.identity is not None else None
        self.max_consecutive_failures = max_consecutive_failures
        self.verdicts: dict[tuple[int, bool], Verdict] = {}
        self.errors: dict[int, str] = {}
        self.pending: list[tuple[int, bool, Query]] = []
        self.cached_hits = 0
        self._streams = "on_result" in inspect.signature(judge.judge_batch).parameters

    def add(self, index: int, baseline_first: bool, query: Query) -> None:
        hit = None
        if self.cache is not None and self.identity is not None:
            hit = self.cache.get(cache_key(self.identity, query))
        # A judge scored by probability re-asks a cached verdict that has none (written by an older version).
        if hit is not None and not (self.judge.scores_by_probability and hit.p_first is None):
            self.verdicts[(index, baseline_first)] = hit
            self.cached_hits += 1
        else:
            self.pending.append((index, baseline_first, query))

    def ask(self, progress: bool) -> None:
        from tqdm.auto import tqdm

        consecutive = 0
        last_reason = ""
        chunk = max(1, int(getattr(self.judge, "chunk_size", 32)))
        with tqdm(
            total=len(self.pending), desc="judging", unit="query", disable=not progress, dynamic_ncols=True
        ) as bar:
            for start in range(0, len(self.pending), chunk):
                batch = self.pending[start : start + chunk]
                outcomes = self._judge_batch(batch)
                gone = next((o for o in outcomes if isinstance(o, JudgeUnreachable)), None)
                for (index, baseline_first, query), outcome in zip(batch, outcomes, strict=True):
                    if isinstance(outcome, JudgeUnreachable):
                        continue
                    if isinstance(outcome, VerdictUnavailable):
                        consecutive += 1
                        reason = last_reason = str(outcome) or "verdict unavailable"
                        self.errors.setdefault(index, reason)
                        logger.warning("pair %d: no verdict: %s", index, reason)
                        continue
                    consecutive = 0
                    self.verdicts[(index, baseline_first)] = outcome
                    if not self._streams:
                        self._keep(query, outcome)
                bar.update(len(batch))
                if gone is not None:
                    raise JudgeStopped(self._stopped(str(gone)))
                if consecutive >= self.max_consecutive_failures:
                    raise JudgeError(
                        f"judge failed on {consecutive} queries in a row (last: {last_reason}); "
                        "verdicts obtained so far are cached, rerun to resume"
                    )

    def _keep(self, query: Query, outcome: Outcome) -> None:
        if isinstance(outcome, Verdict) and self.cache is not None and self.identity is not None:
            self.cache.put(cache_key(self.identity, query), outcome, self.identity)

    def _judge_batch(self, batch: list[tuple[int, bool, Query]]) -> list[Outcome]:
        """The batch's outcomes; each verdict is cached as it arrives, where the backend tells of it."""
        queries = [q for _, _, q in batch]
        if not self._streams:  # a backend written before judge_batch took on_result
            return self.judge.judge_batch(queries)
        return self.judge.judge_batch(
            queries, on_result=lambda position, outcome: self._keep(queries[position], outcome)
        )

    def _stopped(self, reason: str) -> str:
        """One line for a server that went away: what was kept, and what a rerun will ask."""
        asked = len(self.pending)
        answered = sum(1 for index, first, _ in self.pending if (index, first) in self.verdicts)
        line = f"the judge stopped answering ({reason}): {answered} of {asked} queries of this run were answered"
        if self.cache is None:
            return line + "; this judge has no cache, so a rerun asks them all again"
        return line + f" and are saved in {self.cache.path}; a rerun asks only the {asked - answered} missing"


def judge_pairs(
    records_a: Sequence[Mapping[str, Any]],
    records_b: Sequence[Mapping[str, Any]],
    backend: Judge | str,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    max_consecutive_failures: int = 20,
    progress: bool = False,
) -> JudgeResult:
    """Judge candidate outputs ``records_b`` against baseline outputs ``records_a``, pair by pair.

    Args:
        records_a, records_b: AlpacaEval records (:func:`neftune.outputs.read_outputs`) for the
            same instructions in the same order.  A ``reference`` in ``records_a`` (else
            ``records_b``) is passed to the judge.
        backend: a :class:`~neftune.judge.Judge`, or a name in :data:`~neftune.judge.JUDGES` built
            with default options.
        cache_dir: directory for the verdict cache (``verdicts.jsonl``); ``None`` disables it.
        n_boot, seed, level: bootstrap settings for every confidence interval.
        max_consecutive_failures: abort with :class:`JudgeError` after this many failed queries in a
            row (a dead endpoint), keeping every verdict obtained so far in the cache.
        progress: show a tqdm progress bar over judge queries.

    Raises :class:`JudgeError` if the files differ in length or in the instruction at some index
    (the message names the first mismatching index), or if the backend reports a fatal error.
    """
    judge = make_judge(backend) if isinstance(backend, str) else backend
    _check_records(records_a, records_b)
    notes: list[str] = []
    cache = None
    if cache_dir is not None:
        if judge.identity is None:
            notes.append("verdict cache disabled: this judge has no stable identity (unnamed in-memory model)")
        else:
            cache = VerdictCache(cache_dir)

    judge.begin_run()
    asker = _Asker(judge, cache, max_consecutive_failures)
    pairs: list[PairVerdict] = []
    for index, (ra, rb) in enumerate(zip(records_a, records_b, strict=True)):
        out_a, out_b = ra["output"], rb["output"]
        pairs.append(PairVerdict(index=index, instruction=ra["instruction"], len_a=len(out_a), len_b=len(out_b)))
        if out_a == out_b:
            asker.verdicts[(index, True)] = asker.verdicts[(index, False)] = Verdict("tie", "identical", 0.5)
            pairs[-1].identical = True
            continue
        reference = ra.get("reference") if ra.get("reference") is not None else rb.get("reference")
        for baseline_first in (True, False):
            first, second = (out_a, out_b) if baseline_first else (out_b, out_a)
            asker.add(
                index,
                baseline_first,
                Query(ra["instruction"], first, second, reference if isinstance(reference, str) else None),
            )
    asker.ask(progress)

    for pair in pairs:
        ab, ba = asker.verdicts.get((pair.index, True)), asker.verdicts.get((pair.index, False))
        if ab is None or ba is None:
            pair.error = asker.errors.get(pair.index, "verdict unavailable")
        else:
            _score(pair, ab, ba, judge.scores_by_probability)
    scored = [p for p in pairs if p.score is not None]
    n_failed = len(pairs) - len(scored)
    if n_failed:
        notes.append(f"{n_failed} of {len(pairs)} pairs failed to get both verdicts and are excluded from all rates")
    if asker.cached_hits:
        notes.append(f"{asker.cached_hits} verdicts read from the cache")
    boot = {"n_boot": n_boot, "seed": seed, "level": level}
    return _summarise(judge, pairs, scored, notes, boot)


def _summarise(
    judge: Judge, pairs: list[PairVerdict], scored: list[PairVerdict], notes: list[str], boot: dict[str, Any]
) -> JudgeResult:
    """The result's statistics; ``boot`` holds the bootstrap settings (n_boot, seed, level)."""
    scores = [float(p.score) for p in scored if p.score is not None]
    verdict_scores = [float(p.verdict_score) for p in scored if p.verdict_score is not None]
    probabilities = [p.probability for p in scored if p.probability is not None]
    lc = stats.length_controlled_win_rate(scores, [p.len_a for p in scored], [p.len_b for p in scored], **boot)
    estimable = bool(lc.get("estimable", True))
    if scored and lc.get("identifiable", True) is False and estimable:
        notes.append("length ratio is the same for every pair: length-controlled rate equals the raw rate")
    notes.extend(judge.notes())
    return JudgeResult(
        judge=judge.identity or judge.name,
        pairs=pairs,
        n=len(scores),
        n_failed=len(pairs) - len(scored),
        n_wins=sum(1 for s in verdict_scores if s == 1.0),
        n_losses=sum(1 for s in verdict_scores if s == 0.0),
        n_ties=sum(1 for s in verdict_scores if s == 0.5),
        win_rate=stats.win_rate(scores),
        ci=stats.bootstrap_ci(scores, **boot),
        lc_win_rate=float(lc["win_rate"]) if estimable else _NAN,
        lc_ci=tuple(lc["ci"]) if estimable else (_NAN, _NAN),
        lc_estimable=estimable,
        lc_reason=None if estimable else str(lc.get("reason") or "not estimable"),
        consistency=_consistency(scored),
        n_identical=sum(p.identical for p in pairs),
        level=boot["level"],
        lc=lc,
        notes=notes,
        score_basis="averaged log-odds" if judge.scores_by_probability else "verdicts",
        verdict_win_rate=stats.win_rate(verdict_scores),
        mean_probability=stats.win_rate(probabilities),
        probability_ci=stats.bootstrap_ci(probabilities, **boot),
        n_probability=len(probabilities),
    )


def _consistency(scored: list[PairVerdict]) -> float:
    judged = [p for p in scored if not p.identical]
    return sum(bool(p.consistent) for p in judged) / len(judged) if judged else _NAN
