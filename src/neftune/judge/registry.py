"""Judge backends by name, for configs and the command line."""

from __future__ import annotations

from typing import Any

from neftune.errors import ConfigError
from neftune.judge.base import Judge
from neftune.judge.http import HttpJudge
from neftune.judge.length import LengthJudge
from neftune.judge.local import LocalJudge

__all__ = ["JUDGES", "build_judge", "make_judge"]

#: Judge backends by name (see :func:`make_judge`).
JUDGES: dict[str, type[Judge]] = {
    "http": HttpJudge,
    "local": LocalJudge,
    "length": LengthJudge,
    "dummy": LengthJudge,
}


def make_judge(name: str, **options: Any) -> Judge:
    """Build the judge backend registered as ``name`` in :data:`JUDGES` with keyword ``options``.

    Raises :class:`ConfigError` for an unknown name or options the backend does not take.
    """
    try:
        cls = JUDGES[name]
    except KeyError:
        raise ConfigError(f"unknown judge {name!r}; choose one of {', '.join(sorted(JUDGES))}") from None
    try:
        return cls(**options)
    except TypeError as exc:
        raise ConfigError(f"judge {name!r}: {exc}") from None


def build_judge(
    backend: str,
    *,
    model: str = "",
    base_url: str = "",
    api_key_env: str = "OPENAI_API_KEY",
    trust_remote_code: bool = False,
    max_tokens: int | None = None,
    temperature: float | None = None,
    **options: Any,
) -> Judge | None:
    """The judge for a backend name and its settings (``"none"`` gives None).

    ``local`` loads ``model`` (a directory, alias or hub id) through :mod:`neftune.models`; ``http``
    takes ``model`` as the endpoint's model name, and ``max_tokens`` / ``temperature`` when given
    (None keeps :class:`~neftune.judge.http.HttpJudge`'s defaults; other backends ignore them, since
    they do not sample).  Further ``options`` go to the backend's constructor.
    """
    if backend == "none":
        return None
    if backend == "http":
        sampling = {k: v for k, v in (("max_tokens", max_tokens), ("temperature", temperature)) if v is not None}
        return make_judge("http", base_url=base_url, model=model, api_key_env=api_key_env, **sampling, **options)
    if backend == "local":
        from neftune.models import load_model_and_tokenizer

        loaded, tokenizer = load_model_and_tokenizer(model, for_training=False, trust_remote_code=trust_remote_code)
        return make_judge("local", model=loaded, tokenizer=tokenizer, **options)
    return make_judge(backend, **options)
