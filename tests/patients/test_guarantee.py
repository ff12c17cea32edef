"""Learn-then-Test patient miss rate: hand-computed p-values and thresholds, the
achievable rate for 22 patients, and the promise checked on simulated cohorts."""

import numpy as np
import pytest

from leukotree.errors import LeukotreeError
from leukotree.patients.guarantee import (
    MissRateThreshold,
    achievable_miss_rate,
    binomial_p_value,
    miss_rate_threshold,
)


def test_binomial_p_value_by_hand():
    # P(Binom(10, .1) <= 0) = .9^10; <= 1 adds 10 * .1 * .9^9
    assert binomial_p_value(0, 10, 0.1) == pytest.approx(0.9 ** 10)
    assert binomial_p_value(1, 10, 0.1) == pytest.approx(0.9 ** 10 + 0.9 ** 9)


def test_twenty_two_apl_patients_support_about_ten_percent_at_ninety_percent():
    assert achievable_miss_rate(22, 0.9) == pytest.approx(1 - 0.1 ** (1 / 22))
    assert 0.099 < achievable_miss_rate(22, 0.9) < 0.1
    with pytest.raises(LeukotreeError, match=r"22 APL patient\(s\) cannot promise a miss "
                                             r"rate of at most 1\.0%.*needs 230 APL.*10\.0%"):
        miss_rate_threshold(np.linspace(0.5, 1, 22), np.ones(22, bool), 0.01, 0.9, "APL")


def test_the_threshold_is_the_highest_one_the_fixed_sequence_rejects():
    # 30 positives scored .01, .02, ..., .30 and some negatives; alpha .2, delta .1:
    # k misses allowed while P(Binom(30, .2) <= k) <= .1: k = 0..2 (cdf(2) = .044,
    # cdf(3) = .123): t is the (k + 1)-th lowest positive score with k = 2, .03.
    pos = np.arange(1, 31) / 100
    scores = np.concatenate([pos, [0.001, 0.5]])
    truth = np.concatenate([np.ones(30, bool), [False, False]])
    found = miss_rate_threshold(scores, truth, alpha=0.2, confidence=0.9)
    assert found.threshold == pytest.approx(0.03) and found.misses == 2
    assert found.p_value == pytest.approx(binomial_p_value(2, 30, 0.2))
    assert binomial_p_value(3, 30, 0.2) > 0.1  # the sequence stopped there
    assert MissRateThreshold.from_dict(found.to_dict()) == found


def test_the_promise_holds_on_new_patients():
    rng = np.random.default_rng(1)
    alpha, confidence, fails = 0.2, 0.8, 0
    for _ in range(300):
        fitted = miss_rate_threshold(rng.beta(4, 2, 40), np.ones(40, bool), alpha, confidence)
        new = rng.beta(4, 2, 4000)  # the same population's positive patients
        fails += (new < fitted.threshold).mean() > alpha
    assert fails / 300 <= 1 - confidence + 0.03  # P(miss rate > alpha) <= delta


def test_miss_rate_metrics_by_hand():
    from leukotree.patients.guarantee import miss_rate_metrics

    calls = ["negative", "positive", "referred", "positive", "negative", "referred"]
    truth = np.array([True, True, True, True, False, False])
    got = miss_rate_metrics(calls, truth, alpha=0.3, confidence=0.9)
    # 1 of 4 positives called negative; 2 of 6 patients referred
    assert (got["n_positive"], got["missed"], got["referred"]) == (4, 1, 2)
    assert got["observed_miss_rate"] == 0.25 and got["referred_share"] == pytest.approx(1 / 3)
    low, high = got["observed_miss_rate_ci95"]
    # Clopper-Pearson for 1 of 4: the .025 quantile of Beta(1, 4), the .975 one of Beta(2, 3)
    from scipy.stats import beta

    assert low == pytest.approx(beta.ppf(0.025, 1, 4)) and high == pytest.approx(
        beta.ppf(0.975, 2, 3))
    assert got["within_promise"] is True and got["alpha"] == 0.3
    none = miss_rate_metrics(["negative"], np.array([False]), 0.1, 0.9)
    assert none["within_promise"] is None and none["missed"] == 0
