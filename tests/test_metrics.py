"""Metrics of tree classifiers on small hand-computed cases (the arithmetic is in comments).

Leaf order of ``leukemia7`` (pre-order): Normal, Reactive, ALL, AML, APML, CLL, CML.
Tree: root -> Normal | Reactive | Leukemia; Leukemia -> Acute | Chronic;
Acute -> ALL | AML | APML; Chronic -> CLL | CML. Node sets exclude the root.
"""

import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from conftest import LEUKEMIA7_LEAVES, leaf_row
from leukotree.errors import LeukotreeError
from leukotree.metrics import (
    binary_metrics,
    brier_score,
    classification_metrics,
    expected_calibration_error,
    hierarchical_prf,
    per_node_accuracy,
    reliability_bins,
    threshold_for_sensitivity,
)

LEAVES = LEUKEMIA7_LEAVES
row = leaf_row


def test_leaf_order_is_what_the_hand_computations_assume(leukemia7):
    assert leukemia7.leaves == LEAVES
    assert leukemia7.inner_nodes == ("root", "Leukemia", "Acute", "Chronic")


# --------------------------------------------------------------- hierarchical P/R/F


def test_hierarchical_prf_mixed_case(leukemia7):
    # T: {Leukemia, Acute, ALL}, {Leukemia, Chronic, CLL}, {Normal}     -> sum |T| = 3+3+1 = 7
    # P: {Leukemia, Acute, AML}, {Leukemia, Chronic, CLL}, {Leukemia, Acute, ALL}
    #                                                                   -> sum |P| = 3+3+3 = 9
    # |P & T| = 2 (Leukemia, Acute) + 3 + 0 = 5
    # hP = 5/9, hR = 5/7, hF = 2 * 5/9 * 5/7 / (5/9 + 5/7) = 10/16 = 0.625
    out = hierarchical_prf(leukemia7, ["ALL", "CLL", "Normal"], ["AML", "CLL", "ALL"])
    assert out["hP"] == pytest.approx(5 / 9)
    assert out["hR"] == pytest.approx(5 / 7)
    assert out["hF"] == pytest.approx(2 * (5 / 9) * (5 / 7) / (5 / 9 + 5 / 7))
    assert out["hF"] == pytest.approx(0.625)


def test_hierarchical_prf_leaves_at_different_depths(leukemia7):
    # truth Normal (depth 1), pred ALL (depth 3): T = {Normal}, P = {Leukemia, Acute, ALL}
    #   -> |P & T| = 0, |P| = 3, |T| = 1
    # truth ALL, pred Normal: T = {Leukemia, Acute, ALL}, P = {Normal} -> 0, |P| = 1, |T| = 3
    # truth Reactive, pred Reactive: 1, 1, 1
    # totals: inter 1, |P| = 3+1+1 = 5, |T| = 1+3+1 = 5 -> hP = hR = hF = 1/5
    out = hierarchical_prf(leukemia7, ["Normal", "ALL", "Reactive"],
                           ["ALL", "Normal", "Reactive"])
    assert out == pytest.approx({"hP": 0.2, "hR": 0.2, "hF": 0.2})
    # Only the first pair: hP = 0/3, hR = 0/1 -> all zero (no division by zero).
    assert hierarchical_prf(leukemia7, ["Normal"], ["ALL"]) == {"hP": 0.0, "hR": 0.0,
                                                                "hF": 0.0}


def test_hierarchical_prf_inner_node_truth_costs_precision_not_recall(leukemia7):
    # truth "Acute": T = {Leukemia, Acute}; pred ALL: P = {Leukemia, Acute, ALL}
    # |P & T| = 2, |P| = 3, |T| = 2 -> hP = 2/3, hR = 1, hF = 2 * 2/3 / (5/3) = 0.8
    out = hierarchical_prf(leukemia7, ["Acute"], ["ALL"])
    assert out == pytest.approx({"hP": 2 / 3, "hR": 1.0, "hF": 0.8})
    # With a correct leaf beside it: inter 2+3 = 5, |P| = 3+3 = 6, |T| = 2+3 = 5
    out = hierarchical_prf(leukemia7, ["Acute", "CML"], ["ALL", "CML"])
    assert out["hP"] == pytest.approx(5 / 6)
    assert out["hR"] == pytest.approx(1.0)


def test_hierarchical_prf_perfect_predictions(leukemia7):
    truth = ["Normal", "Reactive", "ALL", "AML", "APML", "CLL", "CML"]
    assert hierarchical_prf(leukemia7, truth, truth) == {"hP": 1.0, "hR": 1.0, "hF": 1.0}


def test_hierarchical_prf_needs_equal_lengths(leukemia7):
    with pytest.raises(ValueError):
        hierarchical_prf(leukemia7, ["ALL", "CLL"], ["ALL"])


# --------------------------------------------------------------- per-node accuracy


def test_per_node_accuracy_hand_computed(leukemia7):
    truth = ["Normal", "Reactive", "ALL", "CML", "Acute", "APML"]
    probs = np.array([
        # Normal: root Normal .5 vs Reactive .1 vs Leukemia .4 -> Normal (right)
        row(Normal=0.5, Reactive=0.1, ALL=0.1, AML=0.1, APML=0.1, CLL=0.05, CML=0.05),
        # Reactive: root Normal .5 vs Reactive .3 vs Leukemia .2 -> Normal (wrong)
        row(Normal=0.5, Reactive=0.3, ALL=0.05, AML=0.05, CLL=0.05, CML=0.05),
        # ALL: root Leukemia .8 (right); Acute .5 vs Chronic .3 (right); AML .3 > ALL .2 (wrong)
        row(Normal=0.1, Reactive=0.1, ALL=0.2, AML=0.3, CLL=0.2, CML=0.1),
        # CML: root Leukemia .9 (right); Acute .5 vs Chronic .4 (wrong);
        #      Chronic head on its own: CML .3 > CLL .1 (right)
        row(Reactive=0.1, ALL=0.3, AML=0.1, APML=0.1, CLL=0.1, CML=0.3),
        # Acute: root Leukemia .9 (right); Acute .3 vs Chronic .6 (wrong); not counted at Acute
        row(Normal=0.1, ALL=0.1, AML=0.1, APML=0.1, CLL=0.3, CML=0.3),
        # APML: root Leukemia 1 (right); Acute .8 (right); APML .6 (right)
        row(ALL=0.1, AML=0.1, APML=0.6, CLL=0.1, CML=0.1),
    ])
    out = per_node_accuracy(leukemia7, truth, probs)
    assert set(out) == {"root", "Leukemia", "Acute", "Chronic"}
    # root: all 6 images continue below it; right: Normal, ALL, CML, Acute, APML -> 5/6
    assert out["root"]["n"] == 6 and out["root"]["accuracy"] == pytest.approx(5 / 6)
    # Leukemia: ALL, CML, Acute, APML -> n 4; right: ALL, APML -> 2/4
    assert out["Leukemia"]["n"] == 4 and out["Leukemia"]["accuracy"] == pytest.approx(0.5)
    # Acute: ALL, APML ("Acute" stops at the node) -> n 2; right: APML -> 1/2
    assert out["Acute"]["n"] == 2 and out["Acute"]["accuracy"] == pytest.approx(0.5)
    # Chronic: CML -> n 1, right -> 1/1
    assert out["Chronic"]["n"] == 1 and out["Chronic"]["accuracy"] == pytest.approx(1.0)
    assert out["root"]["children"] == ["Normal", "Reactive", "Leukemia"]
    assert out["Acute"]["children"] == ["ALL", "AML", "APML"]


def test_per_node_accuracy_of_a_node_without_images_is_none(leukemia7):
    probs = np.array([row(Normal=0.6, Reactive=0.4), row(Normal=0.2, Reactive=0.7, ALL=0.1)])
    out = per_node_accuracy(leukemia7, ["Normal", "Normal"], probs)
    # root: Normal .6 (right), Reactive .7 (wrong) -> 1/2
    assert out["root"] == {"accuracy": 0.5, "n": 2,
                           "children": ["Normal", "Reactive", "Leukemia"]}
    for node in ("Leukemia", "Acute", "Chronic"):
        assert out[node]["accuracy"] is None and out[node]["n"] == 0


def test_per_node_accuracy_counts_acute_label_at_root_and_leukemia_only(leukemia7):
    out = per_node_accuracy(leukemia7, ["Acute"], np.array([row(ALL=1.0)]))
    assert (out["root"]["n"], out["Leukemia"]["n"], out["Acute"]["n"]) == (1, 1, 0)
    assert out["root"]["accuracy"] == out["Leukemia"]["accuracy"] == 1.0
    assert out["Acute"]["accuracy"] is None


# --------------------------------------------------------------- calibration

# Two classes. Top-label confidence / hit:
#   [0.90, 0.10], true 0 -> 0.90 hit
#   [0.55, 0.45], true 1 -> 0.55 miss
#   [0.75, 0.25], true 0 -> 0.75 hit
#   [0.30, 0.70], true 1 -> 0.70 hit
CAL_P = np.array([[0.9, 0.1], [0.55, 0.45], [0.75, 0.25], [0.3, 0.7]])
CAL_Y = np.array([0, 1, 0, 1])


def test_expected_calibration_error_hand_computed():
    # bins=5, edges 0 .2 .4 .6 .8 1:
    #   (.4, .6]: {0.55 miss}     -> 1/4 * |0 - 0.55|          = 0.1375
    #   (.6, .8]: {0.75, 0.70 hit} -> 2/4 * |1 - 0.725|        = 0.1375
    #   (.8, 1]:  {0.90 hit}       -> 1/4 * |1 - 0.90|         = 0.025
    #   ECE = 0.3
    assert expected_calibration_error(CAL_P, CAL_Y, bins=5) == pytest.approx(0.3)
    # bins=1: |acc 3/4 - mean conf (0.9+0.55+0.75+0.7)/4 = 0.725| = 0.025
    assert expected_calibration_error(CAL_P, CAL_Y, bins=1) == pytest.approx(0.025)
    # perfectly confident and right -> 0
    assert expected_calibration_error(np.eye(3), np.arange(3)) == pytest.approx(0.0)
    assert math.isnan(expected_calibration_error(np.zeros((0, 2)), np.zeros(0, int)))


def test_brier_score_hand_computed():
    # (0.9-1)^2 + 0.1^2 = 0.02;  0.55^2 + (0.45-1)^2 = 0.605;
    # 2 * 0.25^2 = 0.125;        0.3^2 + (0.7-1)^2 = 0.18
    # mean = (0.02 + 0.605 + 0.125 + 0.18) / 4 = 0.93 / 4 = 0.2325
    assert brier_score(CAL_P, CAL_Y) == pytest.approx(0.2325)
    assert brier_score(np.eye(2), np.array([0, 1])) == pytest.approx(0.0)
    # totally wrong one-hot: 1 + 1 = 2
    assert brier_score(np.array([[0.0, 1.0]]), np.array([0])) == pytest.approx(2.0)
    assert math.isnan(brier_score(np.zeros((0, 2)), np.zeros(0, int)))


def test_reliability_bins_hand_computed():
    out = reliability_bins(CAL_P, CAL_Y, bins=5)
    assert out["count"] == [0, 0, 1, 2, 1]
    assert sum(out["count"]) == len(CAL_P)
    assert np.isnan(out["confidence"][:2]).all() and np.isnan(out["accuracy"][:2]).all()
    assert out["confidence"][2:] == pytest.approx([0.55, 0.725, 0.9])
    assert out["accuracy"][2:] == pytest.approx([0.0, 1.0, 1.0])
    assert len(reliability_bins(CAL_P, CAL_Y)["count"]) == 10  # default bins


# --------------------------------------------------------------- binary metrics

# 8 cases, positives first:  p = 0.9 0.8 0.6 0.4 0.3 | 0.7 0.2 0.1
#                            y = 1   1   1   1   1   | 0   0   0
# at threshold 0.5: predicted positive = 0.9 0.8 0.6 | 0.7
BIN_P = np.array([0.9, 0.8, 0.6, 0.4, 0.3, 0.7, 0.2, 0.1])
BIN_Y = np.array([1, 1, 1, 1, 1, 0, 0, 0])


def test_binary_metrics_hand_computed():
    out = binary_metrics(BIN_P, BIN_Y, 0.5)
    # tp = 3 (0.9 0.8 0.6), fn = 2 (0.4 0.3), fp = 1 (0.7), tn = 2 (0.2 0.1)
    assert (out["tp"], out["tn"], out["fp"], out["fn"]) == (3, 2, 1, 2)
    assert out["threshold"] == 0.5
    assert out["sensitivity"] == pytest.approx(3 / 5)  # 3 / (3+2)
    assert out["specificity"] == pytest.approx(2 / 3)  # 2 / (2+1)
    assert out["ppv"] == pytest.approx(3 / 4)  # 3 / (3+1)
    assert out["npv"] == pytest.approx(2 / 4)  # 2 / (2+2)
    assert out["prevalence"] == pytest.approx(5 / 8)
    assert out["f1"] == pytest.approx(6 / 9)  # 2*3 / (2*3 + 1 + 2)
    assert out["accuracy"] == pytest.approx(5 / 8)  # (3+2) / 8
    # AUC: pairs (pos > neg) of 5x3 = 15: 0.9->3, 0.8->3, 0.6->2, 0.4->2, 0.3->2 = 12/15
    assert out["auc"] == pytest.approx(0.8)
    assert out["auc"] == pytest.approx(roc_auc_score(BIN_Y, BIN_P))


def test_binary_metrics_threshold_is_inclusive():
    # threshold 0.6: p >= 0.6 -> 0.9 0.8 0.6 (pos) + 0.7 (neg): same counts as 0.5
    out = binary_metrics(BIN_P, BIN_Y, 0.6)
    assert (out["tp"], out["tn"], out["fp"], out["fn"]) == (3, 2, 1, 2)
    # threshold 0.65: 0.6 drops out -> tp 2, fn 3
    out = binary_metrics(BIN_P, BIN_Y, 0.65)
    assert (out["tp"], out["tn"], out["fp"], out["fn"]) == (2, 2, 1, 3)


def test_binary_metrics_nan_when_a_denominator_is_zero():
    # no positives at all; threshold above every score -> nothing predicted positive
    out = binary_metrics(np.array([0.1, 0.2, 0.3]), np.array([0, 0, 0]), 0.5)
    assert (out["tp"], out["tn"], out["fp"], out["fn"]) == (0, 3, 0, 0)
    assert math.isnan(out["sensitivity"])  # tp + fn = 0
    assert math.isnan(out["ppv"])  # tp + fp = 0
    assert math.isnan(out["f1"])  # 2tp + fp + fn = 0
    assert math.isnan(out["auc"])  # one class only
    assert out["specificity"] == 1.0 and out["npv"] == 1.0
    assert out["prevalence"] == 0.0 and out["accuracy"] == 1.0
    # all positive, all predicted positive: specificity and npv undefined
    out = binary_metrics(np.array([0.9, 0.8]), np.array([1, 1]), 0.5)
    assert math.isnan(out["specificity"]) and math.isnan(out["npv"])
    assert out["sensitivity"] == 1.0 and out["ppv"] == 1.0


def test_threshold_for_sensitivity_is_the_highest_reaching_the_target():
    p = np.array([0.9, 0.8, 0.7, 0.6, 0.2, 0.65, 0.5, 0.1])
    y = np.array([1, 1, 1, 1, 1, 0, 0, 0])
    # 5 positives; sensitivity >= 0.8 needs 4 of them at or above the threshold.
    # Sorted positives 0.2 0.6 0.7 0.8 0.9 -> the 4th highest is 0.6.
    thr = threshold_for_sensitivity(p, y, 0.8)
    assert thr == pytest.approx(0.6)
    assert binary_metrics(p, y, thr)["sensitivity"] >= 0.8
    # anything higher loses a positive: 3/5 = 0.6 < 0.8
    assert binary_metrics(p, y, thr + 1e-9)["sensitivity"] == pytest.approx(0.6)
    assert binary_metrics(p, y, 0.7)["sensitivity"] == pytest.approx(0.6)
    # target 1: every positive -> the lowest positive score
    assert threshold_for_sensitivity(p, y, 1.0) == pytest.approx(0.2)
    # target 0.2: 1 positive suffices -> the highest positive score
    assert threshold_for_sensitivity(p, y, 0.2) == pytest.approx(0.9)
    # target 0.6: 3 positives -> 0.7
    assert threshold_for_sensitivity(p, y, 0.6) == pytest.approx(0.7)


@pytest.mark.parametrize("target", [0.0, -0.1, 1.01, 2.0])
def test_threshold_for_sensitivity_rejects_bad_targets(target):
    with pytest.raises(LeukotreeError, match="target sensitivity"):
        threshold_for_sensitivity(np.array([0.9, 0.1]), np.array([1, 0]), target)


def test_threshold_for_sensitivity_needs_positives():
    with pytest.raises(LeukotreeError, match="No positive"):
        threshold_for_sensitivity(np.array([0.9, 0.1]), np.array([0, 0]), 0.9)


# --------------------------------------------------------------- classification_metrics

CM_TRUTH = ["ALL", "ALL", "AML", "CLL", "Normal", "Acute"]
CM_P = np.array([
    row(Normal=0.05, Reactive=0.05, ALL=0.6, AML=0.1, APML=0.1, CLL=0.05, CML=0.05),  # ALL
    row(Normal=0.05, Reactive=0.05, ALL=0.2, AML=0.5, APML=0.1, CLL=0.05, CML=0.05),  # AML
    row(Normal=0.05, Reactive=0.05, ALL=0.1, AML=0.6, APML=0.1, CLL=0.05, CML=0.05),  # AML
    row(Normal=0.05, Reactive=0.05, ALL=0.05, AML=0.05, APML=0.05, CLL=0.3,
        CML=0.45),  # CML
    row(Normal=0.7, Reactive=0.1, ALL=0.05, AML=0.05, APML=0.05, CLL=0.025,
        CML=0.025),  # Normal
    row(Normal=0.05, Reactive=0.05, ALL=0.1, AML=0.1, APML=0.6, CLL=0.05, CML=0.05),  # APML
])


def test_classification_metrics_leaf_level_matches_sklearn(leukemia7):
    m = classification_metrics(leukemia7, CM_TRUTH, CM_P)
    assert m["n_images"] == 6 and m["n_leaf_labelled"] == 5
    assert m["leaves_present"] == ["Normal", "ALL", "AML", "CLL"]
    assert m["leaves_absent"] == ["Reactive", "APML", "CML"]
    # leaf-labelled rows 1-5: right ALL, AML, Normal -> 3/5 ("Acute" row excluded)
    assert m["accuracy"] == pytest.approx(3 / 5)
    y = [2, 2, 3, 5, 0]
    yp = [2, 3, 3, 6, 0]
    assert m["accuracy"] == pytest.approx(accuracy_score(y, yp))
    # F1 over present leaves: Normal 1, ALL 2*1*0.5/1.5 = 2/3, AML 2*0.5*1/1.5 = 2/3, CLL 0
    #   macro = (1 + 2/3 + 2/3 + 0) / 4 = 7/12; CML (predicted, never true) is not averaged
    assert m["macro_f1"] == pytest.approx(7 / 12)
    assert m["macro_f1"] == pytest.approx(
        f1_score(y, yp, labels=[0, 2, 3, 5], average="macro", zero_division=0))
    # weighted by support 1, 2, 1, 1: (1 + 2*2/3 + 2/3 + 0) / 5 = 3/5
    assert m["weighted_f1"] == pytest.approx(3 / 5)
    assert set(m["per_class"]) == {"Normal", "ALL", "AML", "CLL"}
    assert m["per_class"]["ALL"] == pytest.approx(
        {"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert m["per_class"]["AML"] == pytest.approx(
        {"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1})
    assert m["per_class"]["CLL"] == pytest.approx(
        {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1})


def test_classification_metrics_confusion_matrix_covers_every_leaf(leukemia7):
    m = classification_metrics(leukemia7, CM_TRUTH, CM_P)
    cm = np.array(m["confusion_matrix"]["matrix"])
    assert m["confusion_matrix"]["labels"] == list(LEAVES)
    assert cm.shape == (7, 7)
    assert cm.sum() == 5  # the "Acute" image is not in the leaf confusion matrix
    expected = np.zeros((7, 7), int)
    for t, p in [(2, 2), (2, 3), (3, 3), (5, 6), (0, 0)]:  # (true, predicted) leaf index
        expected[t, p] += 1
    assert (cm == expected).all()


def test_classification_metrics_inner_label_counts_in_tree_and_hierarchical(leukemia7):
    m = classification_metrics(leukemia7, CM_TRUTH, CM_P)
    # tree accuracy: the "Acute" image predicted APML lies under Acute -> right;
    #   right = ALL, AML, Normal, Acute -> 4/6
    assert m["tree_accuracy"] == pytest.approx(4 / 6)
    # hierarchical (inter, |P|, |T|): ALL->ALL 3,3,3; ALL->AML 2,3,3; AML->AML 3,3,3;
    #   CLL->CML 2,3,3; Normal->Normal 1,1,1; Acute->APML 2,3,2
    #   inter 13, |P| 16, |T| 15
    assert m["hierarchical"]["hP"] == pytest.approx(13 / 16)
    assert m["hierarchical"]["hR"] == pytest.approx(13 / 15)
    # per node: root 6/6 (row Normal: Normal .7 vs Leukemia .2; others Leukemia);
    #   Leukemia (ALL, ALL, AML, CLL, Acute) 5/5; Acute (ALL, ALL, AML) right: ALL, AML -> 2/3;
    #   Chronic (CLL) predicted CML -> 0/1
    pn = m["per_node"]
    assert (pn["root"]["n"], pn["root"]["accuracy"]) == (6, 1.0)
    assert (pn["Leukemia"]["n"], pn["Leukemia"]["accuracy"]) == (5, 1.0)
    assert pn["Acute"]["n"] == 3 and pn["Acute"]["accuracy"] == pytest.approx(2 / 3)
    assert (pn["Chronic"]["n"], pn["Chronic"]["accuracy"]) == (1, 0.0)
    assert set(m["calibration"]) == {"leaves", "per_node"}
    assert set(m["calibration"]["per_node"]) == {"root", "Leukemia", "Acute", "Chronic"}
    # leaf calibration only on the 5 leaf-labelled rows
    leaf_rows = CM_P[:5]
    assert m["calibration"]["leaves"]["brier"] == pytest.approx(
        brier_score(leaf_rows, np.array([2, 2, 3, 5, 0])))


def test_classification_metrics_auroc_over_present_leaves(leukemia7):
    m = classification_metrics(leukemia7, CM_TRUTH, CM_P)
    # one-vs-rest macro AUROC over the 4 present leaves, probabilities renormalised among them
    present = [0, 2, 3, 5]
    sub = CM_P[:5][:, present]
    sub = sub / sub.sum(1, keepdims=True)
    expected = roc_auc_score([2, 2, 3, 5, 0], sub, multi_class="ovr", labels=present,
                             average="macro")
    assert m["auroc_macro"] == pytest.approx(expected)
    assert 0 <= m["auroc_macro"] <= 1


def test_classification_metrics_only_inner_labels(leukemia7):
    m = classification_metrics(leukemia7, ["Acute", "Chronic"],
                               np.array([row(ALL=1.0), row(ALL=1.0)]))
    assert m["n_leaf_labelled"] == 0
    assert "accuracy" not in m and "confusion_matrix" not in m
    assert m["leaves_absent"] == list(LEAVES)
    assert m["tree_accuracy"] == pytest.approx(0.5)  # ALL is under Acute, not under Chronic


def test_classification_metrics_auroc_with_two_present_leaves_of_seven(leukemia7):
    # Regression (fixed): metrics._auroc returns None when exactly two leaves of a >2-leaf taxonomy
    # are present: it passes an (N, 2) score matrix to roc_auc_score(multi_class="ovr"),
    # which sklearn treats as a binary problem and rejects ("y should be a 1d array"); the
    # ValueError is swallowed and auroc_macro becomes None.
    # Hand computation (scores renormalised among the present leaves ALL, CLL, as the
    # function does for >= 3 present leaves): P(CLL | ALL or CLL) =
    #   ALL rows: .2/.8 = .25, .3/.6 = .5;  CLL rows: .4/.5 = .8, .2/.5 = .4
    #   pairs CLL > ALL: .8>.25, .8>.5, .4>.25, .4<.5 -> 3/4; the ALL-vs-rest AUROC is the
    #   same (complementary scores), so macro = 0.75.
    truth = ["ALL", "ALL", "CLL", "CLL"]
    probs = np.array([row(ALL=0.6, CLL=0.2, Normal=0.2), row(ALL=0.3, CLL=0.3, Normal=0.4),
                      row(ALL=0.1, CLL=0.4, Normal=0.5), row(ALL=0.3, CLL=0.2, Normal=0.5)])
    m = classification_metrics(leukemia7, truth, probs)
    assert m["auroc_macro"] == pytest.approx(0.75)


def test_classification_metrics_two_leaf_taxonomy_auroc():
    from leukotree.taxonomy import load_taxonomy

    cnmc = load_taxonomy("cnmc")  # leaves: all, hem
    assert cnmc.leaves == ("all", "hem")
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.6, 0.4]])
    truth = ["all", "all", "hem", "hem"]
    m = classification_metrics(cnmc, truth, probs)
    # P(hem): all rows .1 .6, hem rows .7 .4 -> pairs: .7>.1, .7>.6, .4>.1, .4<.6 -> 3/4
    assert m["auroc_macro"] == pytest.approx(0.75)
    # argmax: all, hem, hem, all -> 2/4
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["leaves_absent"] == []
