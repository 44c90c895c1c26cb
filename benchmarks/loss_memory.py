"""Memory of the loss at a 128K vocabulary: the model's own loss against neftune's labelled-only loss.

    python benchmarks/loss_memory.py --json benchmarks/results/loss-memory-cpu.json
    python benchmarks/loss_memory.py --full          # train every weight (the head's gradient too)

A random-init Llama with Llama 3's vocabulary (128,256 tokens; width 576, 2 layers, untied head, fp32,
LoRA r=16 unless ``--full``) trains a few steps (SGD, so no optimizer state) on one packed row of
``--examples`` examples of ``--length`` tokens, the first quarter of each a prompt (label -100), as
``neftune train`` collates them and with the packed-row attention it uses on CPU.  Each variant runs in its own process, so its peak RSS is its own:

    full       the model's own loss (``train.loss=full``): logits at every position, then cross-entropy
    labelled   ``neftune.lmhead``: LM head and cross-entropy at labelled positions only, in chunks

Reported per variant: the peak RSS over the steps, the RSS before the first step (model, data,
libraries), their difference (what the training step added at its peak), the bytes autograd saved
for backward in one step (``saved_tensors_hooks``; each storage once, the model's weights not
counted) and the largest of those storages.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from neftune.machine import machine_info
from throughput_arms import bench_versions
from throughput_train import peak_memory_bytes, reset_peak_memory

VARIANTS = ("full", "labelled")


def current_rss() -> int:
    """Resident set size of this process now, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def build(args: argparse.Namespace) -> tuple[Any, dict[str, torch.Tensor]]:
    """The model (LoRA-wrapped unless ``--full``) and one packed batch."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from neftune import varlen
    from neftune.data.collate import packing_collator

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=2,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=False,
        use_cache=False,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).float().train()
    model.set_attn_implementation(varlen.register())  # as neftune train on CPU: no T x T mask for the packed row
    if not args.full:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(1)
    prompt = args.length // 4
    rows = []
    for _ in range(args.examples):
        ids = torch.randint(0, args.vocab, (args.length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return model, packing_collator()(rows)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Train ``args.steps`` steps of one variant in this process and return its memory numbers."""
    from neftune import lmhead

    model, batch = build(args)
    if args.variant == "labelled":
        lmhead.attach(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    saved = {"bytes": 0, "largest": 0}
    seen = {p.untyped_storage().data_ptr() for p in model.parameters()}  # weights kept anyway: not counted

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            saved["bytes"] += storage.nbytes()
            saved["largest"] = max(saved["largest"], storage.nbytes())
        return t

    per_process = reset_peak_memory()
    before = current_rss()
    losses, started = [], time.perf_counter()
    for step in range(args.steps):
        if step == 0:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = model(**batch).loss
        else:
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    peak = peak_memory_bytes()
    return {
        "variant": args.variant,
        "peak_rss_bytes": peak,
        "peak_rss_kind": "per process" if per_process else "process peak including setup",
        "rss_before_steps_bytes": before,
        "step_peak_bytes": peak - before,
        "saved_for_backward_bytes": saved["bytes"],
        "largest_saved_tensor_bytes": saved["largest"],
        "losses": losses,
        "seconds": time.perf_counter() - started,
    }


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown, ready for BENCHMARKS.md."""
    s = report["settings"]
    mode = "all weights" if s["full"] else "LoRA r=16"
    lines = [
        f"Loss memory ({report['date']}, {report['machine']['cpu']}, {report['machine']['torch_threads']} threads): "
        f"random-init Llama, vocabulary {s['vocab']:,}, width 576, 2 layers, {mode}, fp32; one packed row of "
        f"{s['examples']} x {s['length']} tokens (a quarter prompt), {s['steps']} SGD steps; "
        f"torch {report['versions']['torch']}, transformers {report['versions']['transformers']}.",
        "",
        "| loss | peak RSS | RSS before the steps | step's peak above it | saved for backward | largest saved tensor |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in report["variants"].items():
        lines.append(
            f"| {name} | {gib(r['peak_rss_bytes'])} | {gib(r['rss_before_steps_bytes'])} | {gib(r['step_peak_bytes'])} "
            f"| {gib(r['saved_for_backward_bytes'])} | {gib(r['largest_saved_tensor_bytes'])} |"
        )
    ratios = report["ratios"]
    lines += [
        "",
        f"full/labelled: step's peak {ratios['step_peak']:.1f}x, saved for backward {ratios['saved']:.1f}x, "
        f"peak RSS {ratios['peak_rss']:.1f}x; first-step loss {report['variants']['full']['losses'][0]:.5f} (full) "
        f"and {report['variants']['labelled']['losses'][0]:.5f} (labelled).",
        "",
    ]
    return "\n".join(lines)


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run each variant in a child process, print the Markdown report and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--examples", type=int, default=8)
    parser.add_argument("--length", type=int, default=512, help="tokens per example")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--full", action="store_true", help="train all weights instead of LoRA")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # the child's job
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.variant:
        print(json.dumps(measure(args)))
        return {}
    forwarded = [f"--vocab={args.vocab}", f"--examples={args.examples}", f"--length={args.length}"]
    forwarded += [f"--steps={args.steps}", *(["--full"] if args.full else [])]
    variants = {}
    for variant in VARIANTS:
        print(f"variant {variant} ...", file=sys.stderr, flush=True)
        done = subprocess.run(
            [sys.executable, __file__, *forwarded, f"--variant={variant}"], capture_output=True, text=True, check=True
        )
        variants[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    full, ours = variants["full"], variants["labelled"]
    report = {
        "benchmark": "loss_memory",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine_info(),
        "versions": bench_versions(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("variant", "json")},
        "variants": variants,
        "ratios": {
            "step_peak": full["step_peak_bytes"] / max(ours["step_peak_bytes"], 1),
            "saved": full["saved_for_backward_bytes"] / ours["saved_for_backward_bytes"],
            "peak_rss": full["peak_rss_bytes"] / ours["peak_rss_bytes"],
        },
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
