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
* :func:`build_once` builds a cache entry (a converted model, prepared data) once, atomically,
  under that lock, in :func:`cache_root`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
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
    "build_once",
    "cache_root",
    "check_output_dir",
    "check_output_file",
    "file_lock",
    "not_a_regular_file",
    "replace_dir",
    "sha256_files",
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


def cache_root() -> Path:
    """The neftune cache directory: ``$NEFTUNE_CACHE``, else ``$XDG_CACHE_HOME/neftune``, else
    ``~/.cache/neftune``.  Converted models live under ``models/``, prepared data under ``data/``.
    It is not created here."""
    explicit = os.environ.get("NEFTUNE_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "neftune"


_WHOLE_FILE_LIMIT = 4 << 30  # files above this size are identified by name, size and mtime


def sha256_files(paths: Iterable[Path]) -> str:
    """A short hash of the names and bytes of ``paths`` (order-independent).

    Files over 4 GiB are identified by size and modification time instead of their bytes.
    """
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode())
        info = path.stat()
        if info.st_size > _WHOLE_FILE_LIMIT:
            digest.update(f"{info.st_size}:{info.st_mtime_ns}".encode())
            continue
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()[:32]


def build_once(
    root: Path,
    name: str,
    build: Callable[[Path], object],
    *,
    marker: str,
    describe: Callable[[float], dict[str, Any]],
    error: Callable[[str], Exception],
) -> tuple[Path, bool]:
    """``root/name``, built by ``build(tmp)`` first if it is not complete; return it and whether it was built.

    An entry is complete exactly when its ``marker`` file exists: ``describe(seconds)`` is written
    there last, inside a temporary sibling directory that is then renamed into place in one step, so
    a process killed at any moment (even ``kill -9``) leaves no entry that looks complete.  A lock
    file keeps two processes from building the same entry at once; debris of a killed build is
    removed by the next one.  Failures become ``error(message)``.
    """
    final = root / name
    if (final / marker).is_file():
        return final, False
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise error(
            f"cannot create the cache {root}: {_first_line(err)} (set NEFTUNE_CACHE to a writable directory)"
        ) from err
    try:
        with file_lock(root / f".{name}.lock"):
            if (final / marker).is_file():
                return final, False
            # Holding the lock, nobody else is writing this entry: whatever is here is debris.
            shutil.rmtree(final, ignore_errors=True)
            for stale in root.glob(f".tmp-{name}-*"):
                shutil.rmtree(stale, ignore_errors=True)
            started = time.perf_counter()
            # mkdir rather than mkdtemp: the entry gets the umask's permissions, not 0700, so a cache
            # shared through NEFTUNE_CACHE stays readable by the group.
            tmp = root / f".tmp-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                tmp.mkdir()
                build(tmp)
                info = describe(time.perf_counter() - started)
                (tmp / marker).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
                os.rename(tmp, final)
            except OSError as err:
                shutil.rmtree(tmp, ignore_errors=True)
                raise error(f"cannot write the cache entry {final}: {_first_line(err)}") from err
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    except OSError as err:  # the lock file itself; the steps inside raise error(...)
        raise error(f"cannot lock the cache entry {final}: {_first_line(err)}") from err
    return final, True


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."
