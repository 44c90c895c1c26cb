"""Applies ``neftune.patch_transformers()`` in a Python process started under ``neftune run``.

``neftune run -- CMD`` puts this directory first on ``PYTHONPATH``, so every Python process that CMD
starts (the CLI itself, ``accelerate launch`` / ``torchrun`` workers, ...) imports this module at
startup.  Most of those processes never train, and importing transformers takes seconds, so
nothing is imported here: a meta-path finder waits for ``transformers.trainer`` and applies the
patch right after that module has run, before any Trainer exists.  A ``sitecustomize`` that this
one shadows on ``sys.path`` is run afterwards, as Python would have run it.

Only the standard library is used until the patch is applied.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType

_TARGET = "transformers.trainer"
_HERE = os.path.dirname(os.path.abspath(__file__))


def _fail(message: str) -> None:
    # Training on with transformers' row-length noise is what `neftune run` exists to prevent.
    sys.stderr.write(f"neftune: error: {' '.join(message.split())}\n")
    sys.stderr.flush()
    raise SystemExit(2)


def _apply_patch() -> None:
    try:
        from neftune.errors import NeftuneError
        from neftune.patch import patch_transformers
    except ImportError as error:
        _fail(f"neftune run: {sys.executable} cannot import neftune ({error}); install neftune in this environment")
    try:
        patch_transformers()
    except NeftuneError as error:
        _fail(str(error))


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Finds ``transformers.trainer`` with the other finders and runs the patch after its code."""

    def __init__(self) -> None:
        self._finding = False

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname != _TARGET or self._finding:
            return None
        self._finding = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._finding = False
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run_module = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run_module(module)
            sys.meta_path[:] = [f for f in sys.meta_path if f is not self]
            _apply_patch()

        loader.exec_module = exec_module
        return spec


def _run_shadowed_sitecustomize() -> None:
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is not None and spec.loader is not None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


if _TARGET in sys.modules:
    _apply_patch()
else:
    sys.meta_path.insert(0, _PatchAfterImport())
_run_shadowed_sitecustomize()
