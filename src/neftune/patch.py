"""Make transformers' own ``neftune_noise_alpha`` add per-example NEFTune noise.

    import neftune
    neftune.patch_transformers()      # from now on TrainingArguments(neftune_noise_alpha=5) is per-example
    neftune.unpatch_transformers()    # the original functions, exactly

    neftune run -- trl sft --config sft.yaml   # the same in every Python process of an unmodified CLI

transformers' hook scales the noise by the padded or packed *row* length (see the README).  TRL,
Axolotl and LLaMA-Factory turn it on through ``Trainer``, so replacing the two places where
``Trainer`` switches its hook on and off fixes all of them: the replacement calls
:func:`neftune.attach` with the same alpha and the Trainer's ``args.seed``, keys the noise to the
optimizer step like :class:`~neftune.callback.NEFTuneCallback` (the two draw identical noise), and
removes the hooks where transformers removed its own.

Hook points, by transformers release (the supported range is ``SUPPORTED``):

* ``Trainer._activate_neftune(self, model)`` / ``Trainer._deactivate_neftune(self, model)``
  (5.0.0 has these);
* ``transformers.trainer.activate_neftune`` / ``deactivate_neftune``, module functions that
  ``Trainer`` calls by their global name (5.24.0), also replaced in
  ``transformers.integrations.neftune`` for code that calls them from there.

A transformers without either raises :class:`~neftune.errors.NeftuneError` rather than leaving the
row-length noise in place unnoticed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neftune.errors import NeftuneError
from neftune.settings import Command, setting

SUPPORTED = ">=5.0,<6"
"""transformers versions whose NEFTune hook point this module knows (as declared in pyproject)."""

BOOT_DIR = Path(__file__).resolve().parent / "_boot"
"""Directory holding the ``sitecustomize.py`` that ``neftune run`` puts first on ``PYTHONPATH``."""

# (owner, attribute) -> the object found there before patching; empty while unpatched
_ORIGINALS: dict[tuple[Any, str], Any] = {}
# live NEFTuneHandle -> (trainer, the callback keeping its noise keyed to the optimizer step)
_LIVE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_ANNOUNCED = False


def patch_transformers(*, quiet: bool = False) -> None:
    """Replace transformers' row-length NEFTune hook with :func:`neftune.attach` (idempotent).

    Any ``Trainer`` (or subclass: TRL's ``SFTTrainer``, ...) whose ``args.neftune_noise_alpha``
    is set then adds per-example noise with that alpha: padded rows exclude the padding, and
    padding-free packed rows scale every example by its own length.  The first call in a process
    writes one line to stderr saying so, unless ``quiet``.

    Raises:
        NeftuneError: the installed transformers has none of the hook points this module knows.
    """
    import transformers.trainer as trainer_module

    if _ORIGINALS:
        return
    replacements = _hook_points(trainer_module)
    for owner, name, _ in replacements:
        _ORIGINALS[(owner, name)] = vars(owner)[name]
    for owner, name, replacement in replacements:
        setattr(owner, name, replacement)
    if not quiet:
        _announce()


def unpatch_transformers() -> None:
    """Put back exactly the objects :func:`patch_transformers` replaced (a no-op when unpatched).

    Hooks already attached by a running ``Trainer`` stay until that Trainer removes them.
    """
    while _ORIGINALS:
        (owner, name), original = _ORIGINALS.popitem()
        setattr(owner, name, original)


def is_patched() -> bool:
    """True between :func:`patch_transformers` and :func:`unpatch_transformers`."""
    return bool(_ORIGINALS)


def _hook_points(trainer_module: Any) -> list[tuple[Any, str, Any]]:
    """``(owner, attribute, replacement)`` for the installed transformers, or raise NeftuneError."""
    trainer_cls = trainer_module.Trainer
    methods = ("_activate_neftune", "_deactivate_neftune")
    if all(callable(vars(trainer_cls).get(name)) for name in methods):
        activate, deactivate = _method_pair(vars(trainer_cls)["_deactivate_neftune"])
        return [(trainer_cls, methods[0], activate), (trainer_cls, methods[1], deactivate)]
    functions = ("activate_neftune", "deactivate_neftune")
    if all(callable(vars(trainer_module).get(name)) for name in functions) and _calls_global(trainer_cls, functions[0]):
        points = []
        owners = [trainer_module]
        integration = sys.modules.get("transformers.integrations.neftune")
        if integration is not None and all(callable(vars(integration).get(name)) for name in functions):
            owners.append(integration)
        for owner in owners:
            activate, deactivate = _function_pair(vars(owner)["deactivate_neftune"])
            points += [(owner, functions[0], activate), (owner, functions[1], deactivate)]
        return points
    raise NeftuneError(
        f"transformers {_version()} has no NEFTune hook point neftune can replace (neither "
        "Trainer._activate_neftune nor a transformers.trainer.activate_neftune that Trainer calls); "
        f"neftune.patch_transformers supports transformers{SUPPORTED}"
    )


def _calls_global(cls: type, name: str) -> bool:
    """True if a function defined in ``cls`` refers to the module global ``name``."""
    return any(name in getattr(getattr(f, "__code__", None), "co_names", ()) for f in vars(cls).values())


def _method_pair(original_deactivate: Callable) -> tuple[Callable, Callable]:
    """Replacements for ``Trainer._activate_neftune`` / ``_deactivate_neftune`` (methods)."""

    def _activate_neftune(self: Any, model: Any) -> Any:
        self.neftune_hook_handle = _attach_for(self, model, self.neftune_noise_alpha)
        return model

    def _deactivate_neftune(self: Any, model: Any) -> None:
        if not _detach(getattr(self, "neftune_hook_handle", None)):
            original_deactivate(self, model)  # a hook transformers attached before the patch

    return _activate_neftune, _deactivate_neftune


def _function_pair(original_deactivate: Callable) -> tuple[Callable, Callable]:
    """Replacements for ``activate_neftune`` / ``deactivate_neftune`` (module functions)."""

    def activate_neftune(model: Any, neftune_noise_alpha: float, accelerator: Any = None) -> Any:
        return _attach_for(_calling_trainer(), model, neftune_noise_alpha, accelerator)

    def deactivate_neftune(model: Any, hook_handle: Any, accelerator: Any = None) -> None:
        if not _detach(hook_handle):
            original_deactivate(model, hook_handle, accelerator)

    return activate_neftune, deactivate_neftune


def _calling_trainer() -> Any:
    """The Trainer whose method is calling the hook point (the nearest on the call stack), or None."""
    from transformers import Trainer

    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back  # type: ignore[assignment]
    return None


def _attach_for(trainer: Any, model: Any, alpha: float, accelerator: Any = None) -> Any:
    """:func:`neftune.attach` as ``NEFTuneCallback`` would: the Trainer's seed, noise keyed to its steps."""
    from neftune.attach import attach, unwrap_model

    accelerator = accelerator if accelerator is not None else getattr(trainer, "accelerator", None)
    if accelerator is not None:
        model = accelerator.unwrap_model(model)
    for stale in [h for h in list(_LIVE) if h.root is unwrap_model(model)]:
        _detach(stale)  # left by a train() that raised: transformers would stack a second hook here
    args = getattr(trainer, "args", None)
    handle = attach(model, alpha, seed=getattr(args, "seed", None))
    if trainer is not None:
        sync = _step_callback(handle)
        trainer.add_callback(sync)
        handle.set_step(trainer.state.global_step)
        _LIVE[handle] = (trainer, sync)
    return handle


def _detach(handle: Any) -> bool:
    """Remove a handle made by :func:`_attach_for` and its step callback; False for any other object."""
    from neftune.attach import NEFTuneHandle

    if not isinstance(handle, NEFTuneHandle):
        return False
    handle.remove()
    trainer, sync = _LIVE.pop(handle, (None, None))
    if trainer is not None:
        trainer.pop_callback(sync)  # no error if the user already took it off
    return True


def _step_callback(handle: Any) -> Any:
    """A TrainerCallback that keys ``handle``'s noise to the optimizer step, as NEFTuneCallback does."""
    from transformers import TrainerCallback

    class NEFTuneStepCallback(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            handle.set_step(state.global_step)

    return NEFTuneStepCallback()


def _version() -> str:
    import transformers

    return getattr(transformers, "__version__", "?")


def _announce() -> None:
    global _ANNOUNCED
    if _ANNOUNCED:
        return
    _ANNOUNCED = True
    print(
        f"neftune: per-example NEFTune active (pid {os.getpid()}): transformers {_version()} "
        "Trainer's neftune_noise_alpha now scales the noise by each example's own length",
        file=sys.stderr,
        flush=True,
    )


# -- neftune run -----------------------------------------------------------------------------


def patched_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``environ`` whose ``PYTHONPATH`` starts with :data:`BOOT_DIR` (once)."""
    env = dict(environ)
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != BOOT_DIR]
    env["PYTHONPATH"] = os.pathsep.join([str(BOOT_DIR), *parts])
    return env


def run_command(command: Sequence[str]) -> int:
    """Run ``command`` with :func:`patch_transformers` applied in every Python process it starts.

    On POSIX the current process becomes the command (``exec``), so its exit status and every
    signal sent to ``neftune run`` are the command's own.  Elsewhere the command runs as a child
    whose exit status is returned.

    Raises:
        NeftuneError: no command, or the command is not found.
    """
    command = list(command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise NeftuneError("neftune run needs a command after --, e.g. neftune run -- trl sft --config sft.yaml")
    executable = shutil.which(command[0])
    if executable is None:
        raise NeftuneError(f"neftune run: command not found: {command[0]}")
    if not (BOOT_DIR / "sitecustomize.py").is_file():
        raise NeftuneError(f"neftune run: {BOOT_DIR / 'sitecustomize.py'} is missing; reinstall neftune")
    env = patched_environment(os.environ)
    sys.stdout.flush()
    sys.stderr.flush()
    if os.name == "posix":
        os.execve(executable, command, env)
    return subprocess.call([executable, *command[1:]], env=env)


@dataclass
class RunSettings:
    """``neftune run``'s one setting: the command to run."""

    command: list[str] = setting(
        [], "the command and its arguments, after --", flag="command", nargs=argparse.REMAINDER
    )


def cmd_run(cfg: RunSettings) -> int:
    """Run :func:`run_command` with the parsed command."""
    return run_command(cfg.command)


RUN = Command(
    "run",
    RunSettings,
    cmd_run,
    help="run a training CLI (trl, accelerate, llamafactory-cli, ...) with per-example NEFTune",
    description="Run COMMAND with neftune.patch_transformers() applied in every Python process it starts: "
    "its Trainer's neftune_noise_alpha then adds per-example noise. Example: neftune run -- trl sft --config sft.yaml",
    usage="%(prog)s -- COMMAND [ARG ...]",
)
"""``neftune run``, as :mod:`neftune.cli` registers it."""
