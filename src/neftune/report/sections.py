"""The report's leading sections: the verdict, length against quality, and the table of effects.

Also the phrases the other sections share (an effect with its interval, a length change, a win
rate with its interval).  Each ``*_section`` function turns an :class:`Analysis` into a
:class:`Section` of blocks; none of them computes a statistic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from neftune.report.analysis import Analysis, judge_of, judge_verdict
from neftune.report.censoring import CENSORED_LIMIT, cap_of, cut_share
from neftune.report.document import Bullets, Inline, Notice, Para, Section, Span
from neftune.report.format import fmt_bound, fmt_interval, fmt_number, fmt_percent
from neftune.report.values import as_float, is_interval
from neftune.report.verdict_text import METHOD_NOTE, aa_table, alpha_lines, per_seed_table, pooled_table, summary_text
from neftune.report.words import BETTER, NOISE, WITHHELD, WORSE

__all__ = [
    "effect_diff_text",
    "effects_section",
    "headline_section",
    "length_phrase",
    "length_section",
    "rate_with_ci",
]


def effect_diff_text(effect: Mapping[str, Any]) -> str:
    """E.g. ``+3.0 points [−1.2, +7.1]`` or ``+422 chars [+380, +465]``."""
    scale, unit = float(effect["scale"]), str(effect["unit"])
    digits = 0 if unit == "chars" else 1
    return f"{fmt_bound(effect['diff'] * scale, digits, True)} {unit} {fmt_interval(effect['ci'], scale, digits)}"


def _effect_value(effect: Mapping[str, Any], which: str) -> str:
    """The ``"arm"`` or ``"baseline"`` mean of an effect, in its display unit."""
    scale, unit = float(effect["scale"]), str(effect["unit"])
    value = float(effect[which])
    if unit == "chars":
        return f"{fmt_number(value, 0)} chars"
    return fmt_number(value * scale, 1) + ("%" if effect["metric"] == "exact_match" else "")


def length_phrase(effect: Mapping[str, Any]) -> str:
    """E.g. ``answers 2.1× longer`` / ``answers 12% shorter`` / ``answer length within noise (+3%)``.

    A withheld verdict (too many answers cut at the token cap) says so and why instead.
    """
    if effect.get("verdict") == WITHHELD:
        return f"no length verdict ({effect.get('withheld') or WITHHELD})"
    ratio = effect.get("ratio")
    if ratio is None:
        return f"answer length {effect_diff_text(effect)} \u2014 {effect['verdict']}"
    change = f"{fmt_number((ratio - 1) * 100, 0, True)}%"
    if effect["verdict"] == NOISE:
        return f"answer length within noise ({change})"
    if ratio >= 1.5:
        return f"answers {ratio:.1f}\u00d7 longer"
    return f"answers {abs(ratio - 1) * 100:.0f}% {'longer' if ratio > 1 else 'shorter'}"


def rate_with_ci(rate: Any, ci: Sequence[float] | None) -> str:
    """A win rate with its interval when it has one, e.g. ``61.0% [54.2%, 67.5%]``."""
    text = fmt_percent(rate)
    if is_interval(ci):
        text += f" {fmt_interval(ci, 100, 1, '%', False)}"
    return text


def _no_comparison(a: Analysis) -> str | None:
    """Why no arm can be compared with the baseline, or ``None`` when some can."""
    if a.baseline is None:
        if a.baseline_name and any(f["name"] == a.baseline_name for f in a.failed):
            return f"The baseline arm {a.baseline_name!r} failed, so nothing can be compared with it."
        if a.baseline_name:
            return f"The baseline arm {a.baseline_name!r} is not among the arms, so nothing can be compared."
        return (
            "No baseline was identified (no \u201cbaseline\u201d field and no arm with \u03b1=0), so no "
            "arm can be compared with one."
        )
    if not a.treatments:
        return "Only the baseline ran, so there is nothing to compare it with."
    return None


def headline_section(a: Analysis) -> Section:
    """The verdict: the primary metric's sentence, one line per alpha, failed arms, how to read it."""
    sec = Section("Verdict", "verdict", css="headline")
    reason = _no_comparison(a)
    sec.blocks.append(Para(reason if reason is not None else summary_text(a), css="summary"))
    if reason is None:
        lines = alpha_lines(a)
        if lines:
            sec.blocks.append(Bullets(lines))
    for arm in a.failed:
        content: list[Span] = [
            ("b", f"{a.labels[arm['name']]} failed: "),
            ("", f"{arm['error']} \u2014 left out of every comparison."),
        ]
        sec.blocks.append(Notice("error", content))
    if a.verdicts is not None and a.verdicts.pooled:
        sec.blocks.append(Para(METHOD_NOTE.format(family=a.verdicts.family_size), css="note"))
    return sec


def _raw_against_lc(raw_verdict: str | None, lc_verdict: str | None) -> str:
    """What the raw and the length-controlled win rate say together."""
    if raw_verdict == BETTER and lc_verdict == NOISE:
        return ": the raw advantage does not survive length control, so it came from length."
    if raw_verdict == BETTER and lc_verdict == BETTER:
        return ": the advantage survives length control."
    if lc_verdict == WORSE:
        return ": at equal length the baseline's answers are preferred."
    return "."


def length_section(a: Analysis) -> Section:
    """How much longer each treatment's answers are, and whether its judge wins survive length control."""
    sec = Section("Length and quality", "length")
    sec.blocks.append(
        Para(
            "NEFTune tends to make answers longer. Longer answers are not necessarily better, but LLM judges "
            "(and readers) tend to prefer them, so a raw win rate mixes quality with length. The "
            "length-controlled (LC) win rate estimates how often the arm would win if both answers had the same "
            "length: a raw win that disappears under length control came from length, not quality. Exact match "
            "is not rewarded for length, but long answers can bury or garble the expected answer."
        )
    )
    cut = _cut_notice(a)
    if cut is not None:
        sec.blocks.append(cut)
    items: list[Inline] = []
    for arm in a.treatments:
        name = arm["name"]
        length = a.effects.get(name, {}).get("length_chars")
        judge = judge_of(arm)
        parts: list[Span] = [("b", f"{a.labels[name]}: ")]
        if length:
            means = f"mean {length['arm']:,.0f} vs {length['baseline']:,.0f} chars"
            parts.append(("", f"{length_phrase(length)} ({means}). "))
        raw, lc = as_float(judge.get("win_rate")), as_float(judge.get("lc_win_rate"))
        if raw is not None and lc is not None:
            parts.append(("", f"Raw win rate {fmt_percent(raw)} vs length-controlled {fmt_percent(lc)}"))
            parts.append(("", _raw_against_lc(judge_verdict(judge.get("ci")), judge_verdict(judge.get("lc_ci")))))
        elif not length:
            continue
        items.append(parts)
    if items:
        sec.blocks.append(Bullets(items))
    return sec


def _cut_notice(a: Analysis) -> Notice | None:
    """The share of each arm's answers cut off at the token cap; a warning when a length verdict is withheld."""
    shares = [(arm, share) for arm in a.arms if (share := cut_share(arm)) is not None]
    if not shares:
        return None
    caps = {cap for arm, _ in shares if (cap := cap_of(arm)) is not None}
    which = f"the {caps.pop()}-token cap" if len(caps) == 1 else "the token cap"
    listed = ", ".join(f"{a.labels[arm['name']]} {fmt_percent(share, 0)}" for arm, share in shares)
    text = f"Answers that reached {which} without ending (cut off): {listed}."
    if not any(share > CENSORED_LIMIT for _, share in shares):
        return Notice("info", text)
    return Notice(
        "warn",
        f"{text} Above {CENSORED_LIMIT:.0%} on either side a cut answer's length is only a lower bound, so no "
        "length verdict is given for those arms; rerun with a higher --max-new-tokens.",
    )


def effects_section(a: Analysis) -> Section:
    """Every alpha's pooled effect on every metric, each seed's own effect, and the A/A floor."""
    sec = Section("Metrics", "metrics")
    v = a.verdicts
    if v is not None and v.pooled:
        sec.blocks.append(pooled_table(v))
        for block in (aa_table(a), per_seed_table(a)):
            if block is not None:
                sec.blocks.append(block)
    elif a.baseline is not None and a.treatments:
        sec.blocks.append(
            Para(
                "No per-example metric or judge result was recorded, so no effect can be given with "
                "a confidence interval; per-arm aggregates are below."
            )
        )
    else:
        sec.blocks.append(Para("There is no pair of arms to compare; per-arm aggregates are below."))
    for name, error in a.compare_errors.items():
        sec.blocks.append(Notice("error", f"{a.labels.get(name, name)}: could not pair: {error}"))
    return sec
