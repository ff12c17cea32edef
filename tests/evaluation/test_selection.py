"""The one-standard-error rule on hand-computed fold scores."""

import math

import pytest

from leukotree.errors import LeukotreeError
from leukotree.evaluation.selection import one_standard_error, select_within_one_se


def test_the_simplest_within_one_standard_error_is_chosen():
    # B is best: mean 0.84, sd 0.02, se 0.02 / sqrt(3) = 0.011547, bound 0.828453
    scores = {"A": [0.80, 0.82, 0.78], "B": [0.84, 0.86, 0.82], "C": [0.83, 0.83, 0.83]}
    pick = one_standard_error(scores, ["A", "C", "B"])
    assert pick.best == "B"
    assert pick.bound == pytest.approx(0.84 - 0.02 / math.sqrt(3))
    assert pick.chosen == "C"  # 0.83 >= 0.8285; A (0.80) is simpler but below
    assert pick.standard_errors["C"] == 0.0
    # without C, A is too far below: B itself is chosen
    assert one_standard_error({k: scores[k] for k in "AB"}, ["A", "B"]).chosen == "B"


def test_lower_is_better_and_nan_folds():
    # errors: B best at 0.10 (sd 0.0231, se 0.0115 with 4 folds), bound 0.1115; A (0.105) within
    scores = {"A": [0.105, float("nan")], "B": [0.08, 0.12, 0.08, 0.12]}
    pick = one_standard_error(scores, ["A", "B"], higher_is_better=False)
    assert pick.best == "B" and pick.bound == pytest.approx(0.1 + 0.0230940 / 2, abs=1e-6)
    assert pick.chosen == "A"


def test_refuses_an_order_that_does_not_match():
    with pytest.raises(LeukotreeError, match="complexity order"):
        one_standard_error({"A": [1.0]}, ["A", "B"])
    with pytest.raises(LeukotreeError, match="no fold score"):
        one_standard_error({"A": [float("nan")]}, ["A"])


def test_estimates_with_standard_errors_known_otherwise():
    # pooled AUROCs with bootstrap SEs: best c 0.90 +- 0.04 -> bound 0.86; a (0.85) is out,
    # b (0.87) is the simplest within
    pick = select_within_one_se({"a": 0.85, "b": 0.87, "c": 0.90},
                                {"a": 0.05, "b": 0.05, "c": 0.04}, ["a", "b", "c"])
    assert (pick.chosen, pick.best, pick.bound) == ("b", "c", pytest.approx(0.86))
    with pytest.raises(LeukotreeError, match="a standard error of every candidate"):
        select_within_one_se({"a": 0.8}, {}, ["a"])
