"""Prompt rendering, assistant-only labels, truncation, the Alpaca fallback, and collators."""

from __future__ import annotations

import logging

import pytest
import torch

from neftune.data import (
    IGNORE_INDEX,
    Example,
    PaddingCollator,
    encode_example,
    encode_examples,
    encode_prompt,
    has_chat_template,
    packing_collator,
    prompt_and_target_lengths,
    render_prompt,
    skills_examples,
    template,
)
from neftune.errors import DataError
from neftune.tiny import CHATML_TEMPLATE, SPECIAL_TOKENS, build_tiny_tokenizer

ALPACA_HEAD = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
)
ALPACA_HEAD_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
)

SINGLE = Example([{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}])
MULTI = Example(
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo ü"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "ok"},
    ]
)
WITH_INPUT = Example(
    [
        {"role": "user", "content": "Translate.\n\ncheese", "instruction": "Translate.", "input": "cheese"},
        {"role": "assistant", "content": "fromage"},
    ]
)


@pytest.fixture(scope="module")
def plain_tokenizer():
    return build_tiny_tokenizer(chat_template=False)


def labelled_runs(encoded: dict[str, list[int]]) -> list[list[int]]:
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for label in encoded["labels"]:
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(label)
        previous = label
    return runs


def tokenizer_with_template(chat_template: str):
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = chat_template
    return tokenizer


# ----------------------------------------------------------------------------- render_prompt


def test_render_prompt_with_chat_template(tiny_tokenizer):
    assert has_chat_template(tiny_tokenizer)
    expected = "<|im_start|>user\nAdd 2 and 3.<|im_end|>\n<|im_start|>assistant\n"
    assert render_prompt(tiny_tokenizer, SINGLE.prompt_messages) == expected
    # A final assistant turn is the answer and is left out.
    assert render_prompt(tiny_tokenizer, SINGLE.messages) == expected
    assert render_prompt(tiny_tokenizer, MULTI.messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\nyo ü<|im_end|>\n<|im_start|>user\nagain<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_render_prompt_alpaca_fallback(plain_tokenizer):
    assert not has_chat_template(plain_tokenizer)
    assert render_prompt(plain_tokenizer, SINGLE.messages) == (
        ALPACA_HEAD + "### Instruction:\nAdd 2 and 3.\n\n### Response:\n"
    )
    assert render_prompt(plain_tokenizer, WITH_INPUT.messages) == (
        ALPACA_HEAD_INPUT + "### Instruction:\nTranslate.\n\n### Input:\ncheese\n\n### Response:\n"
    )
    # A system turn replaces the preamble; earlier answers end with eos like in training.
    assert render_prompt(plain_tokenizer, MULTI.messages) == (
        "Be brief.\n\n### Instruction:\nhi\n\n### Response:\nyo ü<|im_end|>\n\n"
        "### Instruction:\nagain\n\n### Response:\n"
    )
    # Edited contents no longer match their Alpaca parts, so the content is used as is.
    edited = [dict(WITH_INPUT.messages[0], content="Translate: cheese")]
    assert render_prompt(plain_tokenizer, edited) == (
        ALPACA_HEAD + "### Instruction:\nTranslate: cheese\n\n### Response:\n"
    )


def test_system_turn_is_folded_when_the_template_rejects_it():
    tokenizer = tokenizer_with_template(
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}" + CHATML_TEMPLATE
    )
    assert render_prompt(tokenizer, MULTI.messages[:2]) == (
        "<|im_start|>user\nBe brief.\n\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    encoded = encode_example(tokenizer, MULTI, 200)
    assert [tokenizer.decode(r) for r in labelled_runs(encoded)] == ["yo ü<|im_end|>", "ok<|im_end|>"]


def test_broken_template_is_a_data_error_or_a_drop_reason():
    tokenizer = tokenizer_with_template("{{ raise_exception('nope') }}")
    with pytest.raises(DataError, match=r"^chat template failed: nope$"):
        render_prompt(tokenizer, SINGLE.messages)
    assert encode_example(tokenizer, SINGLE, 100) == "chat template error"


# ------------------------------------------------------------------------- labels (ChatML)


def test_labels_are_exactly_the_answer_and_im_end(tiny_tokenizer):
    encoded = encode_example(tiny_tokenizer, SINGLE, 512)
    full = tiny_tokenizer.apply_chat_template(SINGLE.messages, tokenize=False)
    assert tiny_tokenizer.decode(encoded["input_ids"]) == full
    assert len(encoded["labels"]) == len(encoded["input_ids"])
    labelled = [x for x in encoded["labels"] if x != IGNORE_INDEX]
    assert tiny_tokenizer.decode(labelled) == "5<|im_end|>"
    # The unlabelled prefix is exactly the prompt a generator would feed.
    prompt_ids = encode_prompt(tiny_tokenizer, SINGLE.prompt_messages)
    assert encoded["input_ids"][: len(prompt_ids)] == prompt_ids
    assert encoded["labels"][: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert encoded["labels"][len(prompt_ids) :] == [*encoded["input_ids"][len(prompt_ids) : -1], IGNORE_INDEX]
    assert prompt_and_target_lengths(tiny_tokenizer, SINGLE) == (len(prompt_ids) + 1, 2)


def test_every_assistant_turn_is_labelled(tiny_tokenizer):
    encoded = encode_example(tiny_tokenizer, MULTI, 512)
    assert [tiny_tokenizer.decode(r) for r in labelled_runs(encoded)] == ["yo ü<|im_end|>", "ok<|im_end|>"]
    assert tiny_tokenizer.decode(encoded["input_ids"]) == tiny_tokenizer.apply_chat_template(
        MULTI.messages, tokenize=False
    )


def test_truncation_keeps_max_length_tokens(tiny_tokenizer):
    full = encode_example(tiny_tokenizer, MULTI, 512)
    prompt_len = len(encode_prompt(tiny_tokenizer, MULTI.messages[:2]))
    cut = encode_example(tiny_tokenizer, MULTI, prompt_len + 2)
    assert cut["input_ids"] == full["input_ids"][: prompt_len + 2]
    assert tiny_tokenizer.decode([x for x in cut["labels"] if x != IGNORE_INDEX]) == "yo"
    assert encode_example(tiny_tokenizer, MULTI, prompt_len) == "all prompt after truncation"


def test_encode_examples_counts_every_drop(tiny_tokenizer):
    prompt_only = Example([{"role": "user", "content": "just asking"}])
    long_prompt = Example([{"role": "user", "content": "x" * 300}, {"role": "assistant", "content": "y"}])
    examples = [SINGLE, prompt_only, MULTI, long_prompt, SINGLE]
    kept, dropped = encode_examples(tiny_tokenizer, examples, 64)
    assert kept == [encode_example(tiny_tokenizer, e, 64) for e in (SINGLE, MULTI, SINGLE)]
    assert dropped == {"no assistant turn": 1, "all prompt after truncation": 1}
    assert encode_example(tiny_tokenizer, prompt_only, 64) == "no assistant turn"
    with pytest.raises(DataError, match="no assistant turn"):
        prompt_and_target_lengths(tiny_tokenizer, prompt_only)


def test_batched_encoding_matches_single_encoding(tiny_tokenizer):
    examples = skills_examples("train", 60)
    kept, dropped = encode_examples(tiny_tokenizer, examples, 256)
    assert not dropped
    for example, encoded in zip(examples, kept, strict=False):
        assert encoded == encode_example(tiny_tokenizer, example, 256)
        answer = [x for x in encoded["labels"] if x != IGNORE_INDEX]
        assert tiny_tokenizer.decode(answer) == example.meta["answer"] + "<|im_end|>"


def test_long_texts_are_windowed_without_changing_the_result(tiny_tokenizer):
    long = Example(
        [
            {"role": "user", "content": "tell me a story " * 100},
            {"role": "assistant", "content": "once upon a time " * 200},
            {"role": "user", "content": "more " * 300},
            {"role": "assistant", "content": "the end " * 100},
        ]
    )
    text = tiny_tokenizer.apply_chat_template(long.messages, tokenize=False)
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    prompt_len = len(encode_prompt(tiny_tokenizer, long.messages[:1]))
    for max_length in (prompt_len + 1, 2000, 5000, len(ids) + 10):
        encoded = encode_example(tiny_tokenizer, long, max_length)
        assert encoded["input_ids"] == ids[:max_length]
        assert encoded["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
        assert encoded["labels"][prompt_len] == ids[prompt_len]
    runs = labelled_runs(encode_example(tiny_tokenizer, long, 10_000))
    assert [tiny_tokenizer.decode(r) for r in runs] == [
        "once upon a time " * 200 + "<|im_end|>",
        "the end " * 100 + "<|im_end|>",
    ]


def test_template_without_end_marker_gets_eos():
    tokenizer = tokenizer_with_template(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    encoded = encode_example(tokenizer, MULTI, 200)
    assert [tokenizer.decode(r) for r in labelled_runs(encoded)] == ["yo ü", "ok<|im_end|>"]
    assert tokenizer.decode(encoded["input_ids"]).endswith("assistant: ok<|im_end|>\n")


def test_template_that_decorates_earlier_answers_labels_only_the_answers():
    # Like templates that drop reasoning from earlier answers: earlier turns render differently.
    tokenizer = tokenizer_with_template(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and not loop.last %}(earlier) {% endif %}"
        "{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    encoded = encode_example(tokenizer, MULTI, 200)
    assert "(earlier) yo ü" in tokenizer.decode(encoded["input_ids"])
    assert [tokenizer.decode(r) for r in labelled_runs(encoded)] == ["yo ü<|im_end|>", "ok<|im_end|>"]


def test_template_whose_prompts_are_not_prefixes_falls_back_to_search():
    tokenizer = tokenizer_with_template("{{ messages | length }} messages\n" + CHATML_TEMPLATE)
    encoded = encode_example(tokenizer, MULTI, 200)
    assert tokenizer.decode(encoded["input_ids"]).startswith("5 messages\n<|im_start|>system")
    assert [tokenizer.decode(r) for r in labelled_runs(encoded)] == ["yo ü<|im_end|>", "ok<|im_end|>"]


def test_template_that_hides_a_message_is_dropped():
    tokenizer = tokenizer_with_template(
        "{% for m in messages %}{% if m['role'] != 'system' %}<|im_start|>{{ m['role'] }}\n"
        "{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        "{% if messages | length > 3 %}<|endoftext|>{% endif %}"
    )
    assert encode_example(tokenizer, MULTI, 200) == "chat template hides a message"


def test_prefix_property_violation_is_reported(caplog):
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab["Ċy"] = len(vocab)
    # Without regex pre-splitting, "\n" merges with the first letter of the answer.
    backend = Tokenizer(BPE(vocab=vocab, merges=[("Ċ", "y")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<pad>")
    tokenizer.chat_template = CHATML_TEMPLATE
    with caplog.at_level(logging.WARNING, logger="neftune.data.template"):
        encoded = encode_example(tokenizer, MULTI, 200)
    assert "1 of 1 examples tokenize differently across a prompt/answer boundary" in caplog.text
    # The straddling token carries the answer's first letter, so it is trained on.
    assert [tokenizer.decode(r) for r in labelled_runs(encoded)] == ["\nyo ü<|im_end|>", "ok<|im_end|>"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="neftune.data.template"):
        encode_example(build_tiny_tokenizer(), MULTI, 200)
    assert "tokenize differently" not in caplog.text


class _WithoutOffsets:
    """A tokenizer that, like Python-only tokenizers, cannot report character offsets."""

    is_fast = False

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __call__(self, text, **kwargs):
        assert not kwargs.get("return_offsets_mapping")
        return self._inner(text, **kwargs)


def test_tokenizers_without_offsets_encode_piece_by_piece(tiny_tokenizer, plain_tokenizer):
    for tokenizer in (tiny_tokenizer, plain_tokenizer):
        for max_length in (30, 512):
            assert encode_example(_WithoutOffsets(tokenizer), MULTI, max_length) == encode_example(
                tokenizer, MULTI, max_length
            )


# ------------------------------------------------------------------------- Alpaca fallback


def test_alpaca_fallback_labels_response_and_eos(plain_tokenizer, caplog):
    template._alpaca_notice_shown.clear()
    with caplog.at_level(logging.WARNING, logger="neftune.data.template"):
        encoded = encode_example(plain_tokenizer, WITH_INPUT, 512)
        encode_example(plain_tokenizer, SINGLE, 512)
    assert caplog.text.count("has no chat template: using the Alpaca prompt template") == 1
    prompt = ALPACA_HEAD_INPUT + "### Instruction:\nTranslate.\n\n### Input:\ncheese\n\n### Response:\n"
    assert plain_tokenizer.decode(encoded["input_ids"]) == prompt + "fromage<|im_end|>"
    assert plain_tokenizer.decode([x for x in encoded["labels"] if x != IGNORE_INDEX]) == "fromage<|im_end|>"
    prompt_ids = encode_prompt(plain_tokenizer, WITH_INPUT.prompt_messages)
    assert encoded["input_ids"][: len(prompt_ids)] == prompt_ids
    assert encoded["labels"][: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)

    multi = encode_example(plain_tokenizer, MULTI, 512)
    assert [plain_tokenizer.decode(r) for r in labelled_runs(multi)] == ["yo ü<|im_end|>", "ok<|im_end|>"]
    assert encode_example(plain_tokenizer, SINGLE, len(prompt_ids) // 2) == "all prompt after truncation"


# ------------------------------------------------------------------------------- collators


def test_padding_collator_right_and_left():
    features = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    right = PaddingCollator(pad_token_id=0)(features)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert right["input_ids"].dtype == torch.long
    left = PaddingCollator(pad_token_id=0, padding_side="left")([{"input_ids": [1, 2]}, {"input_ids": [3]}])
    assert left["input_ids"].tolist() == [[1, 2], [0, 3]]
    assert left["attention_mask"].tolist() == [[1, 1], [0, 1]]
    assert left["labels"].tolist() == [[1, 2], [-100, 3]]
    with pytest.raises(ValueError, match="padding_side"):
        PaddingCollator(0, padding_side="middle")


def test_packing_collator_restarts_positions(tiny_tokenizer):
    kept, _ = encode_examples(tiny_tokenizer, [SINGLE, MULTI], 512)
    batch = packing_collator()(kept)
    lengths = [len(k["input_ids"]) for k in kept]
    assert batch["input_ids"].tolist() == [kept[0]["input_ids"] + kept[1]["input_ids"]]
    assert batch["position_ids"].tolist() == [list(range(lengths[0])) + list(range(lengths[1]))]
    labels = batch["labels"][0].tolist()
    assert labels[0] == labels[lengths[0]] == IGNORE_INDEX
    assert labels[1:] == [*kept[0]["labels"][1:], IGNORE_INDEX, *kept[1]["labels"][1:]]
    assert "attention_mask" not in batch
