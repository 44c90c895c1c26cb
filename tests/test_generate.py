"""Batched generation (order, left padding, stopping) and AlpacaEval outputs files."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from neftune.data.formats import Example
from neftune.data.template import encode_prompt
from neftune.errors import DataError
from neftune.generate import (
    REQUIRED_KEYS,
    Completion,
    generate_completions,
    generate_outputs,
    generate_texts,
    generate_token_ids,
    instruction_of,
    read_outputs,
    stop_token_ids,
    write_outputs,
)
from neftune.tiny import build_tiny_model, build_tiny_tokenizer


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return model, tokenizer


def _chat(tokenizer, text: str) -> str:
    messages = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


PROMPT_TEXTS = [
    "hi",
    "a considerably longer prompt, with many more bytes than the others in the batch",
    "mid-sized prompt",
    "x",
    "another fairly long prompt that needs plenty of left padding for the short ones",
]


def test_left_padding_gives_same_tokens_as_alone(loaded):
    model, tokenizer = loaded
    prompts = [_chat(tokenizer, t) for t in PROMPT_TEXTS]
    alone = [generate_token_ids(model, tokenizer, [p], max_new_tokens=12, progress=False)[0] for p in prompts]
    batched = generate_token_ids(model, tokenizer, prompts, max_new_tokens=12, batch_size=8, progress=False)
    assert batched == alone
    assert any(len(ids) > 0 for ids in alone)


def test_order_preserved_when_sorting_by_length(loaded):
    model, tokenizer = loaded
    prompts = [_chat(tokenizer, t) for t in PROMPT_TEXTS]
    kw = {"max_new_tokens": 8, "batch_size": 2, "progress": False}
    unsorted = generate_texts(model, tokenizer, prompts, sort_by_length=False, **kw)
    ordered = generate_texts(model, tokenizer, prompts, sort_by_length=True, **kw)
    assert ordered == unsorted
    assert len(set(ordered)) > 1  # different prompts, different answers: a shuffle would show
    assert all(o == o.strip() for o in ordered)


def test_tokenizer_and_model_state_restored(loaded):
    model, tokenizer = loaded
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    model.train()
    generate_texts(model, tokenizer, [_chat(tokenizer, "hello")], max_new_tokens=2, progress=False)
    assert model.training
    model.eval()
    assert (tokenizer.padding_side, tokenizer.pad_token) == (side, pad)
    assert generate_texts(model, tokenizer, [], progress=False) == []


def test_sampling_is_seeded_by_torch(loaded, capsys):
    model, tokenizer = loaded
    prompts = [_chat(tokenizer, t) for t in PROMPT_TEXTS[:3]]
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(generate_token_ids(model, tokenizer, prompts, max_new_tokens=10, do_sample=True, progress=True))
    assert runs[0] == runs[1]
    greedy = generate_token_ids(model, tokenizer, prompts, max_new_tokens=10, progress=False)
    assert runs[0] != greedy
    assert "generating" in capsys.readouterr().err  # the progress bar


class _ForceToken(torch.nn.Module):
    """LM head wrapper that makes one token overwhelmingly likely at every step."""

    def __init__(self, head: torch.nn.Module, token_id: int) -> None:
        super().__init__()
        self.head, self.token_id = head, token_id

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden)
        logits[..., self.token_id] += 1e4
        return logits


def test_stops_at_end_of_turn_even_when_eos_differs():
    tokenizer = build_tiny_tokenizer()
    tokenizer.eos_token = "<|endoftext|>"  # a base-model eos; turns still end with <|im_end|>
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert stop_token_ids(tokenizer) == [tokenizer.eos_token_id, im_end]
    model = build_tiny_model(vocab_size=len(tokenizer))
    model.generation_config.eos_token_id = None
    model.lm_head = _ForceToken(model.lm_head, im_end)
    ids = generate_token_ids(model, tokenizer, [_chat(tokenizer, "stop now")], max_new_tokens=20, progress=False)
    assert ids == [[]]


def test_each_completion_says_whether_it_reached_the_cap():
    tokenizer = build_tiny_tokenizer()
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model = build_tiny_model(vocab_size=len(tokenizer))
    head = model.lm_head
    prompts = [_chat(tokenizer, "go on"), _chat(tokenizer, "and on, in a longer prompt")]
    model.lm_head = _ForceToken(head, 7)  # never an end token: every answer runs into the cap
    assert generate_completions(model, tokenizer, prompts, max_new_tokens=5, progress=False) == [
        Completion([7] * 5, True),
        Completion([7] * 5, True),
    ]
    model.lm_head = _ForceToken(head, im_end)  # ends at once: nothing was cut
    assert generate_completions(model, tokenizer, prompts, max_new_tokens=5, progress=False) == [
        Completion([], False),
        Completion([], False),
    ]


def _examples() -> list[Example]:
    return [
        Example(
            messages=[
                {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "4"},
            ],
            meta={"family": "arithmetic", "answer": "4", "blob": "z" * 5000, "nested": {"a": 1}},
        ),
        Example(
            messages=[
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "first question"},
                {"role": "assistant", "content": "first answer"},
                {"role": "user", "content": "follow-up question"},
                {"role": "assistant", "content": "follow-up answer"},
            ],
        ),
        Example(messages=[{"role": "user", "content": "open question"}]),
    ]


def test_generate_outputs_alpaca_eval_format(loaded, tmp_path):
    model, tokenizer = loaded
    records = generate_outputs(
        model, tokenizer, _examples(), generator_name="tiny", dataset_name="unit", max_new_tokens=6, progress=False
    )
    assert len(records) == 3
    for record in records:
        for key in REQUIRED_KEYS:
            assert isinstance(record[key], str)
        assert record["generator"] == "tiny" and record["dataset"] == "unit"
    assert records[0]["instruction"] == "What is 2+2?"
    assert records[0]["reference"] == "4"
    # Only short scalars are carried along.
    assert records[0]["meta"] == {"family": "arithmetic", "answer": "4"}
    # Multi-turn: the instruction is the last user turn before the answer.
    assert records[1]["instruction"] == "follow-up question"
    assert records[1]["reference"] == "follow-up answer" and "meta" not in records[1]
    # No assistant turn: nothing to use as a reference.
    assert records[2]["instruction"] == "open question" and "reference" not in records[2]
    # whether each answer was cut off at max_new_tokens, as generation saw it
    prompts = [encode_prompt(tokenizer, e.prompt_messages) for e in _examples()]
    done = generate_completions(model, tokenizer, prompts, max_new_tokens=6, progress=False)
    assert [r["reached_cap"] for r in records] == [c.reached_cap for c in done]
    assert [r["reached_cap"] for r in records] == [len(c.ids) == 6 for c in done]

    path = write_outputs(tmp_path / "sub" / "outputs.json", records)
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(raw, list) and raw == records
    assert read_outputs(path) == records


def test_instruction_of_requires_user_turn():
    assert (
        instruction_of(
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
        )
        == "c"
    )
    with pytest.raises(ValueError):
        instruction_of([{"role": "system", "content": "s"}])


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ('{"instruction": "a"}', "expected a JSON list"),
        ('[{"instruction": "a", "output": "b"}]', "record 0 has no 'generator'"),
        ('[{"instruction": "a", "output": "b", "generator": "g", "dataset": 1}]', "'dataset' must be a string"),
        ('[{"instruction": "a", "output": "b", "generator": "g", "dataset": "d"}, 3]', "record 1 is int"),
        (
            '[{"instruction": "a", "output": 5, "generator": "g", "dataset": "d"}]',
            "record 0 field 'output' must be a string",
        ),
        (
            '[{"instruction": "a", "output": "b", "generator": "g", "dataset": "d", "meta": []}]',
            "'meta' must be an object",
        ),
        (
            '[{"instruction": "a", "output": "b", "generator": "g", "reached_cap": "yes"}]',
            "record 0 field 'reached_cap' must be true or false",
        ),
        ("[{]", "not valid JSON (line 1"),
    ],
)
def test_read_outputs_rejects_bad_files(tmp_path, content, fragment):
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_outputs(path)
    message = str(info.value)
    assert fragment in message and str(path) in message and "\n" not in message


def test_read_outputs_accepts_alpaca_eval_records_without_dataset(tmp_path):
    path = tmp_path / "alpaca_eval.json"
    path.write_text('[{"instruction": "a", "output": "b", "generator": "g"}]', encoding="utf-8")
    assert read_outputs(path) == [{"instruction": "a", "output": "b", "generator": "g"}]


def test_read_outputs_missing_file(tmp_path):
    with pytest.raises(DataError, match="outputs file not found"):
        read_outputs(tmp_path / "nope.json")


def test_write_outputs_validates(tmp_path):
    with pytest.raises(DataError, match="record 0 has no 'generator'"):
        write_outputs(tmp_path / "o.json", [{"instruction": "a", "output": "b", "dataset": "d"}])
    assert not (tmp_path / "o.json").exists()


def test_the_penalty_spares_the_stop_tokens_and_nothing_else():
    """PenaltySparingStops is transformers' repetition penalty with the stop tokens' scores left as they were."""
    from transformers import RepetitionPenaltyLogitsProcessor

    from neftune.generate import PenaltySparingStops

    torch.manual_seed(0)
    scores = torch.randn(3, 50)
    ids = torch.tensor([[2, 5, 5, 9], [7, 2, 11, 2], [1, 3, 4, 6]])  # token 2 plays the stop token
    plain = RepetitionPenaltyLogitsProcessor(1.3)(ids, scores.clone())
    spared = PenaltySparingStops(1.3, [2])(ids, scores.clone())
    others = [t for t in range(50) if t != 2]
    assert torch.equal(spared[:, others], plain[:, others])
    assert torch.equal(spared[:, 2], scores[:, 2])  # in rows 0 and 1 the penalty would have lowered it
    assert not torch.equal(plain[:2, 2], scores[:2, 2])
    assert torch.equal(spared[2], plain[2])  # no stop token in the row: exactly transformers' penalty


def test_sparing_the_stop_tokens_lets_answers_end_that_the_plain_penalty_keeps_going():
    tokenizer = build_tiny_tokenizer()
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model = build_tiny_model(vocab_size=len(tokenizer))

    class _EndNarrowly(torch.nn.Module):  # the end token leads many tokens by a margin a penalty of 1.5 overturns
        def __init__(self) -> None:
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))

        def forward(self, hidden):
            logits = torch.zeros(*hidden.shape[:-1], len(tokenizer)) + self.anchor
            logits[..., 7:40] = 2.0
            logits[..., im_end] = 2.5
            return logits

    model.lm_head = _EndNarrowly()
    prompt = [_chat(tokenizer, "say one thing")]  # ChatML: <|im_end|> closes the user turn in the prompt
    kw = {"max_new_tokens": 6, "repetition_penalty": 1.5, "progress": False}
    assert generate_completions(model, tokenizer, prompt, **kw) == [Completion([], False)]
    plain = generate_completions(model, tokenizer, prompt, spare_stop_tokens=False, **kw)
    # 2.5 / 1.5 < 2.0: the penalised end token loses to every token not yet said, up to the cap
    assert plain == [Completion([7, 8, 9, 10, 11, 12], True)]
    assert generate_completions(model, tokenizer, prompt, **{**kw, "repetition_penalty": 1.0}) == [
        Completion([], False)
    ]
