"""Tell a policy forward from a reference forward of the same PEFT model.

Preference trainers (TRL's DPO, KTO, GRPO with ``beta > 0``, ...) that train a PEFT adapter and
have no separate reference model compute the reference log-probs with the *same* module: they
run it with the adapter disabled (``PeftModel.disable_adapter()``) or with a frozen copy of the
adapter, named ``"ref"``, made active.  The module is still in training mode there, so an
embedding hook that looks only at ``module.training`` (transformers' own NEFTune hook does) noises
the reference too, and the preference margin then measures noise as well as preference.

The signal used here is the adapter state itself, read on every forward: a forward is the
policy's only while the adapters that were active when NEFTune was attached are active and
enabled.  That is what "reference" means for a PEFT policy (the model without the trained
adapter), so it holds for any trainer that switches adapters through PEFT, whatever its own code
looks like.  Guesses such as ``torch.is_grad_enabled()`` are wrong both ways: policy forwards can
run without grad (KTO's KL term, old-policy log-probs in GRPO/RLOO) and a reference can run with
grad enabled.  A separate reference model is a different module, with its own
embedding, and precomputed reference log-probs are computed before training starts (neither
sees the policy's hooks).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from torch import nn


def policy_probe(root: nn.Module) -> Callable[[], bool] | None:
    """Return a function that is True while ``root`` runs as the policy, or None for a non-PEFT model.

    The adapters active at the time of this call are taken to be the trained ones.  A PEFT model
    (``peft.PeftModel``) or any model holding PEFT tuner layers (a LoRA model reached below its
    ``PeftModel`` wrapper) is recognised; without ``peft`` imported there can be neither.
    """
    peft = sys.modules.get("peft")
    if peft is None:
        return None
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapper = root if isinstance(root, peft.PeftModel) else None
    layer = next((m for m in root.modules() if isinstance(m, BaseTunerLayer)), None)
    if wrapper is None and layer is None:
        return None

    def state() -> tuple[bool, tuple[str, ...]]:
        disabled = bool(getattr(wrapper, "_adapters_disabled", False))
        if layer is not None:  # LoRA & co.: disable_adapter() flags every tuner layer
            return disabled or bool(layer.disable_adapters), tuple(layer.active_adapters)
        assert wrapper is not None  # prompt learning: no tuner layers, the wrapper holds the state
        return disabled, tuple(wrapper.active_adapters)

    disabled, trained = state()
    if disabled:  # attached while the adapters were off: nothing to tell apart, noise as usual
        return None

    def is_policy() -> bool:
        disabled, active = state()
        return not disabled and active == trained

    return is_policy
