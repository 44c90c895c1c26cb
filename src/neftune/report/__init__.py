"""The experiment report: did NEFTune help, by how much, and how sure can we be.

:func:`write_report` turns the results of ``neftune compare`` into ``results.json``, ``report.md``
and a self-contained ``report.html`` (inline CSS, plots embedded as base64 PNG data URIs, no
scripts and no external resources, so it opens offline and can be mailed as one file), plus PNG
plots under ``plots/``.  :func:`compute_effects` gives the paired per-example effect of one arm
against the baseline, with a bootstrap confidence interval and a plain-language verdict.

Data flows one way through the package's modules:

* :mod:`.analysis`: results -> :class:`~neftune.report.analysis.Analysis` (baseline, treatments,
  labels, paired effects, judge reliability); statistics come from :mod:`neftune.stats`.
* :mod:`.plots`: analysis -> PNG bytes (matplotlib, Agg).
* :mod:`.build` (with :mod:`.sections` and :mod:`.details`): analysis -> a
  :class:`~neftune.report.document.Document` of blocks (:mod:`.document`); numbers are formatted by
  :mod:`.format`.
* :mod:`.html` (Jinja2 template and CSS under ``templates/``) and :mod:`.markdown`: document -> text.
* this module: writes the files through :mod:`neftune.io`.

Input schema (every part not marked *required* may be missing or ``null``)::

    {
      "title": str, "created": ISO-8601 str, "wall_time_s": float,
      "model": {"spec": str, "n_params": int, "trainable_params": int, "dtype": str, ...},
      "data": {"train": str, "eval": str, "n_train": int, "n_eval": int,   # eval: the prompts answered
               "heldout": str, "n_heldout": int},   # the held-out loss's data (== eval unless --prompts)
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
            "reached_cap": float,       # share of answers cut off at max_new_tokens (no end token)
            "max_new_tokens": int,      # the cap they were generated under
            "per_example": {"correct": [0/1, ...] | null, "length_chars": [int, ...],
                            "rouge_l": [float, ...] | null, "reached_cap": [0/1, ...] | null}
          },
          "judge": null | {"vs": str, "backend": str, "win_rate": float, "ci": [lo, hi],
                           "lc_win_rate": float, "lc_ci": [lo, hi], "consistency": float,
                           "n": int, "n_failed": int, "n_ties": int}
        }, ...
      ],
      "examples": [{"instruction": str, "reference": str | null, "outputs": {arm_name: str}}],
      "primary": {"metric": str, "source": str, "fallback": str | null}   # declared before the run
    }

:class:`neftune.results.ExperimentResult` holds these values typed, and its ``to_json()`` writes them in
this order, ``"schema_version"`` last.  ``results.json`` is this input plus the report's analysis::

    "schema_version": 2,
    "analysis": {                       # neftune.report.verdicts.Verdicts
      "primary": str | null,            # the metric the verdict rests on
      "primary_declared": str | null, "primary_source": str, "primary_note": str | null,
      "seeds": [int],                   # seeds with a baseline arm
      "seed_variance_measured": bool,   # false with one seed: no verdict claims help or harm
      "family_size": int,               # alpha x metric tests in the exploratory Holm family
      "pooled": {"<alpha>": {"<metric>": {
          "role": "primary" | "exploratory", "seeds": [int], "n": int,
          "baseline": float, "arm": float,            # means compared (0.5 for judge rates)
          "estimate": float, "ci": [lo, hi],          # arm - baseline, pooled over seeds
          "p_value": float, "p_holm": float, "verdict": str, "method": str,
          "per_seed": [{"seed": int, "estimate": float, "ci": [lo, hi], "p_value": float, ...}],
          "components": {"seed_var", "prompt_var", "resid_var"}, ...}}},
      "aa": {"<metric>": {"measured": bool, "floor": float, "seed_sd": float,
                          "pairs": [{"seeds": [s, s2], "estimate": float, "ci": [lo, hi], "p_value": float}]}}
    }

Verdicts are ``"better"``, ``"worse"``, ``"within noise"``, ``"longer"``/``"shorter"`` (length),
``"seed variance unmeasured"`` (one seed) or ``"withheld"`` (length, when more than 10% of either
side's answers reached the token cap; the effect's ``withheld`` says why: :mod:`.censoring`).

Rates (exact match, ROUGE-L, win rates, consistency) are fractions in [0, 1].  Per-example lists
are aligned by eval example across arms (index ``i`` is the same prompt in every arm); a ``null``
entry drops that example from the pairs of that metric.  When ``"baseline"`` is missing, the first
arm with ``alpha == 0`` is the baseline.  Arms with an ``"error"`` are listed as failed and left out
of every comparison and plot.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from neftune.errors import DataError
from neftune.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from neftune.report.analysis import LOW_CONSISTENCY, Analysis, analyse, compute_effects
from neftune.report.build import build_document
from neftune.report.html import render_html
from neftune.report.markdown import render_markdown
from neftune.report.plots import PLOT_NAMES, render_plots
from neftune.results import SCHEMA_VERSION, ExperimentResult

__all__ = [
    "LOW_CONSISTENCY",
    "PLOT_NAMES",
    "SCHEMA_VERSION",
    "Analysis",
    "analyse",
    "compute_effects",
    "render_html",
    "render_markdown",
    "write_report",
]


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
    results: ExperimentResult | Mapping[str, Any], out_dir: Path | str, *, n_boot: int = 2000, seed: int = 0
) -> dict[str, Path]:
    """Write the experiment report for ``results`` into ``out_dir``.

    ``results`` is an :class:`~neftune.results.ExperimentResult`, read through its
    :meth:`~neftune.results.ExperimentResult.to_json`, or that JSON itself (schema in the module
    docstring), as read back from any ``results.json``.

    Writes ``results.json`` (the input as strict, pretty JSON: non-finite numbers become ``null``),
    ``report.md``, a self-contained ``report.html`` and the plots ``plots/{loss,lengths,winrates,
    metrics}.png``; a plot whose data is absent (e.g. ``winrates`` without a judge) is not written,
    and a stale copy from an earlier report in the same directory is removed so that the folder
    always matches its report.  Every file is written atomically.

    Returns the written paths keyed ``"results"``, ``"markdown"``, ``"html"`` and each plot name.
    ``n_boot`` and ``seed`` set the bootstrap of :func:`compute_effects`.  Raises
    :class:`DataError` when ``results`` is not an object or its ``arms`` are malformed.
    """
    if isinstance(results, ExperimentResult):
        results = results.to_json()
    if not isinstance(results, Mapping):
        raise DataError(f"results must be a JSON object, got {type(results).__name__}")
    out_dir = Path(out_dir)
    plots_dir = out_dir / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)

    analysis = analyse(results, n_boot=n_boot, seed=seed)
    pngs = render_plots(analysis)
    paths: dict[str, Path] = {}
    for name in PLOT_NAMES:
        path = plots_dir / f"{name}.png"
        if name in pngs:
            paths[name] = atomic_write_bytes(path, pngs[name])
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    doc = build_document(analysis, pngs)
    record = {**results, "schema_version": SCHEMA_VERSION}
    if analysis.verdicts is not None:
        record["analysis"] = analysis.verdicts.to_dict()
    paths["results"] = atomic_write_json(out_dir / "results.json", _jsonable(record), allow_nan=False)
    paths["markdown"] = atomic_write_text(out_dir / "report.md", render_markdown(doc))
    paths["html"] = atomic_write_text(out_dir / "report.html", render_html(doc))
    return {k: paths[k] for k in ("results", "markdown", "html", *PLOT_NAMES) if k in paths}
