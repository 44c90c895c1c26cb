"""The experiment report: did NEFTune help, by how much, and how sure can we be.

:func:`write_report` turns the results of ``neftune compare`` into ``results.json``, ``report.md``
and a self-contained ``report.html`` (inline CSS, plots embedded as base64 PNG data URIs, no
scripts and no external resources, so it opens offline and can be mailed as one file), plus PNG
plots under ``plots/``.  :func:`compute_effects` gives the paired per-example effect of one arm
against the baseline, with a bootstrap confidence interval and a plain-language verdict.

Input schema (every part not marked *required* may be missing or ``null``)::

    {
      "title": str, "created": ISO-8601 str, "wall_time_s": float,
      "model": {"spec": str, "n_params": int, "trainable_params": int, "dtype": str, ...},
      "data": {"train": str, "eval": str, "n_train": int, "n_eval": int},
      "seeds": [int],
      "versions": {"neftune": str, "torch": str, "transformers": str, "python": str, ...},
      "settings": {...free-form training settings, may nest (lr, steps, batch, lora: {...})...},
      "baseline": str,                  # name of the baseline arm, e.g. "alpha=0"
      "arms": [                         # required (may be empty)
        {
          "name": str,                  # required, unique
          "alpha": float, "seed": int,
          "error": str,                 # present (non-empty) when the arm failed; rest may be absent
          "train": {"loss_curve": [[step, loss], ...], "heldout_curve": [[step, loss], ...],
                    "train_time_s": float, "tokens_per_s": float},
          "eval": {
            "heldout_loss": float, "perplexity": float,
            "exact_match": float | null, "exact_match_by_family": {family: float},
            "distinct_1": float, "distinct_2": float, "repetition_rate": float,
            "rouge_l": float | null,
            "length_chars": {"mean", "median", "p90"}, "length_tokens": {"mean", "median", "p90"},
            "per_example": {"correct": [0/1, ...] | null, "length_chars": [int, ...],
                            "rouge_l": [float, ...] | null}
          },
          "judge": null | {"vs": str, "backend": str, "win_rate": float, "ci": [lo, hi],
                           "lc_win_rate": float, "lc_ci": [lo, hi], "consistency": float,
                           "n": int, "n_failed": int, "n_ties": int}
        }, ...
      ],
      "examples": [{"instruction": str, "reference": str | null, "outputs": {arm_name: str}}]
    }

Rates (exact match, ROUGE-L, win rates, consistency) are fractions in [0, 1].  Per-example lists
are aligned by eval example across arms (index ``i`` is the same prompt in every arm); a ``null``
entry drops that example from the pairs of that metric.  When ``"baseline"`` is missing, the first
arm with ``alpha == 0`` is the baseline.  Arms with an ``"error"`` are listed as failed and left out
of every comparison and plot.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from neftune.errors import DataError
from neftune.io import atomic_write_bytes, atomic_write_text
from neftune.stats import bootstrap_ci

__all__ = ["LOW_CONSISTENCY", "PLOT_NAMES", "compute_effects", "write_report"]

#: Below this judge position consistency the report warns that the judge is unreliable: a judge
#: that changes its verdict when the two answers swap places is largely reacting to position.
LOW_CONSISTENCY = 0.6

#: Plot files written under ``out_dir/plots/`` (each only when its data is present).
PLOT_NAMES = ("loss", "lengths", "winrates", "metrics")

N_EXAMPLES_SHOWN = 4
CI_LEVEL = 0.95

BETTER, WORSE, NOISE, LONGER, SHORTER = "better", "worse", "within noise", "longer", "shorter"

BASELINE_COLOR = "#6b7280"
ARM_COLORS = ("#2563eb", "#ea580c", "#16a34a", "#9333ea", "#dc2626", "#0891b2", "#ca8a04")
DPI = 110


# --------------------------------------------------------------------------------------------
# Paired effects
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Metric:
    """A per-example metric that can be paired across arms."""

    key: str  # key in the returned effects and in eval.per_example
    label: str
    higher_is_better: bool | None  # None: neither direction is better (length)
    scale: float  # multiply a raw difference by this for display
    unit: str  # unit of the scaled difference


_PAIRED = (
    _Metric("exact_match", "exact match", True, 100.0, "points"),
    _Metric("rouge_l", "ROUGE-L", True, 100.0, "points"),
    _Metric("length_chars", "response length", None, 1.0, "chars"),
)
# exact-match correctness is stored per example as "correct", the others under their own key
_PER_EXAMPLE_KEY = {"exact_match": "correct", "rouge_l": "rouge_l", "length_chars": "length_chars"}


def _arm_name(arm: Mapping[str, Any]) -> str:
    return str(arm.get("name", "?"))


def _section(obj: Mapping[str, Any] | None, key: str) -> Mapping[str, Any]:
    """Return ``obj[key]`` when it is a mapping, else an empty mapping (missing optional part)."""
    if not isinstance(obj, Mapping):
        return {}
    value = obj.get(key)
    return value if isinstance(value, Mapping) else {}


def _per_example(arm: Mapping[str, Any], key: str) -> list[float | None] | None:
    """Return the per-example values of ``key`` as floats (``None`` kept), or ``None`` if absent."""
    values = _section(_section(arm, "eval"), "per_example").get(key)
    if values is None:
        return None
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise DataError(f"arm {_arm_name(arm)!r}: eval.per_example.{key} must be a list, got {type(values).__name__}")
    out: list[float | None] = []
    for i, v in enumerate(values):
        if v is None:
            out.append(None)
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise DataError(f"arm {_arm_name(arm)!r}: eval.per_example.{key}[{i}] is not a number: {v!r}") from None
        out.append(f if math.isfinite(f) else None)
    return out


def _verdict(lo: float, hi: float, higher_is_better: bool | None) -> str:
    """Plain-language verdict for a difference whose CI is ``[lo, hi]`` (inclusive of 0 = noise)."""
    if lo <= 0.0 <= hi:
        return NOISE
    up = lo > 0.0
    if higher_is_better is None:
        return LONGER if up else SHORTER
    return BETTER if up == higher_is_better else WORSE


def compute_effects(
    baseline_arm: Mapping[str, Any],
    arm: Mapping[str, Any],
    *,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = CI_LEVEL,
) -> dict[str, dict[str, Any]]:
    """Return the paired per-example effect of ``arm`` against ``baseline_arm``, per metric.

    Metrics: ``"exact_match"`` (from ``per_example.correct``), ``"rouge_l"`` and
    ``"length_chars"``; a metric is present only when both arms recorded it per example.  Each
    value is a dict with ``metric`` (the key), ``label``, ``unit`` and ``scale`` (display: ``diff * scale`` in ``unit``),
    ``n`` (pairs used), ``baseline`` and ``arm`` (means over those pairs), ``diff`` (mean of
    ``arm - baseline``), ``ci`` (percentile bootstrap ``[lo, hi]`` of that mean at ``level``),
    ``significant`` (the CI excludes 0) and ``verdict``: ``"better"``, ``"worse"`` or
    ``"within noise"``.  Length has no better direction, so its verdict is ``"longer"``,
    ``"shorter"`` or ``"within noise"``, and it also carries ``ratio`` (arm mean / baseline mean).

    Raises :class:`DataError` when the two arms hold different numbers of per-example values,
    since then they were not evaluated on the same examples and cannot be paired.
    """
    effects: dict[str, dict[str, Any]] = {}
    for metric in _PAIRED:
        key = _PER_EXAMPLE_KEY[metric.key]
        base, other = _per_example(baseline_arm, key), _per_example(arm, key)
        if base is None or other is None:
            continue
        if len(base) != len(other):
            raise DataError(
                f"arm {_arm_name(arm)!r}: eval.per_example.{key} has {len(other)} values but baseline "
                f"{_arm_name(baseline_arm)!r} has {len(base)}; paired effects need the same eval examples"
            )
        pairs = [(b, a) for b, a in zip(base, other, strict=False) if b is not None and a is not None]
        if not pairs:
            continue
        diffs = [a - b for b, a in pairs]
        n = len(pairs)
        mean_base = math.fsum(b for b, _ in pairs) / n
        mean_arm = math.fsum(a for _, a in pairs) / n
        lo, hi = bootstrap_ci(diffs, n_boot=n_boot, seed=seed, level=level)
        lo, hi = float(lo), float(hi)
        effect: dict[str, Any] = {
            "metric": metric.key,
            "label": metric.label,
            "unit": metric.unit,
            "scale": metric.scale,
            "higher_is_better": metric.higher_is_better,
            "n": n,
            "baseline": mean_base,
            "arm": mean_arm,
            "diff": math.fsum(diffs) / n,
            "ci": [lo, hi],
            "level": level,
            "significant": not (lo <= 0.0 <= hi),
            "verdict": _verdict(lo, hi, metric.higher_is_better),
        }
        if metric.key == "length_chars":
            effect["ratio"] = mean_arm / mean_base if mean_base > 0 else None
        effects[metric.key] = effect
    return effects


def _judge_verdict(ci: Sequence[float] | None) -> str | None:
    """Verdict of a win rate against a tie (50%), from its CI; ``None`` when there is no CI."""
    if not _is_interval(ci):
        return None
    lo, hi = float(ci[0]), float(ci[1])  # type: ignore[index]
    return _verdict(lo - 0.5, hi - 0.5, True)


# --------------------------------------------------------------------------------------------
# Number formatting (true minus signs, so negative numbers read as numbers, not hyphens)
# --------------------------------------------------------------------------------------------

MINUS = "\u2212"


def _num(x: Any) -> float | None:
    """``x`` as a finite float, or ``None`` (missing, non-numeric, NaN or infinite)."""
    if x is None or isinstance(x, bool):
        return None
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _is_interval(ci: Any) -> bool:
    return (
        isinstance(ci, Sequence)
        and not isinstance(ci, str)
        and len(ci) == 2
        and _num(ci[0]) is not None
        and _num(ci[1]) is not None
    )


def _f(x: float, digits: int = 1, signed: bool = False) -> str:
    """``x`` with ``digits`` decimals and thousands separators; ``signed`` adds "+" to positives."""
    text = f"{x:+,.{digits}f}" if signed else f"{x:,.{digits}f}"
    if text.lstrip("+-") == f"{0:.{digits}f}":
        return text.lstrip("+-")  # "-0.0" and "+0.0" both read as a change where there is none
    return text.replace("-", MINUS)


def _fmt(x: Any, digits: int = 3, scale: float = 1.0, suffix: str = "") -> str:
    v = _num(x)
    return "\u2014" if v is None else _f(v * scale, digits) + suffix


def _pct(x: Any, digits: int = 1) -> str:
    return _fmt(x, digits, 100.0, "%")


def _f_bound(x: float, digits: int, signed: bool) -> str:
    """Like :func:`_f`, with up to 3 more decimals while a nonzero ``x`` would print as zero.

    A CI bound of 0.004 shown as "0.0" next to the verdict "better" would read as a contradiction.
    """
    while x != 0 and round(x, digits) == 0 and digits < 4:
        digits += 1
    return _f(x, digits, signed)


def _ci_text(ci: Sequence[float], scale: float = 1.0, digits: int = 1, suffix: str = "", signed: bool = True) -> str:
    lo, hi = (float(c) * scale for c in ci)
    return f"[{_f_bound(lo, digits, signed)}{suffix}, {_f_bound(hi, digits, signed)}{suffix}]"


def _duration(seconds: Any) -> str:
    s = _num(seconds)
    if s is None:
        return "\u2014"
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(round(s), 60)
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {sec:02d} s"


def _count(x: Any) -> str:
    v = _num(x)
    if v is None:
        return "\u2014"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.2f}{unit}"
    return f"{v:,.0f}"


def _effect_diff_text(effect: Mapping[str, Any]) -> str:
    """E.g. ``+3.0 points [−1.2, +7.1]`` or ``+422 chars [+380, +465]``."""
    scale, unit = float(effect["scale"]), str(effect["unit"])
    digits = 0 if unit == "chars" else 1
    return f"{_f_bound(effect['diff'] * scale, digits, True)} {unit} {_ci_text(effect['ci'], scale, digits)}"


def _effect_value(effect: Mapping[str, Any], which: str) -> str:
    scale, unit = float(effect["scale"]), str(effect["unit"])
    value = float(effect[which])
    if unit == "chars":
        return f"{_f(value, 0)} chars"
    return _f(value * scale, 1) + ("%" if effect["metric"] == "exact_match" else "")


def _length_phrase(effect: Mapping[str, Any]) -> str:
    """E.g. ``answers 2.1× longer`` / ``answers 12% shorter`` / ``answer length within noise (+3%)``."""
    ratio = effect.get("ratio")
    if ratio is None:
        return f"answer length {_effect_diff_text(effect)} \u2014 {effect['verdict']}"
    change = f"{_f((ratio - 1) * 100, 0, True)}%"
    if effect["verdict"] == NOISE:
        return f"answer length within noise ({change})"
    if ratio >= 1.5:
        return f"answers {ratio:.1f}\u00d7 longer"
    return f"answers {abs(ratio - 1) * 100:.0f}% {'longer' if ratio > 1 else 'shorter'}"


# --------------------------------------------------------------------------------------------
# Document model, rendered twice: to HTML and to Markdown
# --------------------------------------------------------------------------------------------

Span = tuple[str, str]  # (kind, text): kind "" plain, "b" bold, "v:<verdict>" verdict chip
Inline = str | list[Span]


@dataclass
class Para:
    content: Inline
    css: str = ""


@dataclass
class Bullets:
    items: list[Inline]


@dataclass
class Notice:
    level: str  # "warn" | "error" | "info"
    content: Inline


@dataclass
class Table:
    header: list[str]
    rows: list[list[Inline]]
    align: str = ""  # one letter per column: "l" or "r"
    caption: str = ""
    compact: bool = False  # as wide as its content rather than the page


@dataclass
class Image:
    name: str
    png: bytes
    alt: str
    caption: str


@dataclass
class Example:
    index: int
    instruction: str
    reference: str | None
    outputs: list[tuple[str, str]]  # (arm label, answer)


@dataclass
class KeyValues:
    pairs: list[tuple[str, str]]
    title: str = ""
    columns: int = 1


Block = Para | Bullets | Notice | Table | Image | Example | KeyValues


@dataclass
class Section:
    title: str
    anchor: str
    blocks: list[Block] = field(default_factory=list)
    css: str = ""


@dataclass
class Document:
    title: str
    meta: str
    sections: list[Section]


# --------------------------------------------------------------------------------------------
# Analysis: arms, labels, colours, effects
# --------------------------------------------------------------------------------------------


@dataclass
class _Analysis:
    results: Mapping[str, Any]
    arms: list[Mapping[str, Any]]  # arms that ran, in input order
    failed: list[Mapping[str, Any]]
    baseline: Mapping[str, Any] | None
    baseline_name: str | None
    treatments: list[Mapping[str, Any]]
    labels: dict[str, str]
    colors: dict[str, str]
    effects: dict[str, dict[str, dict[str, Any]]]
    compare_errors: dict[str, str]


def _labels(arms: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Readable arm labels: ``α=5``; with the seed appended when two arms share an alpha."""
    alphas = [_num(a.get("alpha")) for a in arms]
    labels: dict[str, str] = {}
    for arm, alpha in zip(arms, alphas, strict=False):
        name = _arm_name(arm)
        if alpha is None:
            labels[name] = name
            continue
        label = f"\u03b1={alpha:g}"
        if alphas.count(alpha) > 1:
            label += f" seed {arm.get('seed', '?')}" if arm.get("seed") is not None else f" ({name})"
        labels[name] = label
    if len(set(labels.values())) < len(labels):  # still ambiguous: the names are unique by validation
        return {_arm_name(arm): _arm_name(arm) for arm in arms}
    return labels


def _analyse(results: Mapping[str, Any], *, n_boot: int, seed: int) -> _Analysis:
    raw_arms = results.get("arms")
    if raw_arms is None:
        raw_arms = []
    if isinstance(raw_arms, (str, bytes)) or not isinstance(raw_arms, Sequence):
        raise DataError(f"results.arms must be a list, got {type(raw_arms).__name__}")
    for i, arm in enumerate(raw_arms):
        if not isinstance(arm, Mapping) or not isinstance(arm.get("name"), str) or not arm["name"]:
            raise DataError(f"results.arms[{i}] must be an object with a non-empty string 'name'")
    names = [a["name"] for a in raw_arms]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(f"results.arms: arm names must be unique, repeated: {', '.join(dupes)}")

    arms = [a for a in raw_arms if not a.get("error")]
    failed = [a for a in raw_arms if a.get("error")]
    baseline_name = results.get("baseline")
    if not isinstance(baseline_name, str) or not baseline_name:
        zero = [a for a in raw_arms if _num(a.get("alpha")) == 0.0]
        baseline_name = zero[0]["name"] if zero else None
    baseline = next((a for a in arms if a["name"] == baseline_name), None)
    treatments = [a for a in arms if a is not baseline]

    labels = _labels(raw_arms)
    colors: dict[str, str] = {}
    palette = iter(ARM_COLORS * (1 + len(raw_arms) // len(ARM_COLORS)))
    for arm in raw_arms:
        colors[arm["name"]] = BASELINE_COLOR if arm["name"] == baseline_name else next(palette)

    effects: dict[str, dict[str, dict[str, Any]]] = {}
    compare_errors: dict[str, str] = {}
    if baseline is not None:
        for arm in treatments:
            try:
                effects[arm["name"]] = compute_effects(baseline, arm, n_boot=n_boot, seed=seed)
            except DataError as exc:
                # one malformed arm should not cost the reader the rest of the report
                compare_errors[arm["name"]] = str(exc)
    return _Analysis(
        results, arms, failed, baseline, baseline_name, treatments, labels, colors, effects, compare_errors
    )


# --------------------------------------------------------------------------------------------
# Plots (matplotlib's Agg canvas directly: no pyplot, so no global backend or figure state)
# --------------------------------------------------------------------------------------------


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _style(ax: Axes) -> None:
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(True, color="#e5e7eb", linewidth=0.8)
    ax.set_axisbelow(True)
    ax.tick_params(colors="#374151", labelsize=9)
    for spine in ax.spines.values():
        spine.set_color("#9ca3af")


# value labels sit on a white patch so a reference line running behind them does not strike them through
_LABEL_BOX = {"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none"}


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    # no Software/date metadata, so identical results give byte-identical plots
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white", metadata={"Software": None})
    return buf.getvalue()


def _curve(arm: Mapping[str, Any], key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` of a ``[[step, value], ...]`` curve, skipping malformed/non-finite points."""
    points = _section(arm, "train").get(key) or []
    xs: list[float] = []
    ys: list[float] = []
    for point in points if isinstance(points, Sequence) else []:
        if isinstance(point, Sequence) and not isinstance(point, str) and len(point) >= 2:
            x, y = _num(point[0]), _num(point[1])
            if x is not None and y is not None:
                xs.append(x)
                ys.append(y)
    return np.asarray(xs), np.asarray(ys)


def _ema(values: np.ndarray) -> np.ndarray:
    """Exponential moving average with a span of ~1/20 of the curve, debiased at the start."""
    beta = 1.0 - 1.0 / max(1.0, len(values) / 20.0)
    out = np.empty_like(values)
    acc = 0.0
    for i, v in enumerate(values):
        acc = beta * acc + (1 - beta) * v
        out[i] = acc / (1 - beta ** (i + 1)) if beta > 0 else v
    return out


def _plot_loss(a: _Analysis) -> Figure | None:
    curves = {arm["name"]: (_curve(arm, "loss_curve"), _curve(arm, "heldout_curve")) for arm in a.arms}
    if not any(len(t[0]) or len(h[0]) for t, h in curves.values()):
        return None
    fig = _new_figure(10.0, 3.8)
    left, right = fig.subplots(1, 2)
    for ax, title in (
        (left, "Training loss (with noise; smoothed, raw faint)"),
        (right, "Held-out loss (clean, no noise)"),
    ):
        _style(ax)
        ax.set_title(title, fontsize=10.5, loc="left", color="#111827")
        ax.set_xlabel("step", fontsize=9)
    left.set_ylabel("loss", fontsize=9)
    for name, ((tx, ty), (hx, hy)) in curves.items():
        color, label = a.colors[name], a.labels[name]
        if len(tx):
            smooth = len(ty) > 20
            if smooth:
                left.plot(tx, ty, color=color, alpha=0.18, linewidth=0.8)
            left.plot(tx, _ema(ty) if smooth else ty, color=color, linewidth=1.8, label=label)
        if len(hx):
            right.plot(hx, hy, color=color, linewidth=1.8, marker="o", markersize=3.5, label=label)
    has_train = any(len(t[0]) for t, _ in curves.values())
    has_heldout = any(len(h[0]) for _, h in curves.values())
    for ax, has in ((left, has_train), (right, has_heldout)):
        if has:
            ax.legend(fontsize=8.5, frameon=False)
        else:
            ax.text(0.5, 0.5, "not recorded", transform=ax.transAxes, ha="center", va="center", color="#6b7280")
    return fig


def _plot_lengths(a: _Analysis) -> Figure | None:
    lengths: dict[str, np.ndarray] = {}
    for arm in a.arms:
        values = _per_example(arm, "length_chars")
        if values:
            clean = np.asarray([v for v in values if v is not None], dtype=float)
            if clean.size:
                lengths[arm["name"]] = clean
    if not lengths:
        return None
    everything = np.concatenate(list(lengths.values()))
    # a few very long answers would squeeze every histogram into one bar; fold them into the last bin
    top = float(np.percentile(everything, 99)) if everything.size > 20 else float(everything.max())
    top = max(top, float(everything.min()) + 1.0)
    bins = np.linspace(0.0, top, 31)
    fig = _new_figure(10.0, 3.6)
    ax = fig.subplots()
    _style(ax)
    for name, values in lengths.items():
        color = a.colors[name]
        clipped = np.clip(values, 0.0, top)
        ax.hist(clipped, bins=bins, histtype="stepfilled", color=color, alpha=0.12)
        median = float(np.median(values))
        ax.hist(
            clipped,
            bins=bins,
            histtype="step",
            color=color,
            linewidth=1.6,
            label=f"{a.labels[name]} (median {median:,.0f})",
        )
        ax.axvline(median, color=color, linestyle="--", linewidth=1.1)
    folded = "; longest 1% folded into last bin" if everything.size > 20 else ""
    ax.set_xlabel(f"response length (characters; dashed = median{folded})", fontsize=9)
    ax.set_ylabel("eval examples", fontsize=9)
    ax.set_title("Response length per arm", fontsize=10.5, loc="left", color="#111827")
    ax.legend(fontsize=8.5, frameon=False)
    return fig


def _judge(arm: Mapping[str, Any]) -> Mapping[str, Any]:
    judge = arm.get("judge")
    return judge if isinstance(judge, Mapping) else {}


def _plot_winrates(a: _Analysis) -> Figure | None:
    arms = [
        arm
        for arm in a.treatments
        if _num(_judge(arm).get("win_rate")) is not None or _num(_judge(arm).get("lc_win_rate")) is not None
    ]
    if not arms:
        return None
    fig = _new_figure(10.0, 3.5)
    ax = fig.subplots()
    _style(ax)
    reach = 20.0  # y range symmetric about 50%, so neither side of a tie looks bigger than it is
    ax.axhline(50, color="#111827", linestyle="--", linewidth=1.0)
    ax.text(-0.55, 51, "50% = tie with baseline", ha="left", va="bottom", fontsize=8.5, color="#374151")
    unreliable: list[int] = []
    for i, arm in enumerate(arms):
        judge, color = _judge(arm), a.colors[arm["name"]]
        points = ((-0.13, "win_rate", "ci", "o", color), (0.13, "lc_win_rate", "lc_ci", "s", "white"))
        for offset, key, ci_key, marker, fill in points:
            value = _num(judge.get(key))
            if value is None:
                continue
            ci = judge.get(ci_key)
            yerr = None
            if _is_interval(ci):
                yerr = [[max(0.0, (value - float(ci[0])) * 100)], [max(0.0, (float(ci[1]) - value) * 100)]]
                reach = max(reach, abs(float(ci[0]) * 100 - 50), abs(float(ci[1]) * 100 - 50))
            reach = max(reach, abs(value * 100 - 50))
            ax.errorbar(
                [i + offset],
                [value * 100],
                yerr=yerr,
                fmt=marker,
                color=color,
                markerfacecolor=fill,
                markeredgewidth=1.6,
                markersize=8,
                capsize=5,
                elinewidth=1.6,
            )
            ax.annotate(
                f"{value * 100:.1f}%",
                (i + offset, value * 100),
                xytext=(9, 0),
                textcoords="offset points",
                va="center",
                fontsize=8.5,
                color="#111827",
                bbox=_LABEL_BOX,
            )
        consistency = _num(judge.get("consistency"))
        if consistency is not None and consistency < LOW_CONSISTENCY:
            unreliable.append(i)
    ax.set_xticks(range(len(arms)), [f"{a.labels[arm['name']]} vs baseline" for arm in arms], fontsize=9.5)
    ax.set_xlim(-0.6, len(arms) - 0.4)
    reach = min(50.0, math.ceil((reach + 4) / 10) * 10)
    ax.set_ylim(50 - reach, 50 + reach)
    for i in unreliable:
        ax.text(i, 50 - reach * 0.93, "judge unreliable", ha="center", fontsize=8.5, color="#b91c1c", fontweight="bold")
    ax.set_ylabel("win rate (%)", fontsize=9)
    ax.set_title(
        "Judge win rate vs baseline, 95% CI  (\u25cf raw   \u25a1 length-controlled)",
        fontsize=10.5,
        loc="left",
        color="#111827",
    )
    return fig


def _plot_metrics(a: _Analysis) -> Figure | None:
    metrics = [m for m in _PAIRED if any(m.key in e for e in a.effects.values())]
    if not metrics:
        return None
    fig = _new_figure(10.0, 3.6)
    axes = np.atleast_1d(fig.subplots(1, len(metrics)))
    arms = [arm for arm in a.treatments if arm["name"] in a.effects]
    for ax, metric in zip(axes, metrics, strict=False):
        _style(ax)
        ax.axhline(0, color="#111827", linewidth=1.0)
        shown = []
        for arm in arms:
            effect = a.effects[arm["name"]].get(metric.key)
            if effect is None:
                continue
            x = len(shown)
            shown.append(a.labels[arm["name"]])
            diff = effect["diff"] * metric.scale
            lo, hi = (c * metric.scale for c in effect["ci"])
            color = a.colors[arm["name"]]
            # hollow marker: the CI contains 0, so the difference is indistinguishable from noise
            face = color if effect["significant"] else "white"
            ax.errorbar(
                [x],
                [diff],
                yerr=[[max(0.0, diff - lo)], [max(0.0, hi - diff)]],
                fmt="o",
                color=color,
                markerfacecolor=face,
                markeredgewidth=1.6,
                markersize=8,
                capsize=5,
                elinewidth=1.6,
            )
            digits = 0 if metric.unit == "chars" else 1
            ax.annotate(
                _f(diff, digits, True),
                (x, diff),
                xytext=(9, 0),
                textcoords="offset points",
                va="center",
                fontsize=8.5,
                color="#111827",
                bbox=_LABEL_BOX,
            )
        ax.set_xticks(range(len(shown)), shown, fontsize=9.5)
        ax.set_xlim(-0.6, max(len(shown) - 0.4, 0.6))
        ax.set_title(f"\u0394 {metric.label} ({metric.unit})", fontsize=10.5, loc="left", color="#111827")
    fig.suptitle(
        "Effect vs baseline (arm \u2212 baseline, paired per example), 95% CI; hollow = within noise",
        fontsize=10.5,
        x=0.01,
        ha="left",
        color="#111827",
    )
    return fig


_PLOT_TEXT = {
    "loss": (
        "Training and held-out loss per arm",
        "Training loss is measured on noisy embeddings, so NEFTune arms are expected to sit higher; the "
        "clean held-out loss is the comparable one.",
    ),
    "lengths": (
        "Histogram of response lengths per arm",
        "Response length in characters on the eval set; dashed lines mark each arm's median.",
    ),
    "winrates": (
        "Judge win rate vs baseline with 95% CI",
        "Filled circle: raw win rate; hollow square: length-controlled. Above the dashed 50% line the "
        "arm beats the baseline; an interval crossing it is a tie within noise.",
    ),
    "metrics": (
        "Paired effect of each arm on key metrics with 95% CI",
        "Mean per-example difference from the baseline with a bootstrap 95% CI; a hollow marker means "
        "the interval contains 0.",
    ),
}


# --------------------------------------------------------------------------------------------
# Report content
# --------------------------------------------------------------------------------------------


def _v(verdict: str) -> Span:
    return ("v:" + verdict, verdict)


def _n_eval(a: _Analysis) -> int | None:
    n = _num(_section(a.results, "data").get("n_eval"))
    if n is not None:
        return int(n)
    sizes = [e["n"] for effects in a.effects.values() for e in effects.values()]
    return max(sizes) if sizes else None


def _quality_facts(a: _Analysis, arm: Mapping[str, Any]) -> list[tuple[str, str, str, bool]]:
    """(measure, verdict, size of the change, counts toward the overall verdict) per quality measure.

    The length-controlled win rate of an unreliable judge is reported but does not count.
    """
    facts = []
    for key in ("exact_match", "rouge_l"):
        effect = a.effects.get(arm["name"], {}).get(key)
        if effect:
            size = f"{_f(effect['diff'] * effect['scale'], 1, True)} {effect['unit']}"
            facts.append((effect["label"], effect["verdict"], size, True))
    judge = _judge(arm)
    verdict = _judge_verdict(judge.get("lc_ci"))
    if verdict is not None:
        consistency = _num(judge.get("consistency"))
        reliable = consistency is None or consistency >= LOW_CONSISTENCY
        facts.append(("length-controlled win rate", verdict, _pct(judge.get("lc_win_rate")), reliable))
    return facts


def _arm_headline(a: _Analysis, arm: Mapping[str, Any]) -> list[Span]:
    name = arm["name"]
    spans: list[Span] = [("b", f"{a.labels[name]}: ")]
    if name in a.compare_errors:
        return [*spans, ("", "could not be compared with the baseline: " + a.compare_errors[name])]
    effects = a.effects.get(name, {})
    parts: list[list[Span]] = []
    for key in ("exact_match", "rouge_l"):
        effect = effects.get(key)
        if effect:
            parts.append([("", f"{effect['label']} {_effect_diff_text(effect)} \u2014 "), _v(effect["verdict"])])
    judge = _judge(arm)
    lc = _num(judge.get("lc_win_rate"))
    if lc is not None:
        ci = judge.get("lc_ci")
        text = f"length-controlled win rate {_pct(lc)}"
        if _is_interval(ci):
            text += f" {_ci_text(ci, 100, 1, '%', False)}"
        part: list[Span] = [("", text)]
        verdict = _judge_verdict(ci)
        if verdict:
            part += [("", " \u2014 "), _v(verdict)]
        consistency = _num(judge.get("consistency"))
        if consistency is not None and consistency < LOW_CONSISTENCY:
            part.append(("b", " (judge unreliable)"))
        parts.append(part)
    length = effects.get("length_chars")
    if length:
        parts.append([("", _length_phrase(length))])
    if not parts:
        ev, base_ev = _section(arm, "eval"), _section(a.baseline, "eval")
        loss, base_loss = _num(ev.get("heldout_loss")), _num(base_ev.get("heldout_loss"))
        if loss is not None and base_loss is not None:
            parts.append([("", f"held-out loss {loss:.3f} vs {base_loss:.3f} (a single aggregate: no CI, no verdict)")])
        else:
            parts.append([("", "no per-example metric or judge result to compare")])
    for i, part in enumerate(parts):
        spans += ([("", "; ")] if i else []) + part
    return spans


def _summary(a: _Analysis) -> list[Span]:
    """A plain answer to "did the noise help?", naming every difference whose CI excludes 0."""
    if a.baseline is None:
        if a.baseline_name and any(f["name"] == a.baseline_name for f in a.failed):
            return [("", f"The baseline arm {a.baseline_name!r} failed, so nothing can be compared with it.")]
        if a.baseline_name:
            return [("", f"The baseline arm {a.baseline_name!r} is not among the arms, so nothing can be compared.")]
        return [
            (
                "",
                "No baseline was identified (no \u201cbaseline\u201d field and no arm with \u03b1=0), so no "
                "arm can be compared with one.",
            )
        ]
    if not a.treatments:
        return [("", "Only the baseline ran, so there is nothing to compare it with.")]
    better: list[str] = []
    worse: list[str] = []
    n_facts = n_significant = 0
    for arm in a.treatments:
        label = a.labels[arm["name"]]
        facts = [(m, v, size) for m, v, size, counts in _quality_facts(a, arm) if counts]
        n_facts += len(facts)
        n_significant += sum(1 for _, v, _ in facts if v in (BETTER, WORSE))
        good = [f"{m} ({size})" for m, v, size in facts if v == BETTER]
        bad = [f"{m} ({size})" for m, v, size in facts if v == WORSE]
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
    n = _n_eval(a)
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
        f"{a.labels[arm['name']]} {_length_phrase(e)}"
        for arm in a.treatments
        if (e := a.effects.get(arm["name"], {}).get("length_chars")) and e["significant"]
    ]
    if changed:
        text += f" Answer length changed: {'; '.join(changed)}."
    return [("", text)]


def _headline_section(a: _Analysis) -> Section:
    sec = Section("Verdict", "verdict", css="headline")
    sec.blocks.append(Para(_summary(a), css="summary"))
    if a.baseline is not None and a.treatments:
        sec.blocks.append(Bullets([_arm_headline(a, arm) for arm in a.treatments]))
    for arm in a.failed:
        sec.blocks.append(
            Notice(
                "error",
                [
                    ("b", f"{a.labels[arm['name']]} failed: "),
                    ("", f"{arm['error']} \u2014 left out of every comparison."),
                ],
            )
        )
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


def _length_section(a: _Analysis) -> Section:
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
        judge = _judge(arm)
        parts: list[Span] = [("b", f"{a.labels[name]}: ")]
        if length:
            means = f"mean {length['arm']:,.0f} vs {length['baseline']:,.0f} chars"
            parts.append(("", f"{_length_phrase(length)} ({means}). "))
        raw, lc = _num(judge.get("win_rate")), _num(judge.get("lc_win_rate"))
        if raw is not None and lc is not None:
            raw_v, lc_v = _judge_verdict(judge.get("ci")), _judge_verdict(judge.get("lc_ci"))
            parts.append(("", f"Raw win rate {_pct(raw)} vs length-controlled {_pct(lc)}"))
            if raw_v == BETTER and lc_v == NOISE:
                parts.append(("", ": the raw advantage does not survive length control, so it came from length."))
            elif raw_v == BETTER and lc_v == BETTER:
                parts.append(("", ": the advantage survives length control."))
            elif lc_v == WORSE:
                parts.append(("", ": at equal length the baseline's answers are preferred."))
            else:
                parts.append(("", "."))
        elif not length:
            continue
        items.append(parts)
    if items:
        sec.blocks.append(Bullets(items))
    return sec


def _unreliable(judge: Mapping[str, Any]) -> bool:
    consistency = _num(judge.get("consistency"))
    return consistency is not None and consistency < LOW_CONSISTENCY


def _effects_section(a: _Analysis) -> Section:
    sec = Section("Metrics", "metrics")
    rows: list[list[Inline]] = []
    for arm in a.treatments if a.baseline is not None else []:
        name = arm["name"]
        if name in a.compare_errors:
            dash = "\u2014"
            rows.append([a.labels[name], dash, dash, dash, "could not pair: " + a.compare_errors[name], dash])
            continue
        for metric in _PAIRED:
            e = a.effects.get(name, {}).get(metric.key)
            if not e:
                continue
            value = _effect_value(e, "arm")
            if metric.key == "length_chars" and e.get("ratio"):
                value += f" ({e['ratio']:.2f}\u00d7)"
            rows.append(
                [
                    a.labels[name],
                    e["label"],
                    _effect_value(e, "baseline"),
                    value,
                    _effect_diff_text(e),
                    [_v(e["verdict"])],
                ]
            )
        judge = _judge(arm)
        for key, ci_key, label in (("win_rate", "ci", "judge win rate"), ("lc_win_rate", "lc_ci", "judge LC win rate")):
            value = _num(judge.get(key))
            if value is None:
                continue
            ci = judge.get(ci_key)
            diff = _f((value - 0.5) * 100, 1, True) + " points"
            if _is_interval(ci):
                diff += " " + _ci_text([float(c) - 0.5 for c in ci], 100)
            verdict = _judge_verdict(ci)
            cell: Inline = [_v(verdict)] if verdict else "no CI"
            if _unreliable(judge):
                cell = [*([_v(verdict)] if verdict else []), ("b", " unreliable judge")]
            rows.append([a.labels[name], label, "50.0% (tie)", _pct(value), diff, cell])
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


def _per_arm_section(a: _Analysis) -> Section | None:
    rows_spec: list[tuple[str, Any]] = [
        ("held-out loss", lambda ev, tr: _fmt(ev.get("heldout_loss"), 3)),
        ("perplexity", lambda ev, tr: _fmt(ev.get("perplexity"), 2)),
        ("exact match", lambda ev, tr: _pct(ev.get("exact_match"))),
        ("ROUGE-L", lambda ev, tr: _fmt(ev.get("rouge_l"), 1, 100.0)),
        ("distinct-1", lambda ev, tr: _fmt(ev.get("distinct_1"), 3)),
        ("distinct-2", lambda ev, tr: _fmt(ev.get("distinct_2"), 3)),
        ("repetition rate", lambda ev, tr: _fmt(ev.get("repetition_rate"), 3)),
    ]
    for unit in ("chars", "tokens"):
        for stat in ("mean", "median", "p90"):
            rows_spec.append(
                (f"length ({unit}) {stat}", lambda ev, tr, u=unit, s=stat: _fmt(_section(ev, f"length_{u}").get(s), 0))
            )
    rows_spec += [
        ("train time", lambda ev, tr: _duration(tr.get("train_time_s"))),
        ("tokens / s", lambda ev, tr: _fmt(tr.get("tokens_per_s"), 0)),
    ]
    if not a.arms:
        return None
    sec = Section("Per-arm metrics", "per-arm")
    header = ["Metric"] + [a.labels[arm["name"]] + (" (baseline)" if arm is a.baseline else "") for arm in a.arms]
    rows: list[list[Inline]] = []
    for label, get in rows_spec:
        cells = [get(_section(arm, "eval"), _section(arm, "train")) for arm in a.arms]
        if any(c != "\u2014" for c in cells):
            rows.append([label, *cells])
    if rows:
        caption = "Aggregates over the eval set (no intervals; see Metrics for paired effects)"
        sec.blocks.append(Table(header, rows, "l" + "r" * len(a.arms), caption, compact=True))
    families = sorted({f for arm in a.arms for f in _section(_section(arm, "eval"), "exact_match_by_family")})
    if families:
        rows = [
            [fam, *[_pct(_section(_section(arm, "eval"), "exact_match_by_family").get(fam)) for arm in a.arms]]
            for fam in families
        ]
        caption = "Exact match by task family"
        sec.blocks.append(Table(["Task family", *header[1:]], rows, "l" + "r" * len(a.arms), caption, compact=True))
    return sec if sec.blocks else None


def _judge_section(a: _Analysis) -> Section:
    sec = Section("Judge", "judge")
    judged = [arm for arm in a.treatments if _judge(arm)]
    if not judged:
        sec.blocks.append(
            Para(
                "No LLM judge was run, so there are no win rates; the verdict rests on the "
                "reference-based metrics above."
            )
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
        j = _judge(arm)
        ci, lc_ci = j.get("ci"), j.get("lc_ci")
        consistency = _num(j.get("consistency"))
        rows.append(
            [
                a.labels[arm["name"]],
                a.labels.get(str(j.get("vs")), str(j.get("vs", "\u2014"))),
                _pct(j.get("win_rate")) + (f" {_ci_text(ci, 100, 1, '%', False)}" if _is_interval(ci) else ""),
                _pct(j.get("lc_win_rate")) + (f" {_ci_text(lc_ci, 100, 1, '%', False)}" if _is_interval(lc_ci) else ""),
                _fmt(consistency, 2),
                _fmt(j.get("n"), 0),
                _fmt(j.get("n_failed"), 0),
                _fmt(j.get("n_ties"), 0),
                str(j.get("backend", "\u2014")),
            ]
        )
    sec.blocks.append(
        Table(
            [
                "Arm",
                "vs",
                "Win rate [95% CI]",
                "LC win rate [95% CI]",
                "Consistency",
                "n",
                "Failed",
                "Ties/splits",
                "Backend",
            ],
            rows,
            "llrrrrrrl",
        )
    )
    for arm in judged:
        j = _judge(arm)
        consistency = _num(j.get("consistency"))
        label = a.labels[arm["name"]]
        if consistency is None:
            sec.blocks.append(
                Notice(
                    "info", f"{label}: position consistency was not measured, so the judge's reliability is unknown."
                )
            )
        elif consistency < LOW_CONSISTENCY:
            sec.blocks.append(
                Notice(
                    "warn",
                    [
                        ("b", f"{label}: the judge is unreliable. "),
                        (
                            "",
                            f"Its position consistency is {consistency:.2f} (below "
                            f"{LOW_CONSISTENCY:.2f}): it often changed its verdict when the "
                            "answers swapped places, so treat these win rates as noise.",
                        ),
                    ],
                )
            )
    failures = []
    for arm in judged:
        n, n_failed = _num(_judge(arm).get("n")), _num(_judge(arm).get("n_failed"))
        if n_failed:
            of = f" of {n + n_failed:.0f}" if n is not None else ""
            failures.append(f"{a.labels[arm['name']]} {n_failed:.0f}{of}")
    if failures:
        sec.blocks.append(Notice("info", f"Failed judgments, excluded from the win rates: {'; '.join(failures)}."))
    return sec


def _examples_section(a: _Analysis) -> Section | None:
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
        outputs = ex.get("outputs") if isinstance(ex.get("outputs"), Mapping) else {}
        names = [n for n in order if n in outputs] + [n for n in outputs if n not in order]
        reference = ex.get("reference")
        sec.blocks.append(
            Example(
                i,
                str(ex.get("instruction", "")),
                None if reference is None else str(reference),
                [
                    (a.labels.get(str(n), str(n)) + (" (baseline)" if n == a.baseline_name else ""), str(outputs[n]))
                    for n in names
                ],
            )
        )
    return sec


def _flatten(obj: Any, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(obj, Mapping):
        out: list[tuple[str, str]] = []
        for k, v in obj.items():
            out += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(obj, (list, tuple)):
        return [(prefix, ", ".join(str(v) for v in obj))]
    return [(prefix, str(obj))]


def _footer_section(a: _Analysis) -> Section:
    r = a.results
    sec = Section("Run details", "details", css="details")
    model = _section(r, "model")
    pairs: list[tuple[str, str]] = []
    if model:
        desc = str(model.get("spec", "\u2014"))
        extra = []
        if model.get("n_params") is not None:
            extra.append(f"{_count(model.get('n_params'))} parameters")
        if model.get("trainable_params") is not None:
            extra.append(f"{_count(model.get('trainable_params'))} trainable")
        if model.get("dtype"):
            extra.append(str(model["dtype"]))
        pairs.append(("Model", desc + (f" ({', '.join(extra)})" if extra else "")))
        other = {k: v for k, v in model.items() if k not in ("spec", "n_params", "trainable_params", "dtype")}
        pairs += [(f"model.{k}", v) for k, v in _flatten(other)]
    data = _section(r, "data")
    if data:
        for key, label in (("train", "Train data"), ("eval", "Eval data")):
            if data.get(key) is not None:
                n = data.get(f"n_{key}")
                pairs.append((label, f"{data[key]}" + (f" ({_fmt(n, 0)} examples)" if _num(n) is not None else "")))
    if r.get("seeds") is not None:
        seeds = r["seeds"]
        pairs.append(("Seeds", ", ".join(str(s) for s in seeds) if isinstance(seeds, (list, tuple)) else str(seeds)))
    if _num(r.get("wall_time_s")) is not None:
        pairs.append(("Wall time", _duration(r.get("wall_time_s"))))
    if r.get("created"):
        pairs.append(("Created", str(r["created"])))
    versions = _section(r, "versions")
    if versions:
        pairs.append(("Versions", ", ".join(f"{k} {v}" for k, v in versions.items())))
    if pairs:
        sec.blocks.append(KeyValues(pairs))
    settings = _section(r, "settings")
    if settings:
        sec.blocks.append(KeyValues(_flatten(settings), "Training settings", columns=3))
    if not sec.blocks:
        sec.blocks.append(Para("No run details were recorded."))
    return sec


def _build_document(a: _Analysis, plots: dict[str, bytes]) -> Document:
    r = a.results
    title = str(r.get("title") or "NEFTune experiment")
    meta_parts = []
    if r.get("created"):
        meta_parts.append(str(r["created"]))
    spec = _section(r, "model").get("spec")
    if spec:
        meta_parts.append(f"model {spec}")
    n = _n_eval(a)
    if n:
        meta_parts.append(f"{n} eval examples")
    if a.arms or a.failed:
        meta_parts.append("arms: " + ", ".join(a.labels[x["name"]] for x in [*a.arms, *a.failed]))
    sections = [_headline_section(a)]
    if a.treatments and a.baseline is not None:
        sections.append(_length_section(a))
    sections.append(_effects_section(a))
    if plots:
        plot_sec = Section("Plots", "plots")
        for name in PLOT_NAMES:
            if name in plots:
                alt, caption = _PLOT_TEXT[name]
                plot_sec.blocks.append(Image(name, plots[name], alt, caption))
        sections.append(plot_sec)
    if a.treatments:
        sections.append(_judge_section(a))
    per_arm = _per_arm_section(a)
    if per_arm:
        sections.append(per_arm)
    examples = _examples_section(a)
    if examples:
        sections.append(examples)
    sections.append(_footer_section(a))
    return Document(title, " \u00b7 ".join(meta_parts), sections)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------

_CSS = """
:root{--fg:#1f2937;--muted:#6b7280;--line:#e5e7eb;--bg:#f4f6f9;--card:#fff;--accent:#2563eb}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);
 font:15px/1.55 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue","Noto Sans","Liberation Sans",Arial,
 sans-serif}
main{max-width:1120px;margin:0 auto;padding:28px 28px 40px}
header h1{font-size:26px;line-height:1.25;margin:0 0 4px;letter-spacing:-.01em}
header .meta{color:var(--muted);font-size:13.5px}
nav{margin:10px 0 0;font-size:13.5px}
nav a{color:var(--accent);text-decoration:none;margin-right:14px}
section{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:18px 22px;margin:16px 0}
h2{font-size:17px;margin:0 0 10px}
h3{font-size:14px;margin:14px 0 6px;color:#374151}
p{margin:0 0 10px}
ul{margin:0 0 10px;padding-left:22px}
li{margin:3px 0}
section.headline{border-left:5px solid var(--accent)}
p.summary{font-size:16.5px;font-weight:600;line-height:1.45;color:#111827}
p.note{color:var(--muted);font-size:13px;margin:8px 0 0}
.v{display:inline-block;padding:0 8px;border-radius:999px;font-size:12.5px;font-weight:600;line-height:1.6;
 white-space:nowrap}
.v-better{background:#dcfce7;color:#166534}
.v-worse{background:#fee2e2;color:#991b1b}
.v-noise{background:#eef2f6;color:#475569}
.v-longer,.v-shorter{background:#fef3c7;color:#92400e}
.notice{border-radius:8px;padding:9px 12px;margin:10px 0;font-size:14px;border:1px solid}
.notice.warn{background:#fffbeb;border-color:#fcd34d;color:#78350f}
.notice.error{background:#fef2f2;border-color:#fca5a5;color:#7f1d1d}
.notice.info{background:#f0f9ff;border-color:#bae6fd;color:#0c4a6e}
.tablewrap{overflow-x:auto;margin:4px 0 14px}
table{border-collapse:collapse;width:100%;font-size:13.5px;font-variant-numeric:tabular-nums}
table.compact{width:auto;min-width:60%}
caption{text-align:left;font-weight:600;font-size:13.5px;color:#374151;padding:0 0 6px}
th,td{padding:5px 10px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
th{background:#f8fafc;font-weight:600;color:#374151;white-space:nowrap}
td.r,th.r{text-align:right}
td.r{white-space:nowrap}
tbody tr:hover{background:#fafbfc}
figure{margin:0 0 18px}
figure img{display:block;width:100%;height:auto;border:1px solid var(--line);border-radius:6px}
figcaption{color:var(--muted);font-size:13px;margin-top:5px}
.example{border-top:1px solid var(--line);padding-top:12px;margin-top:14px}
.example .label{font-size:12px;font-weight:700;text-transform:uppercase;letter-spacing:.04em;color:var(--muted);
 margin-bottom:3px}
.example .prompt{background:#f8fafc;border:1px solid var(--line);border-radius:6px;padding:8px 10px;margin-bottom:8px}
.example .cols{display:grid;gap:10px}
.example .col .label{color:#374151;text-transform:none;letter-spacing:0;font-size:12.5px}
pre{margin:0;white-space:pre-wrap;overflow-wrap:anywhere;
 font:12.5px/1.5 ui-monospace,SFMono-Regular,Menlo,Consolas,"Liberation Mono",monospace}
.answer{border:1px solid var(--line);border-radius:6px;padding:8px 10px;max-height:300px;overflow:auto;background:#fff}
dl.kv{display:grid;grid-template-columns:max-content minmax(0,1fr);gap:4px 18px;margin:0 0 12px;font-size:13.5px}
dl.kv dt{color:var(--muted)}
dl.kv dd{margin:0;overflow-wrap:anywhere}
footer{color:var(--muted);font-size:12.5px;text-align:center;margin-top:12px}
@media (max-width:760px){.example .cols{grid-template-columns:1fr!important}}
@media print{body{background:#fff}section{break-inside:avoid;border-color:#ccc}}
"""

_VERDICT_CSS = {BETTER: "better", WORSE: "worse", NOISE: "noise", LONGER: "longer", SHORTER: "shorter"}


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _html_inline(content: Inline) -> str:
    if isinstance(content, str):
        return _e(content)
    out = []
    for kind, text in content:
        if kind == "b":
            out.append(f"<strong>{_e(text)}</strong>")
        elif kind.startswith("v:"):
            out.append(f'<span class="v v-{_VERDICT_CSS.get(kind[2:], "noise")}">{_e(text)}</span>')
        else:
            out.append(_e(text))
    return "".join(out)


def _html_block(block: Block) -> str:
    if isinstance(block, Para):
        cls = f' class="{block.css}"' if block.css else ""
        return f"<p{cls}>{_html_inline(block.content)}</p>"
    if isinstance(block, Bullets):
        return "<ul>" + "".join(f"<li>{_html_inline(i)}</li>" for i in block.items) + "</ul>"
    if isinstance(block, Notice):
        return f'<div class="notice {block.level}">{_html_inline(block.content)}</div>'
    if isinstance(block, Table):
        align = block.align.ljust(len(block.header), "l")
        head = "".join(f'<th class="{align[i]}">{_e(h)}</th>' for i, h in enumerate(block.header))
        body = "".join(
            "<tr>" + "".join(f'<td class="{align[i]}">{_html_inline(c)}</td>' for i, c in enumerate(row)) + "</tr>"
            for row in block.rows
        )
        caption = f"<caption>{_e(block.caption)}</caption>" if block.caption else ""
        cls = ' class="compact"' if block.compact else ""
        return (
            f'<div class="tablewrap"><table{cls}>{caption}<thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>"
        )
    if isinstance(block, Image):
        data = base64.b64encode(block.png).decode("ascii")
        return (
            f'<figure><img src="data:image/png;base64,{data}" alt="{_e(block.alt)}" '
            f'data-file="plots/{_e(block.name)}.png"><figcaption>{_e(block.caption)}</figcaption></figure>'
        )
    if isinstance(block, Example):
        ref = ""
        if block.reference is not None:
            ref = f'<div class="label">Reference</div><div class="prompt"><pre>{_e(block.reference)}</pre></div>'
        cols = "".join(
            f'<div class="col"><div class="label">{_e(label)} \u00b7 {len(text):,} chars</div>'
            f'<div class="answer"><pre>{_e(text)}</pre></div></div>'
            for label, text in block.outputs
        )
        n_cols = max(1, min(len(block.outputs), 4))
        return (
            f'<div class="example"><h3>Example {block.index}</h3>'
            f'<div class="label">Instruction</div><div class="prompt"><pre>{_e(block.instruction)}</pre></div>{ref}'
            f'<div class="cols" style="grid-template-columns:repeat({n_cols},minmax(0,1fr))">{cols}</div></div>'
        )
    if isinstance(block, KeyValues):
        title = f"<h3>{_e(block.title)}</h3>" if block.title else ""
        grid = " ".join(["max-content minmax(0,1fr)"] * max(1, block.columns))
        return (
            f'{title}<dl class="kv" style="grid-template-columns:{grid}">'
            + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in block.pairs)
            + "</dl>"
        )
    raise TypeError(f"unknown block {type(block).__name__}")


def _render_html(doc: Document) -> str:
    """Render ``doc`` as one self-contained HTML page (inline CSS, embedded images, no scripts)."""
    nav = "".join(f'<a href="#{s.anchor}">{_e(s.title)}</a>' for s in doc.sections)
    body = "".join(
        f'<section id="{s.anchor}" class="{s.css}"><h2>{_e(s.title)}</h2>'
        + "".join(_html_block(b) for b in s.blocks)
        + "</section>"
        for s in doc.sections
    )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(doc.title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
        f'<header><h1>{_e(doc.title)}</h1><div class="meta">{_e(doc.meta)}</div><nav>{nav}</nav></header>\n'
        f"{body}\n<footer>neftune report</footer>\n</main>\n</body>\n</html>\n"
    )


_MD_SPECIAL = re.compile(r"([\\`*_<>|])")


def _md_escape(text: str) -> str:
    """Escape Markdown syntax in ``text``; brackets stay readable (CIs), only ``](`` links are broken."""
    return _MD_SPECIAL.sub(r"\\\1", str(text)).replace("](", "]\\(").replace("\n", " ")


def _md_inline(content: Inline) -> str:
    if isinstance(content, str):
        return _md_escape(content)
    out = []
    for kind, text in content:
        if kind == "b" or kind.startswith("v:"):
            # emphasis markers must hug the text: "** x**" is not bold, and "**a**** b**" merges
            core = text.strip()
            lead, trail = text[: len(text) - len(text.lstrip())], text[len(text.rstrip()) :]
            out.append(f"{lead}**{_md_escape(core)}**{trail}" if core else text)
        else:
            out.append(_md_escape(text))
    return "".join(out)


def _md_fenced(text: str) -> str:
    """A fenced code block that no backtick run inside ``text`` can close early."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def _md_block(block: Block) -> str:
    if isinstance(block, Para):
        return _md_inline(block.content)
    if isinstance(block, Bullets):
        return "\n".join(f"- {_md_inline(i)}" for i in block.items)
    if isinstance(block, Notice):
        prefix = {"warn": "**Warning:** ", "error": "**Error:** "}.get(block.level, "")
        return f"> {prefix}{_md_inline(block.content)}"
    if isinstance(block, Table):
        align = block.align.ljust(len(block.header), "l")
        lines = [f"**{_md_escape(block.caption)}**\n"] if block.caption else []
        lines.append("| " + " | ".join(_md_escape(h) for h in block.header) + " |")
        lines.append("|" + "|".join("---:" if a == "r" else ":---" for a in align) + "|")
        lines += ["| " + " | ".join(_md_inline(c) for c in row) + " |" for row in block.rows]
        return "\n".join(lines)
    if isinstance(block, Image):
        return f"![{_md_escape(block.alt)}](plots/{block.name}.png)\n\n*{_md_escape(block.caption)}*"
    if isinstance(block, Example):
        parts = [f"### Example {block.index}", "**Instruction**", _md_fenced(block.instruction)]
        if block.reference is not None:
            parts += ["**Reference**", _md_fenced(block.reference)]
        for label, text in block.outputs:
            parts += [f"**{_md_escape(label)}** ({len(text):,} chars)", _md_fenced(text)]
        return "\n\n".join(parts)
    if isinstance(block, KeyValues):
        title = f"**{_md_escape(block.title)}**\n\n" if block.title else ""
        return title + "\n".join(f"- **{_md_escape(k)}:** {_md_escape(v)}" for k, v in block.pairs)
    raise TypeError(f"unknown block {type(block).__name__}")


def _render_markdown(doc: Document) -> str:
    """Render ``doc`` as Markdown with images linked from ``plots/``."""
    parts = [f"# {_md_escape(doc.title)}", _md_escape(doc.meta)]
    for s in doc.sections:
        parts.append(f"## {_md_escape(s.title)}")
        parts += [_md_block(b) for b in s.blocks]
    return "\n\n".join(p for p in parts if p) + "\n"


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _jsonable(obj: Any) -> Any:
    """``obj`` as strict JSON values: NaN/inf become null, numpy scalars and paths plain values."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return str(obj)


def write_report(
    results: Mapping[str, Any], out_dir: Path | str, *, n_boot: int = 2000, seed: int = 0
) -> dict[str, Path]:
    """Write the experiment report for ``results`` (schema in the module docstring) into ``out_dir``.

    Writes ``results.json`` (the input as strict, pretty JSON: non-finite numbers become ``null``),
    ``report.md``, a self-contained ``report.html`` and the plots ``plots/{loss,lengths,winrates,
    metrics}.png``; a plot whose data is absent (e.g. ``winrates`` without a judge) is not written,
    and a stale copy from an earlier report in the same directory is removed so that the folder
    always matches its report.  Every file is written atomically.

    Returns the written paths keyed ``"results"``, ``"markdown"``, ``"html"`` and each plot name.
    ``n_boot`` and ``seed`` set the bootstrap of :func:`compute_effects`.  Raises
    :class:`DataError` when ``results`` is not an object or its ``arms`` are malformed.
    """
    if not isinstance(results, Mapping):
        raise DataError(f"results must be a JSON object, got {type(results).__name__}")
    out_dir = Path(out_dir)
    plots_dir = out_dir / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)

    analysis = _analyse(results, n_boot=n_boot, seed=seed)
    paths: dict[str, Path] = {}
    pngs: dict[str, bytes] = {}
    for name, make in (
        ("loss", _plot_loss),
        ("lengths", _plot_lengths),
        ("winrates", _plot_winrates),
        ("metrics", _plot_metrics),
    ):
        path = plots_dir / f"{name}.png"
        fig = make(analysis)
        if fig is None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        pngs[name] = _png(fig)
        atomic_write_bytes(path, pngs[name])
        paths[name] = path

    doc = _build_document(analysis, pngs)
    json_text = json.dumps(_jsonable(results), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    for key, filename, text in (
        ("results", "results.json", json_text),
        ("markdown", "report.md", _render_markdown(doc)),
        ("html", "report.html", _render_html(doc)),
    ):
        path = out_dir / filename
        atomic_write_text(path, text)
        paths[key] = path
    return {k: paths[k] for k in ("results", "markdown", "html", *PLOT_NAMES) if k in paths}
