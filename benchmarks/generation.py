"""Greedy answers per second: the hf backend against serving engines, on the same prompts, for every arm.

    python benchmarks/generation.py                                   # hf and llama.cpp, 32 IFEval prompts
    python benchmarks/generation.py --backends hf,llama.cpp,vllm,vllm-bf16 --prompts 24 --max-new-tokens 128
    # the study's shape: 96 prompts, its cap and penalty, its 12 trained arms (hf on 2 of them, scaled)
    python benchmarks/generation.py --backends hf,vllm --prompts 96 --max-new-tokens 1024 --batch-size 48 \
        --repetition-penalty 1.2 --arms runs/study/arms/*/model --hf-arms 2 --json benchmarks/results/generation-study.json

Every backend answers the same prompts (a fixed stratified subset of ``builtin:ifeval``) with
SmolLM2-135M-Instruct, or with each LoRA arm of ``--arms``, greedy, through neftune's own code paths,
each backend in a fresh child process so that its peak RSS is its own:

* ``hf``: each arm loaded in-process (base + adapter, merged) and answered by
  :func:`neftune.generate.generate_completions`, fp32, static batches of ``--batch-size``;
* ``vllm`` / ``vllm-bf16``: the server ``generate.backend=vllm`` runs (:class:`neftune.eval_plan.Backend`,
  :mod:`neftune.vllm_server`): started once, every arm an adapter loaded into it, ``--batch-size``
  requests in flight, fp32 (or bf16) and eager on a CPU;
* ``llama.cpp``: ``llama_cpp.server`` (``.ci/install-llama-server``) on the Q4_1 GGUF, base model and
  penalty 1.0 only (the only penalty its server applies as transformers does).

The repetition penalty spares the stop tokens (the default) in hf and vllm.  Reported per backend:
load time (model loads; the server's start and the adapters' loads), answering time, generated tokens
per second (answers re-tokenized with the model's tokenizer, so every backend is counted alike), the
share of answers that reached the cap, the share identical to hf's (on the arms both answered), the
time for all arms (hf, when ``--hf-arms`` answered fewer, scaled per arm: in-process every arm is
loaded and answered alike) and peak RSS (the child; a server's own on top).
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


def _server_command(port: int) -> list[str]:
    return [
        sys.executable, "-m", "llama_cpp.server", "--model", _gguf(), "--model_alias", MODEL,
        "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "4096", "--n_threads", THREADS,
        "--n_threads_batch", THREADS,
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


def _hf_arm(arm: str | None, prompts_of: Any, cap: int, batch_size: int, penalty: float) -> tuple[float, Any, list]:
    """Load one arm in-process (the base model, or base + adapter merged) and answer: (load s, tokenizer, done)."""
    from neftune.generate import generate_completions
    from neftune.models import load_model_and_tokenizer

    t0 = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(arm or MODEL, for_training=False)
    load_s = time.perf_counter() - t0
    prompts = prompts_of(tokenizer)
    done = []
    for start in range(0, len(prompts), batch_size):  # the backend's static batches
        done += generate_completions(
            model, tokenizer, prompts[start : start + batch_size], max_new_tokens=cap,
            repetition_penalty=penalty, batch_size=batch_size, progress=False,
        )  # fmt: skip
    return load_s, tokenizer, done


def run_one(backend: str, n_prompts: int, cap: int, batch_size: int, penalty: float, arms: list[str]) -> dict[str, Any]:
    """Answer the prompts for every arm (``arms``: LoRA adapter directories; none = the base model) with
    one backend in this process; the measurements, per arm and in total."""
    import socket
    import tempfile

    from neftune.data.template import encode_prompt
    from neftune.model_cache import resolve_model

    examples = _examples(n_prompts)

    def prompts_of(tokenizer: Any) -> list[list[int]]:
        return [encode_prompt(tokenizer, e.prompt_messages) for e in examples]

    per_arm: list[dict[str, Any]] = []
    process = None
    texts_per_arm: list[list[str]] = []
    for_arms: list[str | None] = list(arms) or [None]
    if backend == "hf":
        for arm in for_arms:
            t0 = time.perf_counter()
            load_s, tokenizer, done = _hf_arm(arm, prompts_of, cap, batch_size, penalty)
            per_arm.append(_arm_row(arm, load_s, time.perf_counter() - t0 - load_s, done, tokenizer))
            texts_per_arm.append(_texts(done, tokenizer))
    elif backend.startswith("vllm"):
        from transformers import AutoTokenizer

        from neftune.eval_plan import Backend
        from neftune.vllm_server import vllm_session

        base = resolve_model(MODEL)
        tokenizer = AutoTokenizer.from_pretrained(base)
        extra = "--dtype bfloat16" if backend == "vllm-bf16" else ""
        with tempfile.TemporaryDirectory() as logs, vllm_session():  # neftune's own server: fp32, eager, the plugin
            served = Backend("vllm", vllm_args=extra, log_dir=Path(logs))
            for i, arm in enumerate(for_arms):
                t0 = time.perf_counter()  # the first arm's load is the server's start; later ones load an adapter
                engine = served.engine(
                    Path(arm or base), f"arm{i}", tokenizer, max_new_tokens=cap, repetition_penalty=penalty,
                    spare_stop_tokens=True, workers=batch_size,
                )  # fmt: skip
                load_s = time.perf_counter() - t0
                done = engine(prompts_of(tokenizer), False)
                per_arm.append(_arm_row(arm, load_s, time.perf_counter() - t0 - load_s, done, tokenizer))
                texts_per_arm.append(_texts(done, tokenizer))
    else:  # llama.cpp: the base model's GGUF, no penalty (the only one its server honours like transformers)
        from transformers import AutoTokenizer

        from neftune.serve import ServerEngine

        if arms or penalty != 1.0:
            raise SystemExit("llama.cpp: base model only, --repetition-penalty 1.0 only")
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(MODEL))
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
        t0 = time.perf_counter()
        process = subprocess.Popen(_server_command(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        base_url = f"http://127.0.0.1:{port}"
        try:
            _wait_for(base_url, process)
            load_s = time.perf_counter() - t0
            engine = ServerEngine(
                f"{base_url}/v1", MODEL, tokenizer, server="llama.cpp", max_new_tokens=cap,
                repetition_penalty=penalty, workers=batch_size,
            )  # fmt: skip
            done = engine(prompts_of(tokenizer), False)
        finally:
            process.terminate()
            process.wait(timeout=30)
        per_arm.append(_arm_row(None, load_s, time.perf_counter() - t0 - load_s, done, tokenizer))
        texts_per_arm.append(_texts(done, tokenizer))
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    server = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    load_s = sum(a["load_s"] for a in per_arm)
    answer_s = sum(a["answer_s"] for a in per_arm)
    tokens = sum(a["tokens"] for a in per_arm)
    answers = sum(a["answers"] for a in per_arm)
    return {
        "backend": backend,
        "prompts": n_prompts,
        "arms": len(per_arm),
        "max_new_tokens": cap,
        "repetition_penalty": penalty,
        "load_s": round(load_s, 1),
        "answer_s": round(answer_s, 1),
        "total_s": round(load_s + answer_s, 1),
        "tokens": tokens,
        "tokens_per_s": round(tokens / answer_s, 1),
        "tokens_per_s_with_load": round(tokens / (answer_s + load_s), 1),
        "reached_cap": round(sum(a["cut"] for a in per_arm) / answers, 3),
        "peak_rss_mb": round(own),
        "server_peak_rss_mb": round(server),
        "per_arm": per_arm,
        "texts": texts_per_arm,
    }


def _texts(done: list, tokenizer: Any) -> list[str]:
    return [
        c.text.strip() if c.text is not None else tokenizer.decode(c.ids, skip_special_tokens=True).strip()
        for c in done
    ]


def _arm_row(arm: str | None, load_s: float, answer_s: float, done: list, tokenizer: Any) -> dict[str, Any]:
    tokens = sum(
        len(tokenizer(c.text, add_special_tokens=False)["input_ids"]) if c.text is not None else len(c.ids)
        for c in done
    )  # re-tokenized, so that every backend is counted alike
    return {
        "arm": arm or MODEL,
        "load_s": round(load_s, 1),
        "answer_s": round(answer_s, 1),
        "tokens": tokens,
        "answers": len(done),
        "cut": sum(c.reached_cap for c in done),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="hf,llama.cpp", help="comma-separated: hf, llama.cpp, vllm, vllm-bf16")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=16, help="hf: prompts per static batch; servers: in flight")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="sparing the stop tokens (hf, vllm)")
    parser.add_argument("--arms", nargs="*", default=[], help="LoRA adapter directories, one per arm (default: base)")
    parser.add_argument("--hf-arms", type=int, default=0, help="hf answers only the first N arms (0: all)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # run one backend in this process (the child)
    args = parser.parse_args()
    if args.one:
        arms = args.arms[: args.hf_arms] if args.one == "hf" and args.hf_arms else args.arms
        row = run_one(args.one, args.prompts, args.max_new_tokens, args.batch_size, args.repetition_penalty, arms)
        print(json.dumps(row))
        return
    rows = []
    for backend in args.backends.split(","):
        command = [sys.executable, __file__, "--one", backend, "--prompts", str(args.prompts)]
        command += ["--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.batch_size)]
        command += ["--repetition-penalty", str(args.repetition_penalty), "--hf-arms", str(args.hf_arms)]
        command += ["--arms", *args.arms] if args.arms else []
        child = subprocess.run(command, capture_output=True, text=True)
        if child.returncode != 0:
            print(f"{backend}: failed: {child.stderr.strip().splitlines()[-1] if child.stderr.strip() else '?'}")
            continue
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
    arms = max((r["arms"] for r in rows), default=1)
    hf = next((r for r in rows if r["backend"] == "hf"), None)
    print(
        f"{'backend':10} {'arms':>4} {'load s':>7} {'answer s':>9} {'tok/s':>7} {'w/ load':>8} {'cut':>5} "
        f"{'same':>5} {f'{arms} arms s':>10} {'RSS MB':>7} {'server MB':>9}"
    )
    for row in rows:
        same = None
        if hf is not None:  # answers of the arms both answered, prompt by prompt
            pairs = [
                (a, b) for ta, tb in zip(row["texts"], hf["texts"], strict=False) for a, b in zip(ta, tb, strict=True)
            ]
            same = sum(a == b for a, b in pairs) / len(pairs)
        row["identical_to_hf"] = same
        # every arm is loaded and answered alike in-process: an hf run of fewer arms scales per arm
        row["all_arms_s"] = round(row["total_s"] * arms / row["arms"], 1) if row["backend"] == "hf" else row["total_s"]
        row["all_arms_projected"] = row["arms"] != arms
        print(
            f"{row['backend']:10} {row['arms']:4d} {row['load_s']:7.1f} {row['answer_s']:9.1f} "
            f"{row['tokens_per_s']:7.1f} {row['tokens_per_s_with_load']:8.1f} {row['reached_cap']:5.0%} "
            f"{'' if same is None else f'{same:.0%}':>5} {row['all_arms_s']:9.1f}{'*' if row['all_arms_projected'] else ' '} "
            f"{row['peak_rss_mb']:7d} {row['server_peak_rss_mb']:9d}"
        )
    if any(r["all_arms_projected"] for r in rows):
        print(f"* projected to {arms} arms from the arms answered (each arm is loaded and answered alike)")
    if args.json:
        from neftune.machine import machine_info, versions

        meta = {"machine": machine_info(), **versions(("neftune", "torch", "transformers")), "args": vars(args)}
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
