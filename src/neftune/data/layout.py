"""Where the loss goes: the assistant spans of a rendered conversation.

Two layouts exist: the tokenizer's chat template (:func:`apply_template`; :func:`chat_spans` finds
the characters of each assistant answer and its end-of-turn marker by rendering the conversation
incrementally, :func:`chat_info` learns what the template writes after an answer), and the Alpaca
prompt template for tokenizers without one (:func:`alpaca_segments`).  :mod:`neftune.data.template`
tokenizes and labels with them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jinja2

from neftune.errors import DataError

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
ALPACA_PREAMBLE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request."
)

DROP_TEMPLATE_MISMATCH = "chat template hides a message"


def apply_template(tokenizer: Any, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> str:
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    try:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as err:
        # Several templates (Gemma, Mistral) reject a system turn; fold it into the first user turn.
        if len(msgs) > 1 and msgs[0]["role"] == "system" and msgs[1]["role"] == "user":
            merged = [{"role": "user", "content": msgs[0]["content"] + "\n\n" + msgs[1]["content"]}]
            return apply_template(tokenizer, merged + msgs[2:], add_generation_prompt)
        raise DataError(f"chat template failed: {' '.join(str(err).split())}") from None


def _end_markers(tokenizer: Any) -> list[str]:
    """Special tokens that can close a turn (``<|im_end|>``, ``<|eot_id|>``, eos, ...)."""
    markers = {tok.content for tok in tokenizer.added_tokens_decoder.values() if tok.special}
    if tokenizer.eos_token:
        markers.add(tokenizer.eos_token)
    return sorted(markers)


def _turn_end(text: str, content_end: int, limit: int, markers: list[str]) -> int | None:
    """End of the first end-of-turn marker in ``text[content_end:limit]``, if any."""
    found = [(at, at + len(m)) for m in markers if (at := text.find(m, content_end, limit)) >= 0]
    return min(found)[1] if found else None


def _find_content(text: str, content: str, start: int, limit: int) -> tuple[int, int] | None:
    # Some templates trim message contents; try the content as given first, then stripped.
    for needle in (content, content.strip()):
        at = text.find(needle, start, limit)
        if at >= 0:
            return at, at + len(needle)
    return None


class _NotIncremental(Exception):
    """The template renders earlier turns differently once later turns follow."""


@dataclass
class ChatInfo:
    markers: list[str]
    # What the template writes right after an answer, through its end marker (e.g. "<|im_end|>"),
    # learned from a probe conversation; None when no special token closes the probe's answer.
    closing: str | None


def chat_info(tokenizer: Any) -> ChatInfo:
    markers = _end_markers(tokenizer)
    answer = "Hello there."
    probe = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": answer}]
    try:
        prompt = apply_template(tokenizer, probe[:1], add_generation_prompt=True)
        upto = apply_template(tokenizer, probe, add_generation_prompt=False)
    except DataError:
        return ChatInfo(markers, None)
    found = _find_content(upto, answer, len(prompt), len(upto)) if upto.startswith(prompt) else None
    if found is None:
        return ChatInfo(markers, None)
    end = _turn_end(upto, found[1], len(upto), markers)
    return ChatInfo(markers, None if end is None else upto[found[1] : end])


def chat_spans(
    tokenizer: Any,
    messages: Sequence[dict[str, str]],
    full: str,
    window_end: int,
    info: ChatInfo,
) -> tuple[str, list[tuple[int, int]]] | str:
    """``(text, labelled spans)`` for the assistant turns that start before ``window_end``.

    Each assistant turn starts where the conversation before it, rendered with the generation
    prompt, ends (that rendering must be a prefix of ``full``); its span is the answer's content
    plus what closes the turn through the end marker.  A turn that does not close like the probe
    conversation is rendered through its end to find where it closes.  The text is ``full``
    unless nothing closes the final answer, in which case eos is inserted after it.
    """
    assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    spans: list[tuple[int, int]] = []
    unclosed_last = False
    try:
        starts: list[tuple[int, int]] = []
        for i in assistant_turns:
            prompt = apply_template(tokenizer, messages[:i], add_generation_prompt=True)
            if len(prompt) >= window_end:
                break  # this turn and all later ones lie beyond the truncation point
            if not full.startswith(prompt):
                raise _NotIncremental
            starts.append((i, len(prompt)))
        for k, (i, start) in enumerate(starts):
            limit = starts[k + 1][1] if k + 1 < len(starts) else len(full)
            found = _find_content(full, messages[i]["content"], start, limit)
            content_start, content_end = found if found else (start, start)
            closing = info.closing
            if closing and full.startswith(closing, content_end):
                end: int | None = content_end + len(closing)
            else:
                upto = apply_template(tokenizer, messages[: i + 1], add_generation_prompt=False)
                if not full.startswith(upto) or len(upto) < content_end:
                    raise _NotIncremental
                end = _turn_end(full, content_end, len(upto), info.markers)
            if end is None:
                end = content_end
                unclosed_last = i == assistant_turns[-1]
            spans.append((content_start, end))
    except (_NotIncremental, DataError):
        searched = _search_spans(full, messages, info.markers)
        if searched is None:
            return DROP_TEMPLATE_MISMATCH
        spans, unclosed_last = searched
    eos = tokenizer.eos_token
    if unclosed_last and eos:
        # Nothing marks the end of the answer: append eos so the model still learns to stop.
        start, end = spans[-1]
        spans[-1] = (start, end + len(eos))
        return full[:end] + eos + full[end:], spans
    return full, spans


def _search_spans(
    full: str, messages: Sequence[dict[str, str]], markers: list[str]
) -> tuple[list[tuple[int, int]], bool] | None:
    """Locate every message's content in order in ``full`` (for non-incremental templates)."""
    cursor = 0
    spans: list[tuple[int, int]] = []
    unclosed_last = False
    last_assistant = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    for i, message in enumerate(messages):
        found = _find_content(full, message["content"], cursor, len(full))
        if found is None:
            return None
        start, cursor = found
        if message["role"] == "assistant":
            nxt = None
            if i + 1 < len(messages):
                nxt = _find_content(full, messages[i + 1]["content"], cursor, len(full))
            end = _turn_end(full, cursor, nxt[0] if nxt else len(full), markers)
            if end is None:
                end = cursor
                unclosed_last = i == last_assistant
            spans.append((start, end))
            cursor = end
    return spans, unclosed_last


# --------------------------------------------------------------------------------------------
# Alpaca layout, for tokenizers without a chat template.


def alpaca_segments(
    messages: Sequence[dict[str, str]], eos: str, add_generation_prompt: bool
) -> list[tuple[str, bool]]:
    """Alpaca-format text as ``(segment, is_answer)`` pairs; answers end with ``eos``."""
    systems = [m["content"] for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    if systems:
        head = "\n\n".join(systems)
    elif any(_alpaca_user_parts(m)[1] for m in turns if m["role"] == "user"):
        head = ALPACA_PREAMBLE_WITH_INPUT
    else:
        head = ALPACA_PREAMBLE
    segments: list[tuple[str, bool]] = [(head + "\n\n", False)]
    for k, message in enumerate(turns):
        if message["role"] == "user":
            instruction, inp = _alpaca_user_parts(message)
            text = f"### Instruction:\n{instruction}\n\n"
            if inp:
                text += f"### Input:\n{inp}\n\n"
            segments.append((text, False))
        else:
            segments.append(("### Response:\n", False))
            segments.append((message["content"] + eos, True))
            if k + 1 < len(turns) or add_generation_prompt:
                segments.append(("\n\n", False))
    if add_generation_prompt:
        segments.append(("### Response:\n", False))
    return segments


def _alpaca_user_parts(message: dict[str, str]) -> tuple[str, str]:
    instruction, inp = message.get("instruction"), message.get("input")
    # The parts are trusted only while they still add up to the content (it may have been edited).
    if instruction is not None and inp and message["content"] == f"{instruction}\n\n{inp}":
        return instruction, inp
    return message["content"], ""


def bos_ids(tokenizer: Any) -> list[int]:
    """The ids the tokenizer itself puts before a text (begin-of-sequence), if any."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for i in range(len(with_special) - len(plain) + 1):
        if with_special[i : i + len(plain)] == plain:
            return list(with_special[:i])
    return []
