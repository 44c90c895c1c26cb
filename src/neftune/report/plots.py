"""The report's plots as PNG bytes: loss curves, response lengths, judge win rates, paired effects.

matplotlib's Agg canvas is used directly (no pyplot), so there is no global backend or figure
state and plotting is safe in any process.  Each ``plot_*`` function returns ``None`` when its
data is absent, and :func:`render_plots` returns the PNGs of those that have data.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from neftune.report.analysis import PAIRED_METRICS, Analysis, judge_of, judge_unreliable, per_example_values
from neftune.report.format import fmt_number
from neftune.report.values import as_float, is_interval, mapping_at

__all__ = ["PLOT_NAMES", "PLOT_TEXT", "arm_colors", "render_plots"]

#: Plot files written under ``out_dir/plots/`` (each only when its data is present).
PLOT_NAMES = ("loss", "lengths", "winrates", "metrics")

#: (alt text, caption) of each plot.
PLOT_TEXT = {
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

BASELINE_COLOR = "#6b7280"
ARM_COLORS = ("#2563eb", "#ea580c", "#16a34a", "#9333ea", "#dc2626", "#0891b2", "#ca8a04")
DPI = 110
TITLE_STYLE: dict[str, Any] = {"fontsize": 10.5, "loc": "left", "color": "#111827"}

# value labels sit on a white patch so a reference line running behind them does not strike them through
_LABEL_BOX = {"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none"}

Colors = Mapping[str, str]


def arm_colors(a: Analysis) -> dict[str, str]:
    """A colour per arm name: grey for the baseline, the palette in input order for the others."""
    palette = iter(ARM_COLORS * (1 + len(a.labels) // len(ARM_COLORS)))
    return {name: BASELINE_COLOR if name == a.baseline_name else next(palette) for name in a.labels}


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


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    # no Software/date metadata, so identical results give byte-identical plots
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white", metadata={"Software": None})
    return buf.getvalue()


def _point(ax: Axes, x: float, y: float, yerr: Any, marker: str, color: str, fill: str, label: str) -> None:
    """One estimate with its error bar and a value label to its right."""
    ax.errorbar(
        [x],
        [y],
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
        label,
        (x, y),
        xytext=(9, 0),
        textcoords="offset points",
        va="center",
        fontsize=8.5,
        color="#111827",
        bbox=_LABEL_BOX,
    )


def _curve(arm: Mapping[str, Any], key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` of a ``[[step, value], ...]`` curve, skipping malformed/non-finite points."""
    points = mapping_at(arm, "train").get(key) or []
    xs: list[float] = []
    ys: list[float] = []
    for point in points if isinstance(points, Sequence) else []:
        if isinstance(point, Sequence) and not isinstance(point, str) and len(point) >= 2:
            x, y = as_float(point[0]), as_float(point[1])
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


def plot_loss(a: Analysis, colors: Colors) -> Figure | None:
    """Training loss (smoothed) and held-out loss per arm, side by side."""
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
        ax.set_title(title, **TITLE_STYLE)
        ax.set_xlabel("step", fontsize=9)
    left.set_ylabel("loss", fontsize=9)
    for name, ((tx, ty), (hx, hy)) in curves.items():
        color, label = colors[name], a.labels[name]
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


def plot_lengths(a: Analysis, colors: Colors) -> Figure | None:
    """Histogram of response lengths per arm, with each arm's median."""
    lengths: dict[str, np.ndarray] = {}
    for arm in a.arms:
        values = per_example_values(arm, "length_chars")
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
    bins = np.linspace(0.0, top, 31).tolist()
    fig = _new_figure(10.0, 3.6)
    ax = fig.subplots()
    _style(ax)
    for name, arm_lengths in lengths.items():
        color = colors[name]
        clipped = np.clip(arm_lengths, 0.0, top)
        ax.hist(clipped, bins=bins, histtype="stepfilled", color=color, alpha=0.12)
        median = float(np.median(arm_lengths))
        label = f"{a.labels[name]} (median {median:,.0f})"
        ax.hist(clipped, bins=bins, histtype="step", color=color, linewidth=1.6, label=label)
        ax.axvline(median, color=color, linestyle="--", linewidth=1.1)
    folded = "; longest 1% folded into last bin" if everything.size > 20 else ""
    ax.set_xlabel(f"response length (characters; dashed = median{folded})", fontsize=9)
    ax.set_ylabel("eval examples", fontsize=9)
    ax.set_title("Response length per arm", **TITLE_STYLE)
    ax.legend(fontsize=8.5, frameon=False)
    return fig


def plot_winrates(a: Analysis, colors: Colors) -> Figure | None:
    """Raw and length-controlled judge win rate of each treatment, with CIs, around the 50% tie."""
    arms = [
        arm
        for arm in a.treatments
        if as_float(judge_of(arm).get("win_rate")) is not None or as_float(judge_of(arm).get("lc_win_rate")) is not None
    ]
    if not arms:
        return None
    fig = _new_figure(10.0, 3.5)
    ax = fig.subplots()
    _style(ax)
    reach = 20.0  # y range symmetric about 50%, so neither side of a tie looks bigger than it is
    ax.axhline(50, color="#111827", linestyle="--", linewidth=1.0)
    ax.text(-0.55, 51, "50% = tie with baseline", ha="left", va="bottom", fontsize=8.5, color="#374151")
    for i, arm in enumerate(arms):
        judge, color = judge_of(arm), colors[arm["name"]]
        points = ((-0.13, "win_rate", "ci", "o", color), (0.13, "lc_win_rate", "lc_ci", "s", "white"))
        for offset, key, ci_key, marker, fill in points:
            value = as_float(judge.get(key))
            if value is None:
                continue
            ci = judge.get(ci_key)
            yerr = None
            if is_interval(ci):
                yerr = [[max(0.0, (value - float(ci[0])) * 100)], [max(0.0, (float(ci[1]) - value) * 100)]]
                reach = max(reach, abs(float(ci[0]) * 100 - 50), abs(float(ci[1]) * 100 - 50))
            reach = max(reach, abs(value * 100 - 50))
            _point(ax, i + offset, value * 100, yerr, marker, color, fill, f"{value * 100:.1f}%")
    ax.set_xticks(range(len(arms)), [f"{a.labels[arm['name']]} vs baseline" for arm in arms], fontsize=9.5)
    ax.set_xlim(-0.6, len(arms) - 0.4)
    reach = min(50.0, math.ceil((reach + 4) / 10) * 10)
    ax.set_ylim(50 - reach, 50 + reach)
    for i, arm in enumerate(arms):
        if judge_unreliable(judge_of(arm)):
            y = 50 - reach * 0.93
            ax.text(i, y, "judge unreliable", ha="center", fontsize=8.5, color="#b91c1c", fontweight="bold")
    ax.set_ylabel("win rate (%)", fontsize=9)
    ax.set_title("Judge win rate vs baseline, 95% CI  (\u25cf raw   \u25a1 length-controlled)", **TITLE_STYLE)
    return fig


def plot_metrics(a: Analysis, colors: Colors) -> Figure | None:
    """Paired effect of each treatment per metric, with CIs; hollow markers are within noise."""
    metrics = [m for m in PAIRED_METRICS if any(m.key in e for e in a.effects.values())]
    if not metrics:
        return None
    fig = _new_figure(10.0, 3.6)
    axes = np.atleast_1d(fig.subplots(1, len(metrics)))
    arms = [arm for arm in a.treatments if arm["name"] in a.effects]
    for ax, metric in zip(axes, metrics, strict=False):
        _style(ax)
        ax.axhline(0, color="#111827", linewidth=1.0)
        shown: list[str] = []
        for arm in arms:
            effect = a.effects[arm["name"]].get(metric.key)
            if effect is None:
                continue
            x = len(shown)
            shown.append(a.labels[arm["name"]])
            diff = effect["diff"] * metric.scale
            lo, hi = (c * metric.scale for c in effect["ci"])
            color = colors[arm["name"]]
            # hollow marker: the CI contains 0, so the difference is indistinguishable from noise
            face = color if effect["significant"] else "white"
            yerr = [[max(0.0, diff - lo)], [max(0.0, hi - diff)]]
            digits = 0 if metric.unit == "chars" else 1
            _point(ax, x, diff, yerr, "o", color, face, fmt_number(diff, digits, True))
        ax.set_xticks(range(len(shown)), shown, fontsize=9.5)
        ax.set_xlim(-0.6, max(len(shown) - 0.4, 0.6))
        ax.set_title(f"\u0394 {metric.label} ({metric.unit})", **TITLE_STYLE)
    fig.suptitle(
        "Effect vs baseline (arm \u2212 baseline, paired per example), 95% CI; hollow = within noise",
        fontsize=10.5,
        x=0.01,
        ha="left",
        color="#111827",
    )
    return fig


_PLOTTERS: dict[str, Callable[[Analysis, Colors], Figure | None]] = {
    "loss": plot_loss,
    "lengths": plot_lengths,
    "winrates": plot_winrates,
    "metrics": plot_metrics,
}


def render_plots(a: Analysis) -> dict[str, bytes]:
    """PNG bytes of every plot in :data:`PLOT_NAMES` whose data is present, in that order."""
    colors = arm_colors(a)
    pngs: dict[str, bytes] = {}
    for name in PLOT_NAMES:
        fig = _PLOTTERS[name](a, colors)
        if fig is not None:
            pngs[name] = _png(fig)
    return pngs
