"""A full disk or exhausted memory, told as one line that says what to change.

The libraries underneath report these in their own words: ``OSError(ENOSPC)`` from Python, a
``RuntimeError`` about an "unexpected pos" from ``torch.save``'s zip writer, a ``SafetensorError``
quoting "os error 28", ``torch.OutOfMemoryError`` on CUDA and "DefaultCPUAllocator: can't allocate
memory" on the host.  :func:`explain` recognises them and returns a :class:`ResourceError`:

* a full disk names the path being written, the file system holding it and its free space
  (:func:`shutil.disk_usage`);
* out-of-memory names the settings that set memory use and their values in force (for training:
  ``train.batch_size``, ``data.max_length``, ``train.gradient_checkpointing``), with what to lower.

:func:`explain_training` adds, for ``neftune train``, which checkpoint a ``--resume`` would start from.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neftune.errors import NeftuneError

if TYPE_CHECKING:
    from neftune.eval_plan import EvalPlan

__all__ = [
    "ResourceError",
    "disk_space",
    "explain",
    "explain_training",
    "is_disk_full",
    "is_out_of_memory",
    "resume_hint",
    "told_out_of_memory",
]

_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_DISK_FULL_TEXT = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122")
# torch.save's zip writer reports a failed write as an internal assertion, without the errno
_TORCH_WRITER_TEXT = ("inline_container.cc", "pytorchstreamwriter failed", "file write failed")
_OOM_TEXT = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory")


class ResourceError(NeftuneError):
    """The machine ran out of disk space or memory; the message says where and what to change."""

    elide = False  # the command line prints it whole: the paths and numbers are the point


def _text(error: BaseException) -> str:
    return " ".join(str(error).split()).lower()


def is_disk_full(error: BaseException) -> bool:
    """True when ``error`` says a write failed for want of space (or quota), whoever raised it."""
    if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
        return True
    text = _text(error)
    return any(t in text for t in _DISK_FULL_TEXT) or (
        isinstance(error, RuntimeError) and any(t in text for t in _TORCH_WRITER_TEXT)
    )


def is_out_of_memory(error: BaseException) -> bool:
    """True for host or accelerator out-of-memory, in the forms torch and Python raise it."""
    import torch

    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(error, RuntimeError) and any(t in _text(error) for t in _OOM_TEXT)


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def disk_space(path: str | os.PathLike[str]) -> str:
    """``"<free> free of <total> on <mount point>"`` for the file system that holds ``path``."""
    where = Path(os.path.abspath(path))
    while not where.exists() and where != where.parent:
        where = where.parent
    mount = where
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    try:
        usage = shutil.disk_usage(where)
    except OSError:
        return f"free space unknown on {mount}"
    return f"{_size(usage.free)} free of {_size(usage.total)} on {mount}"


def _memory_line(error: BaseException, settings: Sequence[tuple[str, Any]], advice: str) -> str:
    import torch

    where = "GPU" if isinstance(error, torch.OutOfMemoryError) or "cuda" in _text(error) else "host"
    values = ", ".join(f"{key}={value}" for key, value in settings)
    line = f"out of {where} memory"
    line += f" with {values}" if values else ""
    return line + (f"; {advice}" if advice else "")


def explain(
    error: BaseException,
    path: str | os.PathLike[str] | None = None,
    *,
    settings: Sequence[tuple[str, Any]] = (),
    advice: str = "",
    after: str = "",
) -> ResourceError | None:
    """A :class:`ResourceError` telling ``error`` in one line, or None when it is not about resources.

    ``path`` is what was being written (else the error's own file name); ``settings`` the
    ``(key, value)`` pairs that set memory use and ``advice`` what to lower; ``after`` is appended.
    """
    tail = f"; {after}" if after else ""
    if isinstance(error, NeftuneError):  # already told in one line
        return None
    if is_disk_full(error):
        where = path if path is not None else getattr(error, "filename", None)
        if where is None:
            line = f"a write failed: No space left on device ({disk_space(os.getcwd())}, the current directory)"
        else:
            line = f"writing {where} failed: No space left on device ({disk_space(where)})"
        explained = ResourceError(line + tail)
    elif is_out_of_memory(error):
        explained = ResourceError(_memory_line(error, settings, advice) + tail)
    else:
        return None
    explained.__cause__ = error
    return explained


def training_memory(cfg: Any, gradient_checkpointing: bool) -> tuple[list[tuple[str, Any]], str]:
    """The training settings that set memory use, with their values in force, and what to lower."""
    settings: list[tuple[str, Any]] = [
        ("train.batch_size", cfg.train.batch_size),
        ("data.max_length", cfg.data.max_length),
        ("train.gradient_checkpointing", str(gradient_checkpointing).lower()),
    ]
    if cfg.data.packing:
        settings.append(("data.packing", "true"))
    advice = "lower train.batch_size (a larger train.grad_accum keeps the examples per step) or data.max_length"
    if not gradient_checkpointing:
        advice += ", or set train.gradient_checkpointing=true"
    return settings, advice


def resume_hint(checkpoints: Path, remedy: str = "free space and rerun") -> str:
    """What ``--resume`` would continue from after a failure, in words for the end of an error line."""
    from neftune.checkpoints import last_complete_checkpoint

    last = last_complete_checkpoint(checkpoints, tidy=False)
    if last is None:
        return "no checkpoint had been completed"
    return f"the last complete checkpoint {last} is intact: {remedy} with --resume"


def explain_training(error: BaseException, cfg: Any, out: Path, gradient_checkpointing: bool) -> ResourceError | None:
    """:func:`explain` for ``neftune train``: what to lower, or which checkpoint ``--resume`` continues from.

    Another file-system error (a read-only or vanished output directory) is told with the same hint.
    """
    if isinstance(error, NeftuneError):
        return None
    written = getattr(error, "filename", None) or out
    if is_disk_full(error):
        return explain(error, written, after=resume_hint(out / "checkpoints"))
    if isinstance(error, OSError) and error.errno is not None:
        hint = resume_hint(out / "checkpoints", "rerun")
        explained = ResourceError(f"{written}: {error.strerror or error}; {hint}")
        explained.__cause__ = error
        return explained
    settings, advice = training_memory(cfg, gradient_checkpointing)
    return explain(error, settings=settings, advice=advice)


def evaluation_memory(plan: EvalPlan) -> tuple[list[tuple[str, Any]], str]:
    """``compare``'s evaluation settings that set memory use (answers, held-out loss), and what to lower."""
    settings: list[tuple[str, Any]] = [
        ("generate.batch_size", plan.batch_size),
        ("generate.max_new_tokens", plan.max_new_tokens),
        ("data.max_length", plan.max_length),
    ]
    return settings, "lower generate.batch_size, generate.max_new_tokens or data.max_length"


@contextmanager
def told_out_of_memory(settings: Sequence[tuple[str, Any]], advice: str) -> Iterator[None]:
    """Within the block, out-of-memory becomes a :class:`ResourceError` naming ``settings`` and ``advice``."""
    try:
        yield
    except Exception as error:
        explained = explain(error, settings=settings, advice=advice) if is_out_of_memory(error) else None
        if explained is None:
            raise
        raise explained from error
