"""The http judge against loopback servers that imitate the reply shapes of real OpenAI-compatible servers.

Each imitation answers like a small judge model with a *position bias*: it prefers the answer that
contains ``GOOD`` with log-odds ``SKILL`` and adds ``BIAS`` to the log-odds of whichever answer is shown
first.  Its hard verdicts are therefore position-driven on pairs of equal quality, while the mean of
the two orders' log-odds must recover ``SKILL`` exactly.

Shapes imitated (from the servers' documented responses):

* llama.cpp's ``llama-server``: ``logprobs.content[].top_logprobs[]`` with ``id`` and ``bytes``;
* llama-cpp-python's ``llama_cpp.server``: the same with ``bytes: null`` and ``refusal``, or
  ``logprobs: null`` and an HTTP 500 naming logprobs when the model was built without ``logits_all``;
* vLLM: ``reasoning_content: null``, ``stop_reason``, ``prompt_logprobs: null``;
* Ollama's ``/v1`` endpoint: no logprobs at all, ``system_fingerprint: fp_ollama``;
* reasoning models: a ``<think>`` block in the content (logprobs cover the thinking too), or the
  thinking in ``reasoning_content`` / ``reasoning`` and only the verdict in ``content``.
"""

from __future__ import annotations

import json
import math
import re
import socket
import time

import pytest
from tests.helpers import OpenAIStyleServer

from neftune.errors import JudgeError
from neftune.judge import HttpJudge, judge_pairs

SKILL = 2.0  # log-odds for the answer containing GOOD
BIAS = 1.5  # added to the log-odds of whichever answer is shown first

_ANSWER = re.compile(r"\[Answer (A|B)\]\n(.*?)\n\[End of answer \1\]", re.S)


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def _first_logodds(payload: dict) -> float:
    answers = dict(_ANSWER.findall(payload["messages"][-1]["content"]))
    return SKILL * (("GOOD" in answers["A"]) - ("GOOD" in answers["B"])) + BIAS


def _records(outputs: list[str], generator: str) -> list[dict]:
    return [
        {"instruction": f"instruction {i}", "output": o, "generator": generator, "dataset": "d"}
        for i, o in enumerate(outputs)
    ]


# baseline GOOD in pair 0, candidate GOOD in pairs 1-2, equal quality in pairs 3-4
BASELINE = _records(["GOOD base 0", "plain base 1", "plain base 2", "plain base 3", "GOOD base 4"], "base")
CANDIDATE = _records(["plain cand 0", "GOOD cand 1", "GOOD cand 2", "plain cand 3", "GOOD cand 4"], "cand")
TRUE_PROBABILITY = [_sigmoid(-SKILL), _sigmoid(SKILL), _sigmoid(SKILL), 0.5, 0.5]


def _top(p_a: float, style: str) -> list[dict]:
    """Top tokens at the verdict position: A's and B's mass split over two spellings each, plus noise."""
    p_b = 1.0 - p_a
    tokens = [("A", 0.7 * p_a), (" A", 0.3 * p_a), ("B", 0.8 * p_b), (" B", 0.2 * p_b), ("The", 1e-4)]
    out = []
    for token, p in sorted(tokens, key=lambda t: -t[1]):
        entry = {"token": token, "logprob": math.log(p)}
        if style == "llama-server":
            entry.update(id=abs(hash(token)) % 49152, bytes=list(token.encode()))
        elif style == "vllm":
            entry["bytes"] = list(token.encode())
        else:
            entry["bytes"] = None
        out.append(entry)
    return out


def _reply(content: str, *, logprobs: dict | None = None, extra_message: dict | None = None, **extra) -> str:
    choice = {"index": 0, "message": {"role": "assistant", "content": content, **(extra_message or {})}}
    choice["logprobs"] = logprobs
    choice["finish_reason"] = extra.pop("finish_reason", "stop")
    body = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "judge", "choices": [choice]}
    body.update(usage={"prompt_tokens": 90, "completion_tokens": 1, "total_tokens": 91}, **extra)
    return json.dumps(body)


def llama_server(payload: dict, nth: int, headers: dict) -> tuple[int, str]:
    """llama.cpp's llama-server: chat-format logprobs with token ids and bytes."""
    p_a = _sigmoid(_first_logodds(payload))
    label = "A" if p_a > 0.5 else "B"
    logprobs = None
    if payload.get("logprobs"):
        top = _top(p_a, "llama-server")[: payload["top_logprobs"]]
        chosen = next(t for t in top if t["token"] == label)
        logprobs = {"content": [{**chosen, "top_logprobs": top}]}
    return 200, _reply(label, logprobs=logprobs, system_fingerprint="b4500-0123abcd", timings={"predicted_n": 1})


def llama_cpp_python(payload: dict, nth: int, headers: dict) -> tuple[int, str]:
    """llama-cpp-python's server: replies "A is better." style text; bytes null and a refusal field."""
    p_a = _sigmoid(_first_logodds(payload))
    label = "A" if p_a > 0.5 else "B"
    logprobs = None
    if payload.get("logprobs") and payload.get("top_logprobs"):
        top = _top(p_a, "llama-cpp-python")
        tokens = [label, " is", " better", "."]
        content = [{"token": label, "logprob": math.log(max(p_a, 1 - p_a)), "bytes": None, "top_logprobs": top}]
        content += [{"token": t, "logprob": -0.01, "bytes": None, "top_logprobs": []} for t in tokens[1:]]
        logprobs = {"content": content, "refusal": None}
    return 200, _reply(f"{label} is better.", logprobs=logprobs)


def vllm(payload: dict, nth: int, headers: dict) -> tuple[int, str]:
    """vLLM: the OpenAI shape plus reasoning_content null, tool_calls, stop_reason and prompt_logprobs."""
    p_a = _sigmoid(_first_logodds(payload))
    label = "A" if p_a > 0.5 else "B"
    logprobs = None
    if payload.get("logprobs"):
        top = _top(p_a, "vllm")
        logprobs = {
            "content": [{"token": label, "logprob": math.log(max(p_a, 1 - p_a)), "bytes": [65], "top_logprobs": top}]
        }
    body = json.loads(_reply(label, logprobs=logprobs, extra_message={"reasoning_content": None, "tool_calls": []}))
    body["choices"][0]["stop_reason"] = None
    body["prompt_logprobs"] = None
    return 200, json.dumps(body)


def ollama(payload: dict, nth: int, headers: dict) -> tuple[int, str]:
    """Ollama's /v1/chat/completions: no logprobs field at all, markdown verdicts."""
    label = "A" if _first_logodds(payload) > 0 else "B"
    body = json.loads(_reply(f"**{label}**", system_fingerprint="fp_ollama"))
    del body["choices"][0]["logprobs"]
    return 200, json.dumps(body)


def reasoning_inline(payload: dict, nth: int, headers: dict) -> tuple[int, str]:
    """A reasoning model on llama.cpp without a reasoning parser: <think> in the content, logprobs for all of it."""
    p_a = _sigmoid(_first_logodds(payload))
    label = "A" if p_a > 0.5 else "B"
    thinking = "Okay, let me compare. Answer A says one thing, answer B another. " * 40
    content = f"<think>\n{thinking}\n</think>\n\n{label}"
    think_tokens = ["<think>", "\n", "Okay", ",", " A", " and", " B", "\n", "</think>", "\n\n"]
    positions = [{"token": t, "logprob": -0.5, "top_logprobs": [{"token": t, "logprob": -0.5}]} for t in think_tokens]
    positions.append({"token": label, "logprob": -0.1, "top_logprobs": _top(p_a, "llama-server")})
    return 200, _reply(content, logprobs={"content": positions}, finish_reason="stop")


def reasoning_separate(payload: dict, nth: int, headers: dict) -> tuple[int, str]:
    """A reasoning model behind a reasoning parser: thinking in reasoning_content, the verdict in content."""
    label = "A" if _first_logodds(payload) > 0 else "B"
    extra = {"reasoning_content": "Let me weigh both. " * 200}
    return 200, _reply(f"Final verdict: {label}", extra_message=extra)


def reasoning_parser_with_logprobs(payload: dict, nth: int, headers: dict) -> tuple[str, str]:
    """vLLM with a reasoning parser: the thinking moves to reasoning_content, the logprobs still cover it."""
    p_a = _sigmoid(_first_logodds(payload))
    label = "A" if p_a > 0.5 else "B"
    thinking = ["Answer", " A", " is", " short", ";", " B", " is", " long", "."]
    content = ["Final", " verdict", ":", " "]
    positions = [
        {"token": t, "logprob": -0.3, "top_logprobs": [{"token": t, "logprob": -0.3}]} for t in thinking + content
    ]
    positions.append({"token": label, "logprob": -0.1, "top_logprobs": _top(p_a, "vllm")})
    extra = {"reasoning_content": "".join(thinking)}
    return 200, _reply(f"Final verdict: {label}", logprobs={"content": positions}, extra_message=extra)


def _judge(url: str, **options) -> HttpJudge:
    settings = {"model": "judge", "backoff": 0.0, "max_retries": 2, "timeout": 10.0, "workers": 2}
    settings.update(options)
    return HttpJudge(url, **settings)


def _run(behaviour, tmp_path=None, **options):
    with OpenAIStyleServer(behaviour) as server:
        judge = _judge(server.url, **options)
        result = judge_pairs(BASELINE, CANDIDATE, judge, n_boot=200, cache_dir=tmp_path)
    return result, server.requests


@pytest.mark.parametrize("behaviour", [llama_server, llama_cpp_python, vllm], ids=lambda b: b.__name__)
def test_logprob_servers_give_position_free_probabilities(behaviour) -> None:
    result, requests = _run(behaviour)
    assert len(requests) == 10 and result.n_failed == 0
    payload = requests[0]["payload"]
    assert payload["logprobs"] is True and payload["top_logprobs"] == 20 and payload["max_tokens"] == 16
    # Hard verdicts follow the bias on equal pairs: both orders say "A", so the orders disagree.
    assert [p.verdict_score for p in result.pairs] == [0.0, 1.0, 1.0, 0.5, 0.5]
    assert [(p.verdict_ab, p.verdict_ba) for p in result.pairs[3:]] == [("A", "A"), ("A", "A")]
    assert result.consistency == pytest.approx(3 / 5)
    # Each order's probability is biased; their averaged log-odds are not.
    assert result.pairs[3].p_ab == pytest.approx(_sigmoid(-BIAS)) and result.pairs[3].p_ba == pytest.approx(
        _sigmoid(BIAS)
    )
    assert [p.probability for p in result.pairs] == pytest.approx(TRUE_PROBABILITY, abs=1e-9)
    assert result.mean_probability == pytest.approx(sum(TRUE_PROBABILITY) / 5) and result.n_probability == 5
    lo, hi = result.probability_ci
    assert lo <= result.mean_probability <= hi
    # The hard-verdict win rate stays the headline for the http judge; the probability sits beside it.
    assert result.score_basis == "verdicts" and result.win_rate == result.verdict_win_rate == 0.6
    summary = result.summary()
    assert (
        f"mean probability that B is better (logprobs, 5 pairs): {100 * result.mean_probability:.1f}% (95% CI"
        in summary
    )
    assert not any("logprobs" in note for note in result.notes)


def test_logprob_verdicts_are_cached_with_their_probabilities(tmp_path) -> None:
    with OpenAIStyleServer(llama_server) as server:
        first = judge_pairs(BASELINE, CANDIDATE, _judge(server.url), n_boot=200, cache_dir=tmp_path)
        assert len(server.requests) == 10
        second = judge_pairs(BASELINE, CANDIDATE, _judge(server.url), n_boot=200, cache_dir=tmp_path)
        assert len(server.requests) == 10  # the rerun asks nothing
    assert [p.probability for p in second.pairs] == [p.probability for p in first.pairs]
    assert second.mean_probability == first.mean_probability
    lines = [json.loads(line) for line in (tmp_path / "verdicts.jsonl").read_text().splitlines()]
    assert len(lines) == 10 and all(0 < line["p_first"] < 1 for line in lines)


@pytest.mark.parametrize("behaviour", [ollama, reasoning_separate], ids=lambda b: b.__name__)
def test_servers_without_logprobs_fall_back_to_text_verdicts(behaviour, caplog) -> None:
    result, requests = _run(behaviour)
    assert len(requests) == 10 and result.n_failed == 0
    assert [p.verdict_score for p in result.pairs] == [0.0, 1.0, 1.0, 0.5, 0.5]
    assert all(p.probability is None for p in result.pairs) and math.isnan(result.mean_probability)
    assert any("returned no logprobs for 10 replies" in note for note in result.notes)
    assert sum("returned no logprobs" in r.getMessage() for r in caplog.records) == 1  # said once
    assert "mean probability" not in result.summary()


@pytest.mark.parametrize("behaviour", [reasoning_inline, reasoning_parser_with_logprobs], ids=lambda b: b.__name__)
def test_reasoning_model_probability_comes_from_the_verdict(behaviour) -> None:
    result, requests = _run(behaviour, max_tokens=4096)
    assert requests[0]["payload"]["max_tokens"] == 4096
    assert result.n_failed == 0 and [p.verdict_score for p in result.pairs] == [0.0, 1.0, 1.0, 0.5, 0.5]
    # The probability is read at the verdict, not at the thinking's " A"/" B" tokens.
    assert [p.probability for p in result.pairs] == pytest.approx(TRUE_PROBABILITY, abs=1e-9)


def test_reasoning_cut_off_by_max_tokens_fails_fast_with_a_hint() -> None:
    def cut(payload, nth, headers):
        return 200, _reply("<think>\nFirst, answer A mentions", finish_reason="length")

    result, requests = _run(cut, max_retries=4)
    assert len(requests) == 10  # one request per query: a deterministic reply is not asked again
    error = result.pairs[0].error
    assert "'<think> First, answer A mentions'" in error
    assert "cut at max_tokens=16 inside its reasoning: raise the judge's max_tokens" in error


def test_server_that_rejects_logprobs_is_asked_without_them(caplog) -> None:
    """llama-cpp-python built without logits_all answers HTTP 500 "logprobs is not supported ..."."""

    def no_logits_all(payload, nth, headers):
        if payload.get("logprobs"):
            message = "logprobs is not supported for models created with logits_all=False"
            return 500, json.dumps({"error": {"message": message, "type": "internal_server_error"}})
        return llama_cpp_python(payload, nth, headers)

    result, requests = _run(no_logits_all, workers=1)
    with_logprobs = [r for r in requests if r["payload"].get("logprobs")]
    assert len(with_logprobs) == 1 and len(requests) == 11  # one refusal, then every query once without
    assert result.n_failed == 0 and [p.verdict_score for p in result.pairs] == [0.0, 1.0, 1.0, 0.5, 0.5]
    assert any("rejected the logprobs request" in note for note in result.notes)
    assert sum("rejected the logprobs" in r.getMessage() for r in caplog.records) == 1


# --------------------------------------------------------------------------------------------------
# retry policy


def test_rate_limits_and_overload_are_retried_honouring_retry_after() -> None:
    def busy(payload, nth, headers):
        if nth == 1:
            return 429, '{"error": "rate limited"}', {"Retry-After": "0.25"}
        if nth == 2:
            return 503, '{"error": "loading model"}'
        return llama_server(payload, nth, headers)

    with OpenAIStyleServer(busy) as server:
        judge = _judge(server.url, max_retries=2, backoff=0.01, workers=1)
        slept: list[float] = []
        judge._sleep = slept.append
        result = judge_pairs(BASELINE[:2], CANDIDATE[:2], judge, n_boot=50)
    assert len(server.requests) == 4 * 3 and result.n_failed == 0
    assert slept == [0.25, 0.02] * 4  # Retry-After, then the doubled backoff


def test_retry_after_as_http_date_and_cap() -> None:
    from neftune.http_api import retry_after as _retry_after

    assert _retry_after("7") == 7.0
    assert _retry_after(None) is None and _retry_after("soon") is None
    soon = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 < _retry_after(soon) <= 31
    judge = _judge("http://127.0.0.1:1/v1", max_backoff=5.0)
    assert judge._delay(1, 30.0) == 5.0 and judge._delay(3, None) == 0.0


def test_timeouts_and_refused_connections_are_retried() -> None:
    def slow_first(payload, nth, headers):
        if nth == 1:
            time.sleep(0.6)
        return llama_server(payload, nth, headers)

    with OpenAIStyleServer(slow_first) as server:
        result = judge_pairs(BASELINE[:1], CANDIDATE[:1], _judge(server.url, timeout=0.3, workers=1), n_boot=10)
    assert len(server.requests) == 4 and result.n_failed == 0

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dead = _judge(f"http://127.0.0.1:{port}/v1", max_retries=1, workers=1)
    with pytest.raises(JudgeError) as stopped:  # no answer through the whole retry budget: the run stops
        judge_pairs(BASELINE[:1], CANDIDATE[:1], dead, n_boot=10)
    assert re.fullmatch(
        rf"the judge stopped answering \(http://127.0.0.1:{port}/v1/chat/completions: ConnectError: .* "
        r"\(after 2 attempts\)\): 0 of 2 queries of this run were answered; this judge has no cache, .*",
        str(stopped.value),
    )


def test_unparseable_reply_is_retried_only_when_sampling() -> None:
    def undecided(payload, nth, headers):
        return 200, _reply("[End of answer]") if nth == 1 else llama_server(payload, nth, headers)[1]

    result, requests = _run(undecided, max_retries=2)
    assert len(requests) == 10 and result.n == 0 and result.n_failed == 5
    assert result.pairs[0].error == "reply names no single answer (A, B or tie): '[End of answer]'"

    result, requests = _run(undecided, max_retries=2, temperature=0.7)
    assert len(requests) == 20 and result.n_failed == 0  # the second sample names an answer
    assert requests[0]["payload"]["temperature"] == 0.7

    def never(payload, nth, headers):
        return 200, _reply("The answer that is better depends on what the user wants.")

    result, requests = _run(never, max_retries=2, temperature=0.7)
    assert len(requests) == 30 and "(after 3 attempts)" in result.pairs[0].error


def test_settings_are_validated_and_named_in_the_identity() -> None:
    from neftune.errors import ConfigError

    judge = _judge("http://127.0.0.1:8080/v1", max_tokens=512, temperature=0.2, top_logprobs=5)
    assert judge.identity == "http|http://127.0.0.1:8080/v1/chat/completions|judge|t=0.2|max_tokens=512|top_logprobs=5"
    assert "top_logprobs" not in _judge("http://127.0.0.1:8080/v1", logprobs=False).identity
    for bad in ({"top_logprobs": 21}, {"max_tokens": 0}, {"temperature": -1.0}):
        with pytest.raises(ConfigError):
            _judge("http://127.0.0.1:8080/v1", **bad)


def test_build_judge_gives_sampling_settings_to_http_only() -> None:
    from neftune.judge import LengthJudge, build_judge

    url = "http://127.0.0.1:8080/v1"
    judge = build_judge("http", model="m", base_url=url, max_tokens=2048, temperature=0.3)
    assert (judge.max_tokens, judge.temperature) == (2048, 0.3)
    default = build_judge("http", model="m", base_url=url, max_tokens=None, temperature=None)
    assert (default.max_tokens, default.temperature) == (16, 0.0)
    assert isinstance(build_judge("length", max_tokens=5, temperature=1.0), LengthJudge)


def test_judge_command_sends_max_tokens_and_temperature(tmp_path, capsys) -> None:
    from neftune.cli import main

    baseline, candidate = tmp_path / "a.json", tmp_path / "b.json"
    baseline.write_text(json.dumps(BASELINE))
    candidate.write_text(json.dumps(CANDIDATE))
    with OpenAIStyleServer(reasoning_separate) as server:
        args = ["judge", str(baseline), str(candidate), "--backend", "http", "--base-url", server.url]
        args += ["--judge-model", "qwen3", "--max-tokens", "2048", "--temperature", "0.6", "--no-progress"]
        assert main([*args, "--cache", str(tmp_path / "cache")]) == 0
    assert {(r["payload"]["max_tokens"], r["payload"]["temperature"]) for r in server.requests} == {(2048, 0.6)}
    out = capsys.readouterr().out
    assert "win rate of B over A: 60.0%" in out and "returned no logprobs for 10 replies" in out


def test_notes_describe_each_run_of_a_reused_judge() -> None:
    """compare reuses one judge for every arm: each result counts only its own run's fallbacks."""
    with OpenAIStyleServer(ollama) as server:
        judge = _judge(server.url, workers=1)
        first = judge_pairs(BASELINE, CANDIDATE, judge, n_boot=10)
        second = judge_pairs(BASELINE[:2], CANDIDATE[:2], judge, n_boot=10)
    assert any("returned no logprobs for 10 replies" in note for note in first.notes)
    assert any("returned no logprobs for 4 replies" in note for note in second.notes)

    def no_logits_all(payload, nth, headers):
        if payload.get("logprobs"):
            return 500, '{"error": {"message": "logprobs is not supported for models created with logits_all=False"}}'
        return ollama(payload, nth, headers)

    with OpenAIStyleServer(no_logits_all) as server:
        judge = _judge(server.url, workers=1)
        results = [judge_pairs(BASELINE, CANDIDATE, judge, n_boot=10) for _ in range(2)]
        assert sum(bool(r["payload"].get("logprobs")) for r in server.requests) == 1  # refused once, not asked again
    assert all(any("rejected the logprobs request" in note for note in r.notes) for r in results)
    assert not any("returned no logprobs" in note for r in results for note in r.notes)


def test_logprobs_in_the_completions_shape_and_tie_mass() -> None:
    from neftune.judge.logprobs import p_first_better, pair_probability

    legacy = {"tokens": ["**", "tie", "**"], "token_logprobs": [-0.1, -0.5, -0.1]}
    legacy["top_logprobs"] = [{"**": -0.1}, {"tie": math.log(0.5), " A": math.log(0.3), "B": math.log(0.2)}, {}]
    assert p_first_better(legacy, "tie") == pytest.approx(0.3 + 0.25)  # P(A) + P(tie) / 2
    assert p_first_better(legacy, "A") is None  # the verdict token disagrees with the text
    assert p_first_better(None, "A") is None and p_first_better({"content": "junk"}, "A") is None
    # A judge sure of the first answer in both orders: the pair is even, whatever the certainty.
    assert pair_probability(1.0, 1.0) == 0.5 and pair_probability(0.0, 1.0) == pytest.approx(1.0, abs=1e-5)


# -- a server that dies mid-judging ------------------------------------------------------------

SERVER = """
import json, os, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

port, die_after, log = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
answered = done = 0
lock = threading.Lock()  # requests arrive on several threads: exactly die_after of them are answered

class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        global answered, done
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with lock:
            last = answered >= die_after
            answered += 0 if last else 1
        if last:
            for _ in range(500):  # the answers already promised go out and are logged first
                with lock:
                    if done >= die_after:
                        break
                time.sleep(0.01)
            os.kill(os.getpid(), 9)  # killed mid-judging: this request and those in flight get no answer
        prompt = payload["messages"][-1]["content"]
        first = prompt.split("[Answer A]")[1].split("[End of answer A]")[0]
        body = json.dumps({"choices": [{"message": {"role": "assistant", "content": "A" if "GOOD" in first else "B"}}]})
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()
        with lock, open(log, "a") as fh:
            fh.write(json.dumps(prompt) + "\\n")
            done += 1

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""


def _lines(log) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def _serve(tmp_path, port: int, die_after: int, log):
    import subprocess
    import sys

    script = tmp_path / "server.py"
    script.write_text(SERVER)
    proc = subprocess.Popen([sys.executable, str(script), str(port), str(die_after), str(log)])
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise AssertionError("the loopback judge server did not start")


def test_a_server_killed_mid_judging_stops_the_run_and_the_rerun_asks_only_the_unanswered(
    tmp_path, monkeypatch, capsys
):
    from neftune.cli import main

    waits: list[float] = []
    records = [{"instruction": f"task {i}", "output": f"answer {i}", "generator": "a"} for i in range(12)]
    (tmp_path / "a.json").write_text(json.dumps(records))
    better = [
        {**r, "output": r["output"] + (" GOOD" if i % 3 else " meh"), "generator": "b"} for i, r in enumerate(records)
    ]
    (tmp_path / "b.json").write_text(json.dumps(better))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = ["judge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--base-url", f"http://127.0.0.1:{port}/v1"]
    argv += ["--judge-model", "j", "--cache", str(tmp_path / "cache"), "--no-progress"]

    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    server = _serve(tmp_path, port, 9, first_log)
    try:
        with monkeypatch.context() as patched:
            patched.setattr(time, "sleep", waits.append)  # the retry budget is counted, not waited
            assert main(argv) == 2
    finally:
        server.kill()
        server.wait()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("neftune:")]
    answered = [json.loads(line) for line in first_log.read_text().splitlines()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"neftune: error: the judge stopped answering (http://127.0.0.1:{port}/v1/")
    assert f"(after 5 attempts)): {len(answered)} of 24 queries of this run were answered and are saved in " in lines[0]
    assert lines[0].endswith(f"a rerun asks only the {24 - len(answered)} missing")
    # one query spent the whole retry budget (1+2+4+8 s); the 4 workers' other queries then stopped asking
    assert len(answered) == 9 and 8.0 in waits and len(waits) <= 4 * 4

    server = _serve(tmp_path, port, 10**6, second_log)
    try:
        assert main([*argv, "--output", str(tmp_path / "result.json")]) == 0
        # the server logs a query just after answering it: let its last line land before the kill
        deadline = time.time() + 10
        while _lines(second_log) < 24 - len(answered) and time.time() < deadline:
            time.sleep(0.05)
    finally:
        server.kill()
        server.wait()
    asked = [json.loads(line) for line in second_log.read_text().splitlines()]
    assert len(asked) == 24 - len(answered) and not set(asked) & set(answered)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["n"] == 12 and result["n_failed"] == 0


def test_compare_stops_with_one_line_when_its_judge_server_is_gone(tmp_path, monkeypatch, capsys):
    from neftune.cli import main

    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = ["compare", "--model", "tiny-random", "--alphas", "5", "--seeds", "0", "--max-steps", "2"]
    argv += ["--eval-limit", "4", "--max-new-tokens", "8", "--no-progress", "--output", str(tmp_path / "exp")]
    argv += [
        "--judge",
        "http",
        "--judge-url",
        f"http://127.0.0.1:{port}/v1",
        "--judge-model",
        "j",
        "data.limit=16",
        "train.lr=0.05",
    ]
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("neftune:")]
    assert len(lines) == 1 and lines[0].startswith("neftune: error: the judge stopped answering (http://127.0.0.1:")
    found = re.search(
        r": 0 of (\d+) queries of this run were answered and are saved in (\S+); a rerun asks only the (\d+) missing$",
        lines[0],
    )
    assert found and found[1] == found[3] and found[2] == str(tmp_path / "exp" / "judge-cache" / "verdicts.jsonl")


def test_each_verdict_is_cached_as_it_arrives_not_when_its_batch_ends(tmp_path) -> None:
    import threading

    release = threading.Event()

    def one_slow(payload, nth, headers):
        if "second" in payload["messages"][-1]["content"].split("[End of answer A]")[0]:
            release.wait(timeout=30)  # one query of the batch hangs until the test has looked
        return llama_server(payload, nth, headers)

    baseline = [{"instruction": f"q{i}", "output": f"first {i}", "generator": "a"} for i in range(3)]
    candidate = [{"instruction": f"q{i}", "output": f"second {i} GOOD" if i == 0 else f"other {i}"} for i in range(3)]
    cache = tmp_path / "verdicts.jsonl"
    with OpenAIStyleServer(one_slow) as server:
        judge = _judge(server.url, workers=2)
        run = threading.Thread(target=judge_pairs, args=(baseline, candidate, judge), kwargs={"cache_dir": tmp_path})
        run.start()
        deadline = time.monotonic() + 20
        while (not cache.exists() or len(cache.read_text().splitlines()) < 5) and time.monotonic() < deadline:
            time.sleep(0.02)
        kept_before_the_batch_ended = len(cache.read_text().splitlines()) if cache.exists() else 0
        release.set()
        run.join(timeout=30)
    assert kept_before_the_batch_ended == 5  # the 6 queries are one batch; 5 answered while 1 hangs
    assert len(cache.read_text().splitlines()) == 6
