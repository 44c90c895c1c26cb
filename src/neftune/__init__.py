"""neftune: instruction finetuning with per-example NEFTune noise."""

from __future__ import annotations

__version__ = "0.1.0"
