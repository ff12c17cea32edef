"""The one patient-decision path (``decide_patients``) on a hand-computed case, the same
decisions in what predict, report and evaluate show, and the patient-model registry
driving the training options."""

import argparse
import ast
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import numpy as np
import pytest

import leukotree
from leukotree.data.discover import InputImage, Sample
from leukotree.engine.config import add_config_arguments, check_value, resolve_config
from leukotree.errors import LeukotreeError
from leukotree.evaluation.evaluate import patient_level
from leukotree.inference.decisions import decide_patients
from leukotree.inference.evidence import EvidenceSettings
from leukotree.inference.options import InferenceOptions
from leukotree.inference.predict import PredictResult, patient_rows
from leukotree.inference.predictor import Predictions
from leukotree.patients.fit import FittedPatientModel
from leukotree.patients.models import (
    PATIENT_MODELS,
    MeanModel,
    PatientModel,
    aggregates,
    majority_leaf,
    patient_params,
)
from leukotree.report.patient import _decide
from leukotree.taxonomy import Taxonomy, load_taxonomy

TAX = Taxonomy.from_dict({"name": "three", "root": "r", "tree": {"x": None, "y": None,
                                                                 "z": None}})
NAN = [np.nan] * 3
#: patient, label, leaf probabilities, unreadable, unclassifiable
CELLS = [
    ("P1", "y", [0.6, 0.3, 0.1], False, False),  # votes x
    ("P1", "y", [0.2, 0.7, 0.1], False, False),  # votes y: a 1-1 tie, mean y 0.5 > x 0.4
    ("P1", "y", NAN, True, False),  # unreadable: left out
    ("P2", "x", [0.8, 0.1, 0.1], False, False),
    ("P2", "x", [0.8, 0.1, 0.1], False, False),
    ("P2", "x", [0.8, 0.1, 0.1], False, False),
    ("P2", "x", [0.0, 0.0, 1.0], False, True),  # unclassifiable: would vote z; left out
    ("P3", "z", [0.1, 0.1, 0.8], False, True),  # P3: only unclassifiable cells
    ("P3", "z", [0.1, 0.1, 0.8], False, True),
    ("P4", "z", [0.1, 0.1, 0.8], False, False),  # one cell, fewer than min_cells 2
]
PATIENTS = [c[0] for c in CELLS]
PROBS = np.array([c[2] for c in CELLS])
PREDS = Predictions(paths=[Path(f"c{i}.png") for i in range(len(CELLS))], leaf_probs=PROBS,
                    errors=["unreadable" if c[3] else None for c in CELLS],
                    ood_score=np.array([np.nan if c[3] else 2.0 if c[4] else 0.5
                                        for c in CELLS]))


def _decisions(aggregate="majority", model=None):
    return decide_patients(TAX, PATIENTS, PROBS, thresholds=[0.6], classified=PREDS.classified,
                           aggregate=aggregate, model=model, min_cells=2)


def test_the_hand_computed_decisions():
    d = {x.patient: x for x in _decisions()}
    # patients with cells first, then the one left without a classified cell
    assert [x.patient for x in _decisions()] == ["P1", "P2", "P4", "P3"]
    # P1: the tie goes to y (mean 0.5 > 0.4); P(y) = 0.5 < 0.6: referred at the root
    assert (d["P1"].leaf, d["P1"].n_cells, d["P1"].refer, d["P1"].reported_node) == (
        "y", 2, True, "r")
    assert d["P1"].reason == "not confident at any level of the tree"
    assert d["P1"].probs == pytest.approx([0.5, 0.5, 0.0])  # the vote shares
    assert d["P1"].mean_probs == pytest.approx([0.4, 0.5, 0.1])
    assert d["P1"].scores == pytest.approx(np.array([0.5 + 0.4e-6, 0.5 + 0.5e-6, 0.1e-6])
                                           / (1 + 1e-6), abs=1e-12)
    # P2: three of its three classified cells vote x, mean P(x) 0.8 >= 0.6
    assert (d["P2"].leaf, d["P2"].n_cells, d["P2"].refer, d["P2"].reason) == ("x", 3, False,
                                                                               "")
    assert (d["P4"].leaf, d["P4"].n_cells, d["P4"].insufficient) == (None, 1, True)
    assert d["P4"].reason == "insufficient: 1 cell(s), at least 2 needed"
    assert (d["P3"].leaf, d["P3"].n_cells, d["P3"].refer) == (None, 0, True)
    assert d["P3"].reason == "insufficient: no readable, classifiable cell"
    assert all(x.model == "majority" and x.threshold is None for x in d.values())
    # the mean: P1 is y as well (0.5), referred the same way; P2 is x
    mean = {x.patient: x for x in _decisions("mean")}
    assert (mean["P1"].leaf, mean["P1"].refer, mean["P2"].leaf) == ("y", True, "x")
    assert mean["P1"].probs == pytest.approx([0.4, 0.5, 0.1])


def test_predict_report_and_evaluate_show_the_same_decisions():
    decisions = {x.patient: x for x in _decisions()}
    result = PredictResult(TAX, [InputImage(p, c[0]) for p, c in zip(PREDS.paths, CELLS,
                                                                       strict=True)],
                           PREDS, [0.6], "torch")
    # (the evidence's own referral, of fewer than 5 informative cells, left out here)
    rows = {r["patient"]: r for r in patient_rows(result, "majority", 2,
                                                  EvidenceSettings(min_informative=0))}
    assert {p: (r["diagnosis"], r["n_cells"], r["referred"], r["reason"])
            for p, r in rows.items()} == {
        p: (d.leaf or "insufficient", d.n_cells, d.refer, d.reason)
        for p, d in decisions.items()}
    assert (rows["P1"]["p_x"], rows["P1"]["p_y"], rows["P1"]["model"]) == (0.5, 0.5, "majority")
    assert rows["P2"]["n_unclassifiable"] == 1 and rows["P3"]["n_unclassifiable"] == 2

    one = [i for i, c in enumerate(CELLS) if c[0] == "P1"]
    p1 = Predictions([PREDS.paths[i] for i in one], PROBS[one], [PREDS.errors[i] for i in one],
                     ood_score=PREDS.ood_score[one])
    report = _decide(SimpleNamespace(taxonomy=TAX, patient_model=None), p1, "P1", "majority",
                     2, [0.6])
    assert (report.leaf, report.refer, report.reason) == ("y", True, decisions["P1"].reason)
    assert report.cell_weights == pytest.approx([0.3, 0.7])  # each cell's P(y)

    samples = [Sample(p, c[1], c[0]) for p, c in zip(PREDS.paths, CELLS, strict=True)]
    level = patient_level(TAX, samples, PROBS, InferenceOptions(min_cells=2), PREDS)
    assert level["insufficient"] == ["P3", "P4"] and level["n_patients"] == 4
    assert {p: v["decision"] for p, v in level["patients"].items()} == {"P1": "y", "P2": "x"}
    assert level["patients"]["P1"]["p_y"] == pytest.approx(decisions["P1"].scores[1])
    assert level["accuracy"] == 1.0


def test_a_fitted_model_decides_with_its_threshold_in_every_output():
    diag = load_taxonomy("aml-apl")  # leaves APL, AML
    fitted = FittedPatientModel(MeanModel(diag), "APL", 0.3, "0.3", {})
    probs = np.array([[0.3, 0.7], [0.4, 0.6], [0.9, 0.1]])
    d = decide_patients(diag, ["a", "a", "b"], probs, thresholds=[0.6], model=fitted)
    # a: P(APL) = 0.35 >= 0.3 -> APL although AML is likelier; 0.35 < 0.6 -> referred
    assert (d[0].leaf, d[0].refer, d[0].reported_node, d[0].model, d[0].threshold) == (
        "APL", True, diag.root, "mean", 0.3)
    assert d[0].probs == pytest.approx([0.35, 0.65])  # the model's, not the vote shares
    assert (d[1].leaf, d[1].refer) == ("APL", False)
    result = PredictResult(diag, [InputImage(Path(f"{i}.png"), p) for i, p in
                                  enumerate("aab")],
                           Predictions([Path("0"), Path("1"), Path("2")], probs,
                                       [None] * 3), [0.6], "torch", patient_model=fitted)
    row = patient_rows(result, "majority", 1)[0]
    assert (row["diagnosis"], row["model"], row["threshold"], row["p_APL"]) == (
        "APL", "mean", 0.3, 0.35)


def test_the_tie_break_is_the_higher_mean_then_the_first_voted():
    assert majority_leaf(np.array([[0.6, 0.4], [0.3, 0.7]])) == 1  # means 0.45 < 0.55
    assert majority_leaf(np.array([[0.4, 0.6], [0.6, 0.4]])) == 1  # all tied: first voted
    assert majority_leaf(np.array([[0.6, 0.4], [0.4, 0.6]])) == 0


class _Oracle(PatientModel):
    """A test patient model: the probabilities of the patient's first cell."""

    name = "first-cell"
    defaults: ClassVar[dict] = {"scale": 1.0}
    config_fields: ClassVar[dict] = {"scale": "lr"}

    def predict_proba(self, bags):
        return np.array([b.leaf_probs[0] for b in bags])


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(PATIENT_MODELS, _Oracle.name, _Oracle)
    return _Oracle


def test_the_registry_drives_the_patient_model_option(registered):
    assert check_value("patient_model", "first-cell") == "first-cell"
    config = resolve_config(preset="tiny-test", overrides={"patient_model": "first-cell"})
    assert patient_params(config) == {"scale": config.lr}  # its config_fields
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    assert "first-cell" in parser.format_help()
    with pytest.raises(LeukotreeError, match="must be one of none, vote, mean, fraction, "
                                             "differential, cell-mix, focused, focused-mix, mil, "
                                             "first-cell; got "
                                             "'frist-cell'"):
        check_value("patient_model", "frist-cell")


def test_without_it_the_option_refuses_the_name_and_says_what_a_model_needs():
    with pytest.raises(LeukotreeError, match="Did you mean 'mil'"):
        check_value("patient_model", "mill")
    assert aggregates() == ("majority", "mean")  # the unfitted models' --aggregate values
    with pytest.raises(LeukotreeError, match="'differential' patient model reads cell types"):
        resolve_config(preset="tiny-test", overrides={"patient_model": "differential"})
    with pytest.raises(LeukotreeError, match="has no parameter cell_type"):
        MeanModel(TAX, cell_type="blast")
    cfg = resolve_config(preset="tiny-test", overrides={"patient_model": "fraction",
                                                        "cell_taxonomy": "jhh-cells",
                                                        "cell_labels": "column:c",
                                                        "patient_fraction_of": "blast"})
    assert patient_params(cfg) == {"cell_type": "blast"}


def test_no_module_outside_patients_branches_on_a_patient_model_name():
    names = set(PATIENT_MODELS) | set(aggregates())
    package = Path(leukotree.__file__).parent
    offenders = []
    for path in sorted(package.rglob("*.py")):
        if path.parent.name == "patients":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare) and names & {
                    c.value for c in ast.walk(node) if isinstance(c, ast.Constant)}:
                offenders.append(f"{path.relative_to(package)}:{node.lineno}")
    assert offenders == []
