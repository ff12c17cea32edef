"""``leukotree calibrate``: a run's calibration fitted again on other labelled cells."""

import hashlib
import json

import numpy as np
import pytest

from leukotree.calibrate.run import calibrate_run
from leukotree.cli import main
from leukotree.data.synth import generate
from leukotree.engine.adapt import adapt
from leukotree.engine.config import resolve_config
from leukotree.engine.trainer import train
from leukotree.errors import LeukotreeError
from leukotree.evaluation.evaluate import EvalSettings, evaluate
from leukotree.inference.export import cached_onnx
from leukotree.inference.loader import load
from leukotree.inference.options import InferenceOptions
from leukotree.inference.predictor import predict_paths
from leukotree.models.calibration import tree_nll
from leukotree.models.checkpoint import read_checkpoint
from leukotree.taxonomy import load_taxonomy


@pytest.fixture(scope="module")
def labs(tmp_path_factory):
    """A tiny calibrated run (with a 3-stage out-of-distribution score) and a second
    lab's labelled cells, of another image size and seed."""
    root = tmp_path_factory.mktemp("calibrate")
    taxonomy = load_taxonomy("leukemia7")
    generate(root / "data", taxonomy, patients_per_class=3, cells_per_patient=4, size=32,
             seed=1, progress=False)
    generate(root / "lab2", taxonomy, patients_per_class=2, cells_per_patient=4, size=40,
             seed=9, progress=False)
    train(root / "data", root / "run", resolve_config(preset="tiny-test", overrides={
        "epochs": 1, "val_fraction": 0.34, "threads": 1}), progress=False)
    return root


def _listing(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file()}


def test_calibrate_refits_on_other_cells_into_a_new_run_that_predicts(labs, tmp_path, capsys):
    run, lab2, out = labs / "run", labs / "lab2", tmp_path / "run2"
    cached_onnx(run)  # the source's export must not be reused by the copy
    before = _listing(run)
    assert main(["calibrate", str(run), str(lab2), "--out", str(out), "--no-progress",
                 "--workers", "1"]) == 0
    said = capsys.readouterr()
    assert "calibrated on 56 labelled cells" in said.out and "leaf ECE: raw" in said.out
    assert "of the calibration cells" in said.err
    assert _listing(run) == before  # the source run is untouched
    old, new = read_checkpoint(run), read_checkpoint(out)
    report = json.loads((out / "summary.json").read_text())
    # fitted again, recorded in the report and in the model
    assert new["calibration"]["temperatures"] != old["calibration"]["temperatures"]
    assert new["calibration"]["temperatures"] == report["calibration"]["temperatures"]
    assert new["calibration"]["fitted_on"] == report["n_cells"] == 56
    assert new["ood"]["threshold"] != old["ood"]["threshold"]
    assert new["ood"]["threshold"] == report["ood"]["threshold"]
    assert new["ood"]["scales"] != old["ood"]["scales"]
    # the reference (the training cells' class means) is the run's
    assert new["ood"]["classes"] == old["ood"]["classes"]
    assert all(np.array_equal(a, b) for a, b in zip(new["ood"]["means"], old["ood"]["means"],
                                                    strict=True))
    assert new["state_dict"].keys() == old["state_dict"].keys()
    assert new["extra"]["calibrated"]["n_cells"] == 56
    assert report["ece"]["after"] == new["calibration"]["ece_after"]
    # temperatures and softening minimise the NLL of these cells
    assert report["nll"]["after"] <= report["nll"]["uncalibrated"] + 1e-6
    assert {"config.yaml", "split.csv", "taxonomy.yaml", "best.pt"} <= set(_listing(out))
    assert "last.pt" not in _listing(out)
    # the new run predicts what was fitted: its NLL and flagged share on these cells
    paths = sorted(lab2.rglob("*.png"))
    truth = [p.parent.parent.name for p in paths]
    taxonomy = load_taxonomy("leukemia7")
    for engine in ("torch", "onnx"):
        predictor = load(out).predictor(engine)
        preds = predict_paths(predictor, paths, progress=False, workers=1)
        assert tree_nll(taxonomy, truth, preds.leaf_probs) == pytest.approx(
            report["nll"]["after"], abs=2e-3), engine
        assert preds.unclassifiable.mean() == pytest.approx(report["flagged"]["after"])
    assert (out / "best.onnx").is_file()
    metrics = evaluate(out, lab2, tmp_path / "eval", InferenceOptions(workers=1),
                       EvalSettings(progress=False))
    assert metrics["calibration"]["temperatures"] == pytest.approx(
        report["calibration"]["temperatures"])
    assert metrics["calibration"]["uncalibrated"]["ece"] == pytest.approx(
        report["ece"]["uncalibrated"], abs=1e-6)


def test_a_batch_norm_adapted_run_can_be_calibrated(labs, tmp_path):
    adapted = tmp_path / "adapted"
    adapt(labs / "run", [labs / "lab2"], adapted, progress=False, workers=1)
    assert "calibration" not in read_checkpoint(adapted)  # adapt drops it
    out = tmp_path / "calibrated"
    report = calibrate_run(adapted, labs / "lab2", out, progress=False, workers=1)
    payload = read_checkpoint(out)
    assert set(payload["calibration"]["temperatures"]) == {"root", "Leukemia", "Acute",
                                                          "Chronic"}
    assert payload["calibration"]["fitted_on"] == 56
    # no out-of-distribution reference: nothing flagged, and said why
    assert "ood" not in payload and report["ood"] is None
    assert report["flagged"] == {"before": None, "after": None}
    assert "batch-norm adaptation drops it" in report["note"]
    assert "adapted" in payload["extra"] and (out / "adapt.json").is_file()
    predictor = load(out).predictor("torch")
    paths = sorted((labs / "lab2").rglob("*.png"))
    probs = predict_paths(predictor, paths, progress=False, workers=1).leaf_probs
    truth = [p.parent.parent.name for p in paths]
    assert tree_nll(load_taxonomy("leukemia7"), truth, probs) == pytest.approx(
        report["nll"]["after"], abs=2e-3)


def test_calibrate_refuses_what_it_cannot_calibrate(labs, tmp_path, make_image, capsys):
    run, lab2 = labs / "run", labs / "lab2"
    with pytest.raises(LeukotreeError, match="is an ONNX file: its calibration is part"):
        calibrate_run(cached_onnx(run), lab2, tmp_path / "a")
    ensemble = tmp_path / "ensemble"
    ensemble.mkdir()
    (ensemble / "ensemble.yaml").write_text(f"members: ['{run}', '{run}']\n")
    with pytest.raises(LeukotreeError, match="cv or ensemble folder of 2 models; this needs "
                                             "one model's checkpoint: one of them"):
        calibrate_run(ensemble, lab2, tmp_path / "b")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(LeukotreeError, match="exists and is not an empty folder"):
        calibrate_run(run, lab2, taken)
    few = tmp_path / "few"
    for i in range(5):
        make_image(few / "AML" / f"p{i}" / f"{i}.png", seed=i)
    with pytest.raises(LeukotreeError, match=r"at least 20 labelled cells; .* has 5"):
        calibrate_run(run, few, tmp_path / "c")
    unknown = tmp_path / "unknown"
    for i in range(3):
        make_image(unknown / "Leukaemia" / f"{i}.png", seed=i)
    with pytest.raises(LeukotreeError, match="Leukaemia"):
        calibrate_run(run, unknown, tmp_path / "d")
    with pytest.raises(LeukotreeError, match=r"'ood_quantile' parameter .* must be in"):
        calibrate_run(run, lab2, tmp_path / "e", ood_quantile=1.0)
    for name in "abcde":  # nothing written by a refusal
        assert not (tmp_path / name).exists()
    with pytest.raises(SystemExit) as stop:
        main(["calibrate", str(run), str(lab2), "--out", str(tmp_path / "f"),
              "--ood-quantile", "1"])
    assert stop.value.code == 2
    assert "--ood-quantile: must be in (0, 1); got 1" in capsys.readouterr().err


def test_calibrate_fits_conformal_answers_and_refits_a_runs_own(labs, tmp_path, capsys):
    from leukotree.inference.conformal import fit_conformal

    run, lab2 = labs / "run", labs / "lab2"
    assert "conformal" not in read_checkpoint(run)
    assert main(["calibrate", str(run), str(lab2), "--out", str(tmp_path / "a"),
                 "--no-progress", "--workers", "1", "--coverage", "0.9"]) == 0
    assert "conformal answers (marginal, coverage 0.9): covered - with the run's" in (
        capsys.readouterr().out)
    section = read_checkpoint(tmp_path / "a")["conformal"]
    report = json.loads((tmp_path / "a" / "summary.json").read_text())["conformal"]
    assert section["n"] == 56 and section["alpha"] == pytest.approx(0.1)
    assert report["before"] is None and report["after"]["coverage"] >= 0.9  # in-sample
    # the threshold is the one fitted on the new model's probabilities of these cells
    paths = sorted(lab2.rglob("*.png"))
    probs = predict_paths(load(tmp_path / "a").predictor("torch"), paths, progress=False,
                          workers=1).leaf_probs
    # over the lab's patients (the folders), the units the risk is controlled over
    again = fit_conformal(load_taxonomy("leukemia7"), [p.parts[-3] for p in paths], probs,
                          1 - 0.9, groups=[p.parts[-2] for p in paths])
    assert section["patients"] == len({p.parts[-2] for p in paths}) == 14
    assert next(iter(again.thresholds.values())) == pytest.approx(
        section["thresholds"]["ALL"], abs=1e-5)
    # a run with answers is re-fitted at its own coverage, the run's answers reported too
    calibrate_run(tmp_path / "a", lab2, tmp_path / "b", workers=1, progress=False)
    refit = json.loads((tmp_path / "b" / "summary.json").read_text())["conformal"]
    assert refit["coverage"] == pytest.approx(0.9) and refit["mode"] == "marginal"
    assert refit["before"]["coverage"] == pytest.approx(report["after"]["coverage"])
    assert read_checkpoint(tmp_path / "b")["conformal"]["n"] == 56
    # its split.csv is the first lab's: predict does not re-fit the answers on it
    assert main(["predict", str(tmp_path / "a"), str(lab2), "--coverage", "0.8",
                 "--no-progress"]) == 2
    assert "calibrated by 'leukotree calibrate'" in " ".join(capsys.readouterr().err.split())


def test_calibrate_refuses_too_few_cells_for_the_coverage(labs, tmp_path):
    with pytest.raises(LeukotreeError, match=r"need at least 99 labelled calibration cells; "
                                             r"got 56.*coverage 0\.982 or less"):
        calibrate_run(labs / "run", labs / "lab2", tmp_path / "c", coverage=0.99,
                      workers=1, progress=False)
    assert not (tmp_path / "c").exists()
