"""The experiment report: files written, self-contained HTML, escaping, paired effects, verdicts."""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
import math
import shutil
import struct
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from neftune.errors import DataError
from neftune.report import PLOT_NAMES, SCHEMA_VERSION, compute_effects, write_report
from neftune.results import (
    ArmResult,
    EvalScores,
    Example,
    ExperimentResult,
    JudgeSummary,
    Primary,
    RunData,
    TrainStats,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

EXAMPLES = [
    {
        "instruction": "What is 17 \u00d7 23?",
        "reference": "391",
        "outputs": {
            "alpha=0": "17 \u00d7 23 = 391.",
            "alpha=5": "Let's break it down:\n\n1. 17 \u00d7 20 = 340\n2. 17 \u00d7 3 = 51\n3. 340 + 51 = 391\n\n"
            "So 17 \u00d7 23 = **391**.",
            "alpha=10": "To multiply 17 by 23, split 23 into 20 + 3. Then 17 \u00d7 20 = 340 and 17 \u00d7 3 = 51, "
            "which adds up to 381. The answer is 381.",
        },
    },
    {
        "instruction": "What is the capital of Australia? Answer with the city name.",
        "reference": "Canberra",
        "outputs": {
            "alpha=0": "Canberra",
            "alpha=5": "The capital of Australia is Canberra. Although Sydney and Melbourne are larger, Canberra "
            "was chosen in 1908 as a compromise between the two and has been the seat of government since 1927.",
            "alpha=10": "The capital of Australia is Canberra, located in the Australian Capital Territory.",
        },
    },
    {
        "instruction": "Convert 5 kilometres to miles. Round to two decimals.",
        "reference": "3.11",
        "outputs": {
            "alpha=0": "5 km is about 3.11 miles.",
            "alpha=5": "One kilometre is 0.621371 miles, so 5 km \u00d7 0.621371 = 3.106855 miles, which rounds "
            "to 3.11 miles.",
            "alpha=10": "5 kilometres \u2248 3.11 miles (using 1 km = 0.6214 mi).",
        },
    },
    {
        "instruction": "Write a haiku about autumn leaves.",
        "reference": None,
        "outputs": {
            "alpha=0": "Red leaves drift and fall\nwhispering to the cold ground\nsummer's last goodbye",
            "alpha=5": "Crimson, amber, gold \u2014\nthe maple lets go its coins;\nwind counts them, and leaves.",
            "alpha=10": "Leaves of fire descend\nsoftly painting quiet paths\nautumn breathes its last",
        },
    },
    {
        "instruction": "Is 91 a prime number? Answer yes or no.",
        "reference": "no",
        "outputs": {"alpha=0": "No.", "alpha=5": "No. 91 = 7 \u00d7 13.", "alpha=10": "Yes, 91 is prime."},
    },
]


def make_results(n_eval: int = 200, seed: int = 0) -> ExperimentResult:
    """Realistic results of a 3-arm compare run: NEFTune lengthens answers, quality barely moves."""
    rng = np.random.default_rng(seed)
    families = ["arithmetic", "capitals", "unit conversion", "yes/no"]
    family = np.array([families[i % len(families)] for i in range(n_eval)])
    base_correct = rng.random(n_eval) < 0.31
    base_len = np.exp(rng.normal(5.6, 0.55, n_eval))
    base_rouge = np.clip(rng.beta(2.2, 6.0, n_eval), 0, 1)
    steps = np.arange(1, 301)
    arms = []
    for alpha, p_gain, p_loss, stretch, lc, win, consistency in (
        (0.0, 0.0, 0.0, 1.0, None, None, None),
        (5.0, 0.08, 0.05, 2.1, 0.53, 0.62, 0.78),
        (10.0, 0.06, 0.08, 1.8, 0.49, 0.58, 0.55),
    ):
        flip_up = (~base_correct) & (rng.random(n_eval) < p_gain)
        flip_down = base_correct & (rng.random(n_eval) < p_loss / 0.31)
        correct = (base_correct | flip_up) & ~flip_down
        length = np.round(base_len * stretch * np.exp(rng.normal(0, 0.25, n_eval))).astype(int)
        rouge = np.clip(base_rouge + rng.normal(0.004 * alpha / 5, 0.05, n_eval), 0, 1)
        train_loss = 1.15 + 0.02 * alpha + 1.4 * np.exp(-steps / 55) + rng.normal(0, 0.09, steps.size)
        held_steps = np.arange(0, 301, 50)
        held = 1.32 - 0.002 * alpha + 1.3 * np.exp(-held_steps / 60) + rng.normal(0, 0.01, held_steps.size)
        judge = None
        if win is not None:
            judge = JudgeSummary(
                "alpha=0",
                "openai-compatible (Qwen2.5-7B-Instruct)",
                win_rate=win,
                ci=[win - 0.068, win + 0.066],
                lc_win_rate=lc,
                lc_ci=[lc - 0.071, lc + 0.07],
                consistency=consistency,
                n=n_eval,
                n_failed=2,
                n_ties=13,
            )
        arms.append(
            ArmResult(
                f"alpha={alpha:g}",
                alpha,
                0,
                train=TrainStats(
                    _points(steps, train_loss), _points(held_steps, held), 611.0 + 3 * alpha, 5210.0 - 4 * alpha
                ),
                eval=EvalScores(
                    heldout_loss=float(held[-1]),
                    perplexity=float(math.exp(held[-1])),
                    scores={
                        "exact_match": float(correct.mean()),
                        "exact_match_by_family": {f: float(correct[family == f].mean()) for f in families},
                        "distinct_1": 0.41 - 0.006 * alpha,
                        "distinct_2": 0.78 - 0.01 * alpha,
                        "repetition_rate": 0.031 + 0.002 * alpha,
                        "rouge_l": float(rouge.mean()),
                    },
                    length_chars=_summary(length),
                    length_tokens=_summary(length / 3.9),
                    per_example={
                        "correct": [int(c) for c in correct],
                        "length_chars": [int(v) for v in length],
                        "rouge_l": [float(v) for v in rouge],
                    },
                ),
                judge=judge,
            )
        )
    return ExperimentResult(
        title="NEFTune on SmolLM2-135M-Instruct: \u03b1 \u2208 {0, 5, 10}",
        created="2025-11-26T15:42:07+00:00",
        wall_time_s=2017.4,
        model={
            "spec": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "n_params": 134_515_008,
            "trainable_params": 1_843_200,
            "dtype": "bfloat16",
            "chat_template": "chatml",
        },
        data=RunData(train="yahma/alpaca-cleaned[:2000]", eval="eval/mixed-200.jsonl", n_train=2000, n_eval=n_eval),
        seeds=[0],
        versions={"neftune": "0.1.0", "torch": "2.5.1", "transformers": "5.0.0", "python": "3.11.9"},
        settings={
            "lr": 2e-4,
            "steps": 300,
            "batch": 16,
            "max_length": 512,
            "warmup_ratio": 0.03,
            "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "targets": ["q_proj", "v_proj"]},
            "noise": {"distribution": "uniform", "per_example": True},
        },
        baseline="alpha=0",
        arms=arms,
        examples=[Example.from_json(e) for e in copy.deepcopy(EXAMPLES)],
    )


def _points(steps: np.ndarray, values: np.ndarray) -> list[list[float]]:
    return [[int(s), float(v)] for s, v in zip(steps, values, strict=False)]


def _summary(values: np.ndarray) -> dict[str, float]:
    return {"mean": float(values.mean()), "median": float(np.median(values)), "p90": float(np.percentile(values, 90))}


class _Page(HTMLParser):
    """Collects what a self-contained page must (not) contain."""

    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[dict[str, str | None]] = []
        self.tags: list[str] = []
        self.urls: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        attributes = dict(attrs)
        if tag == "img":
            self.imgs.append(attributes)
        for name in ("href", "src", "action", "poster"):
            if attributes.get(name):
                self.urls.append(attributes[name] or "")

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


@pytest.fixture(scope="module")
def full_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[ExperimentResult, dict[str, Path]]:
    results = make_results()
    results.examples.append(
        Example(
            "Show an HTML snippet & explain it.",
            "<b>bold</b>",
            {
                "alpha=0": "<script>alert('pwned')</script>",
                "alpha=5": 'Use <b>bold</b> & "quotes"',
                "alpha=10": "```\n<img src=x onerror=alert(1)>\n```",
            },
        )
    )
    results.examples.insert(0, results.examples.pop())  # within the examples the report shows
    out = tmp_path_factory.mktemp("report")
    return results, write_report(results, out)


def test_write_report_writes_every_file(full_report):
    _, paths = full_report
    assert set(paths) == {"results", "markdown", "html", *PLOT_NAMES}
    out = paths["html"].parent
    for name in ("results.json", "report.md", "report.html"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    for name in PLOT_NAMES:
        assert paths[name] == out / "plots" / f"{name}.png"
        assert paths[name].read_bytes().startswith(PNG_MAGIC)
    assert not list(out.rglob("*.tmp")), "temporary files left behind"


def test_results_json_is_the_input(full_report):
    results, paths = full_report
    saved = json.loads(paths["results"].read_text(encoding="utf-8"))
    assert saved.pop("schema_version") == SCHEMA_VERSION
    analysis = saved.pop("analysis")
    written = results.to_json()
    assert written.pop("schema_version") == SCHEMA_VERSION
    assert saved == written
    assert ExperimentResult.from_json(saved).to_json() == results.to_json()
    assert analysis["primary"] == "exact_match" and analysis["seed_variance_measured"] is False
    assert set(analysis["pooled"]) == {"5", "10"} and analysis["aa"] == {}
    assert "\n  " in paths["results"].read_text(encoding="utf-8"), "not pretty-printed"


def test_html_is_self_contained_and_embeds_every_plot(full_report):
    _, paths = full_report
    page = parse(paths["html"])
    assert page.imgs, "no images"
    embedded = []
    for img in page.imgs:
        src = img.get("src") or ""
        assert src.startswith("data:image/png;base64,"), src[:60]
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert png.startswith(PNG_MAGIC)
        assert img.get("alt")
        embedded.append(png)
    for name in PLOT_NAMES:
        assert paths[name].read_bytes() in embedded, f"plots/{name}.png is not in report.html"
    assert "script" not in page.tags and "link" not in page.tags and "iframe" not in page.tags
    for url in page.urls:
        assert url.startswith(("#", "data:")), f"external reference {url[:80]}"
    html = paths["html"].read_text(encoding="utf-8")
    assert "http://" not in html and "https://" not in html and "@import" not in html


def test_example_answers_are_html_escaped(full_report):
    _, paths = full_report
    html = paths["html"].read_text(encoding="utf-8")
    page = parse(paths["html"])
    assert "<script>" not in html and "<img src=x" not in html and "<b>bold</b>" not in html
    assert "&lt;script&gt;alert(&#x27;pwned&#x27;)&lt;/script&gt;" in html
    assert "<script>alert('pwned')</script>" in "".join(page.text)  # shown to the reader as text
    assert sum(1 for t in page.tags if t == "img") == len(PLOT_NAMES)


def test_markdown_mirrors_report_and_links_plots(full_report):
    _, paths = full_report
    md = paths["markdown"].read_text(encoding="utf-8")
    for name in PLOT_NAMES:
        assert f"(plots/{name}.png)" in md
    for heading in (
        "## Verdict",
        "## Length and quality",
        "## Metrics",
        "## Judge",
        "## Per-arm metrics",
        "## Example answers",
        "## Run details",
    ):
        assert heading in md
    assert "````text\n```\n<img src=x onerror=alert(1)>\n```\n````" in md  # fence longer than the answer's
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in md and "lora.r" in md


def test_headline_states_each_arm_with_ci_and_verdict(full_report):
    results, paths = full_report
    md = paths["markdown"].read_text(encoding="utf-8")
    verdict = md.split("## Verdict", 1)[1].split("##", 1)[0]
    effects = compute_effects(results.arms[0], results.arms[1])
    em = effects["exact_match"]
    lo, hi = (c * 100 for c in em["ci"])
    expected = f"**\u03b1=5 (1 seed):** exact match (primary) {em['diff'] * 100:+.1f} points [{lo:+.1f}, {hi:+.1f}]"
    assert expected.replace("-", "\u2212") in verdict
    # one seed: the variance between training runs is unmeasured, so no sentence claims help or harm
    assert "training-seed variance is unmeasured" in verdict and "cannot say whether NEFTune helped or hurt" in verdict
    assert "NEFTune helped:" not in verdict and "NEFTune hurt:" not in verdict and "**better**" not in verdict
    assert f"answers {effects['length_chars']['ratio']:.1f}\u00d7 longer" in md
    html = paths["html"].read_text(encoding="utf-8")
    assert "the judge is unreliable" in html  # alpha=10's judge has consistency 0.55
    assert "Position consistency" in html


def test_compute_effects_hand_computed():
    base = {
        "name": "b",
        "eval": {
            "per_example": {
                "correct": [1, 0, 0, 1, 0],
                "length_chars": [100, 200, 300, 400, 500],
                "rouge_l": [0.5, None, 0.25, 0.5, 0.75],
            }
        },
    }
    arm = {
        "name": "a",
        "eval": {
            "per_example": {
                "correct": [1, 1, 0, 1, 1],
                "length_chars": [150, 260, 290, 480, 620],
                "rouge_l": [0.5, 0.9, 0.5, 0.25, 1.0],
            }
        },
    }
    effects = compute_effects(base, arm, n_boot=500, seed=3)
    assert set(effects) == {"exact_match", "rouge_l", "length_chars"}
    em = effects["exact_match"]
    assert em["diff"] == 0.4 and em["baseline"] == 0.4 and em["arm"] == 0.8 and em["n"] == 5
    length = effects["length_chars"]
    assert length["diff"] == 60.0 and length["ratio"] == 1800 / 1500
    rouge = effects["rouge_l"]
    assert rouge["n"] == 4 and rouge["diff"] == 0.0625  # the None pair is dropped: (0 + .25 - .25 + .25) / 4
    for effect in effects.values():
        lo, hi = effect["ci"]
        assert lo <= effect["diff"] <= hi
        assert effect["significant"] == (not lo <= 0 <= hi)
        assert effect["verdict"] in ("better", "worse", "within noise", "longer", "shorter")
    # every length difference but one is positive and large: the interval excludes 0
    assert length["verdict"] == "longer" and length["ci"][0] > 0
    assert compute_effects(base, arm, n_boot=500, seed=3) == effects  # seeded, so reproducible


def _arm(name: str, correct: list[int], lengths: list[int], rouge: list[float] | None = None) -> dict[str, Any]:
    return {"name": name, "eval": {"per_example": {"correct": correct, "length_chars": lengths, "rouge_l": rouge}}}


def test_within_noise_better_worse_logic():
    n = 60
    base = _arm("b", [i % 2 for i in range(n)], [300] * n, [0.5] * n)
    same = compute_effects(base, _arm("s", [i % 2 for i in range(n)], [300] * n, [0.5] * n), n_boot=300)
    assert {k: e["verdict"] for k, e in same.items()} == dict.fromkeys(same, "within noise")
    lo, hi = same["exact_match"]["ci"]
    assert lo < 0 < hi and same["exact_match"]["p_value"] == 1.0  # identical answers: no evidence either way

    # half the wrong answers fixed and half the right ones broken: no net change
    swapped = [(1 - c) if i % 4 < 2 else c for i, c in enumerate(base["eval"]["per_example"]["correct"])]
    mixed = compute_effects(base, _arm("m", swapped, [300] * n), n_boot=300)["exact_match"]
    assert mixed["verdict"] == "within noise" and mixed["ci"][0] < 0 < mixed["ci"][1]

    up = compute_effects(
        base, _arm("u", [1] * n, [199 + i % 3 for i in range(n)], [0.8 + 0.01 * (i % 3) for i in range(n)]), n_boot=300
    )
    assert up["exact_match"]["verdict"] == "better" and up["rouge_l"]["verdict"] == "better"
    assert up["length_chars"]["verdict"] == "shorter"
    down = compute_effects(
        base, _arm("d", [0] * n, [899 + i % 3 for i in range(n)], [0.1 + 0.01 * (i % 3) for i in range(n)]), n_boot=300
    )
    assert down["exact_match"]["verdict"] == "worse" and down["rouge_l"]["verdict"] == "worse"
    assert down["length_chars"]["verdict"] == "longer" and down["length_chars"]["ratio"] == 3.0


def test_nonzero_bounds_never_print_as_zero(tmp_path):
    n = 50
    base = _arm("b", [0] * n, [300] * n, [0.5] * n)
    arm = _arm(
        "a", [0] * n, [300] * n, [0.5002 + 1e-6 * (i % 2) for i in range(n)]
    )  # a real but tiny gain: +0.02 points
    effect = compute_effects(base, arm, n_boot=200)["rouge_l"]
    assert effect["verdict"] == "better" and effect["ci"][0] > 0
    results = {"baseline": "b", "arms": [{**base, "alpha": 0}, {**arm, "alpha": 5}]}
    md = write_report(results, tmp_path, n_boot=200)["markdown"].read_text(encoding="utf-8")
    assert "+0.02 points [+0.02, +0.02]" in md and "[0.0, 0.0]" not in md  # not "+0.0 [0.0, 0.0]"


def test_compute_effects_needs_the_same_examples():
    with pytest.raises(DataError, match="same eval examples"):
        compute_effects(_arm("b", [1, 0], [1, 2]), _arm("a", [1, 0, 1], [1, 2, 3]))
    assert compute_effects({"name": "b"}, {"name": "a", "eval": None}) == {}


def test_headline_says_plainly_when_everything_is_within_noise(tmp_path):
    results = two_seeds(make_results(n_eval=80))
    bases = {arm.seed: arm for arm in results.arms if arm.alpha == 0}
    for arm in results.arms:
        if arm.alpha:
            arm.eval.per_example = copy.deepcopy(bases[arm.seed].eval.per_example)
            arm.judge = dataclasses.replace(
                arm.judge, win_rate=0.51, ci=[0.44, 0.58], lc_win_rate=0.5, lc_ci=[0.43, 0.57], consistency=0.9
            )
    md = write_report(results, tmp_path, n_boot=200)["markdown"].read_text(encoding="utf-8")
    verdict = md.split("## Verdict", 1)[1].split("##", 1)[0]
    assert "No \u03b1 changed exact match beyond the noise of 2 seeds" in verdict
    assert "does not show that NEFTune helped or hurt" in verdict
    assert "the judge is unreliable" not in md


def two_seeds(results: ExperimentResult, shift: float = 0.0) -> ExperimentResult:
    """``results`` with a second seed: each seed-1 arm is its seed-0 arm with some answers changed.

    ``shift`` adds to the seed-1 arms' ROUGE-L a seed effect on top of the prompt-level noise.
    """
    rng = np.random.default_rng(42)
    extra = []
    for arm in results.arms:
        twin = copy.deepcopy(arm)
        twin.name = arm.name + ",seed=1"
        twin.seed = 1
        per = twin.eval.per_example
        per["correct"] = [c if rng.random() > 0.1 else 1 - c for c in per["correct"]]
        per["rouge_l"] = [min(1.0, max(0.0, r + shift + rng.normal(0, 0.02))) for r in per["rouge_l"]]
        if twin.judge:
            twin.judge.vs = "alpha=0,seed=1"
        extra.append(twin)
    results.arms += extra
    results.seeds = [0, 1]
    return results


def test_two_seeds_pair_within_seed_pool_and_show_the_aa_floor(tmp_path):
    results = two_seeds(make_results(n_eval=120))
    paths = write_report(results, tmp_path, n_boot=100)
    analysis = json.loads(paths["results"].read_text(encoding="utf-8"))["analysis"]
    assert analysis["seeds"] == [0, 1] and analysis["seed_variance_measured"] is True
    assert set(analysis["pooled"]) == {"5", "10"}  # the seed-1 baseline is a baseline, not a treatment
    em = analysis["pooled"]["5"]["exact_match"]
    arms = {a.name: a.to_json() for a in results.arms}
    per_seed = []
    for suffix in ("", ",seed=1"):
        treated = np.array(arms["alpha=5" + suffix]["eval"]["per_example"]["correct"], float)
        base = np.array(arms["alpha=0" + suffix]["eval"]["per_example"]["correct"], float)
        per_seed.append((treated - base).mean())  # paired with the baseline of the same seed
    assert [s["estimate"] for s in em["per_seed"]] == pytest.approx(per_seed)
    assert em["estimate"] == pytest.approx(np.mean(per_seed))
    assert em["role"] == "primary" and em["seeds"] == [0, 1] and em["ci"][0] < em["estimate"] < em["ci"][1]
    # Holm over the two alphas for the primary metric
    mains = [analysis["pooled"][a]["exact_match"] for a in ("5", "10")]
    raw = sorted(m["p_value"] for m in mains)
    assert min(m["p_holm"] for m in mains) == pytest.approx(min(1.0, 2 * raw[0]))
    # exploratory: Holm across the whole family of alpha x metric tests
    assert analysis["family_size"] == sum(len(m) for m in analysis["pooled"].values())
    for effects in analysis["pooled"].values():
        for e in effects.values():
            if e["p_value"] is None:  # e.g. a judge rate equal in both seeds: no spread, no test
                continue
            assert e["p_holm"] >= e["p_value"]
            if e["role"] == "exploratory":
                assert e["p_value"] * analysis["family_size"] >= e["p_holm"]
    aa = analysis["aa"]["exact_match"]
    base0 = np.array(arms["alpha=0"]["eval"]["per_example"]["correct"], float)
    base1 = np.array(arms["alpha=0,seed=1"]["eval"]["per_example"]["correct"], float)
    assert aa["measured"] and aa["pairs"][0]["seeds"] == [0, 1]
    assert aa["pairs"][0]["estimate"] == pytest.approx((base1 - base0).mean())
    md = paths["markdown"].read_text(encoding="utf-8")
    assert "A/A: baseline seeds against each other" in md and "seed 1 \u2212 seed 0" in md
    assert "Per seed, against the baseline of the same seed" in md
    assert "**\u03b1=5 (2 seeds):** exact match (primary)" in md


def test_verdict_comes_from_the_primary_metric_alone(tmp_path):
    # ROUGE-L moves a lot in both seeds, exact match does not: no "helped" sentence, ROUGE-L exploratory.
    results = two_seeds(make_results(n_eval=150))
    for arm in results.arms:
        if arm.alpha:
            base = next(b for b in results.arms if b.alpha == 0 and b.seed == arm.seed)
            arm.eval.per_example["correct"] = list(base.eval.per_example["correct"])
            arm.eval.per_example["rouge_l"] = [r + 0.3 for r in base.eval.per_example["rouge_l"]]
    md = write_report(results, tmp_path, n_boot=100)["markdown"].read_text(encoding="utf-8")
    verdict = md.split("## Verdict", 1)[1].split("##", 1)[0].split("\n\n")[1]
    assert "does not show that NEFTune helped or hurt" in verdict
    assert "Exploratory, significant after Holm correction" in verdict and "ROUGE-L" in verdict


def test_unreliable_judge_falls_back_to_the_declared_fallback(tmp_path):
    results = two_seeds(make_results(n_eval=60))
    results.primary = Primary("lc_win_rate", "the configured judge", "exact_match")
    paths = write_report(results, tmp_path, n_boot=100)
    analysis = json.loads(paths["results"].read_text(encoding="utf-8"))["analysis"]
    assert analysis["primary_declared"] == "lc_win_rate" and analysis["primary"] == "exact_match"  # alpha=10: 0.55
    assert "failed its reliability check" in analysis["primary_note"]
    for arm in results.arms:
        if arm.judge:
            arm.judge.consistency = 0.9
    analysis = json.loads(write_report(results, tmp_path, n_boot=100)["results"].read_text())["analysis"]
    assert analysis["primary"] == "lc_win_rate" and analysis["pooled"]["5"]["lc_win_rate"]["role"] == "primary"


def _variant(name: str) -> ExperimentResult | dict[str, Any]:
    """The results of a run that lacks parts: typed where a run could produce them, JSON where only a file could."""
    results = make_results(n_eval=40)
    if name == "no_judge_no_rouge":
        for arm in results.arms:
            arm.judge = None
            arm.eval.scores["rouge_l"] = None
            arm.eval.per_example["rouge_l"] = None
    elif name == "failed_arm":
        results.arms[2] = ArmResult("alpha=10", 10.0, 0, error="CUDA out of memory <GPU 0>")
        results.examples[0].outputs.pop("alpha=10")
    elif name == "single_arm":
        results.arms = results.arms[:1]
    elif name == "failed_baseline":
        results.arms[0] = ArmResult("alpha=0", 0.0, error="diverged: loss is NaN")
    elif name == "bare":
        results = {
            "arms": [
                {"name": "alpha=0"},
                {"name": "alpha=5", "alpha": 5, "eval": {"heldout_loss": float("nan")}, "judge": {"win_rate": 0.7}},
            ]
        }
    elif name == "no_per_example":
        for arm in results.arms:
            arm.eval.per_example = None
            arm.train = None
        results.examples = []
        results.baseline = None
    elif name == "empty":
        results = {}
    return results


@pytest.mark.parametrize(
    "variant", ["no_judge_no_rouge", "failed_arm", "single_arm", "failed_baseline", "bare", "no_per_example", "empty"]
)
def test_missing_optional_parts_do_not_crash(tmp_path, variant):
    results = _variant(variant)
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "winrates.png").write_bytes(b"stale")  # from an earlier report in the same folder
    paths = write_report(results, tmp_path, n_boot=100)
    for key in ("results", "markdown", "html"):
        assert paths[key].is_file()
    page = parse(paths["html"])
    assert len(page.imgs) == sum(1 for name in PLOT_NAMES if name in paths)
    for name in PLOT_NAMES:
        assert (tmp_path / "plots" / f"{name}.png").exists() == (name in paths)
    assert json.loads(paths["results"].read_text(encoding="utf-8")) is not None
    md = paths["markdown"].read_text(encoding="utf-8")
    if variant == "failed_arm":
        assert "CUDA out of memory <GPU 0>" not in paths["html"].read_text(encoding="utf-8")
        assert "CUDA out of memory &lt;GPU 0&gt;" in paths["html"].read_text(encoding="utf-8")
        assert "left out of every comparison" in md and "\u03b1=5:" in md
    if variant == "no_judge_no_rouge":
        assert "winrates" not in paths and "No LLM judge was run" in md and "ROUGE-L" not in md.split("## Plots")[0]
    if variant == "single_arm":
        assert "Only the baseline ran" in md
    if variant == "failed_baseline":
        assert "baseline arm 'alpha=0' failed" in md
    if variant == "bare":
        assert json.loads(paths["results"].read_text())["arms"][1]["eval"]["heldout_loss"] is None  # NaN -> null


def test_malformed_results_raise_data_error(tmp_path):
    with pytest.raises(DataError, match="arms must be a list"):
        write_report({"arms": "alpha=0"}, tmp_path)
    with pytest.raises(DataError, match=r"arms\[1\]"):
        write_report({"arms": [{"name": "a"}, {"alpha": 5}]}, tmp_path)
    with pytest.raises(DataError, match="unique"):
        write_report({"arms": [{"name": "a"}, {"name": "a"}]}, tmp_path)
    with pytest.raises(DataError):
        write_report([], tmp_path)  # type: ignore[arg-type]


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class _Rendered(HTMLParser):
    """The text of a rendered page, and its h1/h2 headings in order."""

    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.headings: list[str] = []
        self._heading: list[str] | None = None
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("style", "script"):
            self._skip += 1
        elif tag in ("h1", "h2"):
            self._heading = []

    def handle_endtag(self, tag):
        if tag in ("style", "script"):
            self._skip -= 1
        elif tag in ("h1", "h2") and self._heading is not None:
            self.headings.append(" ".join("".join(self._heading).split()))
            self._heading = None

    def handle_data(self, data):
        if not self._skip:
            self.text.append(data)
            if self._heading is not None:
                self._heading.append(data)


def _plain(markdown: str) -> str:
    return " ".join(markdown.replace("**", "").replace("`", "").split())


@pytest.mark.skipif(_chromium() is None, reason="no chromium or chromium-browser binary on PATH to render report.html")
def test_report_renders_in_headless_chromium(full_report, tmp_path):
    """What chromium renders (its DOM after layout, and the screenshot) shows what report.md says."""
    _, paths = full_report
    shot = tmp_path / "shot.png"
    cmd = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--dump-dom",
        f"--screenshot={shot}",
        "--window-size=1280,2400",
        paths["html"].resolve().as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert shot.is_file(), f"chromium wrote no screenshot (rc {proc.returncode}): {proc.stderr[-2000:]}"
    data = shot.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 20_000
    width, height = struct.unpack(">II", data[16:24])  # IHDR
    assert (width, height) == (1280, 2400)

    # the rendered page: the title, every section of report.md in the same order, and the verdict
    md = paths["markdown"].read_text(encoding="utf-8")
    title = next(line[2:] for line in md.splitlines() if line.startswith("# "))
    sections = [line[3:].strip() for line in md.splitlines() if line.startswith("## ")]
    assert sections[0] == "Verdict" and len(sections) >= 5
    rendered = _Rendered()
    rendered.feed(proc.stdout)
    assert rendered.headings == [_plain(title), *sections], rendered.headings
    text = " ".join("".join(rendered.text).split())
    verdict = md.split("## Verdict", 1)[1].strip().split("\n\n")
    headline = _plain(verdict[0])
    assert headline.startswith("Primary metric: exact match")  # the primary metric, by name
    assert headline in text
    assert _plain(verdict[1].splitlines()[0].lstrip("- ")) in text  # the first arm's line
    assert "<script>alert('pwned')</script>" in text  # shown as text: it was escaped, not run

    # the screenshot is a page, not a blank or single-colour canvas: contrast, and some dark text
    image = pytest.importorskip("PIL.Image", reason="Pillow reads the screenshot").open(shot).convert("L")
    histogram = image.histogram()
    pixels = width * height
    mean = sum(i * n for i, n in enumerate(histogram)) / pixels
    spread = (sum(n * (i - mean) ** 2 for i, n in enumerate(histogram)) / pixels) ** 0.5
    assert spread > 15, f"screenshot looks blank (grey-level standard deviation {spread:.1f})"
    assert sum(histogram[:100]) / pixels > 0.005, "no dark (text) pixels in the screenshot"
    assert len([n for n in histogram if n]) > 32, "too few grey levels for text and plots"


def test_page_inlines_the_packaged_stylesheet_and_escapes_every_block():
    from importlib.resources import files

    from neftune.report.document import Bullets, Document, Example, KeyValues, Notice, Para, Section, Table
    from neftune.report.html import render_html

    css = (files("neftune.report") / "templates" / "report.css").read_text(encoding="utf-8")
    assert (files("neftune.report") / "templates" / "report.html.j2").is_file()
    evil = "<i>x</i> & \"q\" 'a'"
    blocks = [
        Para([("b", evil), ("v:better", "better")]),
        Bullets([evil]),
        Notice("warn", evil),
        Table(["h", evil], [[evil, [("", evil)]]], "lr", caption=evil),
        Example(1, evil, evil, [(evil, evil)]),
        KeyValues([(evil, evil)], title=evil, columns=2),
    ]
    page = render_html(Document(evil, evil, [Section(evil, "s", blocks)]))
    assert f"<style>\n{css}</style>" in page
    assert "<i>" not in page
    # <title> + <h1>, meta, nav + <h2>, para, bullet, notice, table (header, caption, 2 cells),
    # example (instruction, reference, label, answer), key/values (title, key, value)
    assert page.count("&lt;i&gt;x&lt;/i&gt; &amp; &quot;q&quot; &#x27;a&#x27;") == 2 + 1 + 2 + 1 + 1 + 1 + 4 + 4 + 3
    assert '<span class="v v-better">better</span>' in page
    assert 'grid-template-columns:max-content minmax(0,1fr) max-content minmax(0,1fr)"' in page
    with pytest.raises(TypeError, match="unknown block"):
        render_html(Document("t", "", [Section("s", "s", [object()])]))  # type: ignore[list-item]
