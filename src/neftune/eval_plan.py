"""How every arm of a ``neftune compare`` experiment is evaluated, resolved once before any arm trains.

:meth:`EvalPlan.resolve` derives from a :class:`~neftune.compare_config.CompareConfig` the held-out data, the
prompts every arm answers, the token cap and repetition penalty (``generate.*``, else the prompt set's
defaults, :mod:`neftune.data.presets`) and the generation backend, raising the configuration's one-line
errors up front.  :mod:`neftune.compare` hands the plan to each arm (:mod:`neftune.arms`), and
:meth:`EvalPlan.fingerprint` is the ``generate`` part of every arm's fingerprint (:mod:`neftune.fingerprint`):
a change there answers the prompts again without retraining.

    plan = EvalPlan.resolve(cfg)             # NeftuneError / ConfigError, one line
    plan.max_new_tokens, plan.repetition_penalty
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neftune.data.prepare import auto_split, heldout_name
from neftune.data.presets import resolve_eval_spec
from neftune.errors import NeftuneError

if TYPE_CHECKING:
    from neftune.compare_config import CompareConfig, GenerateConfig
    from neftune.serve import ServerEngine

__all__ = ["Backend", "EvalPlan"]


@dataclass(frozen=True)
class Backend:
    """What answers the prompts (``generate.backend``): the arm's model in-process, a server, or vLLM run by neftune."""

    name: str
    """``hf``, ``openai`` or ``vllm``."""
    url: str = ""
    """openai: the server's base URL."""
    server: str = ""
    """openai: what serves :attr:`url` (``vllm``, ``sglang``, ``llama.cpp`` or ``other``)."""
    served_model: str = ""
    """openai: the model name asked for; ``{arm}`` becomes the arm's directory name."""
    vllm_python: str = ""
    vllm_args: str = ""
    vllm_start_timeout: float = 900.0
    log_dir: Path = Path(".")
    """vllm: where the server's log is written (the experiment directory)."""

    @classmethod
    def of(cls, gen: GenerateConfig, log_dir: Path) -> Backend:
        """The backend ``gen`` configures (``auto`` made ``vllm`` or ``hf``: :func:`neftune.vllm_server.resolve_backend`)."""
        from neftune.vllm_server import resolve_backend

        return cls(
            resolve_backend(gen.backend, gen.vllm_python),
            gen.url,
            gen.server,
            gen.served_model,
            gen.vllm_python,
            gen.vllm_args,
            gen.vllm_start_timeout,
            log_dir,
        )

    @property
    def in_process(self) -> bool:
        """Whether the arm's own model answers (the hf backend), not a server."""
        return self.name not in ("openai", "vllm")

    @property
    def penalty_server(self) -> str:
        """The server whose repetition penalty applies (:func:`neftune.serve.penalty_fields`)."""
        return "vllm" if self.name == "vllm" else self.server

    @property
    def sparing_plugin(self) -> bool:
        """Whether the server has neftune's penalty that spares the stop tokens (the vLLM neftune runs)."""
        return self.name == "vllm"

    def engine(
        self,
        model_dir: Path,
        name: str,
        tokenizer: Any,
        *,
        max_new_tokens: int,
        repetition_penalty: float,
        spare_stop_tokens: bool,
        workers: int,
        load_adapter: bool = True,
    ) -> ServerEngine:
        """A :class:`~neftune.serve.ServerEngine` answering for the model or LoRA adapter in ``model_dir``.

        vllm: a server neftune runs (:func:`neftune.vllm_server.serve_model`), the adapter loaded into it
        under ``name``.  openai: :attr:`served_model` with ``{arm}`` made ``name``; a vLLM server the user
        runs is asked to load the adapter when ``load_adapter``.
        """
        from neftune.serve import ServerEngine

        url, server, served = self.url, self.server, self.served_model.replace("{arm}", name)
        adapter: Path | None = model_dir if self.server == "vllm" and load_adapter else None
        if self.name == "vllm":
            from neftune.vllm_server import VLLMSettings, serve_model

            where = VLLMSettings(self.vllm_python, self.vllm_args, self.vllm_start_timeout, self.log_dir)
            url, served, adapter = serve_model(model_dir, where, name)
            server = "vllm"
        engine = ServerEngine(
            url,
            served,
            tokenizer,
            server=server,
            max_new_tokens=max_new_tokens,
            repetition_penalty=repetition_penalty,
            spare_stop_tokens=spare_stop_tokens,
            sparing_plugin=self.sparing_plugin,
            workers=workers,  # the server batches what is in flight
        )
        engine.ensure_served(adapter)
        return engine

    def stamp(self) -> dict[str, Any]:
        """What the generation fingerprint records of the backend: its name and, for a server, how it is reached."""
        if self.name == "hf":
            return {"backend": self.name}
        if self.name == "vllm":  # a server of our own: where it listens changes from run to run, its flags do not
            return {"backend": self.name, "server": "vllm", "vllm_args": self.vllm_args}
        from neftune.http_api import Endpoint

        return {
            "backend": self.name,
            "url": Endpoint.public(self.url),
            "server": self.server,
            "served_model": self.served_model,
        }


@dataclass(frozen=True)
class EvalPlan:
    """Every setting that decides how an arm is evaluated (noise off), the same for every arm."""

    eval_data: str
    """The held-out data of the loss: ``data.eval``, the training set's held-out split, or the examples
    ``data.eval_size`` splits off the training data (named ``"SPEC (held out: ...)"``)."""
    eval_limit: int | None
    """``data.eval_limit``: how many held-out examples the loss is measured on."""
    prompts: str
    """The prompts every arm answers: ``generate.prompts``, else :attr:`eval_data`."""
    prompts_limit: int | None
    """How many prompts are answered: ``generate.limit``, else ``data.eval_limit``."""
    own_prompts: bool
    """Whether ``generate.prompts`` names a prompt set of its own (else the arms answer the held-out data)."""
    max_new_tokens: int
    """``generate.max_new_tokens``, else the prompt set's default."""
    repetition_penalty: float
    """``generate.repetition_penalty``, else the prompt set's default."""
    spare_stop_tokens: bool
    batch_size: int
    """Answers (and held-out loss examples) per batch; a server's requests in flight."""
    max_length: int
    """``data.max_length``: the held-out loss's truncation."""
    backend: Backend

    @classmethod
    def resolve(cls, cfg: CompareConfig) -> EvalPlan:
        """The plan ``cfg`` describes.

        Raises :class:`NeftuneError` when ``cfg`` names no held-out data, and :class:`ConfigError` when
        the server cannot honour the repetition penalty (:func:`neftune.serve.penalty_fields`): both one
        line, before any arm trains.
        """
        from neftune.generate import default_max_new_tokens, default_repetition_penalty

        gen = cfg.generate
        eval_data = _eval_spec(cfg)
        prompts = gen.prompts or eval_data
        plan = cls(
            eval_data=eval_data,
            eval_limit=cfg.data.eval_limit,
            prompts=prompts,
            prompts_limit=gen.limit if gen.limit is not None else cfg.data.eval_limit,
            own_prompts=gen.prompts is not None,
            max_new_tokens=default_max_new_tokens(prompts, gen.max_new_tokens),
            repetition_penalty=default_repetition_penalty(prompts, gen.repetition_penalty),
            spare_stop_tokens=gen.spare_stop_tokens,
            batch_size=gen.batch_size,
            max_length=cfg.data.max_length,
            backend=Backend.of(gen, Path(cfg.compare.output)),
        )
        if not plan.backend.in_process:
            from neftune.serve import penalty_fields

            backend = plan.backend
            penalty_fields(
                backend.penalty_server,
                plan.repetition_penalty,
                plan.spare_stop_tokens,
                sparing_plugin=backend.sparing_plugin,
            )
        return plan

    @property
    def loss_on_prompts(self) -> bool:
        """Whether the held-out loss is measured on the answered prompts themselves (those with a reference)."""
        return self.eval_data == self.prompts and self.prompts_limit == self.eval_limit

    def fingerprint(self, eval_digest: str, heldout_digest: str) -> dict[str, Any]:
        """The ``generate`` part of an arm's fingerprint: a change here answers the prompts again.

        ``eval_digest`` and ``heldout_digest`` are :func:`neftune.fingerprint.examples_digest` of the
        prompts answered and of the held-out loss's examples.
        """
        return {
            "eval": eval_digest,
            "eval_data": self.eval_data,
            "eval_limit": self.eval_limit,
            "prompts": self.prompts,
            "prompts_limit": self.prompts_limit,
            "heldout": heldout_digest,
            "max_new_tokens": self.max_new_tokens,
            "repetition_penalty": self.repetition_penalty,
            "spare_stop_tokens": self.spare_stop_tokens,
            "batch_size": self.batch_size,
            "max_length": self.max_length,
            **self.backend.stamp(),
        }


def _eval_spec(cfg: CompareConfig) -> str:
    """The held-out data; a one-line :class:`NeftuneError` when ``cfg`` names none."""
    if auto_split(cfg.data):
        return heldout_name(cfg.data)
    spec = resolve_eval_spec(cfg.data.train, cfg.data.eval)
    if spec is None:
        raise NeftuneError(
            "compare needs held-out data: set --eval-data (or data.eval), or --eval-size to split it off the training set"
        )
    return spec
