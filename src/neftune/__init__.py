"""neftune: instruction finetuning with per-example NEFTune noise.

import neftune
with neftune.attach(model, alpha=5.0):          # noise only while model.training
    trainer.train()
trainer = SFTTrainer(..., callbacks=[neftune.NEFTuneCallback(alpha=5.0)])
noisy = neftune.noisy_embeddings(embeds, alpha=5.0, attention_mask=mask)

cfg = neftune.load_config(neftune.Config, "my.yaml", ["noise.alpha=10"])
result = neftune.run_training(cfg)               # what `neftune train` runs
paths = neftune.run_compare(neftune.load_config(neftune.CompareConfig))   # `neftune compare`
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from neftune.attach import NEFTuneHandle, attach
from neftune.noise import example_lengths, noisy_embeddings

__version__ = "0.1.0"

__all__ = [
    "CompareConfig",
    "Config",
    "NEFTuneCallback",
    "NEFTuneHandle",
    "__version__",
    "attach",
    "example_lengths",
    "load_config",
    "noisy_embeddings",
    "patch_transformers",
    "run_compare",
    "run_training",
    "unpatch_transformers",
]

if TYPE_CHECKING:
    from neftune.callback import NEFTuneCallback
    from neftune.compare import run_compare
    from neftune.compare_config import CompareConfig
    from neftune.config import Config, load_config
    from neftune.train import run_training


# These import transformers (slow); load them only when asked for.
_LAZY = {
    "NEFTuneCallback": "neftune.callback",
    "Config": "neftune.config",
    "CompareConfig": "neftune.compare_config",
    "load_config": "neftune.config",
    "run_training": "neftune.train",
    "run_compare": "neftune.compare",
    "patch_transformers": "neftune.patch",
    "unpatch_transformers": "neftune.patch",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'neftune' has no attribute {name!r}")
