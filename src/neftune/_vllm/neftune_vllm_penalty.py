"""transformers' repetition penalty sparing the stop tokens, as a vLLM logits processor.

neftune's vLLM server (``generate.backend=vllm``, :mod:`neftune.vllm_server`) puts this directory on the
server's ``PYTHONPATH`` and starts it with ``--logits-processors neftune_vllm_penalty:SparingRepetitionPenalty``.
A request that carries ``vllm_xargs: {"neftune_penalty": P, "neftune_spared": [ids]}`` (and vLLM's own
``repetition_penalty`` at 1.0) gets, before sampling, exactly what :class:`neftune.generate.PenaltySparingStops`
does under transformers: every token already in the prompt or the answer has its logit divided by ``P``
when positive and multiplied by ``P`` otherwise, and the ``spared`` tokens keep their logits.  The same
torch operations in the same order as transformers' ``RepetitionPenaltyLogitsProcessor``, so on the same
logits the result is identical to the bit.  Requests without ``neftune_penalty`` are left alone.

vLLM's own penalty cannot spare a token: a chat template's end-of-turn token (ChatML's ``<|im_end|>``)
sits in every prompt, so that penalty lowers the model's chance to end its answer (BENCHMARKS.md).

This file is loaded by vLLM's process, which has vLLM, torch and nothing of neftune: it imports nothing
else.  Outside such a process (neftune's tests) the class is built on ``object`` and driven by hand.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

try:
    from vllm.v1.sample.logits_processor import LogitsProcessor as _Base  # type: ignore[import-not-found]
except ImportError:  # neftune's own environment: no vLLM, the class is tested directly
    _Base = object

PENALTY_KEY = "neftune_penalty"
SPARED_KEY = "neftune_spared"
#: vLLM's move of a request from one batch row to another (``MoveDirectionality.SWAP`` is a swap).
_SWAP = "SWAP"


class SparingRepetitionPenalty(_Base):
    """A vLLM v1 ``LogitsProcessor``: transformers' repetition penalty minus the spared tokens, per request."""

    def __init__(self, vllm_config: Any = None, device: Any = None, is_pin_memory: bool = False) -> None:
        self.device = device
        # batch row -> (penalty, prompt ids, the request's live output ids, spared ids)
        self.rows: dict[int, tuple[float, torch.Tensor, list[int], torch.Tensor]] = {}

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        """Refuse a request whose neftune arguments are malformed or that also asks for vLLM's penalty."""
        args = getattr(sampling_params, "extra_args", None) or {}
        if PENALTY_KEY not in args:
            return
        penalty, spared = args[PENALTY_KEY], args.get(SPARED_KEY, [])
        if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not penalty > 0:
            raise ValueError(f"vllm_xargs.{PENALTY_KEY} must be a positive number, got {penalty!r}")
        if not isinstance(spared, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in spared):
            raise ValueError(f"vllm_xargs.{SPARED_KEY} must be a list of token ids, got {spared!r}")
        if getattr(sampling_params, "repetition_penalty", 1.0) != 1.0:
            raise ValueError(f"vllm_xargs.{PENALTY_KEY} replaces repetition_penalty, which must then be 1.0")

    def is_argmax_invariant(self) -> bool:
        """A penalty changes which token is most likely, so greedy decoding needs it too."""
        return False

    def _row(self, params: Any, prompt: Sequence[int] | None, output: list[int]) -> tuple | None:
        args = getattr(params, "extra_args", None) or {}
        penalty = float(args.get(PENALTY_KEY, 1.0))
        if penalty == 1.0:
            return None
        spared = torch.tensor(list(args.get(SPARED_KEY, [])), dtype=torch.long, device=self.device)
        prompt_ids = torch.tensor(list(prompt or []), dtype=torch.long, device=self.device)
        return penalty, prompt_ids, output, spared

    def update_state(self, batch_update: Any) -> None:
        """Follow the batch: rows removed, then added, then moved (vLLM's ``BatchUpdate`` order)."""
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, prompt, output in batch_update.added:
            row = self._row(params, prompt, output)
            if row is None:
                self.rows.pop(index, None)
            else:
                self.rows[index] = row
        for a, b, direction in batch_update.moved:
            moving, there = self.rows.pop(a, None), self.rows.pop(b, None)
            if moving is not None:
                self.rows[b] = moving
            if there is not None and getattr(direction, "name", direction) == _SWAP:
                self.rows[a] = there

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Penalise each tracked row's prompt and answer tokens, the spared ones excepted (in place)."""
        for index, (penalty, prompt, output, spared) in self.rows.items():
            answer = torch.tensor(output, dtype=torch.long, device=logits.device)
            # vLLM's asynchronous scheduling may leave -1 placeholders for tokens not sampled yet
            ids = torch.cat([prompt.to(logits.device), answer[answer >= 0]]).unsqueeze(0)
            if ids.numel() == 0:
                continue
            scores = logits[index : index + 1]
            vocab = scores.shape[-1]
            stops = spared.to(logits.device)
            stops = stops[stops < vocab]
            kept = scores.index_select(1, stops)
            # transformers' RepetitionPenaltyLogitsProcessor, step for step: ids past the logits' width
            # (a tokenizer larger than the head) go to one padded column, dropped afterwards
            ids = ids.clamp(max=vocab)
            padded = torch.nn.functional.pad(scores, (0, 1))
            score = torch.gather(padded, 1, ids)
            score = torch.where(score < 0, score * penalty, score / penalty)
            penalised = padded.scatter(1, ids, score)[..., :vocab].index_copy(1, stops, kept)
            logits[index] = penalised[0]
        return logits
