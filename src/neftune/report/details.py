"""The report's reference sections: per-arm aggregates, the judge, example answers, run details."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from neftune.report.analysis import LOW_CONSISTENCY, Analysis, judge_of, judge_unreliable
from neftune.report.censoring import cut_share
from neftune.report.document import Example, Inline, KeyValues, Notice, Para, Section, Span, Table
from neftune.report.format import DASH, fmt_count, fmt_duration, fmt_percent, fmt_value
from neftune.report.sections import rate_with_ci
from neftune.report.values import as_float, mapping_at

__all__ = ["N_EXAMPLES_SHOWN", "examples_section", "judge_section", "per_arm_section", "run_details_section"]

#: How many stored example answers the report shows.
N_EXAMPLES_SHOWN = 4

_Cell = Callable[[Mapping[str, Any], Mapping[str, Any]], str]  # (eval, train) -> cell text


def _length_cell(unit: str, stat: str) -> _Cell:
    """The cell showing one statistic of the answer lengths in one unit."""
    return lambda ev, tr: fmt_value(mapping_at(ev, f"length_{unit}").get(stat), 0)


def _per_arm_rows() -> list[tuple[str, _Cell]]:
    rows: list[tuple[str, _Cell]] = [
        ("held-out loss", lambda ev, tr: fmt_value(ev.get("heldout_loss"), 3)),
        ("perplexity", lambda ev, tr: fmt_value(ev.get("perplexity"), 2)),
        ("exact match", lambda ev, tr: fmt_percent(ev.get("exact_match"))),
        ("ROUGE-L", lambda ev, tr: fmt_value(ev.get("rouge_l"), 1, 100.0)),
        ("distinct-1", lambda ev, tr: fmt_value(ev.get("distinct_1"), 3)),
        ("distinct-2", lambda ev, tr: fmt_value(ev.get("distinct_2"), 3)),
        ("repetition rate", lambda ev, tr: fmt_value(ev.get("repetition_rate"), 3)),
    ]
    for unit in ("chars", "tokens"):
        for stat in ("mean", "median", "p90"):
            rows.append((f"length ({unit}) {stat}", _length_cell(unit, stat)))
    rows.append(("answers cut at the token cap", lambda ev, tr: fmt_percent(cut_share({"eval": ev}), 0)))
    rows += [
        ("train time", lambda ev, tr: fmt_duration(tr.get("train_time_s"))),
        ("tokens / s", lambda ev, tr: fmt_value(tr.get("tokens_per_s"), 0)),
    ]
    return rows


def per_arm_section(a: Analysis) -> Section | None:
    """Aggregates of every arm that ran, side by side, and exact match per task family."""
    if not a.arms:
        return None
    sec = Section("Per-arm metrics", "per-arm")
    header = ["Metric"] + [a.labels[arm["name"]] + (" (baseline)" if arm is a.baseline else "") for arm in a.arms]
    align = "l" + "r" * len(a.arms)
    rows: list[list[Inline]] = []
    for label, get in _per_arm_rows():
        cells = [get(mapping_at(arm, "eval"), mapping_at(arm, "train")) for arm in a.arms]
        if any(c != DASH for c in cells):
            rows.append([label, *cells])
    if rows:
        caption = "Aggregates over the eval set (no intervals; see Metrics for paired effects)"
        sec.blocks.append(Table(header, rows, align, caption, compact=True))
    by_family = [mapping_at(mapping_at(arm, "eval"), "exact_match_by_family") for arm in a.arms]
    families = sorted({f for fams in by_family for f in fams})
    if families:
        rows = [[fam, *[fmt_percent(fams.get(fam)) for fams in by_family]] for fam in families]
        sec.blocks.append(Table(["Task family", *header[1:]], rows, align, "Exact match by task family", compact=True))
    return sec if sec.blocks else None


_JUDGE_HEADER = [
    "Arm",
    "vs",
    "Win rate [95% CI]",
    "LC win rate [95% CI]",
    "Consistency",
    "n",
    "Failed",
    "Ties/splits",
    "Backend",
]


def _judge_notices(a: Analysis, judged: Sequence[Mapping[str, Any]]) -> list[Notice]:
    """Warnings about judges whose reliability is unknown or low, and about failed judgments."""
    notices = []
    for arm in judged:
        j = judge_of(arm)
        consistency = as_float(j.get("consistency"))
        label = a.labels[arm["name"]]
        if consistency is None:
            text = f"{label}: position consistency was not measured, so the judge's reliability is unknown."
            notices.append(Notice("info", text))
        elif judge_unreliable(j):
            content: list[Span] = [
                ("b", f"{label}: the judge is unreliable. "),
                (
                    "",
                    f"Its position consistency is {consistency:.2f} (below {LOW_CONSISTENCY:.2f}): it often "
                    "changed its verdict when the answers swapped places, so treat these win rates as noise.",
                ),
            ]
            notices.append(Notice("warn", content))
    failures = []
    for arm in judged:
        n, n_failed = as_float(judge_of(arm).get("n")), as_float(judge_of(arm).get("n_failed"))
        if n_failed:
            of = f" of {n + n_failed:.0f}" if n is not None else ""
            failures.append(f"{a.labels[arm['name']]} {n_failed:.0f}{of}")
    if failures:
        notices.append(Notice("info", f"Failed judgments, excluded from the win rates: {'; '.join(failures)}."))
    return notices


def judge_section(a: Analysis) -> Section:
    """The judge's win rates, position consistency and failures per treatment."""
    sec = Section("Judge", "judge")
    judged = [arm for arm in a.treatments if judge_of(arm)]
    if not judged:
        sec.blocks.append(
            Para("No LLM judge was run, so there are no win rates; the verdict rests on the objective metrics above.")
        )
        return sec
    sec.blocks.append(
        Para(
            "Each pair of answers is judged twice, once in each order. Position consistency is the share of pairs "
            "where both orders gave the same verdict: a judge that always picks the same position scores 0, one "
            f"flipping a coin about 0.5. Below {LOW_CONSISTENCY:.0%} the judge is treated as unreliable. Split "
            "verdicts count as ties."
        )
    )
    rows: list[list[Inline]] = []
    for arm in judged:
        j = judge_of(arm)
        rows.append(
            [
                a.labels[arm["name"]],
                a.labels.get(str(j.get("vs")), str(j.get("vs", DASH))),
                rate_with_ci(j.get("win_rate"), j.get("ci")),
                rate_with_ci(j.get("lc_win_rate"), j.get("lc_ci")),
                fmt_value(j.get("consistency"), 2),
                fmt_value(j.get("n"), 0),
                fmt_value(j.get("n_failed"), 0),
                fmt_value(j.get("n_ties"), 0),
                str(j.get("backend", DASH)),
            ]
        )
    sec.blocks.append(Table(_JUDGE_HEADER, rows, "llrrrrrrl"))
    sec.blocks += _judge_notices(a, judged)
    return sec


def examples_section(a: Analysis) -> Section | None:
    """The first stored examples, in order, with every arm's answer."""
    examples = a.results.get("examples")
    if not isinstance(examples, Sequence) or isinstance(examples, str) or not examples:
        return None
    sec = Section("Example answers", "examples")
    shown = [ex for ex in examples if isinstance(ex, Mapping)][:N_EXAMPLES_SHOWN]
    sec.blocks.append(
        Para(
            f"The first {len(shown)} of {len(examples)} stored examples, in order (not "
            "picked for effect), answered by each arm."
        )
    )
    order = [arm["name"] for arm in a.arms] + [arm["name"] for arm in a.failed]
    for i, ex in enumerate(shown, 1):
        raw_outputs = ex.get("outputs")
        outputs: Mapping[str, Any] = raw_outputs if isinstance(raw_outputs, Mapping) else {}
        names = [n for n in order if n in outputs] + [n for n in outputs if n not in order]
        reference = ex.get("reference")
        answers = [
            (a.labels.get(str(n), str(n)) + (" (baseline)" if n == a.baseline_name else ""), str(outputs[n]))
            for n in names
        ]
        reference = None if reference is None else str(reference)
        sec.blocks.append(Example(i, str(ex.get("instruction", "")), reference, answers))
    return sec


def _flatten(obj: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Nested mappings as ``("a.b.c", "value")`` pairs; lists joined with commas."""
    if isinstance(obj, Mapping):
        out: list[tuple[str, str]] = []
        for k, v in obj.items():
            out += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(obj, (list, tuple)):
        return [(prefix, ", ".join(str(v) for v in obj))]
    return [(prefix, str(obj))]


def _model_pairs(model: Mapping[str, Any]) -> list[tuple[str, str]]:
    extra = []
    if model.get("n_params") is not None:
        extra.append(f"{fmt_count(model.get('n_params'))} parameters")
    if model.get("trainable_params") is not None:
        extra.append(f"{fmt_count(model.get('trainable_params'))} trainable")
    if model.get("dtype"):
        extra.append(str(model["dtype"]))
    desc = str(model.get("spec", DASH))
    pairs = [("Model", desc + (f" ({', '.join(extra)})" if extra else ""))]
    other = {k: v for k, v in model.items() if k not in ("spec", "n_params", "trainable_params", "dtype")}
    return pairs + [(f"model.{k}", v) for k, v in _flatten(other)]


def run_details_section(a: Analysis) -> Section:
    """Model, data, seeds, timing, package versions and training settings, as recorded."""
    r = a.results
    sec = Section("Run details", "details", css="details")
    model = mapping_at(r, "model")
    pairs: list[tuple[str, str]] = _model_pairs(model) if model else []
    data = mapping_at(r, "data")
    for key, label in (("train", "Train data"), ("eval", "Eval data")):
        if data.get(key) is not None:
            n = data.get(f"n_{key}")
            pairs.append(
                (label, f"{data[key]}" + (f" ({fmt_value(n, 0)} examples)" if as_float(n) is not None else ""))
            )
    if r.get("seeds") is not None:
        seeds = r["seeds"]
        pairs.append(("Seeds", ", ".join(str(s) for s in seeds) if isinstance(seeds, (list, tuple)) else str(seeds)))
    if as_float(r.get("wall_time_s")) is not None:
        pairs.append(("Wall time", fmt_duration(r.get("wall_time_s"))))
    if r.get("created"):
        pairs.append(("Created", str(r["created"])))
    versions = mapping_at(r, "versions")
    if versions:
        pairs.append(("Versions", ", ".join(f"{k} {v}" for k, v in versions.items())))
    if pairs:
        sec.blocks.append(KeyValues(pairs))
    settings = mapping_at(r, "settings")
    if settings:
        sec.blocks.append(KeyValues(_flatten(settings), "Training settings", columns=3))
    if not sec.blocks:
        sec.blocks.append(Para("No run details were recorded."))
    return sec
