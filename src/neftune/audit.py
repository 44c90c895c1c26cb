"""``neftune audit``: the NEFTune alpha that transformers' built-in hook really gives each example.

    neftune audit --data train.jsonl --model DIR --packed --batch-size 8 --max-length 1024 --alpha 5
    neftune audit --data train.jsonl --tokenizer DIR --padded --batch-size 4 --max-length 512 --alpha 5

transformers' hook (used by TRL, Axolotl and LLaMA-Factory through ``neftune_noise_alpha``) draws
noise of magnitude alpha/sqrt(T*d) for every token of a row of T tokens, where the paper meant
alpha/sqrt(L_i*d) for an example of L_i tokens.  Example i is therefore trained with an effective
alpha of ``alpha * sqrt(L_i / T)``: T is the longest example of its batch when batches are padded,
and every token of the batch when they are packed into one padding-free row.

The data are read and templated as ``neftune train`` reads them (:mod:`neftune.data`), and
batched in the order a ``Trainer`` with that seed draws them in its first epoch (accelerate's
seedable random sampler, the one a Trainer uses).  ``--pack-length N`` first bin-packs examples
into sequences of at most N tokens with TRL's own ``pack_dataset`` (what ``SFTConfig(packing=True,
max_length=N)`` does); ``--batch-size`` then counts those sequences.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from neftune.choices import BadRecordPolicy, BatchMode, DataFormat, choices_of
from neftune.config import DataConfig
from neftune.errors import ConfigError, DataError, ModelError
from neftune.settings import Command, reused, setting

MODES: tuple[str, ...] = choices_of(BatchMode) or ()


@dataclass
class Audit:
    """Per-example lengths and row lengths under one batching setup (examples in training order)."""

    alpha: float
    mode: str
    batch_size: int
    lengths: np.ndarray
    """L_i: tokens of each example."""
    row_lengths: np.ndarray
    """T: tokens of the row the built-in hook scaled each example's noise by."""
    padding_tokens: int
    """Tokens that belong to no example but get noise from the built-in hook (padded batches)."""
    pack_length: int | None = None
    notes: list[str] = field(default_factory=list)
    """What loading and tokenizing the data skipped or dropped, shown above the report."""
    embedding_norm: float | None = None
    """Mean norm of the data's token embeddings as the first block receives them (after any scale)."""
    embedding_scale: float = 1.0
    """The factor the model's embedding module multiplies its rows by (Gemma: sqrt(d))."""

    @classmethod
    def from_steps(
        cls, steps: Sequence[Sequence[int]], alpha: float, mode: str, batch_size: int, pack_length: int | None = None
    ) -> Audit:
        """Build from the example lengths of each optimizer micro-step (one row per step when packed)."""
        if mode not in MODES:
            raise ConfigError(f"batching mode must be one of {', '.join(MODES)}, got {mode!r}")
        lengths: list[int] = []
        rows: list[int] = []
        padding = 0
        for step in steps:
            row = max(step) if mode == "padded" else sum(step)
            lengths += step
            rows += [row] * len(step)
            padding += row * len(step) - sum(step) if mode == "padded" else 0
        return cls(alpha, mode, batch_size, np.asarray(lengths, float), np.asarray(rows, float), padding, pack_length)

    @property
    def effective(self) -> np.ndarray:
        """alpha * sqrt(L_i / T) for each example: what the built-in hook gives it."""
        return self.alpha * np.sqrt(self.lengths / self.row_lengths)

    def summary(self) -> dict[str, float]:
        """min, median and max effective alpha, the share below half of ``alpha``, and the count."""
        eff = self.effective
        return {
            "intended": self.alpha,
            "min": float(eff.min()),
            "median": float(np.median(eff)),
            "max": float(eff.max()),
            "below_half": float(np.mean(eff < self.alpha / 2)),
            "examples": int(eff.size),
        }

    def render(self, width: int = 40) -> str:
        """The report ``neftune audit`` prints: summary lines and a 10-bin text histogram."""
        s = self.summary()
        a = self.alpha
        setup = f"{self.mode} batches of {self.batch_size}"
        if self.pack_length:
            setup = f"packed sequences of at most {self.pack_length} tokens, {self.batch_size} per padding-free row"
        lines = [
            *self.notes,
            f"{s['examples']:,} examples, {setup}",
            f"transformers' built-in hook, neftune_noise_alpha={a:g}: effective alpha = {a:g} * sqrt(L_i / T)",
            f"  min     {s['min']:7.3f}  ({s['min'] / a:.2f} of intended)",
            f"  median  {s['median']:7.3f}  ({s['median'] / a:.2f})",
            f"  max     {s['max']:7.3f}  ({s['max'] / a:.2f})",
            f"  below half the intended alpha (< {a / 2:g}): {s['below_half']:.1%} of examples",
        ]
        if self.mode == "padded":
            noised = int(self.row_lengths.sum())
            lines.append(
                f"  padding tokens noised: {self.padding_tokens:,} ({self.padding_tokens / noised:.1%} of noised tokens)"
            )
        counts, edges = np.histogram(self.effective / a, bins=10, range=(0.0, 1.0))
        top = max(int(counts.max()), 1)
        lines.append("  effective / intended alpha:")
        for lo, hi, n in zip(edges[:-1], edges[1:], counts, strict=True):
            bar = "#" * round(width * int(n) / top)
            lines.append(f"  {lo:.1f}-{hi:.1f} |{bar:<{width}} {int(n):>7,} {n / counts.sum():6.1%}")
        lines.append(f"neftune (attach, NEFTuneCallback, neftune run): every example gets alpha = {a:g}")
        lines += self._relative_lines()
        return "\n".join(lines)

    def relative_noise(self, per_example: bool = True) -> np.ndarray | None:
        """Each example's expected noise norm per token over the mean token-embedding norm, or None.

        Uniform noise of alpha/sqrt(L*d) per coordinate has norm alpha/sqrt(3*L) per token, whatever
        d; ``per_example=False`` gives the built-in hook's (its effective alpha).
        """
        if not self.embedding_norm:
            return None
        alpha = self.alpha if per_example else self.effective
        return np.asarray(alpha / np.sqrt(3 * self.lengths) / self.embedding_norm, float)

    def _relative_lines(self) -> list[str]:
        ours, builtin = self.relative_noise(), self.relative_noise(per_example=False)
        if ours is None or builtin is None:
            return []
        where = (
            f"scale {self.embedding_scale:g} inside the module, noise added after it"
            if self.embedding_scale != 1
            else "unscaled"
        )
        return [
            f"embedding ({where}): mean token norm {self.embedding_norm:.4g} over the data's tokens",
            "noise norm / embedding norm per token: "
            f"neftune median {np.median(ours):.3g} (min {ours.min():.3g}, max {ours.max():.3g}); "
            f"built-in hook median {np.median(builtin):.3g} (min {builtin.min():.3g})",
        ]


def training_steps(n: int, batch_size: int, seed: int) -> list[list[int]]:
    """Indices of the items of each step of a first epoch, in the order a Trainer with ``seed`` draws them.

    A Trainer samples with accelerate's seedable random sampler, seeded with ``data_seed`` (or
    ``seed`` when unset), and keeps the last, smaller batch.
    """
    from accelerate.data_loader import SeedableRandomSampler  # type: ignore[import-untyped]  # accelerate ships no types

    order = list(SeedableRandomSampler(range(n), data_seed=seed))
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def pack_lengths(lengths: Sequence[int], pack_length: int) -> list[list[int]]:
    """Example lengths of each sequence TRL's best-fit-decreasing packing makes (``packing=True``)."""
    try:
        from datasets import Dataset
        from datasets.utils import logging as datasets_logging
        from trl.data_utils import pack_dataset
    except ImportError as error:
        raise ConfigError(f"--pack-length uses TRL's packing; install it (pip install trl): {error}") from error
    bars = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()
    try:
        packed = pack_dataset(Dataset.from_dict({"input_ids": [[0] * n for n in lengths]}), pack_length, "bfd")
    finally:
        if bars:
            datasets_logging.enable_progress_bar()
    return [list(x) for x in packed["seq_lengths"]]


def load_tokenizer(spec: str, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a model spec (alias, directory, .gguf or hub id; see :func:`neftune.models.resolve_model`)."""
    from transformers import AutoTokenizer

    from neftune.models import resolve_model

    resolved = resolve_model(spec)
    if os.path.isdir(resolved):
        from neftune.model_files import check_model_files

        check_model_files(Path(resolved), weights=False)
    try:
        return AutoTokenizer.from_pretrained(resolved, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ModelError(f"could not load a tokenizer from {spec}: {' '.join(str(error).split())[:200]}") from error


def input_embedding_table(spec: str) -> tuple[Any, float] | None:
    """``(weight, scale)`` of the input embedding of the model at ``spec``, or None without weights there.

    The model is built on the meta device to find its input embedding and that module's scale
    (:func:`neftune.attach.embedding_scale`); only that one tensor is read from the safetensors files.
    """
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    from neftune.attach import embedding_scale, find_input_embedding
    from neftune.models import resolve_model

    resolved = Path(resolve_model(spec))
    files = sorted(resolved.glob("*.safetensors")) if resolved.is_dir() else []
    if not files:
        return None
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolved))
        embedding = find_input_embedding(skeleton)
    except (OSError, ValueError) as error:
        raise ModelError(f"could not read the model config of {spec}: {' '.join(str(error).split())[:200]}") from error
    name = next(n for n, m in skeleton.named_modules() if m is embedding) + ".weight"
    for file in files:
        with safe_open(str(file), "pt") as handle:
            keys = [k for k in handle.keys() if k == name or name.endswith("." + k) or k.endswith("." + name)]  # noqa: SIM118  # a safe_open handle is no dict: keys() is its API
            if keys:
                return handle.get_tensor(keys[0]).float(), embedding_scale(embedding)
    return None


def run_audit(
    data: str,
    tokenizer: Any,
    *,
    mode: str,
    batch_size: int,
    max_length: int,
    alpha: float,
    seed: int = 42,
    pack_length: int | None = None,
    fmt: str = "auto",
    on_bad_record: str = "error",
    limit: int | None = None,
    embedding_spec: str | None = None,
) -> Audit:
    """Load, template and batch ``data`` as a Trainer would and return the :class:`Audit`.

    ``tokenizer`` is a tokenizer object or a model spec for :func:`load_tokenizer`.  With
    ``embedding_spec`` (a model spec) the audit also reads that model's input embedding, to report
    the noise relative to the embedding norm (:meth:`Audit.relative_noise`).
    """
    from neftune.data import encode_examples, load_examples
    from neftune.data.presets import bad_record_policy
    from neftune.data.types import describe_counts
    from neftune.noise import check_alpha

    for name, value in (("batch size", batch_size), ("max length", max_length), ("pack length", pack_length or 1)):
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    try:
        alpha = check_alpha(alpha)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    if alpha == 0:
        raise ConfigError("alpha must be positive: alpha 0 adds no noise to audit")
    if pack_length is not None and mode != "packed":
        raise ConfigError("--pack-length needs --packed (packed sequences are trained padding-free)")
    policy = bad_record_policy(data, on_bad_record)  # as neftune train reads it: built-in sets skip and count
    loaded = load_examples(data, fmt=fmt, on_bad_record=policy, limit=limit, seed=seed)
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    rows, dropped = encode_examples(tokenizer, loaded.examples, max_length)
    if not rows:
        raise DataError(f"{data}: no example has a trainable response token within max_length={max_length}")
    notes = [loaded.summary(), *loaded.notes]
    if dropped:
        notes.append(f"dropped {describe_counts(dropped)}")
    lengths = [len(r["input_ids"]) for r in rows]
    items = pack_lengths(lengths, pack_length) if pack_length else [[n] for n in lengths]
    steps = [[n for i in step for n in items[i]] for step in training_steps(len(items), batch_size, seed)]
    audit = Audit.from_steps(steps, alpha, mode, batch_size, pack_length)
    audit.notes = notes
    if embedding_spec is not None:
        table = input_embedding_table(embedding_spec)
        if table is None:
            notes.append(f"no weights in {embedding_spec}: the noise relative to the embedding norm is not shown")
        else:
            weight, audit.embedding_scale = table
            ids = np.concatenate([np.asarray(r["input_ids"]) for r in rows])
            norms = weight.norm(dim=-1).numpy() * audit.embedding_scale
            audit.embedding_norm = float(norms[ids].mean())
    return audit


@dataclass
class AuditSettings:
    """``neftune audit``'s settings: the data, the tokenizer and the framework's batching."""

    data: str = setting(
        None, "training data (Alpaca, ShareGPT, messages, parquet, builtin:...)", flag="--data", required=True
    )
    model: str | None = setting(
        None,
        "model (alias, directory, .gguf or hub id) whose tokenizer to use; its input embedding also gives the "
        "noise relative to the embedding norm",
        flag="--model",
        group="source",
        required=True,
    )
    tokenizer: str | None = setting(
        None, "a tokenizer only (no embedding report)", flag="--tokenizer", group="source", required=True
    )
    mode: BatchMode = setting(
        None,
        "how the framework batches examples",
        flag={"--padded": "padded", "--packed": "packed"},
        flag_help={
            "--padded": "batches padded to the longest",
            "--packed": "each batch flattened into one padding-free row",
        },
        group="mode",
        required=True,
    )
    batch_size: int = setting(
        None,
        "per-device batch size (packed sequences with --pack-length)",
        flag="--batch-size",
        required=True,
        metavar="N",
    )
    max_length: int = setting(
        None, "max tokens per example (longer truncated)", flag="--max-length", required=True, metavar="N"
    )
    alpha: float = setting(
        None, "neftune_noise_alpha the framework is given", flag="--alpha", required=True, metavar="A"
    )
    pack_length: int | None = setting(
        None, "with --packed: bin-pack to N tokens first (TRL packing=True)", flag="--pack-length", metavar="N"
    )
    seed: int = setting(42, "the Trainer's seed (default 42, transformers')", flag="--seed", metavar="N")
    format: DataFormat = reused(DataConfig, "format", flag="--format")
    limit: int | None = setting(None, "use the first N examples", flag="--limit", metavar="N")
    on_bad_record: BadRecordPolicy = reused(DataConfig, "on_bad_record", flag="--on-bad-record")


def cmd_audit(cfg: AuditSettings) -> int:
    """Run :func:`run_audit` with the parsed flags and print its report."""
    source = str(cfg.model or cfg.tokenizer)
    audit = run_audit(
        cfg.data,
        source,
        mode=cfg.mode,
        batch_size=cfg.batch_size,
        max_length=cfg.max_length,
        alpha=cfg.alpha,
        seed=cfg.seed,
        pack_length=cfg.pack_length,
        fmt=cfg.format,
        on_bad_record=cfg.on_bad_record,
        limit=cfg.limit,
        embedding_spec=cfg.model,
    )
    print(f"{cfg.data} (tokenizer {source}, max length {cfg.max_length}, seed {cfg.seed}):")
    print(audit.render())
    return 0


AUDIT = Command(
    "audit",
    AuditSettings,
    cmd_audit,
    help="the NEFTune alpha transformers' built-in hook gives each example of your data",
    description="Per-example effective alpha of transformers' neftune_noise_alpha (TRL, Axolotl, "
    "LLaMA-Factory) on your data and batching: alpha*sqrt(L_i/T), T the padded or packed row length.",
)
"""``neftune audit``, as :mod:`neftune.cli` registers it."""
