"""Checkpoints appear whole or not at all; ``--resume`` takes the newest whole one and says what it skipped."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from neftune.checkpoints import MANIFEST, checkpoint_problem, last_complete_checkpoint
from neftune.config import Config, load_config
from neftune.train import run_training


@pytest.fixture(autouse=True)
def _cache(neftune_cache, monkeypatch):
    monkeypatch.setenv("NEFTUNE_CACHE", str(neftune_cache))


def small_config(output: Path, *extra: str) -> Config:
    overrides = [
        "model.name=tiny-random",
        "model.lora=false",
        "noise.alpha=5",
        f"train.output={output}",
        "train.max_steps=9",
        "train.batch_size=4",
        "train.save_steps=3",
        "train.save_total_limit=3",
        "train.eval_steps=100",
        "train.logging_steps=1",
        "train.progress=false",
        "data.limit=64",
        *extra,
    ]
    return load_config(Config, None, overrides)


@pytest.fixture(scope="module")
def reference(neftune_cache, tmp_path_factory) -> dict[str, torch.Tensor]:
    """Final weights of the uninterrupted 9-step run."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NEFTUNE_CACHE", str(neftune_cache))
        out = tmp_path_factory.mktemp("reference")
        run_training(small_config(out))
    return load_file(out / "model" / "model.safetensors")


def assert_bit_equal(model_dir: Path, reference: dict[str, torch.Tensor]) -> None:
    weights = load_file(model_dir / "model.safetensors")
    assert weights.keys() == reference.keys()
    for name, value in reference.items():
        assert torch.equal(weights[name], value), name


class Killed(Exception):
    pass


class KillAfter(TrainerCallback):
    """Raise when step ``step`` + 1 begins, like a process killed after checkpoint-``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Killed(f"killed after step {self.step}")


def stopped_after_six(output: Path) -> None:
    with pytest.raises(Killed):
        run_training(small_config(output), extra_callbacks=[KillAfter(6)])


def test_each_checkpoint_is_whole_with_a_manifest_and_nothing_temporary_is_left(tmp_path):
    run_training(small_config(tmp_path))
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-3", "checkpoint-6", "checkpoint-9"]
    for path in checkpoints.iterdir():
        manifest = json.loads((path / MANIFEST).read_text())
        assert manifest["step"] == int(path.name.split("-")[1]) and manifest["world_size"] == 1
        on_disk = {p.name: p.stat().st_size for p in path.iterdir() if p.name != MANIFEST}
        assert manifest["files"] == on_disk
        assert {"optimizer.pt", "model.safetensors", "trainer_state.json", "rng_state.pth"} <= on_disk.keys()
        assert checkpoint_problem(path) is None


def test_a_checkpoint_truncated_by_hand_is_skipped_with_a_message_and_resume_is_exact(tmp_path, reference, caplog):
    stopped_after_six(tmp_path)
    newest = tmp_path / "checkpoints" / "checkpoint-6"
    optimizer = newest / "optimizer.pt"
    size = optimizer.stat().st_size
    optimizer.write_bytes(optimizer.read_bytes()[: size // 2])
    (tmp_path / "checkpoints" / ".partial-checkpoint-7" / "checkpoint-7").mkdir(parents=True)  # a killed save

    with caplog.at_level(logging.INFO, logger="neftune"):
        assert last_complete_checkpoint(tmp_path / "checkpoints") == tmp_path / "checkpoints" / "checkpoint-3"
        result = run_training(small_config(tmp_path, "train.resume=true"))
    text = caplog.text
    assert (
        f"skipping incomplete checkpoint {newest}: optimizer.pt is {size // 2:,} bytes, {size:,} were written" in text
    )
    assert f"removing {tmp_path / 'checkpoints' / '.partial-checkpoint-7'}" in text
    assert f"resuming from {tmp_path / 'checkpoints' / 'checkpoint-3'}" in text
    assert result.loss_curve[0][0] == 4
    assert_bit_equal(tmp_path / "model", reference)
    assert checkpoint_problem(newest) is None  # step 6 was written again, whole
    assert not list((tmp_path / "checkpoints").glob(".partial-*"))


def test_checkpoints_written_before_the_manifest_still_resume(tmp_path, reference, caplog):
    """A checkpoint of plain transformers (no manifest) is judged by its own files."""
    stopped_after_six(tmp_path)
    for path in (tmp_path / "checkpoints").iterdir():
        (path / MANIFEST).unlink()
    newest = tmp_path / "checkpoints" / "checkpoint-6"
    assert checkpoint_problem(newest) is None
    weights = newest / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[:-100])
    assert (
        checkpoint_problem(newest)
        == f"model.safetensors is {len(whole) - 100:,} bytes, its header describes {len(whole):,}"
    )
    weights.write_bytes(whole)
    optimizer = newest / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:-10])
    assert "optimizer.pt" in checkpoint_problem(newest) and "not a complete torch file" in checkpoint_problem(newest)
    (tmp_path / "checkpoints" / "checkpoint-3" / "trainer_state.json").write_text('{"global_step": ')
    assert checkpoint_problem(tmp_path / "checkpoints" / "checkpoint-3") == "trainer_state.json is unreadable"

    with caplog.at_level(logging.INFO, logger="neftune"):
        result = run_training(small_config(tmp_path, "train.resume=true"))
    assert "skipping incomplete checkpoint" in caplog.text and "starting from scratch" in caplog.text
    assert result.loss_curve[0][0] == 1
    assert_bit_equal(tmp_path / "model", reference)


def test_an_intact_legacy_checkpoint_is_resumed_exactly(tmp_path, reference, caplog):
    stopped_after_six(tmp_path)
    for path in (tmp_path / "checkpoints").iterdir():
        (path / MANIFEST).unlink()
    with caplog.at_level(logging.INFO, logger="neftune"):
        run_training(small_config(tmp_path, "train.resume=true"))
    assert f"resuming from {tmp_path / 'checkpoints' / 'checkpoint-6'}" in caplog.text
    assert_bit_equal(tmp_path / "model", reference)
