"""Preemption: on SIGTERM or SIGUSR1, finish the optimizer step, write a checkpoint, and stop.

Clusters preempt jobs by sending SIGTERM (Kubernetes, SLURM at the end of a job's time) or the
signal a job asked for (SLURM's ``--signal=USR1@120``), then kill them after a grace period.
:class:`PreemptionCallback`, a ``TrainerCallback`` that ``neftune train`` (and ``compare``'s
training) installs for the duration of training:

* the signal handler only records the signal; at the end of the optimizer step in flight every rank
  learns whether any rank was signalled (an all-reduce of the flag, so under ``accelerate launch``
  the ranks stop at the same step even when the signal reached only some of them), and then the
  ``Trainer`` writes ``checkpoint-N`` with every rank taking part (:mod:`neftune.checkpoints`) and
  stops;
* :meth:`PreemptionCallback.raise_if_stopped` then raises :class:`Preempted`, which the command line
  reports as one line naming the checkpoint, with exit status :data:`EXIT_PREEMPTED` (75, "try
  again later"); ``--resume`` continues from that checkpoint exactly as from any other;
* a second signal before that exits at once, with status 128 + the signal's number, writing nothing.

A signal that arrives before the first step of the run stops it before training, with nothing new to
save.  Handlers are installed only in the main thread and put back as they were when training ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from neftune.errors import NeftuneError

__all__ = ["EXIT_PREEMPTED", "SIGNALS", "Preempted", "PreemptionCallback"]

#: Exit status of a run stopped by a signal after writing its checkpoint (``EX_TEMPFAIL`` of sysexits.h).
EXIT_PREEMPTED = 75
#: The signals that ask for a checkpoint and a clean stop.
SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(NeftuneError):
    """Training stopped on a signal; ``checkpoint`` is where ``--resume`` continues (None: before step 1)."""

    exit_status = EXIT_PREEMPTED
    elide = False

    def __init__(self, message: str, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint


def _say(line: str) -> None:
    # straight to file descriptor 2: the handler may interrupt a write to sys.stderr (a progress bar),
    # and writing to that buffered stream again from inside it would raise
    with contextlib.suppress(OSError):  # no stderr: say nothing
        os.write(2, (line + "\n").encode("utf-8", "replace"))


class PreemptionCallback(TrainerCallback):
    """Turns SIGTERM / SIGUSR1 into "checkpoint after this optimizer step, then stop" (module doc).

    Construct it (which installs the handlers), pass it to the ``Trainer``, call
    :meth:`raise_if_stopped` after ``trainer.train()`` and :meth:`uninstall` in a ``finally``.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = SIGNALS) -> None:
        self.received: signal.Signals | None = None
        self.stopped_at: int | None = None
        self.checkpoint: Path | None = None
        self._previous: dict[signal.Signals, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        if self.received is not None:
            _say(f"neftune: {sig.name} again: stopping at once, without a checkpoint")
            os._exit(128 + signum)
        self.received = sig
        _say(
            f"neftune: {sig.name} received: finishing the current step, then writing a checkpoint "
            "(send it again to stop at once)"
        )

    def uninstall(self) -> None:
        """Put back the signal handlers that were there before (idempotent)."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _any_rank_signalled(self, args: Any) -> bool:
        import torch

        local = self.received is not None
        if args.world_size <= 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return local
        flag = torch.tensor([1.0 if local else 0.0], device=args.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def on_train_begin(self, args, state, control, **kwargs):
        if self._any_rank_signalled(args):
            self.stopped_at = state.global_step
            raise self._preempted(args, state, saved=False)

    def on_step_end(self, args, state, control, **kwargs):
        if self._any_rank_signalled(args):
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self.uninstall()

    def _preempted(self, args: Any, state: Any, *, saved: bool) -> Preempted:
        why = self.received.name if self.received is not None else "a signal to another process"
        if saved:
            self.checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            message = (
                f"stopped by {why} after step {state.global_step} of {state.max_steps}: "
                f"checkpoint {self.checkpoint} written; rerun with --resume to continue"
            )
        else:
            message = f"stopped by {why} before the first step: nothing new to save; rerun with --resume to continue"
        return Preempted(message, self.checkpoint)

    def raise_if_stopped(self, trainer: Any) -> None:
        """Raise :class:`Preempted` if a signal stopped the training that just returned."""
        self.uninstall()
        if self.stopped_at is not None:
            raise self._preempted(trainer.args, trainer.state, saved=True)
