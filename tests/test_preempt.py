"""SIGTERM / SIGUSR1: the step in flight finishes, a checkpoint is written, the run stops with status 75,
and ``--resume`` continues bit-exactly; a second signal stops at once."""

from __future__ import annotations

import json
import logging
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
from transformers import TrainerCallback

from neftune.checkpoints import checkpoint_problem
from neftune.cli import main
from neftune.config import Config, load_config
from neftune.preempt import EXIT_PREEMPTED, Preempted
from neftune.train import run_training

ROOT = Path(__file__).resolve().parents[1]
STEPS = 30


@pytest.fixture(autouse=True)
def _cache(neftune_cache, monkeypatch):
    monkeypatch.setenv("NEFTUNE_CACHE", str(neftune_cache))


def config(output: Path, *extra: str) -> Config:
    overrides = [
        "model.name=tiny-random",
        "model.lora=false",
        "noise.alpha=5",
        f"train.output={output}",
        f"train.max_steps={STEPS}",
        "train.batch_size=4",
        "train.save_steps=10",
        "train.eval_steps=7",
        "train.logging_steps=1",
        "train.progress=false",
        "data.limit=96",
        "data.eval_limit=8",
        *extra,
    ]
    return load_config(Config, None, overrides)


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


def assert_bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], where: str) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs ({where})"


class SignalAt(TrainerCallback):
    """Sends this process ``sig`` at one moment of training: ``when`` is one of ``train_begin``,
    ``step_begin``, ``forward`` (inside the model's forward pass of a training step), ``save`` (just
    after a periodic checkpoint) or ``evaluate`` (inside a held-out evaluation)."""

    def __init__(self, when: str, step: int, sig: signal.Signals = signal.SIGTERM) -> None:
        self.when, self.step, self.sig = when, step, sig
        self.sent = False
        self._hook = None

    def _send(self) -> None:
        if not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.sig)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.when == "train_begin":
            self._send()
        if self.when in ("forward", "evaluate"):
            self._hook = model.register_forward_pre_hook(self._in_forward)

    def _in_forward(self, module, inputs):
        if self._state_step == self.step and module.training == (self.when == "forward"):
            self._send()

    _state_step = -1

    def on_step_begin(self, args, state, control, **kwargs):
        self._state_step = state.global_step + 1  # the step now in flight
        if self.when == "step_begin" and self._state_step == self.step:
            self._send()

    def on_step_end(self, args, state, control, **kwargs):
        self._state_step = state.global_step  # evaluation after step N runs with N done

    def on_save(self, args, state, control, **kwargs):
        if self.when == "save" and state.global_step == self.step:
            self._send()

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()


def moments(rng: random.Random) -> list[tuple[str, int, int, signal.Signals]]:
    """(when, step it is sent in, step the run stops after, signal): seven moments, in training order."""
    first = rng.randint(2, 5)
    second = rng.randint(first + 1, 9)
    evaluated = rng.choice([14, 21])
    late = rng.randint(evaluated + 2, 28)
    return [
        ("train_begin", 0, 1, signal.SIGTERM),  # before the first step: stops after it
        ("step_begin", first, first, signal.SIGUSR1),
        ("forward", second, second, signal.SIGTERM),
        ("save", 10, 11, signal.SIGTERM),  # after checkpoint-10 was written: the next step finishes
        ("evaluate", evaluated, evaluated + 1, signal.SIGUSR1),
        ("forward", late, late, signal.SIGTERM),
        ("step_begin", STEPS, STEPS, signal.SIGTERM),  # the last step: its checkpoint, then nothing to do
    ]


def test_signals_at_seven_moments_then_resume_give_the_uninterrupted_weights(tmp_path):
    reference = run_training(config(tmp_path / "reference"))
    seed = random.randrange(2**32)
    plan = moments(random.Random(seed))
    out = tmp_path / "preempted"
    previous = signal.getsignal(signal.SIGTERM)
    for index, (when, step, stops_after, sig) in enumerate(plan):
        where = f"{sig.name} at {when} of step {step} (seed {seed})"
        with pytest.raises(Preempted) as stopped:
            run_training(config(out, f"train.resume={index > 0}"), extra_callbacks=[SignalAt(when, step, sig)])
        checkpoint = out / "checkpoints" / f"checkpoint-{stops_after}"
        assert stopped.value.checkpoint == checkpoint, where
        assert str(stopped.value) == (
            f"stopped by {sig.name} after step {stops_after} of {STEPS}: checkpoint {checkpoint} written; "
            "rerun with --resume to continue"
        ), where
        assert checkpoint_problem(checkpoint) is None, where
        assert not (out / "model").exists(), where
        assert signal.getsignal(signal.SIGTERM) is previous, where  # the handler does not outlive training
    final = run_training(config(out, "train.resume=true"))
    assert_bit_equal(weights(reference.model_dir), weights(final.model_dir), f"moments {plan}, seed {seed}")
    assert final.metrics["heldout_loss"] == reference.metrics["heldout_loss"]


def test_a_signal_before_the_first_step_stops_with_nothing_new_to_save(tmp_path, monkeypatch, capsys):
    import neftune.train

    real = neftune.train.check_can_save

    def signalled(trainer):  # the trainer is built, training has not begun
        os.kill(os.getpid(), signal.SIGUSR1)
        return real(trainer)

    monkeypatch.setattr(neftune.train, "check_can_save", signalled)
    assert main(_argv(tmp_path / "run")) == EXIT_PREEMPTED
    err = capsys.readouterr().err
    assert "neftune: stopped by SIGUSR1 before the first step: nothing new to save" in err
    assert not (tmp_path / "run" / "checkpoints").exists() or not list((tmp_path / "run" / "checkpoints").iterdir())


def test_compare_stops_with_the_checkpoint_and_a_rerun_continues(tmp_path, monkeypatch, capsys, caplog):
    """A signal during an arm's training stops compare with status 75; the rerun resumes that arm."""
    from neftune.trainer_parts import HeldoutTrainer

    real_step = HeldoutTrainer.training_step
    sent = []

    def signalled_step(self, *args, **kwargs):
        if "alpha5" in str(self.args.output_dir) and self.state.global_step == 3 and not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(HeldoutTrainer, "training_step", signalled_step)
    argv = [
        "compare",
        "--model",
        "tiny-random",
        "--alphas",
        "5",
        "--seeds",
        "0",
        "--max-steps",
        "6",
        "--eval-limit",
        "4",
    ]
    argv += ["--max-new-tokens", "4", "--judge", "length", "--no-progress", "--output", str(tmp_path / "exp")]
    argv += ["data.limit=32", "train.save_steps=100", "train.batch_size=4"]
    assert main(argv) == EXIT_PREEMPTED
    err = capsys.readouterr().err
    checkpoint = tmp_path / "exp" / "arms" / "alpha5" / "checkpoints" / "checkpoint-4"
    assert f"neftune: stopped by SIGTERM after step 4 of 6: checkpoint {checkpoint} written" in err
    assert checkpoint_problem(checkpoint) is None
    with caplog.at_level(logging.INFO, logger="neftune"):
        assert main(argv) == 0
    assert "alpha=0: already finished" in caplog.text and f"resuming from {checkpoint}" in caplog.text


# -- a real signal from outside ------------------------------------------------------------------

DRIVER = """
import sys, time
from neftune.cli import main
from neftune.trainer_parts import HeldoutTrainer

real = HeldoutTrainer.training_step
pause, long_at = float(sys.argv[1]), int(sys.argv[2])

def slow(self, *args, **kwargs):  # the tiny model trains 30 steps in a second: give a signal time to land
    time.sleep(60 if self.state.global_step == long_at else pause)
    return real(self, *args, **kwargs)

HeldoutTrainer.training_step = slow
sys.exit(main(sys.argv[3:]))
"""


def _argv(output: Path) -> list[str]:
    return [
        "train",
        "--model",
        "tiny-random",
        "--full",
        "--alpha",
        "5",
        "--output",
        str(output),
        "--max-steps",
        str(STEPS),
        "--batch-size",
        "4",
        "--no-progress",
        "data.limit=96",
        "train.save_steps=10",
        "train.eval_steps=100",
        "train.logging_steps=1",
    ]


def _start(tmp_path: Path, output: Path, pause: float, long_at: int) -> subprocess.Popen:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [sys.executable, str(driver), str(pause), str(long_at), *_argv(output)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _logged_steps(output: Path) -> int:
    path = output / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_sigterm_from_outside_exits_75_naming_the_checkpoint_and_resume_is_exact(tmp_path):
    assert main(_argv(tmp_path / "reference")) == 0
    out = tmp_path / "run"
    proc = _start(tmp_path, out, 0.1, -1)
    target = random.randint(2, 20)
    deadline = time.time() + 120
    while _logged_steps(out) < target and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("neftune:")]
    assert lines[0].startswith("neftune: SIGTERM received: finishing the current step"), err[-3000:]
    found = re.fullmatch(
        rf"neftune: stopped by SIGTERM after step (\d+) of {STEPS}: checkpoint (\S+) written; .*", lines[-1]
    )
    assert found and "Traceback" not in err, err[-3000:]
    step, checkpoint = int(found[1]), Path(found[2])
    assert step >= target and checkpoint == out / "checkpoints" / f"checkpoint-{step}"
    assert checkpoint_problem(checkpoint) is None

    assert main([*_argv(out), "--resume"]) == 0
    assert_bit_equal(weights(tmp_path / "reference" / "model"), weights(out / "model"), f"SIGTERM after step {step}")


def test_a_second_signal_stops_at_once_without_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = _start(tmp_path, out, 0.0, 3)  # step 4 hangs for a minute
    deadline = time.time() + 120
    while _logged_steps(out) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=50)  # well before the step would have finished
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "neftune: SIGTERM again: stopping at once, without a checkpoint" in err
    assert not list((out / "checkpoints").glob("checkpoint-*")) if (out / "checkpoints").exists() else True


# -- two processes under accelerate launch -----------------------------------------------------

LAUNCH_DRIVER = """
import os, sys, time
from neftune.cli import main
from neftune.trainer_parts import HeldoutTrainer

with open(os.path.join(sys.argv[1], f"pid{os.environ['RANK']}"), "w") as fh:
    fh.write(str(os.getpid()))
real = HeldoutTrainer.training_step

def slow(self, *args, **kwargs):
    time.sleep(float(sys.argv[2]))
    return real(self, *args, **kwargs)

HeldoutTrainer.training_step = slow
sys.exit(main(sys.argv[3:]))
"""


def _launch(tmp_path: Path, output: Path, pause: float, *extra: str) -> subprocess.Popen:
    driver = tmp_path / "launch_driver.py"
    driver.write_text(LAUNCH_DRIVER)
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file", str(ROOT / "configs" / "accelerate" / "ddp.yaml")]
    cmd += ["--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "0"]
    cmd += [str(driver), str(tmp_path), str(pause), *_argv(output), "--batch-size", "2", *extra]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)


@pytest.mark.slow
def test_a_signal_to_one_rank_checkpoints_every_rank_and_resume_is_exact(tmp_path):
    """Only rank 1 is signalled: rank 0 learns it at the step's end, both write their parts of one
    checkpoint, and resuming under the same launch gives the uninterrupted launch's weights."""
    reference = _launch(tmp_path, tmp_path / "reference", 0.0)
    _, err = reference.communicate(timeout=600)
    assert reference.returncode == 0, err[-3000:]

    out = tmp_path / "run"
    proc = _launch(tmp_path, out, 0.2)
    target = random.randint(3, 15)
    deadline = time.time() + 300
    while _logged_steps(out) < target and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(int((tmp_path / "pid1").read_text()), signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0, err[-3000:]
    found = re.findall(rf"neftune: stopped by SIGTERM after step (\d+) of {STEPS}: checkpoint (\S+) written", err)
    assert found, err[-3000:]
    stopped = re.findall(r"neftune: stopped by a signal to another process after step (\d+)", err)
    assert stopped == [found[0][0]], err[-3000:]  # rank 0 stopped at the same step, unsignalled
    checkpoint = Path(found[0][1])
    assert checkpoint_problem(checkpoint) is None
    manifest = json.loads((checkpoint / "neftune-checkpoint.json").read_text())
    assert manifest["world_size"] == 2 and {"rng_state_0.pth", "rng_state_1.pth"} <= manifest["files"].keys()

    resumed = _launch(tmp_path, out, 0.0, "--resume")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert f"resuming from {checkpoint}" in err
    where = f"rank 1 signalled after step {found[0][0]}"
    assert_bit_equal(weights(tmp_path / "reference" / "model"), weights(out / "model"), where)
