"""generate.backend=vllm: neftune starts a vLLM server, answers every arm through it, and stops it.

The server here is ``tests/fake_vllm_server.py``, run through a wrapper "python" given as
``generate.vllm_python``, so what neftune does around the engine is checked without vLLM: the flags it
starts the server with, one server for every LoRA arm (each loaded as an adapter of the base), a
full-weight model served whole, the server stopped at the end and never started for a run that has
nothing to answer, and the one-line errors when the server exits, does not answer or cannot be found.
The real engine is exercised by ``tests/test_serve_vllm.py``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import pytest
from tests.test_compare import SMALL

from neftune.cli import main
from neftune.errors import ConfigError
from neftune.generate import stop_token_ids
from neftune.tiny import build_tiny_tokenizer
from neftune.vllm_server import PLUGIN_DIR, find_vllm_python

FAKE = Path(__file__).with_name("fake_vllm_server.py")


@pytest.fixture
def fake_python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """(wrapper "python", record file): ``python -m vllm.entrypoints.openai.api_server ARGS`` runs the fake."""
    record = tmp_path / "record.jsonl"
    wrapper = tmp_path / "vllm-python"
    wrapper.write_text(f'#!/bin/sh\nshift 2\nexec "{sys.executable}" "{FAKE}" "$@"\n', encoding="utf-8")
    wrapper.chmod(0o755)
    monkeypatch.setenv("FAKE_VLLM_RECORD", str(record))
    monkeypatch.setenv("NEFTUNE_CACHE", str(tmp_path / "cache"))
    return wrapper, record


def _read(record: Path) -> tuple[list[dict], list[dict]]:
    entries = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    return [e for e in entries if "start" in e], [e for e in entries if "path" in e]


def _gone(pid: int) -> bool:
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_compare_serves_every_lora_arm_from_one_engine_and_stops_it(fake_python, tmp_path, caplog):
    wrapper, record = fake_python
    out = tmp_path / "exp"
    args = ["compare", *SMALL, "--alphas", "5", "--seeds", "0", "--judge", "none", "--output", str(out)]
    args += ["generate.backend=vllm", f"generate.vllm_python={wrapper}"]
    with caplog.at_level(logging.INFO, logger="neftune"):
        assert main(args) == 0
    starts, requests = _read(record)
    assert len(starts) == 1  # one engine for both arms
    start = starts[0]
    adapter = json.loads((out / "arms" / "alpha0" / "model" / "adapter_config.json").read_text())
    assert start["start"]["model"] == adapter["base_model_name_or_path"]
    assert start["start"]["enable_lora"] and start["start"]["max_lora_rank"] == "16"  # the adapters' r
    assert start["start"]["dtype"] == "float32" and start["start"]["enforce_eager"]  # no CUDA: fp32, as training
    assert start["env"]["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"  # every core to the model
    assert start["env"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    # its own packages, and neftune's penalty that spares the stop tokens, importable from its PYTHONPATH only
    assert start["env"]["PYTHONPATH"] == str(PLUGIN_DIR) and start["processors"] == ["SparingRepetitionPenalty"]
    loads = [r["payload"] for r in requests if r["path"] == "/v1/load_lora_adapter"]
    assert loads == [
        {"lora_name": arm, "lora_path": str((out / "arms" / arm / "model").resolve())} for arm in ("alpha0", "alpha5")
    ]
    asked = [r["payload"] for r in requests if r["path"] == "/v1/completions"]
    assert len(asked) == 16 and {p["model"] for p in asked} == {"alpha0", "alpha5"}
    assert all(isinstance(p["prompt"], list) and p["max_tokens"] == 8 for p in asked)  # token ids, the cap
    outputs = json.loads((out / "arms" / "alpha5" / "outputs.json").read_text())
    assert {o["output"] for o in outputs} == {"answer of alpha5"}
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["generation"]["backend"] == "vllm"
    assert results["arms"][1]["eval"]["reached_cap"] == sum(o["reached_cap"] for o in outputs) / 8
    stamp = json.loads((out / "arms" / "alpha5" / "fingerprint.json").read_text())["generate"]
    assert stamp["backend"] == "vllm" and "url" not in stamp  # the port changes from run to run
    assert _gone(start["pid"])  # stopped when the last arm had answered
    assert (out / "vllm-server.log").is_file() and "vllm-server.log" in caplog.text

    # a rerun with nothing to answer starts no server; back to hf regenerates the answers only
    assert main(args) == 0
    assert len(_read(record)[0]) == 1
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="neftune"):
        assert main(args[:-2]) == 0
    assert caplog.text.count("backend: vllm -> hf; answering the eval prompts again") == 2


def test_generate_serves_a_full_model_whole(fake_python, tiny_model_dir, tmp_path, capsys):
    wrapper, record = fake_python
    out = tmp_path / "served.json"
    args = ["generate", "--model", str(tiny_model_dir), "--output", str(out), "--backend", "vllm"]
    args += ["--vllm-python", str(wrapper), "--vllm-args", "--max-loras 3", "--data", "builtin:skills", "--limit", "3"]
    assert main([*args, "--no-progress"]) == 0
    assert "3 answers written" in capsys.readouterr().out
    [start], requests = _read(record)
    assert start["start"]["model"] == str(tiny_model_dir) and not start["start"]["enable_lora"]
    assert start["start"]["max_loras"] == "3"  # --vllm-args reach the server
    assert {r["payload"]["model"] for r in requests} == {"base"}
    assert not any(r["path"] == "/v1/load_lora_adapter" for r in requests)
    assert {r["output"] for r in json.loads(out.read_text())} == {"answer of base"}
    assert _gone(start["pid"])


@pytest.mark.parametrize("mode", ["exit", "silent"])
def test_a_server_that_exits_or_never_answers_is_one_line(
    fake_python, tiny_model_dir, tmp_path, capsys, monkeypatch, mode
):
    wrapper, record = fake_python
    monkeypatch.setenv("FAKE_VLLM_MODE", mode)
    out = tmp_path / "exp"
    args = ["compare", *SMALL, "--alphas", "5", "--seeds", "0", "--judge", "none", "--output", str(out)]
    args += ["generate.backend=vllm", f"generate.vllm_python={wrapper}", "generate.vllm_start_timeout=3"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    if mode == "exit":
        assert "exited with status 3: RuntimeError: this CPU lacks the instructions" in err[0]
    else:
        assert "did not answer within 3 s (generate.vllm_start_timeout)" in err[0]
    assert str(out / "vllm-server.log") in err[0]
    [start], _ = _read(record)
    assert _gone(start["pid"])


def test_no_python_with_vllm_names_the_ways_to_get_one(tmp_path, monkeypatch):
    monkeypatch.delenv("NEFTUNE_VLLM_PYTHON", raising=False)
    monkeypatch.setenv("NEFTUNE_VLLM_VENV", str(tmp_path / "none"))
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(ConfigError, match=r"no Python with vLLM found .* run `make vllm`"):
        find_vllm_python()
    with pytest.raises(ConfigError, match=r"generate\.vllm_python: .*missing does not exist"):
        find_vllm_python(str(tmp_path / "missing"))
    venv_python = tmp_path / "venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text("")
    monkeypatch.setenv("NEFTUNE_VLLM_VENV", str(tmp_path / "venv"))
    assert find_vllm_python() == str(venv_python)


IFEVAL_COMPARE = [*SMALL, "--alphas", "5", "--seeds", "0", "--judge", "none", "generate.prompts=builtin:ifeval"]


def test_its_own_server_is_asked_for_the_penalty_that_spares_the_stop_tokens(fake_python, tmp_path, monkeypatch):
    """IFEval's default penalty (1.2) spares the stop tokens: vLLM's own penalty off, neftune's processor on
    (the server reached through generate.backend=auto, which picks vLLM where it is found)."""
    wrapper, record = fake_python
    monkeypatch.setattr("neftune.vllm_server._cpu_can_run_vllm", lambda: "")  # whatever CPU runs the test
    args = ["compare", *IFEVAL_COMPARE, "generate.limit=4", "--output", str(tmp_path / "exp")]
    assert main([*args, "generate.backend=vllm", f"generate.vllm_python={wrapper}"]) == 0
    asked = [r["payload"] for r in _read(record)[1] if r["path"] == "/v1/completions"]
    stops = stop_token_ids(build_tiny_tokenizer())
    assert len(asked) == 8 and stops
    for payload in asked:
        assert payload["repetition_penalty"] == 1.0
        assert payload["vllm_xargs"] == {"neftune_penalty": 1.2, "neftune_spared": stops}


def test_a_vllm_server_of_the_users_cannot_spare_them_one_line_before_training(tmp_path, capsys):
    out = tmp_path / "exp"
    served = ["generate.backend=openai", "generate.url=http://127.0.0.1:9/v1", "generate.server=vllm"]
    assert main(["compare", *IFEVAL_COMPARE, "--output", str(out), *served]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sparing the stop tokens cannot be honoured by generate.server=vllm" in err[0]
    assert "use generate.backend=vllm" in err[0]
    assert not (out / "arms").exists()


def test_auto_is_vllm_where_it_is_found_and_can_run_else_hf(tmp_path, monkeypatch, caplog):
    from neftune import vllm_server

    monkeypatch.delenv("NEFTUNE_VLLM_PYTHON", raising=False)
    monkeypatch.setenv("NEFTUNE_VLLM_VENV", str(tmp_path / "none"))
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with caplog.at_level(logging.INFO, logger="neftune"):
        assert vllm_server.resolve_backend("auto") == "hf"
    assert "generate.backend=auto: hf (no vLLM found; `make vllm`" in caplog.text
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("")
    monkeypatch.setenv("NEFTUNE_VLLM_VENV", str(tmp_path / "venv"))
    monkeypatch.setattr(vllm_server, "_cpu_can_run_vllm", lambda: "")
    assert vllm_server.resolve_backend("auto") == "vllm"
    monkeypatch.setattr(vllm_server, "_cpu_can_run_vllm", lambda: "this CPU lacks avx2 and avx512f")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="neftune"):
        assert vllm_server.resolve_backend("auto") == "hf"
    assert "generate.backend=auto: hf (this CPU lacks avx2" in caplog.text
    assert [vllm_server.resolve_backend(b) for b in ("hf", "vllm", "openai")] == ["hf", "vllm", "openai"]


def test_vllm_args_cannot_replace_the_processor_that_applies_the_penalty(fake_python, tiny_model_dir, tmp_path, capsys):
    wrapper, record = fake_python
    args = ["generate", "--model", str(tiny_model_dir), "--output", str(tmp_path / "o.json"), "--backend", "vllm"]
    args += ["--vllm-python", str(wrapper), "--vllm-args", "--logits-processors mine:Other", "--data", "builtin:skills"]
    assert main([*args, "--limit", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "generate.vllm_args: --logits-processors is neftune's" in err[0]
    assert not record.exists()  # no server was started
