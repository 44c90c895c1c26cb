"""``neftune compare``: does NEFTune help on my model and data?  One command, one report.

    neftune compare                                   # embedded default: SmolLM2-135M, builtin:skills
    neftune compare --model DIR --data alpaca.json --alphas 5,10,15 --seeds 0,1

For every seed it trains a baseline (alpha = 0) and one arm per alpha on identical data, data order
and initialisation; then, with noise off, it measures held-out loss, generates answers to the
held-out prompts (greedy, with the eval data's repetition penalty and answer length, see
:mod:`neftune.data.presets`), computes the metrics of :mod:`neftune.evaluate`, and judges each arm
against its seed's baseline in both orders.  ``report.html`` / ``report.md`` /
``results.json`` and plots land in the experiment directory.

Interrupted, it picks up where it stopped: an arm whose ``arm.json`` exists is not retrained, a
half-trained arm resumes from its last checkpoint, and judge verdicts are cached.  Each arm records
what determines it (:mod:`neftune.fingerprint`): a rerun whose model, data or training settings differ
stops with a one-line error naming the first difference (``--overwrite`` retrains exactly those
arms), and a change of generation or scoring settings regenerates only the answers.  The report's
run details are read from the arms' own records.

The verdict rests on one primary metric declared before the run
(:func:`neftune.metrics.declare_primary`).
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from neftune import fingerprint
from neftune.arms import Arm, EvalSet, evaluate_arm, load_eval_set, read_summary
from neftune.compare_config import CompareConfig
from neftune.config import write_config
from neftune.data.presets import defaults_for, resolve_eval_spec
from neftune.eval_plan import EvalPlan
from neftune.io import atomic_write_text, check_output_dir
from neftune.resources import evaluation_memory, told_out_of_memory
from neftune.results import ArmResult, Example, ExperimentResult, JudgeSummary, Primary, RunData
from neftune.vllm_server import vllm_session

log = logging.getLogger("neftune")

ARM_FILE = "arm.json"


def plan_arms(cfg: CompareConfig) -> list[Arm]:
    """Baseline first, then each alpha, for every seed; names are stable across reruns."""
    arms = []
    out = Path(cfg.compare.output)
    for seed in cfg.compare.seeds:
        for alpha in [0.0, *cfg.compare.alphas]:
            name = f"alpha={alpha:g}" + (f",seed={seed}" if len(cfg.compare.seeds) > 1 else "")
            arms.append(Arm(name, float(alpha), seed, out / "arms" / name.replace("=", "").replace(",", "-")))
    return arms


def run_arm(
    cfg: CompareConfig, plan: EvalPlan, arm: Arm, evalset: EvalSet, stamp: dict[str, Any] | None = None
) -> ArmResult:
    """Train (or resume) one arm, then evaluate it with the noise off as ``plan`` says; return its result.

    ``stamp`` is the arm's fingerprint (:func:`neftune.fingerprint.arm_fingerprint`), written before training
    starts.
    """
    from neftune.train import run_training

    started = time.perf_counter()
    train_cfg = cfg.train_config(arm.alpha, arm.seed, output=str(arm.directory))
    # a half-finished arm continues from its last checkpoint
    train_cfg.train.resume = (arm.directory / "checkpoints").is_dir()
    if stamp is not None:
        arm.directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(arm.directory / fingerprint.FILE, json.dumps(stamp, indent=2, default=str))
    result = run_training(train_cfg, keep_model=True)
    # training ends by measuring the held-out loss on these same examples, the same way (noise off)
    measured = result.metrics.get("heldout_loss")
    known = None if measured is None else (measured, result.metrics.get("heldout_perplexity"))
    with told_out_of_memory(*evaluation_memory(plan)):
        entry = evaluate_arm(cfg, plan, arm, result.model, result.tokenizer, evalset, stamp, known)
    entry.wall_time_s = time.perf_counter() - started
    atomic_write_text(arm.directory / ARM_FILE, json.dumps(entry.to_json(), indent=2))
    return entry


def regenerate_arm(cfg: CompareConfig, plan: EvalPlan, arm: Arm, evalset: EvalSet, stamp: dict) -> ArmResult:
    """Answer and score the eval prompts again with an arm's trained model (its training is reused)."""
    from neftune.models import load_model_and_tokenizer

    started = time.perf_counter()
    previous = read_arm(arm)
    model, tokenizer = load_model_and_tokenizer(
        str(arm.directory / "model"), trust_remote_code=cfg.model.trust_remote_code, for_training=False
    )
    with told_out_of_memory(*evaluation_memory(plan)):
        entry = evaluate_arm(cfg, plan, arm, model, tokenizer, evalset, stamp)
    train_time = float((previous.train.train_time_s if previous.train else None) or 0.0)
    entry.wall_time_s = time.perf_counter() - started + train_time
    atomic_write_text(arm.directory / fingerprint.FILE, json.dumps(stamp, indent=2, default=str))
    atomic_write_text(arm.directory / ARM_FILE, json.dumps(entry.to_json(), indent=2))
    return entry


def read_arm(arm: Arm) -> ArmResult:
    """The result a finished arm recorded in its ``arm.json``."""
    return ArmResult.from_json(json.loads((arm.directory / ARM_FILE).read_text(encoding="utf-8")))


def judge_arms(cfg: CompareConfig, arms: list[Arm], entries: dict[str, ArmResult]) -> None:
    """Judge every NEFTune arm against the baseline of its seed; fill in each one's :attr:`ArmResult.judge`."""
    from neftune.judge import build_judge, judge_pairs
    from neftune.outputs import read_outputs

    pairs = [(a, next(b for b in arms if b.seed == a.seed and b.alpha == 0.0)) for a in arms if a.alpha > 0]
    pairs = [(a, b) for a, b in pairs if a.name in entries and b.name in entries]
    if not pairs:
        return
    judge = build_judge(
        cfg.judge.backend,
        model=cfg.judge.model or cfg.model.name,
        base_url=cfg.judge.base_url,
        api_key_env=cfg.judge.api_key_env,
        trust_remote_code=cfg.model.trust_remote_code,
        max_tokens=cfg.judge.max_tokens,
        temperature=cfg.judge.temperature,
    )
    if judge is None:
        return
    cache = Path(cfg.compare.output) / "judge-cache"
    for arm, base in pairs:
        records_a = read_outputs(base.directory / "outputs.json")
        records_b = read_outputs(arm.directory / "outputs.json")
        if cfg.judge.max_pairs:
            records_a, records_b = records_a[: cfg.judge.max_pairs], records_b[: cfg.judge.max_pairs]
        log.info(
            "judging %s against %s (%d pairs, both orders) with the %s judge",
            arm.name,
            base.name,
            len(records_a),
            cfg.judge.backend,
        )
        result = judge_pairs(records_a, records_b, judge, cache_dir=cache, seed=arm.seed, progress=cfg.train.progress)
        entries[arm.name].judge = JudgeSummary.from_verdict(base.name, cfg.judge.backend, result.to_dict())
        result.save(arm.directory / "judge.json")
        log.info("%s", result.summary())


def versions() -> dict[str, str]:
    """Versions of the software that produced a result."""
    from neftune.machine import versions as installed_versions

    return installed_versions(("neftune", "torch", "transformers", "peft", "accelerate"))


DEFAULT_HOLDOUT_SHARE = 0.1
"""The share of a custom training set ``compare`` holds out when no held-out data is named."""


def hold_out_by_default(cfg: CompareConfig) -> None:
    """Give ``cfg`` an automatic held-out split when it names no held-out data.

    A training file alone is enough for ``compare``: 10% of its examples (a streamed set: the first
    ``data.eval_limit``) are held out, the same ones for every arm and seed, and never trained on.
    """
    data = cfg.data
    if data.eval_size is not None or resolve_eval_spec(data.train, data.eval) is not None:
        return
    data.eval_size = float(data.eval_limit or 64) if data.streaming else DEFAULT_HOLDOUT_SHARE
    log.info("compare: no held-out data named; holding out data.eval_size=%g of %s", data.eval_size, data.train)


def run_compare(cfg: CompareConfig) -> dict[str, Path]:
    """Run the whole experiment described by ``cfg``; return the report's file paths."""
    from neftune.metrics import declare_primary
    from neftune.report import write_report

    cfg.validate()
    hold_out_by_default(cfg)
    started = time.perf_counter()
    out = Path(cfg.compare.output)
    check_output_dir(out)
    write_config(cfg, out / "config.yaml")
    plan = EvalPlan.resolve(cfg)  # every arm is evaluated the same way; a setting no server honours stops here
    evalset = load_eval_set(cfg, plan)
    primary = declare_primary(
        cfg.compare.primary,
        cfg.judge.backend,
        evalset.name,
        defaults_for(evalset.name).primary_metric,
        any(e.reference for e in evalset.prompts),
    )
    arms = plan_arms(cfg)
    shared = fingerprint.shared_stamp(cfg.model.name, cfg.data, evalset.prompts, versions())
    generation = plan.fingerprint(shared["eval"], fingerprint.examples_digest(evalset.heldout))
    stamps = {
        arm.name: fingerprint.arm_fingerprint(cfg.train_config(arm.alpha, arm.seed), shared, generation) for arm in arms
    }
    states = {
        arm.name: fingerprint.arm_state(arm.name, arm.directory, stamps[arm.name], cfg.compare.overwrite, ARM_FILE)
        for arm in arms
    }

    entries: dict[str, ArmResult] = {}
    with vllm_session():  # generate.backend=vllm: one server for every arm, stopped when the last has answered
        reused_time = _run_arms(cfg, plan, arms, states, stamps, entries, evalset)
    judge_arms(cfg, arms, entries)

    baseline = read_summary(arms[0].directory)  # model description and resolved settings of the run
    stamp = entries[arms[0].name].fingerprint
    recorded = ((stamp or {}).get("train") or {}).get("settings") or {}
    results = ExperimentResult(
        title=f"NEFTune on {cfg.model.name}: alpha in {{0, {', '.join(f'{a:g}' for a in cfg.compare.alphas)}}}",
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        wall_time_s=time.perf_counter() - started + reused_time,
        model={"spec": cfg.model.name, **baseline.get("model", {})},
        data=RunData(
            train=recorded.get("data.train", cfg.data.train),
            eval=evalset.name,
            heldout=plan.eval_data,
            n_train=baseline.get("train_examples"),
            n_eval=len(evalset.prompts),
            n_heldout=len(evalset.heldout),
            primary_metric=defaults_for(evalset.name).primary_metric,
        ),
        primary=Primary.from_json(primary),
        seeds=list(cfg.compare.seeds),
        versions=versions(),
        settings=fingerprint.recorded_settings(stamp, baseline, cfg.judge.backend),
        baseline=arms[0].name,
        arms=[entries[a.name] for a in arms if a.name in entries],
        examples=_examples(arms, entries),
    )
    return write_report(results, out)


def _run_arms(
    cfg: CompareConfig,
    plan: EvalPlan,
    arms: list[Arm],
    states: dict[str, str],
    stamps: dict[str, dict[str, Any]],
    entries: dict[str, ArmResult],
    evalset: EvalSet,
) -> float:
    """Train, regenerate or reuse each arm as ``states`` says, filling ``entries``; the wall time of reused arms."""
    reused_time = 0.0
    for index, arm in enumerate(arms, 1):
        done = arm.directory / ARM_FILE
        if states[arm.name] == "reuse":
            log.info("[%d/%d] %s: already finished, reusing %s", index, len(arms), arm.name, done)
            entries[arm.name] = read_arm(arm)
            reused_time += float(entries[arm.name].wall_time_s or 0.0)
            continue
        if states[arm.name] == "regenerate":
            entries[arm.name] = regenerate_arm(cfg, plan, arm, evalset, stamps[arm.name])
            continue
        log.info("[%d/%d] %s: training (alpha=%g, seed=%d)", index, len(arms), arm.name, arm.alpha, arm.seed)
        entries[arm.name] = run_arm(cfg, plan, arm, evalset, stamps[arm.name])
    return reused_time


def _examples(arms: list[Arm], entries: dict[str, ArmResult], n: int = 6) -> list[Example]:
    """The first ``n`` eval prompts with every arm's answer side by side (not hand-picked)."""
    from neftune.outputs import read_outputs

    outputs = {
        a.name: read_outputs(a.directory / "outputs.json")
        for a in arms
        if a.name in entries and (a.directory / "outputs.json").exists()
    }
    if not outputs:
        return []
    first = next(iter(outputs.values()))
    return [
        Example(
            instruction=first[i]["instruction"],
            reference=first[i].get("reference"),
            outputs={name: recs[i]["output"] for name, recs in outputs.items() if i < len(recs)},
        )
        for i in range(min(n, len(first)))
    ]
