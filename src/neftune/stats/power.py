"""How large an effect on a 0/1 metric an experiment of a given size can detect.

A comparison of two arms on a 0/1 metric (IFEval prompt-level accuracy, exact match) is decided by
the prompts on which the two arms *disagree*.  With no effect they still disagree on a share
``discordance`` of the prompts, half each way (two baseline seeds do: an A/A comparison measures
it); this sets the noise of one seed's paired difference (variance about ``discordance / n``).  A
true difference ``delta`` adds ``delta`` prompts (as a share) that only the better arm gets right.  Training
seeds add a run-to-run spread of the effect itself (``seed_sd``, in proportion units).  The verdict
is the pooled test of :func:`neftune.stats.seeds.compare_arms` (t with seeds - 1 degrees of freedom,
checked by the exact sign test), Holm-corrected across ``arms``.

:func:`power` estimates by simulation, through that very test, how often a true difference ``delta``
is declared (significant, right sign); :func:`detectable_effect` is the smallest ``delta`` found in
``target`` of simulations.  Holm's first step tests the smallest p-value at ``level / arms``; using
that threshold for every arm makes the answer slightly conservative.

    detectable_effect(prompts=96, seeds=5, discordance=0.15, seed_sd=0.02, arms=3)   # about 0.1

Both are deterministic for a given ``seed`` (common random numbers across ``delta``), so the search
is monotone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypedDict

import numpy as np

from neftune.stats.seeds import compare_arms

if TYPE_CHECKING:
    from typing_extensions import Required, Unpack

__all__ = ["Design", "detectable_effect", "power"]


class Design(TypedDict, total=False):
    """An experiment's size, as :func:`power` and :func:`detectable_effect` take it (keywords).

    ``prompts`` (answered by every arm), ``seeds`` (training seeds: one baseline and one arm per
    seed, paired within seed) and ``discordance`` (the share of prompts on which an arm and its
    baseline disagree when there is no effect: about the share on which two baseline seeds
    disagree, an A/A comparison) are required.  ``seed_sd`` is the run-to-run standard deviation
    of the effect between seeds, in proportion units (default 0); ``arms`` the number of alphas
    tested, the Holm family of the primary metric (1); ``level`` the family-wise significance
    level (0.05); ``sims`` the simulated experiments (2000) and ``seed`` their random numbers (0).
    """

    prompts: Required[int]
    seeds: Required[int]
    discordance: Required[float]
    seed_sd: float
    arms: int
    level: float
    sims: int
    seed: int


def _simulator(
    *,
    prompts: int,
    seeds: int,
    discordance: float,
    seed_sd: float = 0.0,
    arms: int = 1,
    level: float = 0.05,
    sims: int = 2000,
    seed: int = 0,
) -> Callable[[float], float]:
    """Check the design and draw its random numbers once; return ``delta -> power`` on those draws."""
    if prompts < 1 or seeds < 1 or arms < 1:
        raise ValueError("prompts, seeds and arms must be >= 1")
    if not 0 < discordance <= 1:
        raise ValueError(f"discordance must be in (0, 1], got {discordance}")
    if seed_sd < 0:
        raise ValueError(f"seed_sd must be >= 0, got {seed_sd}")
    rng = np.random.default_rng(seed)
    u, z = rng.random((sims, seeds, prompts)), rng.standard_normal((sims, seeds, 1))

    def power_at(delta: float) -> float:
        # per-seed true difference, on top of the chance disagreement `discordance` (split evenly)
        d = np.clip(delta + seed_sd * z, discordance - 1, 1 - discordance)
        up = discordance / 2 + np.maximum(d, 0.0)  # P(treated right, baseline wrong)
        down = discordance / 2 + np.maximum(-d, 0.0)  # P(baseline right, treated wrong)
        treated = (u < up).astype(float)
        baseline = ((u >= up) & (u < up + down)).astype(float)
        r = compare_arms(treated, baseline, binary=True, level=1 - level)
        return float(np.mean((r["p_value"] < level / arms) & (r["estimate"] * np.sign(delta or 1.0) > 0)))

    return power_at


def power(delta: float, **design: Unpack[Design]) -> float:
    """Share of simulated experiments of ``design`` (:class:`Design`) in which a true difference
    ``delta`` (in proportion units, e.g. 0.1 for 10 points) is declared significant with the right sign."""
    return _simulator(**design)(delta)


def detectable_effect(*, target: float = 0.8, **design: Unpack[Design]) -> float | None:
    """Smallest true difference detected in ``target`` of simulated experiments of ``design``
    (:class:`Design`; bisection to 0.1 point); ``None`` when even the largest possible one
    (``1 - discordance``) is not."""
    power_at = _simulator(**design)

    def found(delta: float) -> bool:
        return power_at(delta) >= target

    lo, hi = 0.0, 1.0 - design["discordance"]
    if not found(hi):
        return None
    while hi - lo > 0.001:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if found(mid) else (mid, hi)
    return hi
