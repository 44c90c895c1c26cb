"""One arm of a ``neftune compare`` experiment: what it is evaluated on, and its results entry.

Every arm answers the same prompts (:func:`load_eval_examples`: ``generate.prompts``, else the held-out
data) and is scored on the same held-out loss examples (:func:`load_heldout_examples`), with the noise
off.  :func:`evaluate_arm` turns one trained model into the arm's entry of ``results.json``: held-out
loss, the answers (written to the arm's ``outputs.json``) and their metrics, plus the training curves
read back from the arm's directory.  :mod:`neftune.compare` trains the arms and calls it.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
from pathlib import Path
from typing import Any

from neftune.config import CompareConfig
from neftune.data.prepare import auto_split, heldout_examples, heldout_name
from neftune.data.presets import resolve_eval_spec
from neftune.errors import NeftuneError
from neftune.metrics import paired_metrics

log = logging.getLogger("neftune")


@dataclasses.dataclass
class Arm:
    """One trained configuration of the experiment."""

    name: str
    alpha: float
    seed: int
    directory: Path


def eval_spec(cfg: CompareConfig) -> str:
    """The held-out data (loss with the noise off): ``data.eval``, the training set's held-out split, or
    the examples ``data.eval_size`` splits off the training data (named ``"SPEC (held out: ...)"``)."""
    if auto_split(cfg.data):
        return heldout_name(cfg.data)
    spec = resolve_eval_spec(cfg.data.train, cfg.data.eval)
    if spec is None:
        raise NeftuneError(
            "compare needs held-out data: set --eval-data (or data.eval), or --eval-size to split it off the training set"
        )
    return spec


def prompts_spec(cfg: CompareConfig) -> str:
    """The prompts every arm answers: ``generate.prompts``, else the held-out data."""
    return cfg.generate.prompts or eval_spec(cfg)


def prompts_limit(cfg: CompareConfig) -> int | None:
    """How many prompts are answered: ``generate.limit``, else ``data.eval_limit``."""
    return cfg.generate.limit if cfg.generate.limit is not None else cfg.data.eval_limit


def default_max_new_tokens(cfg: CompareConfig) -> int:
    """``generate.max_new_tokens``, else the prompt set's default (:mod:`neftune.data.presets`)."""
    from neftune.generate import default_max_new_tokens as for_data

    return for_data(prompts_spec(cfg), cfg.generate.max_new_tokens)


def default_repetition_penalty(cfg: CompareConfig) -> float:
    """``generate.repetition_penalty``, else the prompt set's default (:mod:`neftune.data.presets`)."""
    from neftune.generate import default_repetition_penalty as for_data

    return for_data(prompts_spec(cfg), cfg.generate.repetition_penalty)


def backend_settings(cfg: CompareConfig) -> dict[str, Any]:
    """What the generate fingerprint records of the backend: its name and, for a server, how it is reached.

    Raises :class:`ConfigError` before any arm trains when the server cannot honour the repetition
    penalty (:func:`neftune.serve.penalty_fields`).
    """
    gen = cfg.generate
    if gen.backend == "hf":
        return {"backend": gen.backend}
    from neftune.http_api import Endpoint
    from neftune.serve import penalty_fields

    penalty_fields(
        "vllm" if gen.backend == "vllm" else gen.server, default_repetition_penalty(cfg), gen.spare_stop_tokens
    )
    if gen.backend == "vllm":  # a server of our own: where it listens changes from run to run, its flags do not
        return {"backend": gen.backend, "server": "vllm", "vllm_args": gen.vllm_args}
    return {
        "backend": gen.backend,
        "url": Endpoint.public(gen.url),
        "server": gen.server,
        "served_model": gen.served_model,
    }


def engine_for(cfg: CompareConfig, arm: Arm, tokenizer: Any) -> Any:
    """The engine that answers for ``arm``: ``None`` (the hf backend, the arm's model in-process) or a
    :class:`neftune.serve.ServerEngine` asking for ``generate.served_model`` with the arm's directory name
    (the openai backend), or asking a vLLM server neftune runs (:mod:`neftune.vllm_server`) for the arm's
    adapter or model."""
    gen = cfg.generate
    if gen.backend not in ("openai", "vllm"):
        return None
    from neftune.serve import ServerEngine

    url, name, server, adapter = gen.url, gen.served_model.replace("{arm}", arm.directory.name), gen.server, None
    if gen.backend == "vllm":
        from neftune.vllm_server import VLLMSettings, serve_model

        where = VLLMSettings(gen.vllm_python, gen.vllm_args, gen.vllm_start_timeout, Path(cfg.compare.output))
        url, name, adapter = serve_model(arm.directory / "model", where, arm.directory.name)
        server = "vllm"
    elif gen.server == "vllm":  # a server the user runs: a LoRA arm's adapter loaded into it
        adapter = arm.directory / "model"
    engine = ServerEngine(
        url,
        name,
        tokenizer,
        server=server,
        max_new_tokens=default_max_new_tokens(cfg),
        repetition_penalty=default_repetition_penalty(cfg),
        spare_stop_tokens=gen.spare_stop_tokens,
        workers=gen.batch_size,  # the server batches what is in flight
    )
    engine.ensure_served(adapter)
    return engine


def load_eval_examples(cfg: CompareConfig) -> tuple[str, list]:
    """The prompts every arm answers (and their reference answers when present)."""
    from neftune.data.formats import load_eval_examples as load

    spec = prompts_spec(cfg)
    if cfg.generate.prompts is None and auto_split(cfg.data):
        held = heldout_examples(cfg.data, limit=prompts_limit(cfg))
    else:
        held = load(spec, fmt=cfg.data.format, on_bad_record=cfg.data.on_bad_record, limit=prompts_limit(cfg))
    log.info("prompts: %s", held.summary())
    return spec, held.examples


def load_heldout_examples(cfg: CompareConfig, prompts: list) -> list:
    """The examples whose answers the held-out loss is measured on (noise off).

    When the arms answer the held-out data itself these are the prompts that carry a reference
    answer; with a separate prompt set (``generate.prompts``) they are read from the held-out data.
    """
    from neftune.data.formats import load_eval_examples as load

    spec = eval_spec(cfg)
    if spec == prompts_spec(cfg) and prompts_limit(cfg) == cfg.data.eval_limit:
        return [e for e in prompts if e.reference is not None]
    if auto_split(cfg.data):
        held = heldout_examples(cfg.data, limit=cfg.data.eval_limit)
    else:
        held = load(spec, fmt=cfg.data.format, on_bad_record=cfg.data.on_bad_record, limit=cfg.data.eval_limit)
    log.info("held-out loss: %s", held.summary())
    return [e for e in held.examples if e.reference is not None]


def evaluate_arm(
    cfg: CompareConfig,
    arm: Arm,
    model: Any,
    tokenizer: Any,
    eval_examples: list,
    eval_name: str,
    stamp: dict[str, Any] | None,
    heldout: list | None = None,
    known_loss: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Held-out loss, answers to the eval prompts and their metrics for one trained arm (noise off).

    ``known_loss`` (``{"loss", "perplexity"}``) is the held-out loss training already measured on
    ``heldout``; it is not measured again.
    """
    from neftune.evaluate import arm_scores, evaluate_outputs, heldout_loss
    from neftune.generate import generate_outputs, write_outputs

    model.eval()
    tokenizer.padding_side = "left"

    # prompt sets without reference answers (builtin:ifeval) have no held-out loss of their own
    scored = heldout if heldout is not None else [e for e in eval_examples if e.reference is not None]
    loss: dict[str, Any] = known_loss or {"loss": None, "perplexity": None}
    if scored and known_loss is None:
        loss = heldout_loss(
            model, tokenizer, scored, max_length=cfg.data.max_length, batch_size=cfg.generate.batch_size
        )
        log.info("%s: held-out loss %.4f (noise off)", arm.name, loss["loss"])
    log.info("%s: generating %d answers", arm.name, len(eval_examples))
    cap = default_max_new_tokens(cfg)
    engine = engine_for(cfg, arm, tokenizer)
    settings: dict[str, Any] = {"progress": cfg.train.progress}
    if engine is None:  # the hf backend's own settings (a server engine holds its own)
        settings.update(
            max_new_tokens=cap,
            repetition_penalty=default_repetition_penalty(cfg),
            spare_stop_tokens=cfg.generate.spare_stop_tokens,
            batch_size=cfg.generate.batch_size,
        )
    records = generate_outputs(
        model,
        tokenizer,
        eval_examples,
        generator_name=f"{cfg.model.name}-neftune-{arm.name}",
        dataset_name=eval_name,
        engine=engine,
        **settings,
    )
    write_outputs(arm.directory / "outputs.json", records)
    metrics = evaluate_outputs(records, eval_examples, tokenizer)
    del model
    gc.collect()
    summary = read_summary(arm.directory)

    cut = metrics.get("reached_cap")
    if cut:
        log.info("%s: %.0f%% of the answers reached the %d-token cap", arm.name, 100 * cut["share"], cap)
    entry = {
        "name": arm.name,
        "alpha": arm.alpha,
        "seed": arm.seed,
        "train": {
            "loss_curve": [list(p) for p in _curve(arm.directory, "loss")],
            "heldout_curve": [list(p) for p in _curve(arm.directory, "eval_loss")],
            "train_time_s": summary.get("train_time_s"),
            "tokens_per_s": summary.get("tokens_per_s"),
        },
        "eval": {
            "heldout_loss": loss["loss"],
            "perplexity": loss["perplexity"],
            **arm_scores(metrics),  # the metric registry's numbers, under its keys
            "length_chars": _stats(metrics["lengths"].get("chars")),
            "length_tokens": _stats(metrics["lengths"].get("tokens")),
            # share of answers cut off at the cap: their lengths are censored (neftune.report.censoring)
            "reached_cap": cut["share"] if cut else None,
            "max_new_tokens": cap,
            "per_example": _per_example(metrics["per_example"]),
            "ifeval": metrics.get("ifeval"),
        },
        "judge": None,
        "fingerprint": stamp,
    }
    return entry


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


def _stats(block: dict | None) -> dict[str, Any] | None:
    if not block:
        return None
    return {k: block[k] for k in ("mean", "median", "p90") if k in block}


def _per_example(values: dict[str, Any]) -> dict[str, Any]:
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
