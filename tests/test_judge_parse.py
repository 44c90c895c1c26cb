"""The verdict parser on a table of real-style judge replies, each with the verdict a reader would take from it."""

from __future__ import annotations

import pytest

from neftune.judge.parse import parse_verdict, strip_reasoning, token_label

THINK = (
    "<think>\nOkay, the user wants tips for staying healthy. Answer A gives one tip, answer B gives three, "
    "but A is shorter... Is A better? No: B covers exercise and sleep too, so B is better.\n</think>\n\n"
)

REPLIES: list[tuple[str, str | None]] = [
    # bare labels, with the decoration small models add
    ("A", "A"),
    ("b", "B"),
    ("Tie", "tie"),
    ("tie.", "tie"),
    (" **B**.", "B"),
    ("**A**", "A"),
    ("[[A]]", "A"),
    ("[[B]]", "B"),
    ("[[C]]", "tie"),
    ("'tie'", "tie"),
    ("`B`", "B"),
    ("(A)", "A"),
    ("B\n", "B"),
    ("Draw", "tie"),
    # a label after a heading word
    ("Answer: B", "B"),
    ("Verdict - A", "A"),
    ("Final verdict: B", "B"),
    ("Final Verdict: **A**", "A"),
    ("Winner: B", "B"),
    ("Answer A\nbecause it is better", "A"),
    ("Output (b)", "B"),
    ("Output (a) is better.", "A"),
    ("Response B", "B"),
    ("Better answer: A", "A"),
    ("The better answer is B.", "B"),
    # sentences (the first two were rejected, and retried five times each, by the old parser)
    ("A is better.", "A"),
    ("A is the better answer. It lists three concrete tips while B only says 'eat well'.", "A"),
    ("B is better than A.", "B"),
    ("B. It is more complete.", "B"),
    ("B: a is too short.", "B"),
    ("A: a clear winner.", "A"),
    ("**A** - clearer and more accurate", "A"),
    ("Tie: both are fine", "tie"),
    ("Answer B is more helpful because it explains the steps.", "B"),
    ("Overall, Response B is more accurate.", "B"),
    ("I prefer Output (a).", "A"),
    ("I would choose B.", "B"),
    ("Both are equally good.", "tie"),
    ("Both answers are equally helpful.", "tie"),
    ("Neither answer is better.", "tie"),
    ("It's a tie.", "tie"),
    # JSON
    ('{"winner": "B"}', "B"),
    ('{"verdict": "A"}', "A"),
    ('```json\n{"verdict": "tie", "reason": "both correct"}\n```', "tie"),
    ('{"winner": "model_b", "explanation": "more detail"}', "B"),
    ('{"better": "Answer A"}', "A"),
    # a final line after reasoning, and reasoning models' think blocks
    ("Answer A gives one tip.\nAnswer B gives three tips with detail.\nTherefore, B is better.", "B"),
    ("Let me compare the two.\nA is short; B explains the physics.\n\nFinal verdict: [[B]]", "B"),
    ("A\nExplanation: Answer A covers all steps.", "A"),
    (THINK + "B", "B"),
    (THINK + "**Final verdict: B**", "B"),
    ("Okay, comparing both.\nB misses the point.\n</think>\n\nA", "A"),
    ("<think>\nA or B? Hard to say.\n</think>\nTie", "tie"),
    # no single answer named: refused
    ("", None),
    ("\n\n", None),
    ("[End of answer]", None),
    ("The answer that is better depends on what the user is looking for.", None),
    ("I think both are good", None),
    ("Both answers have merit.", None),
    ("A or B", None),
    ("A, B", None),  # SmolLM2-135M on llama.cpp's server, judging two answers
    ("A, B, or tie.", None),
    ("A and B", None),
    ("AB", None),
    ("Answers", None),
    ("A good answer would be shorter", None),
    ("B.C. history", None),
    ("A is better in style but B is better in substance.", None),
    ("[[A]] or [[B]]", None),
    ('{"winner": "unclear"}', None),
    ("A is better.\nOn reflection, B is better.", None),
    ("<think>\nThe user asks for tips. Answer A is short, but answer B", None),  # cut off while thinking
    ("<think>\nA is better\n</think>", None),  # the thinking named A; the reply itself says nothing
    ("Which answer is better? Reply with exactly one word: A, B, or tie.", None),  # the prompt echoed
]


@pytest.mark.parametrize(("reply", "expected"), REPLIES, ids=[f"{i:02d}" for i in range(len(REPLIES))])
def test_parse_verdict_table(reply: str, expected: str | None) -> None:
    assert parse_verdict(reply) == expected


def test_table_is_large_and_covers_every_outcome() -> None:
    outcomes = [expected for _, expected in REPLIES]
    assert len(REPLIES) >= 40
    assert {outcomes.count(label) >= 8 for label in ("A", "B", "tie", None)} == {True}


def test_strip_reasoning() -> None:
    assert strip_reasoning("<think>x</think> B") == "B"
    assert strip_reasoning("<THINKING>x</THINKING>\nA") == "A"
    assert strip_reasoning("reasoning only ends here</think>tie") == "tie"
    assert strip_reasoning("<think>never closed") is None
    assert strip_reasoning("plain") == "plain"


@pytest.mark.parametrize(
    ("token", "label"),
    [
        *[("A", "A"), (" A", "A"), ("a", "A"), ("**A", "A"), ("[[B", "B"), (" B", "B"), ("\u2581B", "B")],
        *[(" tie", "tie"), ("Tie", "tie"), ("ti", "tie"), ("**", None), (" Answer", None), ("AB", None), ("", None)],
    ],
)
def test_token_label(token: str, label: str | None) -> None:
    assert token_label(token) == label
