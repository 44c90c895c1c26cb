"""The typed settings of ``neftune generate``, ``eval`` and ``judge``, one dataclass per command.

Their flags are generated from these fields (:mod:`neftune.cli_flags`).  A setting an experiment
also has (:class:`~neftune.compare_config.GenerateConfig`, :class:`~neftune.compare_config.JudgeConfig`, ...) is
:func:`~neftune.settings.reused` from there: one type, default, set of values and help for both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from neftune.choices import BadRecordPolicy, DataFormat, GenerateBackend, JudgeBackend, Server
from neftune.compare_config import GenerateConfig, JudgeConfig
from neftune.config import DataConfig, ModelConfig, TrainConfig
from neftune.settings import reused, setting

__all__ = ["Answering", "EvalSet", "EvalSettings", "GenerateSettings", "JudgeSettings"]


def _progress() -> Any:
    """``--no-progress``, as every command that shows progress bars spells it."""
    return reused(
        TrainConfig, "progress", flag={"--no-progress": False}, flag_help={"--no-progress": "no progress bar"}
    )


@dataclass
class EvalSet:
    """The prompts to answer or score."""

    data: str = setting(
        "builtin:skills",
        "eval set: builtin:skills (held-out split), builtin:ifeval, builtin:alpaca_eval, builtin:mt_bench, "
        "Alpaca/AlpacaEval JSON, ShareGPT or messages (first turns)",
        flag="--data",
    )
    format: DataFormat = reused(DataConfig, "format", flag="--format")
    limit: int | None = setting(
        None,
        "use N examples: the first N, or a fixed stratified subset of builtin:ifeval, alpaca_eval, mt_bench",
        flag="--limit",
    )
    on_bad_record: BadRecordPolicy = reused(DataConfig, "on_bad_record", flag="--on-bad-record")


@dataclass
class Answering:
    """How answers are generated (greedy decoding)."""

    max_new_tokens: int | None = reused(GenerateConfig, "max_new_tokens", flag="--max-new-tokens")
    repetition_penalty: float | None = reused(GenerateConfig, "repetition_penalty", flag="--repetition-penalty")
    batch_size: int = reused(GenerateConfig, "batch_size", flag="--batch-size")
    spare_stop_tokens: bool = reused(
        GenerateConfig,
        "spare_stop_tokens",
        flag={"--penalize-stop-tokens": False},
        flag_help={
            "--penalize-stop-tokens": "transformers' own repetition penalty, which also lowers the end-of-turn token "
            "a chat template puts in every prompt (default: spared; vLLM and SGLang need this flag or "
            "--repetition-penalty 1.0)"
        },
    )
    trust_remote_code: bool = reused(ModelConfig, "trust_remote_code", flag="--trust-remote-code")
    progress: bool = _progress()


@dataclass
class GenerateSettings:
    """``neftune generate``: answer an eval set with one model."""

    model: str = setting(
        None, "model directory (a trained output/model), alias or hub id", flag="--model", required=True
    )
    output: str = setting(None, "outputs JSON file to write", flag="--output", required=True)
    name: str | None = setting(
        None, "generator name recorded in the outputs (default: the model directory name)", flag="--name"
    )
    backend: GenerateBackend = reused(
        GenerateConfig,
        "backend",
        flag="--backend",
        help="hf (in-process), vllm (a vLLM server neftune starts and stops), openai (a server at --url) or auto "
        "(vllm where it is installed and can run, else hf)",
    )
    url: str = reused(GenerateConfig, "url", flag="--url")
    server: Server = reused(
        GenerateConfig,
        "server",
        flag="--server",
        help="openai: what serves --url; decides how the prompt and the repetition penalty are sent",
    )
    served_model: str | None = reused(
        GenerateConfig,
        "served_model",
        default=None,
        flag="--served-model",
        help="openai: the model or adapter name on the server (default: --name)",
    )
    vllm_python: str = reused(GenerateConfig, "vllm_python", flag="--vllm-python")
    vllm_args: str = reused(GenerateConfig, "vllm_args", flag="--vllm-args")
    eval_set: EvalSet = field(default_factory=EvalSet)
    answering: Answering = field(default_factory=Answering)


@dataclass
class EvalSettings:
    """``neftune eval``: held-out loss and answer metrics of a model or of its answers."""

    model: str | None = setting(
        None,
        "model to score (held-out loss) and to generate answers with when --outputs is absent",
        flag="--model",
    )
    outputs: str | None = setting(None, "answers from neftune generate, aligned with --data", flag="--outputs")
    output: str | None = setting(None, "write metrics JSON here (default: print)", flag="--output")
    max_length: int = setting(512, "max tokens per example for held-out loss", flag="--max-length")
    eval_set: EvalSet = field(default_factory=EvalSet)
    answering: Answering = field(default_factory=Answering)


@dataclass
class JudgeSettings:
    """``neftune judge``: pairwise judging of two outputs files, both orders of every pair."""

    baseline: str = setting(
        None,
        "outputs JSON of the baseline (A), or builtin:alpaca_eval to judge against its reference answers",
        flag="baseline",
    )
    candidate: str = setting(None, "outputs JSON of the candidate (B)", flag="candidate")
    backend: JudgeBackend = setting("http", "judge backend (default http)", flag="--backend")
    base_url: str = reused(JudgeConfig, "base_url", flag="--base-url")
    model: str = reused(
        JudgeConfig, "model", flag="--judge-model", help="http: model name; local: model directory, alias or hub id"
    )
    api_key_env: str = reused(JudgeConfig, "api_key_env", flag="--api-key-env")
    max_tokens: int | None = reused(JudgeConfig, "max_tokens", flag="--max-tokens")
    temperature: float = reused(JudgeConfig, "temperature", flag="--temperature")
    cache: str = setting(".neftune-judge-cache", "verdict cache directory (a rerun costs nothing)", flag="--cache")
    output: str | None = setting(None, "write the full result (per-pair verdicts) as JSON", flag="--output")
    limit: int | None = setting(None, "judge only the first N pairs", flag="--limit")
    seed: int = setting(0, "bootstrap seed", flag="--seed")
    progress: bool = _progress()
