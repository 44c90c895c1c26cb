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

Code: the arms are the ``ARM_SPECS`` table of ``throughput_arms.py`` (with the settings and presets),
the model and data ``throughput_data.py``, training and measuring one arm ``throughput_train.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from neftune.machine import machine_info
from throughput_arms import (
    ARM_SPECS,
    ARMS,
    BASELINE,
    NOISE_OVERHEAD,
    PRESETS,
    RANDOM_LLAMA,
    RATIOS,
    Settings,
    bench_versions,
    cuda,
    device,
    log,
    one_line,
)
from throughput_data import DATA_SOURCES, BenchData, build_model, build_tokenizer, describe_lengths
from throughput_train import peak_matmul_flops, peak_memory_bytes, release_memory, reset_peak_memory, run_arm

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
    for name, num, den, _ in RATIOS:
        if tps(num) and tps(den):
            ratios[name] = tps(num) / tps(den)
    noisy, plain = NOISE_OVERHEAD
    if tps(noisy) and tps(plain):
        ratios["neftune_overhead_pct"] = (tps(plain) / tps(noisy) - 1) * 100  # extra time per token with the noise
    for _arm, result in arms.items():
        if tps(BASELINE) and "tokens_per_s" in result:
            result["vs_a"] = result["tokens_per_s"] / tps(BASELINE)
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
            spec = ARM_SPECS[arm]
            if "error" in r:
                lines.append(f"| {arm} | {spec.label} | failed: {r['error'][:120]} | | | | | | |")
                continue
            setup = spec.setup(r, s)
            vs_a = f"{r['vs_a']:.2f}x" if "vs_a" in r else "-"
            lines.append(
                f"| {arm} | {setup} | {r['tokens_per_s']:,.0f} | {r['step_ms_median']:,.0f} "
                f"| {r['real_tokens_per_step']:,.0f} | {r['padding_share']:.0%} | {gib(r['peak_memory_bytes'])} "
                f"| {r['mfu']:.1%} | {vs_a} |"
            )
        ratios = report["ratios"][batch]
        parts = []
        for key, _, _, text in RATIOS:
            if key in ratios:
                parts.append(f"{text} = {ratios[key]:.2f}x")
        if "neftune_overhead_pct" in ratios:
            noisy, plain = NOISE_OVERHEAD
            parts.append(f"NEFTune overhead ({noisy}) vs ({plain}) = {ratios['neftune_overhead_pct']:+.1f}%")
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
        "versions": bench_versions(),
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
            spec = ARM_SPECS[arm]
            if not spec.every_batch_size and batch != settings.batch_sizes[0]:
                continue
            log(f"arm {arm} (batch {batch}): {spec.label}")
            try:
                arms[arm] = run_arm(arm, settings, batch, data, tokenizer)
            except Exception as error:  # one failing arm must not cost the others
                traceback.print_exc(file=sys.stderr)
                arms[arm] = {"label": spec.label, "error": one_line(error)}
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
