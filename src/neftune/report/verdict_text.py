"""The verdict in words and tables: the primary metric's sentence, pooled effects, per-seed effects, A/A.

Everything here reads :class:`neftune.report.verdicts.Verdicts`; nothing computes a statistic.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from neftune.report.analysis import Analysis
from neftune.report.document import Inline, Para, Span, Table, verdict_span
from neftune.report.format import DASH, fmt_bound, fmt_interval, fmt_number
from neftune.report.verdicts import SIGNIFICANCE, Pooled, Verdicts
from neftune.report.words import BETTER, NOISE, UNMEASURED, WITHHELD, WORSE

__all__ = ["METHOD_NOTE", "aa_table", "alpha_lines", "per_seed_table", "pooled_table", "summary_text"]

METHOD_NOTE = (
    "How to read this: each \u03b1 is paired with the baseline of the same training seed, prompt by prompt, and "
    "the seeds are pooled; the interval includes the variation between training seeds (t with seeds \u2212 1 "
    "degrees of freedom), so two seeds give wide intervals. The verdict rests on the primary metric alone, "
    "declared before the run and Holm-corrected across the \u03b1s; every other metric is exploratory and "
    "counts only after Holm correction across all {family} tests. 0/1 metrics also pass an exact sign "
    "(McNemar) test. The A/A rows compare baseline seeds with each other: differences that large arise from "
    "the seed alone."
)


def _alpha_label(alpha: float) -> str:
    return f"\u03b1={alpha:g}"


def _p(p: float) -> str:
    if p != p:  # NaN
        return DASH
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def pooled_diff(e: Pooled | Mapping[str, Any]) -> str:
    """E.g. ``+3.0 points [−1.2, +7.1]``."""
    fields: Mapping[str, Any] = e if isinstance(e, Mapping) else vars(e)
    scale, unit = float(fields["scale"]), str(fields["unit"])
    digits = 0 if unit == "chars" else 1
    estimate, ci = float(fields["estimate"]), fields.get("ci")
    text = f"{fmt_bound(estimate * scale, digits, True)} {unit}"
    return text if ci is None else f"{text} {fmt_interval(ci, scale, digits)}"


def _seeds_text(e: Pooled) -> str:
    return f"{len(e.seeds)} seed" + ("s" if len(e.seeds) != 1 else "")


def _named(e: Pooled) -> str:
    return f"{_alpha_label(e.alpha)} {e.label} {pooled_diff(e)}"


def summary_text(a: Analysis) -> str:
    """The verdict sentence: the primary metric alone; help or harm only with seed variance measured."""
    v = a.verdicts
    if v is None or not v.pooled:
        return "No NEFTune arm could be paired with a baseline of the same seed, so there is no verdict."
    if v.primary is None:
        note = f" {v.primary_note}" if v.primary_note else ""
        return f"No primary metric was measured, so this run gives no verdict.{note} Exploratory results are below."
    mains = v.primary_effects()
    label = mains[0].label
    head = f"Primary metric: {label} ({v.primary_source})."
    if v.primary_note:
        head = f"{v.primary_note} {head}"
    if not v.seed_variance_measured:
        on = "; ".join(f"{_alpha_label(e.alpha)} {pooled_diff(e)}" for e in mains)
        return (
            f"{head} With one training seed, training-seed variance is unmeasured, so this run cannot say whether "
            f"NEFTune helped or hurt. On this seed: {on} (prompt-level intervals only; rerun with --seeds 0,1,2)."
        )
    better = [_named(e) for e in mains if e.verdict == BETTER]
    worse = [_named(e) for e in mains if e.verdict == WORSE]
    if better and not worse:
        verdict = f"NEFTune helped: {'; '.join(better)}, beyond seed-to-seed noise."
    elif worse and not better:
        verdict = f"NEFTune hurt: {'; '.join(worse)}, beyond seed-to-seed noise."
    elif better and worse:
        verdict = f"Mixed result: better for {'; '.join(better)}, worse for {'; '.join(worse)}."
    else:
        verdict = (
            f"No \u03b1 changed {label} beyond the noise of {_seeds_text(mains[0])} and the eval prompts: this "
            "experiment does not show that NEFTune helped or hurt."
        )
    exploratory = [
        e
        for m in v.pooled.values()
        for e in m.values()
        if e.role == "exploratory" and e.verdict not in (NOISE, UNMEASURED, WITHHELD)
    ]
    if exploratory:
        listed = "; ".join(f"{_named(e)} ({e.verdict})" for e in exploratory)
        verdict += f" Exploratory, significant after Holm correction across {v.family_size} tests: {listed}."
    return f"{head} {verdict}"


def alpha_lines(a: Analysis) -> list[Inline]:
    """One bullet per alpha: the pooled primary effect with its verdict, then the exploratory ones."""
    v = a.verdicts
    lines: list[Inline] = []
    if v is None:
        return lines
    for alpha, effects in sorted(v.pooled.items()):
        ordered = sorted(effects.values(), key=lambda e: e.role != "primary")
        spans: list[Span] = [("b", f"{_alpha_label(alpha)} ({_seeds_text(ordered[0])}): ")]
        for i, e in enumerate(ordered):
            role = " (primary)" if e.role == "primary" else ""
            spans.append(("", ("; " if i else "") + f"{e.label}{role} {pooled_diff(e)}"))
            if e.verdict != UNMEASURED:
                spans += [("", " \u2014 "), verdict_span(e.verdict)]
        if not v.seed_variance_measured:
            spans.append(("", " (one seed: no verdict)"))
        lines.append(spans)
    return lines


def pooled_table(v: Verdicts) -> Table:
    """Every alpha x metric, pooled over seeds, with Holm-adjusted p-values and verdicts."""
    rows: list[list[Inline]] = []
    for alpha, effects in sorted(v.pooled.items()):
        for e in sorted(effects.values(), key=lambda e: e.role != "primary"):
            scale = e.scale
            digits = 0 if e.unit == "chars" else 1
            rows.append(
                [
                    _alpha_label(alpha),
                    e.label + (" (primary)" if e.role == "primary" else ""),
                    _seeds_text(e),
                    fmt_number(e.baseline * scale, digits),
                    fmt_number(e.arm * scale, digits),
                    pooled_diff(e),
                    _p(e.p_holm),
                    [verdict_span(e.verdict)],
                ]
            )
    header = ["Arm", "Metric", "Seeds", "Baseline", "Arm", "\u0394 [95% CI]", "p (Holm)", "Verdict"]
    caption = (
        f"Pooled over seeds, paired within seed; significance at {SIGNIFICANCE:g} after Holm correction "
        "(primary: across the \u03b1s; exploratory: across the whole family)"
    )
    return Table(header, rows, "lllrrrrl", caption)


def per_seed_table(a: Analysis) -> Table | None:
    """Each seed's own effect (against the baseline of that seed), uncorrected: one seed's view."""
    if a.verdicts is None or not a.verdicts.seed_variance_measured:
        return None  # with one seed the pooled table already is that seed's view
    rows: list[list[Inline]] = []
    for arm in a.treatments:
        for e in a.effects.get(arm["name"], {}).values():
            p = e.get("p_value")
            rows.append(
                [
                    a.labels[arm["name"]],
                    a.labels.get(a.paired_with.get(arm["name"], ""), DASH),
                    e["label"],
                    pooled_diff({**e, "estimate": e["diff"]}),
                    _p(float(p)) if p is not None else DASH,
                ]
            )
    if not rows:
        return None
    caption = "Per seed, against the baseline of the same seed (uncorrected p; no verdict rests on one seed)"
    return Table(["Arm", "vs", "Metric", "\u0394 [95% CI]", "p"], rows, "lllrr", caption)


def aa_table(a: Analysis) -> Table | Para | None:
    """Baseline seed against baseline seed: the noise floor of one comparison."""
    v = a.verdicts
    if v is None or not v.pooled:
        return None
    if len(v.seeds) < 2:
        return Para(
            "A/A noise floor: unmeasured (one baseline seed). Training-seed variance is unmeasured, so no verdict "
            "can claim help or harm.",
            css="note",
        )
    from neftune.report.analysis import PAIRED_METRICS

    rows: list[list[Inline]] = []
    for metric in PAIRED_METRICS:
        floor = v.aa.get(metric.key)
        if not floor:
            continue
        info = {"scale": metric.scale, "unit": metric.unit}
        for pair in floor["pairs"]:
            s, r = pair["seeds"]
            rows.append(
                [metric.label, f"seed {r} \u2212 seed {s}", pooled_diff({**info, **pair}), _p(pair["p_value"] or 1.0)]
            )
        rows.append(
            [metric.label, "floor (largest |A/A|)", pooled_diff({**info, "estimate": floor["floor"], "ci": None}), ""]
        )
    caption = "A/A: baseline seeds against each other; a treatment effect below the floor is within seed noise"
    return Table(["Metric", "Baseline pair", "\u0394 [95% CI]", "p"], rows, "llrr", caption)
