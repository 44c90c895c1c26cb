"""Pairwise judging: statistics, the both-orders protocol, and the HTTP backend against a real server."""

from __future__ import annotations

import json
import logging
import math
import re

import pytest
import torch
from tests.helpers import OpenAIStyleServer, chat_reply

from neftune.errors import ConfigError, JudgeError
from neftune.judge import (
    JUDGES,
    HttpJudge,
    Judge,
    LengthJudge,
    LocalJudge,
    Query,
    Verdict,
    VerdictUnavailable,
    judge_pairs,
    make_judge,
    parse_verdict,
)

# --------------------------------------------------------------------------------------------------
# helpers


def _records(outputs, generator="g", instructions=None):
    instructions = instructions or [f"instruction {i}" for i in range(len(outputs))]
    return [
        {"instruction": ins, "output": out, "generator": generator, "dataset": "d"}
        for ins, out in zip(instructions, outputs, strict=False)
    ]


def _good_bad_pairs(n_good_b: int, n_good_a: int):
    """Outputs where the better answer contains GOOD; B (candidate) wins n_good_b pairs."""
    a = ["GOOD answer"] * n_good_a + ["plain answer"] * n_good_b
    b = ["plain reply"] * n_good_a + ["GOOD reply"] * n_good_b
    return _records(a, "base"), _records(b, "cand")


class _AlwaysFirst(Judge):
    """A maximally position-biased judge: always prefers whatever is shown first."""

    name = "always-first"

    def __init__(self):
        self.calls = 0

    def judge(self, query):
        self.calls += 1
        return Verdict("A", "A")


# --------------------------------------------------------------------------------------------------
# verdict parsing


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("A", "A"),
        ("b", "B"),
        ("Tie", "tie"),
        (" **B**.", "B"),
        ("[[A]]", "A"),
        ("'tie'", "tie"),
        ("Answer: B", "B"),
        ("Verdict - A", "A"),
        ("Answer A\nbecause it is better", "A"),
        ("Draw", "tie"),
        ("B. It is more complete.", "B"),
        ("Tie: both are fine", "tie"),
        ("**A** - clearer", "A"),
        ("", None),
        ("I think both are good", None),
        ("A or B", None),
        ("Answers", None),
        ("AB", None),
        ("A good answer would be shorter", None),
        ("B.C. history", None),
        ("\n\n", None),
    ],
)
def test_parse_verdict(reply, expected):
    assert parse_verdict(reply) == expected


# --------------------------------------------------------------------------------------------------
# protocol with dependency-free judges


def test_length_judge_protocol():
    a = _records(["short", "a much longer baseline answer", "same", "tie!", "equal"])
    b = _records(["a longer candidate answer", "short", "same", "tie?", "equal"])
    result = judge_pairs(a, b, "length", n_boot=200)
    assert [p.score for p in result.pairs] == [1.0, 0.0, 0.5, 0.5, 0.5]
    assert (result.n, result.n_wins, result.n_losses, result.n_ties, result.n_failed) == (5, 1, 1, 3, 0)
    assert result.win_rate == pytest.approx(0.5)
    assert result.consistency == 1.0
    assert result.ci[0] <= 0.5 <= result.ci[1]


def test_length_judge_prefers_reference_overlap():
    judge = LengthJudge()
    reference = "paris is the capital"
    query = Query("q", "paris is the capital", "it is lyon, certainly a long long answer", reference=reference)
    assert judge.judge(query).label == "A"
    assert judge.judge(Query("q", "x", "xy")).label == "B"
    assert isinstance(make_judge("dummy"), LengthJudge) and JUDGES["length"] is LengthJudge


def test_position_bias_gives_ties_and_zero_consistency():
    a, b = _good_bad_pairs(3, 1)
    judge = _AlwaysFirst()
    result = judge_pairs(a, b, judge, n_boot=100)
    assert judge.calls == 8  # both orders of 4 pairs
    assert all(p.score == 0.5 for p in result.pairs)
    assert result.consistency == 0.0 and result.win_rate == 0.5
    pair = result.pairs[0]
    assert (pair.verdict_ab, pair.verdict_ba, pair.winner_ab, pair.winner_ba) == ("A", "A", "baseline", "candidate")


def test_identical_outputs_are_ties_without_asking():
    judge = _AlwaysFirst()
    result = judge_pairs(_records(["same", "same"]), _records(["same", "same"]), judge, n_boot=10)
    assert judge.calls == 0 and result.win_rate == 0.5 and result.n_ties == 2


def test_mismatched_files_are_rejected():
    with pytest.raises(JudgeError, match="A has 2 records but outputs B has 3"):
        judge_pairs(_records(["x", "y"]), _records(["x", "y", "z"]), "length")
    b = _records(["x", "y", "z"], instructions=["instruction 0", "instruction 1", "other"])
    with pytest.raises(JudgeError, match="differ in instruction at index 2"):
        judge_pairs(_records(["x", "y", "z"]), b, "length")
    with pytest.raises(JudgeError, match="record 1 has no string 'output'"):
        judge_pairs(
            _records(["x", "y"]),
            [{"instruction": "instruction 0", "output": "x"}, {"instruction": "instruction 1"}],
            "length",
        )


def test_make_judge_errors():
    with pytest.raises(ConfigError, match="unknown judge 'gpt'"):
        make_judge("gpt")
    with pytest.raises(ConfigError, match="judge 'length'"):
        make_judge("length", model="x")
    with pytest.raises(ConfigError, match="http"):
        make_judge("http", base_url="ftp://x", model="m")


# --------------------------------------------------------------------------------------------------
# HTTP backend against a real local server


_ANSWER = re.compile(r"\[Answer (A|B)\]\n(.*?)\n\[End of answer \1\]", re.S)


def _good_label(messages) -> str:
    answers = dict(_ANSWER.findall(messages[-1]["content"]))
    if "GOOD" in answers["A"]:
        return "A"
    if "GOOD" in answers["B"]:
        return "B"
    return "tie"


def _correct(payload, nth, headers):
    return 200, chat_reply(_good_label(payload["messages"]))


def _http(url, **kw):
    options = {"model": "judge-model", "backoff": 0.0, "max_retries": 2, "timeout": 5.0, "workers": 2}
    options.update(kw)
    return HttpJudge(url, **options)


def test_http_judge_normal_verdicts():
    a, b = _good_bad_pairs(n_good_b=3, n_good_a=1)
    with OpenAIStyleServer(_correct) as server:
        result = judge_pairs(a, b, _http(server.url), n_boot=200)
    assert len(server.requests) == 8
    first = server.requests[0]["payload"]
    assert first["model"] == "judge-model" and first["temperature"] == 0.0
    assert [m["role"] for m in first["messages"]] == ["system", "user"]
    assert [p.score for p in result.pairs] == [0.0, 1.0, 1.0, 1.0]
    assert result.win_rate == 0.75 and result.consistency == 1.0 and result.n_failed == 0


def test_http_judge_deterministic_garbage_fails_fast():
    """At temperature 0 the same prompt gets the same reply: a malformed body or a reply naming no answer
    is not asked again (the old judge retried both five times), and the failure quotes the reply."""

    def garbage(payload, nth, headers):
        answers = dict(_ANSWER.findall(payload["messages"][-1]["content"]))
        if "pair0" in answers["A"] + answers["B"]:
            return 200, "this is not json"
        return 200, chat_reply("Both answers have merit.")

    a = _records(["GOOD pair0 a", "plain pair1 a"])
    b = _records(["plain pair0 b", "GOOD pair1 b"])
    with OpenAIStyleServer(garbage) as server:
        result = judge_pairs(a, b, _http(server.url, max_retries=3), n_boot=50)
    assert len(server.requests) == 4  # 2 pairs x 2 orders x 1 attempt
    assert result.n == 0 and result.n_failed == 2
    assert "malformed response 'this is not json'" in result.pairs[0].error
    assert result.pairs[1].error == "reply names no single answer (A, B or tie): 'Both answers have merit.'"


def test_http_judge_transient_http_errors_are_retried():
    def overloaded(payload, nth, headers):
        return (503, '{"error": "busy"}') if nth == 1 else _correct(payload, nth, headers)

    a, b = _good_bad_pairs(n_good_b=1, n_good_a=1)
    with OpenAIStyleServer(overloaded) as server:
        result = judge_pairs(a, b, _http(server.url, workers=1), n_boot=50)
    assert len(server.requests) == 8 and result.n_failed == 0 and result.win_rate == 0.5


def test_http_judge_always_failing_is_counted_not_scored(tmp_path, monkeypatch):
    secret = "sk-test-ECHOED-SECRET-0123456789"
    monkeypatch.setenv("ECHO_KEY", secret)

    def broken(payload, nth, headers):
        # A misbehaving proxy that echoes the request headers back in its error page.
        return 500, json.dumps({"error": "internal", "echo": headers.get("Authorization", "")})

    a, b = _good_bad_pairs(n_good_b=2, n_good_a=1)
    with OpenAIStyleServer(broken) as server:
        result = judge_pairs(a, b, _http(server.url, api_key_env="ECHO_KEY"), cache_dir=tmp_path / "cache", n_boot=50)
    assert len(server.requests) == 3 * 2 * 3  # pairs x orders x attempts
    assert result.n == 0 and result.n_failed == 3
    assert math.isnan(result.win_rate) and all(math.isnan(v) for v in result.ci)
    assert all(p.score is None and "HTTP 500" in p.error and "after 3 attempts" in p.error for p in result.pairs)
    summary = result.summary()
    assert "failed pairs: 3" in summary and "win rate of B over A: n/a" in summary
    saved = result.save(tmp_path / "results.json")
    data = json.loads(saved.read_text())
    assert data["win_rate"] is None and data["n_failed"] == 3
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret not in path.read_text(encoding="utf-8")
    assert all(secret not in p.error for p in result.pairs)


def test_http_judge_aborts_on_dead_endpoint():
    a, b = _good_bad_pairs(n_good_b=5, n_good_a=5)
    with (
        OpenAIStyleServer(lambda *_: (502, "bad gateway")) as server,
        pytest.raises(JudgeError, match="failed on 4 queries in a row"),
    ):
        judge_pairs(a, b, _http(server.url, max_retries=0, workers=1), max_consecutive_failures=4)


def test_http_judge_bad_key_and_bad_url_are_fatal():
    a, b = _good_bad_pairs(n_good_b=1, n_good_a=0)
    with OpenAIStyleServer(lambda *_: (401, '{"error": "invalid key"}')) as server:
        with pytest.raises(JudgeError, match=r"HTTP 401\): check \$OPENAI_API_KEY"):
            judge_pairs(a, b, _http(server.url, workers=1))
        assert len(server.requests) == 1  # no retries, no further queries on a refused key
    with OpenAIStyleServer(_correct) as server, pytest.raises(JudgeError, match="HTTP 404"):
        judge_pairs(a, b, _http(server.url.replace("/v1", "/v2")))


def test_http_judge_cache_makes_rerun_free(tmp_path):
    a, b = _good_bad_pairs(n_good_b=3, n_good_a=2)
    cache = tmp_path / "cache"
    with OpenAIStyleServer(_correct) as server:
        first = judge_pairs(a, b, _http(server.url), cache_dir=cache, n_boot=100)
        assert len(server.requests) == 10
        second = judge_pairs(a, b, _http(server.url), cache_dir=cache, n_boot=100)
        assert len(server.requests) == 10  # zero new requests
        # A different judge model is a different cache identity.
        judge_pairs(a, b, _http(server.url, model="other-judge"), cache_dir=cache, n_boot=100)
        assert len(server.requests) == 20
    assert [p.score for p in second.pairs] == [p.score for p in first.pairs]
    assert second.win_rate == first.win_rate == 0.6
    assert any("10 verdicts read from the cache" in note for note in second.notes)
    lines = (cache / "verdicts.jsonl").read_text().splitlines()
    assert len(lines) == 20 and {json.loads(line)["verdict"] for line in lines} == {"A", "B"}


def test_http_judge_partial_cache_after_failures(tmp_path):
    """Failed verdicts are not cached, so a rerun asks only for those."""
    broken = {"on": True}

    def sometimes(payload, nth, headers):
        answers = dict(_ANSWER.findall(payload["messages"][-1]["content"]))
        if broken["on"] and "pair0" in answers["A"] + answers["B"]:
            return 500, "{}"
        return _correct(payload, nth, headers)

    a = _records(["GOOD pair0 a", "plain pair1 a"])
    b = _records(["plain pair0 b", "GOOD pair1 b"])
    with OpenAIStyleServer(sometimes) as server:
        first = judge_pairs(a, b, _http(server.url, max_retries=0), cache_dir=tmp_path, n_boot=50)
        assert (first.n, first.n_failed) == (1, 1)
        before = len(server.requests)
        broken["on"] = False
        second = judge_pairs(a, b, _http(server.url, max_retries=0), cache_dir=tmp_path, n_boot=50)
        assert len(server.requests) - before == 2  # only the failed pair's two orders
    assert (second.n, second.n_failed, second.win_rate) == (2, 0, 0.5)


def test_api_key_sent_but_never_written(tmp_path, monkeypatch, caplog):
    secret = "sk-live-DO-NOT-LEAK-abcdef123456"
    monkeypatch.setenv("MY_JUDGE_KEY", secret)
    caplog.set_level(logging.DEBUG)

    def flaky(payload, nth, headers):
        return (
            (503, json.dumps({"error": headers.get("Authorization")})) if nth == 1 else _correct(payload, nth, headers)
        )

    a, b = _good_bad_pairs(n_good_b=2, n_good_a=1)
    with OpenAIStyleServer(flaky) as server:
        judge = _http(server.url, api_key_env="MY_JUDGE_KEY")
        result = judge_pairs(a, b, judge, cache_dir=tmp_path / "cache", n_boot=50)
    assert {r["headers"].get("Authorization") for r in server.requests} == {f"Bearer {secret}"}
    result.save(tmp_path / "results" / "judge.json")
    (tmp_path / "results" / "summary.txt").write_text(result.summary())
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == 3
    for path in files:
        assert secret not in path.read_text(encoding="utf-8"), path
    assert secret not in caplog.text
    assert secret not in repr(judge) and secret not in judge.identity and "MY_JUDGE_KEY" in repr(judge)


def test_http_judge_without_key_sends_no_authorization(monkeypatch):
    monkeypatch.delenv("UNSET_JUDGE_KEY", raising=False)
    a, b = _good_bad_pairs(n_good_b=1, n_good_a=0)
    with OpenAIStyleServer(_correct) as server:
        judge_pairs(a, b, _http(server.url, api_key_env="UNSET_JUDGE_KEY", max_tokens=None), n_boot=10)
    assert all("Authorization" not in r["headers"] for r in server.requests)
    assert all("max_tokens" not in r["payload"] for r in server.requests)


# --------------------------------------------------------------------------------------------------
# local transformers judge


def test_local_judge_with_tiny_model(tiny_model_dir, tmp_path):
    judge = make_judge("local", model=str(tiny_model_dir), batch_size=3)
    assert judge.identity and str(tiny_model_dir) in judge.identity
    a = _records(["first answer", "short", "a third, longer baseline answer", "four"])
    b = _records(["other answer", "a longer candidate answer", "3", "4!"])
    result = judge_pairs(a, b, judge, cache_dir=tmp_path, n_boot=50)
    assert result.n == 4 and result.n_failed == 0
    assert {p.verdict_ab for p in result.pairs} | {p.verdict_ba for p in result.pairs} <= {"A", "B", "tie"}
    # Batched (left-padded) scoring equals scoring each query alone.
    queries = [Query(r["instruction"], x["output"], y["output"]) for r, x, y in zip(a, a, b, strict=False)]
    batched = judge.judge_batch(queries)
    alone = [judge.judge(q) for q in queries]
    assert [v.label for v in batched] == [v.label for v in alone]
    gaps = [float(v.reply.split("=")[1]) for v in batched]
    assert gaps == pytest.approx([float(v.reply.split("=")[1]) for v in alone], abs=1e-4)
    # The pair score is the mean of the two orders' log-odds for the candidate; hard verdicts only count.
    assert result.score_basis == "averaged log-odds"
    for pair in result.pairs:
        mean_logit = 0.5 * (math.log(pair.p_ab / (1 - pair.p_ab)) + math.log(pair.p_ba / (1 - pair.p_ba)))
        assert pair.score == pair.probability == pytest.approx(1 / (1 + math.exp(-mean_logit)), abs=1e-9)
    assert result.win_rate == pytest.approx(sum(p.score for p in result.pairs) / 4)
    assert result.verdict_win_rate == pytest.approx(sum(p.verdict_score for p in result.pairs) / 4)
    assert "(averaged log-odds of both orders)" in result.summary() and "hard-verdict win rate" in result.summary()
    # A rerun reads every verdict, probability included, from the cache.
    again = judge_pairs(a, b, judge, cache_dir=tmp_path, n_boot=50)
    assert [p.score for p in again.pairs] == [p.score for p in result.pairs]
    assert any("8 verdicts read from the cache" in note for note in again.notes)


def test_local_judge_tie_margin_and_context(tiny_model, tiny_tokenizer):
    judge = LocalJudge(tiny_model, tiny_tokenizer, tie_margin=1e6)
    assert judge.identity is None  # unnamed in-memory model: never cached
    assert judge.judge(Query("q", "x", "y")).label == "tie"
    short = LocalJudge(tiny_model, tiny_tokenizer, max_length=16)
    with pytest.raises(VerdictUnavailable, match="more than the judge's context of 16"):
        short.judge(Query("q", "x", "y"))
    result = judge_pairs(_records(["x"]), _records(["y"]), short, n_boot=10)
    assert result.n_failed == 1 and "context" in result.pairs[0].error
    with pytest.raises(ConfigError):
        LocalJudge(tiny_model)


def test_local_judge_bad_path(tmp_path):
    from neftune.errors import ModelError

    with pytest.raises(ModelError, match="cannot load model"):
        LocalJudge(str(tmp_path / "missing"))


def test_local_judge_follows_the_model(tiny_tokenizer):
    """A model rigged to always say "B" makes the judge pick the second answer in both orders."""
    from neftune.tiny import build_tiny_model

    model = build_tiny_model(vocab_size=len(tiny_tokenizer))
    b_id = tiny_tokenizer("B", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.model.norm.weight.fill_(1.0)
    bias = torch.zeros(len(tiny_tokenizer))
    bias[b_id] = 10.0
    model.lm_head.register_forward_hook(lambda module, args, out: out + bias)
    judge = LocalJudge(model, tiny_tokenizer)
    result = judge_pairs(_records(["one", "two"]), _records(["uno", "dos"]), judge, n_boot=10)
    assert all((p.verdict_ab, p.verdict_ba) == ("B", "B") for p in result.pairs)
    # The bias toward the second position is the same in both orders, so the averaged log-odds cancel it.
    assert result.consistency == 0.0 and result.win_rate == 0.5 and result.verdict_win_rate == 0.5
    assert all(p.p_ab > 0.99 and p.p_ba < 0.01 for p in result.pairs)


def test_lc_not_estimable_is_carried_through(monkeypatch, tmp_path):
    def separated(scores, len_a, len_b, **kwargs):
        nan = float("nan")
        reason = "the verdicts are separated by length"
        return {"win_rate": nan, "ci": (nan, nan), "n": len(scores), "estimable": False, "reason": reason}

    monkeypatch.setattr("neftune.stats.length_controlled_win_rate", separated)
    result = judge_pairs(_records(["a", "bb", "ccc"]), _records(["aa", "b", "cccc"]), "length", n_boot=50)
    assert result.lc_estimable is False and result.lc_reason == "the verdicts are separated by length"
    assert math.isnan(result.lc_win_rate) and all(math.isnan(v) for v in result.lc_ci)
    assert "length-controlled win rate: not estimable (the verdicts are separated by length)" in result.summary()
    data = json.loads(result.save(tmp_path / "judge.json").read_text())
    assert (data["lc_win_rate"], data["lc_ci"], data["lc_estimable"]) == (None, [None, None], False)
    assert data["lc_reason"] == "the verdicts are separated by length"
