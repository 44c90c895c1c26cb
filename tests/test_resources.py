"""A full disk names the path and the free space; out-of-memory names the settings to lower.

The disk tests mount a small tmpfs (they need root and ``mount``, and are skipped without them);
the in-process ENOSPC test of tests/test_reliability.py covers machines where that is impossible.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from neftune.checkpoints import checkpoint_problem
from neftune.cli import UNEXPECTED_HINT, main
from neftune.config import Config, load_config
from neftune.resources import ResourceError, explain
from neftune.train import run_training
from neftune.trainer_parts import HeldoutTrainer


@pytest.fixture(autouse=True)
def _cache(neftune_cache, monkeypatch):
    monkeypatch.setenv("NEFTUNE_CACHE", str(neftune_cache))


def _mount(where: Path, size: str) -> None:
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True, capture_output=True)


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """An empty 2.2 MB tmpfs: room for one checkpoint of the tiny model (1.5 MB), not for two."""
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        _mount(disk, "2200k")
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"cannot mount a tmpfs here ({error})")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _train_argv(output: Path) -> list[str]:
    return ["train", "--model", "tiny-random", "--full", "--alpha", "5", "--output", str(output)]


TRAIN_FLAGS = ["--max-steps", "9", "--batch-size", "4", "--no-progress", "data.limit=64", "train.save_steps=3"]
TRAIN_FLAGS += ["train.eval_steps=100"]


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("neftune:")]
    assert len(lines) == 1 and lines[0].startswith("neftune: error: "), err
    assert UNEXPECTED_HINT not in err and "Traceback" not in err
    return lines[0]


def test_a_full_disk_during_a_checkpoint_names_the_disk_and_resume_uses_the_last_complete_one(
    tmp_path, small_disk, capsys
):
    assert main([*_train_argv(tmp_path / "reference"), *TRAIN_FLAGS]) == 0
    out = small_disk / "run"
    assert main([*_train_argv(out), *TRAIN_FLAGS]) == 2
    line = _one_error_line(capsys.readouterr().err)
    checkpoints = out / "checkpoints"
    assert f"writing {checkpoints / 'checkpoint-6'} failed: No space left on device (" in line
    assert (
        f"free of 2.1 MB on {small_disk}); the last complete checkpoint {checkpoints / 'checkpoint-3'} is intact"
        in line
    )
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-3"]  # no partial folder is left
    assert checkpoint_problem(checkpoints / "checkpoint-3") is None

    subprocess.run(["mount", "-o", "remount,size=20m", str(small_disk)], check=True)  # space freed
    assert main([*_train_argv(out), *TRAIN_FLAGS, "--resume"]) == 0
    reference, resumed = (
        load_file(tmp_path / "reference" / "model" / "model.safetensors"),
        load_file(out / "model" / "model.safetensors"),
    )
    assert all(torch.equal(reference[k], resumed[k]) for k in reference) and reference.keys() == resumed.keys()


def test_each_writer_reports_a_full_disk_in_its_own_words_and_each_is_named(small_disk):
    filler = torch.zeros(1_000_000)  # 4 MB
    attempts = {
        "weights.pt": lambda path: torch.save({"w": filler}, path),
        "weights.safetensors": lambda path: save_file({"w": filler}, path),
        "plain.bin": lambda path: path.write_bytes(filler.numpy().tobytes()),
    }
    for name, write in attempts.items():
        path = small_disk / name
        with pytest.raises(Exception) as caught:  # each library raises its own type
            write(path)
        explained = explain(caught.value, path)
        assert isinstance(explained, ResourceError), f"{name}: {caught.value!r}"
        assert str(explained).startswith(f"writing {path} failed: No space left on device (")
        assert f"free of 2.1 MB on {small_disk})" in str(explained)
        path.unlink(missing_ok=True)


def test_a_full_disk_in_any_command_is_one_line_naming_the_file(small_disk, tmp_path, capsys):
    records = [{"instruction": f"q{i}", "output": "x" * (i + 1), "generator": "a"} for i in range(20)]
    (tmp_path / "a.json").write_text(json.dumps(records))
    (tmp_path / "b.json").write_text(json.dumps([{**r, "output": r["output"] * 2, "generator": "b"} for r in records]))
    (small_disk / "filler").write_bytes(b"\0" * (2200 * 1024 - 8192))  # all but two pages
    target = small_disk / "judged.json"
    argv = ["judge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--backend", "length", "--no-progress"]
    assert main([*argv, "--output", str(target), "--cache", str(tmp_path / "cache")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"neftune: error: writing {target} failed: No space left on device (")
    assert f"on {small_disk})" in line


# -- out of memory ------------------------------------------------------------------------------


def _config(output: Path, *extra: str) -> Config:
    overrides = ["model.name=tiny-random", f"train.output={output}", "train.max_steps=4", "train.batch_size=4"]
    return load_config(Config, None, [*overrides, "train.progress=false", "data.limit=32", *extra])


def _failing_step(monkeypatch, error: BaseException) -> None:
    real = HeldoutTrainer.training_step

    def step(self, *args, **kwargs):
        if self.state.global_step == 2:
            raise error
        return real(self, *args, **kwargs)

    monkeypatch.setattr(HeldoutTrainer, "training_step", step)


def test_host_out_of_memory_names_the_settings_to_lower_with_their_values(tmp_path, monkeypatch, capsys):
    try:  # a real refusal of the host allocator
        torch.empty(2**62, dtype=torch.uint8)
    except RuntimeError as error:
        refused = error
    _failing_step(monkeypatch, refused)
    argv = [*_train_argv(tmp_path / "run"), "--max-steps", "4", "--batch-size", "6", "--max-length", "128"]
    assert main([*argv, "--no-progress", "data.limit=32"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line == (
        "neftune: error: out of host memory with train.batch_size=6, data.max_length=128, "
        "train.gradient_checkpointing=false, data.packing=true; lower train.batch_size (a larger train.grad_accum keeps the "
        "examples per step) or data.max_length, or set train.gradient_checkpointing=true"
    )


def test_gpu_out_of_memory_is_told_the_same_way(tmp_path, monkeypatch):
    # the error CUDA's caching allocator raises (no GPU here: the exception is made, not provoked)
    _failing_step(monkeypatch, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"))
    with pytest.raises(ResourceError) as caught:
        run_training(_config(tmp_path / "run", "train.gradient_checkpointing=true", "data.packing=true"))
    assert str(caught.value) == (
        "out of GPU memory with train.batch_size=4, data.max_length=512, train.gradient_checkpointing=true, "
        "data.packing=true; lower train.batch_size (a larger train.grad_accum keeps the examples per step) "
        "or data.max_length"
    )


def _compare_argv(output: Path, *extra: str) -> list[str]:
    argv = ["compare", "--model", "tiny-random", "--alphas", "5", "--seeds", "0", "--max-steps", "2"]
    return [*argv, "--eval-limit", "4", "--no-progress", "--output", str(output), "data.limit=16", *extra]


def test_out_of_memory_while_compare_answers_names_the_generation_settings(tmp_path, monkeypatch, capsys):
    import neftune.generate

    def generate_outputs(*args, **kwargs):
        torch.empty(2**62, dtype=torch.uint8)  # the host allocator refuses

    monkeypatch.setattr(neftune.generate, "generate_outputs", generate_outputs)
    assert main(_compare_argv(tmp_path / "exp", "--max-new-tokens", "7", "--judge", "none")) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line == (
        "neftune: error: out of host memory with generate.batch_size=16, generate.max_new_tokens=7, "
        "data.max_length=512; lower generate.batch_size, generate.max_new_tokens or data.max_length"
    )


def test_another_file_system_error_while_checkpointing_is_one_line_with_the_resume_point(tmp_path, monkeypatch, capsys):
    import errno

    from transformers import Trainer

    real = Trainer._save_optimizer_and_scheduler

    def failing(self, output_dir):
        if self.state.global_step == 6:
            raise OSError(errno.EIO, "Input/output error", str(Path(output_dir) / "optimizer.pt"))
        return real(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", failing)
    out = tmp_path / "run"
    assert main([*_train_argv(out), *TRAIN_FLAGS]) == 2
    line = _one_error_line(capsys.readouterr().err)
    partial = out / "checkpoints" / ".partial-checkpoint-6" / "checkpoint-6" / "optimizer.pt"
    last = out / "checkpoints" / "checkpoint-3"
    assert (
        line
        == f"neftune: error: {partial}: Input/output error; the last complete checkpoint {last} is intact: rerun with --resume"
    )
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-3"]
