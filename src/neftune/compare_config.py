"""The settings of ``neftune compare``: the training setup of :mod:`neftune.config`, plus how every arm
is answered (``generate``), judged (``judge``) and laid out as an experiment (``compare``).

    cfg = load_config(CompareConfig, recipe="demo", overrides=["compare.seeds=0,1,2"])

Validation follows :mod:`neftune.config`: one line naming the offending field.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar

from neftune.choices import GenerateBackend, JudgeSetting, Server
from neftune.config import Config, check_choice, check_positive
from neftune.errors import ConfigError
from neftune.metrics import primary_choices, spoken_list
from neftune.settings import setting

__all__ = ["CompareConfig", "CompareSection", "GenerateConfig", "JudgeConfig"]


@dataclass
class GenerateConfig:
    prompts: str | None = setting(
        None,
        "prompt set every arm answers, e.g. builtin:ifeval (default: the held-out data, data.eval); the held-out "
        "loss is still measured on the held-out data",
        flag="--prompts",
    )
    limit: int | None = setting(
        None,
        "answer at most this many prompts (default: data.eval_limit); a built-in prompt set keeps a fixed "
        "stratified subset",
        flag="--prompts-limit",
    )
    max_new_tokens: int | None = setting(
        None,
        "tokens to generate per answer (default: the eval data's; 64 for builtin:skills, 256 for files)",
        flag="--max-new-tokens",
    )
    repetition_penalty: float | None = setting(
        None,
        "greedy decoding penalty (default: the eval data's; the paper's 1.2, or 1.0 for builtin:skills, whose "
        "exact answers copy words and digits from the prompt, which the penalty punishes)",
    )
    spare_stop_tokens: bool = setting(
        True,
        "the repetition penalty leaves the stop tokens alone: a chat template puts its end-of-turn token in every "
        "prompt, where transformers' penalty would keep answers from ending (false: transformers' own penalty, "
        "which vLLM and SGLang share)",
    )
    batch_size: int = setting(
        16, "prompts per generation batch (sorted by length); with a server backend, the requests in flight"
    )
    backend: GenerateBackend = setting(
        "hf",
        "hf (transformers' generate, in-process), vllm (a vLLM server neftune starts, every LoRA arm an adapter "
        "of one engine), openai (an OpenAI-compatible server at generate.url: vLLM, SGLang, llama.cpp) or auto "
        "(vllm where make vllm's engine is found and can run, else hf); the prompt is always rendered by the "
        "model's tokenizer",
    )
    url: str = setting("", "openai: base URL of the server, e.g. http://127.0.0.1:8000/v1")
    server: Server = setting(
        "other",
        "openai: what serves generate.url: vllm, sglang, llama.cpp or other; decides how the prompt and the "
        "repetition penalty are sent (other: only repetition_penalty=1.0)",
    )
    served_model: str = setting(
        "{arm}",
        "openai: the model or LoRA adapter name each arm is served under; {arm} is the arm's directory name "
        "(alpha0, alpha5, alpha5-seed1, ...)",
    )
    vllm_python: str = setting("", "vllm: the Python that has vLLM (default: make vllm's venv, then this one)")
    vllm_args: str = setting("", "vllm: more arguments for vLLM's server, e.g. '--dtype bfloat16'")
    vllm_start_timeout: float = setting(900.0, "vllm: seconds to wait for the server to load the model")


@dataclass
class JudgeConfig:
    backend: JudgeSetting = setting(
        "none",
        "none (objective metrics only), local (a transformers model scores A vs B), http (an OpenAI-compatible "
        "server), or length (prefers the longer answer; for tests)",
        flag="--judge",
    )
    model: str = setting(
        "", "local: judge model (default: the experiment's base model); http: the model name", flag="--judge-model"
    )
    base_url: str = setting(
        "", "http: base URL of an OpenAI-compatible API, e.g. https://api.openai.com/v1", flag="--judge-url"
    )
    api_key_env: str = setting("OPENAI_API_KEY", "http: name of the environment variable holding the API key")
    max_tokens: int | None = setting(None, "http: longest judge reply (default 16; a reasoning model needs ~2048)")
    temperature: float = setting(0.0, "http: judge sampling temperature (at 0 an unreadable reply is not re-asked)")
    max_pairs: int | None = setting(None, "judge at most this many eval examples per arm")


@dataclass
class CompareSection:
    alphas: list[float] = setting(
        [5.0, 10.0], "NEFTune arms, comma-separated; the alpha=0 baseline is always trained", flag="--alphas"
    )
    seeds: list[int] = setting(
        [0, 1],
        "training seeds, comma-separated; one baseline and one arm per alpha for each seed (two or more measure "
        "how much the training seed alone moves a result)",
        flag="--seeds",
    )
    output: str = setting("runs/compare", "experiment directory (arms, outputs, report)", flag="--output")
    primary: str | None = setting(
        None,
        f"the metric the verdict rests on, declared before the run: {spoken_list(primary_choices())} (default: "
        "the judge's LC win rate when a judge is configured and passes its reliability check, else the eval set's "
        "own primary metric, else rouge_l)",
    )
    overwrite: bool = setting(
        False,
        "retrain the arms whose recorded settings differ from this run's (default: stop with an error)",
        flag="--overwrite",
    )


@dataclass
class CompareConfig(Config):
    """Everything ``neftune compare`` needs: the shared training setup plus the experiment grid.

    The settings in :attr:`SET_PER_ARM` are ignored: compare sets them for each arm (the arms'
    alphas are ``compare.alphas`` and the 0 baseline, their seeds ``compare.seeds``).
    """

    SET_PER_ARM: ClassVar[tuple[str, ...]] = ("noise.alpha", "train.seed", "train.output", "train.resume")

    generate: GenerateConfig = field(default_factory=GenerateConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    compare: CompareSection = field(default_factory=CompareSection)

    def validate(self) -> CompareConfig:
        """Raise :class:`ConfigError` naming the first invalid field; return self."""
        self.train_config(0.0, 0).validate()
        if self.train.method != "sft":
            raise ConfigError("neftune compare trains with train.method=sft only; run --method dpo with neftune train")
        if not self.compare.alphas:
            raise ConfigError("compare.alphas must list at least one alpha")
        for a in self.compare.alphas:
            if not math.isfinite(a) or a <= 0:
                raise ConfigError(f"compare.alphas must be finite numbers > 0 (the baseline is added), got {a}")
        if len(set(self.compare.alphas)) != len(self.compare.alphas):
            raise ConfigError(f"compare.alphas has duplicates: {self.compare.alphas}")
        if not self.compare.seeds or len(set(self.compare.seeds)) != len(self.compare.seeds):
            raise ConfigError(f"compare.seeds must be distinct integers, got {self.compare.seeds}")
        check_choice("judge.backend", self.judge.backend, JudgeSetting)
        if self.judge.backend == "http" and not (self.judge.base_url and self.judge.model):
            raise ConfigError("judge.backend=http needs judge.base_url and judge.model")
        if self.generate.limit is not None:
            check_positive("generate.limit", self.generate.limit)
        if self.generate.prompts is not None and not str(self.generate.prompts).strip():
            raise ConfigError("generate.prompts must name a prompt set or file (or be left unset)")
        if self.generate.max_new_tokens is not None:
            check_positive("generate.max_new_tokens", self.generate.max_new_tokens)
        check_positive("generate.batch_size", self.generate.batch_size)
        check_choice("generate.backend", self.generate.backend, GenerateBackend)
        if not self.generate.vllm_start_timeout > 0:
            raise ConfigError(
                f"generate.vllm_start_timeout must be > 0 seconds, got {self.generate.vllm_start_timeout}"
            )
        check_choice("generate.server", self.generate.server, Server)
        if self.generate.backend == "openai" and not (self.generate.url and self.generate.served_model):
            raise ConfigError("generate.backend=openai needs generate.url and generate.served_model")
        penalty = self.generate.repetition_penalty
        if penalty is not None and not (penalty > 0 and math.isfinite(penalty)):
            raise ConfigError(f"generate.repetition_penalty must be > 0, got {penalty}")
        if self.judge.max_pairs is not None:
            check_positive("judge.max_pairs", self.judge.max_pairs)
        if self.judge.max_tokens is not None:
            check_positive("judge.max_tokens", self.judge.max_tokens)
        if not (self.judge.temperature >= 0 and math.isfinite(self.judge.temperature)):
            raise ConfigError(f"judge.temperature must be >= 0, got {self.judge.temperature}")
        return self

    def train_config(self, alpha: float, seed: int, output: str | None = None) -> Config:
        """The training config of one arm."""
        train = dataclasses.replace(self.train, seed=seed, output=output or self.train.output)
        noise = dataclasses.replace(self.noise, alpha=alpha)
        return Config(model=self.model, data=self.data, noise=noise, train=train)
