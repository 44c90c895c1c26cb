"""builtin:skills: determinism, held-out phrasings, correct answers, and answer checking."""

from __future__ import annotations

import re
from collections import Counter
from datetime import date

import pytest

from neftune.data import Example, check_answer, check_example, load_examples, skills_examples
from neftune.data.builtin import FAMILIES, HELD_OUT_PHRASINGS, phrasing_ids
from neftune.errors import DataError


def _numbers(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", text)]


def _quoted(text: str) -> list[str]:
    return re.findall(r'"([^"]*)"', text)


def _sentence(text: str) -> str:
    quoted = _quoted(text)
    return quoted[0] if quoted else text.split(": ", 1)[1]


_FACTORS = {
    ("kilometers", "meters"): 1000,
    ("meters", "centimeters"): 100,
    ("hours", "minutes"): 60,
    ("minutes", "seconds"): 60,
    ("days", "hours"): 24,
    ("weeks", "days"): 7,
    ("kilograms", "grams"): 1000,
    ("liters", "milliliters"): 1000,
}


def _convert(text: str) -> str:
    x = _numbers(text)[0]
    units = re.findall(r"[a-z]+", text)
    for (big, small), factor in _FACTORS.items():
        if big in units and small in units and units.index(big) != units.index(small):
            return str(x * factor)
    raise AssertionError(text)


# Independent solvers: each reads the instruction text and computes the answer its own way.
SOLVERS = {
    "addition": lambda t: str(sum(_numbers(t))),
    "subtraction": lambda t: str(abs(_numbers(t)[0] - _numbers(t)[1])),
    "multiplication": lambda t: str(_numbers(t)[0] * _numbers(t)[1]),
    "reverse_word": lambda t: "".join(reversed(_quoted(t)[0])),
    "uppercase": lambda t: _quoted(t)[0].upper(),
    "lowercase": lambda t: _quoted(t)[0].lower(),
    "sort_numbers": lambda t: ", ".join(str(n) for n in sorted(_numbers(t))),
    "max_number": lambda t: str(max(_numbers(t))),
    "count_items": lambda t: str(len(re.split(r",\s*", t.split(": ")[-1] if ": " in t else t.split("list ")[1]))),
    "count_letter": lambda t: str(
        _quoted(t)[1].count(_quoted(t)[0]) if len(_quoted(t)[0]) == 1 else _quoted(t)[0].count(_quoted(t)[1])
    ),
    "unit_conversion": _convert,
    "extract_email": lambda t: re.search(r"[\w.]+@[\w.]+\w", t).group(0),
    "extract_number": lambda t: str(_numbers(t)[0]),
    "format_date": lambda t: date.fromisoformat(re.search(r"\d{4}-\d\d-\d\d", t).group(0)).strftime("%d/%m/%Y"),
    "first_word": lambda t: _sentence(t).split()[0],
    "last_word": lambda t: _sentence(t).split()[-1].strip(".?"),
    "acronym": lambda t: "".join(w[0] for w in _quoted(t)[0].split()),
    "parity": lambda t: "odd" if _numbers(t)[0] % 2 else "even",
}


def _template_regex(phrasing: str) -> re.Pattern[str]:
    return re.compile(re.sub(r"\\\{\w+\\\}", ".+?", re.escape(phrasing)) + "$", re.S)


def test_at_least_ten_families_with_four_phrasings_and_held_out_ones():
    assert len(FAMILIES) >= 10
    assert len({f.name for f in FAMILIES}) == len(FAMILIES)
    for family in FAMILIES:
        assert len(family.phrasings) >= 4 + HELD_OUT_PHRASINGS
        assert len(set(family.phrasings)) == len(family.phrasings)
    assert set(phrasing_ids("train")).isdisjoint(phrasing_ids("test"))


def test_same_seed_same_data_other_seed_other_data():
    a, b = skills_examples("train", 300, seed=3), skills_examples("train", 300, seed=3)
    assert [(e.messages, e.meta) for e in a] == [(e.messages, e.meta) for e in b]
    other = skills_examples("train", 300, seed=4)
    assert sum(x.messages != y.messages for x, y in zip(a, other, strict=False)) > 250
    # A shorter list is a prefix of a longer one.
    assert [e.messages for e in skills_examples("train", 50, seed=3)] == [e.messages for e in a[:50]]


def test_test_split_only_uses_held_out_phrasings():
    train, test = skills_examples("train", 2000), skills_examples("test", 200)
    by_family = {f.name: f for f in FAMILIES}
    for split, examples in (("train", train), ("test", test)):
        for example in examples:
            family = by_family[example.meta["family"]]
            assert example.meta["phrasing_id"] in phrasing_ids(split)
            assert _template_regex(family.phrasings[example.meta["phrasing_id"]]).match(example.messages[0]["content"])
    # No test instruction can be produced by a train phrasing of its family.
    for example in test:
        family = by_family[example.meta["family"]]
        for pid in phrasing_ids("train"):
            assert not _template_regex(family.phrasings[pid]).match(example.messages[0]["content"]), example.messages[
                0
            ]["content"]
    used = Counter((e.meta["family"], e.meta["phrasing_id"]) for e in train)
    assert len(used) == len(FAMILIES) * len(phrasing_ids("train"))  # every train phrasing appears
    train_texts = {e.messages[0]["content"] for e in train}
    assert not train_texts & {e.messages[0]["content"] for e in test}


def test_every_answer_is_right():
    for example in skills_examples("train", 900, seed=1) + skills_examples("test", 180, seed=1):
        instruction = example.messages[0]["content"]
        family = example.meta["family"]
        assert example.reference == example.meta["answer"]
        assert SOLVERS[family](instruction) == example.meta["answer"], instruction
        assert check_example(example, example.meta["answer"])


def test_families_take_turns_and_instructions_are_short():
    examples = skills_examples("train", 2000)
    counts = Counter(e.meta["family"] for e in examples)
    assert set(counts) == {f.name for f in FAMILIES}
    assert max(counts.values()) - min(counts.values()) <= 1
    for example in examples:
        words = example.messages[0]["content"].split()
        assert 3 <= len(words) <= 25
        assert len(example.meta["answer"]) <= 40
        assert example.meta["source"].startswith("builtin:skills[train#")


def test_load_examples_sizes_and_limit():
    train = load_examples("builtin:skills")
    assert (len(train.examples), train.total, train.source) == (2000, 2000, "builtin:skills")
    assert train.summary() == "loaded 2000 of 2000 records from builtin:skills"
    test = load_examples("builtin:skills", split="test", seed=5)
    assert len(test.examples) == 200
    assert [e.messages for e in test.examples] == [e.messages for e in skills_examples("test", 200, seed=5)]
    assert len(load_examples("builtin:skills", limit=30).examples) == 30
    assert len(load_examples("builtin:skills", split="test", limit=5000).examples) == 200
    with pytest.raises(DataError, match="builtin:skills has no split 'validation'; use one of train, test"):
        load_examples("builtin:skills", split="validation")


@pytest.mark.parametrize(
    ("expected", "output"),
    [
        ("42", "42"),
        ("42", "  42.  "),
        ("42", "\n\n42\nBecause 40 + 2 = 42."),
        ("42", '"42"'),
        ("42", "`42`."),
        ("42", "**42**"),
        ("olleh", "OLLEH"),
        ("3, 5, 9", "3,5,9"),
        ("3, 5, 9", "3 ,  5, 9."),
        ("anna.river@mail.org", "Anna.River@mail.org"),
        ("05/03/2024", "'05/03/2024'"),
        ("red lamp", "red   lamp"),
    ],
)
def test_check_answer_accepts(expected, output):
    assert check_answer(expected, output)


@pytest.mark.parametrize(
    ("expected", "output"),
    [
        ("42", "43"),
        ("42", "The answer is 42."),
        ("42", "42 apples"),
        ("42", ""),
        ("42", "\n  \n"),
        ("42", "4 2"),
        ("3, 5, 9", "3, 9, 5"),
        ("05/03/2024", "5/3/2024"),
        ("even", "odd\neven"),
    ],
)
def test_check_answer_rejects(expected, output):
    assert not check_answer(expected, output)


def test_case_sensitive_families():
    assert check_answer("RED LAMP", "red lamp")
    assert not check_answer("RED LAMP", "red lamp", case_sensitive=True)
    assert check_answer("RED LAMP", '"RED LAMP".', case_sensitive=True)
    upper = next(e for e in skills_examples("train", 40) if e.meta["family"] == "uppercase")
    assert upper.meta["case_sensitive"] is True
    assert check_example(upper, upper.meta["answer"])
    assert not check_example(upper, upper.meta["answer"].lower())
    add = next(e for e in skills_examples("train", 40) if e.meta["family"] == "addition")
    assert add.meta["case_sensitive"] is False


def test_check_example_needs_an_answer():
    with pytest.raises(DataError, match=r"^x\.jsonl:3: has no reference answer"):
        check_example(Example([{"role": "user", "content": "q"}], {"source": "x.jsonl:3"}), "a")
