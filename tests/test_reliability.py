"""What a crash, a full disk or an exception costs: at most the steps since the last checkpoint."""

from __future__ import annotations

import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.helpers import hook_count
from transformers import Trainer, TrainerCallback

from neftune.config import Config, load_config
from neftune.errors import NeftuneError
from neftune.train import last_complete_checkpoint, run_training

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


@pytest.fixture
def env(tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "neftune-cache"
    return {
        **os.environ,
        "NEFTUNE_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }


def _train_cmd(output: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "neftune",
        "train",
        "--model",
        "tiny-random",
        "--full",
        "--alpha",
        "5",
        "--output",
        str(output),
        "--max-steps",
        "30",
        "--batch-size",
        "4",
        "--no-progress",
        "data.limit=96",
        "train.save_steps=3",
        "train.eval_steps=100",
        "train.logging_steps=1",
        *extra,
    ]


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


def test_sigkill_then_resume_matches_the_uninterrupted_run(tmp_path, env):
    reference = tmp_path / "uninterrupted"
    subprocess.run(_train_cmd(reference), env=env, check=True, capture_output=True, timeout=300)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = random.choice([3, 6, 9, 12, 15, 18])  # a random checkpoint, then a random moment after it
    delay = random.uniform(0.0, 0.15)
    reached = killed / "checkpoints" / f"checkpoint-{target}" / "trainer_state.json"
    deadline = time.time() + 240
    while not reached.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    where = f"killed {delay:.2f}s after checkpoint-{target}"
    assert proc.returncode == -signal.SIGKILL, f"the run finished before it could be killed ({where})"
    assert not (killed / "model").exists()
    assert last_complete_checkpoint(killed / "checkpoints") is not None

    done = subprocess.run(_train_cmd(killed, "--resume"), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert re.search(r"resuming from .*checkpoint-\d+", done.stderr)
    a, b = _weights(reference / "model"), _weights(killed / "model")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=f"{name} ({where})")


def _small_config(output: Path, **train) -> Config:
    overrides = [
        "model.name=tiny-random",
        "model.lora=false",
        f"train.output={output}",
        "train.max_steps=9",
        "train.batch_size=4",
        "train.save_steps=3",
        "train.progress=false",
        "data.limit=64",
    ]
    overrides += [f"train.{k}={v}" for k, v in train.items()]
    return load_config(Config, None, overrides)


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("NEFTUNE_CACHE", str(tmp_path / "cache"))
    original = Trainer._save_optimizer_and_scheduler

    def fail_on_second(self, output_dir):
        if self.state.global_step == 6:
            Path(output_dir, "optimizer.pt").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", fail_on_second)
    out = tmp_path / "run"
    with pytest.raises(NeftuneError) as info:
        run_training(_small_config(out))
    message = str(info.value)
    assert "No space left on device" in message and "checkpoint-3 is intact" in message and "\n" not in message
    assert last_complete_checkpoint(out / "checkpoints").name == "checkpoint-3"
    assert not (out / "checkpoints" / "checkpoint-6" / "trainer_state.json").exists()

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", original)
    run_training(_small_config(out, resume="true"))
    state = json.loads((out / "checkpoints" / "checkpoint-9" / "trainer_state.json").read_text())
    assert state["global_step"] == 9
    assert (out / "model" / "model.safetensors").exists()


class _RaiseAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step
        self.model = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model = model

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError(f"raised at step {self.step}")


def _neftune_hooks(model) -> int:
    return sum(hasattr(m, "_neftune_handle") for m in model.modules())


def test_no_hook_remains_after_an_exception_inside_training(tmp_path, monkeypatch):
    monkeypatch.setenv("NEFTUNE_CACHE", str(tmp_path / "cache"))
    raiser = _RaiseAt(2)
    with pytest.raises(RuntimeError, match="raised at step 2"):
        run_training(_small_config(tmp_path / "run"), extra_callbacks=[raiser])
    assert raiser.model is not None
    assert _neftune_hooks(raiser.model) == 0 and hook_count(raiser.model) == 0


def test_no_hook_remains_after_an_exception_inside_compare_evaluation(tmp_path, monkeypatch):
    import neftune.generate
    from neftune.cli import main

    monkeypatch.setenv("NEFTUNE_CACHE", str(tmp_path / "cache"))
    seen = {}

    def exploding_generate_outputs(model, *args, **kwargs):
        seen["neftune_hooks"] = _neftune_hooks(model)
        seen["hooks"] = hook_count(model)
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(neftune.generate, "generate_outputs", exploding_generate_outputs)
    # an unexpected error is one line and exit status 1 (cli.main's last resort)
    assert (
        main(
            [
                "compare",
                "--model",
                "tiny-random",
                "--max-steps",
                "2",
                "--eval-limit",
                "4",
                "--judge",
                "none",
                "data.limit=16",
                "--no-progress",
                "--output",
                str(tmp_path / "exp"),
            ]
        )
        == 1
    )
    assert seen == {"neftune_hooks": 0, "hooks": 0}


def test_no_unsafe_deserialisation_or_remote_code_in_the_package():
    for path in (SRC / "neftune").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "import pickle" not in text and "pickle.load" not in text, path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path}: {call}"
        assert "trust_remote_code=True" not in text, path
    assert load_config(Config).model.trust_remote_code is False


def _compare_cmd(output: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "neftune",
        "compare",
        "--model",
        "tiny-random",
        "--seeds",
        "0",
        "--output",
        str(output),
        "--max-steps",
        "30",
        "--eval-limit",
        "4",
        "--max-new-tokens",
        "4",
        "--judge",
        "length",
        "--no-progress",
        "data.limit=96",
        "train.save_steps=3",
        "train.eval_steps=100",
        "train.batch_size=4",
    ]


def test_compare_killed_mid_arm_resumes_without_retraining_finished_arms(tmp_path, env):
    reference = tmp_path / "uninterrupted"
    subprocess.run(_compare_cmd(reference), env=env, check=True, capture_output=True, timeout=300)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_compare_cmd(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = random.choice([3, 6, 9, 12])
    reached = killed / "arms" / "alpha5" / "checkpoints" / f"checkpoint-{target}" / "trainer_state.json"
    deadline = time.time() + 240
    while not reached.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"compare finished before the kill at checkpoint-{target}"
    finished = killed / "arms" / "alpha0" / "arm.json"
    assert finished.exists() and not (killed / "arms" / "alpha5" / "arm.json").exists()
    stamp = finished.stat().st_mtime_ns

    done = subprocess.run(_compare_cmd(killed), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "alpha=0: already finished" in done.stderr
    assert re.search(r"resuming from .*alpha5/checkpoints/checkpoint-\d+", done.stderr)
    assert finished.stat().st_mtime_ns == stamp  # the finished arm was not retrained or rewritten
    results = json.loads((killed / "results.json").read_text())
    assert [a["name"] for a in results["arms"]] == ["alpha=0", "alpha=5", "alpha=10"]
    a = load_file(reference / "arms" / "alpha5" / "model" / "adapter_model.safetensors")
    b = load_file(killed / "arms" / "alpha5" / "model" / "adapter_model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=f"{name} (killed at checkpoint-{target})")
