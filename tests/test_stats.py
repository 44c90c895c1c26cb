"""Statistics: hand-checked values, calibration by simulation (no model), and the AlpacaEval LC cross-check.

Every simulation is vectorised: thousands of synthetic experiments go through one call, so the file
runs in seconds.  Thresholds allow three Monte Carlo standard errors around the nominal rate.

Documented power (docs/report.md's "How to read the report" quotes these): with ``S`` seeds and the
per-seed standard error ``SE`` of a paired difference on the eval set, the pooled test detects an
effect with 80% power at about 12 SE (2 seeds), 4 SE (3 seeds) and 2 SE (5 seeds) when training
seeds add no variance; see :func:`test_power_at_documented_sizes`.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import stats as sps

from neftune.stats import (
    SEPARATED,
    aa_floor,
    bootstrap_ci,
    compare_arms,
    compare_seeds,
    holm,
    is_binary,
    length_controlled_win_rate,
    paired_binary,
    wilson_ci,
    win_rate,
)
from neftune.stats.length_control import CS, length_features

SIMS = 2000


def mc_limit(rate: float, sims: int = SIMS) -> float:
    """Nominal rate plus three Monte Carlo standard errors."""
    return rate + 3 * math.sqrt(rate * (1 - rate) / sims)


# --------------------------------------------------------------------------------------------------
# one sample, one pair


def test_win_rate_by_hand():
    assert win_rate([1, 1, 0, 0.5]) == pytest.approx(0.625)
    assert math.isnan(win_rate([]))


def test_bootstrap_ci_is_bca_and_refuses_constant_data():
    assert all(math.isnan(v) for v in bootstrap_ci([1, 1, 1]))  # no zero-width "certainty" from 3 values
    assert all(math.isnan(v) for v in bootstrap_ci([]))
    assert all(math.isnan(v) for v in bootstrap_ci([0.4]))
    rng = np.random.default_rng(1)
    small = rng.choice([0.0, 0.5, 1.0], size=40, p=[0.3, 0.2, 0.5])
    large = rng.choice([0.0, 0.5, 1.0], size=1000, p=[0.3, 0.2, 0.5])
    lo_s, hi_s = bootstrap_ci(small)
    lo_l, hi_l = bootstrap_ci(large)
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 2
    half = 1.96 * large.std() / math.sqrt(large.size)
    assert (hi_l - lo_l) / 2 == pytest.approx(half, rel=0.1)
    assert bootstrap_ci(small, seed=3) == bootstrap_ci(small, seed=3)
    reference = sps.bootstrap((small,), np.mean, n_resamples=2000, method="BCa", rng=np.random.default_rng(0))
    assert bootstrap_ci(small) == pytest.approx((reference.confidence_interval.low, reference.confidence_interval.high))
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci(small, level=1.5)


def test_wilson_by_hand():
    lo, hi = wilson_ci([0, 10, 5], [10, 10, 10])
    assert lo[0] == 0 and hi[0] == pytest.approx(0.2775, abs=1e-4)
    assert lo[1] == pytest.approx(0.7225, abs=1e-4) and hi[1] == 1
    assert (lo[2], hi[2]) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    lo, hi = wilson_ci(0, 0)
    assert (lo, hi) == (0, 1)


def test_paired_binary_by_hand():
    three = paired_binary([1, 1, 1], [0, 0, 0])
    assert three["estimate"] == 1.0 and three["p_value"] == pytest.approx(0.25)
    lo, hi = three["ci"]
    assert lo < 0 < hi  # 3 of 3 is not evidence at 95%: the interval says so, the exact test agrees
    ten = paired_binary([1] * 10 + [0] * 5, [0] * 10 + [0] * 5)
    assert ten["p_value"] == pytest.approx(2 / 1024)
    assert ten["ci"][0] > 0
    # 6 wins, 2 losses, 12 concordant: McNemar exact p = 2 * P(Bin(8, .5) <= 2)
    t = [1] * 6 + [0] * 2 + [1] * 4 + [0] * 8
    b = [0] * 6 + [1] * 2 + [1] * 4 + [0] * 8
    r = paired_binary(t, b)
    assert r["estimate"] == pytest.approx(4 / 20)
    assert r["p_value"] == pytest.approx(2 * sps.binom.cdf(2, 8, 0.5))
    assert (r["wins"], r["losses"], r["n"]) == (6, 2, 20)
    with pytest.raises(ValueError, match="0 or 1"):
        paired_binary([0.5, 1], [0, 1])
    with pytest.raises(ValueError, match="same shape"):
        paired_binary([1, 0], [1])


def test_paired_binary_interval_agrees_with_the_exact_test_for_every_table():
    # Every 2x2 table with n = 12: where the exact test does not reject, the interval holds 0.
    n = 12
    tables = [(a, b, c, n - a - b - c) for a in range(n + 1) for b in range(n + 1 - a) for c in range(n + 1 - a - b)]
    t = np.array([[1] * a + [1] * b + [0] * c + [0] * d for a, b, c, d in tables], dtype=float)
    base = np.array([[1] * a + [0] * b + [1] * c + [0] * d for a, b, c, d in tables], dtype=float)
    r = paired_binary(t, base)
    lo, hi = r["ci"]
    keeps_zero = (lo <= 0) & (hi >= 0)
    assert np.all(keeps_zero[r["p_value"] >= 0.05])
    assert np.all((lo <= r["estimate"]) & (r["estimate"] <= hi))


@pytest.mark.parametrize("n", [5, 10, 20, 50])
def test_small_n_binary_calibration(n):
    """Exact McNemar keeps its level; the interval covers the true difference in >= 93% at every n."""
    rng = np.random.default_rng(n)
    # cells: both right, only treated right, only baseline right, both wrong
    for probs in ((0.3, 0.1, 0.1, 0.5), (0.2, 0.05, 0.25, 0.5), (0.6, 0.02, 0.08, 0.3), (0.1, 0.0, 0.2, 0.7)):
        cells = rng.choice(4, size=(SIMS, n), p=probs)
        t = (cells <= 1).astype(float)
        b = ((cells == 0) | (cells == 2)).astype(float)
        r = paired_binary(t, b)
        truth = probs[1] - probs[2]
        covered = np.mean((r["ci"][0] <= truth) & (truth <= r["ci"][1]))
        assert covered >= 0.93, (n, probs, covered)
        if probs[1] == probs[2]:
            assert np.mean(r["p_value"] < 0.05) <= 0.05, (n, probs)


def test_holm_by_hand():
    adjusted = holm([0.01, 0.04, 0.03, 0.005])
    assert adjusted == pytest.approx([0.03, 0.06, 0.06, 0.02])
    with_nan = holm([0.01, float("nan"), 0.04])
    assert with_nan[0] == pytest.approx(0.02) and math.isnan(with_nan[1]) and with_nan[2] == pytest.approx(0.04)
    assert holm([]).size == 0
    with pytest.raises(ValueError, match="p-values"):
        holm([1.2])


def test_holm_controls_family_wise_error():
    rng = np.random.default_rng(7)
    p = rng.random((1000, 6))  # six true null hypotheses
    any_rejected = np.mean([np.any(holm(row) < 0.05) for row in p])
    assert any_rejected <= mc_limit(0.05, 1000)
    assert np.mean(np.any(p < 0.05, axis=1)) > 0.2  # uncorrected: about 26% of families see a "finding"


# --------------------------------------------------------------------------------------------------
# seeds as a level of the design


def simulate_binary(rng, sims, seeds, prompts, logit_effect, seed_sd, run_prompt_sd=1.0):
    """0/1 outcomes: prompt difficulty, a per-run (arm x seed) shift of sd ``seed_sd``, run x prompt noise."""
    difficulty = rng.normal(-0.3, 1.5, (sims, 1, 1, prompts))
    run = rng.normal(0.0, seed_sd, (sims, 2, seeds, 1))
    noise = rng.normal(0.0, run_prompt_sd, (sims, 2, seeds, prompts))
    z = difficulty + run + noise
    z[:, 1] += logit_effect
    y = (rng.random(z.shape) < 1 / (1 + np.exp(-z))).astype(float)
    return y[:, 1], y[:, 0]


def binary_truth(rng, logit_effect, seed_sd, run_prompt_sd=1.0, draws=400_000):
    """Population difference in proportions for :func:`simulate_binary`."""
    z = rng.normal(-0.3, 1.5, draws) + rng.normal(0, seed_sd, draws) + rng.normal(0, run_prompt_sd, draws)
    return float(np.mean(1 / (1 + np.exp(-(z + logit_effect))) - 1 / (1 + np.exp(-z))))


def simulate_continuous(rng, sims, seeds, prompts, effect, seed_sd, prompt_sd=0.3):
    """Paired differences: effect + seed x arm shift + prompt x arm shift + noise (sd 1)."""
    d = (
        effect
        + rng.normal(0, seed_sd, (sims, seeds, 1))
        + rng.normal(0, prompt_sd, (sims, 1, prompts))
        + rng.normal(0, 1, (sims, seeds, prompts))
    )
    return d, np.zeros_like(d)


def test_one_seed_is_the_paired_t_test_and_says_seed_variance_is_unmeasured():
    rng = np.random.default_rng(0)
    t, b = rng.normal(0.3, 1, (1, 50)), rng.normal(0, 1, (1, 50))
    result = compare_seeds(t, b)
    ref = sps.ttest_rel(t[0], b[0])
    assert result.seed_variance_measured is False
    assert result.pooled == result.per_seed[0]
    assert result.pooled.p_value == pytest.approx(ref.pvalue)
    assert result.pooled.ci == pytest.approx(tuple(ref.confidence_interval()))
    assert math.isnan(result.components["seed_var"])
    assert result.to_dict()["components"]["seed_var"] is None


def test_pooled_effect_pairs_within_seed_and_shows_each_seed():
    # Seed 1's runs are better for both arms; pairing within seed removes that, pooling averages.
    base = np.array([[0.0, 1.0, 2.0, 3.0], [10.0, 11.0, 12.0, 13.0]])
    treated = base + np.array([[1.0, 1.2, 0.8, 1.0], [2.0, 1.8, 2.2, 2.0]])
    result = compare_seeds(treated, base)
    assert [e.estimate for e in result.per_seed] == pytest.approx([1.0, 2.0])
    assert result.pooled.estimate == pytest.approx(1.5)
    assert result.pooled.df == 1  # two seeds: one degree of freedom for the seed-to-seed spread
    assert result.seed_variance_measured and result.pooled.seeds == 2 and result.pooled.prompts == 4
    lo, hi = result.pooled.ci
    assert lo < 1.0 and hi > 2.0  # the interval spans both seeds' effects
    assert result.components["seed_var"] > 0


def test_variance_components_are_recovered():
    rng = np.random.default_rng(5)
    d, z = simulate_continuous(rng, 200, 6, 400, 0.0, seed_sd=0.3, prompt_sd=0.5)
    r = compare_arms(d, z, binary=False)
    assert np.mean(r["seed_var"]) == pytest.approx(0.09, rel=0.15)
    assert np.mean(r["prompt_var"]) == pytest.approx(0.25, rel=0.1)
    assert np.mean(r["resid_var"]) == pytest.approx(1.0, rel=0.02)


@pytest.mark.parametrize("seeds", [2, 3, 5])
@pytest.mark.parametrize("seed_sd", [0.0, 0.3])
def test_aa_false_positive_rate_with_seed_variance(seeds, seed_sd):
    """A/A: identical arms whose runs differ by seed. The pooled verdict fires in <= 5% (+MC error)."""
    rng = np.random.default_rng(100 * seeds + int(10 * seed_sd))
    t, b = simulate_binary(rng, SIMS, seeds, 100, 0.0, seed_sd)
    assert np.mean(compare_arms(t, b)["p_value"] < 0.05) <= mc_limit(0.05)
    d, z = simulate_continuous(rng, SIMS, seeds, 100, 0.0, seed_sd)
    assert np.mean(compare_arms(d, z, binary=False)["p_value"] < 0.05) <= mc_limit(0.05)


def test_prompt_only_test_would_not_survive_seed_variance():
    # The reason for the design: ignoring seeds (a paired test over all seed x prompt rows) is far off.
    rng = np.random.default_rng(9)
    d, z = simulate_continuous(rng, SIMS, 2, 100, 0.0, seed_sd=0.3)
    naive = compare_arms(d.reshape(SIMS, 1, -1), z.reshape(SIMS, 1, -1), binary=False)
    assert np.mean(naive["p_value"] < 0.05) > 0.3


@pytest.mark.parametrize("seeds", [2, 3, 5])
def test_intervals_cover_a_known_effect(seeds):
    rng = np.random.default_rng(seeds)
    d, z = simulate_continuous(rng, SIMS, seeds, 100, 0.25, seed_sd=0.2)
    ci = compare_arms(d, z, binary=False)["ci"]
    assert np.mean((ci[0] <= 0.25) & (ci[1] >= 0.25)) >= 0.93
    t, b = simulate_binary(rng, SIMS, seeds, 150, 0.5, seed_sd=0.2)
    truth = binary_truth(rng, 0.5, 0.2)
    ci = compare_arms(t, b)["ci"]
    assert np.mean((ci[0] <= truth) & (truth <= ci[1])) >= 0.93


def test_power_at_documented_sizes():
    """Documented sizes: what a true effect needs to be detected (p < 0.05, right sign) in >= 80%."""
    rng = np.random.default_rng(11)
    # 0/1 metric (exact match, IFEval prompt-strict), 5 seeds x 200 prompts, runs' logit sd 0.2:
    # a logit shift of 0.8, about +12.8 points of accuracy, is detected.
    t, b = simulate_binary(rng, 1000, 5, 200, 0.8, seed_sd=0.2)
    r = compare_arms(t, b)
    assert np.mean((r["p_value"] < 0.05) & (r["estimate"] > 0)) >= 0.8
    # In units of one seed's standard error (SE = sd / sqrt(prompts)) with no seed variance:
    # 12 SE with 2 seeds, 4 SE with 3 seeds, 2 SE with 5 seeds.
    for seeds, effect_in_se in ((2, 12), (3, 4), (5, 2)):
        d = effect_in_se / math.sqrt(200) + rng.normal(0, 1, (1000, seeds, 200))
        r = compare_arms(d, np.zeros_like(d), binary=False)
        assert np.mean((r["p_value"] < 0.05) & (r["estimate"] > 0)) >= 0.78, seeds


def test_aa_floor():
    base = np.array([[1, 0, 1, 1, 0, 1], [1, 1, 1, 1, 0, 1], [0, 0, 1, 1, 0, 1]], dtype=float)
    floor = aa_floor(base, seed_ids=[7, 8, 9])
    assert floor["measured"] and [p["seeds"] for p in floor["pairs"]] == [[7, 8], [7, 9], [8, 9]]
    assert [p["estimate"] for p in floor["pairs"]] == pytest.approx([1 / 6, -1 / 6, -2 / 6])
    assert floor["floor"] == pytest.approx(2 / 6)
    assert floor["seed_sd"] == pytest.approx(np.std(base.mean(axis=1), ddof=1))
    assert all(p["method"].startswith("exact McNemar") for p in floor["pairs"])
    single = aa_floor(base[:1])
    assert single == {"measured": False, "pairs": [], "floor": None, "seed_sd": None}
    with pytest.raises(ValueError, match="seed ids"):
        aa_floor(base, seed_ids=[1])


def test_design_errors_and_binary_detection():
    assert is_binary([[0, 1]], [[1, 1]]) and not is_binary([[0, 0.5]])
    with pytest.raises(ValueError, match="seeds, prompts"):
        compare_arms([1, 0], [0, 1])
    with pytest.raises(ValueError, match="finite"):
        compare_seeds([[1.0, float("nan")]], [[0.0, 0.0]])
    same = compare_seeds([[1.0, 2.0], [3.0, 4.0]], [[1.0, 2.0], [3.0, 4.0]])
    assert same.pooled.estimate == 0 and same.pooled.p_value == 1


# --------------------------------------------------------------------------------------------------
# AlpacaEval's length-controlled win rate


def pairs(rng, n, model_logit, length_weight, longer_shift=0.4, tie_rate=0.1):
    len_a = rng.integers(50, 800, n).astype(float)
    len_b = len_a * np.exp(rng.normal(longer_shift, 0.6, n))
    u = length_features(len_a, len_b)
    p = 1 / (1 + np.exp(-(model_logit - length_weight * u)))
    scores = (rng.random(n) < p).astype(float)
    scores[rng.random(n) < tie_rate] = 0.5
    return scores, len_a, len_b


def alpaca_eval_fit(scores, len_a, len_b):
    """AlpacaEval 0.6.6's fit_LogisticRegressionCV (is_ytrue_proba path) run with scikit-learn."""
    sklearn = pytest.importorskip("sklearn")
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.metrics import make_scorer
    from sklearn.model_selection import GroupKFold

    def logloss_continuous(y_true, y_pred, true_prob, true_sample_weight=None):
        y_true = np.where(y_true == 1, true_prob, 1 - true_prob)
        y_pred = np.clip(y_pred, 1e-15, 1 - 1e-15)
        return -np.mean(y_true * np.log(y_pred) + (1 - y_true) * np.log(1 - y_pred))

    n = len(scores)
    delta = len_a - len_b
    x = np.column_stack([np.tanh(delta / np.std(delta, ddof=1)), np.ones(n)])
    prob = np.concatenate([scores, 1 - scores])
    scorer = make_scorer(logloss_continuous, response_method="predict_proba", greater_is_better=False)
    with sklearn.config_context(enable_metadata_routing=True), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn's deprecation of `penalty`; AlpacaEval passes it
        model = LogisticRegressionCV(
            cv=GroupKFold(n_splits=5),
            scoring=scorer.set_score_request(true_sample_weight=True, true_prob=True),
            random_state=123,
            penalty="l1",
            solver="liblinear",
            fit_intercept=False,
        )
        model.set_fit_request(sample_weight=True)
        model.fit(
            np.vstack([x, x]),
            np.concatenate([np.ones(n), np.zeros(n)]),
            sample_weight=prob,
            groups=np.concatenate([np.arange(n), np.arange(n)]),
            true_sample_weight=None,
            true_prob=prob,
        )
    return float(model.predict_proba([[0.0, 1.0]])[0, 1]), float(model.C_[0])


@pytest.mark.parametrize(
    ("n", "model_logit", "length_weight", "longer_shift"),
    [(20, 0.2, 1.5, 0.4), (60, -0.5, 2.0, 0.3), (200, 0.3, 1.5, 0.4), (805, 0.0, 1.0, 0.5), (300, 0.6, 0.0, 0.0)],
)
def test_lc_matches_alpaca_eval_fitted_by_sklearn(n, model_logit, length_weight, longer_shift):
    rng = np.random.default_rng(n)
    scores, len_a, len_b = pairs(rng, n, model_logit, length_weight, longer_shift)
    ours = length_controlled_win_rate(scores, len_a, len_b, n_boot=0)
    reference, c = alpaca_eval_fit(scores, len_a, len_b)
    assert ours["estimable"] and ours["reason"] is None
    assert ours["C"] == c
    assert ours["win_rate"] == pytest.approx(reference, abs=1e-3)


def test_lc_folds_are_alpaca_evals():
    pytest.importorskip("sklearn")
    from sklearn.model_selection import GroupKFold

    n = 23
    groups = np.concatenate([np.arange(n), np.arange(n)])
    folds = np.empty(2 * n, int)
    for k, (_, test) in enumerate(GroupKFold(n_splits=5).split(np.zeros(2 * n), groups=groups)):
        folds[test] = k
    assert np.array_equal(folds[:n], (n - 1 - np.arange(n)) % 5)
    assert np.allclose(CS, np.logspace(-4, 4, 10))


def test_lc_of_a_judge_that_always_prefers_the_longer_answer():
    rng = np.random.default_rng(3)
    len_a = rng.integers(100, 300, 200).astype(float)
    len_b = len_a * np.exp(rng.normal(0.4, 0.5, 200))  # B longer in about 70% of pairs
    scores = np.where(len_b > len_a, 1.0, np.where(len_b < len_a, 0.0, 0.5))
    assert win_rate(scores) > 0.65
    lc = length_controlled_win_rate(scores, len_a, len_b, n_boot=100)
    assert lc["estimable"] is False and lc["reason"] == SEPARATED == "the verdicts are separated by length"
    assert math.isnan(lc["win_rate"]) and all(math.isnan(v) for v in lc["ci"])
    # The same judge with 10% of its verdicts flipped at random: estimable, and back near 50%.
    flipped = np.where(rng.random(200) < 0.1, 1 - scores, scores)
    noisy = length_controlled_win_rate(flipped, len_a, len_b, n_boot=200)
    assert win_rate(flipped) > 0.6
    assert noisy["estimable"] and 0.4 <= noisy["win_rate"] <= 0.6
    lo, hi = noisy["ci"]
    assert lo <= 0.5 <= hi


def test_lc_recovers_the_model_term_and_its_interval():
    rng = np.random.default_rng(12)
    scores, len_a, len_b = pairs(rng, 500, 0.8, 1.5, tie_rate=0.0)
    lc = length_controlled_win_rate(scores, len_a, len_b, n_boot=300)
    truth = 1 / (1 + math.exp(-0.8))
    assert lc["win_rate"] == pytest.approx(truth, abs=0.05)
    lo, hi = lc["ci"]
    assert lo < lc["win_rate"] < hi and lo < truth < hi and hi - lo < 0.15
    assert lc["length_coef"] < 0  # delta = len_a - len_b: the longer B, the likelier its win


def test_lc_edge_cases():
    equal = length_controlled_win_rate([1, 1, 1, 0, 0.5, 1, 0, 1], [120] * 8, [120] * 8, n_boot=50)
    assert equal["estimable"] and equal["identifiable"] is False and 0.5 <= equal["win_rate"] <= 0.7
    constant = length_controlled_win_rate([1, 0, 1, 1, 0.5], [10] * 5, [40] * 5, n_boot=50)
    assert constant["estimable"] is False and "same length difference" in constant["reason"]
    few = length_controlled_win_rate([1, 0, 1], [10, 20, 30], [30, 20, 10], n_boot=50)
    assert few["estimable"] is False and "fewer than 5" in few["reason"]
    none = length_controlled_win_rate([], [], [])
    assert none["n"] == 0 and none["estimable"] is False
    for keys in (equal, constant, few):
        assert {"win_rate", "ci", "n", "estimable", "reason"} <= set(keys)
    with pytest.raises(ValueError, match="equal length"):
        length_controlled_win_rate([1, 0], [1], [1, 2])
    with pytest.raises(ValueError, match="non-negative"):
        length_controlled_win_rate([2, 0, 1, 1, 1], [1] * 5, [1] * 5)


def test_seed_level_test():
    from neftune.stats import seed_level_test

    assert seed_level_test([0.6]) is None and seed_level_test([0.6, float("nan")]) is None
    e = seed_level_test([0.60, 0.64, 0.56], 0.5)
    ref = sps.ttest_1samp([0.60, 0.64, 0.56], 0.5)
    assert e.estimate == pytest.approx(0.6) and e.p_value == pytest.approx(ref.pvalue) and e.df == 2
    assert e.ci == pytest.approx(tuple(ref.confidence_interval()))


def test_power_calculation_is_calibrated_against_fresh_simulations():
    """detectable_effect finds the effect that the pooled test detects in 80% of experiments it did not
    see (other random numbers), and power() keeps the level under the null."""
    from neftune.stats.power import detectable_effect, power

    kw = {"prompts": 96, "seeds": 5, "discordance": 0.15, "seed_sd": 0.02, "arms": 3}
    mde = detectable_effect(**kw, sims=1000)
    assert mde is not None and 0.05 < mde < 0.25
    fresh = power(mde, **kw, sims=2000, seed=1)
    assert fresh == pytest.approx(0.8, abs=0.04)
    assert power(0.0, **kw, sims=2000, seed=2) <= mc_limit(0.05 / 3)
    # more prompts or seeds detect smaller effects; seed spread costs power
    assert detectable_effect(**{**kw, "prompts": 384}, sims=1000) < mde
    assert detectable_effect(**{**kw, "seeds": 8}, sims=1000) < mde
    assert detectable_effect(**{**kw, "seed_sd": 0.05}, sims=1000) > mde
    # 6 paired answers: even all six in the arm's favour give an exact p of 1/32 > 0.05 / 3
    assert detectable_effect(prompts=3, seeds=2, discordance=0.1, arms=3, sims=200) is None
    with pytest.raises(ValueError, match="discordance"):
        power(0.1, prompts=10, seeds=2, discordance=0.0)
