"""neftune: instruction finetuning with per-example NEFTune noise.

    import neftune
    with neftune.attach(model, alpha=5.0):          # noise only while model.training
        trainer.train()
    trainer = SFTTrainer(..., callbacks=[neftune.NEFTuneCallback(alpha=5.0)])
    noisy = neftune.noisy_embeddings(embeds, alpha=5.0, attention_mask=mask)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from neftune.attach import NEFTuneHandle, attach
from neftune.noise import example_lengths, noisy_embeddings

__version__ = "0.1.0"

__all__ = [
    "NEFTuneCallback",
    "NEFTuneHandle",
    "__version__",
    "attach",
    "example_lengths",
    "noisy_embeddings",
]

if TYPE_CHECKING:
    from neftune.callback import NEFTuneCallback


def __getattr__(name: str) -> Any:
    # The callback imports transformers (slow); load it only when asked for.
    if name == "NEFTuneCallback":
        from neftune.callback import NEFTuneCallback

        return NEFTuneCallback
    raise AttributeError(f"module 'neftune' has no attribute {name!r}")
