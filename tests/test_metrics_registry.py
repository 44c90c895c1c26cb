"""The metric registry is the one source of every metric's facts: what scoring emits, what a verdict may
rest on, the order metrics are listed and chosen in, and which direction is better."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest

import neftune.metrics as metrics
from neftune.compare_config import CompareSection
from neftune.data.formats import Example
from neftune.data.presets import DataDefaults, DataPreset, defaults_for, get_preset, preset_names, register_preset
from neftune.errors import ConfigError
from neftune.evaluate import arm_scores, evaluate_outputs
from neftune.metrics import (
    METRICS,
    declare_primary,
    default_primaries,
    get_metric,
    judge_metrics,
    paired_metrics,
    primary_choices,
)
from neftune.report import compute_effects
from neftune.report.verdicts import build_verdicts

#: Per-example lists that evaluation keeps but that are not metrics of their own.
AUXILIARY = {"reached_cap", "ifeval_instruction_ids", "ifeval_instruction_strict", "ifeval_instruction_loose"}


def _scored() -> dict[str, Any]:
    """An evaluate_outputs report with every kind of score: exact answers, references, IFEval, cap flags."""
    examples = [
        Example(
            [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
            {"answer": "4", "family": "arithmetic"},
        ),
        Example([{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]),
        Example(
            [{"role": "user", "content": "Say hi without commas."}],
            {"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
        ),
    ]
    records = [
        {"instruction": e.prompt_messages[-1]["content"], "output": o, "generator": "g", "reached_cap": False}
        for e, o in zip(examples, ["4", "hi", "Hi there"], strict=True)
    ]
    return evaluate_outputs(records, examples)


def test_every_key_evaluation_emits_is_registered():
    report = _scored()
    keys = {m.key for m in METRICS}
    scores = arm_scores(report)
    assert {k for k in scores if not k.endswith("_by_family")} <= keys
    assert all(scores[m.key] is not None for m in metrics.arm_metrics())  # every scored_at path is real
    assert scores["exact_match_by_family"] == {"arithmetic": 1.0}
    per_example = {m.per_example for m in METRICS if m.per_example}
    assert set(report["per_example"]) - AUXILIARY <= per_example
    assert per_example <= set(report["per_example"])  # and every registered per-example key is emitted


def test_arm_scores_keep_the_results_json_layout():
    report = {"distinct_1": 0.5, "distinct_2": 0.7, "repetition_4": 0.1, "rouge_l": {"mean": 0.3, "n": 2}}
    assert list(arm_scores(report).items()) == [
        ("exact_match", None),
        ("exact_match_by_family", {}),
        ("distinct_1", 0.5),
        ("distinct_2", 0.7),
        ("repetition_rate", 0.1),
        ("rouge_l", 0.3),
    ]


def test_every_primary_choice_can_be_primary_and_the_help_lists_them():
    choices = primary_choices()
    assert choices == ("exact_match", "ifeval_prompt_strict", "ifeval_prompt_loose", "rouge_l", "lc_win_rate")
    assert all(get_metric(k).can_be_primary for k in choices)
    assert not get_metric("length_chars").can_be_primary  # no better direction
    assert set(default_primaries()) <= set(choices)
    field = {f.name: f for f in dataclasses.fields(CompareSection)}["primary"]
    listed = re.search(r"declared before the run: (.*?) \(default", field.metadata["help"])
    assert listed is not None
    named = re.split(r", | or ", listed.group(1))
    assert named == list(choices) and all(get_metric(k).can_be_primary for k in named)
    for name in preset_names():
        preset = get_preset(name)
        assert preset is not None
        if preset.primary_metric is not None:
            assert get_metric(preset.primary_metric).can_be_primary
    assert defaults_for("builtin:skills").primary_metric == "exact_match"


def test_an_unknown_metric_is_a_one_line_config_error():
    with pytest.raises(ConfigError) as err:
        get_metric("bleu")
    message = str(err.value)
    assert "\n" not in message and "'bleu'" in message and "exact_match" in message and "win_rate" in message
    with pytest.raises(ConfigError, match=r"^compare\.primary must be one of exact_match, .*got 'bleu'$"):
        declare_primary("bleu", "none", "builtin:skills", "exact_match", False)
    with pytest.raises(ConfigError, match="unknown metric 'bleu'"):
        DataDefaults(primary_metric="bleu")
    with pytest.raises(ConfigError, match="cannot carry a verdict"):
        register_preset(DataPreset(name="builtin:x", description="x", load=lambda *a: [], primary_metric="win_rate"))


def test_judge_metrics_are_what_the_judge_reports():
    from neftune.judge.result import JudgeResult
    from neftune.results import JudgeSummary

    fields = {f.name for f in dataclasses.fields(JudgeResult)}
    kept = JudgeSummary.kept_keys()
    for spec in judge_metrics():
        assert spec.key in kept and spec.key in fields
        assert spec.ci_key in kept and spec.ci_key in fields


def _arm(name: str, alpha: float, seed: int, correct: list[int], rouge: list[float]) -> dict[str, Any]:
    per_example = {"correct": correct, "rouge_l": rouge, "length_chars": [100 + i % 7 for i in range(len(correct))]}
    return {"name": name, "alpha": alpha, "seed": seed, "eval": {"per_example": per_example}}


def _results(n: int = 80) -> dict[str, Any]:
    """Two seeds; the treatment answers most prompts right where the baseline answers few."""
    arms = []
    for seed in (0, 1):
        base_correct = [int(i % 5 == seed) for i in range(n)]
        treated_correct = [int(i % 5 != seed) for i in range(n)]
        arms += [
            _arm(f"b{seed}", 0.0, seed, base_correct, [0.2 + 0.01 * (i % 3) for i in range(n)]),
            _arm(f"t{seed}", 5.0, seed, treated_correct, [0.6 + 0.01 * (i % 3) for i in range(n)]),
        ]
    return {"arms": arms, "primary": {"metric": "exact_match"}}


def _flipped(key: str) -> tuple[metrics.MetricSpec, ...]:
    return tuple(
        dataclasses.replace(m, higher_is_better=not m.higher_is_better) if m.key == key else m for m in METRICS
    )


def test_verdict_direction_comes_from_the_registry(monkeypatch):
    results = _results()
    pooled = build_verdicts(results, results["arms"], low_consistency=0.6).pooled[5.0]
    assert pooled["exact_match"].verdict == "better" and pooled["exact_match"].role == "primary"
    one_seed = compute_effects(results["arms"][0], results["arms"][1])
    assert one_seed["exact_match"]["verdict"] == "better"

    monkeypatch.setattr(metrics, "METRICS", _flipped("exact_match"))
    pooled = build_verdicts(results, results["arms"], low_consistency=0.6).pooled[5.0]
    assert pooled["exact_match"].verdict == "worse" and pooled["exact_match"].higher_is_better is False
    assert pooled["rouge_l"].verdict == "better"  # only the flipped metric turns
    assert compute_effects(results["arms"][0], results["arms"][1])["exact_match"]["verdict"] == "worse"


def test_metric_order_and_default_primary_come_from_the_registry(monkeypatch):
    results = _results()
    del results["primary"]  # nothing declared: the first default primary every arm measured
    verdicts = build_verdicts(results, results["arms"], low_consistency=0.6)
    assert verdicts.primary == "exact_match"
    measured = ["exact_match", "rouge_l", "length_chars"]
    assert list(verdicts.pooled[5.0]) == [m.key for m in paired_metrics() if m.key in measured] == measured

    rouge_first = tuple(
        dataclasses.replace(m, primary_rank=-1) if m.key == "rouge_l" else m
        for m in [*(m for m in METRICS if m.key == "rouge_l"), *(m for m in METRICS if m.key != "rouge_l")]
    )
    monkeypatch.setattr(metrics, "METRICS", rouge_first)
    verdicts = build_verdicts(results, results["arms"], low_consistency=0.6)
    assert verdicts.primary == "rouge_l"
    assert list(verdicts.pooled[5.0]) == ["rouge_l", "exact_match", "length_chars"]
