"""A judge run in-process with a transformers causal LM, by scoring the reply's first token rather than sampling.

The pair's score comes from the *averaged log-odds of the two orders*: a small model often prefers
whichever answer is shown first (or second) whatever they say, and that constant bias cancels in the
mean (see :func:`neftune.judge.logprobs.pair_probability`).  Hard A/B/tie verdicts are still given
per order, for the position-consistency figure.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from neftune.errors import ConfigError, ModelError
from neftune.judge.base import Judge, OnResult, Outcome, Query, Verdict, VerdictUnavailable, judge_messages

__all__ = ["LocalJudge"]


class LocalJudge(Judge):
    """Judge run in-process with a transformers causal LM, by scoring rather than sampling.

    The judge prompt (system text folded into the user turn, since some chat templates have no system
    role) is rendered and tokenized by :func:`neftune.data.template.encode_prompt`.  The model's
    log-probability of the reply starting with ``A`` versus ``B`` (each summed over the spellings
    that are single tokens, e.g. ``"A"`` and ``" A"``) gives ``P(first better) = sigmoid(logp(A) -
    logp(B))`` (:attr:`Verdict.p_first`), from which :func:`~neftune.judge.judge_pairs` scores the
    pair.  The hard verdict is ``tie`` when the two are within ``tie_margin`` nats.  Every query gets
    a verdict unless its prompt exceeds the model's context, in which case that pair fails.

    Args:
        model: a loaded causal LM, or a path / hub id loaded with ``AutoModelForCausalLM``.
        tokenizer: the model's tokenizer (loaded from ``model`` when it is a path).
        batch_size: prompts per forward pass (left-padded).
        tie_margin: log-probability gap below which the hard verdict is a tie.
        max_length: longest prompt in tokens; defaults to the model's ``max_position_embeddings``.
    """

    name = "local"
    scores_by_probability = True

    def __init__(
        self,
        model: Any,
        tokenizer: Any | None = None,
        *,
        batch_size: int = 4,
        tie_margin: float = 0.0,
        max_length: int | None = None,
    ) -> None:
        if isinstance(model, (str, os.PathLike)):
            model, tokenizer = self._load(str(model), tokenizer)
        if tokenizer is None:
            raise ConfigError("local judge: a tokenizer is required with an in-memory model")
        if batch_size < 1 or tie_margin < 0:
            raise ConfigError("local judge needs batch_size >= 1 and tie_margin >= 0")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.chunk_size = self.batch_size * 4
        self.tie_margin = float(tie_margin)
        config = getattr(model, "config", None)
        self.max_length = max_length or getattr(config, "max_position_embeddings", None)
        self.choice_ids = {label: self._single_token_ids(label) for label in ("A", "B")}
        self._model_name = str(getattr(config, "_name_or_path", "") or getattr(model, "name_or_path", "") or "")

    @staticmethod
    def _load(path: str, tokenizer: Any | None) -> tuple[Any, Any]:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path)
        except (OSError, ValueError) as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"local judge: cannot load model {path!r}: {first_line}") from None
        return model, tokenizer

    def _single_token_ids(self, label: str) -> list[int]:
        ids = []
        for spelling in (label, " " + label):
            encoded = self.tokenizer(spelling, add_special_tokens=False)["input_ids"]
            if len(encoded) == 1 and encoded[0] not in ids:
                ids.append(int(encoded[0]))
        if not ids:
            raise ModelError(f"local judge: the tokenizer has no single token for {label!r}")
        return ids

    @property
    def identity(self) -> str | None:
        """``local|<model name>|margin=<tie_margin>``; None for an unnamed in-memory model (never cached)."""
        if not self._model_name:
            return None
        return f"local|{self._model_name}|margin={self.tie_margin}"

    def _prompt_ids(self, query: Query) -> list[int]:
        from neftune.data.template import encode_prompt

        system, user = judge_messages(query.instruction, query.first, query.second)
        merged = {"role": "user", "content": system["content"] + "\n\n" + user["content"]}
        return list(encode_prompt(self.tokenizer, [merged]))

    def judge(self, query: Query) -> Verdict:
        """Score one query (see :meth:`judge_batch`)."""
        result = self.judge_batch([query])[0]
        if isinstance(result, VerdictUnavailable):
            raise result
        return result

    def _verdict(self, gap: float) -> Verdict:
        label = "tie" if abs(gap) <= self.tie_margin else ("A" if gap > 0 else "B")
        # sigmoid(gap) written with tanh so that a huge gap cannot overflow
        return Verdict(label, f"logp(A)-logp(B)={gap:.4f}", 0.5 * (1.0 + math.tanh(0.5 * gap)))

    def judge_batch(self, queries: Sequence[Query], on_result: OnResult | None = None) -> list[Outcome]:
        """Score the queries in left-padded batches; a prompt longer than the context fails alone."""
        import torch

        from neftune.generate import model_device

        results: list[Verdict | VerdictUnavailable] = [VerdictUnavailable("not judged")] * len(queries)
        encoded: list[tuple[int, list[int]]] = []
        for index, query in enumerate(queries):
            ids = self._prompt_ids(query)
            if self.max_length is not None and len(ids) > self.max_length:
                results[index] = VerdictUnavailable(
                    f"judge prompt has {len(ids)} tokens, more than the judge's context of {self.max_length}"
                )
            else:
                encoded.append((index, ids))

        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        device = model_device(self.model)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                for start in range(0, len(encoded), self.batch_size):
                    batch = encoded[start : start + self.batch_size]
                    width = max(len(ids) for _, ids in batch)
                    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                    mask = torch.zeros((len(batch), width), dtype=torch.long)
                    for row, (_, ids) in enumerate(batch):
                        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                        mask[row, width - len(ids) :] = 1
                    # Explicit positions so a left-padded row is scored exactly as it would be alone.
                    positions = (mask.cumsum(-1) - 1).clamp(min=0)
                    logits = self.model(
                        input_ids=input_ids.to(device),
                        attention_mask=mask.to(device),
                        position_ids=positions.to(device),
                    ).logits[:, -1, :]
                    logprobs = torch.log_softmax(logits.float(), dim=-1)
                    score_a = torch.logsumexp(logprobs[:, self.choice_ids["A"]], dim=-1)
                    score_b = torch.logsumexp(logprobs[:, self.choice_ids["B"]], dim=-1)
                    for row, (index, _) in enumerate(batch):
                        results[index] = self._verdict(float(score_a[row] - score_b[row]))
                        if on_result is not None:
                            on_result(index, results[index])
        finally:
            if was_training:
                self.model.train()
        return results
