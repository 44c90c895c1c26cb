"""The ``neftune`` command: a thin layer that parses arguments and calls the library.

Each subcommand turns its flags into ``section.key=value`` overrides of a typed config (see
:mod:`neftune.config`), so YAML files, overrides and flags share one validation path.  Errors caused
by input are printed as one line and exit with status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Callable, Sequence

from neftune import __version__
from neftune.errors import NeftuneError

# flag -> (dotted config key, help, kind); kind "value" takes an argument, "true"/"false" set a bool
TRAIN_FLAGS: list[tuple[str, str, str, str]] = [
    ("--model", "model.name", "hub id, local dir, .gguf file or alias (default smollm2-135m)", "value"),
    ("--data", "data.train", "training data (default builtin:skills)", "value"),
    ("--eval-data", "data.eval", "held-out data for loss with noise off", "value"),
    ("--format", "data.format", "auto, alpaca, sharegpt or messages", "value"),
    ("--output", "train.output", "output directory", "value"),
    ("--alpha", "noise.alpha", "NEFTune alpha, 0 = off (default 5)", "value"),
    ("--epochs", "train.epochs", "passes over the data", "value"),
    ("--max-steps", "train.max_steps", "optimizer steps (overrides --epochs)", "value"),
    ("--lr", "train.lr", "peak learning rate", "value"),
    ("--batch-size", "train.batch_size", "examples per step per process", "value"),
    ("--max-length", "data.max_length", "max tokens per example", "value"),
    ("--seed", "train.seed", "seed for init, data order and noise", "value"),
    ("--on-bad-record", "data.on_bad_record", "error (default) or skip (skip and count by reason)", "value"),
    ("--lora", "model.lora", "train LoRA adapters (default)", "true"),
    ("--full", "model.lora", "train all weights", "false"),
    ("--merge", "model.merge", "also write LoRA-merged weights", "true"),
    ("--packing", "data.packing", "padding-free packed rows (default)", "true"),
    ("--no-packing", "data.packing", "padded batches", "false"),
    ("--resume", "train.resume", "continue from the last checkpoint", "true"),
    ("--no-progress", "train.progress", "no progress bar", "false"),
]


def add_config_flags(parser: argparse.ArgumentParser, flags: list[tuple[str, str, str, str]], cls: type) -> None:
    """Add ``--config``, ``key=value`` overrides and the shortcut flags; list every setting in the epilog."""
    from neftune.config import iter_fields

    parser.add_argument("--config", metavar="FILE.yaml", help="YAML config file (sections as in the list below)")
    parser.usage = f"%(prog)s [options] [key=value ...]"
    for flag, key, help_text, kind in flags:
        if kind == "value":
            parser.add_argument(flag, dest=f"set:{key}", metavar="X", help=help_text)
        else:
            parser.add_argument(flag, dest=f"set:{key}", action="store_const", const=kind, help=help_text)
    lines = ["all settings (YAML sections or key=value):"]
    for name, f, _hint in iter_fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        lines.append(f"  {name:<28} {f.metadata.get('help', '')} [default: {default}]")
    parser.epilog = "\n".join(lines)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def config_from_args(args: argparse.Namespace, cls: type):
    """Defaults < --config YAML < key=value overrides < flags; validated."""
    from neftune.config import load_config

    overrides = list(getattr(args, "overrides", []))
    for dest, value in vars(args).items():
        if dest.startswith("set:") and value is not None:
            overrides.append(f"{dest[4:]}={value}")
    return load_config(cls, args.config, overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from neftune.config import Config
    from neftune.train import run_training

    cfg = config_from_args(args, Config)
    result = run_training(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        m = result.metrics
        line = f"done: {m.get('real_tokens', 0):,} tokens at {m.get('tokens_per_s', 0):.0f} tokens/s in {m.get('train_time_s', 0):.0f}s"
        if "heldout_loss" in m:
            line += f"; held-out loss {m['heldout_loss']:.4f} (noise off)"
        print(line)
        print(f"model: {result.model_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from neftune.config import Config

    parser = argparse.ArgumentParser(
        prog="neftune",
        description="Instruction finetuning with per-example NEFTune noise, and experiments that show whether it helped.",
    )
    parser.add_argument("--version", action="version", version=f"neftune {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser("train", help="finetune a model with NEFTune", description="Finetune a model with per-example NEFTune noise.")
    add_config_flags(train, TRAIN_FLAGS, Config)
    train.set_defaults(func=cmd_train)
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
    try:
        return func(args)
    except NeftuneError as e:
        print(f"neftune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("neftune: interrupted", file=sys.stderr)
        return 130
