"""Training one arm of ``throughput.py``: its trainer from its :class:`ArmSpec`, timed and counted."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from neftune.data.template import IGNORE_INDEX
from throughput_arms import ARM_SPECS, ArmSpec, Settings, cuda, device, log
from throughput_data import BenchData, build_model, ceiling_rows

# -- memory ----------------------------------------------------------------------------------


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
    spec: ArmSpec, settings: Settings, batch: int, rows: list[dict], tokenizer: Any, model: Any, out: str
) -> tuple[Trainer, TokenCounter]:
    """The trainer of one arm, its collator wrapped in a :class:`TokenCounter`."""
    args = common_arguments(settings, batch, out)
    alpha = settings.alpha if spec.noise else None
    if spec.trainer == "trl":
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        packing = spec.batches == "packed"
        if packing:
            args["per_device_train_batch_size"] = trl_pack_rows(settings, batch, rows)
        config = SFTConfig(**args, max_length=settings.max_length, packing=packing, neftune_noise_alpha=alpha)
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
        if spec.batches == "padded":
            inner: Callable[[list[dict]], dict] = PaddingCollator(tokenizer.pad_token_id)
        elif spec.batches == "packed":
            inner = packing_collator()
        else:
            inner = stack_collator
        if spec.packed_attention:
            use_neftune_attention(model)
        if spec.labelled_loss:
            from neftune import lmhead

            lmhead.attach(model)  # this arm's model is discarded after it, hooks and all
        counter = TokenCounter(inner)
        callbacks = [NEFTuneCallback(alpha=alpha, seed=settings.seed)] if alpha is not None else []
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


def run_arm(arm: str, settings: Settings, batch: int, data: BenchData, tokenizer: Any) -> dict[str, Any]:
    """Train one arm for warm-up + measured steps and return its numbers."""
    spec = ARM_SPECS[arm]
    per_process = reset_peak_memory()
    total = settings.warmup + settings.steps
    rows = ceiling_rows(settings, batch, tokenizer) if spec.batches == "full rows" else data.rows[: batch * total]
    model = build_model(settings, tokenizer)
    with tempfile.TemporaryDirectory(prefix=f"throughput-{arm}-") as out:
        trainer, counter = make_trainer(spec, settings, batch, rows, tokenizer, model, out)
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
        "label": spec.label,
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
    if spec.trainer == "trl":
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
