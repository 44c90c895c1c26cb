"""Answers cut off at the token cap: the share each arm reports, and the length verdict withheld above 10%."""

from __future__ import annotations

import json

import pytest
from tests.test_report import make_results, two_seeds

from neftune.evaluate import evaluate_outputs
from neftune.report import compute_effects, write_report
from neftune.report.censoring import CENSORED_LIMIT, cut_share, withheld_reason
from neftune.results import ArmResult


def _cut(arm: ArmResult, n_cut: int, cap: int = 160) -> None:
    """Mark the arm's first ``n_cut`` answers as cut off at ``cap``."""
    assert arm.eval is not None and arm.eval.per_example is not None
    n = len(arm.eval.per_example["length_chars"] or [])
    flags = [1 if i < n_cut else 0 for i in range(n)]
    arm.eval.per_example["reached_cap"] = flags
    arm.eval.reached_cap = sum(flags) / n
    arm.eval.max_new_tokens = cap


def test_the_share_is_read_from_the_arm_or_counted_from_its_answers():
    assert cut_share({"eval": {"reached_cap": 0.25}}) == 0.25
    assert cut_share({"eval": {"per_example": {"reached_cap": [1, 0, 0, None, 1]}}}) == 0.5  # None: not recorded
    assert cut_share({"eval": {"per_example": {"reached_cap": None}}}) is None
    assert cut_share({"name": "old run, nothing recorded"}) is None


def test_evaluate_outputs_counts_the_answers_that_reached_the_cap():
    records = [
        {"instruction": f"q{i}", "output": "x " * i, "generator": "g", "reached_cap": i % 4 == 0} for i in range(8)
    ]
    metrics = evaluate_outputs(records)
    assert metrics["reached_cap"] == {"share": 0.25, "n": 8}
    assert metrics["per_example"]["reached_cap"] == [1, 0, 0, 0, 1, 0, 0, 0]
    del records[3]["reached_cap"]  # an AlpacaEval file from elsewhere need not say
    metrics = evaluate_outputs(records)
    assert metrics["reached_cap"] == {"share": 2 / 7, "n": 7} and metrics["per_example"]["reached_cap"][3] is None
    assert "reached_cap" not in evaluate_outputs([{"instruction": "q", "output": "a", "generator": "g"}])


@pytest.mark.parametrize(("n_base", "n_arm", "withheld"), [(200, 188, True), (0, 21, True), (20, 20, False)])
def test_one_seed_length_effect_is_withheld_above_ten_percent(n_base, n_arm, withheld):
    results = make_results(n_eval=200)
    base, arm = results.arms[0], results.arms[1]
    _cut(base, n_base)
    _cut(arm, n_arm)
    length = compute_effects(base, arm)["length_chars"]
    assert length["reached_cap"] == {"baseline": n_base / 200, "arm": n_arm / 200}
    if withheld:
        assert length["verdict"] == "withheld" and length["significant"] is False
        assert f"{n_base / 200:.0%} of alpha=0's answers" in length["withheld"]
        assert f"{n_arm / 200:.0%} of alpha=5's answers" in length["withheld"]
        assert "160-token cap" in length["withheld"]
    else:  # exactly 10% on each side is within the limit: the 2.1x stretch is a verdict
        assert CENSORED_LIMIT == 20 / 200
        assert length["verdict"] == "longer" and "withheld" not in length


def test_pooled_length_verdict_is_withheld_and_the_report_says_why(tmp_path):
    results = two_seeds(make_results(n_eval=120))
    for arm in results.arms:
        _cut(arm, 120 if arm.alpha == 0 else 30)  # every baseline answer cut, a quarter of the others'
    paths = write_report(results, tmp_path, n_boot=100)
    pooled = json.loads(paths["results"].read_text(encoding="utf-8"))["analysis"]["pooled"]
    for alpha in ("5", "10"):
        length = pooled[alpha]["length_chars"]
        assert length["verdict"] == "withheld"
        assert "100% of alpha=0,seed=1's answers" in length["withheld"] and "25% of" in length["withheld"]
        assert pooled[alpha]["exact_match"]["verdict"] != "withheld"  # only length is censored
    md = paths["markdown"].read_text(encoding="utf-8")
    assert "Answers that reached the 160-token cap without ending (cut off): \u03b1=0 seed 0 100%" in md
    assert "no length verdict is given" in md and "--max-new-tokens" in md
    assert "\u03b1=5 seed 0:** no length verdict (withheld: 100% of alpha=0's answers, 25% of alpha=5's" in md
    assert "| answers cut at the token cap | 100% | 25% | 25% |" in md
    verdict = md.split("## Verdict", 1)[1].split("##", 1)[0]
    assert "response length" not in verdict.split("\n\n")[1]  # never listed as a significant finding
    html = paths["html"].read_text(encoding="utf-8")
    assert 'class="v v-withheld"' in html


def test_a_run_within_the_limit_states_the_share_and_keeps_its_verdict(tmp_path):
    results = make_results(n_eval=100)
    for arm in results.arms:
        _cut(arm, 3, cap=512)
    md = write_report(results, tmp_path, n_boot=100)["markdown"].read_text(encoding="utf-8")
    assert (
        "Answers that reached the 512-token cap without ending (cut off): \u03b1=0 3%, \u03b1=5 3%, \u03b1=10 3%." in md
    )
    assert "withheld" not in md and "\u03b1=5:** answers 2.2\u00d7 longer (mean 655 vs 299 chars)" in md


def test_reports_without_the_share_render_as_before(tmp_path):
    results = make_results(n_eval=60)
    arms = [arm.to_json() for arm in results.arms]
    assert withheld_reason(arms[:1], arms[1:]) is None
    md = write_report(results, tmp_path, n_boot=100)["markdown"].read_text(encoding="utf-8")
    assert "token cap" not in md and "withheld" not in md
