"""A deterministic, dependency-free judge for tests and offline demos (registered as ``length`` and ``dummy``)."""

from __future__ import annotations

from neftune.judge.base import Judge, Query, Verdict

__all__ = ["LengthJudge"]


class LengthJudge(Judge):
    """Deterministic stand-in judge that needs no model.

    With a reference answer it prefers the answer with the higher ROUGE-L against the reference;
    without one, or when both score the same, it prefers the longer answer (in characters), which is
    the well-known bias of real LLM judges.  Equal on both counts is a tie.  Its verdicts never
    depend on the order of presentation, so its position consistency is always 1.
    """

    name = "length"
    chunk_size = 256

    def judge(self, query: Query) -> Verdict:
        """A if the first answer overlaps the reference more (or, failing that, is longer); tie if equal."""
        from neftune.evaluate import rouge_l

        if query.reference is not None:
            first = rouge_l(query.first, query.reference)
            second = rouge_l(query.second, query.reference)
            if first != second:
                return Verdict("A" if first > second else "B", "rouge-l")
        first_len, second_len = len(query.first.strip()), len(query.second.strip())
        if first_len == second_len:
            return Verdict("tie", "length")
        return Verdict("A" if first_len > second_len else "B", "length")
