"""generate.backend=openai: answers from an OpenAI-compatible /completions endpoint.

The loopback server below runs the tiny model itself with transformers, from the token ids it is
sent, the way a serving engine would: so the answers it returns can be checked, token for token,
against the hf backend's, along with every field of the request and every failure a user can meet.
"""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest
import torch
from tests.helpers import OpenAIStyleServer
from transformers import AutoModelForCausalLM, AutoTokenizer

from neftune.cli import main
from neftune.data.formats import Example
from neftune.errors import ConfigError, NeftuneError
from neftune.generate import generate_completions, generate_outputs
from neftune.serve import ServerEngine, penalty_fields

QUESTIONS = ["hi", "name three colours", "a much longer question about the weather and the sea", "x", "why?"]


class _SometimesEnd(torch.nn.Module):
    """LM head wrapper: the end of turn wins wherever one hidden feature is high, so that some answers
    end before the cap and others run into it (a random tiny model alone never ends)."""

    def __init__(self, head: torch.nn.Module, token_id: int) -> None:
        super().__init__()
        self.head, self.token_id = head, token_id

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden)
        logits[..., self.token_id] += 1e4 * (hidden[..., 0] > THRESHOLD)
        return logits


THRESHOLD = 2.2  # with the seeded tiny model: one of the five answers ends early, four run into the cap


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.lm_head = _SometimesEnd(model.lm_head, tokenizer.convert_tokens_to_ids("<|im_end|>"))
    return model, tokenizer


def _examples() -> list[Example]:
    return [Example(messages=[{"role": "user", "content": q}]) for q in QUESTIONS]


def _engine_server(model, tokenizer, *, bos: bool = False):
    """A /completions server that answers with ``model`` (greedy, the request's penalty and cap)."""

    def behaviour(payload, nth, headers):
        prompt = payload["prompt"]
        ids = prompt if isinstance(prompt, list) else tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if bos:  # a server that puts a begin-of-sequence token in front of what it is sent
            ids = [0, *ids]
        penalty = payload.get("repetition_penalty", payload.get("repeat_penalty", 1.0))
        [done] = generate_completions(
            model, tokenizer, [ids], max_new_tokens=payload["max_tokens"], repetition_penalty=penalty, progress=False
        )
        body = {
            "choices": [
                {
                    "index": 0,
                    "text": tokenizer.decode(done.ids, skip_special_tokens=True),
                    "finish_reason": "length" if done.reached_cap else "stop",
                }
            ],
            "usage": {"prompt_tokens": len(ids), "completion_tokens": len(done.ids)},
        }
        return 200, json.dumps(body)

    return OpenAIStyleServer(behaviour)


@pytest.mark.parametrize(("server", "penalty"), [("vllm", 1.3), ("llama.cpp", 1.0)])
def test_server_answers_match_the_hf_backend_token_for_token(loaded, server, penalty):
    model, tokenizer = loaded
    kw = {"generator_name": "tiny", "dataset_name": "unit", "max_new_tokens": 12, "repetition_penalty": penalty}
    # servers apply transformers' own penalty, which also lowers the stop token in the prompt
    local = generate_outputs(model, tokenizer, _examples(), progress=False, spare_stop_tokens=False, **kw)
    with _engine_server(model, tokenizer) as http:
        engine = ServerEngine(
            http.url,
            "tiny-arm",
            tokenizer,
            server=server,
            max_new_tokens=kw.pop("max_new_tokens"),
            repetition_penalty=kw.pop("repetition_penalty"),
        )
        served = generate_outputs(None, tokenizer, _examples(), engine=engine, progress=False, **kw)
    assert served == local  # outputs, reached_cap flags and every other field
    assert {r["reached_cap"] for r in local} == {True, False}  # both kinds of ending were exercised
    sent = http.requests[0]["payload"]
    assert http.requests[0]["path"] == "/v1/completions" and sent["model"] == "tiny-arm"
    assert sent["temperature"] == 0.0 and sent["max_tokens"] == 12 and "<|im_end|>" in sent["stop"]
    if server == "vllm":  # token ids, and transformers' penalty under its own name
        assert isinstance(sent["prompt"], list) and sent["repetition_penalty"] == 1.3
        assert sent["stop_token_ids"] == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    else:  # text, and llama.cpp's own default penalty (1.1) turned off
        assert sent["prompt"].startswith("<|im_start|>") and sent["prompt"].endswith("<|im_start|>assistant\n")
        assert sent["repeat_penalty"] == 1.0 and "repetition_penalty" not in sent


def test_penalty_each_server_cannot_honour_is_refused_in_one_line():
    assert penalty_fields("sglang", 1.2) == {"repetition_penalty": 1.2}
    assert penalty_fields("other", 1.0) == {} and penalty_fields("llama.cpp", 1.0) == {"repeat_penalty": 1.0}
    for server, reason in (("other", "additive"), ("llama.cpp", "skips the prompt's tokens")):
        with pytest.raises(ConfigError) as info:
            penalty_fields(server, 1.2)
        message = str(info.value)
        assert f"generate.repetition_penalty=1.2 cannot be honoured by generate.server={server}: " in message
        assert reason in message and "\n" not in message
    with pytest.raises(ConfigError, match=r"generate\.server must be one of vllm, sglang, llama\.cpp, other"):
        penalty_fields("ollama", 1.0)
    for server in ("vllm", "sglang"):  # their penalty lowers the prompt's end-of-turn token too: no sparing
        assert penalty_fields(server, 1.0, spare_stop_tokens=True) == {"repetition_penalty": 1.0}
        with pytest.raises(ConfigError) as info:
            penalty_fields(server, 1.2, spare_stop_tokens=True)
        message = str(info.value)
        assert message.startswith(
            f"generate.repetition_penalty=1.2 sparing the stop tokens cannot be honoured by generate.server={server}, "
        )
        assert "generate.spare_stop_tokens=false" in message and "\n" not in message
        assert ("use generate.backend=vllm" in message) == (server == "vllm")  # neftune's own vLLM can
    # the vLLM neftune runs has its processor: vLLM's own penalty off, neftune's asked for in vllm_xargs
    assert penalty_fields("vllm", 1.2, spare_stop_tokens=True, sparing_plugin=True, stops=[2, 7]) == {
        "repetition_penalty": 1.0,
        "vllm_xargs": {"neftune_penalty": 1.2, "neftune_spared": [2, 7]},
    }
    assert penalty_fields("vllm", 1.2, sparing_plugin=True) == {"repetition_penalty": 1.2}  # not sparing: vLLM's


def test_a_server_that_reads_the_prompt_differently_is_refused(loaded):
    model, tokenizer = loaded
    with _engine_server(model, tokenizer, bos=True) as http:
        engine = ServerEngine(http.url, "m", tokenizer, server="llama.cpp", max_new_tokens=4, repetition_penalty=1.0)
        with pytest.raises(NeftuneError) as info:
            generate_outputs(None, tokenizer, _examples()[:1], generator_name="g", dataset_name="d", engine=engine)
    message = str(info.value)
    assert "prompt 0: the server read the prompt as" in message and "begin-of-sequence" in message
    assert "\n" not in message


def _reply(text: str, finish: str = "stop") -> str:
    return json.dumps({"choices": [{"index": 0, "text": text, "finish_reason": finish}]})


def test_failures_read_as_one_line_and_transient_ones_are_retried(loaded):
    _, tokenizer = loaded
    examples = _examples()[:2]

    def flaky(payload, nth, headers):
        return (503, '{"error": "overloaded"}', {"Retry-After": "0"}) if nth == 1 else (200, _reply("fine", "length"))

    with OpenAIStyleServer(flaky) as http:
        engine = ServerEngine(http.url, "m", tokenizer, server="vllm", max_new_tokens=4, workers=1)
        slept: list[float] = []
        engine.endpoint.sleep = slept.append
        records = generate_outputs(None, tokenizer, examples, generator_name="g", dataset_name="d", engine=engine)
    assert [r["output"] for r in records] == ["fine", "fine"] and all(r["reached_cap"] for r in records)
    assert len(slept) == 2  # one retry per prompt

    with OpenAIStyleServer(lambda p, n, h: (404, '{"error": "no such model"}')) as http:
        engine = ServerEngine(http.url, "alpha5", tokenizer, server="vllm")
        with pytest.raises(NeftuneError, match=r"returned HTTP 404: check generate.url and model 'alpha5'$"):
            generate_outputs(None, tokenizer, examples, generator_name="g", dataset_name="d", engine=engine)

    with OpenAIStyleServer(lambda p, n, h: (400, '{"error": "max_tokens too large"}')) as http:
        engine = ServerEngine(http.url, "m", tokenizer, server="vllm")
        with pytest.raises(NeftuneError, match=r"generation with 'm', prompt \d: HTTP 400 .*max_tokens too large"):
            generate_outputs(None, tokenizer, examples, generator_name="g", dataset_name="d", engine=engine)

    with OpenAIStyleServer(lambda p, n, h: (200, '{"choices": []}')) as http:
        engine = ServerEngine(http.url, "m", tokenizer, server="vllm")
        with pytest.raises(NeftuneError, match=r"the reply has no choices\[0\].text"):
            generate_outputs(None, tokenizer, examples, generator_name="g", dataset_name="d", engine=engine)

    with pytest.raises(ConfigError, match="generation base_url must be an http"):
        ServerEngine("localhost:8000", "m", tokenizer, server="vllm")


def test_compare_answers_every_arm_through_the_server_under_its_own_name(tmp_path, caplog, capsys, monkeypatch):
    from tests.test_compare import SMALL

    monkeypatch.setenv("NEFTUNE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "exp"
    base = ["compare", *SMALL, "--alphas", "5", "--seeds", "0", "--judge", "none", "--output", str(out)]

    def named(payload, nth, headers):  # an answer that says which adapter gave it; every other one is cut
        if "lora_name" in payload:  # vLLM's runtime adapter loading replies in plain text
            return 200, "Success: LoRA adapter added successfully."
        return 200, _reply(f"answer of {payload['model']}", "length" if nth % 2 else "stop")

    with OpenAIStyleServer(named) as http:
        http.models = ["base", "neft-alpha5"]  # the alpha5 adapter is already served (--lora-modules)
        served = [*base, "generate.backend=openai", f"generate.url={http.url}", "generate.server=vllm"]
        served.append("generate.served_model=neft-{arm}")
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="neftune"):
            assert main(served) == 0
        # each arm's adapter is loaded into the running engine unless it is already there
        loads = [r["payload"] for r in http.requests if r["path"] == "/v1/load_lora_adapter"]
        assert loads == [{"lora_name": "neft-alpha0", "lora_path": str((out / "arms" / "alpha0" / "model").resolve())}]
        asked = [r for r in http.requests if r["path"] == "/v1/completions"]
        assert {r["payload"]["model"] for r in asked} == {"neft-alpha0", "neft-alpha5"}
        assert len(asked) == 16 and all(r["payload"]["max_tokens"] == 8 for r in asked)
        outputs = json.loads((out / "arms" / "alpha5" / "outputs.json").read_text())
        assert {o["output"] for o in outputs} == {"answer of neft-alpha5"} and len(outputs) == 8
        stamp = json.loads((out / "arms" / "alpha5" / "fingerprint.json").read_text())["generate"]
        assert stamp["backend"] == "openai" and stamp["server"] == "vllm" and stamp["url"] == http.url
        assert stamp["served_model"] == "neft-{arm}"
        results = json.loads((out / "results.json").read_text())
        assert results["settings"]["generation"]["backend"] == "openai"
        assert results["arms"][1]["eval"]["reached_cap"] == sum(o["reached_cap"] for o in outputs) / 8

        # back to the hf backend: the answers are generated again, the training is reused
        n = len(http.requests)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="neftune"):
            assert main(base) == 0
        assert caplog.text.count("backend: openai -> hf; answering the eval prompts again") == 2
        assert len(http.requests) == n

    # a penalty the server cannot apply stops the run before any arm trains, in one line
    capsys.readouterr()
    other = [*base[:-1], str(tmp_path / "other"), "generate.backend=openai", "generate.url=http://127.0.0.1:9/v1"]
    assert main([*other, "generate.repetition_penalty=1.2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("neftune: error: generate.repetition_penalty=1.2 cannot be honoured")
    assert not (tmp_path / "other" / "arms").exists()


def test_generate_command_answers_through_the_server(loaded, tiny_model_dir, tmp_path, capsys):
    from neftune.data.formats import load_eval_examples

    model, tokenizer = loaded
    out = tmp_path / "served.json"
    flags = ["--data", "builtin:skills", "--limit", "3", "--max-new-tokens", "12", "--repetition-penalty", "1.3"]
    flags.append("--penalize-stop-tokens")  # the server's penalty: transformers' own
    with _engine_server(model, tokenizer) as http:
        args = ["generate", "--model", str(tiny_model_dir), "--output", str(out), "--backend", "openai"]
        assert main([*args, "--url", http.url, "--server", "sglang", "--served-model", "arm", *flags]) == 0
    assert "3 answers written" in capsys.readouterr().out
    examples = load_eval_examples("builtin:skills", limit=3, require_response=False).examples
    local = generate_outputs(
        model,
        tokenizer,
        examples,
        generator_name="x",
        dataset_name="builtin:skills",
        max_new_tokens=12,
        repetition_penalty=1.3,
        spare_stop_tokens=False,
        progress=False,
    )
    served = json.loads(out.read_text())
    assert [(r["output"], r["reached_cap"]) for r in served] == [(r["output"], r["reached_cap"]) for r in local]
    assert {r["payload"]["model"] for r in http.requests} == {"arm"}
    assert (
        main(["generate", "--model", str(tiny_model_dir), "--output", str(tmp_path / "x.json"), "--backend", "openai"])
        == 2
    )
    assert "--backend openai needs --url" in capsys.readouterr().err


def test_an_adapter_vllm_cannot_load_is_one_line_naming_the_way_out(loaded, tmp_path):
    _, tokenizer = loaded
    adapter = tmp_path / "arms" / "alpha5" / "model"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}", encoding="utf-8")
    with OpenAIStyleServer(lambda p, n, h: (404, '{"detail": "Not Found"}')) as http:  # runtime loading is off
        engine = ServerEngine(http.url, "alpha5", tokenizer, server="vllm")
        with pytest.raises(NeftuneError) as info:
            engine.ensure_served(adapter)
        ServerEngine(http.url, "alpha5", tokenizer, server="sglang").ensure_served(adapter)  # not vLLM: untouched
        engine.ensure_served(tmp_path)  # full weights (no adapter_config.json): untouched
    message = str(info.value)
    assert f"could not load the adapter {adapter} as 'alpha5'" in message
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True" in message and f"--lora-modules alpha5={adapter}" in message
    assert "\n" not in message and len(http.requests) == 1  # the load; the model list is a GET


def test_the_first_error_ends_the_answers_at_once_without_waiting_for_those_in_flight(loaded):
    """A server's refusal (or Ctrl-C) stops the call: nothing more is sent, slow requests are abandoned."""
    _, tokenizer = loaded
    release = threading.Event()
    answer = {"choices": [{"index": 0, "text": "ok", "finish_reason": "stop"}]}

    def behaviour(payload, nth, headers):
        if payload["prompt"] == [1, 2]:
            return 400, '{"error": {"message": "this prompt is refused"}}'
        release.wait(30)  # the others take long
        return 200, json.dumps(answer)

    with OpenAIStyleServer(behaviour) as http:
        engine = ServerEngine(http.url, "m", tokenizer, server="vllm", repetition_penalty=1.0, workers=3)
        started = time.monotonic()
        with pytest.raises(NeftuneError, match=r"prompt 0: .*this prompt is refused"):
            engine([[1, 2], [3, 4], [5, 6], [7, 8], [9, 10]], progress=False)
        took = time.monotonic() - started
        sent = len(http.requests)
        release.set()
    assert took < 10, took  # not the 30 s the requests in flight would take
    assert sent <= 3  # the prompts not sent yet were dropped


def test_answers_arrive_out_of_order_and_come_back_in_prompt_order(loaded):
    _, tokenizer = loaded

    def behaviour(payload, nth, headers):
        first = payload["prompt"][0]
        time.sleep(0.3 if first == 1 else 0.0)  # the first prompt's answer arrives last
        return 200, json.dumps({"choices": [{"index": 0, "text": f"answer {first}", "finish_reason": "stop"}]})

    with OpenAIStyleServer(behaviour) as http:
        engine = ServerEngine(http.url, "m", tokenizer, server="vllm", repetition_penalty=1.0, workers=4)
        done = engine([[1, 2], [3, 4], [5, 6], [7, 8]], progress=False)
    assert [c.text for c in done] == ["answer 1", "answer 3", "answer 5", "answer 7"]
