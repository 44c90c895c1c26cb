"""Everything that needs a GPU, in one run of at most 8 minutes on one GPU: ``make gpu-check``.

    python benchmarks/gpu_check.py --results benchmarks/results/gpu-check     # on the GPU machine
    python benchmarks/gpu_check.py --download-wheels .whl                     # here, before (see below)

Parts, each in its own process with its own time limit; a part that fails or runs out of time is
recorded and the next one runs:

1. ``cuda-tests``: ``pytest -m cuda`` (tests skipped without CUDA).
2. ``throughput``: ``benchmarks/throughput.py --preset gpu`` with arms a-f and the fixed-shape
   ceiling (no generation benchmark), JSON and Markdown.
3. ``noise-overhead``: ``benchmarks/noise_overhead.py`` (CPU and CUDA), JSON and Markdown.
4. ``fsdp2-smoke`` and 5. ``zero3-smoke``: ``accelerate launch --config_file
   configs/accelerate/{fsdp,deepspeed-zero3}.yaml --num_processes 1 -m neftune train`` on the tiny
   model, LoRA with ``--merge`` and all weights; every saved model is then loaded anew by
   ``neftune eval`` in a fresh process, whose held-out loss must match the one training reported.

Results (six files): ``<results>/gpu-check.json`` (every part: status, seconds, command, output
tail, numbers), ``throughput-gpu.json``, ``noise-overhead-gpu.json``, their Markdown reports
``throughput.md`` and ``noise-overhead.md``, and ``gpu-check.md`` (a summary table, then those
reports), which is also printed at the end.  Exit status 1 when any part failed.

The GPU machine has no network and an image with torch and accelerate but neither deepspeed nor
trl, and an older transformers.  ``--download-wheels DIR`` fetches (here, where pip works) the
wheels of the versions installed here for Python 3.12 on x86-64 Linux, and builds deepspeed's;
on the machine, install them first::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:src python3 benchmarks/gpu_check.py --results $OUT
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
LIMITS = {"cuda-tests": 60, "throughput": 240, "noise-overhead": 60, "fsdp2-smoke": 60, "zero3-smoke": 60}
"""Seconds per part: 480 in all."""
WHEELS = ["transformers", "tokenizers", "peft", "trl", "datasets", "dill", "multiprocess", "hjson"]
WHEELS += ["pydantic", "pydantic_core", "annotated_types", "typing_inspection"]
"""Packages (at the versions installed here) the GPU image lacks or has older; deepspeed is built."""
TRAIN = [
    {"instruction": f"Repeat the word {w} {n} times", "output": " ".join([w] * n)} for w in "abcd" for n in (1, 2, 3, 4)
]
HELD_OUT = [{"instruction": "Repeat the word e 2 times", "output": "e e"}, {"instruction": "Say hi", "output": "hi"}]


def run_part(name: str, cmd: list[str], results: Path, env: dict[str, str] | None = None, report: bool = False) -> dict:
    """Run one part in its own process; never raises.  ``report``: its stdout is a Markdown report, kept
    as ``<results>/<name>.md``."""
    started = time.perf_counter()
    record: dict = {"part": name, "command": " ".join(cmd)}
    # a session of its own, so that a part out of time is killed with every process it started
    # (accelerate launch -> torchrun -> the ranks), which would otherwise hold the GPU
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=LIMITS[name])
        record.update(status="ok" if proc.returncode == 0 else "failed", returncode=proc.returncode)
        if report and stdout.strip():
            (results / f"{name}.md").write_text(stdout, encoding="utf-8")
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        record.update(status="timed out", returncode=None)
    record["seconds"] = round(time.perf_counter() - started, 1)
    record["tail"] = (stdout + stderr)[-3000:]
    return record


def smoke(name: str, config: str, results: Path, scratch: Path) -> dict:
    """``accelerate launch`` on one GPU, LoRA (+ merge) and full, then each saved model reloaded."""
    work = scratch / name
    work.mkdir(parents=True, exist_ok=True)
    data = {"train": work / "train.jsonl", "eval": work / "eval.jsonl"}
    for key, records in (("train", TRAIN), ("eval", HELD_OUT)):
        data[key].write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / config)]
    launch += ["--num_processes", "1", "-m", "neftune", "train", "--model", "tiny-random", "--max-steps", "4"]
    launch += ["--batch-size", "4", "--no-progress", "--data", str(data["train"]), f"data.eval={data['eval']}"]
    env = {"NEFTUNE_CACHE": str(scratch / "cache"), "HF_HUB_OFFLINE": "1"}
    script = [f"{' '.join(launch)} --output {work / 'lora'} --lora --merge"]
    script.append(f"{' '.join(launch)} --output {work / 'full'} --full")
    for model in ("lora/model", "lora/merged", "full/model"):
        out = work / (model.replace("/", "-") + ".json")
        script.append(
            f"{sys.executable} -m neftune eval --model {work / model} --data {data['eval']} --output {out} "
            "--max-new-tokens 8"
        )
    record = run_part(name, ["bash", "-ec", " && ".join(script)], results, env)
    if record["status"] == "ok":
        checks = {}
        for run, model in (("lora", "lora/model"), ("lora", "lora/merged"), ("full", "full/model")):
            trained = json.loads((work / run / "train_summary.json").read_text())
            reloaded = json.loads((work / (model.replace("/", "-") + ".json")).read_text())["heldout"]["loss"]
            checks[model] = {
                "trained": trained["heldout_loss"],
                "reloaded": reloaded,
                "distributed_type": trained["distributed_type"],
                "tokens_per_s": trained["tokens_per_s"],
            }
        # bf16 training against a fresh bf16 load: the same weights, rounded differently on the way
        bad = [m for m, c in checks.items() if abs(c["reloaded"] - c["trained"]) > 0.02 * abs(c["trained"])]
        record["checks"] = checks
        if bad:
            record.update(status="failed", reason=f"reloaded held-out loss differs from training's: {bad}")
    return record


def environment() -> dict:
    from neftune.machine import machine_info, versions

    packages = ("torch", "transformers", "accelerate", "peft", "trl", "deepspeed", "datasets")
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine_info(),
        "versions": versions(packages, missing="not installed"),
    }


def summary_markdown(env: dict, records: list[dict], results: Path) -> str:
    title = f"# GPU check ({env['date']}, {env['machine'].get('gpu')})"
    lines = [title, "", f"versions: {json.dumps(env['versions'])}", ""]
    lines += ["| part | status | seconds | note |", "|---|---|---:|---|"]
    for r in records:
        last = r["tail"].strip().splitlines()[-1:] or [""]
        note = r.get("reason") or ("" if r["status"] == "ok" else last[0][:160])
        lines.append(f"| {r['part']} | {r['status']} | {r['seconds']} | {note.replace('|', '/')} |")
    for r in records:
        if r.get("checks"):
            lines += ["", f"## {r['part']}", "", "| model | trained held-out loss | reloaded | type | tokens/s |"]
            lines.append("|---|---:|---:|---|---:|")
            for model, c in r["checks"].items():
                lines.append(
                    f"| {model} | {c['trained']:.4f} | {c['reloaded']:.4f} | {c['distributed_type']} "
                    f"| {c['tokens_per_s']:.0f} |"
                )
    for r in records:
        report = results / f"{r['part']}.md"
        if report.is_file():
            lines += ["", f"## {r['part']}", "", report.read_text(encoding="utf-8")]
    return "\n".join(lines) + "\n"


def download_wheels(target: Path) -> None:
    """Fetch the wheels the GPU image lacks (versions installed here) and build deepspeed's."""
    target.mkdir(parents=True, exist_ok=True)
    pins = [f"{p}=={importlib.metadata.version(p)}" for p in WHEELS]
    platforms = [f"--platform=manylinux_2_{n}_x86_64" for n in (17, 27, 28)] + ["--platform=manylinux2014_x86_64"]
    pip = [sys.executable, "-m", "pip"]
    common = ["--no-deps", "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"]
    subprocess.run([*pip, "download", *common, *platforms, "-d", str(target), *pins], check=True)
    deepspeed = f"deepspeed=={os.environ.get('DEEPSPEED_VERSION', '0.19.8')}"
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(target), deepspeed], check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "gpu-check")
    parser.add_argument("--download-wheels", type=Path, metavar="DIR", help="fetch the wheels the GPU machine needs")
    ns = parser.parse_args()
    if ns.download_wheels:
        download_wheels(ns.download_wheels)
        return 0
    results = ns.results.resolve()
    results.mkdir(parents=True, exist_ok=True)
    env = environment()
    py = sys.executable
    pythonpath = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    os.environ.update(pythonpath)
    records = [
        run_part("cuda-tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "tests"], results)
    ]
    throughput = ["--preset", "gpu", "--arms", "a,b,c,d,e,f,ceiling", "--gen-prompts", "0"]
    throughput += ["--json", str(results / "throughput-gpu.json")]
    records.append(run_part("throughput", [py, "benchmarks/throughput.py", *throughput], results, report=True))
    noise = [py, "benchmarks/noise_overhead.py", "--json", str(results / "noise-overhead-gpu.json")]
    records.append(run_part("noise-overhead", noise, results, report=True))
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:  # models and caches: not results
        records.append(smoke("fsdp2-smoke", "configs/accelerate/fsdp.yaml", results, Path(scratch)))
        records.append(smoke("zero3-smoke", "configs/accelerate/deepspeed-zero3.yaml", results, Path(scratch)))
    (results / "gpu-check.json").write_text(json.dumps({"environment": env, "parts": records}, indent=2))
    report = summary_markdown(env, records, results)
    (results / "gpu-check.md").write_text(report, encoding="utf-8")
    print(report)
    return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
