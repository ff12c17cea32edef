"""The gate on hand-computed cases: the exact sign test, the forgetting tolerance, the
minimum of audit cells, and a poisoned candidate."""

import pytest

from leukotree.errors import LeukotreeError
from leukotree.lab.gate import GateRule, accuracy_ci, decide, discordant, sign_test_p


@pytest.mark.parametrize(("b", "c", "p"), [
    (0, 0, 1.0),
    (5, 0, 1 / 32),            # all five discordant cells against the candidate
    (4, 0, 1 / 16),
    (6, 2, (28 + 8 + 1) / 256),  # P(X >= 6), X ~ Bin(8, 1/2) = (C(8,6)+C(8,7)+C(8,8))/2^8
    (0, 3, 1.0),               # the candidate is better on every discordant cell
    (2, 2, 11 / 16),           # (C(4,2)+C(4,3)+C(4,4))/16
])
def test_sign_test_p_is_the_binomial_tail(b, c, p):
    assert sign_test_p(b, c) == pytest.approx(p)


def test_discordant_pairs_count_cells_only_one_model_gets_right():
    active = [True, True, False, False, True]
    candidate = [True, False, True, False, False]
    assert discordant(active, candidate) == (2, 1)
    with pytest.raises(LeukotreeError, match="same cells"):
        discordant([True], [True, False])


def _cells(both, only_active, only_candidate, neither):
    active = [True] * both + [True] * only_active + [False] * only_candidate + [False] * neither
    cand = [True] * both + [False] * only_active + [True] * only_candidate + [False] * neither
    return active, cand


def test_a_candidate_no_worse_on_the_audit_cells_and_the_source_passes():
    active, cand = _cells(20, 2, 3, 5)  # b=2, c=3: p = 26/32
    result = decide(active, cand, 0.95, 0.94)  # one point lost: within the two allowed
    assert result.passed and result.refusals == []
    assert result.figures["b"] == 2 and result.figures["c"] == 3
    assert result.figures["p"] == pytest.approx(26 / 32)
    assert result.figures["audit_active"] == pytest.approx(22 / 30)
    assert result.figures["audit_candidate"] == pytest.approx(23 / 30)
    assert result.message.startswith("Passed")


def test_a_poisoned_candidate_is_refused_with_the_rule_and_its_numbers():
    # trained on shuffled labels: right on 6 of 30 audit cells where the active model was
    # right on 24 (b = 18 cells only the active gets right, c = 0)
    active, cand = _cells(6, 18, 0, 6)
    result = decide(active, cand, 0.96, 0.60)
    assert not result.passed and len(result.refusals) == 2
    assert result.figures["p"] == pytest.approx(0.5 ** 18)
    message = result.message
    assert "18 cells only the active model gets right against 0" in message
    assert "accuracy 20.0% against 80.0%" in message
    assert "fell from 96.0% to 60.0%" in message
    assert "sign test" in message and "2 points" in message  # the rule itself


def test_the_sign_test_refuses_at_alpha_and_not_above():
    active, cand = _cells(10, 5, 0, 0)  # p = 1/32 = 0.03125
    assert not decide(active, cand, 0.9, 0.9).passed
    assert decide(active, cand, 0.9, 0.9, GateRule(alpha=0.03)).passed
    active, cand = _cells(10, 4, 0, 0)  # p = 1/16
    assert decide(active, cand, 0.9, 0.9).passed


def test_forgetting_beyond_the_tolerance_is_refused():
    active, cand = _cells(20, 0, 0, 0)
    assert decide(active, cand, 0.95, 0.93).passed  # exactly two points
    refused = decide(active, cand, 0.95, 0.929)
    assert not refused.passed and "fell from 95.0% to 92.9%" in refused.message
    assert decide(active, cand, 0.95, 0.90, GateRule(tolerance=0.05)).passed
    unscored = decide(active, cand, None, None)
    assert not unscored.passed and "could not be scored" in unscored.message


def test_too_few_audit_cells_are_refused():
    active, cand = _cells(9, 0, 0, 0)
    result = decide(active, cand, 0.9, 0.9)
    assert not result.passed
    assert "only 9 reviewed audit cells, the gate needs at least 10" in result.message
    assert decide(active, cand, 0.9, 0.9, GateRule(min_audit=9)).passed


def test_the_bootstrap_interval_brackets_the_accuracy():
    assert accuracy_ci([]) is None
    assert accuracy_ci([True] * 8) == (1.0, 1.0)
    low, high = accuracy_ci([True] * 30 + [False] * 10)
    assert low < 0.75 < high and low > 0.55 and high < 0.9
    assert accuracy_ci([True] * 30 + [False] * 10) == (low, high)  # seeded
