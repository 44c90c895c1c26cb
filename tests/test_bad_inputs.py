"""Broken data files, configs, model files and arguments through the real CLI (``neftune train``,
``generate``, ``eval``, ``judge``, ``compare``, ``audit``): one short line on stderr naming the problem,
exit status 2, never a traceback, nothing half-written; the cases live in tests/data/bad/cases.yaml.

Every case runs in-process (``neftune.cli.main``); the ones marked ``subprocess`` also run as
``python -m neftune`` in a fresh interpreter, to show what a user's terminal gets.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tests.hostile import hostile_files

import neftune.models
from neftune.cli import UNEXPECTED_HINT, main
from neftune.models import resolve_model

BAD = Path(__file__).parent / "data" / "bad"
CASES = yaml.safe_load((BAD / "cases.yaml").read_text(encoding="utf-8"))
BASE = [
    "train",
    "--model",
    "tiny-random",
    "--data",
    "{d}/ok.jsonl",
    "--output",
    "{tmp}/out",
    "--max-steps",
    "1",
    "--no-progress",
]
MAX_LINE = 300
HUGE = 5 * 1024 * 1024


@pytest.fixture(scope="module")
def cache(neftune_cache):
    """The session's neftune cache (tests/conftest.py), tiny-random built."""
    return neftune_cache


@pytest.fixture(scope="module")
def places(cache, tmp_path_factory) -> dict[str, str]:
    """The placeholder values shared by all cases (everything outside the source tree)."""
    root = tmp_path_factory.mktemp("bad-inputs")
    d = root / "bad"
    shutil.copytree(BAD, d)
    (root / "a-file").write_text("not a directory\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NEFTUNE_CACHE", str(cache))
        tiny = Path(resolve_model("tiny-random"))
    no_tokenizer = shutil.copytree(tiny, root / "no-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (no_tokenizer / name).unlink(missing_ok=True)
    no_weights = shutil.copytree(tiny, root / "no-weights")
    for weights in no_weights.glob("*.safetensors"):
        weights.unlink()

    good = json.dumps({"instruction": "Say hi", "output": "hi"})
    big = "x" * HUGE
    (root / "huge.jsonl").write_text(f'{good}\n{{"instruction": "{big}", "output": 5, }}\n{good}\n')
    (root / "huge_role.jsonl").write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": big, "content": "x"}]}) + "\n"
    )
    (root / "huge_key.jsonl").write_text(json.dumps({big: "x"}) + "\n")
    (root / "newline_key.jsonl").write_text(json.dumps({"prompt\nresponse": "x"}) + "\n")
    return {
        **hostile_files(root / "hostile", tiny),
        "d": str(d),
        "file": str(root / "a-file"),
        "huge": str(root / "huge.jsonl"),
        "huge_role": str(root / "huge_role.jsonl"),
        "huge_key": str(root / "huge_key.jsonl"),
        "newline_key": str(root / "newline_key.jsonl"),
        "no_tokenizer": str(no_tokenizer),
        "no_weights": str(no_weights),
    }


def argv_for(case: dict, places: dict[str, str], tmp: Path) -> list[str]:
    """The case's command line: ``argv`` as it stands, or ``train`` BASE followed by ``args``."""
    values = {**places, "tmp": str(tmp)}
    argv = case["argv"] if "argv" in case else BASE + case["args"]
    return [str(arg).format(**values) for arg in argv]


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if not p.is_dir()]


def check_error_output(case: dict, code: int, err: str) -> str:
    """Exit 2 and exactly one short ``neftune: error:`` line holding every expected fragment."""
    assert "Traceback" not in err, err[-2000:]
    assert UNEXPECTED_HINT not in err, f"reached the last-resort handler: {err[-2000:]}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"exit {code}; stderr: {err[-2000:]}"
    assert len(lines) == 1, f"expected one line, got {len(lines)}: {err[:2000]}"
    line = lines[0]
    assert line.startswith("neftune: error: "), line[:500]
    assert len(line) < MAX_LINE, f"{len(line)} characters: {line[:500]}"
    for fragment in case["error"]:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_bad_input(case, places, cache, tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.setenv("NEFTUNE_CACHE", str(cache))
    monkeypatch.delenv("RANK", raising=False)
    loads = []
    real_loader = neftune.models.load_model_and_tokenizer

    def counting_loader(*args, **kwargs):
        loads.append(args)
        return real_loader(*args, **kwargs)

    monkeypatch.setattr(neftune.models, "load_model_and_tokenizer", counting_loader)
    caplog.set_level(logging.INFO)
    try:
        code = main(argv_for(case, places, tmp_path))
    except SystemExit as exc:  # argparse exits by itself
        code = exc.code
    out, err = capsys.readouterr()

    if case.get("exit", 2) == 0:
        assert code == 0, err[-2000:]
        assert "neftune: error" not in err and "Traceback" not in err
        for fragment in case.get("log", []):
            assert fragment in caplog.text, f"{fragment!r} not logged:\n{caplog.text[-2000:]}"
        if "argv" in case:
            return
        summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
        for key, value in case.get("summary", {}).items():
            assert summary[key] == value, (key, summary[key])
        assert (tmp_path / "out" / "model").is_dir()
        return

    check_error_output(case, code, err)
    assert len(out) < 1000  # nothing big on stdout either
    if case.get("stage") in ("args", "config", "output"):
        assert loads == [], "the input should be rejected before any model is loaded"
    assert not (tmp_path / "out" / "model").exists()
    if "argv" in case:  # nothing written, not even half a file
        assert files_under(tmp_path) == []


def test_corpus_has_enough_cases():
    ids = [c["id"] for c in CASES]
    assert len(ids) == len(set(ids)) >= 25
    assert sum(c.get("exit", 2) == 0 for c in CASES) >= 3  # inputs that must load
    assert all(c.get("error") for c in CASES if c.get("exit", 2) == 2)
    stages = {c.get("stage") for c in CASES}
    assert {"data", "config", "args", "output", "model"} <= stages
    commands = {c.get("argv", BASE)[0] for c in CASES}
    assert {"train", "generate", "eval", "judge", "compare", "audit"} <= commands


SUBPROCESS_CASES = [c for c in CASES if c.get("subprocess")]


def test_a_fresh_process_prints_one_line_and_no_traceback(places, cache, tmp_path):
    """The same cases as a user runs them: ``python -m neftune -q train ...``, several at once."""
    env = {
        **os.environ,
        "NEFTUNE_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }
    running = []
    for case in SUBPROCESS_CASES:
        work = tmp_path / case["id"]
        work.mkdir()
        argv = [sys.executable, "-m", "neftune", "-q", *argv_for(case, places, work)]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=work)
        running.append((case, proc))
    assert len(running) >= 3
    for case, proc in running:
        out, err = proc.communicate(timeout=240)
        assert len(err) < 2000, f"{case['id']}: {len(err)} characters on stderr"
        check_error_output(case, proc.returncode, err)
        assert out == "", case["id"]


# -- the library's own messages ----------------------------------------------------------------
# The CLI folds any message into one short line (neftune.cli.error_line); DataError itself is
# already one short line for Python callers, whatever the record holds.


def test_data_error_for_a_key_with_a_newline_is_one_line(places):
    from neftune.data.formats import load_examples
    from neftune.errors import DataError

    with pytest.raises(DataError) as caught:
        load_examples(places["newline_key"])
    assert "\n" not in str(caught.value)


def test_data_error_for_a_huge_role_or_key_is_short(places):
    from neftune.data.formats import load_examples
    from neftune.errors import DataError

    for name in ("huge_role", "huge_key"):
        with pytest.raises(DataError) as caught:
            load_examples(places[name])
        assert len(str(caught.value)) < 1000, name


# -- the CLI boundary: --debug, NEFTUNE_DEBUG and the last-resort handler -----------------------


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def test_debug_flag_and_variable_show_the_traceback(places, tmp_path, monkeypatch, capsys):
    argv = ["judge", places["outs_deep"], places["outs"], "--backend", "length", "--cache", str(tmp_path / "c")]
    monkeypatch.delenv("NEFTUNE_DEBUG", raising=False)
    code, err = run_cli(argv, capsys)
    assert code == 2 and "Traceback" not in err
    code, err = run_cli(["--debug", *argv], capsys)
    assert code == 2 and "Traceback" in err and err.rstrip().splitlines()[-1].startswith("neftune: error: ")
    monkeypatch.setenv("NEFTUNE_DEBUG", "1")
    code, err = run_cli(argv, capsys)
    assert code == 2 and "Traceback" in err


def test_an_unexpected_exception_is_one_line_saying_how_to_see_more(places, tmp_path, monkeypatch, capsys):
    import neftune.outputs

    def broken(path):
        raise KeyError("surprise")

    monkeypatch.setattr(neftune.outputs, "read_outputs", broken)
    monkeypatch.delenv("NEFTUNE_DEBUG", raising=False)
    argv = ["judge", places["outs"], places["outs"], "--backend", "length", "--cache", str(tmp_path / "c")]
    code, err = run_cli(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "Traceback" not in err
    assert "unexpected KeyError: 'surprise'" in lines[0] and "--debug" in lines[0] and "NEFTUNE_DEBUG=1" in lines[0]
    code, err = run_cli(["--debug", *argv], capsys)
    assert code == 1 and "Traceback" in err and "KeyError" in err
