"""The ``neftune`` command: a thin layer that parses arguments and calls the library.

Each subcommand turns its flags into ``section.key=value`` overrides of a typed config (see
:mod:`neftune.config`), so YAML files, overrides and flags share one validation path.  Errors caused
by input are printed as one line and exit with status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from neftune import __version__
from neftune.errors import NeftuneError


def add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add ``--config``, ``key=value`` overrides and the flags declared in ``cls``'s field metadata
    (:func:`neftune.config.command_flags`); list every setting with its default in the epilog."""
    from neftune.config import command_flags, default_of, iter_fields

    parser.add_argument("--config", metavar="FILE.yaml", help="YAML config file (sections as in the list below)")
    parser.usage = "%(prog)s [options] [key=value ...]"
    for flag in command_flags(cls):
        dest = f"set:{flag.key}"
        if flag.const is None:
            parser.add_argument(flag.name, dest=dest, metavar=flag.metavar, help=_escape(f"{flag.help} ({flag.key})"))
        else:
            value = "true" if flag.const else "false"
            parser.add_argument(
                flag.name,
                dest=dest,
                action="store_const",
                const=value,
                help=_escape(f"sets {flag.key}={value} ({flag.help})"),
            )
    per_arm = set(getattr(cls, "SET_PER_ARM", ()))
    lines = ["all settings (YAML sections or key=value):"]
    for name, f, _hint in iter_fields(cls):
        note = " (set per arm, ignored here)" if name in per_arm else ""
        lines.append(f"  {name:<28} {f.metadata.get('help', '')} [default: {default_of(f)}]{note}")
    parser.epilog = "\n".join(lines)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def _escape(text: str) -> str:
    return text.replace("%", "%%")  # argparse formats help strings with %


def config_from_args(args: argparse.Namespace, cls: type) -> Any:
    """Defaults < --config YAML < key=value overrides < flags; validated."""
    from neftune.config import load_config

    overrides = list(getattr(args, "overrides", []))
    for dest, value in vars(args).items():
        if dest.startswith("set:") and value is not None:
            overrides.append(f"{dest[4:]}={value}")
    return load_config(cls, args.config, overrides, recipe=getattr(args, "preset", None))


def cmd_train(args: argparse.Namespace) -> int:
    from neftune.config import Config

    cfg = config_from_args(args, Config)  # before importing torch: a bad flag fails in a second
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


def cmd_compare(args: argparse.Namespace) -> int:
    from neftune.config import CompareConfig

    cfg = config_from_args(args, CompareConfig)
    from neftune.compare import run_compare

    paths = run_compare(cfg)
    print(f"report: {paths['html']}")
    print(f"        {paths['markdown']}")
    return 0


def _load_eval_set(spec: str, fmt: str, limit: int | None, on_bad_record: str):
    from neftune.data.formats import load_eval_examples

    held = load_eval_examples(spec, fmt=fmt, on_bad_record=on_bad_record, limit=limit, require_response=False)
    logging.getLogger("neftune").info(held.summary())
    return held.examples


def _answer(args: argparse.Namespace, model, tokenizer, examples) -> list[dict]:
    """Generate AlpacaEval-format answers with the generation flags of ``args``."""
    from neftune.generate import default_max_new_tokens, default_repetition_penalty, generate_outputs

    cap = default_max_new_tokens(args.data, args.max_new_tokens)
    penalty = default_repetition_penalty(args.data, args.repetition_penalty)
    name = getattr(args, "name", None) or os.path.basename(os.path.normpath(args.model))
    backend = getattr(args, "backend", "hf")
    if backend in ("openai", "vllm"):
        from neftune.serve import ServerEngine, penalty_fields

        url, served, server, adapter = args.url, args.served_model or name, args.server, None
        spare = not args.penalize_stop_tokens
        penalty_fields("vllm" if backend == "vllm" else server, penalty, spare)  # before a server starts
        if backend == "vllm":  # a server of our own, stopped when the answers are in
            from pathlib import Path

            from neftune.model_cache import resolve_model
            from neftune.vllm_server import VLLMSettings, serve_model

            where = VLLMSettings(args.vllm_python or "", args.vllm_args or "", log_dir=Path(args.output).parent)
            url, served, adapter = serve_model(Path(resolve_model(args.model)), where, name)
            server = "vllm"
        elif not url:
            raise NeftuneError("--backend openai needs --url (the server's base URL, e.g. http://127.0.0.1:8000/v1)")
        engine = ServerEngine(
            url,
            served,
            tokenizer,
            server=server,
            max_new_tokens=cap,
            repetition_penalty=penalty,
            spare_stop_tokens=spare,
            workers=args.batch_size,
        )
        engine.ensure_served(adapter)
        return generate_outputs(
            None,
            tokenizer,
            examples,
            generator_name=name,
            dataset_name=args.data,
            engine=engine,
            progress=not args.no_progress,
        )
    return generate_outputs(
        model,
        tokenizer,
        examples,
        generator_name=name,
        dataset_name=args.data,
        max_new_tokens=cap,
        repetition_penalty=penalty,
        spare_stop_tokens=not getattr(args, "penalize_stop_tokens", False),
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from neftune.io import check_output_file
    from neftune.models import load_model_and_tokenizer
    from neftune.outputs import write_outputs

    check_output_file(args.output)
    examples = _load_eval_set(args.data, args.format, args.limit, args.on_bad_record)
    if args.backend in ("openai", "vllm"):  # the server holds the weights; the tokenizer renders the prompts
        from transformers import AutoTokenizer

        from neftune.model_cache import resolve_model

        model, tokenizer = (
            None,
            AutoTokenizer.from_pretrained(resolve_model(args.model), trust_remote_code=args.trust_remote_code),
        )
    else:
        model, tokenizer = load_model_and_tokenizer(
            args.model, for_training=False, trust_remote_code=args.trust_remote_code
        )
    from neftune.vllm_server import vllm_session

    with vllm_session():  # --backend vllm: its server stops with the answers in, or on an error
        records = _answer(args, model, tokenizer, examples)
    path = write_outputs(args.output, records)
    print(f"{len(records)} answers written to {path}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from neftune.evaluate import evaluate_outputs, heldout_loss
    from neftune.io import check_output_file
    from neftune.models import load_model_and_tokenizer
    from neftune.outputs import read_outputs, write_outputs

    if args.output:
        check_output_file(args.output)
        if args.model and not args.outputs:
            check_output_file(os.path.splitext(args.output)[0] + ".outputs.json")
    examples = _load_eval_set(args.data, args.format, args.limit, args.on_bad_record)
    report: dict = {"data": args.data}
    tokenizer = None
    records = read_outputs(args.outputs) if args.outputs else None
    if args.model:
        model, tokenizer = load_model_and_tokenizer(
            args.model, for_training=False, trust_remote_code=args.trust_remote_code
        )
        with_answers = [e for e in examples if e.reference is not None]
        if with_answers:
            report["heldout"] = heldout_loss(
                model, tokenizer, with_answers, max_length=args.max_length, batch_size=args.batch_size
            )
        if records is None:
            records = _answer(args, model, tokenizer, examples)
            if args.output:
                write_outputs(os.path.splitext(args.output)[0] + ".outputs.json", records)
    if records is None:
        raise NeftuneError("eval needs --model (to measure loss and generate) or --outputs (answers to score)")
    if len(records) != len(examples):
        raise NeftuneError(
            f"{args.outputs}: {len(records)} answers but {args.data} has {len(examples)} examples "
            "(use the same --data and --limit as for generate)"
        )
    report["outputs"] = evaluate_outputs(records, examples, tokenizer)
    if "ifeval" in report["outputs"]:
        from neftune.ifeval import summary_line

        logging.getLogger("neftune").info(summary_line(report["outputs"]["ifeval"]))
    text = json.dumps(report, indent=2, default=str)
    if args.output:
        from neftune.io import atomic_write_text

        atomic_write_text(args.output, text)
        print(f"metrics written to {args.output}")
    else:
        print(text)
    return 0


def cmd_judge(args: argparse.Namespace) -> int:
    from neftune.data.presets import get_preset
    from neftune.io import check_output_file
    from neftune.judge import build_judge, judge_pairs
    from neftune.outputs import read_outputs

    if args.output:
        check_output_file(args.output)
    a: Sequence[Mapping[str, Any]]
    b: Sequence[Mapping[str, Any]] = read_outputs(args.candidate)
    if get_preset(args.baseline) is not None:  # a prompt set's shipped reference answers as the baseline
        from neftune.data.evalsets import reference_pairs
        from neftune.errors import DataError

        try:
            a, b = reference_pairs(args.baseline, b)
        except DataError as e:
            raise DataError(f"{args.candidate}: {e}") from None
    else:
        from neftune.judge.pairing import pair_outputs

        a, b = pair_outputs(read_outputs(args.baseline), b, args.baseline, args.candidate)
    if args.limit:
        a, b = a[: args.limit], b[: args.limit]
    if args.backend == "http" and not (args.base_url and args.judge_model):
        raise NeftuneError("--backend http needs --base-url and --judge-model")
    if args.backend == "local" and not args.judge_model:
        raise NeftuneError("--backend local needs --judge-model (a model directory, alias or hub id)")
    judge = build_judge(
        args.backend,
        model=args.judge_model or "",
        base_url=args.base_url or "",
        api_key_env=args.api_key_env,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
    )
    if judge is None:
        raise NeftuneError("neftune judge needs a judge: --backend http, local or length")
    result = judge_pairs(a, b, judge, cache_dir=args.cache, seed=args.seed, progress=not args.no_progress)
    if args.output:
        result.save(args.output)
    print(result.summary())
    return 0


def _add_eval_set_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        default="builtin:skills",
        help="eval set: builtin:skills (held-out split), builtin:ifeval, builtin:alpaca_eval, builtin:mt_bench, "
        "Alpaca/AlpacaEval JSON, ShareGPT or messages (first turns)",
    )
    p.add_argument("--format", default="auto", help="auto, alpaca, sharegpt or messages")
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help="use N examples: the first N, or a fixed stratified subset of builtin:ifeval, alpaca_eval, mt_bench",
    )
    p.add_argument(
        "--on-bad-record", default="error", choices=["error", "skip"], help="stop at, or skip and count, bad records"
    )


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-new-tokens", type=int, default=None, help="tokens per answer (default: the eval data's, 256 for files)"
    )
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=None,
        help="greedy decoding penalty (default: the eval data's; 1.2, the paper's, for files)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="prompts per batch (batches are sorted by length); with a server backend, the requests in flight",
    )
    p.add_argument(
        "--penalize-stop-tokens",
        action="store_true",
        help="transformers' own repetition penalty, which also lowers the end-of-turn token a chat template puts in "
        "every prompt (default: spared; vLLM and SGLang need this flag or --repetition-penalty 1.0)",
    )
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub to run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_answering_args(p: argparse.ArgumentParser, func: Callable[[argparse.Namespace], int]) -> None:
    """What ``generate`` and ``eval`` share: the eval set, the generation settings; and the command to run."""
    _add_eval_set_args(p)
    _add_generation_args(p)
    p.set_defaults(func=func)


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
    from neftune.config import CompareConfig, Config

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

    # no abbreviations: `--alpha` must not silently mean compare's `--alphas`
    train = sub.add_parser(
        "train",
        help="finetune a model with NEFTune",
        description="Finetune a model with per-example NEFTune noise.",
        allow_abbrev=False,
    )
    add_config_flags(train, Config)
    train.set_defaults(func=cmd_train)

    compare = sub.add_parser(
        "compare",
        help="train with and without NEFTune and report the difference",
        description="Train a baseline (alpha=0) and NEFTune arms on identical data and seed, "
        "evaluate and judge them, and write report.html.",
        allow_abbrev=False,
    )
    compare.add_argument(
        "--preset",
        metavar="NAME",
        help="start from a shipped experiment recipe: demo (ShareGPT first turns, IFEval subset, ~15 min on 2 CPU "
        "cores), skills (builtin:skills, the fast sanity check) or study (alpha 0/5/10/15 x 3 seeds, ~95 min); "
        "--config, key=value and flags override it",
    )
    add_config_flags(compare, CompareConfig)
    compare.set_defaults(func=cmd_compare)

    gen = sub.add_parser(
        "generate",
        help="answer an eval set (AlpacaEval output format)",
        description="Batched greedy generation; writes a JSON list of {instruction, output, generator, dataset}.",
    )
    gen.add_argument("--model", required=True, help="model directory (a trained output/model), alias or hub id")
    gen.add_argument("--output", required=True, help="outputs JSON file to write")
    gen.add_argument("--name", help="generator name recorded in the outputs (default: the model directory name)")
    gen.add_argument(
        "--backend",
        default="hf",
        choices=["hf", "vllm", "openai"],
        help="hf (in-process), vllm (a vLLM server neftune starts and stops) or openai (a server at --url)",
    )
    gen.add_argument("--url", help="openai: the server's base URL, e.g. http://127.0.0.1:8000/v1")
    gen.add_argument(
        "--server",
        default="other",
        choices=["vllm", "sglang", "llama.cpp", "other"],
        help="openai: what serves --url; decides how the prompt and the repetition penalty are sent",
    )
    gen.add_argument("--served-model", help="openai: the model or adapter name on the server (default: --name)")
    gen.add_argument("--vllm-python", help="vllm: the Python that has vLLM (default: make vllm's venv, then this one)")
    gen.add_argument("--vllm-args", help="vllm: more arguments for vLLM's server, e.g. '--dtype bfloat16'")
    _add_answering_args(gen, cmd_generate)

    ev = sub.add_parser(
        "eval",
        help="held-out loss and answer metrics",
        description="Held-out loss and perplexity (noise off), answer lengths, distinct-1/2, repetition, "
        "exact match on builtin:skills and ROUGE-L against references.",
    )
    ev.add_argument(
        "--model", help="model to score (held-out loss) and to generate answers with when --outputs is absent"
    )
    ev.add_argument("--outputs", help="answers from neftune generate, aligned with --data")
    ev.add_argument("--output", help="write metrics JSON here (default: print)")
    ev.add_argument("--max-length", type=int, default=512, help="max tokens per example for held-out loss")
    _add_answering_args(ev, cmd_eval)

    judge = sub.add_parser(
        "judge",
        help="pairwise judging of two outputs files (both orders)",
        description="Judge CANDIDATE against BASELINE, each pair asked in both orders. Reports the win "
        "rate with a bootstrap 95%% CI, a length-controlled win rate and position consistency.",
    )
    judge.add_argument(
        "baseline",
        help="outputs JSON of the baseline (A), or builtin:alpaca_eval to judge against its reference answers",
    )
    judge.add_argument("candidate", help="outputs JSON of the candidate (B)")
    judge.add_argument(
        "--backend", default="http", choices=["http", "local", "length"], help="judge backend (default http)"
    )
    judge.add_argument("--base-url", help="http: OpenAI-compatible base URL")
    judge.add_argument("--judge-model", help="http: model name; local: model directory, alias or hub id")
    judge.add_argument("--api-key-env", default="OPENAI_API_KEY", help="http: environment variable holding the API key")
    judge.add_argument(
        "--max-tokens", type=int, help="http: longest judge reply (default 16; a reasoning model needs ~2048)"
    )
    judge.add_argument("--temperature", type=float, help="http: sampling temperature (default 0)")
    judge.add_argument(
        "--cache", default=".neftune-judge-cache", help="verdict cache directory (a rerun costs nothing)"
    )
    judge.add_argument("--output", help="write the full result (per-pair verdicts) as JSON")
    judge.add_argument("--limit", type=int, help="judge only the first N pairs")
    judge.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    judge.add_argument("--no-progress", action="store_true", help="no progress bar")
    judge.set_defaults(func=cmd_judge)

    from neftune.audit import add_audit_parser
    from neftune.patch import add_run_parser

    add_run_parser(sub)  # neftune run -- CMD: transformers' neftune_noise_alpha made per-example in CMD
    add_audit_parser(sub)  # neftune audit: the alpha the built-in hook gives each example of a data set
    return parser


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
    overrides = [a for a in extra if "=" in a and not a.startswith("-")]
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
