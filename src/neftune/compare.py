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
from neftune.arms import (
    Arm,
    backend_settings,
    default_max_new_tokens,
    default_repetition_penalty,
    eval_spec,
    evaluate_arm,
    load_eval_examples,
    load_heldout_examples,
    prompts_limit,
    prompts_spec,
    read_summary,
)
from neftune.config import CompareConfig, write_config
from neftune.data.presets import defaults_for, resolve_eval_spec
from neftune.io import atomic_write_text, check_output_dir
from neftune.resources import evaluation_memory, told_out_of_memory
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
    cfg: CompareConfig,
    arm: Arm,
    eval_examples: list,
    eval_name: str,
    stamp: dict[str, Any] | None = None,
    heldout: list | None = None,
) -> dict[str, Any]:
    """Train (or resume) one arm, then evaluate it with the noise off; return its results entry.

    ``stamp`` is the arm's fingerprint (:func:`arm_fingerprint`), written before training starts;
    ``heldout`` the examples of the held-out loss (default: the prompts that carry a reference answer).
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
    known = None if measured is None else {"loss": measured, "perplexity": result.metrics.get("heldout_perplexity")}
    with told_out_of_memory(*evaluation_memory(cfg)):
        entry = evaluate_arm(cfg, arm, result.model, result.tokenizer, eval_examples, eval_name, stamp, heldout, known)
    entry["wall_time_s"] = time.perf_counter() - started
    atomic_write_text(arm.directory / ARM_FILE, json.dumps(entry, indent=2))
    return entry


def regenerate_arm(
    cfg: CompareConfig, arm: Arm, eval_examples: list, eval_name: str, stamp: dict, heldout: list | None = None
) -> dict[str, Any]:
    """Answer and score the eval prompts again with an arm's trained model (its training is reused)."""
    from neftune.models import load_model_and_tokenizer

    started = time.perf_counter()
    previous = json.loads((arm.directory / ARM_FILE).read_text(encoding="utf-8"))
    model, tokenizer = load_model_and_tokenizer(
        str(arm.directory / "model"), trust_remote_code=cfg.model.trust_remote_code, for_training=False
    )
    with told_out_of_memory(*evaluation_memory(cfg)):
        entry = evaluate_arm(cfg, arm, model, tokenizer, eval_examples, eval_name, stamp, heldout)
    train_time = float((previous.get("train") or {}).get("train_time_s") or 0.0)
    entry["wall_time_s"] = time.perf_counter() - started + train_time
    atomic_write_text(arm.directory / fingerprint.FILE, json.dumps(stamp, indent=2, default=str))
    atomic_write_text(arm.directory / ARM_FILE, json.dumps(entry, indent=2))
    return entry


#: What results.json keeps of each arm's judgement (the full result is in the arm's judge.json).
JUDGE_SUMMARY_KEYS = (
    "win_rate",
    "ci",
    "lc_win_rate",
    "lc_ci",
    "lc_estimable",
    "lc_reason",
    "consistency",
    "n",
    "n_failed",
    "n_ties",
    "n_identical",
    "score_basis",
    "verdict_win_rate",
    "mean_probability",
    "probability_ci",
    "n_probability",
)


def judge_arms(cfg: CompareConfig, arms: list[Arm], entries: dict[str, dict]) -> None:
    """Judge every NEFTune arm against the baseline of its seed; fill ``entry['judge']``."""
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
        verdict = result.to_dict()
        summary = {k: verdict.get(k) for k in JUDGE_SUMMARY_KEYS}
        entries[arm.name]["judge"] = {"vs": base.name, "backend": cfg.judge.backend, **summary}
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
    eval_name, eval_examples = load_eval_examples(cfg)
    heldout = load_heldout_examples(cfg, eval_examples)
    primary = declare_primary(
        cfg.compare.primary,
        cfg.judge.backend,
        eval_name,
        defaults_for(eval_name).primary_metric,
        any(e.reference for e in eval_examples),
    )
    arms = plan_arms(cfg)
    shared = fingerprint.shared_stamp(cfg.model.name, cfg.data, eval_examples, versions())
    generation = {
        "eval": shared["eval"],
        "eval_data": eval_spec(cfg),
        "eval_limit": cfg.data.eval_limit,
        "prompts": prompts_spec(cfg),
        "prompts_limit": prompts_limit(cfg),
        "heldout": fingerprint.examples_digest(heldout),
        "max_new_tokens": default_max_new_tokens(cfg),
        "repetition_penalty": default_repetition_penalty(cfg),
        "spare_stop_tokens": cfg.generate.spare_stop_tokens,
        "batch_size": cfg.generate.batch_size,
        "max_length": cfg.data.max_length,
        **backend_settings(cfg),
    }
    stamps = {
        arm.name: fingerprint.arm_fingerprint(cfg.train_config(arm.alpha, arm.seed), shared, generation) for arm in arms
    }
    states = {
        arm.name: fingerprint.arm_state(arm.name, arm.directory, stamps[arm.name], cfg.compare.overwrite, ARM_FILE)
        for arm in arms
    }

    entries: dict[str, dict] = {}
    with vllm_session():  # generate.backend=vllm: one server for every arm, stopped when the last has answered
        reused_time = _run_arms(cfg, arms, states, stamps, entries, eval_examples, eval_name, heldout)
    judge_arms(cfg, arms, entries)

    baseline = read_summary(arms[0].directory)  # model description and resolved settings of the run
    recorded = ((entries[arms[0].name].get("fingerprint") or {}).get("train") or {}).get("settings") or {}
    results = {
        "title": f"NEFTune on {cfg.model.name}: alpha in {{0, {', '.join(f'{a:g}' for a in cfg.compare.alphas)}}}",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_time_s": time.perf_counter() - started + reused_time,
        "model": {"spec": cfg.model.name, **baseline.get("model", {})},
        "data": {
            "train": recorded.get("data.train", cfg.data.train),
            "eval": eval_name,
            "heldout": eval_spec(cfg),
            "n_train": baseline.get("train_examples"),
            "n_eval": len(eval_examples),
            "n_heldout": len(heldout),
            "primary_metric": defaults_for(eval_name).primary_metric,
        },
        "primary": primary,
        "seeds": list(cfg.compare.seeds),
        "versions": versions(),
        "settings": fingerprint.recorded_settings(entries[arms[0].name], baseline, cfg.judge.backend),
        "baseline": arms[0].name,
        "arms": [entries[a.name] for a in arms if a.name in entries],
        "examples": _examples(arms, entries),
    }
    return write_report(results, out)


def _run_arms(
    cfg: CompareConfig,
    arms: list[Arm],
    states: dict[str, str],
    stamps: dict[str, dict[str, Any]],
    entries: dict[str, dict],
    eval_examples: list,
    eval_name: str,
    heldout: list,
) -> float:
    """Train, regenerate or reuse each arm as ``states`` says, filling ``entries``; the wall time of reused arms."""
    reused_time = 0.0
    for index, arm in enumerate(arms, 1):
        done = arm.directory / ARM_FILE
        if states[arm.name] == "reuse":
            log.info("[%d/%d] %s: already finished, reusing %s", index, len(arms), arm.name, done)
            entries[arm.name] = json.loads(done.read_text(encoding="utf-8"))
            reused_time += float(entries[arm.name].get("wall_time_s") or 0.0)
            continue
        if states[arm.name] == "regenerate":
            entries[arm.name] = regenerate_arm(cfg, arm, eval_examples, eval_name, stamps[arm.name], heldout)
            continue
        log.info("[%d/%d] %s: training (alpha=%g, seed=%d)", index, len(arms), arm.name, arm.alpha, arm.seed)
        entries[arm.name] = run_arm(cfg, arm, eval_examples, eval_name, stamps[arm.name], heldout)
    return reused_time


def _examples(arms: list[Arm], entries: dict[str, dict], n: int = 6) -> list[dict[str, Any]]:
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
        {
            "instruction": first[i]["instruction"],
            "reference": first[i].get("reference"),
            "outputs": {name: recs[i]["output"] for name, recs in outputs.items() if i < len(recs)},
        }
        for i in range(min(n, len(first)))
    ]
