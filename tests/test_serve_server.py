"""generate.backend=openai against a real llama.cpp server: the same greedy answers as the hf backend?

``llama_cpp.server`` serves the SmolLM2-135M-Instruct GGUF (Q4_1); the hf backend runs the same file
dequantized to fp32 by transformers.  The weights are the same numbers, but llama.cpp multiplies them
in 4-bit blocks against 8-bit activations, so a greedy answer follows HF's only until two candidate
tokens are close enough for the rounding to swap them, and from there each continues its own way.
Measured (BENCHMARKS.md): 1 of 12 answers identical over all 48 tokens, 8 of 12 over their first 16.
The test asserts a floor on the second (answers identical token for token up to 16 tokens), which a
wrong prompt, stop token or decoding setting would break at once, and that identical answers agree on
whether they reached the cap.  The answers are
compared without a repetition penalty: llama.cpp's skips the prompt's tokens, so neftune refuses any
other value for it (:func:`neftune.serve.penalty_fields`).

Marked ``server`` like tests/test_judge_server.py, whose server start it reuses.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.test_judge_server import MODEL_ALIAS, PAIRS, llama_server_process

from neftune.data.formats import Example
from neftune.generate import generate_outputs
from neftune.serve import ServerEngine

pytestmark = pytest.mark.server

CAP = 48  # tokens per answer: long enough for answers to end on their own and to diverge
PENALTY = 1.0  # the only value llama.cpp's repeat_penalty can honour (neftune.serve)
HEAD = 16  # tokens compared for the floor
#: Answers whose first HEAD tokens are HF's, token for token, must be at least this share (measured 8/12).
#: A wrong prompt, template or stop token makes it 0; 4-bit rounding on another CPU's kernels may swap a
#: few more near-ties than here, so the floor leaves room below the measured share.
FLOOR = 1 / 3


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def test_llama_server_answers_like_the_hf_backend(tmp_path_factory: pytest.TempPathFactory) -> None:
    log_dir: Path = tmp_path_factory.mktemp("llama-generate")
    examples = [Example(messages=[{"role": "user", "content": instruction}]) for instruction, _, _ in PAIRS]
    kw = {"generator_name": "smollm2", "dataset_name": "open-ended", "progress": False}
    with llama_server_process(log_dir) as base:
        from neftune.models import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer("smollm2-135m", for_training=False)
        engine = ServerEngine(
            f"{base}/v1", MODEL_ALIAS, tokenizer, server="llama.cpp", max_new_tokens=CAP, repetition_penalty=PENALTY
        )
        served = generate_outputs(None, tokenizer, examples, engine=engine, **kw)
    local = generate_outputs(model, tokenizer, examples, max_new_tokens=CAP, repetition_penalty=PENALTY, **kw)

    ids = [[tokenizer(r["output"], add_special_tokens=False)["input_ids"] for r in side] for side in (local, served)]
    same = [a == b for a, b in zip(*ids, strict=True)]
    prefixes = [_common_prefix(a, b) for a, b in zip(*ids, strict=True)]
    head = [p >= min(HEAD, len(a), len(b)) for p, a, b in zip(prefixes, *ids, strict=True)]
    print(
        f"identical answers: {sum(same)}/{len(same)}; identical first {HEAD} tokens: {sum(head)}/{len(head)}; "
        f"tokens before the first difference: {prefixes}"
    )
    assert sum(head) / len(head) >= FLOOR
    for a, b, equal in zip(local, served, same, strict=True):
        if equal:
            assert a["reached_cap"] == b["reached_cap"]
