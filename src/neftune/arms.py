"""One arm of a ``neftune compare`` experiment: what it is evaluated on, and its results entry.

Every arm answers the same prompts (:func:`load_eval_set`: ``generate.prompts``, else the held-out
data) and is scored on the same held-out loss examples, with the noise off, as the experiment's
:class:`~neftune.eval_plan.EvalPlan` says.  :func:`evaluate_arm` turns one trained model into the arm's
:class:`~neftune.results.ArmResult`: held-out loss, the answers (written to the arm's ``outputs.json``)
and their metrics, plus the training curves read back from the arm's directory.  :mod:`neftune.compare`
trains the arms and calls it.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
from pathlib import Path
from typing import Any

from neftune.compare_config import CompareConfig
from neftune.data.prepare import auto_split, heldout_examples
from neftune.eval_plan import EvalPlan
from neftune.metrics import paired_metrics
from neftune.results import ArmResult, EvalScores, TrainStats

log = logging.getLogger("neftune")


@dataclasses.dataclass
class Arm:
    """One trained configuration of the experiment."""

    name: str
    alpha: float
    seed: int
    directory: Path


def engine_for(plan: EvalPlan, arm: Arm, tokenizer: Any) -> Any:
    """The engine that answers for ``arm``: ``None`` (the hf backend, the arm's model in-process) or a
    :class:`neftune.serve.ServerEngine` asking for ``generate.served_model`` with the arm's directory name
    (the openai backend), or asking a vLLM server neftune runs (:mod:`neftune.vllm_server`) for the arm's
    adapter or model."""
    if plan.backend.in_process:
        return None
    return plan.backend.engine(
        arm.directory / "model",
        arm.directory.name,
        tokenizer,
        max_new_tokens=plan.max_new_tokens,
        repetition_penalty=plan.repetition_penalty,
        spare_stop_tokens=plan.spare_stop_tokens,
        workers=plan.batch_size,
    )


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """What every arm is evaluated on: the prompts it answers and the examples of its held-out loss."""

    name: str
    """The prompt set (:attr:`EvalPlan.prompts`)."""
    prompts: list
    """The prompts every arm answers (with their reference answers when present)."""
    heldout: list
    """The examples whose reference answers the held-out loss is measured on (noise off)."""


def load_eval_set(cfg: CompareConfig, plan: EvalPlan) -> EvalSet:
    """Read the prompts (``generate.prompts``, else the held-out data) and the held-out loss's examples.

    When the arms answer the held-out data itself, the loss's examples are the prompts that carry a
    reference answer; with a separate prompt set they are read from the held-out data.
    """
    from neftune.data.formats import load_eval_examples as load

    if not plan.own_prompts and auto_split(cfg.data):
        held = heldout_examples(cfg.data, limit=plan.prompts_limit)
    else:
        held = load(plan.prompts, fmt=cfg.data.format, on_bad_record=cfg.data.on_bad_record, limit=plan.prompts_limit)
    log.info("prompts: %s", held.summary())
    prompts = held.examples
    if plan.loss_on_prompts:
        return EvalSet(plan.prompts, prompts, [e for e in prompts if e.reference is not None])
    if auto_split(cfg.data):
        held = heldout_examples(cfg.data, limit=plan.eval_limit)
    else:
        held = load(plan.eval_data, fmt=cfg.data.format, on_bad_record=cfg.data.on_bad_record, limit=plan.eval_limit)
    log.info("held-out loss: %s", held.summary())
    return EvalSet(plan.prompts, prompts, [e for e in held.examples if e.reference is not None])


def evaluate_arm(
    cfg: CompareConfig,
    plan: EvalPlan,
    arm: Arm,
    model: Any,
    tokenizer: Any,
    evalset: EvalSet,
    stamp: dict[str, Any] | None,
    known_loss: tuple[float, float | None] | None = None,
) -> ArmResult:
    """Held-out loss, answers to the eval prompts and their metrics for one trained arm (noise off).

    ``known_loss`` (loss, perplexity) is the held-out loss training already measured on
    ``evalset.heldout``; it is not measured again.
    """
    from neftune.evaluate import arm_scores, evaluate_outputs, heldout_loss
    from neftune.generate import generate_outputs, write_outputs

    model.eval()
    tokenizer.padding_side = "left"

    # prompt sets without reference answers (builtin:ifeval) have no held-out loss of their own
    loss, perplexity = known_loss or (None, None)
    if evalset.heldout and known_loss is None:
        measured = heldout_loss(
            model, tokenizer, evalset.heldout, max_length=plan.max_length, batch_size=plan.batch_size
        )
        loss, perplexity = measured["loss"], measured["perplexity"]
        log.info("%s: held-out loss %.4f (noise off)", arm.name, loss)
    log.info("%s: generating %d answers", arm.name, len(evalset.prompts))
    engine = engine_for(plan, arm, tokenizer)
    settings: dict[str, Any] = {"progress": cfg.train.progress}
    if engine is None:  # the hf backend's own settings (a server engine holds its own)
        settings.update(
            max_new_tokens=plan.max_new_tokens,
            repetition_penalty=plan.repetition_penalty,
            spare_stop_tokens=plan.spare_stop_tokens,
            batch_size=plan.batch_size,
        )
    records = generate_outputs(
        model,
        tokenizer,
        evalset.prompts,
        generator_name=f"{cfg.model.name}-neftune-{arm.name}",
        dataset_name=evalset.name,
        engine=engine,
        **settings,
    )
    write_outputs(arm.directory / "outputs.json", records)
    metrics = evaluate_outputs(records, evalset.prompts, tokenizer)
    del model
    gc.collect()
    summary = read_summary(arm.directory)

    cut = metrics.get("reached_cap")
    if cut:
        log.info(
            "%s: %.0f%% of the answers reached the %d-token cap", arm.name, 100 * cut["share"], plan.max_new_tokens
        )
    train = TrainStats(
        loss_curve=[list(p) for p in _curve(arm.directory, "loss")],
        heldout_curve=[list(p) for p in _curve(arm.directory, "eval_loss")],
        train_time_s=summary.get("train_time_s"),
        tokens_per_s=summary.get("tokens_per_s"),
    )
    scores = EvalScores(
        heldout_loss=loss,
        perplexity=perplexity,
        scores=arm_scores(metrics),  # the metric registry's numbers, under its keys
        length_chars=_stats(metrics["lengths"].get("chars")),
        length_tokens=_stats(metrics["lengths"].get("tokens")),
        # share of answers cut off at the cap: their lengths are censored (neftune.report.censoring)
        reached_cap=cut["share"] if cut else None,
        max_new_tokens=plan.max_new_tokens,
        per_example=_per_example(metrics["per_example"]),
        ifeval=metrics.get("ifeval"),
    )
    return ArmResult(arm.name, arm.alpha, arm.seed, train, scores, judge=None, fingerprint=stamp)


def _curve(directory: Path, key: str) -> list[tuple[int, float]]:
    """(step, value) pairs of ``key`` from the arm's metrics.jsonl (survives resumes)."""
    points: dict[int, float] = {}
    path = directory / "metrics.jsonl"
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut off by a kill; the rest of the file is intact
            if key in row:
                points[int(row["step"])] = float(row[key])
    return sorted(points.items())


def read_summary(directory: Path) -> dict[str, Any]:
    """The arm's ``train_summary.json`` (empty when training has not written it)."""
    path = directory / "train_summary.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _stats(block: dict | None) -> dict[str, float] | None:
    if not block:
        return None
    return {k: block[k] for k in ("mean", "median", "p90") if k in block}


def _per_example(values: dict[str, Any]) -> dict[str, list[Any] | None]:
    """The per-example lists an arm keeps for paired tests: every paired metric's, and the token-cap flags."""
    kept = {
        "correct": _as_ints(values.get("correct")),
        "length_chars": values["length_chars"],
        "rouge_l": values.get("rouge_l"),
        "ifeval_prompt_strict": values.get("ifeval_prompt_strict"),
        "ifeval_prompt_loose": values.get("ifeval_prompt_loose"),
        "reached_cap": values.get("reached_cap"),
    }
    for spec in paired_metrics():  # a metric registered since this layout was fixed goes last
        if spec.per_example is not None and spec.per_example not in kept:
            kept[spec.per_example] = values.get(spec.per_example)
    return kept


def _as_ints(flags: list | None) -> list | None:
    return None if flags is None else [None if f is None else int(bool(f)) for f in flags]
