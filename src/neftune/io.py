"""File-system writes every stage shares: atomic files and directories, output-dir checks, locks.

One implementation of each, so that "a crash never leaves half a file" holds everywhere:

* :func:`atomic_write_bytes` / :func:`atomic_write_text` / :func:`atomic_write_json` write a sibling
  temporary file and ``os.replace`` it over the target; a reader sees the old file or the new one.
* :func:`atomic_save_dir` does the same for a directory written by a callback (a saved model);
  :func:`replace_dir` is its last step, for a directory written elsewhere (a training checkpoint).
* :func:`check_output_dir` / :func:`check_output_file` fail before any expensive work if a directory
  or file cannot be written.
* :func:`file_lock` is an inter-process lock (``filelock``) around work two processes must not
  do at once, such as filling the same cache entry.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock

from neftune.errors import ConfigError

__all__ = [
    "atomic_save_dir",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "check_output_dir",
    "check_output_file",
    "file_lock",
    "not_a_regular_file",
    "replace_dir",
]


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644) -> Path:
    """Write ``data`` to ``path`` through a sibling temporary file and a rename.

    Parent directories are created. The file gets permission ``mode`` (``mkstemp`` would leave
    0600, and reports and outputs are meant to be shared). Returns the path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError) and error.filename is None:
            error.filename = str(path)  # a full disk is reported by write(), which names no file
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2, **kwargs: Any) -> Path:
    """:func:`atomic_write_text` of ``json.dumps(obj)`` (UTF-8, not ASCII-escaped) plus a newline."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, **kwargs) + "\n")


def atomic_save_dir(target: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """Write a directory via ``write(tmp_dir)`` next to ``target``, then swap it into place.

    A crash or a full disk during ``write`` leaves any previous ``target`` untouched and removes the
    partial temporary directory.
    """
    target = Path(target)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def replace_dir(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> Path:
    """Rename the finished directory ``source`` to ``target`` (a sibling), replacing any ``target``.

    A previous ``target`` is moved aside first and put back if the rename fails, so ``target`` is
    the old directory or the new one, never a mixture; the old one is deleted afterwards.
    """
    target = Path(target)
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    try:
        if target.exists():
            os.replace(target, old)
        os.replace(source, target)
    except BaseException:
        if old.exists() and not target.exists():
            os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return target


def not_a_regular_file(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` cannot be read as an input file, as words to follow its name, or ``None``.

    Reading a named pipe blocks until a writer comes and a device such as ``/dev/zero`` never ends,
    so readers check this before opening: ``"does not exist"``, ``"is a directory"``, ``"is a named
    pipe (FIFO), not a regular file"`` and so on.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "does not exist"
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a directory"
    kinds = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"))
    kind = next((name for test, name in kinds if test(mode)), "a socket or other special file")
    return f"is {kind}, not a regular file"


def check_output_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` if needed and prove it writable; :class:`ConfigError` naming it otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output {path} exists and is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{uuid.uuid4().hex}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"output directory {path} is not writable ({e.strerror or e})") from None
    return path


def check_output_file(path: str | os.PathLike[str]) -> Path:
    """Fail early, with :class:`ConfigError` naming ``path``, unless a file can be written there.

    Refuses a directory, a device or a pipe in its place (an atomic write would replace the device
    node) and a parent directory that cannot be created or written.  Creates the parent directory.
    """
    path = Path(path)
    if path.exists() and not path.is_file():
        raise ConfigError(f"output file {path} {not_a_regular_file(path)}")
    try:
        check_output_dir(path.parent)
    except ConfigError as e:
        raise ConfigError(f"cannot write output file {path}: {e}") from None
    return path


@contextmanager
def file_lock(path: str | os.PathLike[str], timeout: float = -1) -> Iterator[None]:
    """Hold an exclusive inter-process lock on the lock file ``path`` (created if missing).

    ``timeout`` seconds to wait (-1: forever); ``filelock.Timeout`` when it runs out.
    """
    with FileLock(os.fspath(path), timeout=timeout):
        yield
