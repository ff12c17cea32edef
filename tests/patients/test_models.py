"""Patient-level models, thresholds and metrics on small hand-made bags."""

import numpy as np
import pytest

from leukotree.errors import LeukotreeError
from leukotree.patients.bags import Bag, make_bags, patient_labels
from leukotree.patients.fit import (
    FittedPatientModel,
    bootstrap_auroc,
    choose_threshold,
    fit_patient_model,
    patient_metrics,
)
from leukotree.patients.models import build_patient_model
from leukotree.taxonomy import load_taxonomy

DIAG = load_taxonomy("aml-apl")  # leaves: APL, AML
CELLS = load_taxonomy("jhh-cells")
PRO = CELLS.leaf_index["promyelocyte"]


def test_bags_group_cells_by_patient_and_labels_must_agree():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    bags = make_bags(["b", "a", None], probs, np.zeros((3, 2)), names=["x", "y", "z"],
                     labels={"a": "AML"})
    assert [(b.patient, len(b), b.cells, b.label) for b in bags] == [
        ("a", 1, ["y"], "AML"), ("b", 1, ["x"], None)]
    assert patient_labels(DIAG, ["p", "p", "q"], ["APL", "APML", "AML"]) == {
        "p": "APL", "q": "AML"}
    with pytest.raises(LeukotreeError, match="Patient 'p' has cells labelled"):
        patient_labels(DIAG, ["p", "p"], ["APL", "AML"])


def test_vote_and_mean_hand_computed():
    bag = Bag("p", np.array([[0.6, 0.4], [0.55, 0.45], [0.1, 0.9]]), np.zeros((3, 1)))
    vote = build_patient_model("vote", DIAG, None).predict_proba([bag])[0]
    assert vote == pytest.approx([2 / 3, 1 / 3], abs=1e-5)
    mean = build_patient_model("mean", DIAG, None).predict_proba([bag])[0]
    assert mean == pytest.approx([1.25 / 3, 1.75 / 3])
    weights = build_patient_model("vote", DIAG, None).cell_weights(bag)
    assert weights == pytest.approx([0.5, 0.5, 0.0])


def _bags(n_per_class: int = 8, seed: int = 0) -> list[Bag]:
    """APL patients have 20-40% promyelocytes, AML patients 0-10%; 20 cells each."""
    rng = np.random.default_rng(seed)
    bags = []
    for label, lo, hi in (("APL", 0.2, 0.4), ("AML", 0.0, 0.1)):
        for i in range(n_per_class):
            n_pro = round(rng.uniform(lo, hi) * 20)
            cells = np.full((20, len(CELLS.leaves)), 0.01)
            cells[:n_pro, PRO] = 0.9
            cells[n_pro:, CELLS.leaf_index["blast"]] = 0.9
            cells /= cells.sum(1, keepdims=True)
            feats = rng.normal(size=(20, 4)) + cells[:, [PRO]] * 3
            bags.append(Bag(f"{label}{i}", np.full((20, 2), 0.5), feats, cells, label=label))
    return bags


@pytest.mark.parametrize("name", ["fraction", "differential", "cell-mix", "focused-mix", "mil"])
def test_fitted_models_separate_promyelocyte_rich_patients(name):
    train, test = _bags(seed=0), _bags(seed=1)
    fitted = fit_patient_model(name, DIAG, CELLS, train, seed=0)
    probs = fitted.predict_proba(test)
    truth = [b.label for b in test]
    metrics = patient_metrics(DIAG, truth, probs, fitted.diagnose(probs),
                              positive=fitted.positive, threshold=fitted.threshold)
    assert metrics["auroc"] >= 0.95 and metrics["accuracy"] >= 0.85
    again = FittedPatientModel.from_dict(fitted.to_dict(), DIAG, CELLS)
    assert np.allclose(again.predict_proba(test), probs, atol=1e-6)
    weights = fitted.model.cell_weights(test[0])
    assert weights.sum() == pytest.approx(1, abs=1e-5)


def test_models_that_read_cell_types_say_what_they_need():
    bag = Bag("p", np.full((2, 2), 0.5), np.zeros((2, 1)), label="APL")
    with pytest.raises(LeukotreeError, match="needs a cell-type head"):
        build_patient_model("differential", DIAG, None).fit([bag, bag], np.array([0, 1]))
    with pytest.raises(LeukotreeError, match="'cell-mix' patient model needs a cell-type"):
        build_patient_model("cell-mix", DIAG, None).fit([bag, bag], np.array([0, 1]))


def test_the_cell_mix_reads_the_differential_alone():
    bag = _bags(1)[0]
    model = build_patient_model("cell-mix", DIAG, CELLS)
    assert np.allclose(model.bag_features([bag])[0], bag.cell_probs.mean(0))
    other = Bag(bag.patient, 1 - bag.leaf_probs, bag.features, bag.cell_probs)
    assert np.allclose(model.bag_features([other]), model.bag_features([bag]))


def test_the_focused_mean_weighs_cells_by_their_informative_probability():
    cells = np.zeros((3, len(CELLS.leaves)))
    cells[0, PRO] = 1.0  # a promyelocyte
    cells[1, CELLS.leaf_index["lymphocyte"]] = 1.0  # says nothing of the leukemia
    cells[2, [CELLS.leaf_index["blast"], CELLS.leaf_index["lymphocyte"]]] = 0.5
    bag = Bag("p", np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]]), np.zeros((3, 1)), cells)
    model = build_patient_model("focused", DIAG, CELLS)
    # w = P(blast or promyelocyte) + 0.001 = (1.001, 0.001, 0.501)
    p_apl = (0.9 * 1.001 + 0.2 * 0.001 + 0.5 * 0.501) / 1.503
    assert model.predict_proba([bag])[0] == pytest.approx([p_apl, 1 - p_apl])
    weights = model.cell_weights(bag)  # w_i * P(APL | cell i), normalised
    assert weights == pytest.approx(np.array([0.9 * 1.001, 0.2 * 0.001, 0.5 * 0.501])
                                    / (p_apl * 1.503))
    # a patient without any informative cell: the plain mean
    plain = Bag("q", bag.leaf_probs[1:2].repeat(2, 0) * [[1], [1]], np.zeros((2, 1)),
                cells[[1, 1]])
    assert model.predict_proba([plain])[0] == pytest.approx([0.2, 0.8])
    only_blasts = build_patient_model("focused", DIAG, CELLS, cell_types="blast")
    assert only_blasts.predict_proba([bag])[0][0] == pytest.approx(
        (0.9 * 0.001 + 0.2 * 0.001 + 0.5 * 0.501) / 0.503)


def test_focused_models_name_what_they_need():
    pbc = load_taxonomy("pbc")
    with pytest.raises(LeukotreeError, match="'focus_cells' parameter is needed: the "
                                             "cell taxonomy 'pbc' has no default"):
        build_patient_model("focused", DIAG, pbc).check_params({}, pbc)
    with pytest.raises(LeukotreeError, match="focus_cells"):
        build_patient_model("focused", DIAG, CELLS).check_params({"cell_types": "blst"}, CELLS)
    with pytest.raises(LeukotreeError, match="reads cell types: give --cell-taxonomy"):
        build_patient_model("focused-mix", DIAG, None).check_params({}, None)


def test_youden_and_sensitivity_thresholds_hand_computed():
    p = np.array([0.9, 0.8, 0.7, 0.6, 0.4, 0.3])
    y = np.array([1, 1, 0, 1, 0, 0])
    # tpr - fpr: at 0.8 -> 2/3 - 0; at 0.6 -> 1 - 1/3: both 2/3, the first (higher) wins
    assert choose_threshold(p, y, "youden") == pytest.approx(0.8)
    assert choose_threshold(p, y, "sensitivity:1.0") == pytest.approx(0.6)
    assert choose_threshold(p, y, "0.5") == 0.5
    with pytest.raises(LeukotreeError, match="youden, sensitivity"):
        choose_threshold(p, y, "best")


def test_patient_metrics_and_bootstrap_hand_computed():
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.2, 0.8]])
    truth = ["APL", "APL", "AML", "AML"]
    m = patient_metrics(DIAG, truth, probs, ["APL", "AML", "AML", "AML"], positive="APL",
                        threshold=0.5, n_boot=200)
    assert m["auroc"] == 1.0 and m["accuracy"] == 0.75
    assert m["binary"]["sensitivity"] == 0.5 and m["binary"]["specificity"] == 1.0
    lo, hi = bootstrap_auroc(np.array([1, 1, 0, 0, 1, 0]),
                             np.array([0.9, 0.2, 0.3, 0.1, 0.8, 0.6]), 500)
    assert 0 <= lo <= 0.778 <= hi <= 1


def test_a_miss_rate_threshold_is_chosen_on_the_out_of_fold_scores_and_travels():
    # mean model (no fit: its out-of-fold scores are its scores): APL patients at mean
    # P(APL) .30, .35, ..., .75 (10), AML at .1. alpha .5, confidence .5: k misses allowed
    # while P(Binom(10, .5) <= k) <= .5: k <= 4 (cdf(4) = .377, cdf(5) = .623): t = .50
    bags = [Bag(f"APL{i}", np.array([[0.30 + 0.05 * i, 0.70 - 0.05 * i]]), np.zeros((1, 1)),
                label="APL") for i in range(10)]
    bags += [Bag(f"AML{i}", np.array([[0.1, 0.9]]), np.zeros((1, 1)), label="AML")
             for i in range(3)]
    fitted = fit_patient_model("mean", DIAG, None, bags, rule="0.6", miss_rate=0.5,
                               miss_confidence=0.5)
    assert fitted.miss_rate.threshold == pytest.approx(0.5) and fitted.miss_rate.misses == 4
    assert fitted.negative_below() == pytest.approx(0.5) and fitted.threshold == 0.6
    calls = fitted.calls(np.array([[0.45, 0.55], [0.55, 0.45], [0.6, 0.4]]))
    assert calls == ["negative", "referred", "positive"]
    again = FittedPatientModel.from_dict(fitted.to_dict(), DIAG, None)
    assert again.miss_rate == fitted.miss_rate
    old = fitted.to_dict()
    del old["miss_rate"]  # a model saved before miss rates existed
    assert FittedPatientModel.from_dict(old, DIAG, None).miss_rate is None
    with pytest.raises(LeukotreeError, match=r"10 APL patient\(s\) cannot promise a miss rate "
                                             r"of at most 10\.0%.*support a miss rate of "
                                             r"20\.6% or more"):
        fit_patient_model("mean", DIAG, None, bags, miss_rate=0.1, miss_confidence=0.9)
    with pytest.raises(LeukotreeError, match="two diagnoses"):
        fit_patient_model("mean", load_taxonomy("leukemia7"), None, bags, miss_rate=0.1)


def test_an_adapted_or_recalibrated_model_drops_the_miss_rate_promise():
    from leukotree.patients.fit import without_promise

    doc = {"name": "mean", "miss_rate": {"threshold": 0.2}, "threshold": 0.5}
    report = {"not_carried_over": ["calibration"]}
    assert without_promise(doc, report) == {"name": "mean", "miss_rate": None,
                                            "threshold": 0.5}
    assert report["not_carried_over"] == ["calibration", "patient miss-rate promise"]
    unchanged = {"name": "mean", "miss_rate": None}
    assert without_promise(unchanged, report) is unchanged
    assert len(report["not_carried_over"]) == 2
