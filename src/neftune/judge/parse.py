"""Reading a verdict out of a judge's free-text reply.

:func:`parse_verdict` accepts any reply that clearly names one answer -- ``"B"``, ``"**B**"``,
``"[[A]]"``, ``"A is better."``, ``"A is the better answer. It ..."``, ``"Output (b)"``,
``{"winner": "B"}``, ``"Both are equally good"``, or a ``Final verdict: A`` line closing a
reasoning block -- and ignores a reasoning model's ``<think>...</think>`` block.  It refuses (returns
``None``) replies that name both answers as the winner, or neither: ``"[End of answer]"``, ``"The
answer that is better depends ..."``.  A refusal is final for a deterministic judge; the caller
decides whether asking again could help.

:func:`token_label` maps one token of a reply (``"A"``, ``" A"``, ``"a"``, ``"**A"``, ``" tie"``)
to its verdict, for reading the judge's token probabilities.
"""

from __future__ import annotations

import json
import re

__all__ = ["parse_verdict", "strip_reasoning", "token_label"]

_CLOSED_BLOCK = re.compile(r"<(think|thinking|reasoning)>.*?</\1>", re.S | re.I)
_LAST_CLOSE = re.compile(r"</(?:think|thinking|reasoning)>", re.I)
_OPEN = re.compile(r"<(?:think|thinking|reasoning)>", re.I)


def strip_reasoning(text: str) -> str | None:
    """The reply without its reasoning block(s); ``None`` if a block is never closed (cut off).

    Some chat templates open ``<think>`` in the prompt, so a reply may hold only the closing tag:
    everything up to the last ``</think>`` is reasoning then.
    """
    text = _CLOSED_BLOCK.sub(" ", text)
    closes = list(_LAST_CLOSE.finditer(text))
    if closes:
        text = text[closes[-1].end() :]
    if _OPEN.search(text):
        return None
    return text.strip()


# --------------------------------------------------------------------------------------------------
# one line

_WORDS = {
    "a": "A",
    "b": "B",
    "tie": "tie",
    "draw": "tie",
    "equal": "tie",
    "tied": "tie",
    "first": "A",
    "first one": "A",
    "the first one": "A",
    "second": "B",
    "second one": "B",
    "the second one": "B",
}
_STRIP = " \t\r\n\"'`*_.,:;!()[]{}<>#"
_PREFIX = re.compile(
    r"^(?:my\s+|the\s+|final\s+|overall\s+)*"
    r"(?:verdict|judg(?:e?ment)|decision|choice|answer|winner|result|preference|"
    r"better\s+(?:answer|output|response)|best\s+(?:answer|output|response)|output|response|assistant|option)"
    r"(?:\s+is)?\s*(?:[:=\-\u2013\u2014]\s*|\s+|$)",
    re.I,
)
# A verdict word opening a longer reply, set off by punctuation: "B. It is more complete", "Tie: both
# ...".  Punctuation is required so that prose such as "A good answer would ..." is not read as A.
# ... followed at once by another label, lower-case only when it stands alone ("a, b"), not the article "a".
_ANOTHER_LABEL = re.compile(
    r"^[\s\"'`*_(\[]*(?:(?:and|or|vs\.?)\s+)?[\"'`*_(\[]*(?:[AB]\b|tie\b|[ab](?=\s*(?:[,.;:)\]*]|$)))"
)
_LEADING = re.compile(r"^[\s\"'`*_(\[{<]*(a|b|tie)[\"'`*_)\]}>]*\s*[.:;,!\u2013\u2014-](?:\s|$)", re.I)

# An answer named in prose: "Answer B", "Output (a)", "(b)", "[A]", or a standalone capital A/B.
_NOUN = r"(?i:answer|output|response|assistant|option|candidate)"
_LABEL = rf"(?:{_NOUN}\s*[(\[]?\s*(?P<{{0}}>[abAB])\b\s*[)\]]?|[(\[](?P<{{1}}>[abAB])[)\]]|\b(?P<{{2}}>[AB])\b)"
_PRAISE = (
    r"(?i:(?:clearly|definitely|slightly|much|significantly|overall|far|somewhat)\s+)?"
    r"(?i:better|best|superior|preferable|preferred|stronger|the\s+winner|wins|"
    r"more\s+(?:helpful|accurate|complete|correct|relevant|useful|appropriate))"
)
_CLAUSE_START = r"(?:^|[.;!?]\s+|,\s*|\b(?:but|while|whereas|and|so|thus|therefore|overall)\s+)"


def _label_pattern(template: str) -> re.Pattern[str]:
    names = [f"l{i}" for i in range(9)]
    groups = iter(names)
    text = template
    while "{LABEL}" in text:
        text = text.replace("{LABEL}", _LABEL.format(next(groups), next(groups), next(groups)), 1)
    return re.compile(text)


# "A is better", "Output (b) is the better answer", "Answer B was clearly more helpful"
_IS_BETTER = _label_pattern(
    _CLAUSE_START + r"(?i:the\s+)?{LABEL}\s+(?i:is|was|seems|appears|looks)(?:\s+to\s+be)?\s+(?i:the\s+)?" + _PRAISE
)
# "The better answer is B", "The best response would be Output (a)", "Winner: A"
_BETTER_IS = _label_pattern(
    r"(?i:better|best|superior|preferred|winning|stronger)\s+(?i:answer|output|response|one|choice|option)?\s*"
    r"(?i:is|would\s+be|=|:)\s*:?\s*{LABEL}"
)
_PREFER = _label_pattern(r"(?i:\bi\s+(?:would\s+)?(?:prefer|choose|pick|select|go\s+with|vote\s+for))\s+{LABEL}")
_WINNER = _label_pattern(r"(?i:\bwinner)\s*(?i:is|:|=)\s*{LABEL}")
_TIE = re.compile(
    r"(?i:^\W*(?:it'?s\s+)?(?:a\s+)?(?:tie|draw|tied)\b"
    r"|\b(?:both|the\s+two|they|the\s+answers|a\s+and\s+b)(?:\s+(?:answers|outputs|responses))?\s+are\s+"
    r"(?:equally\s+\w+|equal\b|of\s+(?:equal|the\s+same)\s+quality|tied\b)"
    r"|\bneither\s+(?:answer\s+|one\s+|response\s+)?is\s+better\b|\bequally\s+good\b|\bit'?s\s+a\s+tie\b)"
)


def _matched_labels(pattern: re.Pattern[str], line: str) -> set[str]:
    labels = set()
    for match in pattern.finditer(line):
        letter = next(v for k, v in match.groupdict().items() if v is not None)
        labels.add(letter.upper())
    return labels


def _line_verdict(line: str) -> str | None:
    """The verdict one line states, or None (none, or more than one)."""
    bare = line.strip(_STRIP)
    match = _PREFIX.match(bare)
    if match and match.end() < len(bare):
        bare = bare[match.end() :].strip(_STRIP + "-=")
    word = bare.lower().replace("_", " ")
    word = re.sub(r"^(?:answer|output|response|model|assistant)\s*", "", word).strip(_STRIP)
    if word in _WORDS:
        return _WORDS[word]
    text = line.strip().lstrip("#*_ ")
    leading = _LEADING.match(text)
    # "A, B" or "A / B" lists the labels rather than choosing one of them
    if leading and not _ANOTHER_LABEL.match(text[leading.end() :]):
        return _WORDS[leading.group(1).lower()]
    found = set()
    for pattern in (_IS_BETTER, _BETTER_IS, _PREFER, _WINNER):
        found |= _matched_labels(pattern, line)
    if _TIE.search(line):
        found.add("tie")
    return found.pop() if len(found) == 1 else None


# --------------------------------------------------------------------------------------------------
# whole replies

_DOUBLE = re.compile(r"\[\[\s*([ABCabc]|tie)\s*\]\]")
_JSON = re.compile(r"\{[^{}]*\}")
_JSON_KEYS = ("winner", "verdict", "better", "better_answer", "best", "choice", "preferred", "answer", "result")
_VERDICT_LINE = re.compile(r"^\W*(?:final\s+)?(?:verdict|judg(?:e?ment)|decision)\b", re.I)


def _json_verdict(text: str) -> str | None:
    for candidate in _JSON.findall(text):
        try:
            data = json.loads(candidate)
        except ValueError:
            continue
        if not isinstance(data, dict):
            continue
        lowered = {str(k).lower(): v for k, v in data.items()}
        for key in _JSON_KEYS:
            value = lowered.get(key)
            if isinstance(value, str):
                verdict = _line_verdict(value)
                if verdict is not None:
                    return verdict
    return None


def parse_verdict(text: str | None) -> str | None:
    """Extract ``"A"``, ``"B"`` or ``"tie"`` from a judge reply; ``None`` if it names no single answer.

    In order: a reasoning block (``<think>...</think>``) is dropped (an unclosed one gives ``None``);
    a JSON object with a ``winner``/``verdict``/``choice``... field; MT-Bench's ``[[A]]``/``[[B]]``/
    ``[[C]]`` (tie); a line labelled ``Verdict:`` or ``Final verdict:`` (the last one); then the
    first and the last line of the reply, which must agree when both state a verdict.  A line
    states a verdict as a bare word (``"B"``, ``"**tie**"``, ``"Answer: A"``), a word opening a
    sentence (``"B. It is more complete"``), or a sentence such as ``"A is better"``, ``"The better
    answer is B"``, ``"I prefer Output (a)"``, ``"Both are equally good"``.  A line that praises
    both answers, or neither, states nothing.
    """
    if not text or not text.strip():
        return None
    body = strip_reasoning(text)
    if not body:
        return None
    from_json = _json_verdict(body)
    if from_json is not None:
        return from_json
    doubled = {m.lower() for m in _DOUBLE.findall(body)}
    if doubled:
        mapped = {{"a": "A", "b": "B", "c": "tie", "tie": "tie"}[m] for m in doubled}
        return mapped.pop() if len(mapped) == 1 else None
    lines = [line for line in body.splitlines() if line.strip(_STRIP)]
    if not lines:
        return None
    for line in reversed(lines):
        if _VERDICT_LINE.match(line):
            verdict = _line_verdict(line)
            if verdict is not None:
                return verdict
    first = _line_verdict(lines[0])
    last = _line_verdict(lines[-1]) if len(lines) > 1 else first
    if first is None or last is None:
        return first or last
    return first if first == last else None


_TOKEN_WORDS = {"a": "A", "b": "B", "tie": "tie", "ti": "tie", "draw": "tie", "equal": "tie"}


def token_label(token: str) -> str | None:
    """The verdict a single reply token spells (``"A"``, ``" a"``, ``"**B"``, ``"[[A"``, ``" tie"``), else None."""
    return _TOKEN_WORDS.get(token.strip(_STRIP + "\u2581\u0120").lower())
