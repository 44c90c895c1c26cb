"""Reading, overriding, writing and listing typed config trees (the machinery under :mod:`neftune.config`).

A config tree is nested dataclasses whose fields carry ``help`` (and optionally ``flag``) metadata,
as :func:`neftune.config.setting` makes them.  :func:`from_dict` builds a tree from plain data,
coercing and checking every value's type; :func:`apply_overrides` applies ``section.key=value``
strings; :func:`read_yaml` reads a config file with one-line errors naming the file and line;
:func:`to_dict` and :func:`write_config` give the tree back with secrets redacted; :func:`iter_fields`
and :func:`command_flags` list the settings and the command-line flags they declare; :func:`recipe_path`
finds a shipped recipe (``--preset``) and :func:`merge_tree` lays one tree of settings over another.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from neftune.errors import ConfigError
from neftune.io import not_a_regular_file

__all__ = [
    "SECRET_MARKERS",
    "Flag",
    "apply_overrides",
    "command_flags",
    "default_of",
    "from_dict",
    "iter_fields",
    "merge_tree",
    "read_yaml",
    "recipe_names",
    "recipe_path",
    "to_dict",
    "unwrap_optional",
    "write_config",
]

SECRET_MARKERS = ("key", "token", "secret", "password")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, coercing and checking each value's type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(
                f"unknown setting {prefix}{key} (known under {prefix.rstrip('.') or 'top level'}: {known})"
            )
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, name: str) -> Any:
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return from_dict(hint, value if value is not None else {}, name + ".")
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for candidate in inner:
            try:
                return _coerce(candidate, value, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, (int, float, bool)):
            value = [value]  # `--alphas 5` or `alphas: 5`: a list of one
        if not isinstance(value, list):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return [_coerce(args[0], v, name) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if hint is int or hint is float:  # an int for a float setting is that number; a bool is neither
        if isinstance(value, (int, float) if hint is float else int) and not isinstance(value, bool):
            return hint(value)
        if isinstance(value, str):
            try:
                return hint(value)
            except ValueError:
                pass
        raise ConfigError(f"{name} must be {'a number' if hint is float else 'an integer'}, got {value!r}")
    if hint is str or origin is Literal:  # a Literal's values are checked by the config's validate()
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{name} must be a string, got {value!r}")
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` strings to a nested dict (values parsed as YAML scalars)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict, with one-line errors naming the file and line."""
    path = Path(path)
    problem = not_a_regular_file(path)
    if problem:
        raise ConfigError(f"config file {path} {problem}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise ConfigError(f"{path}: invalid YAML (nested too deeply)") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}{where}: invalid YAML ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def to_dict(cfg: Any, redact: bool = True) -> dict[str, Any]:
    """The config as plain data; with ``redact``, values of secret-looking keys become '***'."""
    data = dataclasses.asdict(cfg)
    return _redact(data) if redact else data


def _redact(node: Any, key: str = "") -> Any:
    if isinstance(node, dict):
        return {k: _redact(v, k) for k, v in node.items()}
    if isinstance(node, list):
        return [_redact(v, key) for v in node]
    lowered = key.lower()
    # `*_env` fields hold the *name* of an environment variable, which is not a secret; markers are
    # matched per word (`api_key`, `apikey`, `hf_token`) so that `max_new_tokens` is not a secret
    words = lowered.replace("-", "_").split("_")
    secret = any(word.endswith(m) for word in words for m in SECRET_MARKERS)
    if node and secret and not lowered.endswith("_env"):
        return "***"
    return node


def write_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved, redacted config as YAML (atomically: a full disk leaves the previous file)."""
    from neftune.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def iter_fields(cls: type, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field[Any], Any]]:
    """Yield ``(dotted_name, field, type_hint)`` for every leaf setting (for --help and docs)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            yield from iter_fields(hint, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, hint


@dataclass(frozen=True)
class Flag:
    """A command-line flag generated from a setting's metadata (see :func:`neftune.config.setting`)."""

    name: str
    """e.g. ``"--lr"``; a name without dashes is a positional argument."""
    key: str
    """The setting it sets, e.g. ``"train.lr"``."""
    const: Any
    """``None``: the flag takes a value; else the value it sets (``True``/``False`` for a bool setting)."""
    help: str
    metavar: str
    """What the value looks like: ``N`` (integer), ``X`` (number), ``X,Y`` (list) or ``VALUE``."""
    hint: Any = None
    """The setting's type; a ``Literal`` gives the allowed values (:func:`neftune.choices.choices_of`)."""
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    """The setting's metadata: ``required``, ``group`` (mutually exclusive), ``nargs``, ``metavar``."""


def command_flags(cls: type) -> list[Flag]:
    """The flags of every setting of ``cls`` that declares one, in tree order.

    Settings a config sets itself (``cls.SET_PER_ARM``) get no flag.  A setting's ``flag_help``
    metadata gives a flag of its own help (``{"--no-progress": "no progress bar"}``).  Two settings
    claiming one flag is a programming error (``ValueError``).
    """
    skip = set(getattr(cls, "SET_PER_ARM", ()))
    flags: list[Flag] = []
    owner: dict[str, str] = {}
    for key, f, hint in iter_fields(cls):
        spec = f.metadata.get("flag")
        if spec is None or key in skip:
            continue
        names = {spec: True if hint is bool else None} if isinstance(spec, str) else dict(spec)
        own_help = f.metadata.get("flag_help", {})
        for name, const in names.items():
            if name in owner:
                raise ValueError(f"flag {name} is claimed by both {owner[name]} and {key}")
            owner[name] = key
            text = own_help.get(name, f.metadata.get("help", ""))
            flags.append(Flag(name, key, const, text, _metavar(hint), hint, f.metadata))
    return flags


def unwrap_optional(hint: Any) -> Any:
    """``X`` for ``X | None``; any other type as it is."""
    inner = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(inner) == 1:
        return inner[0]
    return hint


def _metavar(hint: Any) -> str:
    hint = unwrap_optional(hint)
    if typing.get_origin(hint) is list:
        return "X,Y"
    return {int: "N", float: "X"}.get(hint, "VALUE")


def default_of(f: dataclasses.Field[Any]) -> Any:
    """A field's default value (a fresh copy for list/dict settings)."""
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


RECIPES = Path(__file__).parent / "recipes"
"""Shipped experiment recipes: ``neftune compare --preset NAME`` starts from ``recipes/NAME.yaml``."""


def recipe_names() -> list[str]:
    """The names ``--preset`` accepts, sorted."""
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def recipe_path(name: str) -> Path:
    """The YAML file of recipe ``name``; a one-line error naming the known recipes."""
    path = RECIPES / f"{name}.yaml"
    if not name.replace("-", "").replace("_", "").isalnum() or not path.is_file():
        raise ConfigError(f"unknown preset {name[:40]!r}; use one of {', '.join(recipe_names())}")
    return path


def merge_tree(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Merge the nested mapping ``top`` into ``base`` (``top`` wins, sections merge); return ``base``."""
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge_tree(base[key], value)
        else:
            base[key] = value
    return base
