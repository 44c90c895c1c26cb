"""Greedy answers per second: the hf backend against OpenAI-compatible servers, on the same prompts.

    python benchmarks/generation.py                                   # hf and llama.cpp, 32 IFEval prompts
    python benchmarks/generation.py --backends hf,llama.cpp,vllm,vllm-bf16 --prompts 64 --max-new-tokens 384
    python benchmarks/generation.py --json benchmarks/results/generation.json

Every backend answers the same prompts (a fixed stratified subset of ``builtin:ifeval``) with
SmolLM2-135M-Instruct, greedy, no repetition penalty (the only setting llama.cpp honours), through neftune's own code path
(:func:`neftune.generate.generate_outputs`, with :class:`neftune.serve.ServerEngine` for a server).
Each backend runs in a fresh child process, so that its peak RSS is its own:

* ``hf``: transformers' ``generate`` in-process, fp32, static batches of ``--batch-size``;
* ``llama.cpp``: ``llama_cpp.server`` (``.ci/install-llama-server``) on the Q4_1 GGUF;
* ``vllm`` / ``vllm-bf16``: vLLM's OpenAI server from the venv of ``make vllm`` (fp32 / bf16, eager).

Reported per backend: load time (model load, or server start until ``/v1/models`` answers), time to
the first finished answer and to the last (load excluded), generated tokens per second (answers
re-tokenized with the model's tokenizer, so every backend is counted alike), the share of answers
that reached the cap, the share identical to hf's, and peak RSS (the child; a server's own on top).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

MODEL = "smollm2-135m"
PENALTY = 1.0
THREADS = str(min(4, os.cpu_count() or 1))


def _examples(n: int) -> list[Any]:
    from neftune.data.formats import load_eval_examples

    return load_eval_examples("builtin:ifeval", limit=n, require_response=False).examples


def _gguf() -> str:
    from neftune.model_cache import smollm2_gguf_path

    return str(smollm2_gguf_path())


def _server_command(backend: str, port: int, model_dir: str) -> list[str]:
    if backend == "llama.cpp":
        return [
            sys.executable, "-m", "llama_cpp.server", "--model", _gguf(), "--model_alias", MODEL,
            "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "4096", "--n_threads", THREADS,
            "--n_threads_batch", THREADS,
        ]  # fmt: skip
    venv = Path(os.environ.get("NEFTUNE_VLLM_VENV", Path.home() / ".cache/neftune/vllm-venv"))
    dtype = "bfloat16" if backend == "vllm-bf16" else "float32"
    return [
        str(venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
        "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype,
        "--enforce-eager", "--max-model-len", "4096",
    ]  # fmt: skip


def _wait_for(base: str, process: subprocess.Popen, limit_s: float = 600.0) -> None:
    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with status {process.returncode} before answering")
        try:
            with urllib.request.urlopen(f"{base}/v1/models", timeout=2):
                return
        except OSError:
            time.sleep(0.25)
    raise SystemExit(f"the server did not answer within {limit_s:.0f} s")


def run_one(backend: str, n_prompts: int, cap: int, batch_size: int) -> dict[str, Any]:
    """Answer the prompts with one backend in this process; the measurements."""
    import socket

    from neftune.data.template import encode_prompt
    from neftune.generate import Completion, generate_completions
    from neftune.model_cache import resolve_model
    from neftune.serve import ServerEngine

    examples = _examples(n_prompts)
    started = time.perf_counter()
    first: list[float] = []
    process = None
    if backend == "hf":
        from neftune.models import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(MODEL, for_training=False)
        load_s = time.perf_counter() - started
        prompts = [encode_prompt(tokenizer, e.prompt_messages) for e in examples]
        t0 = time.perf_counter()
        done: list[Completion] = []
        for start in range(0, len(prompts), batch_size):  # the engine's batches, timed one by one
            done += generate_completions(
                model, tokenizer, prompts[start : start + batch_size], max_new_tokens=cap,
                repetition_penalty=PENALTY, batch_size=batch_size, progress=False,
            )  # fmt: skip
            first = first or [time.perf_counter() - t0]
    else:
        from transformers import AutoTokenizer

        model_dir = resolve_model(MODEL)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "VLLM_CPU_KVCACHE_SPACE": "2"}
        if backend.startswith("vllm"):
            env.pop("PYTHONPATH", None)  # the engine's venv has its own torch and transformers
        process = subprocess.Popen(
            _server_command(backend, port, model_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
        )
        base = f"http://127.0.0.1:{port}"
        try:
            _wait_for(base, process)
            load_s = time.perf_counter() - started
            engine = ServerEngine(
                f"{base}/v1", MODEL, tokenizer, server="vllm" if backend.startswith("vllm") else "llama.cpp",
                max_new_tokens=cap, repetition_penalty=PENALTY, workers=16,
            )  # fmt: skip
            prompts = [encode_prompt(tokenizer, e.prompt_messages) for e in examples]
            t0 = time.perf_counter()
            answer = engine._answer
            engine._answer = lambda *a: _first(answer(*a), first, t0)  # type: ignore[method-assign]
            done = engine(prompts, False)
        finally:
            process.terminate()
            process.wait(timeout=30)
    total_s = time.perf_counter() - t0
    tokens = sum(
        len(tokenizer(c.text, add_special_tokens=False)["input_ids"]) if c.text is not None else len(c.ids)
        for c in done
    )
    texts = [
        c.text.strip() if c.text is not None else tokenizer.decode(c.ids, skip_special_tokens=True).strip()
        for c in done
    ]
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    server = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 if process is not None else 0.0
    return {
        "backend": backend,
        "prompts": len(prompts),
        "max_new_tokens": cap,
        "load_s": round(load_s, 1),
        "first_answer_s": round(first[0], 1) if first else None,
        "all_answers_s": round(total_s, 1),
        "tokens": tokens,
        "tokens_per_s": round(tokens / total_s, 1),
        "tokens_per_s_with_load": round(tokens / (total_s + load_s), 1),
        "reached_cap": round(sum(c.reached_cap for c in done) / len(done), 3),
        "peak_rss_mb": round(own),
        "server_peak_rss_mb": round(server),
        "texts": texts,
    }


def _first(result: Any, first: list[float], t0: float) -> Any:
    if not first:
        first.append(time.perf_counter() - t0)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="hf,llama.cpp", help="comma-separated: hf, llama.cpp, vllm, vllm-bf16")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=16, help="hf: prompts per static batch")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # run one backend in this process (the child)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.prompts, args.max_new_tokens, args.batch_size)))
        return
    rows = []
    for backend in args.backends.split(","):
        command = [sys.executable, __file__, "--one", backend, "--prompts", str(args.prompts)]
        command += ["--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.batch_size)]
        child = subprocess.run(command, capture_output=True, text=True)
        if child.returncode != 0:
            print(f"{backend}: failed: {child.stderr.strip().splitlines()[-1] if child.stderr.strip() else '?'}")
            continue
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
    reference = next((r["texts"] for r in rows if r["backend"] == "hf"), None)
    print(
        f"{'backend':10} {'load s':>7} {'first s':>8} {'all s':>7} {'tok/s':>7} {'w/ load':>8} {'cut':>5} {'same':>5} {'RSS MB':>7} {'server MB':>9}"
    )
    for row in rows:
        same = sum(a == b for a, b in zip(row["texts"], reference, strict=True)) / len(reference) if reference else None
        row["identical_to_hf"] = same
        print(
            f"{row['backend']:10} {row['load_s']:7.1f} {row['first_answer_s']:8.1f} {row['all_answers_s']:7.1f} "
            f"{row['tokens_per_s']:7.1f} {row['tokens_per_s_with_load']:8.1f} {row['reached_cap']:5.0%} "
            f"{'' if same is None else f'{same:.0%}':>5} {row['peak_rss_mb']:7d} {row['server_peak_rss_mb']:9d}"
        )
    if args.json:
        from neftune.machine import machine_info, versions

        meta = {"machine": machine_info(), **versions(("neftune", "torch", "transformers"))}
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
