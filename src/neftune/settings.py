"""Settings and commands: how a config class declares its fields and becomes a subcommand.

A setting is a dataclass field that carries its help text (and optionally its command-line flag)
as metadata; a :class:`Command` names a config class of such settings and the function that runs
with it.  :mod:`neftune.cli_flags` builds every ``neftune`` subcommand's flags from these, so a
flag's name, type, allowed values, default and help are each written once, on the field.

Only the standard library is imported here: :mod:`neftune.patch`, which every process under
``neftune run`` imports, declares its command with it.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Command", "reused", "setting"]


def setting(default: Any, help: str, *, flag: str | dict[str, Any] | None = None, **kw: Any) -> Any:
    """A config field with its help text, the single source of the CLI's help.

    ``flag`` makes it a command-line flag too: ``"--lr"`` takes a value (or, for a bool, sets it to
    true); ``{"--lora": True, "--full": False}`` gives a setting one flag per value, and
    ``flag_help={"--full": "..."}`` a flag its own help.  A name without dashes is a positional
    argument.  A field typed with a ``Literal`` (:mod:`neftune.choices`) takes only its values.
    ``required=True`` makes the flag mandatory, ``group="NAME"`` puts it in a mutually exclusive
    group (required if its flags are), ``nargs`` and ``metavar`` go to argparse as they are.  Lists
    and dicts are copied per instance.
    """
    metadata = {"help": help, "flag": flag, **kw}
    if isinstance(default, (list, dict)):
        return field(default_factory=functools.partial(copy.copy, default), metadata=metadata)
    return field(default=default, metadata=metadata)


def reused(cls: type, name: str, **changes: Any) -> Any:
    """Setting ``name`` of config class ``cls`` for another config: the same help and default (the
    annotation repeats the type, for the type checker), with ``changes`` (``flag=``, ``flag_help=``,
    ``default=``, ``help=`` ...) on top.  A flag is never inherited: each command names its own."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    metadata = {**f.metadata, "flag": None, "flag_help": {}, **changes}
    if "default" in metadata:
        default = metadata.pop("default")
    elif f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        default = f.default
    return setting(default, metadata.pop("help"), **metadata)


@dataclass(frozen=True)
class Command:
    """A ``neftune`` subcommand: its config class, the function that runs with one, and its texts.

    With ``config_file`` the command reads settings as ``train`` and ``compare`` do: ``--config``
    YAML, ``section.key=value`` overrides, then flags, validated by the config's ``validate()``
    and listed in ``--help``.  Without, its flags are plain command-line arguments: typed, with
    their allowed values, and the config is built from them alone.
    """

    name: str
    settings: type
    run: Callable[[Any], int]
    help: str
    description: str
    usage: str | None = None
    """argparse's usage line, when the generated one would mislead."""
    config_file: bool = False
    recipes: bool = False
    """``--preset NAME``: start from a shipped recipe (with ``config_file``)."""
    allow_abbrev: bool = True
    """False: a flag must be spelled out (``--alpha`` must not mean ``--alphas``)."""
