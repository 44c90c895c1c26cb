"""The results of ``neftune compare`` as typed values: one :class:`ArmResult` per arm, one :class:`ExperimentResult`.

An arm's entry (its ``arm.json``) and the experiment's ``results.json`` are written from
:meth:`ArmResult.to_json` and :meth:`ExperimentResult.to_json`, whose key order is the documented
layout (:mod:`neftune.report`).  Reading a file back goes through ``from_json``, the one place that
tolerates older files: a part they lack is ``None`` (and is not written again), and keys this version
does not know are kept, after the known ones, so that ``from_json`` then ``to_json`` gives back the
same JSON.

    result = ExperimentResult.from_json(json.loads(Path("results.json").read_text()))
    result.arms[1].eval.scores["exact_match"]
    write_report(result, out)                  # the report reads result.to_json()
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from neftune.errors import DataError

__all__ = [
    "SCHEMA_VERSION",
    "ArmResult",
    "EvalScores",
    "Example",
    "ExperimentResult",
    "JudgeSummary",
    "Primary",
    "RunData",
    "TrainStats",
]

#: Version of the ``results.json`` layout (documented in :mod:`neftune.report`).
SCHEMA_VERSION = 2

Json = dict[str, Any]


def _block(obj: Mapping[str, Any], key: str) -> Mapping[str, Any] | None:
    """``obj[key]`` when it is a mapping, else ``None`` (missing or malformed part)."""
    value = obj.get(key)
    return value if isinstance(value, Mapping) else None


def _dict(obj: Mapping[str, Any], key: str) -> Json | None:
    """A copy of ``obj[key]`` when it is a mapping, else ``None``."""
    value = _block(obj, key)
    return None if value is None else dict(value)


def _extra(obj: Mapping[str, Any], known: tuple[str, ...]) -> Json:
    """The keys of ``obj`` this version does not know, in their order."""
    return {k: v for k, v in obj.items() if k not in known}


def _names(cls: type) -> tuple[str, ...]:
    """The JSON keys of a results dataclass: its fields, less :class:`_Part`'s."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.name not in ("extra", "absent"))


@dataclass
class _Part:
    """What every part read back from a file keeps so that writing it again gives the same JSON."""

    extra: Json = field(default_factory=dict, kw_only=True, repr=False)
    """Keys this version does not know, written after the known ones."""
    absent: frozenset[str] = field(default=frozenset(), kw_only=True, repr=False)
    """Known keys the file lacked (an older layout): they are not written either."""

    def _finish(self, entry: Json) -> Json:
        """``entry`` less the :attr:`absent` keys, plus the :attr:`extra` ones."""
        return {k: v for k, v in entry.items() if k not in self.absent} | self.extra

    @staticmethod
    def _kept(obj: Mapping[str, Any], names: tuple[str, ...], known: tuple[str, ...] = ()) -> dict[str, Any]:
        """The ``extra`` and ``absent`` of a part read from ``obj`` whose keys are ``names`` (``known``: also
        known, handled elsewhere)."""
        return {"extra": _extra(obj, (*names, *known)), "absent": frozenset(k for k in names if k not in obj)}


@dataclass
class TrainStats(_Part):
    """What training left in the arm's directory: its curves and speed."""

    loss_curve: list[list[float]] = field(default_factory=list)
    """``[step, loss]`` pairs of the training loss."""
    heldout_curve: list[list[float]] = field(default_factory=list)
    """``[step, loss]`` pairs of the held-out loss measured during training."""
    train_time_s: float | None = None
    tokens_per_s: float | None = None

    def to_json(self) -> Json:
        """The arm's ``train`` block."""
        return self._finish(
            {
                "loss_curve": self.loss_curve,
                "heldout_curve": self.heldout_curve,
                "train_time_s": self.train_time_s,
                "tokens_per_s": self.tokens_per_s,
            }
        )

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> TrainStats:
        """Read a ``train`` block."""
        return cls(
            loss_curve=list(obj.get("loss_curve") or []),
            heldout_curve=list(obj.get("heldout_curve") or []),
            train_time_s=obj.get("train_time_s"),
            tokens_per_s=obj.get("tokens_per_s"),
            **cls._kept(obj, _names(cls)),
        )


_EVAL_FIELDS = (
    "length_chars",
    "length_tokens",
    "reached_cap",
    "max_new_tokens",
    "per_example",
    "ifeval",
)


@dataclass
class EvalScores(_Part):
    """An arm's evaluation with the noise off: held-out loss, its answers' metrics, their lengths."""

    heldout_loss: float | None = None
    perplexity: float | None = None
    scores: Json = field(default_factory=dict)
    """The metric registry's numbers under their keys, in registry order (:func:`neftune.evaluate.arm_scores`:
    each :func:`neftune.metrics.arm_metrics` key, a metric scored per family followed by ``<key>_by_family``)."""
    length_chars: dict[str, float] | None = None
    """``{"mean", "median", "p90"}`` of the answers' lengths in characters."""
    length_tokens: dict[str, float] | None = None
    reached_cap: float | None = None
    """Share of the answers cut off at :attr:`max_new_tokens` (their lengths are censored)."""
    max_new_tokens: int | None = None
    per_example: dict[str, list[Any] | None] | None = None
    """Per-example lists aligned by eval prompt: every paired metric's (:attr:`neftune.metrics.MetricSpec.per_example`)
    and the token-cap flags."""
    ifeval: Json | None = None
    """The IFEval breakdown, when the prompts were IFEval's."""

    def to_json(self) -> Json:
        """The arm's ``eval`` block."""
        return self._finish(
            {
                "heldout_loss": self.heldout_loss,
                "perplexity": self.perplexity,
                **self.scores,
                "length_chars": self.length_chars,
                "length_tokens": self.length_tokens,
                "reached_cap": self.reached_cap,
                "max_new_tokens": self.max_new_tokens,
                "per_example": self.per_example,
                "ifeval": self.ifeval,
            }
        )

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> EvalScores:
        """Read an ``eval`` block; every key besides the named parts is a score, in its order."""
        named = ("heldout_loss", "perplexity", *_EVAL_FIELDS)
        return cls(
            heldout_loss=obj.get("heldout_loss"),
            perplexity=obj.get("perplexity"),
            scores=_extra(obj, named),
            length_chars=obj.get("length_chars"),
            length_tokens=obj.get("length_tokens"),
            reached_cap=obj.get("reached_cap"),
            max_new_tokens=obj.get("max_new_tokens"),
            per_example=_dict(obj, "per_example"),
            ifeval=obj.get("ifeval"),
            absent=frozenset(k for k in named if k not in obj),
        )


@dataclass
class JudgeSummary(_Part):
    """What ``results.json`` keeps of an arm's judgement against its seed's baseline (all of it: ``judge.json``)."""

    vs: str
    """The baseline arm it was judged against."""
    backend: str
    win_rate: float | None = None
    ci: list[float] | None = None
    lc_win_rate: float | None = None
    lc_ci: list[float] | None = None
    lc_estimable: bool | None = None
    lc_reason: str | None = None
    consistency: float | None = None
    n: int | None = None
    n_failed: int | None = None
    n_ties: int | None = None
    n_identical: int | None = None
    score_basis: str | None = None
    verdict_win_rate: float | None = None
    mean_probability: float | None = None
    probability_ci: list[float] | None = None
    n_probability: int | None = None

    @classmethod
    def kept_keys(cls) -> tuple[str, ...]:
        """The judge result's keys that are kept (:meth:`neftune.judge.JudgeResult.to_dict`), in order."""
        return _names(cls)[2:]

    @classmethod
    def from_verdict(cls, vs: str, backend: str, verdict: Mapping[str, Any]) -> JudgeSummary:
        """The summary of a judge result's ``to_dict()``."""
        values: dict[str, Any] = {k: verdict.get(k) for k in cls.kept_keys()}
        return cls(vs, backend, **values)

    def to_json(self) -> Json:
        """The arm's ``judge`` block."""
        return self._finish({name: getattr(self, name) for name in _names(type(self))})

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> JudgeSummary:
        """Read a ``judge`` block (a part an older file lacks is ``None``)."""
        names = _names(cls)
        values: dict[str, Any] = {k: obj.get(k) for k in names}
        return cls(**values, **cls._kept(obj, names))


@dataclass
class ArmResult(_Part):
    """One arm's entry in ``results.json`` (and its ``arm.json``)."""

    name: str
    alpha: float | None = None
    seed: int | None = None
    train: TrainStats | None = None
    eval: EvalScores | None = None
    judge: JudgeSummary | None = None
    fingerprint: Json | None = None
    """What determined the arm (:mod:`neftune.fingerprint`), as recorded when it was trained."""
    wall_time_s: float | None = None
    """Training and evaluation, in seconds (written once the arm is finished)."""
    error: str | None = None
    """Why the arm failed; the report lists it as failed and leaves it out of every comparison."""

    def to_json(self) -> Json:
        """The entry as JSON values; ``error`` and ``wall_time_s`` only when set."""
        entry: Json = {"name": self.name, "alpha": self.alpha, "seed": self.seed}
        if self.error is not None:
            entry["error"] = self.error
        entry.update(
            train=None if self.train is None else self.train.to_json(),
            eval=None if self.eval is None else self.eval.to_json(),
            judge=None if self.judge is None else self.judge.to_json(),
            fingerprint=self.fingerprint,
        )
        if self.wall_time_s is not None:
            entry["wall_time_s"] = self.wall_time_s
        return self._finish(entry)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> ArmResult:
        """Read an arm's entry; raises :class:`DataError` when it is not an object."""
        if not isinstance(obj, Mapping):
            raise DataError(f"an arm must be a JSON object, got {type(obj).__name__}")
        train, ev, judge = _block(obj, "train"), _block(obj, "eval"), _block(obj, "judge")
        return cls(
            name=str(obj.get("name", "?")),
            alpha=obj.get("alpha"),
            seed=obj.get("seed"),
            train=None if train is None else TrainStats.from_json(train),
            eval=None if ev is None else EvalScores.from_json(ev),
            judge=None if judge is None else JudgeSummary.from_json(judge),
            fingerprint=_dict(obj, "fingerprint"),
            wall_time_s=obj.get("wall_time_s"),
            error=obj.get("error"),
            **cls._kept(obj, _names(cls)),
        )


@dataclass
class RunData(_Part):
    """The data of the experiment: what was trained on, answered and held out, and how much of each."""

    train: str | None = None
    eval: str | None = None
    """The prompts every arm answered."""
    heldout: str | None = None
    """The held-out loss's data (== :attr:`eval` unless ``generate.prompts`` named other prompts)."""
    n_train: int | None = None
    n_eval: int | None = None
    n_heldout: int | None = None
    primary_metric: str | None = None
    """The eval set's preset metric (:mod:`neftune.data.presets`)."""

    def to_json(self) -> Json:
        """The experiment's ``data`` block."""
        return self._finish({name: getattr(self, name) for name in _names(type(self))})

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> RunData:
        """Read a ``data`` block."""
        names = _names(cls)
        values: dict[str, Any] = {k: obj.get(k) for k in names}
        return cls(**values, **cls._kept(obj, names))


@dataclass
class Primary:
    """The metric the verdict rests on, declared before any arm trained (:func:`neftune.metrics.declare_primary`)."""

    metric: str | None
    source: str
    fallback: str | None = None

    def to_json(self) -> Json:
        """The experiment's ``primary`` block."""
        return {"metric": self.metric, "source": self.source, "fallback": self.fallback}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Primary:
        """Read a ``primary`` block."""
        return cls(obj.get("metric"), str(obj.get("source") or ""), obj.get("fallback"))


@dataclass
class Example:
    """One eval prompt with every arm's answer side by side."""

    instruction: str
    reference: str | None
    outputs: dict[str, str]
    """Arm name -> answer."""

    def to_json(self) -> Json:
        """One entry of the experiment's ``examples``."""
        return {"instruction": self.instruction, "reference": self.reference, "outputs": self.outputs}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Example:
        """Read one entry of ``examples``."""
        return cls(str(obj.get("instruction", "")), obj.get("reference"), _dict(obj, "outputs") or {})


_REPORT_KEYS = ("schema_version", "analysis")  # written by the report, recomputed on every write


@dataclass
class ExperimentResult(_Part):
    """The whole experiment: what ran, on what, and every arm's result (``results.json`` less the analysis)."""

    arms: list[ArmResult]
    title: str | None = None
    created: str | None = None
    """When the results were put together, ISO-8601."""
    wall_time_s: float | None = None
    model: Json | None = None
    """``{"spec": ...}`` and the model's description from the baseline's training (parameters, dtype, ...)."""
    data: RunData | None = None
    primary: Primary | None = None
    seeds: list[int] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    settings: Json | None = None
    """The run details as the baseline arm recorded them (:func:`neftune.fingerprint.recorded_settings`)."""
    baseline: str | None = None
    """Name of the baseline arm; when ``None`` the report takes the first arm with ``alpha == 0``."""
    examples: list[Example] = field(default_factory=list)

    def arm(self, name: str) -> ArmResult:
        """The arm called ``name``; :class:`KeyError` when there is none."""
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise KeyError(name)

    def to_json(self) -> Json:
        """``results.json`` as written before the report adds its ``analysis``."""
        entry: Json = {
            "title": self.title,
            "created": self.created,
            "wall_time_s": self.wall_time_s,
            "model": self.model,
            "data": None if self.data is None else self.data.to_json(),
            "primary": None if self.primary is None else self.primary.to_json(),
            "seeds": self.seeds,
            "versions": self.versions,
            "settings": self.settings,
            "baseline": self.baseline,
            "arms": [arm.to_json() for arm in self.arms],
            "examples": [example.to_json() for example in self.examples],
        }
        return self._finish(entry) | {"schema_version": SCHEMA_VERSION}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> ExperimentResult:
        """Read ``results.json`` of this version or an older one (the report's ``analysis`` is dropped).

        Raises :class:`DataError` when ``obj`` is not an object, its ``arms`` not a list, or it was
        written by a newer neftune (a higher ``schema_version``).
        """
        if not isinstance(obj, Mapping):
            raise DataError(f"results must be a JSON object, got {type(obj).__name__}")
        version = obj.get("schema_version", SCHEMA_VERSION)
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise DataError(f"results.json has schema_version {version!r}; this neftune reads up to {SCHEMA_VERSION}")
        arms = obj.get("arms", [])
        if not isinstance(arms, list):
            raise DataError(f"results: arms must be a list, got {type(arms).__name__}")
        data, primary = _block(obj, "data"), _block(obj, "primary")
        examples = obj.get("examples")
        return cls(
            arms=[ArmResult.from_json(arm) for arm in arms],
            title=obj.get("title"),
            created=obj.get("created"),
            wall_time_s=obj.get("wall_time_s"),
            model=_dict(obj, "model"),
            data=None if data is None else RunData.from_json(data),
            primary=None if primary is None else Primary.from_json(primary),
            seeds=list(obj.get("seeds") or []),
            versions=_dict(obj, "versions") or {},
            settings=_dict(obj, "settings"),
            baseline=obj.get("baseline"),
            examples=[Example.from_json(e) for e in examples if isinstance(e, Mapping)]
            if isinstance(examples, list)
            else [],
            **cls._kept(obj, _names(cls), _REPORT_KEYS),
        )
