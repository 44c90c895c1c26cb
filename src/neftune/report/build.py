"""Analysis -> :class:`Document`: the report's sections in reading order."""

from __future__ import annotations

from neftune.report.analysis import Analysis
from neftune.report.details import examples_section, judge_section, per_arm_section, run_details_section
from neftune.report.document import Document, Image, Section
from neftune.report.plots import PLOT_NAMES, PLOT_TEXT
from neftune.report.sections import effects_section, headline_section, length_section
from neftune.report.values import mapping_at

__all__ = ["build_document"]


def _meta(a: Analysis) -> str:
    """The line under the title: date, model, eval size and arms."""
    r = a.results
    parts = []
    if r.get("created"):
        parts.append(str(r["created"]))
    spec = mapping_at(r, "model").get("spec")
    if spec:
        parts.append(f"model {spec}")
    n = a.n_eval()
    data = mapping_at(r, "data")
    if n:
        parts.append(f"{n} eval prompts" + (f" ({data['eval']})" if data.get("eval") else ""))
    held, n_held = data.get("heldout"), data.get("n_heldout")
    if held and n_held and held != data.get("eval"):
        parts.append(f"held-out loss on {n_held} examples ({held})")
    if a.arms or a.failed:
        parts.append("arms: " + ", ".join(a.labels[x["name"]] for x in [*a.arms, *a.failed]))
    return " \u00b7 ".join(parts)


def _plots_section(plots: dict[str, bytes]) -> Section:
    sec = Section("Plots", "plots")
    for name in PLOT_NAMES:
        if name in plots:
            alt, caption = PLOT_TEXT[name]
            sec.blocks.append(Image(name, plots[name], alt, caption))
    return sec


def build_document(a: Analysis, plots: dict[str, bytes]) -> Document:
    """The report of ``a``, with the PNGs in ``plots`` (name -> bytes, see :data:`PLOT_NAMES`)."""
    sections = [headline_section(a)]
    if a.treatments and a.baseline is not None:
        sections.append(length_section(a))
    sections.append(effects_section(a))
    if plots:
        sections.append(_plots_section(plots))
    if a.treatments:
        sections.append(judge_section(a))
    optional = (per_arm_section(a), examples_section(a))
    sections += [sec for sec in optional if sec is not None]
    sections.append(run_details_section(a))
    title = str(a.results.get("title") or "NEFTune experiment")
    return Document(title, _meta(a), sections)
