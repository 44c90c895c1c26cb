"""Batched greedy generation and AlpacaEval-format output files.

Typical use::

    from neftune.generate import generate_outputs, write_outputs, read_outputs

    records = generate_outputs(model, tokenizer, examples,
                               generator_name="smollm2-neftune", dataset_name="builtin:skills")
    write_outputs("runs/b/outputs.json", records)
    records = read_outputs("runs/b/outputs.json")   # validated, one-line DataError if malformed

:func:`generate_completions` is the engine (:func:`generate_token_ids` and :func:`generate_texts`
read its ids): prompts are tokenised, sorted by length so each batch wastes little padding,
left-padded (so every row's last prompt token sits in the final column and the KV cache can be
extended in lockstep), decoded greedily until an end-of-turn token, and returned in the caller's
order, each with whether it stopped at ``max_new_tokens`` without an end token (it was cut off).

Output files are AlpacaEval ``model_outputs`` files (:mod:`neftune.outputs`, whose readers, writers
and :func:`instruction_of` are re-exported here); each record says whether its answer reached the
token cap.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypedDict

import torch

from neftune.data.presets import defaults_for
from neftune.errors import DataError
from neftune.outputs import REACHED_CAP, REQUIRED_KEYS, instruction_of, read_outputs, write_outputs

if TYPE_CHECKING:
    from typing_extensions import Unpack

logger = logging.getLogger(__name__)

__all__ = [
    "REACHED_CAP",
    "REQUIRED_KEYS",
    "Completion",
    "Engine",
    "GenerationOptions",
    "PenaltySparingStops",
    "default_max_new_tokens",
    "default_repetition_penalty",
    "generate_completions",
    "generate_outputs",
    "generate_texts",
    "generate_token_ids",
    "instruction_of",
    "read_outputs",
    "stop_token_ids",
    "write_outputs",
]

# ChatML end-of-turn marker.  Many chat tokenizers declare a different eos (e.g. <|endoftext|>)
# while their chat template closes each assistant turn with this token, so generation must stop on
# it too or the model rambles into a fabricated next turn.
_END_OF_TURN = "<|im_end|>"


@dataclass(frozen=True)
class Completion:
    """One generated answer.

    ``ids`` are its new token ids up to (not including) the first end token; ``reached_cap`` is true
    when generation stopped at ``max_new_tokens`` without an end token, i.e. the answer was cut off.
    ``text`` is the answer as a server returned it (``None``: decode ``ids``).
    """

    ids: list[int]
    reached_cap: bool
    text: str | None = None


Engine = Callable[[Sequence[Sequence[int]], bool], list[Completion]]
"""Answers tokenized prompts, in order: ``engine(prompts, progress)`` (e.g. :class:`neftune.serve.ServerEngine`)."""


def default_repetition_penalty(data_spec: str | None, requested: float | None = None) -> float:
    """``requested``, else the data's default (:mod:`neftune.data.presets`): the paper's 1.2, or
    1.0 on sets whose exact answers copy words and digits from the prompt, which the penalty punishes."""
    return requested if requested is not None else defaults_for(data_spec).repetition_penalty


def default_max_new_tokens(data_spec: str | None, requested: int | None = None) -> int:
    """``requested``, else the data's default: 256 tokens, fewer for sets with short exact answers."""
    return requested if requested is not None else defaults_for(data_spec).max_new_tokens


def stop_token_ids(tokenizer: Any, model: Any | None = None) -> list[int]:
    """Return the token ids that end a generated answer.

    These are ``tokenizer.eos_token_id``, the id of ``<|im_end|>`` when the vocabulary has it, and
    the eos id(s) of ``model.generation_config`` (which is where, e.g., Llama-3 lists
    ``<|eot_id|>``).
    """
    ids: list[int] = []

    def add(value: Any) -> None:
        if value is None:
            return
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, int) and item >= 0 and item not in ids:
                ids.append(item)

    add(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    if _END_OF_TURN in vocab:
        add(vocab[_END_OF_TURN])
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        add(generation_config.eos_token_id)
    return ids


def _encode_prompt(tokenizer: Any, prompt: str | Sequence[int]) -> list[int]:
    if not isinstance(prompt, str):
        return [int(t) for t in prompt]
    # Same convention as training (neftune.data.template.encode_prompt): a chat-template rendering
    # already carries every special token the model expects, so nothing is added; a plain-text
    # (Alpaca) prompt gets the tokenizer's begin-of-sequence token unless it already starts with it.
    bos = tokenizer.bos_token
    add_special = not getattr(tokenizer, "chat_template", None) and not (bos and prompt.startswith(bos))
    return list(tokenizer(prompt, add_special_tokens=add_special)["input_ids"])


def model_device(model: Any) -> torch.device:
    """The device of a model's parameters (works for plain modules without ``.device``)."""
    try:
        return model.device
    except AttributeError:
        return next(model.parameters()).device


class PenaltySparingStops:
    """transformers' repetition penalty on every token already in the sequence except the stop tokens.

    A chat template puts its end-of-turn token in every prompt (ChatML's ``<|im_end|>`` closes the
    system and user turns), so transformers' penalty, which lowers every token of the prompt, also
    lowers the model's chance to end its answer: SmolLM2-135M-Instruct at 1.2 ran 13 of 24 IFEval
    answers into a 512-token cap, and 1 of 24 with the stop tokens spared (BENCHMARKS.md).  Templates
    whose prompts hold no stop token (Llama-2's) decode exactly as with transformers' own penalty.
    """

    def __init__(self, penalty: float, stops: Sequence[int]) -> None:
        from transformers import RepetitionPenaltyLogitsProcessor

        self.penalty = RepetitionPenaltyLogitsProcessor(penalty)
        self.stops = torch.tensor(list(stops), dtype=torch.long)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        stops = self.stops.to(scores.device)
        kept = scores.index_select(1, stops)
        scores = self.penalty(input_ids, scores)
        return scores.index_copy(1, stops, kept)


def generate_completions(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 256,
    repetition_penalty: float = 1.2,
    spare_stop_tokens: bool = True,
    batch_size: int = 16,
    sort_by_length: bool = True,
    do_sample: bool = False,
    progress: bool = True,
) -> list[Completion]:
    """Generate one completion per prompt with transformers' ``generate``, in the order of ``prompts``.

    Args:
        model: a causal LM (transformers or PEFT-wrapped).  It is switched to eval mode for the call
            and restored to its previous mode afterwards.
        tokenizer: the model's tokenizer; it is not modified (padding is done here, on the left).
        prompts: fully rendered prompts (see :func:`neftune.data.template.render_prompt`), or
            their token ids (:func:`neftune.data.template.encode_prompt`).  Text is tokenized
            without added special tokens when the tokenizer has a chat template (the rendering
            already has them), with them otherwise.
        max_new_tokens: generation budget per prompt.
        repetition_penalty: HF repetition penalty (1.0 disables it).  Padding never counts as a
            repeated token.
        spare_stop_tokens: leave the stop tokens out of the penalty (:class:`PenaltySparingStops`);
            ``False`` is transformers' own penalty, which vLLM and SGLang share.
        batch_size: prompts per forward pass.
        sort_by_length: group prompts of similar token length (longest first, so an out-of-memory
            error shows up on the first batch) to minimise padding.
        do_sample: sample instead of greedy decoding (uses torch's global RNG; seed it yourself).
        progress: show a tqdm progress bar with ETA.

    Returns:
        For each prompt, a :class:`Completion`: the generated token ids up to (not including) the
        first of :func:`stop_token_ids`, and whether none came within ``max_new_tokens``.
    """
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not prompts:
        return []

    stops = stop_token_ids(tokenizer, model)
    if not stops:
        logger.warning("tokenizer has no eos token: every answer will run to max_new_tokens")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        # Padded positions are masked out, so any id works; an eos id keeps the vocabulary in range.
        pad_id = stops[0] if stops else 0

    encoded = [_encode_prompt(tokenizer, p) for p in prompts]
    order = list(range(len(prompts)))
    if sort_by_length:
        order.sort(key=lambda i: len(encoded[i]), reverse=True)

    spare = spare_stop_tokens and repetition_penalty != 1.0 and bool(stops)
    gen_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        repetition_penalty=1.0 if spare else repetition_penalty,
        eos_token_id=stops or None,
        pad_token_id=pad_id,
        use_cache=True,
    )
    if do_sample:
        base = getattr(model, "generation_config", None)
        # Keep the model's own sampling recipe (temperature, top_p...) when the user asks to sample.
        for name in ("temperature", "top_p", "top_k", "min_p"):
            value = getattr(base, name, None) if base is not None else None
            if value is not None:
                setattr(gen_config, name, value)

    device = model_device(model)
    results: list[Completion] = [Completion([], False) for _ in prompts]
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(prompts), desc="generating", unit="prompt", disable=not progress, dynamic_ncols=True)
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                batch_idx = order[start : start + batch_size]
                rows = [encoded[i] for i in batch_idx]
                width = max(len(r) for r in rows)
                input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
                attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
                for r, ids in enumerate(rows):
                    if ids:
                        input_ids[r, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                        attention_mask[r, width - len(ids) :] = 1
                output = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    generation_config=gen_config,
                    logits_processor=[PenaltySparingStops(repetition_penalty, stops)] if spare else None,
                )
                new_tokens = output[:, width:].tolist()
                for i, ids in zip(batch_idx, new_tokens, strict=False):
                    # generate() pads finished rows with pad_id, which need not be special; cut at
                    # the first stop token so nothing after the end of the turn is decoded.
                    end = next((pos for pos, tok in enumerate(ids) if tok in stops), None)
                    # a row that never met a stop token ran until max_new_tokens: it was cut off
                    cut = end is None and len(ids) >= max_new_tokens
                    results[i] = Completion(ids if end is None else ids[:end], cut)
                bar.update(len(batch_idx))
    finally:
        bar.close()
        if was_training:
            model.train()
    return results


class GenerationOptions(TypedDict, total=False):
    """The keyword arguments of :func:`generate_completions`, which the functions reading it accept."""

    max_new_tokens: int
    repetition_penalty: float
    spare_stop_tokens: bool
    batch_size: int
    sort_by_length: bool
    do_sample: bool
    progress: bool


def generate_token_ids(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    **options: Unpack[GenerationOptions],
) -> list[list[int]]:
    """The token ids of :func:`generate_completions` (same arguments), in the order of ``prompts``."""
    return [c.ids for c in generate_completions(model, tokenizer, prompts, **options)]


def generate_texts(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    **options: Unpack[GenerationOptions],
) -> list[str]:
    """Generate one completion per prompt and return the texts in the order of ``prompts``.

    Same arguments as :func:`generate_completions`; each completion is decoded with special tokens
    removed and stripped of surrounding whitespace.
    """
    ids = generate_token_ids(model, tokenizer, prompts, **options)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]


_META_MAX_CHARS = 200


def _small_meta(meta: Mapping[str, Any] | None) -> dict[str, Any]:
    # Only short JSON scalars travel in the outputs file; anything bulkier stays in the dataset.
    if not meta:
        return {}
    return {
        str(k): v
        for k, v in meta.items()
        if v is None or isinstance(v, (int, float, bool)) or (isinstance(v, str) and len(v) <= _META_MAX_CHARS)
    }


def _text(tokenizer: Any, completion: Completion) -> str:
    text = (
        completion.text if completion.text is not None else tokenizer.decode(completion.ids, skip_special_tokens=True)
    )
    return text.strip()


def generate_outputs(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Any],
    *,
    generator_name: str,
    dataset_name: str,
    engine: Engine | None = None,
    **kw: Any,
) -> list[dict[str, Any]]:
    """Answer every example and return AlpacaEval ``model_outputs`` records, in example order.

    Each record is ``{"instruction", "output", "generator", "dataset"}`` plus ``"reference"`` when
    the example has a reference answer and ``"meta"`` (the short JSON scalars of ``example.meta``)
    when it has any, and ``"reached_cap"``: whether the answer stopped at ``max_new_tokens`` without an
    end token (it was cut off).  ``dataset`` is the example's ``meta["dataset"]`` (AlpacaEval's subset name) when it
    has one, else ``dataset_name``.  ``instruction`` is the example's last user message (see :func:`instruction_of`); the
    prompt given to the model is the whole conversation up to the last assistant turn, rendered and
    tokenized as in training by :func:`neftune.data.template.encode_prompt`.  The prompts are answered
    by ``engine`` when given (``model`` is then unused; ``kw`` may hold only ``progress``), else by
    :func:`generate_completions` with ``model`` and ``kw``.
    """
    from neftune.data.template import encode_prompt

    prompts: list[list[int]] = []
    instructions: list[str] = []
    for index, example in enumerate(examples):
        messages = example.prompt_messages
        try:
            instructions.append(instruction_of(messages))
        except ValueError:
            raise DataError(f"example {index}: prompt has no user message") from None
        prompts.append(encode_prompt(tokenizer, messages))

    if engine is not None:
        completions = engine(prompts, bool(kw.pop("progress", True)))
        if kw:
            raise TypeError(f"generate_outputs: {', '.join(kw)} apply to the hf backend only")
    else:
        completions = generate_completions(model, tokenizer, prompts, **kw)

    records: list[dict[str, Any]] = []
    for example, instruction, completion in zip(examples, instructions, completions, strict=True):
        record: dict[str, Any] = {
            "instruction": instruction,
            "output": _text(tokenizer, completion),
            "generator": generator_name,
            # AlpacaEval's subset name when the example has one (builtin:alpaca_eval, AlpacaEval files)
            "dataset": str((getattr(example, "meta", None) or {}).get("dataset") or dataset_name),
        }
        reference = getattr(example, "reference", None)
        if reference is not None:
            record["reference"] = reference
        meta = _small_meta(getattr(example, "meta", None))
        if meta:
            record["meta"] = meta
        record[REACHED_CAP] = completion.reached_cap
        records.append(record)
    return records
