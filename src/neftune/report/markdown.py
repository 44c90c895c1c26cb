"""Document -> Markdown, with plots linked from ``plots/`` next to the file."""

from __future__ import annotations

import re

from neftune.report.document import Block, Bullets, Document, Example, Image, Inline, KeyValues, Notice, Para, Table

__all__ = ["render_markdown"]

_MD_SPECIAL = re.compile(r"([\\`*_<>|])")


def _escape(text: str) -> str:
    """Escape Markdown syntax in ``text``; brackets stay readable (CIs), only ``](`` links are broken."""
    return _MD_SPECIAL.sub(r"\\\1", str(text)).replace("](", "]\\(").replace("\n", " ")


def _inline(content: Inline) -> str:
    if isinstance(content, str):
        return _escape(content)
    out = []
    for kind, text in content:
        if kind == "b" or kind.startswith("v:"):
            # emphasis markers must hug the text: "** x**" is not bold, and "**a**** b**" merges
            core = text.strip()
            lead, trail = text[: len(text) - len(text.lstrip())], text[len(text.rstrip()) :]
            out.append(f"{lead}**{_escape(core)}**{trail}" if core else text)
        else:
            out.append(_escape(text))
    return "".join(out)


def _fenced(text: str) -> str:
    """A fenced code block that no backtick run inside ``text`` can close early."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def _table(block: Table) -> str:
    lines = [f"**{_escape(block.caption)}**\n"] if block.caption else []
    lines.append("| " + " | ".join(_escape(h) for h in block.header) + " |")
    lines.append("|" + "|".join("---:" if a == "r" else ":---" for a in block.alignment()) + "|")
    lines += ["| " + " | ".join(_inline(c) for c in row) + " |" for row in block.rows]
    return "\n".join(lines)


def _example(block: Example) -> str:
    parts = [f"### Example {block.index}", "**Instruction**", _fenced(block.instruction)]
    if block.reference is not None:
        parts += ["**Reference**", _fenced(block.reference)]
    for label, text in block.outputs:
        parts += [f"**{_escape(label)}** ({len(text):,} chars)", _fenced(text)]
    return "\n\n".join(parts)


def _block(block: Block) -> str:
    if isinstance(block, Para):
        return _inline(block.content)
    if isinstance(block, Bullets):
        return "\n".join(f"- {_inline(i)}" for i in block.items)
    if isinstance(block, Notice):
        prefix = {"warn": "**Warning:** ", "error": "**Error:** "}.get(block.level, "")
        return f"> {prefix}{_inline(block.content)}"
    if isinstance(block, Table):
        return _table(block)
    if isinstance(block, Image):
        return f"![{_escape(block.alt)}](plots/{block.name}.png)\n\n*{_escape(block.caption)}*"
    if isinstance(block, Example):
        return _example(block)
    if isinstance(block, KeyValues):
        title = f"**{_escape(block.title)}**\n\n" if block.title else ""
        return title + "\n".join(f"- **{_escape(k)}:** {_escape(v)}" for k, v in block.pairs)
    raise TypeError(f"unknown block {type(block).__name__}")


def render_markdown(doc: Document) -> str:
    """Render ``doc`` as Markdown with images linked from ``plots/``."""
    parts = [f"# {_escape(doc.title)}", _escape(doc.meta)]
    for s in doc.sections:
        parts.append(f"## {_escape(s.title)}")
        parts += [_block(b) for b in s.blocks]
    return "\n\n".join(p for p in parts if p) + "\n"
