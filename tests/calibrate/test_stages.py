"""The calibration, out-of-distribution and patient-model stages, fitted outside training."""

import numpy as np
import pytest
import torch

from leukotree.calibrate import (
    LabelledCells,
    fit_calibration,
    fit_ood_reference,
    fit_patient_stage,
)
from leukotree.calibrate.stages import Calibration, OodReference, fit_ood_threshold
from leukotree.data.synth import generate
from leukotree.engine.config import resolve_config
from leukotree.engine.loop import predict_outputs
from leukotree.engine.trainer import Trainer, train
from leukotree.errors import LeukotreeError
from leukotree.models.checkpoint import load_model, read_checkpoint
from leukotree.models.heads import ModelConfig, build_model
from leukotree.patients.models import patient_params
from leukotree.taxonomy import load_taxonomy


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run with calibration, a 3-stage OOD score and a patient model, and the
    training and validation splits its trainer fitted them on."""
    root = tmp_path_factory.mktemp("stages")
    generate(root / "data", load_taxonomy("leukemia7"), patients_per_class=4,
             cells_per_patient=6, size=32, seed=1, inner_fraction=0.1, progress=False)
    config = resolve_config(preset="tiny-test", overrides={
        "epochs": 2, "val_fraction": 0.4, "patient_model": "mil"})
    seen = {}
    original = Trainer._finish

    def spy(self, state, train_split, val_split):
        seen.update(train=train_split, val=val_split)
        return original(self, state, train_split, val_split)

    Trainer._finish = spy
    try:
        summary = train(root / "data", root / "run", config, progress=False)
    finally:
        Trainer._finish = original
    return root / "run", config, seen, summary


def _close(mine, theirs) -> bool:
    """Equal structures, numbers within 1e-6."""
    if isinstance(mine, dict):
        return mine.keys() == theirs.keys() and all(_close(mine[k], theirs[k]) for k in mine)
    if isinstance(mine, list | tuple):
        return len(mine) == len(theirs) and all(map(_close, mine, theirs))
    if isinstance(mine, torch.Tensor | np.ndarray):
        return np.allclose(np.asarray(mine), np.asarray(theirs), rtol=0, atol=1e-6)
    if isinstance(mine, float):
        return mine == pytest.approx(theirs, abs=1e-6)
    return mine == theirs


def _raw(model, split, config):
    return predict_outputs(model, split.pixels, 32, torch.device("cpu"),
                           size=config.img_size, raw=True)


def test_the_stages_fitted_after_training_give_the_sections_train_wrote(trained):
    run, config, splits, summary = trained
    payload = read_checkpoint(run)
    model, _ = load_model(run)  # calibrated: its raw outputs are asked for
    train_split, val_split = splits["train"], splits["val"]
    outputs = {"train": _raw(model, train_split, config), "val": _raw(model, val_split, config)}
    assert model.ood_stages == 3 and "stage_features" in outputs["val"]
    reference = fit_ood_reference(outputs["train"]["stage_features"],
                                  [s.label for s in train_split.samples], model.stage_widths())
    truth = [s.label for s in val_split.samples]
    fitted = fit_calibration(model.taxonomy, truth, outputs["val"], reference=reference,
                             quantile=config.ood_quantile)
    ood, cal = fitted.ood, fitted.calibration
    want_ood, want_cal = payload["ood"], payload["calibration"]
    assert ood["classes"] == want_ood["classes"] and ood["stages"] == want_ood["stages"] == 3
    for mine, theirs in zip(ood["means"] + ood["precision"],
                            want_ood["means"] + want_ood["precision"], strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6)
    assert ood["scales"] == pytest.approx(want_ood["scales"], abs=1e-6)
    assert ood["threshold"] == pytest.approx(want_ood["threshold"], abs=1e-6)
    assert ood["val_flagged"] == want_ood["val_flagged"]
    assert set(cal) == set(want_cal)
    assert cal["temperatures"] == pytest.approx(want_cal["temperatures"], abs=1e-6)
    for key in set(cal) - {"temperatures"}:
        assert cal[key] == pytest.approx(want_cal[key], abs=1e-6), key
    assert summary["calibration"] == want_cal and summary["ood"]["threshold"] == \
        want_ood["threshold"]
    # the patient stage on the calibrated outputs gives the stored patient model
    stage = fit_patient_stage(
        config.patient_model, model.taxonomy, model.cell_taxonomy,
        LabelledCells(train_split.samples, fitted.apply(outputs["train"])),
        LabelledCells(val_split.samples, fitted.apply(outputs["val"])),
        rule=config.patient_threshold, positive=config.positive, seed=config.seed,
        params=patient_params(config))
    stored = payload["patient_model"]
    assert stored["state"] and _close(stage.fitted.to_dict(), stored)
    assert stage.metrics["accuracy"] == summary["patient_level"]["accuracy"]
    assert stage.metrics["train_patients"] == summary["patient_level"]["train_patients"]


def test_calibration_apply_gives_what_the_stored_model_outputs(trained):
    run, config, splits, _ = trained
    model, payload = load_model(run)
    out = _raw(model, splits["val"], config)
    fitted = fit_calibration(model.taxonomy, [s.label for s in splits["val"].samples], out,
                             reference=OodReference.from_section(payload["ood"]),
                             quantile=config.ood_quantile)
    stored = predict_outputs(model, splits["val"].pixels, 32, torch.device("cpu"),
                             size=config.img_size)
    applied = fitted.apply(out)
    np.testing.assert_allclose(applied["leaf_probs"], stored["leaf_probs"], atol=1e-5)
    with torch.no_grad():
        x = torch.from_numpy(splits["val"].pixels[:4].transpose(0, 3, 1, 2).copy()).float()
        score = model(x)["ood_score"].numpy()
    assert applied["ood_score"][:4] == pytest.approx(score, rel=1e-4)


def test_the_ood_threshold_is_the_quantile_of_the_calibration_cells_distances():
    # one stage, identity precision: the distance is the squared distance to the nearer
    # mean, (0, 0) or (10, 0)
    reference = OodReference(np.array([[0.0, 0.0], [10.0, 0.0]], np.float32),
                             np.eye(2, dtype=np.float32), ["a", "b"], 1)
    features = np.array([[1, 0], [0, 2], [10, 3], [4, 0], [10, 0]], np.float32)
    # squared distances 1, 4, 9, 16, 0: the 0.5 quantile is 4, one cell in 5 above... two
    section = fit_ood_threshold(reference, features, 0.5)
    assert section["threshold"] == pytest.approx(4.0)
    assert section["val_flagged"] == pytest.approx(2 / 5)
    assert "scales" not in section and section["stages"] == 1
    with pytest.raises(LeukotreeError, match="'ood_quantile' parameter must be in"):
        fit_ood_threshold(reference, features, 1.0)


def test_a_reference_refuses_features_and_labels_of_other_lengths():
    with pytest.raises(ValueError, match="3 feature rows for 2 labels"):
        fit_ood_reference(np.zeros((3, 2), np.float32), ["a", "b"])
    two = fit_ood_reference(np.arange(12, dtype=np.float32).reshape(4, 3), list("aabb"),
                            [1, 2])
    assert two.stages == 2 and two.key == "stage_features" and two.classes == ["a", "b"]
    assert two.means[0].shape == (2, 1) and two.means[1].shape == (2, 2)


def test_a_calibrated_model_gives_its_raw_outputs_beside_the_calibrated_ones():
    taxonomy = load_taxonomy("leukemia7")
    model = build_model(taxonomy, ModelConfig(head="multihead", backbone="test_resnet",
                                              img_size=32)).eval()
    x = torch.rand(3, 3, 32, 32) * 255
    with torch.no_grad():
        plain = model(x)
        assert "leaf_logp_raw" not in plain  # uncalibrated: leaf_logp is raw
        model.set_calibration({"root": 2.0, "Leukemia": 0.5})
        out = model(x)
    torch.testing.assert_close(out["leaf_logp_raw"], plain["leaf_logp"])
    assert not torch.allclose(out["leaf_logp"], plain["leaf_logp"])
    # the raw outputs calibrated by the stage's NumPy path give the model's own
    calibration = {"temperatures": {"root": 2.0, "Leukemia": 0.5, "Acute": 1.0,
                                    "Chronic": 1.0}}
    applied = Calibration(taxonomy, calibration=calibration).apply(
        {"leaf_probs": out["leaf_logp_raw"].exp().numpy()})
    np.testing.assert_allclose(applied["leaf_probs"], out["leaf_logp"].exp().numpy(),
                               atol=1e-6)


def test_the_stage_fits_conformal_answers_on_the_calibrated_probabilities():
    tax = load_taxonomy("leukemia7")  # Normal Reactive ALL AML APML CLL CML
    # 19 cells (the fewest for coverage 0.95): K = floor(20 * 0.05 - 1) = 0, so the
    # threshold sits just above the largest critical mass; each cell predicts ALL, whose
    # path masses are P(ALL), P(Acute), P(Leukemia). A cell of AML misses at lam <=
    # P(ALL) = 0.5, one of CLL at lam <= P(Acute) = 0.8.
    probs = np.tile([0.05, 0.05, 0.5, 0.2, 0.1, 0.05, 0.05], (19, 1))
    truth = ["ALL"] * 17 + ["AML", "CLL"]
    fitted = fit_calibration(tax, truth, {"leaf_probs": probs}, temperatures=False,
                             coverage=0.95)
    section = fitted.sections()["conformal"]
    assert section["thresholds"]["APML"] == pytest.approx(0.8)
    assert section["n"] == 19
    # every answer is Leukemia (mass 0.95 >= lam): all 19 covered, none a leaf, 5 leaves
    assert (section["coverage"], section["leaf_share"], section["mean_leaves"]) == (1, 0, 5)
    assert fitted.summary["conformal"] is section
    assert "conformal" not in fit_calibration(tax, truth, {"leaf_probs": probs},
                                              temperatures=False).sections()


def test_too_few_cells_raise_or_store_no_answers_with_a_warning():
    tax = load_taxonomy("leukemia7")
    probs, truth = np.full((10, 7), 1 / 7), ["ALL"] * 10
    with pytest.raises(LeukotreeError, match="at least 19 labelled validation cells; got 10"):
        fit_calibration(tax, truth, {"leaf_probs": probs}, temperatures=False,
                        coverage=0.95)
    said = []
    fitted = fit_calibration(tax, truth, {"leaf_probs": probs}, temperatures=False,
                             coverage=0.95, strict=False, log=said.append)
    assert fitted.conformal is None and "conformal" not in fitted.summary
    assert said[-1].startswith("warning: no conformal answers stored")
    assert "coverage 0.909 or less" in said[-1]  # 1 - 1 / (10 + 1)
