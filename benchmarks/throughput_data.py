"""The model and the data every arm of ``throughput.py`` trains on, and the generation prompts."""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from neftune.data.template import IGNORE_INDEX
from throughput_arms import RANDOM_LLAMA, Settings, device

# -- models ----------------------------------------------------------------------------------


def build_tokenizer(settings: Settings) -> Any:
    """The tokenizer of the benchmark model (the byte-level tiny tokenizer for the random Llama)."""
    if settings.model == RANDOM_LLAMA:
        from neftune.tiny import build_tiny_tokenizer

        return build_tiny_tokenizer()
    from neftune.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(settings.model, for_training=True)
    del model
    return tokenizer


def random_llama(settings: Settings, tokenizer: Any) -> Any:
    """A random-init ~1B Llama (d=2048, 16 layers, 32 heads, vocab 32000), built on the device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from neftune.models import resolve_dtype

    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=max(4096, settings.ceiling_length),
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        attn_implementation=settings.attn,
        use_cache=False,
    )
    with torch.device(device()):
        model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(resolve_dtype("auto", device()))


def build_model(settings: Settings, tokenizer: Any, *, for_training: bool = True) -> Any:
    """A fresh, seeded copy of the benchmark model, LoRA-wrapped as ``neftune train`` does."""
    from neftune.models import default_lora_targets, load_model_and_tokenizer

    torch.manual_seed(settings.seed)
    if settings.model == RANDOM_LLAMA:
        model = random_llama(settings, tokenizer)
        model.train(for_training)
    else:
        model, _ = load_model_and_tokenizer(settings.model, for_training=for_training)
        if model.config._attn_implementation != settings.attn:
            model.set_attn_implementation(settings.attn)
    if for_training and settings.lora:
        from peft import LoraConfig, get_peft_model

        from neftune.config import ModelConfig

        defaults = ModelConfig()
        model = get_peft_model(
            model,
            LoraConfig(
                r=settings.lora_r,
                lora_alpha=defaults.lora_alpha,
                lora_dropout=defaults.lora_dropout,
                target_modules=default_lora_targets(model),
                task_type="CAUSAL_LM",
            ),
        )
    return model


# -- data ------------------------------------------------------------------------------------


@dataclass
class BenchData:
    """The examples every arm trains on and the prompts the generation benchmark answers."""

    rows: list[dict[str, list[int]]]
    """Tokenized training examples (``input_ids``, ``labels``) in the order every arm consumes them."""
    gen_prompts: list[list[int]]
    """Token ids of the generation prompts, of mixed length."""
    notes: dict[str, Any]


def sharegpt_data(settings: Settings, tokenizer: Any, n_rows: int) -> BenchData:
    """First turns (up to and including the first assistant answer) of shuffled ShareGPT conversations."""
    from neftune.data.formats import Example, load_examples
    from neftune.data.template import encode_examples

    loaded = load_examples("builtin:sharegpt", on_bad_record="skip")
    firsts = []
    for example in loaded.examples:
        end = next(i for i, m in enumerate(example.messages) if m["role"] == "assistant")
        firsts.append(Example(messages=example.messages[: end + 1]))
    random.Random(settings.seed).shuffle(firsts)
    rows: list[dict[str, list[int]]] = []
    used, dropped = 0, 0
    while len(rows) < n_rows and used < len(firsts):
        chunk = firsts[used : used + n_rows]
        used += len(chunk)
        kept, drops = encode_examples(tokenizer, chunk, settings.max_length)
        rows.extend(kept)
        dropped += sum(drops.values())
    prompts = generation_prompts(settings, tokenizer, firsts[used:])
    notes = {
        "source": "builtin:sharegpt first turns",
        "conversations": len(loaded.examples),
        "encoded": used,
        "dropped_all_prompt_after_truncation_or_template": dropped,
    }
    return BenchData(rows[:n_rows], prompts, notes)


def generation_prompts(settings: Settings, tokenizer: Any, examples: Sequence[Any]) -> list[list[int]]:
    """Token ids of the first ``gen_prompts`` prompts of ``examples`` no longer than ``gen_prompt_max``."""
    from neftune.data.template import encode_prompt

    prompts = []
    for example in examples:
        ids = encode_prompt(tokenizer, example.prompt_messages)
        if len(ids) <= settings.gen_prompt_max:
            prompts.append(ids)
        if len(prompts) == settings.gen_prompts:
            break
    return prompts


def skills_data(settings: Settings, tokenizer: Any, n_rows: int) -> BenchData:
    """Shuffled ``builtin:skills`` training examples (short tasks: mostly prompt, answers of a few tokens)."""
    from neftune.data.formats import load_examples
    from neftune.data.template import encode_examples

    examples = list(load_examples("builtin:skills", split="train", seed=settings.seed).examples)
    random.Random(settings.seed).shuffle(examples)
    rows, drops = encode_examples(tokenizer, examples[:n_rows], settings.max_length)
    notes = {"source": "builtin:skills (train split)", "dropped": sum(drops.values())}
    return BenchData(rows, generation_prompts(settings, tokenizer, examples[n_rows:]), notes)


def alpaca_like_data(settings: Settings, tokenizer: Any, n_rows: int) -> BenchData:
    """Random token ids with Alpaca-like lengths: prompt ~ lognormal(median 20), response ~ lognormal(median 80)."""
    rng = random.Random(settings.seed)
    vocab = plain_token_ids(tokenizer)
    eos = tokenizer.eos_token_id

    def prompt_len(cap: int) -> int:
        return max(4, min(cap, round(rng.lognormvariate(math.log(20), 0.8))))

    rows = []
    for _ in range(n_rows):
        n_prompt = prompt_len(settings.max_length // 2)
        n_answer = max(1, min(settings.max_length - n_prompt - 1, round(rng.lognormvariate(math.log(80), 0.9))))
        prompt = rng.choices(vocab, k=n_prompt)
        answer = [*rng.choices(vocab, k=n_answer), eos]
        rows.append({"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * n_prompt + answer})
    prompts = [rng.choices(vocab, k=prompt_len(settings.gen_prompt_max)) for _ in range(settings.gen_prompts)]
    notes = {
        "source": "synthetic: prompt ~ lognormal(median 20, sigma 0.8), response ~ lognormal(median 80, sigma 0.9)"
        " + eos, random token ids"
    }
    return BenchData(rows, prompts, notes)


DATA_SOURCES: dict[str, Callable[[Settings, Any, int], BenchData]] = {
    "sharegpt": sharegpt_data,
    "skills": skills_data,
    "alpaca-like": alpaca_like_data,
}


def plain_token_ids(tokenizer: Any) -> list[int]:
    """Ids that are neither special tokens nor beyond the random Llama's 32000-row vocabulary."""
    special = set(tokenizer.all_special_ids)
    return [i for i in range(min(len(tokenizer), 32000)) if i not in special]


def describe_lengths(rows: Sequence[dict[str, list[int]]], max_length: int) -> dict[str, Any]:
    """Length statistics of the training examples, in tokens."""
    lengths = [len(r["input_ids"]) for r in rows]
    return {
        "examples": len(lengths),
        "mean_tokens": round(statistics.mean(lengths), 1),
        "median_tokens": statistics.median(lengths),
        "max_tokens": max(lengths),
        "share_at_max_length": round(sum(n >= max_length for n in lengths) / len(lengths), 3),
    }


def ceiling_rows(settings: Settings, batch: int, tokenizer: Any) -> list[dict[str, list[int]]]:
    """Random full rows of ``ceiling_length`` tokens, every token labelled."""
    rng = random.Random(settings.seed)
    vocab = plain_token_ids(tokenizer)
    n = batch * (settings.warmup + settings.steps)
    return [{"input_ids": (ids := rng.choices(vocab, k=settings.ceiling_length)), "labels": ids} for _ in range(n)]
