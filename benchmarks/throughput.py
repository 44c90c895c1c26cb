"""Training throughput: TRL ``SFTTrainer`` against neftune, padded against packed; generation speed.

    python benchmarks/throughput.py --preset smoke                   # tiny random model, < 1 min on a CPU
    python benchmarks/throughput.py --preset cpu --json cpu.json     # SmolLM2-135M fp32, ShareGPT first turns, ~10 min on 2 cores
    python benchmarks/throughput.py --preset gpu --json gpu.json     # random-init ~1B Llama bf16, Alpaca-like lengths, < 5 min on an H100
    python benchmarks/throughput.py --preset cpu --data skills --arms c,g --max-length 512   # the labelled-only loss

Any preset value can be overridden (``--steps 8 --batch-sizes 8,16 --arms a,c,e`` ...; ``--help``).

Arms, all on the same model init (seeded; LoRA r=16 by default, ``--full`` for all weights), the same
tokenized examples in the same order (sequential sampler), the same batch size, max length and lr:

    a         TRL SFTTrainer defaults: padded batches, transformers' built-in NEFTune (neftune_noise_alpha=5)
    b         TRL SFTTrainer packing=True (packing_strategy "bfd", which makes batches padding-free: one row
              with position_ids restarting per example), built-in NEFTune alpha=5
    c         neftune packed: DataCollatorWithFlattening + NEFTuneCallback(alpha=5), per-example noise
    d         neftune --no-packing: padded batches + NEFTuneCallback(alpha=5)
    e         neftune packed without NEFTune (alpha=0): (c) against (e) is the cost of the noise
    g         (c) with the LM head and cross-entropy only at labelled positions, in chunks
              (``neftune.lmhead``, ``train.loss=labelled``): (g) against (c) is what the prompt tokens' logits cost
    ceiling   the same model on full rows (batch x ceiling_length, no padding, no mask, no position restarts)

Loss: every arm trains on the same ``labels``, neftune's assistant-only labels (the answer and its
end-of-turn token; prompt tokens are -100), which TRL uses as given when a pre-tokenized dataset has
a ``labels`` column.  Both padding-free collators also set -100 on each example's first token.  TRL
computes that loss with its fused LM head (log-probabilities in chunks, no full logits tensor);
the neftune arms c-f use the model's own loss (``train.loss=full``), arm g neftune's labelled-only
loss.  The ceiling arm trains on every token.

MFU (model FLOPs utilisation) = model FLOPs of the measured steps / their wall time / the peak matmul
FLOP/s measured in the same run on the same device (an fp32 GEMM on CPU, bf16 on GPU; the best of
a measurement before and after the arms).  Model FLOPs are the work the training step needs, the
same for every arm on the same batches (so MFU ranks arms like real tokens/s does), counted from
each batch as it is collated:

    per real token       sum over the decoder's matmul weights W: 4|W| if W is frozen (forward 2|W|,
                         gradient of the input 2|W|), 6|W| if it is trained (+ its gradient 2|W|);
                         LoRA: the frozen base weights at 4, the adapters at 6
    per example of L     attention scores and their use: 12 * layers * heads * head_dim * L(L+1)/2
                         (causal, forward 4, backward 8 per query-key pair and query width)
    per labelled target  the LM head: 4 * d * V (6 * d * V when the head's weight is trained)

The embedding lookup, norms, activations and the softmax count nothing.  Computing the head at
unlabelled positions is not model work: arms that do it spend time the formula does not credit.

TRL's packing fills rows of ``max_length`` tokens, and its batch size counts those rows, so 8 rows
would be 8 x max_length tokens per step against the ~8 x mean-length of the other arms.  By default
(``--trl-pack-rows match``) arm b gets as many rows per step as makes its real tokens per step match
the other arms; ``--trl-pack-rows 8`` gives TRL's literal default.

Measured per arm, after ``--warmup`` steps that are not counted: real (non-padding) tokens per second
(tokens of the examples the collator actually received, over the wall time of the measured steps),
median step time, padding share of the computed tokens, and peak memory: CUDA max_memory_allocated,
or on CPU the process's peak RSS during the arm (its high-water mark is reset per arm through
/proc/self/clear_refs where Linux allows it, otherwise the number is the process-wide peak so far).
``neftune generate`` speed: generated tokens/s with prompts sorted by length against unsorted
(``neftune.generate.generate_token_ids``, the engine of ``generate_texts``, which returns token ids
so generated tokens can be counted exactly).

Stdout gets a Markdown report; progress goes to stderr; ``--json`` writes every number with the
machine, versions and settings.  Run on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import importlib.metadata
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import neftune
from neftune.data.template import IGNORE_INDEX

RANDOM_LLAMA = "random-llama-1b"
ARMS = ("a", "b", "c", "d", "e", "f", "g", "ceiling")
ARM_LABELS = {
    "a": "TRL SFTTrainer, padded, built-in NEFTune",
    "b": "TRL SFTTrainer, packing=True (bfd, padding-free), built-in NEFTune",
    "c": "neftune train, packed (padding-free), per-example NEFTune, the model's own loss",
    "d": "neftune train --no-packing (padded), per-example NEFTune",
    "e": "neftune train, packed, no NEFTune",
    "f": "neftune train, packed, per-example NEFTune, transformers' SDPA over the whole row",
    "g": "neftune train, packed, per-example NEFTune, LM head and loss at labelled positions only",
    "ceiling": "fixed-shape ceiling: full rows, no mask, no NEFTune",
}


@dataclass
class Settings:
    """Everything one benchmark run does; presets fill it, flags override single fields."""

    preset: str
    model: str
    data: str
    batch_sizes: list[int]
    max_length: int
    warmup: int
    steps: int
    arms: list[str]
    lora: bool = True
    lora_r: int = 16
    alpha: float = 5.0
    trl_pack_rows: str = "match"
    ceiling_length: int = 2048
    attn: str = "sdpa"
    gradient_checkpointing: bool | None = None
    gen_prompts: int = 64
    gen_max_new_tokens: int = 32
    gen_batch_size: int = 16
    gen_prompt_max: int = 256
    seed: int = 0


PRESETS: dict[str, Settings] = {
    "smoke": Settings(
        preset="smoke",
        model="tiny-random",
        data="alpaca-like",
        batch_sizes=[4],
        max_length=256,
        warmup=1,
        steps=2,
        arms=list(ARMS),
        ceiling_length=256,
        gen_prompts=16,
        gen_max_new_tokens=8,
        gen_batch_size=4,
        gen_prompt_max=64,
    ),
    "cpu": Settings(
        preset="cpu",
        model="smollm2-135m",
        data="sharegpt",
        batch_sizes=[8],
        max_length=1024,
        warmup=2,
        steps=4,
        arms=["a", "b", "c", "d", "e", "f"],
        gen_prompts=64,
        gen_max_new_tokens=32,
        gen_batch_size=16,
        gen_prompt_max=256,
    ),
    "gpu": Settings(
        preset="gpu",
        model=RANDOM_LLAMA,
        data="alpaca-like",
        batch_sizes=[8, 32],
        max_length=1024,
        warmup=3,
        steps=10,
        arms=list(ARMS),
        ceiling_length=2048,
        gen_prompts=64,
        gen_max_new_tokens=128,
        gen_batch_size=16,
        gen_prompt_max=1024,
    ),
}


def one_line(error: BaseException) -> str:
    """An exception as ``Type: message`` on one line (the traceback goes to stderr)."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def log(message: str) -> None:
    """Progress goes to stderr, so stdout holds only the report."""
    print(message, file=sys.stderr, flush=True)


# -- machine, memory -------------------------------------------------------------------------


def cuda() -> bool:
    return torch.cuda.is_available()


def device() -> torch.device:
    return torch.device("cuda" if cuda() else "cpu")


def machine_info() -> dict[str, Any]:
    """CPU model and cores, and the GPU when there is one."""
    cpu_model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu_model,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    if cuda():
        props = torch.cuda.get_device_properties(0)
        info.update({"gpu": torch.cuda.get_device_name(0), "gpu_memory_gib": round(props.total_memory / 2**30, 1)})
    return info


def versions() -> dict[str, str]:
    """Versions of Python, neftune and the libraries the arms run on."""
    found = {"python": platform.python_version(), "neftune": neftune.__version__}
    for package in ("torch", "transformers", "trl", "peft", "accelerate", "datasets"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def reset_peak_memory() -> bool:
    """Start a new peak-memory window; False when only the process-wide CPU peak can be read."""
    if cuda():
        torch.cuda.reset_peak_memory_stats()
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def peak_memory_bytes() -> int:
    """CUDA max_memory_allocated, else the peak RSS (VmHWM, or getrusage where /proc is missing)."""
    if cuda():
        return int(torch.cuda.max_memory_allocated())
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def release_memory() -> None:
    """Collect what the last arm left behind and return it to the device or the OS."""
    gc.collect()
    if cuda():
        torch.cuda.empty_cache()
    else:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed arenas back, so the next arm's RSS starts low


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


# -- measuring -------------------------------------------------------------------------------


class TokenCounter:
    """Wraps a collator; records real (non-padding) and computed tokens of every batch it builds."""

    def __init__(self, inner: Callable[[list[dict]], dict]) -> None:
        self.inner = inner
        self.real: list[int] = []
        self.computed: list[int] = []
        self.work: list[tuple[int, int]] = []
        self.layout: dict[str, Any] = {}

    def __call__(self, features: list[dict]) -> dict:
        batch = self.inner(features)
        self.real.append(sum(len(f["input_ids"]) for f in features))
        self.computed.append(int(batch["input_ids"].numel()))
        self.work.append(batch_work(batch))
        if not self.layout:
            self.layout = {"keys": sorted(batch), "input_ids_shape": list(batch["input_ids"].shape)}
            if "position_ids" in batch:
                self.layout["sequences_per_batch"] = int((batch["position_ids"] == 0).sum())
        return batch


def batch_work(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """``(labelled targets, causal query-key pairs)`` of a collated batch: the two counts besides its real
    tokens that its model FLOPs depend on.  Examples are the attention mask's rows, else the segments of
    restarting ``position_ids``, else whole rows."""
    ids = batch["input_ids"]
    labels = batch.get("labels")
    targets = int((labels[..., 1:] != IGNORE_INDEX).sum()) if labels is not None else ids[..., 1:].numel()
    if batch.get("attention_mask") is not None:
        lengths = batch["attention_mask"].sum(-1).flatten()
    elif batch.get("position_ids") is not None:
        segments = []
        for row in batch["position_ids"].reshape(-1, ids.shape[-1]):
            starts = torch.ones_like(row, dtype=torch.bool)
            starts[1:] = row[1:] != row[:-1] + 1
            segments.append(torch.diff(starts.nonzero().flatten(), append=torch.tensor([row.numel()])))
        lengths = torch.cat(segments)
    else:
        lengths = torch.full((ids.reshape(-1, ids.shape[-1]).shape[0],), ids.shape[-1])
    return targets, int((lengths * (lengths + 1) // 2).sum())


@dataclass
class FlopModel:
    """Model FLOPs of one training step (the formula in the module docstring), from the trained model."""

    per_token: int
    per_pair: int
    per_target: int

    @classmethod
    def of(cls, model: Any) -> FlopModel:
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        embedding, head = inner.get_input_embeddings().weight, inner.get_output_embeddings().weight
        per_token = sum(
            (6 if p.requires_grad else 4) * p.numel()
            for p in model.parameters()
            if p.dim() == 2 and p is not embedding and p is not head
        )
        cfg = inner.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        per_pair = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim
        return cls(per_token, per_pair, (6 if head.requires_grad else 4) * head.numel())

    def step(self, tokens: int, targets: int, pairs: int) -> int:
        return self.per_token * tokens + self.per_pair * pairs + self.per_target * targets


def peak_matmul_flops(seconds: float = 2.0) -> float:
    """The best FLOP/s of a square GEMM on this device (fp32 on CPU, bf16 on GPU) over ``seconds``."""
    n, dtype = (8192, torch.bfloat16) if cuda() else (2048, torch.float32)
    a, b = (torch.randn(n, n, device=device(), dtype=dtype) for _ in range(2))
    torch.matmul(a, b)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        if cuda():
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.matmul(a, b)
        if cuda():
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (data loading included), logged to stderr as it goes."""

    def __init__(self, label: str, counter: TokenCounter, warmup: int, total: int) -> None:
        self.label, self.counter, self.warmup, self.total = label, counter, warmup, total
        self.times: list[float] = []
        self._last = 0.0

    def _now(self) -> float:
        if cuda():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self._last = self._now()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        now = self._now()
        self.times.append(now - self._last)
        self._last = now
        k = len(self.times) - 1
        tokens = self.counter.real[k] if k < len(self.counter.real) else 0
        phase = " (warm-up)" if k < self.warmup else ""
        log(f"  [{self.label}] step {k + 1}/{self.total}{phase}: {self.times[-1] * 1e3:.0f} ms, {tokens} real tokens")


def common_arguments(settings: Settings, batch: int, out: str) -> dict[str, Any]:
    """TrainingArguments shared by every arm (TRL's SFTConfig gets the same values)."""
    grad_ckpt = settings.gradient_checkpointing if settings.gradient_checkpointing is not None else cuda()
    return {
        "output_dir": out,
        "per_device_train_batch_size": batch,
        "max_steps": settings.warmup + settings.steps,
        "learning_rate": 2e-4 if settings.lora else 2e-5,
        "lr_scheduler_type": "cosine",
        "seed": settings.seed,
        "data_seed": settings.seed,
        "train_sampling_strategy": "sequential",
        "logging_strategy": "no",
        "save_strategy": "no",
        "report_to": [],
        "disable_tqdm": True,
        "use_cpu": not cuda(),
        "bf16": cuda(),
        "activation_checkpointing": grad_ckpt,
        "activation_checkpointing_kwargs": {"use_reentrant": False} if grad_ckpt else None,
        "dataloader_num_workers": 0,
    }


def trl_pack_rows(settings: Settings, batch: int, rows: Sequence[dict[str, list[int]]]) -> int:
    """Rows of ``max_length`` per step for arm b (see ``--trl-pack-rows``)."""
    if settings.trl_pack_rows != "match":
        return int(settings.trl_pack_rows)
    mean = statistics.mean(len(r["input_ids"]) for r in rows)
    return max(1, round(batch * mean / settings.max_length))


def make_trainer(
    arm: str, settings: Settings, batch: int, rows: list[dict], tokenizer: Any, model: Any, out: str
) -> tuple[Trainer, TokenCounter]:
    """The trainer of one arm, its collator wrapped in a :class:`TokenCounter`."""
    args = common_arguments(settings, batch, out)
    if arm in ("a", "b"):
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        packing = arm == "b"
        if packing:
            args["per_device_train_batch_size"] = trl_pack_rows(settings, batch, rows)
        config = SFTConfig(**args, max_length=settings.max_length, packing=packing, neftune_noise_alpha=settings.alpha)
        trainer: Trainer = SFTTrainer(
            model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
        )
        counter = TokenCounter(trainer.data_collator)
        trainer.data_collator = counter
    else:
        from neftune.callback import NEFTuneCallback
        from neftune.data.collate import PaddingCollator, packing_collator

        if args["activation_checkpointing"] and settings.lora:
            model.enable_input_require_grads()  # as neftune.train.run_training does
        if arm == "ceiling":
            inner: Callable[[list[dict]], dict] = stack_collator
        elif arm == "d":
            inner = PaddingCollator(tokenizer.pad_token_id)
        else:
            inner = packing_collator()
        if arm in ("c", "e", "g"):
            use_neftune_attention(model)
        if arm == "g":
            from neftune import lmhead

            lmhead.attach(model)  # this arm's model is discarded after it, hooks and all
        counter = TokenCounter(inner)
        callbacks = [NEFTuneCallback(alpha=settings.alpha, seed=settings.seed)] if arm in ("c", "d", "f", "g") else []
        trainer = Trainer(
            model=model,
            args=TrainingArguments(**args, remove_unused_columns=False),
            train_dataset=rows,
            data_collator=counter,
            processing_class=tokenizer,
            callbacks=callbacks,
        )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer, counter


def use_neftune_attention(model: Any) -> None:
    """Switch to the attention ``neftune train`` picks for packed rows (``model.attention=auto``)."""
    from neftune.config import Config, DataConfig
    from neftune.train import choose_attention

    impl = choose_attention(Config(data=DataConfig(packing=True)))
    if impl is not None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.set_attn_implementation(impl)


def stack_collator(features: list[dict]) -> dict[str, torch.Tensor]:
    """Equal-length rows stacked as they are: no attention mask, no position ids."""
    return {key: torch.tensor([f[key] for f in features]) for key in ("input_ids", "labels")}


def ceiling_rows(settings: Settings, batch: int, tokenizer: Any) -> list[dict[str, list[int]]]:
    """Random full rows of ``ceiling_length`` tokens, every token labelled."""
    rng = random.Random(settings.seed)
    vocab = plain_token_ids(tokenizer)
    n = batch * (settings.warmup + settings.steps)
    return [{"input_ids": (ids := rng.choices(vocab, k=settings.ceiling_length)), "labels": ids} for _ in range(n)]


def run_arm(arm: str, settings: Settings, batch: int, data: BenchData, tokenizer: Any) -> dict[str, Any]:
    """Train one arm for warm-up + measured steps and return its numbers."""
    per_process = reset_peak_memory()
    total = settings.warmup + settings.steps
    rows = ceiling_rows(settings, batch, tokenizer) if arm == "ceiling" else data.rows[: batch * total]
    model = build_model(settings, tokenizer)
    with tempfile.TemporaryDirectory(prefix=f"throughput-{arm}-") as out:
        trainer, counter = make_trainer(arm, settings, batch, rows, tokenizer, model, out)
        timer = StepTimer(f"{arm} b={batch}", counter, settings.warmup, total)
        trainer.add_callback(timer)
        trainer.train()
    measured = timer.times[settings.warmup : total]
    if not measured:
        raise RuntimeError(f"only {len(timer.times)} steps ran; nothing left after {settings.warmup} warm-up steps")
    real = counter.real[settings.warmup : settings.warmup + len(measured)]
    computed = counter.computed[settings.warmup : settings.warmup + len(measured)]
    work = counter.work[settings.warmup : settings.warmup + len(measured)]
    seconds = sum(measured)
    flops = FlopModel.of(model)
    model_flops = sum(flops.step(n, t, p) for n, (t, p) in zip(real, work, strict=True))
    result: dict[str, Any] = {
        "label": ARM_LABELS[arm],
        "per_device_train_batch_size": trainer.args.per_device_train_batch_size,
        "measured_steps": len(measured),
        "tokens_per_s": sum(real) / seconds,
        "step_ms_median": statistics.median(measured) * 1e3,
        "step_ms": [round(t * 1e3, 1) for t in timer.times],
        "real_tokens_per_step": sum(real) / len(real),
        "padding_share": 1 - sum(real) / sum(computed),
        "labelled_share": sum(t for t, _ in work) / sum(real),
        "model_flops_per_token": model_flops / sum(real),
        "model_flops_per_s": model_flops / seconds,
        "flop_model": dataclasses.asdict(flops),
        "peak_memory_bytes": peak_memory_bytes(),
        "peak_memory_kind": "cuda_max_allocated" if cuda() else ("rss_per_arm" if per_process else "rss_process_peak"),
        "batch_layout": counter.layout,
    }
    if arm in ("a", "b"):
        result["trl"] = {
            "packing": trainer.args.packing,
            "packing_strategy": trainer.args.packing_strategy,
            "padding_free": trainer.padding_free,
            "neftune_noise_alpha": trainer.args.neftune_noise_alpha,
        }
    log(
        f"  [{arm} b={batch}] {result['tokens_per_s']:.1f} real tokens/s, median step {result['step_ms_median']:.0f} ms"
    )
    return result


# -- generation ------------------------------------------------------------------------------


def run_generation(settings: Settings, data: BenchData, tokenizer: Any) -> dict[str, Any]:
    """Generated tokens/s of ``neftune generate``'s batching, prompts sorted by length against unsorted."""
    from neftune.generate import generate_token_ids

    reset_peak_memory()
    model = build_model(settings, tokenizer, for_training=False)
    prompts = data.gen_prompts
    batch_size, max_new = settings.gen_batch_size, settings.gen_max_new_tokens
    # warm-up, so neither order pays for first-call initialisation
    generate_token_ids(model, tokenizer, prompts[:batch_size], max_new_tokens=4, batch_size=batch_size, progress=False)
    result: dict[str, Any] = {
        "prompts": len(prompts),
        "prompt_tokens_min": min(map(len, prompts)),
        "prompt_tokens_max": max(map(len, prompts)),
        "prompt_tokens_mean": round(statistics.mean(map(len, prompts)), 1),
        "batch_size": batch_size,
        "max_new_tokens": max_new,
    }
    for name, sort in (("sorted", True), ("unsorted", False)):
        start = time.perf_counter()
        out = generate_token_ids(
            model,
            tokenizer,
            prompts,
            max_new_tokens=max_new,
            batch_size=batch_size,
            sort_by_length=sort,
            progress=False,
        )
        seconds = time.perf_counter() - start
        tokens = sum(map(len, out))
        result[name] = {"seconds": seconds, "generated_tokens": tokens, "tokens_per_s": tokens / seconds}
        log(f"  [generate {name}] {tokens} tokens in {seconds:.1f} s = {tokens / seconds:.1f} tokens/s")
    result["sorted_over_unsorted"] = result["sorted"]["tokens_per_s"] / result["unsorted"]["tokens_per_s"]
    result["peak_memory_bytes"] = peak_memory_bytes()
    return result


# -- report ----------------------------------------------------------------------------------


def add_ratios(arms: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Set each arm's ``vs_a`` and return the headline ratios of one batch size."""

    def tps(arm: str) -> float | None:
        return arms.get(arm, {}).get("tokens_per_s")

    ratios: dict[str, float] = {}
    for name, (num, den) in {
        "c_over_a": ("c", "a"),
        "c_over_b": ("c", "b"),
        "b_over_a": ("b", "a"),
        "c_over_d": ("c", "d"),
        "c_over_f": ("c", "f"),
        "g_over_c": ("g", "c"),
        "g_over_a": ("g", "a"),
        "packed_over_ceiling": ("c", "ceiling"),
    }.items():
        if tps(num) and tps(den):
            ratios[name] = tps(num) / tps(den)
    if tps("c") and tps("e"):
        ratios["neftune_overhead_pct"] = (tps("e") / tps("c") - 1) * 100  # extra time per token with the noise
    for _arm, result in arms.items():
        if tps("a") and "tokens_per_s" in result:
            result["vs_a"] = result["tokens_per_s"] / tps("a")
    return ratios


def mfu_note(report: dict[str, Any], arms: dict[str, dict[str, Any]]) -> str:
    """One sentence: the peak the MFU is relative to, and the FLOPs per token behind it."""
    peak = report["peak_matmul"]
    done = next((r for r in arms.values() if "flop_model" in r), None)
    if done is None:
        return ""
    f = done["flop_model"]
    return (
        f"MFU = model FLOPs / s over the peak {peak['kind']} GEMM measured in this run, "
        f"{peak['flops'] / 1e9:,.0f} GFLOP/s (before the arms {peak['before'] / 1e9:,.0f}, after {peak['after'] / 1e9:,.0f}). "
        f"Model FLOPs ({done['model_flops_per_token'] / 1e9:.3f} GFLOP per real token here): "
        f"{f['per_token'] / 1e6:,.0f} MFLOP per token (decoder matmuls), {f['per_pair'] / 1e3:,.0f} kFLOP per "
        f"causal query-key pair, {f['per_target'] / 1e6:,.0f} MFLOP per labelled target (LM head); "
        f"{done['labelled_share']:.0%} of the real tokens are labelled targets."
    )


def gib(n: int) -> str:
    """Bytes as GiB with two decimals."""
    return f"{n / 2**30:.2f} GiB"


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown, ready for BENCHMARKS.md."""
    s = report["settings"]
    machine = report["machine"]
    where = machine.get("gpu") or f"{machine['cpu']}, {machine['torch_threads']} threads"
    model = (
        f"{s['model']} ({'LoRA r=' + str(s['lora_r']) if s['lora'] else 'all weights'}), {report['dtype']}, {s['attn']}"
    )
    lines = [
        f"Throughput ({report['date']}, {where}): {model}, data {s['data']} "
        f"(mean {report['data']['mean_tokens']} tokens/example), max_length {s['max_length']}, "
        f"{s['warmup']} warm-up + {s['steps']} measured steps; "
        f"torch {report['versions']['torch']}, transformers {report['versions']['transformers']}, "
        f"trl {report['versions']['trl']}, peft {report['versions']['peft']}.",
        "",
    ]
    memory = "peak CUDA memory" if machine.get("gpu") else "peak RSS"
    for batch, arms in report["results"].items():
        lines += [
            f"**Batch {batch}**",
            "",
            f"| arm | setup | real tokens/s | step ms (median) | real tokens/step | padding | {memory} | MFU | vs (a) |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for arm, r in arms.items():
            if "error" in r:
                lines.append(f"| {arm} | {ARM_LABELS[arm]} | failed: {r['error'][:120]} | | | | | | |")
                continue
            setup = r["label"] + (
                f" ({r['per_device_train_batch_size']} rows of {s['max_length']})" if arm == "b" else ""
            )
            if arm == "ceiling":
                setup += f" ({r['per_device_train_batch_size']}x{s['ceiling_length']})"
            vs_a = f"{r['vs_a']:.2f}x" if "vs_a" in r else "-"
            lines.append(
                f"| {arm} | {setup} | {r['tokens_per_s']:,.0f} | {r['step_ms_median']:,.0f} "
                f"| {r['real_tokens_per_step']:,.0f} | {r['padding_share']:.0%} | {gib(r['peak_memory_bytes'])} "
                f"| {r['mfu']:.1%} | {vs_a} |"
            )
        ratios = report["ratios"][batch]
        parts = []
        for key, text in (
            ("c_over_a", "(c)/(a)"),
            ("c_over_b", "(c)/(b)"),
            ("b_over_a", "(b)/(a)"),
            ("c_over_d", "(c)/(d)"),
            ("c_over_f", "(c)/(f) varlen vs SDPA"),
            ("g_over_c", "(g)/(c) labelled-only loss"),
            ("g_over_a", "(g)/(a)"),
            ("packed_over_ceiling", "packed (c)/ceiling"),
        ):
            if key in ratios:
                parts.append(f"{text} = {ratios[key]:.2f}x")
        if "neftune_overhead_pct" in ratios:
            parts.append(f"NEFTune overhead (c) vs (e) = {ratios['neftune_overhead_pct']:+.1f}%")
        lines += ["", "Headline: " + "; ".join(parts) if parts else "Headline: -", ""]
        lines += [mfu_note(report, arms), ""]
    gen = report.get("generation")
    if gen and "error" in gen:
        lines += [f"Generation benchmark failed: {gen['error']}", ""]
    elif gen:
        lines += [
            f"**neftune generate** (greedy, {gen['prompts']} prompts of {gen['prompt_tokens_min']}-"
            f"{gen['prompt_tokens_max']} tokens, batch {gen['batch_size']}, max_new_tokens {gen['max_new_tokens']})",
            "",
            "| prompt order | generated tokens/s | seconds | generated tokens |",
            "|---|---:|---:|---:|",
        ]
        for name, text in (("sorted", "sorted by length"), ("unsorted", "unsorted")):
            g = gen[name]
            lines.append(f"| {text} | {g['tokens_per_s']:,.1f} | {g['seconds']:.1f} | {g['generated_tokens']:,} |")
        lines += ["", f"Sorted/unsorted = {gen['sorted_over_unsorted']:.2f}x", ""]
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------------


def parse_settings(argv: Sequence[str] | None = None) -> tuple[Settings, Path | None]:
    """The preset named by ``--preset`` with every other flag applied; and the ``--json`` path."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    parser.add_argument("--json", type=Path, help="write all results here")
    parser.add_argument(
        "--model", help=f"neftune model spec (smollm2-135m, tiny-random, a directory) or {RANDOM_LLAMA}"
    )
    parser.add_argument("--data", choices=["sharegpt", "skills", "alpaca-like"])
    parser.add_argument("--batch-sizes", type=lambda v: [int(x) for x in v.split(",")], help="e.g. 8,32")
    parser.add_argument("--max-length", type=int)
    parser.add_argument("--warmup", type=int, help="steps run before timing starts")
    parser.add_argument("--steps", type=int, help="measured steps per arm")
    parser.add_argument("--arms", type=lambda v: v.split(","), help=f"subset of {','.join(ARMS)}")
    parser.add_argument("--full", action="store_true", help="train all weights instead of LoRA")
    parser.add_argument("--lora-r", type=int)
    parser.add_argument("--alpha", type=float, help="NEFTune alpha of arms a-d")
    parser.add_argument(
        "--trl-pack-rows", help="rows of max_length per step for arm b: 'match' or a number (8 = TRL default)"
    )
    parser.add_argument("--ceiling-length", type=int)
    parser.add_argument("--attn", choices=["sdpa", "eager", "flash_attention_2"])
    parser.add_argument(
        "--gradient-checkpointing",
        choices=["auto", "on", "off"],
        help="auto: on for CUDA, off for CPU (neftune's default), for every arm",
    )
    parser.add_argument("--gen-prompts", type=int, help="prompts for the generation benchmark (0 skips it)")
    parser.add_argument("--gen-max-new-tokens", type=int)
    parser.add_argument("--gen-batch-size", type=int)
    parser.add_argument("--gen-prompt-max", type=int, help="longest generation prompt, in tokens")
    parser.add_argument("--seed", type=int)
    ns = parser.parse_args(argv)
    settings = dataclasses.replace(PRESETS[ns.preset])
    for name in (
        "model",
        "data",
        "batch_sizes",
        "max_length",
        "warmup",
        "steps",
        "arms",
        "lora_r",
        "alpha",
        "trl_pack_rows",
        "ceiling_length",
        "attn",
        "gen_prompts",
        "gen_max_new_tokens",
        "gen_batch_size",
        "gen_prompt_max",
        "seed",
    ):
        value = getattr(ns, name)
        if value is not None:
            setattr(settings, name, value)
    if ns.full:
        settings.lora = False
    if ns.gradient_checkpointing is not None:
        settings.gradient_checkpointing = {"auto": None, "on": True, "off": False}[ns.gradient_checkpointing]
    unknown = [a for a in settings.arms if a not in ARMS]
    if unknown:
        parser.error(f"unknown arms {unknown}; choose from {', '.join(ARMS)}")
    if settings.trl_pack_rows != "match" and not (settings.trl_pack_rows.isdigit() and int(settings.trl_pack_rows) > 0):
        parser.error("--trl-pack-rows must be 'match' or a positive integer")
    if settings.steps < 1 or settings.warmup < 0 or min(settings.batch_sizes) < 1:
        parser.error("--steps and batch sizes must be >= 1, --warmup >= 0")
    return settings, ns.json


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the Markdown report, write the JSON, and return the report."""
    settings, json_path = parse_settings(argv)
    import datasets
    from transformers.utils import logging as hf_logging

    from neftune.models import resolve_dtype

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    log(f"throughput benchmark, preset {settings.preset}: {settings}")
    tokenizer = build_tokenizer(settings)
    n_rows = max(settings.batch_sizes) * (settings.warmup + settings.steps)
    data = DATA_SOURCES[settings.data](settings, tokenizer, n_rows)
    if len(data.rows) < n_rows:
        log(f"warning: only {len(data.rows)} examples for {n_rows} wanted; arms will repeat data")
    lengths = describe_lengths(data.rows, settings.max_length)
    log(f"data: {lengths}")
    report: dict[str, Any] = {
        "benchmark": "throughput",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine_info(),
        "versions": versions(),
        "settings": dataclasses.asdict(settings),
        "dtype": str(resolve_dtype("auto", device())).removeprefix("torch."),
        "data": {**lengths, **data.notes},
        "results": {},
        "ratios": {},
    }
    peak_before = peak_matmul_flops()
    log(f"peak matmul: {peak_before / 1e9:,.1f} GFLOP/s")
    for batch in settings.batch_sizes:
        arms: dict[str, dict[str, Any]] = {}
        for arm in settings.arms:
            if arm == "ceiling" and batch != settings.batch_sizes[0]:
                continue
            log(f"arm {arm} (batch {batch}): {ARM_LABELS[arm]}")
            try:
                arms[arm] = run_arm(arm, settings, batch, data, tokenizer)
            except Exception as error:  # one failing arm must not cost the others
                traceback.print_exc(file=sys.stderr)
                arms[arm] = {"label": ARM_LABELS[arm], "error": one_line(error)}
            release_memory()
        report["results"][str(batch)] = arms
    peak_after = peak_matmul_flops()
    peak = max(peak_before, peak_after)
    report["peak_matmul"] = {
        "kind": "bf16 8192^3" if cuda() else "fp32 2048^3",
        "flops": peak,
        "before": peak_before,
        "after": peak_after,
    }
    for batch, arms in report["results"].items():
        for result in arms.values():
            if "model_flops_per_s" in result:
                result["mfu"] = result["model_flops_per_s"] / peak
        report["ratios"][batch] = add_ratios(arms)
    if settings.gen_prompts > 0 and data.gen_prompts:
        log("generation: sorted by length vs unsorted")
        try:
            report["generation"] = run_generation(settings, data, tokenizer)
        except Exception as error:
            traceback.print_exc(file=sys.stderr)
            report["generation"] = {"error": one_line(error)}
        release_memory()
    report["wall_s"] = round(time.perf_counter() - started, 1)
    log(f"done in {report['wall_s']} s")
    if json_path:
        json_path.write_text(json.dumps(report, indent=2, default=str))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
