"""Decisions: cell referral, thresholds, patient aggregation and the patient referral rule."""

import numpy as np
import pytest

from leukotree.errors import LeukotreeError
from leukotree.inference.decisions import (
    aggregate_patients,
    calibrate_thresholds,
    decide,
    decide_patient,
    domain_shift,
    parse_thresholds,
)
from leukotree.taxonomy import load_taxonomy
from leukotree.tree import node_probabilities

TAX = load_taxonomy("leukemia7")  # leaves: Normal Reactive ALL AML APML CLL CML


def _node_p(leaf_probs):
    return node_probabilities(TAX, np.array([leaf_probs], dtype=float))[0]


def test_decide_refers_at_the_first_unconfident_level():
    # P(Leukemia) = 0.9; P(Acute) = 0.8 -> P(Acute|Leukemia) = 0.889;
    # ALL 0.4, AML 0.35, APML 0.05 -> P(ALL|Acute) = 0.5
    p = _node_p([0.05, 0.05, 0.4, 0.35, 0.05, 0.05, 0.05])
    leaf, node, refer, conds = decide(TAX, p, [0.8, 0.8, 0.8])
    assert leaf == "ALL" and node == "Acute" and refer is True
    assert conds == pytest.approx([0.9, 0.8 / 0.9, 0.5])
    leaf, node, refer, _ = decide(TAX, p, [0.5, 0.5, 0.5])
    assert (leaf, node, refer) == ("ALL", "ALL", False)
    # a confident root choice of a depth-1 leaf is never referred at deeper levels
    leaf, node, refer, _ = decide(TAX, _node_p([0.9, 0.1, 0, 0, 0, 0, 0]), [0.8, 0.99, 0.99])
    assert (leaf, node, refer) == ("Normal", "Normal", False)


def test_greedy_and_argmax_decoding_can_differ():
    # Normal 0.3 is the most probable leaf, but Leukemia (0.6) beats Normal at the root.
    p = _node_p([0.3, 0.1, 0.2, 0.2, 0.2, 0.0, 0.0])
    assert decide(TAX, p, [0, 0, 0], "argmax")[0] == "Normal"
    assert decide(TAX, p, [0, 0, 0], "greedy")[0] in {"ALL", "AML", "APML"}
    with pytest.raises(LeukotreeError, match="decode"):
        decide(TAX, p, [0, 0, 0], "beam")


def test_parse_thresholds():
    assert parse_thresholds(None, 3) == [0, 0, 0]
    assert parse_thresholds("0.7", 3) == [0.7] * 3
    assert parse_thresholds("0.9,0.8,0.7", 3) == [0.9, 0.8, 0.7]
    for bad in ("0.9,0.8", "x", "1.5"):
        with pytest.raises(LeukotreeError, match="confidence"):
            parse_thresholds(bad, 3)


def test_calibrated_thresholds_meet_the_target_error():
    rng = np.random.default_rng(0)
    truth, probs = [], []
    for _ in range(200):
        leaf = int(rng.integers(0, 7))
        row = rng.dirichlet(np.ones(7))
        row[leaf] += rng.uniform(0, 2)
        truth.append(TAX.leaves[leaf])
        probs.append(row / row.sum())
    probs = np.array(probs)
    thresholds = calibrate_thresholds(TAX, truth, probs, target_error=0.1)
    node_p = node_probabilities(TAX, probs)
    # root level: accepted decisions (conf >= threshold) err at most 10 %
    cols = [TAX.node_index[c] for c in TAX.children(TAX.root)]
    conf = node_p[:, cols].max(1)
    hit = node_p[:, cols].argmax(1) == TAX.encode_heads(truth)[:, 0]
    accepted = conf >= thresholds[0]
    assert accepted.any()
    assert 1 - hit[accepted].mean() <= 0.1 + 1e-9



# Three leaves (columns 0 1 2).
PATIENTS = ["A", "A", "A", "B", "B", None, "C"]
PAT_P = np.array([
    [0.6, 0.3, 0.1],  # A: votes 0
    [0.5, 0.4, 0.1],  # A: votes 0
    [0.2, 0.7, 0.1],  # A: votes 1
    [0.5, 0.45, 0.05],  # B: votes 0
    [0.05, 0.9, 0.05],  # B: votes 1
    [0.0, 0.0, 1.0],  # no patient: skipped
    [0.1, 0.2, 0.7],  # C: votes 2
])


def test_aggregate_patients_majority_with_tie_break_and_skips():
    out = aggregate_patients(PATIENTS, PAT_P)
    assert list(out) == ["A", "B", "C"]  # None skipped, sorted
    # A: votes 0,0,1 -> leaf 0; shares 2/3, 1/3, 0
    assert out["A"]["n_cells"] == 3 and out["A"]["decision"] == 0
    assert out["A"]["vote_shares"] == pytest.approx([2 / 3, 1 / 3, 0])
    # mean of A = [1.3, 1.4, 0.3] / 3
    assert out["A"]["mean_probs"] == pytest.approx([1.3 / 3, 1.4 / 3, 0.1])
    # B: one vote each for 0 and 1; mean P(0) = 0.275 < mean P(1) = 0.675 -> 1
    assert out["B"]["decision"] == 1
    assert out["B"]["vote_shares"] == pytest.approx([0.5, 0.5, 0.0])
    # C: single cell, leaf 2
    assert out["C"]["decision"] == 2 and out["C"]["n_cells"] == 1
    for agg in out.values():
        assert agg["vote_shares"].sum() == pytest.approx(1.0)
        assert agg["mean_probs"].sum() == pytest.approx(1.0)


def test_aggregate_patients_mean_method():
    out = aggregate_patients(PATIENTS, PAT_P, method="mean")
    # A: mean [0.433, 0.467, 0.1] -> 1 (majority said 0)
    assert out["A"]["decision"] == 1
    assert out["B"]["decision"] == 1  # [0.275, 0.675, 0.05]
    assert out["C"]["decision"] == 2


@pytest.mark.parametrize("method", ["majority", "mean"])
def test_aggregate_patients_min_cells_marks_insufficient(method):
    out = aggregate_patients(PATIENTS, PAT_P, method=method, min_cells=2)
    assert out["C"]["decision"] is None  # 1 cell < 2
    assert out["C"]["n_cells"] == 1
    assert out["C"]["vote_shares"] == pytest.approx([0, 0, 1])  # still reported
    assert out["A"]["decision"] is not None and out["B"]["decision"] is not None
    out = aggregate_patients(PATIENTS, PAT_P, method=method, min_cells=4)
    assert all(a["decision"] is None for a in out.values())


def test_aggregate_patients_rejects_unknown_method():
    with pytest.raises(LeukotreeError, match="majority or mean"):
        aggregate_patients(PATIENTS, PAT_P, method="median")


def test_aggregate_patients_without_any_patient_is_empty():
    assert aggregate_patients([None, None], PAT_P[:2]) == {}




def test_patient_referral_by_level_and_by_vote_share():
    # Four cells: three vote ALL, one AML; the mean is ALL 0.52, AML 0.33, APML 0.05...
    cells = np.array([
        [0.02, 0.02, 0.60, 0.30, 0.02, 0.02, 0.02],
        [0.02, 0.02, 0.60, 0.30, 0.02, 0.02, 0.02],
        [0.02, 0.02, 0.60, 0.30, 0.02, 0.02, 0.02],
        [0.02, 0.02, 0.28, 0.60, 0.04, 0.02, 0.02],
    ])
    agg = aggregate_patients(["p"] * 4, cells)["p"]
    # P(ALL | Acute) = 0.52 / (0.52 + 0.375 + 0.025) = 0.565: confident at 0.5, not at 0.6.
    ok = decide_patient(TAX, "p", agg, [0.5, 0.5, 0.5], "majority", 1)
    assert (ok.leaf, ok.refer, ok.reported_node, ok.reason) == ("ALL", False, "ALL", "")
    unsure = decide_patient(TAX, "p", agg, [0.5, 0.5, 0.6], "majority", 1)
    assert unsure.refer and unsure.reported_node == "Acute"
    assert "Leukemia > Acute" in unsure.reason
    # vote share 0.75 below a last-level threshold of 0.8 refers a majority vote only
    votes = decide_patient(TAX, "p", agg, [0.0, 0.0, 0.8], "majority", 1)
    assert votes.refer and votes.reported_node == "Acute"
    assert not decide_patient(TAX, "p", agg, [0.0, 0.0, 0.5], "mean", 1).refer
    # too few cells: no diagnosis, referred, with the count in the reason
    few = decide_patient(TAX, "p", aggregate_patients(["p"] * 4, cells, min_cells=5)["p"],
                         [0.5] * 3, "majority", 5)
    assert few.leaf is None and few.refer and "4 cell(s), at least 5" in few.reason


def test_a_majority_diagnosis_is_referred_along_its_own_path():
    # Three cells weakly ALL, two strongly AML: the vote says ALL, the mean says AML.
    weak_all = [0.02, 0.02, 0.40, 0.36, 0.16, 0.02, 0.02]
    strong_aml = [0.01, 0.01, 0.02, 0.93, 0.01, 0.01, 0.01]
    agg = aggregate_patients(["p"] * 5, np.array([weak_all] * 3 + [strong_aml] * 2))["p"]
    d = decide_patient(TAX, "p", agg, [0.5, 0.5, 0.5], "majority", 1)
    assert d.leaf == "ALL"
    assert d.reported_node in TAX.path("ALL")  # never a node off the diagnosed path
    assert d.refer  # P(ALL | Acute) = 0.252 / 0.936 is below 0.5


def test_the_domain_shift_alarm_needs_more_than_twice_the_expected_share_and_a_small_p():
    flags = lambda k, n=100: np.arange(n) < k  # noqa: E731
    assert domain_shift(flags(5), 0.05) is None
    assert domain_shift(flags(10), 0.05) is None  # exactly twice: no alarm
    assert domain_shift(flags(2, 10), 0.05) is None  # 20% of 10 cells: p = 0.086
    alarm = domain_shift(flags(30), 0.05)
    assert "30 of 100 cells (30%)" in alarm and "flags 5% of its own" in alarm
    assert "over-confident" in alarm
