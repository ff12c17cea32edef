"""Decisions: cell referral, thresholds, patient aggregation and the patient referral rule."""

import numpy as np
import pytest

from leukotree.errors import LeukotreeError
from leukotree.inference.decisions import (
    calibrate_thresholds,
    decide,
    decide_patients,
    domain_shift,
    parse_thresholds,
)
from leukotree.taxonomy import Taxonomy, load_taxonomy
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


TAX3 = Taxonomy.from_dict({"name": "three", "root": "r", "tree": {"x": None, "y": None,
                                                                  "z": None}})


def _by_patient(method="majority", min_cells=1, patients=PATIENTS, probs=PAT_P):
    decisions = decide_patients(TAX3, patients, probs, thresholds=[0.0], aggregate=method,
                                min_cells=min_cells)
    return {d.patient: d for d in decisions}


def test_majority_vote_with_tie_break_and_skips():
    out = _by_patient()
    assert list(out) == ["A", "B", "C"]  # None skipped, sorted
    # A: votes 0,0,1 -> leaf 0; shares 2/3, 1/3, 0
    assert out["A"].n_cells == 3 and out["A"].leaf == "x"
    assert out["A"].vote_shares == pytest.approx([2 / 3, 1 / 3, 0])
    assert out["A"].probs == pytest.approx([2 / 3, 1 / 3, 0])  # the vote shares, shown
    # mean of A = [1.3, 1.4, 0.3] / 3
    assert out["A"].mean_probs == pytest.approx([1.3 / 3, 1.4 / 3, 0.1])
    # B: one vote each for 0 and 1; mean P(0) = 0.275 < mean P(1) = 0.675 -> 1
    assert out["B"].leaf == "y"
    assert out["B"].vote_shares == pytest.approx([0.5, 0.5, 0.0])
    # the scores carry the tie-break: (0.5 + 1e-6 * 0.675) > (0.5 + 1e-6 * 0.275)
    assert out["B"].scores.argmax() == 1 and out["B"].scores.sum() == pytest.approx(1)
    # C: single cell, leaf 2
    assert out["C"].leaf == "z" and out["C"].n_cells == 1
    for d in out.values():
        assert d.vote_shares.sum() == pytest.approx(1.0)
        assert d.mean_probs.sum() == pytest.approx(1.0)
        assert d.model == "majority" and d.threshold is None and not d.refer


def test_mean_aggregation():
    out = _by_patient("mean")
    # A: mean [0.433, 0.467, 0.1] -> 1 (majority said 0)
    assert out["A"].leaf == "y" and out["A"].probs == pytest.approx([1.3 / 3, 1.4 / 3, 0.1])
    assert out["B"].leaf == "y"  # [0.275, 0.675, 0.05]
    assert out["C"].leaf == "z"


@pytest.mark.parametrize("method", ["majority", "mean"])
def test_min_cells_marks_insufficient(method):
    out = _by_patient(method, min_cells=2)
    assert out["C"].leaf is None and out["C"].insufficient and out["C"].refer
    assert out["C"].n_cells == 1
    assert out["C"].vote_shares == pytest.approx([0, 0, 1])  # still reported
    assert out["C"].reason == "insufficient: 1 cell(s), at least 2 needed"
    assert out["A"].leaf is not None and out["B"].leaf is not None
    out = _by_patient(method, min_cells=4)
    assert all(d.leaf is None for d in out.values())


def test_unknown_aggregation_is_refused():
    with pytest.raises(LeukotreeError, match="must be one of majority, mean; got 'median'"):
        _by_patient("median")


def test_without_any_patient_there_is_no_decision():
    assert _by_patient(patients=[None, None], probs=PAT_P[:2]) == {}


def _decide_one(cells, thresholds, method="majority", min_cells=1):
    return decide_patients(TAX, ["p"] * len(cells), np.asarray(cells), thresholds=thresholds,
                           aggregate=method, min_cells=min_cells)[0]


def test_patient_referral_by_level_and_by_vote_share():
    # Four cells: three vote ALL, one AML; the mean is ALL 0.52, AML 0.33, APML 0.05...
    cells = np.array([
        [0.02, 0.02, 0.60, 0.30, 0.02, 0.02, 0.02],
        [0.02, 0.02, 0.60, 0.30, 0.02, 0.02, 0.02],
        [0.02, 0.02, 0.60, 0.30, 0.02, 0.02, 0.02],
        [0.02, 0.02, 0.28, 0.60, 0.04, 0.02, 0.02],
    ])
    # P(ALL | Acute) = 0.52 / (0.52 + 0.375 + 0.025) = 0.565: confident at 0.5, not at 0.6.
    ok = _decide_one(cells, [0.5, 0.5, 0.5])
    assert (ok.leaf, ok.refer, ok.reported_node, ok.reason) == ("ALL", False, "ALL", "")
    unsure = _decide_one(cells, [0.5, 0.5, 0.6])
    assert unsure.refer and unsure.reported_node == "Acute"
    assert "Leukemia > Acute" in unsure.reason
    # vote share 0.75 below a last-level threshold of 0.8 refers a majority vote only
    votes = _decide_one(cells, [0.0, 0.0, 0.8])
    assert votes.refer and votes.reported_node == "Acute"
    assert not _decide_one(cells, [0.0, 0.0, 0.5], "mean").refer
    # too few cells: no diagnosis, referred, with the count in the reason
    few = _decide_one(cells, [0.5] * 3, min_cells=5)
    assert few.leaf is None and few.refer and "4 cell(s), at least 5" in few.reason


def test_a_vote_confident_along_its_path_is_still_referred_when_its_share_is_low():
    # Two cells strongly ALL, three weakly Normal, Reactive, CLL: ALL wins the vote with 40%.
    strong = [0.01, 0.01, 0.94, 0.01, 0.01, 0.01, 0.01]
    spread = [[0.4 if j == k else 0.1 for j in range(7)] for k in (0, 1, 5)]
    cells = np.array([strong, strong, *spread])
    # mean ALL = (1.88 + 0.3) / 5 = 0.436, AML = APML = 0.064: P(ALL | Acute) = 0.773
    d = _decide_one(cells, [0.0, 0.0, 0.5])
    assert (d.leaf, d.reported_node, d.refer) == ("ALL", "ALL", True)
    assert d.reason == "40% of the cells vote ALL, below 50%"
    assert not _decide_one(cells, [0.0, 0.0, 0.5], "mean").refer  # a mean has no vote


def test_a_majority_diagnosis_is_referred_along_its_own_path():
    # Three cells weakly ALL, two strongly AML: the vote says ALL, the mean says AML.
    weak_all = [0.02, 0.02, 0.40, 0.36, 0.16, 0.02, 0.02]
    strong_aml = [0.01, 0.01, 0.02, 0.93, 0.01, 0.01, 0.01]
    d = _decide_one(np.array([weak_all] * 3 + [strong_aml] * 2), [0.5, 0.5, 0.5])
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


def _miss_rate_model(two):
    from leukotree.patients.fit import FittedPatientModel
    from leukotree.patients.guarantee import MissRateThreshold
    from leukotree.patients.models import build_patient_model

    promise = MissRateThreshold(threshold=0.2, alpha=0.1, confidence=0.9, n_positive=22,
                                misses=0, p_value=0.9 ** 22)
    return FittedPatientModel(build_patient_model("mean", two, None), "APL", 0.5, "0.5", {},
                              promise)


def test_a_promised_miss_rate_calls_negative_only_below_the_miss_rate_threshold():
    # mean P(APL): N 0.1 < t_miss 0.2 -> negative; R 0.3 in [0.2, 0.5) -> referred;
    # P 0.7 >= 0.5 -> positive. Without the promise R would be called negative.
    two = Taxonomy.from_dict({"name": "two", "root": "AL", "tree": {"APL": None,
                                                                   "AML": None}})
    patients = ["N", "N", "R", "R", "P"]
    probs = np.array([[0.0, 1.0], [0.2, 0.8], [0.3, 0.7], [0.3, 0.7], [0.7, 0.3]])
    model = _miss_rate_model(two)
    got = {d.patient: d for d in decide_patients(two, patients, probs, thresholds=[0.0],
                                                 model=model)}
    assert [got[p].call for p in "NRP"] == ["negative", "referred", "positive"]
    assert [got[p].leaf for p in "NRP"] == ["AML", "AML", "APL"]
    assert [got[p].refer for p in "NRP"] == [False, True, False]
    assert got["R"].reported_node == "AL"  # neither leaf
    assert got["R"].reason == (
        "the evidence is too thin to rule out APL at the stated miss rate (at most 10% of "
        "APL patients missed, with 90% confidence): P(APL) 0.300 is between 0.200 and the "
        "threshold 0.500")
    assert got["N"].miss_rate.alpha == 0.1 and got["N"].threshold == 0.5
    plain = decide_patients(two, patients, probs, thresholds=[0.0],
                            model=_miss_rate_model(two).__class__(
                                model.model, "APL", 0.5, "0.5", {}))
    assert [d.call for d in plain] == ["negative", "positive", "negative"]  # N, P, R
    # a threshold below t_miss: nothing is referred, negative below the threshold
    low = _miss_rate_model(two)
    low.threshold = 0.15
    assert [d.call for d in decide_patients(two, patients, probs, thresholds=[0.0],
                                            model=low)] == ["negative", "positive", "positive"]
    # no patient model: no call
    assert {d.call for d in decide_patients(two, patients, probs, thresholds=[0.0])} == {""}
