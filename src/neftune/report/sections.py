"""The report's leading sections: the verdict, length against quality, and the table of effects.

Also the phrases the other sections share (an effect with its interval, a length change, a win
rate with its interval).  Each ``*_section`` function turns an :class:`Analysis` into a
:class:`Section` of blocks; none of them computes a statistic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from neftune.report.analysis import (
    BETTER,
    NOISE,
    PAIRED_METRICS,
    WORSE,
    Analysis,
    QualityFact,
    judge_of,
    judge_unreliable,
    judge_verdict,
    quality_facts,
)
from neftune.report.document import Bullets, Inline, Notice, Para, Section, Span, Table, verdict_span
from neftune.report.format import DASH, fmt_bound, fmt_interval, fmt_number, fmt_percent
from neftune.report.values import as_float, is_interval, mapping_at

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
    """E.g. ``answers 2.1× longer`` / ``answers 12% shorter`` / ``answer length within noise (+3%)``."""
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
        text += f" {fmt_interval(ci, 100, 1, '%', False)}"  # type: ignore[arg-type]
    return text


def _fact_size(fact: QualityFact) -> str:
    if fact.effect is not None:
        return f"{fmt_number(fact.effect['diff'] * fact.effect['scale'], 1, True)} {fact.effect['unit']}"
    return fmt_percent(fact.rate)


def _arm_headline(a: Analysis, arm: Mapping[str, Any]) -> list[Span]:
    name = arm["name"]
    spans: list[Span] = [("b", f"{a.labels[name]}: ")]
    if name in a.compare_errors:
        return [*spans, ("", "could not be compared with the baseline: " + a.compare_errors[name])]
    effects = a.effects.get(name, {})
    parts: list[list[Span]] = []
    for key in ("exact_match", "rouge_l"):
        effect = effects.get(key)
        if effect:
            parts.append(
                [("", f"{effect['label']} {effect_diff_text(effect)} \u2014 "), verdict_span(effect["verdict"])]
            )
    judge = judge_of(arm)
    lc = as_float(judge.get("lc_win_rate"))
    if lc is not None:
        ci = judge.get("lc_ci")
        part: list[Span] = [("", f"length-controlled win rate {rate_with_ci(lc, ci)}")]
        verdict = judge_verdict(ci)
        if verdict:
            part += [("", " \u2014 "), verdict_span(verdict)]
        if judge_unreliable(judge):
            part.append(("b", " (judge unreliable)"))
        parts.append(part)
    length = effects.get("length_chars")
    if length:
        parts.append([("", length_phrase(length))])
    if not parts:
        ev, base_ev = mapping_at(arm, "eval"), mapping_at(a.baseline, "eval")
        loss, base_loss = as_float(ev.get("heldout_loss")), as_float(base_ev.get("heldout_loss"))
        if loss is not None and base_loss is not None:
            parts.append([("", f"held-out loss {loss:.3f} vs {base_loss:.3f} (a single aggregate: no CI, no verdict)")])
        else:
            parts.append([("", "no per-example metric or judge result to compare")])
    for i, part in enumerate(parts):
        spans += ([("", "; ")] if i else []) + part
    return spans


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


def _summary(a: Analysis) -> list[Span]:
    """A plain answer to "did the noise help?", naming every difference whose CI excludes 0."""
    reason = _no_comparison(a)
    if reason is not None:
        return [("", reason)]
    better: list[str] = []
    worse: list[str] = []
    n_facts = n_significant = 0
    for arm in a.treatments:
        label = a.labels[arm["name"]]
        facts = [f for f in quality_facts(a, arm) if f.counts]
        n_facts += len(facts)
        n_significant += sum(1 for f in facts if f.verdict in (BETTER, WORSE))
        good = [f"{f.measure} ({_fact_size(f)})" for f in facts if f.verdict == BETTER]
        bad = [f"{f.measure} ({_fact_size(f)})" for f in facts if f.verdict == WORSE]
        if good:
            better.append(f"{label} on {' and '.join(good)}")
        if bad:
            worse.append(f"{label} on {' and '.join(bad)}")
    if not n_facts:
        return [
            (
                "",
                "No per-example quality metric or reliable judge result was recorded, so this run cannot "
                "say whether NEFTune helped; see the held-out loss below.",
            )
        ]
    n = a.n_eval()
    on = f" on this eval set (n = {n})" if n else ""
    rest = " Every other quality difference is within noise." if n_significant < n_facts else ""
    if not better and not worse:
        text = (
            f"Every quality difference between NEFTune and the baseline is within noise{on}: this "
            "experiment does not show that NEFTune helped or hurt."
        )
    elif not worse:
        text = f"NEFTune helped: better than the baseline for {'; '.join(better)}.{rest}"
    elif not better:
        text = f"NEFTune hurt: worse than the baseline for {'; '.join(worse)}.{rest}"
    else:
        text = f"Mixed result: better for {'; '.join(better)}, but worse for {'; '.join(worse)}.{rest}"
    changed = [
        f"{a.labels[arm['name']]} {length_phrase(e)}"
        for arm in a.treatments
        if (e := a.effects.get(arm["name"], {}).get("length_chars")) and e["significant"]
    ]
    if changed:
        text += f" Answer length changed: {'; '.join(changed)}."
    return [("", text)]


def headline_section(a: Analysis) -> Section:
    """The verdict: one summary sentence, one line per treatment, failed arms, how to read it."""
    sec = Section("Verdict", "verdict", css="headline")
    sec.blocks.append(Para(_summary(a), css="summary"))
    if a.baseline is not None and a.treatments:
        sec.blocks.append(Bullets([_arm_headline(a, arm) for arm in a.treatments]))
    for arm in a.failed:
        content: list[Span] = [
            ("b", f"{a.labels[arm['name']]} failed: "),
            ("", f"{arm['error']} \u2014 left out of every comparison."),
        ]
        sec.blocks.append(Notice("error", content))
    if a.effects:
        sec.blocks.append(
            Para(
                "Differences are arm \u2212 baseline, paired per eval example, with 95% percentile-bootstrap "
                "intervals; \u201cwithin noise\u201d means the interval contains 0. The intervals are not corrected "
                "for multiple comparisons, so with several arms and metrics expect an occasional \u201cbetter\u201d "
                "or \u201cworse\u201d by chance.",
                css="note",
            )
        )
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


def _effect_rows(a: Analysis, arm: Mapping[str, Any]) -> list[list[Inline]]:
    """Table rows of one treatment: its paired metrics, then its judge win rates against a tie."""
    name = arm["name"]
    rows: list[list[Inline]] = []
    for metric in PAIRED_METRICS:
        e = a.effects.get(name, {}).get(metric.key)
        if not e:
            continue
        value = _effect_value(e, "arm")
        if metric.key == "length_chars" and e.get("ratio"):
            value += f" ({e['ratio']:.2f}\u00d7)"
        verdict: Inline = [verdict_span(e["verdict"])]
        rows.append([a.labels[name], e["label"], _effect_value(e, "baseline"), value, effect_diff_text(e), verdict])
    judge = judge_of(arm)
    for key, ci_key, label in (("win_rate", "ci", "judge win rate"), ("lc_win_rate", "lc_ci", "judge LC win rate")):
        rate = as_float(judge.get(key))
        if rate is None:
            continue
        ci = judge.get(ci_key)
        diff = fmt_number((rate - 0.5) * 100, 1, True) + " points"
        if is_interval(ci):
            diff += " " + fmt_interval([float(c) - 0.5 for c in ci], 100)
        judged = judge_verdict(ci)
        cell: Inline = [verdict_span(judged)] if judged else "no CI"
        if judge_unreliable(judge):
            cell = [*([verdict_span(judged)] if judged else []), ("b", " unreliable judge")]
        rows.append([a.labels[name], label, "50.0% (tie)", fmt_percent(rate), diff, cell])
    return rows


def effects_section(a: Analysis) -> Section:
    """Every treatment's effect on every metric against the baseline, with intervals and verdicts."""
    sec = Section("Metrics", "metrics")
    rows: list[list[Inline]] = []
    for arm in a.treatments if a.baseline is not None else []:
        name = arm["name"]
        if name in a.compare_errors:
            rows.append([a.labels[name], DASH, DASH, DASH, "could not pair: " + a.compare_errors[name], DASH])
        else:
            rows += _effect_rows(a, arm)
    if rows:
        base = a.labels.get(a.baseline_name or "", "baseline")
        header = ["Arm", "Metric", f"Baseline ({base})", "Arm", "\u0394 vs baseline [95% CI]", "Verdict"]
        sec.blocks.append(Table(header, rows, "llrrrl", "Each arm vs the baseline (means over the same eval examples)"))
    elif a.baseline is not None and a.treatments:
        sec.blocks.append(
            Para(
                "No per-example metric or judge result was recorded, so no effect can be given with "
                "a confidence interval; per-arm aggregates are below."
            )
        )
    else:
        sec.blocks.append(Para("There is no pair of arms to compare; per-arm aggregates are below."))
    return sec
