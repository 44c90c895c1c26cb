"""The ``neftune`` command: a thin layer that parses arguments and calls the library.

Every subcommand is a :class:`~neftune.settings.Command`: a typed config class whose fields declare
the flags (:mod:`neftune.cli_flags` builds the parser), and a function that runs with one.
``train`` and ``compare`` turn their flags into ``section.key=value`` overrides of their config
(see :mod:`neftune.config`), so YAML files, overrides and flags share one validation path.  Errors
caused by input are printed as one line and exit with status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from neftune import __version__
from neftune.cli_flags import add_command, config_from_args
from neftune.errors import NeftuneError
from neftune.settings import Command

if TYPE_CHECKING:
    from neftune.cli_settings import EvalSet, EvalSettings, GenerateSettings, JudgeSettings
    from neftune.compare_config import CompareConfig
    from neftune.config import Config

__all__ = ["build_parser", "config_from_args", "error_line", "main", "unexpected_error_line"]


def cmd_train(cfg: Config) -> int:
    """``neftune train``: one finetuning run."""
    from neftune.train import is_main_process, run_training

    result = run_training(cfg)
    if is_main_process():
        m = result.metrics
        line = f"done: {m.get('real_tokens', 0):,} tokens at {m.get('tokens_per_s', 0):.0f} tokens/s in {m.get('train_time_s', 0):.0f}s"
        if "heldout_loss" in m:
            line += f"; held-out loss {m['heldout_loss']:.4f} (noise off)"
        print(line)
        print(f"model: {result.model_dir}")
    return 0


def cmd_compare(cfg: CompareConfig) -> int:
    """``neftune compare``: the experiment, its arms and its report."""
    from neftune.compare import run_compare

    paths = run_compare(cfg)
    print(f"report: {paths['html']}")
    print(f"        {paths['markdown']}")
    return 0


def _load_eval_set(eval_set: EvalSet) -> list:
    from neftune.data.formats import load_eval_examples

    held = load_eval_examples(
        eval_set.data,
        fmt=eval_set.format,
        on_bad_record=eval_set.on_bad_record,
        limit=eval_set.limit,
        require_response=False,
    )
    logging.getLogger("neftune").info(held.summary())
    return held.examples


def _answer(cfg: GenerateSettings | EvalSettings, model, tokenizer, examples) -> list[dict]:
    """Generate AlpacaEval-format answers with the settings of ``cfg`` (``eval``: in-process, hf)."""
    from neftune.cli_settings import GenerateSettings
    from neftune.generate import default_max_new_tokens, default_repetition_penalty, generate_outputs

    data, answering, model_spec = cfg.eval_set.data, cfg.answering, str(cfg.model)
    cap = default_max_new_tokens(data, answering.max_new_tokens)
    penalty = default_repetition_penalty(data, answering.repetition_penalty)
    name = (cfg.name if isinstance(cfg, GenerateSettings) else None) or os.path.basename(os.path.normpath(model_spec))
    named: dict[str, Any] = {"generator_name": name, "dataset_name": data, "progress": answering.progress}
    if isinstance(cfg, GenerateSettings) and cfg.backend in ("openai", "vllm"):
        from pathlib import Path

        from neftune.eval_plan import Backend
        from neftune.model_cache import resolve_model
        from neftune.serve import penalty_fields

        backend = Backend(
            cfg.backend,
            cfg.url,
            str(cfg.server),
            cfg.served_model or name,
            cfg.vllm_python,
            cfg.vllm_args,
            log_dir=Path(cfg.output).parent,
        )
        spare = answering.spare_stop_tokens
        penalty_fields(
            backend.penalty_server, penalty, spare, sparing_plugin=backend.sparing_plugin
        )  # before a server starts
        if backend.name == "openai" and not backend.url:
            raise NeftuneError("--backend openai needs --url (the server's base URL, e.g. http://127.0.0.1:8000/v1)")
        model_dir = Path(resolve_model(model_spec)) if backend.name == "vllm" else Path(model_spec)
        engine = backend.engine(
            model_dir,
            name,
            tokenizer,
            max_new_tokens=cap,
            repetition_penalty=penalty,
            spare_stop_tokens=spare,
            workers=answering.batch_size,
            load_adapter=False,  # a server the user runs serves --served-model as it is
        )
        return generate_outputs(None, tokenizer, examples, engine=engine, **named)
    return generate_outputs(
        model,
        tokenizer,
        examples,
        **named,
        max_new_tokens=cap,
        repetition_penalty=penalty,
        spare_stop_tokens=answering.spare_stop_tokens,
        batch_size=answering.batch_size,
    )


def cmd_generate(cfg: GenerateSettings) -> int:
    """``neftune generate``: answer an eval set and write the outputs file."""
    from neftune.io import check_output_file
    from neftune.models import load_model_and_tokenizer
    from neftune.outputs import write_outputs
    from neftune.vllm_server import resolve_backend

    check_output_file(cfg.output)
    examples = _load_eval_set(cfg.eval_set)
    trust = cfg.answering.trust_remote_code
    cfg.backend = resolve_backend(cfg.backend, cfg.vllm_python)  # type: ignore[assignment]
    if cfg.backend in ("openai", "vllm"):  # the server holds the weights; the tokenizer renders the prompts
        from transformers import AutoTokenizer

        from neftune.model_cache import resolve_model

        model, tokenizer = None, AutoTokenizer.from_pretrained(resolve_model(cfg.model), trust_remote_code=trust)
    else:
        model, tokenizer = load_model_and_tokenizer(cfg.model, for_training=False, trust_remote_code=trust)
    from neftune.vllm_server import vllm_session

    with vllm_session():  # --backend vllm: its server stops with the answers in, or on an error
        records = _answer(cfg, model, tokenizer, examples)
    path = write_outputs(cfg.output, records)
    print(f"{len(records)} answers written to {path}")
    return 0


def cmd_eval(cfg: EvalSettings) -> int:
    """``neftune eval``: held-out loss of a model and the metrics of its (or given) answers."""
    import json

    from neftune.evaluate import evaluate_outputs, heldout_loss
    from neftune.io import check_output_file
    from neftune.models import load_model_and_tokenizer
    from neftune.outputs import read_outputs, write_outputs

    data = cfg.eval_set.data
    if cfg.output:
        check_output_file(cfg.output)
        if cfg.model and not cfg.outputs:
            check_output_file(os.path.splitext(cfg.output)[0] + ".outputs.json")
    examples = _load_eval_set(cfg.eval_set)
    report: dict = {"data": data}
    tokenizer = None
    records = read_outputs(cfg.outputs) if cfg.outputs else None
    if cfg.model:
        model, tokenizer = load_model_and_tokenizer(
            cfg.model, for_training=False, trust_remote_code=cfg.answering.trust_remote_code
        )
        with_answers = [e for e in examples if e.reference is not None]
        if with_answers:
            report["heldout"] = heldout_loss(
                model, tokenizer, with_answers, max_length=cfg.max_length, batch_size=cfg.answering.batch_size
            )
        if records is None:
            records = _answer(cfg, model, tokenizer, examples)
            if cfg.output:
                write_outputs(os.path.splitext(cfg.output)[0] + ".outputs.json", records)
    if records is None:
        raise NeftuneError("eval needs --model (to measure loss and generate) or --outputs (answers to score)")
    if len(records) != len(examples):
        raise NeftuneError(
            f"{cfg.outputs}: {len(records)} answers but {data} has {len(examples)} examples "
            "(use the same --data and --limit as for generate)"
        )
    report["outputs"] = evaluate_outputs(records, examples, tokenizer)
    if "ifeval" in report["outputs"]:
        from neftune.ifeval import summary_line

        logging.getLogger("neftune").info(summary_line(report["outputs"]["ifeval"]))
    text = json.dumps(report, indent=2, default=str)
    if cfg.output:
        from neftune.io import atomic_write_text

        atomic_write_text(cfg.output, text)
        print(f"metrics written to {cfg.output}")
    else:
        print(text)
    return 0


def cmd_judge(cfg: JudgeSettings) -> int:
    """``neftune judge``: judge the candidate's answers against the baseline's, both orders."""
    from neftune.data.presets import get_preset
    from neftune.io import check_output_file
    from neftune.judge import build_judge, judge_pairs
    from neftune.outputs import read_outputs

    if cfg.output:
        check_output_file(cfg.output)
    a: Sequence[Mapping[str, Any]]
    b: Sequence[Mapping[str, Any]] = read_outputs(cfg.candidate)
    if get_preset(cfg.baseline) is not None:  # a prompt set's shipped reference answers as the baseline
        from neftune.data.evalsets import reference_pairs
        from neftune.errors import DataError

        try:
            a, b = reference_pairs(cfg.baseline, b)
        except DataError as e:
            raise DataError(f"{cfg.candidate}: {e}") from None
    else:
        from neftune.judge.pairing import pair_outputs

        a, b = pair_outputs(read_outputs(cfg.baseline), b, cfg.baseline, cfg.candidate)
    if cfg.limit:
        a, b = a[: cfg.limit], b[: cfg.limit]
    if cfg.backend == "http" and not (cfg.base_url and cfg.model):
        raise NeftuneError("--backend http needs --base-url and --judge-model")
    if cfg.backend == "local" and not cfg.model:
        raise NeftuneError("--backend local needs --judge-model (a model directory, alias or hub id)")
    judge = build_judge(
        cfg.backend,
        model=cfg.model,
        base_url=cfg.base_url,
        api_key_env=cfg.api_key_env,
        max_tokens=cfg.max_tokens,
        temperature=cfg.temperature,
    )
    if judge is None:
        raise NeftuneError("neftune judge needs a judge: --backend http, local or length")
    result = judge_pairs(a, b, judge, cache_dir=cfg.cache, seed=cfg.seed, progress=cfg.progress)
    if cfg.output:
        result.save(cfg.output)
    print(result.summary())
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one ``neftune: error:`` line (exit 2) like every other error."""

    def error(self, message: str):
        self.exit(2, f"neftune: error: {error_line(message)} (see {self.prog} --help)\n")


def error_line(message: object, limit: int = 280) -> str:
    """``message`` as one line of at most ``limit`` characters (the middle of a huge one is elided)."""
    text = " ".join(str(message).split())
    if len(text) > limit:
        head = limit * 2 // 3
        text = f"{text[:head]} ... {text[-(limit - head - 5) :]}"
    return text


DEBUG_ENV = "NEFTUNE_DEBUG"
#: How the last-resort message ends; the bad-input tests check that no case reaches it.
UNEXPECTED_HINT = f"this is a bug in neftune; rerun with --debug (or {DEBUG_ENV}=1) for the traceback to report it"


def unexpected_error_line(error: BaseException) -> str:
    """One line for an exception no validation caught: its type, its message and how to see more."""
    detail = error_line(f"{type(error).__name__}: {error}", limit=160)
    return f"unexpected {detail} ({UNEXPECTED_HINT})"


def build_parser() -> argparse.ArgumentParser:
    """The ``neftune`` parser: global flags and one subparser per :func:`commands` entry."""
    parser = _Parser(
        prog="neftune",
        description="Instruction finetuning with per-example NEFTune noise, and experiments that show whether it helped.",
    )
    parser.add_argument("--version", action="version", version=f"neftune {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument(
        "--debug", action="store_true", help=f"show the full traceback of an error (or set {DEBUG_ENV}=1)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in commands():
        add_command(sub, command)
    return parser


def commands() -> list[Command]:
    """Every subcommand, in the order ``neftune --help`` lists them."""
    from neftune.audit import AUDIT
    from neftune.cli_settings import EvalSettings, GenerateSettings, JudgeSettings
    from neftune.compare_config import CompareConfig
    from neftune.config import Config
    from neftune.patch import RUN

    return [
        # no abbreviations: `--alpha` must not silently mean compare's `--alphas`
        Command(
            "train",
            Config,
            cmd_train,
            help="finetune a model with NEFTune",
            description="Finetune a model with per-example NEFTune noise.",
            config_file=True,
            allow_abbrev=False,
        ),
        Command(
            "compare",
            CompareConfig,
            cmd_compare,
            help="train with and without NEFTune and report the difference",
            description="Train a baseline (alpha=0) and NEFTune arms on identical data and seed, "
            "evaluate and judge them, and write report.html.",
            config_file=True,
            recipes=True,
            allow_abbrev=False,
        ),
        Command(
            "generate",
            GenerateSettings,
            cmd_generate,
            help="answer an eval set (AlpacaEval output format)",
            description="Batched greedy generation; writes a JSON list of {instruction, output, generator, dataset}.",
        ),
        Command(
            "eval",
            EvalSettings,
            cmd_eval,
            help="held-out loss and answer metrics",
            description="Held-out loss and perplexity (noise off), answer lengths, distinct-1/2, repetition, "
            "exact match on builtin:skills and ROUGE-L against references.",
        ),
        Command(
            "judge",
            JudgeSettings,
            cmd_judge,
            help="pairwise judging of two outputs files (both orders)",
            description="Judge CANDIDATE against BASELINE, each pair asked in both orders. Reports the win "
            "rate with a bootstrap 95% CI, a length-controlled win rate and position consistency.",
        ),
        RUN,  # neftune run -- CMD: transformers' neftune_noise_alpha made per-example in CMD
        AUDIT,  # neftune audit: the alpha the built-in hook gives each example of a data set
    ]


def setup_logging(quiet: bool) -> None:
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("transformers", "datasets", "accelerate", "peft", "torch", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may stand anywhere among the flags
    args, extra = parser.parse_known_args(argv)
    takes_overrides = getattr(args, "takes_overrides", False)  # train and compare; other commands have none
    overrides = [a for a in extra if "=" in a and not a.startswith("-")] if takes_overrides else []
    unknown = [a for a in extra if a not in overrides]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = overrides
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    setup_logging(args.quiet)
    func: Callable[[argparse.Namespace], int] = args.func
    debug = args.debug or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
    try:
        return func(args)
    except NeftuneError as e:
        if debug:
            traceback.print_exc()
        stopped = getattr(e, "exit_status", None)  # preempted (neftune.preempt): a checkpoint, not an error
        line = error_line(e, limit=280 if getattr(e, "elide", True) else 2000)  # paths and numbers kept whole
        print(f"neftune: {line}" if stopped else f"neftune: error: {line}", file=sys.stderr)
        return stopped or 2
    except KeyboardInterrupt:
        print("neftune: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the last resort: one line, the traceback on request
        if debug:
            traceback.print_exc()
        from neftune.resources import explain

        explained = explain(e)  # a full disk or out-of-memory no stage told in its own words
        line = unexpected_error_line(e) if explained is None else error_line(explained, limit=2000)
        print(f"neftune: error: {line}", file=sys.stderr)
        return 1 if explained is None else 2
