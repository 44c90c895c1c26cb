"""How many answers reach the token cap with transformers' repetition penalty, and with the stop tokens spared.

    python benchmarks/stop_tokens.py                                  # 24 IFEval prompts, cap 512, penalty 1.2
    python benchmarks/stop_tokens.py --prompts 96 --max-new-tokens 1024 --json benchmarks/results/stop-tokens.json

SmolLM2-135M-Instruct answers a fixed stratified subset of ``builtin:ifeval`` twice with neftune's hf
backend (:func:`neftune.generate.generate_completions`, greedy, fp32): once with transformers' own
repetition penalty, which also lowers ``<|im_end|>`` because the ChatML prompt holds it, and once
with :class:`neftune.generate.PenaltySparingStops`.  Reported per setting: the share of answers that
reached the cap, length percentiles (tokens) and the seconds taken.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--penalty", type=float, default=1.2)
    parser.add_argument("--batch-size", type=int, default=24)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import numpy as np

    from neftune.data.formats import load_eval_examples
    from neftune.data.template import encode_prompt
    from neftune.generate import generate_completions
    from neftune.machine import machine_info, versions
    from neftune.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(args.model, for_training=False)
    examples = load_eval_examples("builtin:ifeval", limit=args.prompts, require_response=False).examples
    prompts = [encode_prompt(tokenizer, e.prompt_messages) for e in examples]
    rows = []
    for spare in (False, True):
        started = time.perf_counter()
        done = generate_completions(
            model,
            tokenizer,
            prompts,
            max_new_tokens=args.max_new_tokens,
            repetition_penalty=args.penalty,
            spare_stop_tokens=spare,
            batch_size=args.batch_size,
            progress=False,
        )
        lengths = [len(c.ids) for c in done]
        row = {
            "penalty": "stop tokens spared" if spare else "transformers' own",
            "reached_cap": sum(c.reached_cap for c in done) / len(done),
            "length_p50_p90_p95": [int(np.percentile(lengths, q)) for q in (50, 90, 95)],
            "seconds": round(time.perf_counter() - started, 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{args.prompts} IFEval prompts, cap {args.max_new_tokens}, repetition penalty {args.penalty:g}\n")
    print("| penalty | reached the cap | length p50 / p90 / p95 (tokens) | seconds |")
    print("|---|---:|---|---:|")
    for r in rows:
        p = " / ".join(str(v) for v in r["length_p50_p90_p95"])
        print(f"| {r['penalty']} | {100 * r['reached_cap']:.0f}% | {p} | {r['seconds']:.0f} |")
    if args.json:
        settings = {**vars(args), "json": str(args.json)}
        info = {"machine": machine_info(), "versions": versions(("torch", "transformers")), "settings": settings}
        args.json.write_text(json.dumps({**info, "rows": rows}, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
