"""Data at scale: time to the first training step, peak memory and cache size, neftune against TRL.

    python benchmarks/data_scale.py --sizes 1000 --model tiny-random          # checks the script, < 1 min
    python benchmarks/data_scale.py --json data-scale.json                    # 10K, 100K, 1M on SmolLM2-135M

For each size a ShareGPT-shaped JSON Lines file of generated text is written (two turns, about 850
bytes a conversation, the shape of the issue that asked for this), then, each in a fresh process:

    neftune cold     ``neftune train --data FILE --max-steps 1`` with an empty data cache
    neftune cached   the same command again: the normalized and tokenized tables are reused
    TRL cold         ``SFTTrainer`` (``dataset_num_proc=2``) on the same file read by ``datasets``
                     (conversations renamed to messages), an empty ``datasets`` cache
    TRL cached       the same again: ``datasets`` reuses its cached ``map`` results

Measured: the data preparation (neftune: reading and tokenizing, ``data_prepare_s`` of
``train_summary.json``; TRL: ``load_dataset`` and the renaming ``map``, plus ``SFTTrainer``'s
construction, which tokenizes), the wall time of the whole process (start, data, model load, one
optimizer step, saving; in the table in brackets),
its peak RSS (``wait4``'s ``ru_maxrss``: the process and the children it waited for, so the
tokenizing workers count), and the size of the data cache on disk.  TRL runs full finetuning, its
default; neftune runs LoRA, its default, so their optimizer memory differs by design and the peak RSS
compares data pipelines only loosely.  ``--no-trl`` skips TRL; ``--trl-max`` (default 100,000) caps
the sizes TRL is run at, since on 2 cores its 1M cold run alone takes about 20 minutes.

Stdout gets a Markdown table; ``--json`` writes every number with the machine and versions.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_WORDS = [
    "the",
    "a",
    "model",
    "data",
    "training",
    "answer",
    "question",
    "because",
    "which",
    "example",
    "result",
    "value",
    "system",
    "user",
    "time",
    "first",
    "second",
    "number",
    "language",
    "people",
    "water",
    "light",
    "energy",
    "city",
    "river",
    "history",
    "science",
    "music",
    "paper",
]


def write_sharegpt(path: Path, n: int, seed: int = 0) -> None:
    """``n`` two-turn ShareGPT conversations of about 850 bytes each."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as handle:
        for i in range(n):
            question = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(20, 40)))
            answer = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(60, 110)))
            turns = [{"from": "human", "value": f"{i}. {question}?"}, {"from": "gpt", "value": answer + "."}]
            handle.write(json.dumps({"id": str(i), "conversations": turns}) + "\n")


def run_measured(argv: list[str], env: dict[str, str], log: Path) -> dict[str, float]:
    """Run ``argv``; its wall time and peak RSS (GiB), or a failure with the log's tail."""
    started = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise SystemExit(f"{argv[:3]} failed ({proc.returncode}); the end of {log}:\n{tail}")
    return {"seconds": round(seconds, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2)}


def du(path: Path) -> float:
    """Bytes under ``path``, in GiB."""
    if not path.exists():
        return 0.0
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**30, 3)


TRL_SCRIPT = textwrap.dedent(
    """
    import sys
    import time
    import datasets
    from trl import SFTConfig, SFTTrainer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data, model_dir, out, max_length = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    ROLES = {"human": "user", "gpt": "assistant", "system": "system"}

    def to_messages(row):
        return {"messages": [{"role": ROLES[t["from"]], "content": t["value"]} for t in row["conversations"]]}

    started = time.perf_counter()
    dataset = datasets.load_dataset("json", data_files=data, split="train")
    dataset = dataset.map(to_messages, remove_columns=dataset.column_names, num_proc=2)
    prepare = time.perf_counter() - started
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    args = SFTConfig(
        output_dir=out, max_steps=1, per_device_train_batch_size=8, max_length=max_length,
        dataset_num_proc=2, report_to="none", save_strategy="no", logging_steps=1,
        assistant_only_loss=False, use_cpu=True, dataloader_num_workers=0,
    )
    started = time.perf_counter()
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)  # tokenizes
    prepare += time.perf_counter() - started
    print("DATA_PREPARE_S", round(prepare, 3), flush=True)
    trainer.train()
    """
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated example counts")
    parser.add_argument("--model", default="smollm2-135m", help="neftune model spec")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--no-trl", action="store_true", help="neftune only")
    parser.add_argument("--trl-max", type=int, default=100_000, help="run TRL at sizes up to this")
    parser.add_argument("--workdir", help="where the files and caches go (default: a temporary directory)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    sys.path.insert(0, str(ROOT / "src"))
    from neftune.machine import machine_info, versions
    from neftune.models import resolve_model

    model_dir = resolve_model(args.model)  # built once, outside the measurements
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="neftune-data-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    neftune_bin = str(Path(sys.executable).with_name("neftune"))
    rows = []
    for n in sizes:
        data = work / f"sharegpt-{n}.jsonl"
        if not data.exists():
            print(f"writing {data}", file=sys.stderr)
            write_sharegpt(data, n)
        cache = work / f"cache-{n}"
        shutil.rmtree(cache, ignore_errors=True)
        env = {**os.environ, "HF_DATASETS_CACHE": str(cache / "hf")}  # the model cache is shared, built above
        row: dict = {"examples": n, "file_gib": round(data.stat().st_size / 2**30, 3)}
        for phase in ("cold", "cached"):
            argv = [neftune_bin, "train", "--model", args.model, "--data", str(data), "--max-steps", "1"]
            argv += ["--max-length", str(args.max_length), "--output", str(work / f"out-{n}-{phase}-{time.time_ns()}")]
            argv += [f"data.cache_dir={cache / 'neftune'}", "--no-progress"]
            print(f"{n}: neftune {phase}", file=sys.stderr)
            row[f"neftune_{phase}"] = run_measured(argv, env, work / f"neftune-{n}-{phase}.log")
            summary = json.loads((Path(argv[argv.index("--output") + 1]) / "train_summary.json").read_text())
            row[f"neftune_{phase}"]["prepare_seconds"] = summary["data_prepare_s"]
        row["neftune_cache_gib"] = du(cache / "neftune")
        if not args.no_trl and n <= args.trl_max:
            script = work / "trl_run.py"
            script.write_text(TRL_SCRIPT)
            for phase in ("cold", "cached"):
                argv = [
                    sys.executable,
                    str(script),
                    str(data),
                    str(model_dir),
                    str(work / "trl-out"),
                    str(args.max_length),
                ]
                print(f"{n}: TRL {phase}", file=sys.stderr)
                log = work / f"trl-{n}-{phase}.log"
                row[f"trl_{phase}"] = run_measured(argv, env, log)
                marker = [line for line in log.read_text().splitlines() if line.startswith("DATA_PREPARE_S")]
                row[f"trl_{phase}"]["prepare_seconds"] = float(marker[-1].split()[1])
            row["trl_cache_gib"] = du(cache / "hf")
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)

    print("| examples | neftune cold | neftune cached | neftune cache | TRL cold | TRL cached | TRL cache |")
    print("|---|---|---|---|---|---|---|")

    def cell(row: dict, key: str) -> str:
        got = row.get(key)
        if not got:
            return "not run"
        return f"{got['prepare_seconds']:.1f} s ({got['seconds']:.0f} s), {got['peak_rss_gib']:.1f} GiB"

    for row in rows:
        trl_cache = f"{row['trl_cache_gib']:.2f} GiB" if "trl_cache_gib" in row else "not run"
        print(
            f"| {row['examples']:,} | {cell(row, 'neftune_cold')} | {cell(row, 'neftune_cached')} | "
            f"{row['neftune_cache_gib']:.2f} GiB | {cell(row, 'trl_cold')} | {cell(row, 'trl_cached')} | {trl_cache} |"
        )
    if args.json:
        meta = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": machine_info(),
            "model": args.model,
            "max_length": args.max_length,
            "versions": versions(("torch", "transformers", "datasets", "trl")),
        }
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
