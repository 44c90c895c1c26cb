"""Every ``neftune`` subcommand's parser, built from its config class (:class:`~neftune.settings.Command`).

A command's flags are the settings of its config class that declare one (``setting(flag=...)``):
the flag's type, allowed values (a ``Literal`` field), default and help come from the field.  Two
kinds of command share this builder:

* config-file commands (``train``, ``compare``) take ``--config FILE.yaml`` and ``section.key=value``
  overrides too; a flag is one more override (``--lr 1e-4`` is ``train.lr=1e-4``), so all three
  pass through one validation (:func:`neftune.config.load_config`), and ``--help`` lists every
  setting with its default;
* the others (``generate``, ``eval``, ``judge``, ``run``, ``audit``) take typed flags that argparse
  checks (numbers, allowed values, required flags, mutually exclusive groups), and their config is
  built from the flags alone.
"""

from __future__ import annotations

import argparse
import functools
from typing import Any

from neftune.choices import choices_of
from neftune.config_io import Flag, command_flags, default_of, from_dict, iter_fields, unwrap_optional
from neftune.settings import Command

__all__ = ["add_command", "add_config_flags", "add_flags", "config_from_args", "settings_from_args"]

PRESET_HELP = (
    "start from a shipped experiment recipe: demo (ShareGPT first turns, IFEval subset, ~15 min on 2 CPU "
    "cores), skills (builtin:skills, the fast sanity check) or study (alpha 0/5/10/15 x 3 seeds, ~95 min); "
    "--config, key=value and flags override it"
)


def add_command(sub: Any, command: Command) -> argparse.ArgumentParser:
    """Add ``command`` to the subparsers ``sub``: its flags, and a ``func`` that builds its config and runs it."""
    parser: argparse.ArgumentParser = sub.add_parser(
        command.name, help=command.help, description=command.description, allow_abbrev=command.allow_abbrev
    )
    if command.config_file:
        if command.recipes:
            parser.add_argument("--preset", metavar="NAME", help=PRESET_HELP)
        add_config_flags(parser, command.settings)
    else:
        add_flags(parser, command.settings)
    if command.usage:
        parser.usage = command.usage
    parser.set_defaults(func=functools.partial(_run, command), takes_overrides=command.config_file)
    return parser


def _run(command: Command, args: argparse.Namespace) -> int:
    if command.config_file:
        cfg = config_from_args(args, command.settings)  # before the command imports torch: a bad flag fails fast
    else:
        cfg = settings_from_args(args, command.settings)
    return command.run(cfg)


def add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add ``--config``, ``key=value`` overrides and the flags declared in ``cls``'s field metadata
    (:func:`neftune.config.command_flags`); list every setting with its default in the epilog."""
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML config file (sections as in the list below)")
    parser.usage = "%(prog)s [options] [key=value ...]"
    for flag in command_flags(cls):
        if flag.const is None:
            parser.add_argument(
                flag.name, dest=_dest(flag), metavar=flag.metavar, help=_escape(f"{flag.help} ({flag.key})")
            )
        else:
            value = _spelled(flag.const)
            parser.add_argument(
                flag.name,
                dest=_dest(flag),
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


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add the flags declared in ``cls``'s field metadata as typed arguments: ``int`` and ``float``
    settings parse as numbers, ``Literal`` ones offer their values, ``required`` and ``group``
    make required flags and mutually exclusive groups."""
    groups: dict[str, Any] = {}
    for flag in command_flags(cls):
        meta = flag.meta
        target: Any = parser
        group = meta.get("group")
        if group is not None:
            if group not in groups:
                groups[group] = parser.add_mutually_exclusive_group(required=bool(meta.get("required")))
            target = groups[group]
        kwargs: dict[str, Any] = {"help": _escape(flag.help)}
        if not flag.name.startswith("-"):  # positional: argparse names it after the flag
            if "nargs" in meta:
                kwargs["nargs"] = meta["nargs"]
            target.add_argument(flag.name, **kwargs)
            continue
        kwargs["dest"] = _dest(flag)
        if flag.const is not None:
            target.add_argument(flag.name, action="store_const", const=flag.const, **kwargs)
            continue
        choices = choices_of(flag.hint)
        if choices is not None:
            kwargs["choices"] = choices
        else:
            kwargs["type"] = {int: int, float: float}.get(unwrap_optional(flag.hint))
            kwargs["metavar"] = meta.get("metavar") or flag.name.lstrip("-").replace("-", "_").upper()
        if meta.get("required") and group is None:
            kwargs["required"] = True
        target.add_argument(flag.name, **kwargs)


def _dest(flag: Flag) -> str:
    return flag.name if not flag.name.startswith("-") else f"set:{flag.key}"


def _spelled(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _escape(text: str) -> str:
    return text.replace("%", "%%")  # argparse formats help strings with %


def config_from_args(args: argparse.Namespace, cls: type) -> Any:
    """Defaults < recipe (``--preset``) < --config YAML < key=value overrides < flags; validated."""
    from neftune.config import load_config

    overrides = list(getattr(args, "overrides", []))
    for dest, value in vars(args).items():
        if dest.startswith("set:") and value is not None:
            overrides.append(f"{dest[4:]}={value}")
    return load_config(cls, args.config, overrides, recipe=getattr(args, "preset", None))


def settings_from_args(args: argparse.Namespace, cls: type) -> Any:
    """The config ``cls`` from the flags :func:`add_flags` added: a flag not given keeps the default."""
    data: dict[str, Any] = {}
    for flag in command_flags(cls):
        value = getattr(args, _dest(flag), None)
        if value is None:
            continue
        *sections, name = flag.key.split(".")
        node = data
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = value
    return from_dict(cls, data)
