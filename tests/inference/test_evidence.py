"""Each patient's evidence: the bootstrap interval over its cells, the informative cells,
the referral of thin evidence and the patient-level domain alarm, on hand-made cells."""

from pathlib import Path

import numpy as np
import pytest

from leukotree.data.discover import InputImage
from leukotree.errors import LeukotreeError
from leukotree.inference.decisions import decide_patients
from leukotree.inference.evidence import (
    EvidenceSettings,
    bootstrap_interval,
    informative_types,
    patient_evidence,
    refer_thin,
)
from leukotree.inference.predict import PredictResult, patient_rows
from leukotree.inference.predictor import Predictions
from leukotree.patients.fit import FittedPatientModel
from leukotree.patients.models import MeanModel
from leukotree.taxonomy import load_taxonomy

DIAG = load_taxonomy("aml-apl")  # leaves APL, AML
CELLS = load_taxonomy("jhh-cells")


def _cell_probs(types: list[str]) -> np.ndarray:
    out = np.full((len(types), len(CELLS.leaves)), 0.01)
    for i, t in enumerate(types):
        out[i, CELLS.leaf_index[t]] = 0.9
    return out / out.sum(1, keepdims=True)


def test_bootstrap_interval_is_the_percentiles_widened_to_the_point():
    resampled = (np.arange(101) / 100)[:, None]
    low, high = bootstrap_interval(np.array([0.5]), resampled)
    assert (low[0], high[0]) == pytest.approx((0.025, 0.975))
    low, high = bootstrap_interval(np.array([0.99]), np.full((10, 1), 0.2))
    assert (low[0], high[0]) == (0.2, 0.99)  # the point itself is always inside


def test_intervals_by_hand_and_width_zero_when_cells_agree():
    # a: cells say P(APL) 0 and 1 -> a resampled mean is 0, 0.5 or 1 (1/4, 1/2, 1/4):
    # the 2.5% and 97.5% percentiles of 200 draws are 0 and 1; b: three identical cells
    probs = np.array([[0.0, 1.0], [1.0, 0.0], [0.8, 0.2], [0.8, 0.2], [0.8, 0.2]])
    ev = patient_evidence(DIAG, ["a", "a", "b", "b", "b"], probs, readable=np.ones(5, bool),
                          flagged=np.zeros(5, bool), aggregate="mean")
    assert ev["a"].low.tolist() == [0.0, 0.0] and ev["a"].high.tolist() == [1.0, 1.0]
    assert ev["b"].low == pytest.approx([0.8, 0.2]) and ev["b"].high == pytest.approx(
        [0.8, 0.2])
    # seeded: the same cells give the same interval
    again = patient_evidence(DIAG, ["a", "a", "b", "b", "b"], probs, readable=np.ones(5, bool),
                             flagged=np.zeros(5, bool), aggregate="mean")
    assert again["a"].low.tolist() == ev["a"].low.tolist()
    none = patient_evidence(DIAG, ["a", "a"], probs[:2], readable=np.ones(2, bool),
                            flagged=np.zeros(2, bool), settings=EvidenceSettings(level=0))
    assert none["a"].low is None and none["a"].high is None


def test_informative_cells_are_classified_cells_of_the_disease_types():
    types = ["blast", "promyelocyte", "lymphocyte", "blast", "neutrophil", "blast"]
    flagged = np.array([False, False, False, True, False, False])
    readable = np.array([True, True, True, True, True, False])
    ev = patient_evidence(DIAG, ["p"] * 6, np.full((6, 2), 0.5), readable=readable,
                          flagged=flagged, cell_probs=_cell_probs(types), cell_taxonomy=CELLS)
    # blast, promyelocyte count; the flagged blast and the unreadable blast do not
    assert ev["p"].n_informative == 2 and ev["p"].informative == "blast, promyelocyte cells"
    assert (ev["p"].n_readable, ev["p"].n_flagged) == (5, 1)
    # granulocyte (an inner node) counts the neutrophil; all counts every classified cell
    other = patient_evidence(DIAG, ["p"] * 6, np.full((6, 2), 0.5), readable=readable,
                             flagged=flagged, cell_probs=_cell_probs(types),
                             cell_taxonomy=CELLS,
                             settings=EvidenceSettings(informative="granulocyte"))
    assert other["p"].n_informative == 1
    every = patient_evidence(DIAG, ["p"] * 6, np.full((6, 2), 0.5), readable=readable,
                             flagged=flagged, cell_probs=_cell_probs(types),
                             cell_taxonomy=CELLS, settings=EvidenceSettings(informative="all"))
    assert every["p"].n_informative == 4
    assert informative_types(None, None) is None  # no cell-type head: every cell counts
    with pytest.raises(LeukotreeError, match="no cell-type head"):
        informative_types(None, "blast")
    with pytest.raises(LeukotreeError):
        informative_types(CELLS, "blastt")


def test_the_patient_domain_alarm_follows_the_cohort_rule():
    # 8 of 10 readable cells flagged against 5% expected: binomial p ~ 2e-9 < 0.001
    flagged = np.array([True] * 8 + [False] * 2 + [False] * 10)
    ev = patient_evidence(DIAG, ["a"] * 10 + ["b"] * 10, np.full((20, 2), 0.5),
                          readable=np.ones(20, bool), flagged=flagged, expected_ood=0.05)
    assert ev["a"].alarm is not None and ev["a"].alarm.startswith("domain shift: 8 of 10")
    assert ev["b"].alarm is None


def test_thin_evidence_is_referred_with_its_reasons():
    model = FittedPatientModel(MeanModel(DIAG), "APL", 0.5, "0.5", {})
    probs = np.array([[0.9, 0.1]] * 3 + [[0.2, 0.8], [0.9, 0.1]])
    patients = ["a"] * 3 + ["b"] * 2
    decisions = {d.patient: d for d in decide_patients(DIAG, patients, probs,
                                                       thresholds=[0.0], model=model)}
    ev = patient_evidence(DIAG, patients, probs, readable=np.ones(5, bool),
                          flagged=np.zeros(5, bool), model=model)
    # a: three cells at 0.9 -> [0.9, 0.9]: clear of 0.5, but 3 cells < 5
    a = refer_thin(DIAG, decisions["a"], ev["a"], EvidenceSettings(), "APL")
    assert (a.refer, a.call) == (True, "referred")
    assert a.reason == ("too few informative cells: 3 (cells not flagged unclassifiable), at "
                        "least 5 needed")
    assert a.reported_node == DIAG.root
    assert refer_thin(DIAG, decisions["a"], ev["a"], EvidenceSettings(min_informative=3),
                      "APL") == decisions["a"]
    # b: P(APL) 0.55 of cells at 0.2 and 0.9; the interval [0.2, 0.9] straddles 0.5
    b = refer_thin(DIAG, decisions["b"], ev["b"], EvidenceSettings(min_informative=0), "APL")
    assert b.refer and b.reason == ("the 95% interval of P(APL) over its cells, [0.200, "
                                    "0.900], straddles the threshold 0.500")


def test_patient_rows_add_the_evidence_before_the_call():
    model = FittedPatientModel(MeanModel(DIAG), "APL", 0.5, "0.5", {})
    probs = np.array([[0.9, 0.1]] * 6 + [[0.1, 0.9]] * 2)
    patients = ["a"] * 6 + ["b"] * 2
    preds = Predictions([Path(f"{i}.png") for i in range(8)], probs, [None] * 8,
                        ood_score=np.array([0.5] * 6 + [2.0, 0.5]))
    result = PredictResult(DIAG, [InputImage(Path(f"{i}.png"), p) for i, p in
                                  enumerate(patients)], preds, [0.0], "torch",
                           patient_model=model)
    rows = {r["patient"]: r for r in patient_rows(result, "majority", 1)}
    header = list(rows["a"])
    assert header[:4] == ["patient", "n_cells", "n_unclassifiable", "diagnosis"]
    assert header[-7:] == ["p_APL_low", "p_APL_high", "p_AML_low", "p_AML_high",
                           "n_informative", "domain_alarm", "call"]
    a, b = rows["a"], rows["b"]
    assert (a["p_APL_low"], a["p_APL_high"], a["n_informative"]) == (0.9, 0.9, 6)
    assert (a["referred"], a["call"], a["domain_alarm"]) == (False, "positive", False)
    assert (b["n_cells"], b["n_informative"], b["referred"], b["call"]) == (
        1, 1, True, "referred")
    assert b["reason"].startswith("too few informative cells: 1")
