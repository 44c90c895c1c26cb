"""Training checkpoints that are whole or absent, and the choice of the one to resume from.

transformers' ``Trainer`` writes ``checkpoint-N`` file by file in place: a kill or a full disk
halfway leaves a folder that looks like a checkpoint but holds a truncated ``optimizer.pt``.  Here:

* :class:`AtomicCheckpoints` (a ``Trainer`` mixin) has every rank write its part of ``checkpoint-N``
  inside a temporary sibling, ``.partial-checkpoint-N/checkpoint-N``.  When every rank has finished
  (the ranks agree through an all-reduce, so one rank's failure fails them all), the main process
  records each file and its size in ``neftune-checkpoint.json``, flushes them to disk and renames the
  folder into place.  A ``checkpoint-N`` therefore appears whole, with every rank's shards, or not at
  all.
* :func:`checkpoint_problem` says why a checkpoint cannot be resumed from: a file missing or of
  another size than its manifest records; for checkpoints written before the manifest (or by plain
  transformers), an unreadable ``trainer_state.json`` or a cut-off ``.pt`` / ``.safetensors`` file.
* :func:`last_complete_checkpoint` is the newest checkpoint without a problem; each newer one it
  passes over is named in a warning with the reason, and ``.partial-*`` leftovers of an interrupted
  save are removed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import zipfile
from pathlib import Path
from typing import Any

from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from neftune.errors import NeftuneError
from neftune.io import replace_dir

__all__ = [
    "MANIFEST",
    "PARTIAL_PREFIX",
    "AtomicCheckpoints",
    "checkpoint_problem",
    "last_complete_checkpoint",
    "write_manifest",
]

log = logging.getLogger("neftune")

#: The file, inside a checkpoint, that lists every other file of it with its size.
MANIFEST = "neftune-checkpoint.json"
#: Prefix of the temporary sibling a checkpoint is written into before it is renamed into place.
PARTIAL_PREFIX = ".partial-"
MANIFEST_FORMAT = 1


def _files(directory: Path) -> dict[str, int]:
    return {
        p.relative_to(directory).as_posix(): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(directory: Path, step: int, world_size: int) -> dict[str, Any]:
    """Record every file of the checkpoint ``directory`` and its size in :data:`MANIFEST`, after
    flushing each file (and the manifest) to disk; return the manifest."""
    files = _files(directory)
    for name in files:
        _fsync(directory / name)
    manifest = {"format": MANIFEST_FORMAT, "step": step, "world_size": world_size, "files": files}
    path = directory / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    _fsync(path)
    return manifest


def _cut_off(path: Path) -> str | None:
    """Why a weight or state file is cut short, judged by its own structure, or None.

    ``torch.save`` writes a zip archive whose directory sits at the end, and a ``.safetensors`` file
    announces its length in its header: a file truncated anywhere fails one of these checks.
    """
    size = path.stat().st_size
    if path.suffix in (".pt", ".pth", ".bin"):
        return None if zipfile.is_zipfile(path) else f"{path.name} ({size:,} bytes) is not a complete torch file"
    if path.suffix == ".safetensors":
        try:
            with path.open("rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(length)) if length < size else None
            ends = [v["data_offsets"][1] for k, v in (header or {}).items() if k != "__metadata__"]
            expected = 8 + length + max(ends, default=0)
        except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error):
            return f"{path.name} ({size:,} bytes) has no readable safetensors header"
        if header is None or expected != size:
            return f"{path.name} is {size:,} bytes, its header describes {expected:,}"
    return None


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint folder ``path`` cannot be resumed from, in a few words, or None if it can."""
    manifest_path = path / MANIFEST
    if manifest_path.exists():
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            files = {str(k): int(v) for k, v in manifest["files"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return f"its {MANIFEST} is unreadable"
        for name, size in files.items():
            file = path / name
            if not file.is_file():
                return f"{name} is missing"
            actual = file.stat().st_size
            if actual != size:
                return f"{name} is {actual:,} bytes, {size:,} were written"
    else:  # written before checkpoints had a manifest, or by plain transformers
        try:
            json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            return "trainer_state.json is missing"
        except (OSError, ValueError):
            return "trainer_state.json is unreadable"
        files = _files(path)
    for name in files:
        problem = _cut_off(path / name)
        if problem is not None:
            return problem
    return None


def _step(path: Path) -> int | None:
    suffix = path.name[len(PREFIX_CHECKPOINT_DIR) + 1 :]
    return int(suffix) if path.name.startswith(f"{PREFIX_CHECKPOINT_DIR}-") and suffix.isdigit() else None


def last_complete_checkpoint(directory: Path, *, tidy: bool = True) -> Path | None:
    """The newest ``checkpoint-N`` in ``directory`` that :func:`checkpoint_problem` finds whole.

    Every newer checkpoint passed over is named in a warning with its reason; with ``tidy`` (the
    process that writes files), temporary ``.partial-*`` folders of an interrupted save are removed.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    for leftover in sorted(directory.glob(f"{PARTIAL_PREFIX}*")):
        if tidy and leftover.is_dir():
            log.warning("removing %s: a checkpoint whose writing was interrupted", leftover)
            shutil.rmtree(leftover, ignore_errors=True)
    found = [(step, p) for p in directory.iterdir() if p.is_dir() and (step := _step(p)) is not None]
    for _, path in sorted(found, reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        if tidy:
            log.warning("skipping incomplete checkpoint %s: %s", path, problem)
    return None


def _all_succeeded(trainer: Trainer, ok: bool) -> bool:
    """True when every rank passes ``ok=True`` (every rank must call this: it is a collective)."""
    import torch

    if trainer.accelerator.num_processes <= 1:
        return ok
    flag = torch.tensor([0.0 if ok else 1.0], device=trainer.args.device)
    return bool(trainer.accelerator.reduce(flag, reduction="sum").item() == 0)


class AtomicCheckpoints(Trainer):
    """``Trainer`` whose checkpoints appear whole (every rank's files and a manifest) or not at all.

    Each rank writes into ``.partial-checkpoint-N/checkpoint-N``; after every rank has finished,
    the main process writes :data:`MANIFEST` and renames the folder to ``checkpoint-N`` (replacing
    a stale one of the same step), then applies ``save_total_limit``.  A failure on any rank removes
    the temporary folder and raises on every rank, leaving earlier checkpoints untouched.
    """

    _staging: Path | None = None

    def _get_output_dir(self, trial: Any) -> str:
        return str(self._staging) if self._staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        from neftune.resources import explain, resume_hint

        run_dir = Path(super()._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging, target = run_dir / f"{PARTIAL_PREFIX}{name}", run_dir / name
        main = self.args.should_save
        if main:  # left by a save that was killed: its files must not mix with this one's
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        failure: BaseException | None = None
        self._staging = staging
        try:
            super()._save_checkpoint(model, trial)  # rotates nothing: the temporary folder holds one
        except Exception as error:
            failure = error
        finally:
            self._staging = None
        if _all_succeeded(self, failure is None) and main:
            try:
                write_manifest(staging / name, self.state.global_step, self.args.world_size)
                replace_dir(staging / name, target)
            except OSError as error:
                failure = error
        succeeded = _all_succeeded(self, failure is None)  # the rename is seen by every rank, or none goes on
        if main:
            shutil.rmtree(staging, ignore_errors=True)
        if not succeeded:
            if failure is None:
                raise NeftuneError(f"another process failed while writing {target}; no checkpoint was written")
            raise explain(failure, target, after=resume_hint(run_dir)) or failure
        if main:
            rotate_checkpoints(
                output_dir=str(run_dir),
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
