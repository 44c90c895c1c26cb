"""Text metrics against hand-computed values, held-out loss against the model's own loss."""

from __future__ import annotations

import math
from functools import cache

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neftune.data.formats import Example
from neftune.errors import DataError
from neftune.evaluate import (
    distinct_n,
    evaluate_outputs,
    exact_match,
    heldout_loss,
    length_stats,
    repetition_rate,
    rouge_l,
)


def test_distinct_n_by_hand():
    texts = ["a b a b", "A c"]  # case-insensitive: tokens a b a b a c
    assert distinct_n(texts, 1) == pytest.approx(3 / 6)
    # bigrams: (a,b) (b,a) (a,b) | (a,c) -- none spans the two texts
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert distinct_n(["one"], 2) == 0.0
    assert distinct_n([], 1) == 0.0


def test_repetition_rate_by_hand():
    looping = "a b c d a b c d"  # 4-grams: abcd bcda cdab dabc abcd -> 1 repeat of 5
    assert repetition_rate([looping]) == pytest.approx(1 / 5)
    # "x y" has no 4-gram and is left out of the average; "a b c d e" has no repeat.
    assert repetition_rate([looping, "x y", "a b c d e"]) == pytest.approx((1 / 5 + 0) / 2)
    assert repetition_rate(["the " * 50]) == pytest.approx(1 - 1 / 47)
    assert repetition_rate(["short"]) == 0.0


def test_rouge_l_by_hand():
    # LCS "the cat on the mat" = 5 words; P = 5/6, R = 1 -> F = 10/11
    assert rouge_l("the cat sat on the mat", "the cat on the mat") == pytest.approx(10 / 11)
    assert rouge_l("Same words", "same   words") == 1.0
    assert rouge_l("a b", "c d") == 0.0
    assert rouge_l("", "a") == 0.0 and rouge_l("a", "") == 0.0


@cache
def _lcs_reference(a: tuple[str, ...], b: tuple[str, ...]) -> int:
    if not a or not b:
        return 0
    if a[0] == b[0]:
        return 1 + _lcs_reference(a[1:], b[1:])
    return max(_lcs_reference(a[1:], b), _lcs_reference(a, b[1:]))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from("abc"), max_size=8), st.lists(st.sampled_from("abc"), max_size=8))
def test_rouge_l_matches_recursive_lcs(pred, ref):
    value = rouge_l(" ".join(pred), " ".join(ref))
    lcs = _lcs_reference(tuple(pred), tuple(ref))
    expected = 0.0 if lcs == 0 else 2 * lcs / (len(pred) + len(ref))  # F1 of LCS/len(p), LCS/len(r)
    assert value == pytest.approx(expected)
    assert value == pytest.approx(rouge_l(" ".join(ref), " ".join(pred)))


def test_length_stats(tiny_tokenizer):
    texts = ["ab", "abcd", "", "abcdefghij"]
    stats = length_stats(texts, tiny_tokenizer)
    assert stats["n"] == 4 and stats["empty"] == 1
    chars = stats["chars"]
    assert chars["values"] == [2, 4, 0, 10]
    assert chars["mean"] == pytest.approx(4.0)
    assert chars["median"] == pytest.approx(3.0)
    assert chars["p90"] == pytest.approx(8.2)  # numpy linear interpolation between 4 and 10
    assert (chars["min"], chars["max"]) == (0, 10)
    # The tiny tokenizer is byte-level without merges: one token per ASCII character.
    assert stats["tokens"]["values"] == [2, 4, 0, 10]
    assert length_stats(texts)["tokens"] is None
    assert length_stats([])["chars"]["mean"] == 0.0


def _skill(question: str, answer: str, family: str) -> Example:
    return Example(
        messages=[{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
        meta={"family": family, "answer": answer},
    )


def test_exact_match_per_family():
    examples = [
        _skill("2+2?", "4", "arithmetic"),
        _skill("3+3?", "6", "arithmetic"),
        _skill("reverse abc", "cba", "reverse"),
        Example(messages=[{"role": "user", "content": "free text"}, {"role": "assistant", "content": "x"}]),
    ]
    result = exact_match(["4", "7", "cba", "anything"], examples)
    assert (result["correct"], result["n"]) == (2, 3)
    assert result["accuracy"] == pytest.approx(2 / 3)
    assert result["per_family"]["arithmetic"] == {"accuracy": 0.5, "correct": 1, "n": 2}
    assert result["per_family"]["reverse"] == {"accuracy": 1.0, "correct": 1, "n": 1}
    with pytest.raises(DataError):
        exact_match(["4"], examples)
    # The first non-empty line counts, case-insensitively unless the example says otherwise.
    cased = _skill("spell it", "Abc", "spelling")
    assert exact_match(["\n abc \nmore"], [cased])["correct"] == 1
    cased.meta["case_sensitive"] = True
    assert exact_match(["abc"], [cased])["correct"] == 0


def test_evaluate_outputs_with_answers():
    examples = [
        _skill("2+2?", "4", "arithmetic"),
        _skill("3+3?", "6", "arithmetic"),
        Example(messages=[{"role": "user", "content": "free"}]),
    ]
    records = [
        {"instruction": q, "output": o, "generator": "g", "dataset": "d"}
        for q, o in (("2+2?", "4"), ("3+3?", "five"), ("free", "whatever"))
    ]
    report = evaluate_outputs(records, examples)
    assert report["exact_match"]["accuracy"] == 0.5
    assert report["per_example"]["correct"] == [True, False, None]
    assert report["per_example"]["rouge_l"] == [1.0, 0.0, None]
    assert report["rouge_l"] == {"mean": 0.5, "n": 2}


def _chat_examples() -> list[Example]:
    return [
        Example(messages=[{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]),
        Example(
            messages=[
                {"role": "user", "content": "a much longer question about things"},
                {"role": "assistant", "content": "and a much longer answer, too"},
            ]
        ),
        Example(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "ok"}]),
    ]


def test_heldout_loss_matches_model_loss(tiny_model, tiny_tokenizer):
    from neftune.data.template import encode_examples

    examples = _chat_examples()
    features, _ = encode_examples(tiny_tokenizer, examples, 256)
    # Reference: the model's own (mean over labelled tokens) loss, example by example, token-weighted.
    total, count = 0.0, 0
    tiny_model.eval()
    with torch.no_grad():
        for feature in features:
            ids = torch.tensor([feature["input_ids"]])
            labels = torch.tensor([feature["labels"]])
            n = int((labels[:, 1:] != -100).sum())
            total += float(tiny_model(input_ids=ids, labels=labels).loss) * n
            count += n

    tiny_model.train()
    batched = heldout_loss(tiny_model, tiny_tokenizer, examples, max_length=256, batch_size=3)
    single = heldout_loss(tiny_model, tiny_tokenizer, examples, max_length=256, batch_size=1)
    assert tiny_model.training  # mode restored
    assert batched["tokens"] == single["tokens"] == count
    assert batched["loss"] == pytest.approx(total / count, rel=1e-5)
    assert single["loss"] == pytest.approx(batched["loss"], rel=1e-5)
    assert batched["perplexity"] == pytest.approx(math.exp(batched["loss"]))
    assert batched["examples"] == 3


def test_heldout_loss_without_assistant_tokens(tiny_model, tiny_tokenizer):
    with pytest.raises(DataError, match="no assistant tokens"):
        heldout_loss(
            tiny_model,
            tiny_tokenizer,
            [Example(messages=[{"role": "user", "content": "x"}])],
            max_length=64,
            batch_size=2,
        )


def test_evaluate_outputs_combines_metrics(tiny_tokenizer):
    examples = _chat_examples()
    records = [
        {"instruction": "hello", "output": "hi there", "generator": "g", "dataset": "d"},
        {
            "instruction": "a much longer question about things",
            "output": "an answer",
            "generator": "g",
            "dataset": "d",
            "reference": "an answer",
        },
        {"instruction": "q", "output": "no no no no no no", "generator": "g", "dataset": "d"},
    ]
    report = evaluate_outputs(records, examples, tiny_tokenizer)
    assert report["n"] == 3
    assert report["lengths"]["chars"]["values"] == [8, 9, 17]
    assert report["lengths"]["tokens"]["values"] == [8, 9, 17]
    assert report["distinct_1"] == pytest.approx(5 / 10)
    assert report["repetition_4"] == pytest.approx(2 / 3)
    # references: the record's own for #1, the examples' for #0 and #2
    assert report["rouge_l"]["n"] == 3
    assert report["rouge_l"]["mean"] == pytest.approx((1.0 + 1.0 + 0.0) / 3)
    assert "exact_match" not in report  # no example carries an answer
    assert report["per_example"] == {"length_chars": [8, 9, 17], "correct": None, "rouge_l": [1.0, 1.0, 0.0]}

    alone = evaluate_outputs(records[:1])
    assert "rouge_l" not in alone and alone["lengths"]["tokens"] is None


def test_evaluate_outputs_checks_alignment():
    examples = _chat_examples()
    records = [{"instruction": i, "output": "x", "generator": "g", "dataset": "d"} for i in ("hello", "WRONG", "q")]
    with pytest.raises(DataError, match="record 1: instruction does not match"):
        evaluate_outputs(records, examples)
    with pytest.raises(DataError, match="3 output records but 2 examples"):
        evaluate_outputs(records, examples[:2])
