"""Prompt rendering, and tokenization that puts the loss on the assistant's tokens only.

Two layouts exist:

* the tokenizer's chat template, when it has one (``tokenizer.chat_template``);
* otherwise the Alpaca prompt template (``### Instruction:`` / ``### Input:`` / ``### Response:``),
  announced once per tokenizer with a logged warning, with the eos token appended to each response.

Finding the assistant spans in either layout is :mod:`neftune.data.layout`'s job.

:func:`render_prompt` gives the text a model sees before it answers; :func:`encode_prompt` gives its
token ids (prompts rendered by a chat template already carry their special tokens, Alpaca prompts
get the tokenizer's own begin-of-sequence tokens).  :func:`encode_examples` renders each
conversation incrementally (the prompt up to each assistant turn with the generation prompt, then
including that turn) to find which characters belong to assistant turns: the answer and the turn's
end marker such as ``<|im_end|>``, so the model learns to stop.  It tokenizes the full texts in
batches with offset mappings and labels the tokens covering those characters, which are exactly
the tokens past the tokenized prompt whenever the prefix property holds.  The property is checked
for every example (the first prompt tokenized alone must be a prefix of the full tokenization, and
no token may straddle a turn boundary); examples where it fails keep their offset-based labels and
are counted in one logged warning, since generation will tokenize their prompts differently.
"""

from __future__ import annotations

import bisect
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from neftune.data.layout import (
    DROP_TEMPLATE_MISMATCH,
    ChatInfo,
    alpaca_segments,
    apply_template,
    bos_ids,
    chat_info,
    chat_spans,
)
from neftune.data.types import Example
from neftune.errors import DataError

logger = logging.getLogger(__name__)

__all__ = [
    "DROP_NO_ASSISTANT",
    "DROP_TEMPLATE_ERROR",
    "DROP_TEMPLATE_MISMATCH",
    "DROP_TRUNCATED",
    "IGNORE_INDEX",
    "encode_example",
    "encode_examples",
    "encode_prompt",
    "has_chat_template",
    "prompt_and_target_lengths",
    "render_prompt",
]

IGNORE_INDEX = -100
"""Label value for tokens that carry no loss (prompt, template and padding tokens)."""

DROP_NO_ASSISTANT = "no assistant turn"
DROP_TRUNCATED = "all prompt after truncation"
DROP_TEMPLATE_ERROR = "chat template error"

# Long texts are tokenized only up to a few characters per kept token (plus a margin), growing
# the window when that turns out too short; the margin keeps the last kept token clear of the cut,
# where a word may be split differently.
_CUT_MARGIN = 256
_SAMPLE_TEXTS = 64
_SAMPLE_CHARS = 4096

_alpaca_notice_shown: set[str] = set()


def has_chat_template(tokenizer: Any) -> bool:
    """Return whether ``tokenizer`` carries a chat template (else the Alpaca template is used)."""
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer: Any, messages: Sequence[dict[str, str]]) -> str:
    """Return the text that precedes the assistant's answer to ``messages``.

    With a chat template this is the template applied with ``add_generation_prompt=True``;
    without one it is the Alpaca prompt ending in ``### Response:\\n`` (earlier turns of a
    multi-turn conversation appear as successive Instruction/Response sections).  A trailing
    assistant turn is taken to be the answer and left out, so ``example.messages`` and
    ``example.prompt_messages`` give the same prompt.  The text may contain special tokens such as
    ``<|im_start|>``; use :func:`encode_prompt` to get ids that match training.
    """
    msgs = list(messages)
    if msgs and msgs[-1]["role"] == "assistant":
        msgs = msgs[:-1]
    if has_chat_template(tokenizer):
        return apply_template(tokenizer, msgs, add_generation_prompt=True)
    _announce_alpaca(tokenizer)
    return "".join(text for text, _ in alpaca_segments(msgs, tokenizer.eos_token or "", True))


def encode_prompt(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Return the token ids of :func:`render_prompt`, tokenized the way training tokenizes it."""
    text = render_prompt(tokenizer, messages)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids if has_chat_template(tokenizer) else bos_ids(tokenizer) + ids


def encode_example(tokenizer: Any, example: Example, max_length: int) -> dict[str, list[int]] | str:
    """Tokenize one example for training.

    Returns ``{"input_ids": [...], "labels": [...]}`` where labels equal the ids on assistant
    tokens (answer plus end-of-turn marker) and :data:`IGNORE_INDEX` elsewhere, right-truncated
    to ``max_length`` tokens; or, when the example cannot be used, the reason as a string (one of
    ``"no assistant turn"``, ``"all prompt after truncation"``, ``"chat template error"``,
    ``"chat template hides a message"``).
    """
    return _encode(tokenizer, [example], max_length)[0]


def encode_examples(
    tokenizer: Any, examples: Sequence[Example], max_length: int
) -> tuple[list[dict[str, list[int]]], Counter[str]]:
    """Tokenize many examples (batched tokenizer calls); return the kept ones and drop counts.

    Kept encodings are in input order; every example that is not kept is counted under its
    reason (see :func:`encode_example`), so ``len(kept) + sum(dropped.values()) == len(examples)``.
    """
    kept: list[dict[str, list[int]]] = []
    dropped: Counter[str] = Counter()
    for result in _encode(tokenizer, examples, max_length):
        if isinstance(result, str):
            dropped[result] += 1
        else:
            kept.append(result)
    return kept, dropped


def prompt_and_target_lengths(tokenizer: Any, example: Example) -> tuple[int, int]:
    """Return ``(unlabelled tokens, labelled tokens)`` of ``example`` without truncation.

    For a single-turn example these are the prompt length and the answer length (end-of-turn
    marker included).  Raises :class:`~neftune.errors.DataError` when the example cannot be
    encoded (no assistant turn, failing chat template).
    """
    result = _encode(tokenizer, [example], None)[0]
    if isinstance(result, str):
        raise DataError(f"{example.meta.get('source', 'example')}: {result}")
    n_target = sum(1 for x in result["labels"] if x != IGNORE_INDEX)
    return len(result["input_ids"]) - n_target, n_target


def _announce_alpaca(tokenizer: Any) -> None:
    name = str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
    if name not in _alpaca_notice_shown:
        _alpaca_notice_shown.add(name)
        logger.warning(
            "tokenizer %r has no chat template: using the Alpaca prompt template "
            "(### Instruction / ### Response) with eos after each response",
            name,
        )


# --------------------------------------------------------------------------------------------
# Tokenization and labelling.


@dataclass
class _Draft:
    index: int
    messages: Sequence[dict[str, str]]
    text: str
    spans: list[tuple[int, int]] | None  # None until located (chat templates)


def _encode(tokenizer: Any, examples: Sequence[Example], max_length: int | None) -> list[dict[str, list[int]] | str]:
    """Encode ``examples``; each result is an encoding or a drop reason."""
    results, mismatched = encode_batch(tokenizer, examples, max_length)
    if mismatched:
        warn_mismatches(mismatched, len(examples))
    return results


def warn_mismatches(mismatched: int, total: int) -> None:
    """The one warning about examples whose prompt tokenizes differently alone than in context."""
    logger.warning(
        "%d of %d examples tokenize differently across a prompt/answer boundary than the "
        "prompt alone does (generation will see other tokens); labels follow character offsets",
        mismatched,
        total,
    )


def encode_batch(
    tokenizer: Any, examples: Sequence[Example], max_length: int | None
) -> tuple[list[dict[str, list[int]] | str], int]:
    """Encode ``examples`` without logging: the results (an encoding or a drop reason each) and how
    many examples tokenize differently across a prompt/answer boundary (see the module docstring)."""
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    chat = has_chat_template(tokenizer)
    if not chat:
        _announce_alpaca(tokenizer)
    results: list[dict[str, list[int]] | str] = [DROP_NO_ASSISTANT] * len(examples)
    drafts: list[_Draft] = []
    for i, example in enumerate(examples):
        messages = example.messages
        if not any(m["role"] == "assistant" for m in messages):
            continue
        if chat:
            try:
                text = apply_template(tokenizer, messages, add_generation_prompt=False)
            except DataError:
                results[i] = DROP_TEMPLATE_ERROR
                continue
            drafts.append(_Draft(i, messages, text, None))
        else:
            text, spans = "", []
            for segment, labelled in alpaca_segments(messages, tokenizer.eos_token or "", False):
                if labelled:
                    spans.append((len(text), len(text) + len(segment)))
                text += segment
            drafts.append(_Draft(i, messages, text, spans))
    if not drafts:
        return results, 0

    bos = [] if chat else bos_ids(tokenizer)
    budget = None if max_length is None else max_length - len(bos)
    if budget is not None and budget < 1:
        for draft in drafts:
            results[draft.index] = DROP_TRUNCATED
        return results, 0
    info = chat_info(tokenizer) if chat else ChatInfo([], None)
    if not getattr(tokenizer, "is_fast", False):
        for draft in drafts:
            located = _locate(tokenizer, draft, len(draft.text), info)
            results[draft.index] = (
                located if isinstance(located, str) else _finish(*_label_by_segments(tokenizer, draft), bos, budget)
            )
        return results, 0

    ids_list, offsets_list = _tokenize_windows(tokenizer, [d.text for d in drafts], budget)
    changed: list[int] = []
    for n, draft in enumerate(drafts):
        offsets = offsets_list[n]
        window_end = len(draft.text) if budget is None or len(offsets) <= budget else offsets[budget - 1][1]
        length = len(draft.text)
        located = _locate(tokenizer, draft, window_end, info)
        if isinstance(located, str):
            results[draft.index] = located
        elif len(draft.text) != length:
            changed.append(n)
    if changed:
        again = _tokenize_windows(tokenizer, [drafts[n].text for n in changed], budget)
        for k, n in enumerate(changed):
            ids_list[n], offsets_list[n] = again[0][k], again[1][k]

    with_spans = [n for n, d in enumerate(drafts) if d.spans is not None]
    mismatched = _prefix_mismatches(tokenizer, drafts, with_spans, ids_list, offsets_list, budget)
    for n in with_spans:
        draft = drafts[n]
        ids, offsets = ids_list[n][:budget], offsets_list[n][:budget]
        ids, labels, straddles = _offset_labels(ids, offsets, draft.spans or [])
        if straddles:
            mismatched.add(n)
        results[draft.index] = _finish(ids, labels, bos, budget)
    return results, len(mismatched)


def _locate(tokenizer: Any, draft: _Draft, window_end: int, info: ChatInfo) -> str | None:
    """Fill ``draft.spans`` (and update its text) for chat templates; return a drop reason."""
    if draft.spans is not None:
        return None
    located = chat_spans(tokenizer, draft.messages, draft.text, window_end, info)
    if isinstance(located, str):
        return located
    draft.text, draft.spans = located
    return None


def _finish(ids: list[int], labels: list[int], bos: list[int], budget: int | None) -> dict[str, list[int]] | str:
    if budget is not None:
        ids, labels = ids[:budget], labels[:budget]
    if all(x == IGNORE_INDEX for x in labels):
        return DROP_TRUNCATED
    return {"input_ids": bos + ids, "labels": [IGNORE_INDEX] * len(bos) + labels}


def _tokenize_windows(
    tokenizer: Any, texts: list[str], budget: int | None
) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
    """Tokenize ``texts`` with offsets, reading only as much of long ones as ``budget`` needs.

    A text is first cut at a measured characters-per-token figure times the tokens wanted; when
    the cut holds fewer tokens than wanted (or the last wanted token ends too near the cut, where
    a word may be split differently than in the full text), the cut doubles until it suffices or
    the text is whole.
    """
    ids_list: list[list[int]] = [[] for _ in texts]
    offsets_list: list[list[tuple[int, int]]] = [[] for _ in texts]
    todo = list(range(len(texts)))
    chars_per_token = 0.0 if budget is None else _chars_per_token(tokenizer, texts)
    while todo:
        cut = None if budget is None else int(budget * chars_per_token) + _CUT_MARGIN
        heads = [texts[i] if cut is None else texts[i][:cut] for i in todo]
        enc = tokenizer(
            heads, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False, verbose=False
        )
        retry = []
        for k, i in enumerate(todo):
            ids, offsets = enc["input_ids"][k], enc["offset_mapping"][k]
            # the whole text was tokenized, or the cut holds the wanted tokens with a margin to spare
            if (
                cut is None
                or budget is None
                or len(texts[i]) <= cut
                or (len(ids) > budget and offsets[budget - 1][1] <= cut - _CUT_MARGIN)
            ):
                ids_list[i], offsets_list[i] = ids, offsets
            else:
                retry.append(i)
        todo = retry
        chars_per_token *= 2
    return ids_list, offsets_list


def _chars_per_token(tokenizer: Any, texts: list[str]) -> float:
    """A generous characters-per-token figure for ``texts``, measured on a sample of them."""
    step = max(1, len(texts) // _SAMPLE_TEXTS)
    sample = [t[:_SAMPLE_CHARS] for t in texts[::step][:_SAMPLE_TEXTS]]
    counts = tokenizer(sample, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    ratios = sorted(len(t) / max(1, len(ids)) for t, ids in zip(sample, counts, strict=False))
    # The upper quartile covers most texts in one pass; the rest get a wider second pass.
    return max(1.0, 1.25 * ratios[(3 * len(ratios)) // 4])


def _offset_labels(
    ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]
) -> tuple[list[int], list[int], bool]:
    """Labels for the tokens that cover span characters; whether a token straddles a boundary."""
    labels = [IGNORE_INDEX] * len(ids)
    if not ids:
        return ids, labels, False
    # Offsets grow along the text, so each span's tokens are one contiguous run found by bisection.
    starts = [a for a, _ in offsets]
    ends = [b for _, b in offsets]
    straddles = False
    for start, end in spans:
        first = bisect.bisect_right(ends, start)
        last = bisect.bisect_left(starts, end)
        if first < last:
            labels[first:last] = ids[first:last]
            straddles = straddles or starts[first] < start or ends[last - 1] > end
    return ids, labels, straddles


def _prefix_mismatches(
    tokenizer: Any,
    drafts: list[_Draft],
    which: list[int],
    ids_list: list[list[int]],
    offsets_list: list[list[tuple[int, int]]],
    budget: int | None,
) -> set[int]:
    """Drafts whose first prompt, tokenized alone, is not a prefix of the full tokenization.

    Only prompts that end inside the tokenized window are checked; the others are all prompt
    after truncation and dropped anyway.
    """
    checked: list[tuple[int, int]] = []  # (draft, where its first answer starts)
    for n in which:
        spans = drafts[n].spans
        if spans and (budget is None or len(offsets_list[n]) <= budget or spans[0][0] < offsets_list[n][budget - 1][1]):
            checked.append((n, spans[0][0]))
    if not checked:
        return set()
    prompts = [drafts[n].text[:boundary] for n, boundary in checked]
    alone = tokenizer(prompts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    bad = set()
    for (n, boundary), prompt_ids in zip(checked, alone, strict=False):
        ids, offsets = ids_list[n], offsets_list[n]
        k = len(prompt_ids)
        if ids[:k] != prompt_ids or (k < len(offsets) and offsets[k][0] < boundary):
            bad.add(n)
    return bad


def _label_by_segments(tokenizer: Any, draft: _Draft) -> tuple[list[int], list[int]]:
    """Tokenize each labelled and unlabelled piece on its own (tokenizers without offsets)."""
    ids: list[int] = []
    labels: list[int] = []
    cursor = 0
    pieces: list[tuple[str, bool]] = []
    for start, end in draft.spans or []:
        pieces += [(draft.text[cursor:start], False), (draft.text[start:end], True)]
        cursor = end
    pieces.append((draft.text[cursor:], False))
    for text, labelled in pieces:
        if text:
            piece = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
            ids += piece
            labels += piece if labelled else [IGNORE_INDEX] * len(piece)
    return ids, labels
