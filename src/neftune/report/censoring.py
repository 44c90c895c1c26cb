"""Answers cut off at the token cap: how many, and when a length verdict must be withheld.

An answer that stopped at ``max_new_tokens`` without an end token (``reached_cap`` in the outputs file,
see :mod:`neftune.outputs`) has a censored length: it would have been at least that long, perhaps much
longer.  When many answers of either arm are cut, the difference in their mean length says more
about the cap than about the arms: two arms that both run into the cap look equally long however
long they would have been.  So a length verdict is withheld, with the reason, when more than
:data:`CENSORED_LIMIT` of either side reached the cap.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from neftune.report.values import arm_name, as_float, mapping_at
from neftune.report.words import WITHHELD

__all__ = ["CENSORED_LIMIT", "WITHHELD", "cap_of", "cut_share", "withheld_reason"]

#: Above this share of cut-off answers on either side, no length verdict is given.
CENSORED_LIMIT = 0.10


def cut_share(arm: Mapping[str, Any]) -> float | None:
    """The share of the arm's answers that reached the token cap, or ``None`` when it was not recorded.

    Read from ``eval.reached_cap``, else from the 0/1 list ``eval.per_example.reached_cap``.
    """
    ev = mapping_at(arm, "eval")
    share = as_float(ev.get("reached_cap"))
    if share is not None:
        return share
    flags = mapping_at(ev, "per_example").get("reached_cap")
    if not isinstance(flags, list):
        return None
    known = [f for f in (as_float(v) for v in flags) if f is not None]
    return sum(known) / len(known) if known else None


def cap_of(arm: Mapping[str, Any]) -> int | None:
    """The arm's ``eval.max_new_tokens`` (the cap its answers were generated under), when recorded."""
    cap = as_float(mapping_at(arm, "eval").get("max_new_tokens"))
    return int(cap) if cap is not None else None


def withheld_reason(baselines: Iterable[Mapping[str, Any]], arms: Iterable[Mapping[str, Any]]) -> str | None:
    """Why no length verdict compares ``arms`` with ``baselines``, or ``None`` when one can be given.

    E.g. ``"withheld: 100% of alpha=0's answers, 94% of alpha=5's answers reached the 160-token cap (limit
    10%), so their lengths are censored"``.  Arms that did not record the share are not counted.
    """
    sides = [*baselines, *arms]
    shares = [(arm_name(a), share, cap_of(a)) for a in sides if (share := cut_share(a)) is not None]
    if not any(share > CENSORED_LIMIT for _, share, _ in shares):
        return None
    caps = {cap for _, _, cap in shares if cap is not None}
    which = f"the {caps.pop()}-token cap" if len(caps) == 1 else "their token cap"
    listed = ", ".join(f"{share:.0%} of {name}'s answers" for name, share, _ in shares)
    return f"withheld: {listed} reached {which} (limit {CENSORED_LIMIT:.0%}), so their lengths are censored"
