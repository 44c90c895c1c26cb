"""Every statistic behind a verdict: pure numpy/scipy, importing no other neftune stage.

* :mod:`neftune.stats.intervals` -- one sample or one pair of arms: BCa bootstrap of a mean, Wilson
  interval, exact McNemar test with Newcombe's interval for paired 0/1 outcomes, Holm's correction.
* :mod:`neftune.stats.seeds` -- arms trained with several seeds and evaluated on the same prompts:
  per-seed paired effects, a pooled effect whose interval includes training-seed variance, and the
  A/A (baseline against baseline) noise floor.
* :mod:`neftune.stats.length_control` -- AlpacaEval's length-controlled win rate.
* :mod:`neftune.stats.power` -- the smallest effect on a 0/1 metric an experiment of a given size
  detects, simulated through the pooled test of :mod:`neftune.stats.seeds`.

Each method is calibrated by simulation in ``tests/test_stats.py`` without a model.
"""

from neftune.stats.intervals import FloatArray, bootstrap_ci, holm, paired_binary, wilson_ci, win_rate
from neftune.stats.length_control import SEPARATED, length_controlled_win_rate
from neftune.stats.seeds import (
    Effect,
    SeedComparison,
    aa_floor,
    compare_arms,
    compare_seeds,
    is_binary,
    seed_level_test,
)

__all__ = [
    "SEPARATED",
    "Effect",
    "FloatArray",
    "SeedComparison",
    "aa_floor",
    "bootstrap_ci",
    "compare_arms",
    "compare_seeds",
    "holm",
    "is_binary",
    "length_controlled_win_rate",
    "paired_binary",
    "seed_level_test",
    "wilson_ci",
    "win_rate",
]
