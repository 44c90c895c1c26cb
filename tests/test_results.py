"""Typed results and the evaluation plan: the JSON they write is the JSON compare always wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.test_report import make_results

from neftune.compare_config import CompareConfig
from neftune.errors import ConfigError, DataError, NeftuneError
from neftune.eval_plan import EvalPlan
from neftune.results import SCHEMA_VERSION, ArmResult, ExperimentResult, JudgeSummary
from neftune.serve import penalty_fields

STUDY = Path(__file__).resolve().parents[1] / "docs" / "experiments" / "study" / "results.json"


def test_a_results_file_reads_back_to_the_same_json():
    study = json.loads(STUDY.read_text(encoding="utf-8"))
    result = ExperimentResult.from_json(study)
    assert result.arms[0].eval is not None and result.arms[0].eval.ifeval is not None
    assert next(iter(result.arms[0].eval.scores)) == "exact_match"
    written = {k: v for k, v in study.items() if k != "analysis"}  # the report computes its analysis again
    assert json.dumps(result.to_json(), indent=2) == json.dumps(written, indent=2)  # same keys, same order


def test_an_older_file_keeps_what_it_had_and_only_that():
    old = {
        "title": "t",
        "arms": [
            {
                "name": "alpha=0",
                "alpha": 0.0,
                "eval": {"heldout_loss": 1.5, "exact_match": 0.25, "bleu": 0.1, "per_example": {"correct": [1, 0]}},
                "judge": None,
                "note": "from a fork",
            },
            {"name": "alpha=5", "alpha": 5.0, "error": "CUDA out of memory"},
        ],
        "examples": [{"instruction": "q", "reference": None, "outputs": {"alpha=0": "a"}}],
    }
    result = ExperimentResult.from_json(old)
    assert result.arms[0].eval is not None and result.arms[0].eval.scores == {"exact_match": 0.25, "bleu": 0.1}
    assert result.arms[0].eval.reached_cap is None and result.arms[1].error == "CUDA out of memory"
    assert result.to_json() == {**old, "schema_version": SCHEMA_VERSION}
    assert ArmResult.from_json(old["arms"][0]).to_json() == old["arms"][0]


def test_files_that_are_not_results_are_refused():
    with pytest.raises(DataError, match="this neftune reads up to"):
        ExperimentResult.from_json({"schema_version": SCHEMA_VERSION + 1, "arms": []})
    with pytest.raises(DataError, match="arms must be a list"):
        ExperimentResult.from_json({"arms": "alpha=0"})
    with pytest.raises(DataError, match="JSON object"):
        ExperimentResult.from_json([])  # type: ignore[arg-type]


def test_a_built_result_writes_the_documented_layout():
    result = make_results(n_eval=10)
    written = result.to_json()
    assert list(written) == [
        "title", "created", "wall_time_s", "model", "data", "primary", "seeds", "versions", "settings",
        "baseline", "arms", "examples", "schema_version",
    ]  # fmt: skip
    arm = written["arms"][1]
    assert list(arm) == ["name", "alpha", "seed", "train", "eval", "judge", "fingerprint"]  # no wall time: not run
    assert list(arm["eval"])[:3] == ["heldout_loss", "perplexity", "exact_match"]
    assert list(arm["eval"])[-6:] == [
        "length_chars", "length_tokens", "reached_cap", "max_new_tokens", "per_example", "ifeval",
    ]  # fmt: skip
    assert list(arm["judge"]) == ["vs", "backend", *JudgeSummary.kept_keys()]
    assert ExperimentResult.from_json(json.loads(json.dumps(written))).to_json() == written


def test_the_judge_summary_keeps_the_judge_results_numbers():
    verdict = {k: i for i, k in enumerate(JudgeSummary.kept_keys())} | {"pairs": [], "judge": "length"}
    summary = JudgeSummary.from_verdict("alpha=0", "length", verdict).to_json()
    assert summary == {"vs": "alpha=0", "backend": "length", **{k: verdict[k] for k in JudgeSummary.kept_keys()}}


def _config(tmp_path: Path, **generate: object) -> CompareConfig:
    cfg = CompareConfig()
    cfg.compare.output = str(tmp_path)
    for key, value in generate.items():
        setattr(cfg.generate, key, value)
    return cfg


def test_the_plan_stamps_generation_with_the_same_keys_in_the_same_order(tmp_path):
    cfg = _config(tmp_path)
    plan = EvalPlan.resolve(cfg)
    assert list(plan.fingerprint("E", "H").items()) == [
        ("eval", "E"),
        ("eval_data", "builtin:skills"),
        ("eval_limit", cfg.data.eval_limit),
        ("prompts", "builtin:skills"),
        ("prompts_limit", cfg.data.eval_limit),
        ("heldout", "H"),
        ("max_new_tokens", 64),  # builtin:skills' answers are short
        ("repetition_penalty", 1.0),
        ("spare_stop_tokens", True),
        ("batch_size", cfg.generate.batch_size),
        ("max_length", cfg.data.max_length),
        ("backend", "hf"),
    ]
    assert plan.loss_on_prompts and not plan.own_prompts
    served = _config(
        tmp_path,
        backend="openai",
        url="http://user:secret@127.0.0.1:8000/v1",
        server="vllm",
        served_model="m-{arm}",
        prompts="builtin:ifeval",
        limit=5,
        spare_stop_tokens=False,  # no server's penalty spares them
    )
    stamp = EvalPlan.resolve(served).fingerprint("E", "H")
    assert (
        stamp["prompts"] == "builtin:ifeval" and stamp["prompts_limit"] == 5 and stamp["eval_data"] == "builtin:skills"
    )
    assert list(stamp)[-4:] == ["backend", "url", "server", "served_model"]
    assert stamp["url"] == "http://127.0.0.1:8000/v1" and "secret" not in json.dumps(stamp)
    own = EvalPlan.resolve(_config(tmp_path, backend="vllm", vllm_args="--dtype bfloat16"))
    assert list(own.fingerprint("E", "H").items())[-3:] == [
        ("backend", "vllm"),
        ("server", "vllm"),
        ("vllm_args", "--dtype bfloat16"),
    ]


def test_the_plan_refuses_what_no_arm_could_do_before_any_trains(tmp_path):
    cfg = _config(tmp_path, backend="openai", url="http://127.0.0.1:8000/v1", server="other", repetition_penalty=1.2)
    with pytest.raises(ConfigError) as refused:
        EvalPlan.resolve(cfg)
    with pytest.raises(ConfigError) as expected:
        penalty_fields("other", 1.2, cfg.generate.spare_stop_tokens)
    assert str(refused.value) == str(expected.value) and "\n" not in str(refused.value)
    no_heldout = _config(tmp_path)
    no_heldout.data.train = str(tmp_path / "train.jsonl")
    with pytest.raises(NeftuneError, match=r"^compare needs held-out data: set --eval-data"):
        EvalPlan.resolve(no_heldout)
