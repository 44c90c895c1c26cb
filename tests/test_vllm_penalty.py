"""neftune's vLLM logits processor (``neftune/_vllm/neftune_vllm_penalty.py``) equals the hf backend's penalty.

vLLM is not installed here, so the processor is built on ``object`` and driven the way vLLM's engine
drives it (``update_state`` with a batch update, then ``apply`` on the batch's logits), and every row's
result must equal, to the bit, :class:`neftune.generate.PenaltySparingStops` given that request's prompt
and answer so far.  The real engine runs it in ``tests/test_serve_vllm.py``.
"""

from __future__ import annotations

import enum
import importlib.util
from dataclasses import dataclass, field
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import torch

from neftune.generate import PenaltySparingStops
from neftune.vllm_server import PLUGIN, PLUGIN_DIR

VOCAB = 50
STOPS = [2, 7]


def _plugin() -> ModuleType:
    module, _ = PLUGIN.split(":")
    spec = importlib.util.spec_from_file_location(module, PLUGIN_DIR / f"{module}.py")
    assert spec is not None and spec.loader is not None
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


plugin = _plugin()


class Move(enum.Enum):  # vLLM's MoveDirectionality
    UNIDIRECTIONAL = enum.auto()
    SWAP = enum.auto()


@dataclass
class Update:  # vLLM's BatchUpdate
    batch_size: int
    removed: list[int] = field(default_factory=list)
    added: list[tuple[int, Any, list[int] | None, list[int]]] = field(default_factory=list)
    moved: list[tuple[int, int, Move]] = field(default_factory=list)


def _params(penalty: float | None, spared: list[int] = STOPS, repetition_penalty: float = 1.0) -> SimpleNamespace:
    extra = None if penalty is None else {"neftune_penalty": penalty, "neftune_spared": spared}
    return SimpleNamespace(extra_args=extra, repetition_penalty=repetition_penalty)


def _expected(logits: torch.Tensor, penalty: float, prompt: list[int], output: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt + output], dtype=torch.long)
    return PenaltySparingStops(penalty, STOPS)(ids, logits.unsqueeze(0).clone())[0]


def _logits(rows: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, VOCAB, generator=generator) * 4  # positive and negative logits


def test_each_row_gets_the_hf_backends_penalty_to_the_bit_and_follows_its_growing_answer():
    processor = plugin.SparingRepetitionPenalty(None, torch.device("cpu"), False)
    assert processor.is_argmax_invariant() is False  # greedy decoding must run it
    prompts = [[1, 2, 3, 9, 2], [4, 5, 7, 7], [6, 8, 2]]  # stop tokens 2 and 7 inside the prompts
    outputs: list[list[int]] = [[], [11], []]
    penalties = [1.2, 1.5, None]  # the third request asks for nothing: left alone
    added = [(i, _params(p), prompts[i], outputs[i]) for i, p in enumerate(penalties)]
    processor.update_state(Update(3, added=added))
    for step in range(3):
        logits = _logits(3, step)
        before = logits.clone()
        after = processor.apply(logits)
        for row in (0, 1):
            assert torch.equal(after[row], _expected(before[row], penalties[row], prompts[row], outputs[row]))
            assert torch.equal(after[row, STOPS], before[row, STOPS])  # the spared tokens kept their logits
        assert torch.equal(after[2], before[2])
        assert not torch.equal(after[0], before[0])
        outputs[0].append(20 + step)  # the engine appends to the live list; no batch update comes
        outputs[1].append(30 + step)
        processor.update_state(None)


def test_rows_follow_removals_moves_and_swaps():
    processor = plugin.SparingRepetitionPenalty()
    a, b, c = ([1, 3], [], 1.2), ([4, 5], [6], 1.3), ([8], [], 1.4)
    processor.update_state(Update(3, added=[(i, _params(r[2]), r[0], r[1]) for i, r in enumerate((a, b, c))]))
    processor.update_state(Update(2, removed=[0], moved=[(2, 0, Move.UNIDIRECTIONAL)]))  # c fills a's row
    processor.update_state(Update(2, moved=[(0, 1, Move.SWAP)]))  # then b and c trade rows
    logits = _logits(2, 5)
    before = logits.clone()
    processor.apply(logits)
    assert torch.equal(logits[0], _expected(before[0], 1.3, b[0], b[1]))
    assert torch.equal(logits[1], _expected(before[1], 1.4, c[0], c[1]))
    # a new request without neftune's arguments replaces a tracked one in its row
    processor.update_state(Update(2, added=[(1, _params(None), [1, 2], [])]))
    again = _logits(2, 6)
    untouched = again[1].clone()
    processor.apply(again)
    assert torch.equal(again[1], untouched)


def test_placeholders_of_tokens_not_sampled_yet_and_ids_past_the_head_are_ignored():
    processor = plugin.SparingRepetitionPenalty()
    processor.update_state(Update(1, added=[(0, _params(1.2), [3, VOCAB + 4], [5, -1])]))
    logits = _logits(1, 7)
    before = logits.clone()
    processor.apply(logits)
    assert torch.equal(logits[0], _expected(before[0], 1.2, [3], [5]))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (_params(0.0), "neftune_penalty must be a positive number"),
        (SimpleNamespace(extra_args={"neftune_penalty": "1.2"}, repetition_penalty=1.0), "positive number"),
        (_params(1.2, spared=[2, "x"]), "neftune_spared must be a list of token ids"),
        (_params(1.2, repetition_penalty=1.2), "replaces repetition_penalty, which must then be 1.0"),
    ],
)
def test_malformed_requests_are_refused(params, message):
    with pytest.raises(ValueError, match=message):
        plugin.SparingRepetitionPenalty.validate_params(params)


def test_requests_without_its_arguments_pass_validation():
    plugin.SparingRepetitionPenalty.validate_params(_params(None, repetition_penalty=1.3))
    plugin.SparingRepetitionPenalty.validate_params(_params(1.2))
