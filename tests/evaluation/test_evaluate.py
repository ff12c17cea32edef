"""``leukotree evaluate`` end to end: tiny synthetic data, a one-epoch tiny model, the CLI."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from leukotree.cli import main
from leukotree.data.synth import generate
from leukotree.engine.config import resolve_config
from leukotree.engine.trainer import train
from leukotree.metrics import threshold_for_sensitivity
from leukotree.taxonomy import load_taxonomy

LEAVES7 = ["Normal", "Reactive", "ALL", "AML", "APML", "CLL", "CML"]
PATIENTS_PER_CLASS = 3
CELLS_PER_PATIENT = 5
N7 = 7 * PATIENTS_PER_CLASS * CELLS_PER_PATIENT  # 105 images, 21 patients
N2 = 2 * PATIENTS_PER_CLASS * CELLS_PER_PATIENT  # 30 images, 6 patients
PLOTS = ("confusion.png", "confusion_normalized.png", "roc.png", "reliability.png")


def _synth(root: Path, taxonomy: str, **kw) -> Path:
    generate(root, load_taxonomy(taxonomy), patients_per_class=PATIENTS_PER_CLASS,
             cells_per_patient=CELLS_PER_PATIENT, size=32, seed=3, progress=False, **kw)
    return root


@pytest.fixture(scope="module")
def data7(tmp_path_factory):
    return _synth(tmp_path_factory.mktemp("eval-data7"), "leukemia7")


@pytest.fixture(scope="module")
def run7(tmp_path_factory, data7):
    run = tmp_path_factory.mktemp("eval-run7") / "run"
    # One torch thread: with pytest -n 2 on a small machine, more threads contend (13 s vs 2 s).
    cfg = resolve_config(preset="tiny-test", overrides={"epochs": 1, "threads": 1})
    train(data7, run, cfg, progress=False)
    return run


@pytest.fixture(scope="module")
def data2(tmp_path_factory):
    return _synth(tmp_path_factory.mktemp("eval-data2"), "cnmc")


@pytest.fixture(scope="module")
def run2(tmp_path_factory, data2):
    run = tmp_path_factory.mktemp("eval-run2") / "run"
    # 6 patients: a validation part of 2 patients (0.15 would be below one patient).
    cfg = resolve_config(preset="tiny-test", overrides={
        "epochs": 1, "threads": 1, "taxonomy": "cnmc", "val_fraction": 0.34})
    train(data2, run, cfg, progress=False)
    return run


def _evaluate(run, data, out, *extra) -> dict:
    code = main(["evaluate", str(run), str(data), "--out", str(out), "--no-progress", *extra])
    assert code == 0
    return json.loads((out / "metrics.json").read_text())


def _predictions(out: Path) -> list[dict[str, str]]:
    with (out / "predictions.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_the_before_figures_undo_distance_aware_temperatures(run7, data7, tmp_path):
    from leukotree.models.checkpoint import read_checkpoint, update_checkpoint

    tempered, plain = tmp_path / "tempered", tmp_path / "plain"
    for run in (tempered, plain):
        shutil.copytree(run7, run)
    cal = dict(read_checkpoint(run7)["calibration"], distance_power=1.5, distance_ref=0.3)
    update_checkpoint(tempered / "best.pt", calibration=cal)
    update_checkpoint(plain / "best.pt", calibration=None)
    m = _evaluate(tempered, data7, tmp_path / "eval-t")
    raw = _evaluate(plain, data7, tmp_path / "eval-p")
    assert m["calibration"]["distance_power"] == 1.5
    assert m["calibration"]["uncalibrated"]["ece"] == pytest.approx(
        raw["calibration"]["leaves"]["ece"], abs=1e-4)
    assert m["calibration"]["leaves"]["ece"] != pytest.approx(
        raw["calibration"]["leaves"]["ece"], abs=1e-4)
    assert "then softened by a temperature of" in (tmp_path / "eval-t" / "metrics.md").read_text()


def test_evaluate_writes_metrics_tables_predictions_and_plots(run7, data7, tmp_path):
    out = tmp_path / "eval"
    m = _evaluate(run7, data7, out)
    for key in ("n_images", "accuracy", "macro_f1", "weighted_f1", "auroc_macro", "per_class",
                "confusion_matrix", "hierarchical", "per_node", "calibration",
                "patient_level"):
        assert key in m, key
    assert m["n_images"] == N7
    assert m["leaves_absent"] == [] and "note" not in m
    assert set(m["per_class"]) == set(LEAVES7)
    assert sum(row["support"] for row in m["per_class"].values()) == N7
    assert m["confusion_matrix"]["labels"] == LEAVES7
    matrix = np.array(m["confusion_matrix"]["matrix"])
    assert matrix.shape == (7, 7) and matrix.sum() == N7
    assert (matrix.sum(1) == PATIENTS_PER_CLASS * CELLS_PER_PATIENT).all()
    assert set(m["hierarchical"]) == {"hP", "hR", "hF"}
    assert set(m["per_node"]) == {"root", "Leukemia", "Acute", "Chronic"}
    # every image passes the root; 5 leukemia leaves x 15, 3 acute x 15, 2 chronic x 15
    assert [m["per_node"][n]["n"] for n in ("root", "Leukemia", "Acute", "Chronic")] == \
        [105, 75, 45, 30]
    # the run is calibrated: the report gives the figures before and after
    assert set(m["calibration"]) - {"distance_power"} == {"leaves", "per_node", "temperatures",
                                                          "uncalibrated"}
    assert set(m["calibration"]["leaves"]) == set(m["calibration"]["uncalibrated"]) == \
        {"ece", "brier"}
    assert set(m["calibration"]["temperatures"]) == {"root", "Leukemia", "Acute", "Chronic"}
    ood = m["ood"]
    assert 0 <= ood["flagged"] <= N7 and ood["rate"] == pytest.approx(ood["flagged"] / N7)
    for value in (m["accuracy"], m["macro_f1"], m["weighted_f1"], m["auroc_macro"]):
        assert 0 <= value <= 1
    assert "binary" not in m  # seven leaves

    pl = m["patient_level"]
    assert pl["n_patients"] == 7 * PATIENTS_PER_CLASS and pl["insufficient"] == []
    assert pl["method"] == "majority" and pl["min_cells"] == 1
    assert 0 <= pl["accuracy"] <= 1
    assert len(pl["patients"]) == 21
    # unclassifiable cells are left out of the patient diagnoses, as in predict
    assert sum(p["n_cells"] for p in pl["patients"].values()) == N7 - ood["flagged"]

    for name in ("metrics.md", "predictions.csv", *PLOTS):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(m["figures"].values()) == set(PLOTS)
    md = (out / "metrics.md").read_text()
    assert "| accuracy |" in md and "## Per node" in md and "## Patient level" in md
    html = (out / "metrics.html").read_text()  # one self-contained page for a browser
    assert "<table>" in html and html.count("data:image/png;base64,") == len(PLOTS)

    rows = _predictions(out)
    assert len(rows) == N7
    assert len({r["path"] for r in rows}) == N7
    probs = np.array([[float(r[f"p_{leaf}"]) for leaf in LEAVES7] for r in rows])
    assert probs.sum(1) == pytest.approx(np.ones(N7), abs=1e-5)
    assert [r["predicted"] for r in rows] == [LEAVES7[i] for i in probs.argmax(1)]
    # the reported accuracy is the share of rows whose prediction is the label
    hits = sum(r["predicted"] == r["label"] for r in rows)
    assert m["accuracy"] == pytest.approx(hits / N7)
    assert all(r["patient"] for r in rows)


def test_min_cells_above_every_patient_makes_all_insufficient(run7, data7, tmp_path):
    m = _evaluate(run7, data7, tmp_path / "eval", "--min-cells", "100")
    pl = m["patient_level"]
    assert pl["min_cells"] == 100
    assert pl["n_patients"] == 21 and len(pl["insufficient"]) == 21
    assert "accuracy" not in pl and "patients" not in pl
    assert m["n_images"] == N7  # the image-level metrics are unaffected
    assert "accuracy" in m


def test_mean_aggregation_is_recorded(run7, data7, tmp_path):
    m = _evaluate(run7, data7, tmp_path / "eval", "--aggregate", "mean")
    assert m["patient_level"]["method"] == "mean"
    assert "accuracy" in m["patient_level"]


def test_inner_node_labels_are_evaluated(run7, tmp_path):
    data = _synth(tmp_path / "inner", "leukemia7", inner_fraction=0.4)
    m = _evaluate(run7, data, tmp_path / "eval")
    assert m["n_images"] == N7
    assert 0 < m["n_leaf_labelled"] < N7
    assert np.array(m["confusion_matrix"]["matrix"]).sum() == m["n_leaf_labelled"]
    assert sum(r["support"] for r in m["per_class"].values()) == m["n_leaf_labelled"]
    # "Acute" beside "ALL" in one patient agree: patients still get one label each
    assert "skipped" not in m["patient_level"] and "accuracy" in m["patient_level"]
    labels = {r["label"] for r in _predictions(tmp_path / "eval")}
    assert labels & {"Acute", "Chronic"}


def test_two_leaf_taxonomy_has_a_binary_block(run2, data2, tmp_path):
    out = tmp_path / "eval"
    m = _evaluate(run2, data2, out)
    b = m["binary"]
    assert b["positive"] == "all"
    assert b["threshold"] == 0.5 and b["threshold_source"] == "default"
    assert b["tp"] + b["tn"] + b["fp"] + b["fn"] == m["n_images"] == N2
    assert b["tp"] + b["fn"] == N2 // 2  # the 'all' images
    rows = _predictions(out)
    p_all = np.array([float(r["p_all"]) for r in rows])
    is_all = np.array([r["label"] == "all" for r in rows])
    assert b["tp"] == int(((p_all >= 0.5) & is_all).sum())
    assert b["fp"] == int(((p_all >= 0.5) & ~is_all).sum())
    assert b["prevalence"] == pytest.approx(0.5)
    assert "## Binary (positive: all" in (out / "metrics.md").read_text()


def test_given_threshold_is_recorded(run2, data2, tmp_path):
    m = _evaluate(run2, data2, tmp_path / "eval", "--threshold", "0.3")
    assert m["binary"]["threshold"] == pytest.approx(0.3)
    assert m["binary"]["threshold_source"] == "given"


def test_positive_leaf_can_be_chosen(run2, data2, tmp_path):
    m = _evaluate(run2, data2, tmp_path / "eval", "--positive", "hem")
    assert m["binary"]["positive"] == "hem"
    assert m["binary"]["tp"] + m["binary"]["fn"] == N2 // 2


def test_target_sensitivity_picks_the_threshold_on_the_validation_split(run2, data2,
                                                                        tmp_path):
    out = tmp_path / "eval"
    m = _evaluate(run2, data2, out, "--target-sensitivity", "0.9")
    b = m["binary"]
    assert "validation" in b["threshold_source"] and "0.9" in b["threshold_source"]
    # The validation images are part of data2: recompute the threshold from predictions.csv.
    with (run2 / "split.csv").open() as handle:
        val = {Path(r["path"]).name: r["label"] for r in csv.DictReader(handle)
               if r["split"] == "val"}
    assert "all" in val.values()
    rows = [r for r in _predictions(out) if Path(r["path"]).name in val]
    assert len(rows) == len(val)
    p_all = np.array([float(r["p_all"]) for r in rows])
    is_all = np.array([r["label"] == "all" for r in rows])
    assert b["threshold"] == pytest.approx(threshold_for_sensitivity(p_all, is_all, 0.9),
                                           abs=1e-5)
    # at that threshold at least 90% of the validation positives are caught
    assert (p_all[is_all] >= b["threshold"] - 1e-6).mean() >= 0.9


def test_data_with_a_subset_of_the_leaves(run7, data7, tmp_path):
    subset = tmp_path / "subset"
    for leaf in ("ALL", "CLL"):
        shutil.copytree(data7 / leaf, subset / leaf)
    out = tmp_path / "eval"
    m = _evaluate(run7, subset, out)
    assert m["n_images"] == 2 * PATIENTS_PER_CLASS * CELLS_PER_PATIENT
    assert m["leaves_present"] == ["ALL", "CLL"]
    assert m["leaves_absent"] == ["Normal", "Reactive", "AML", "APML", "CML"]
    assert "note" in m
    for leaf in m["leaves_absent"]:
        assert leaf in m["note"]
    assert set(m["per_class"]) == {"ALL", "CLL"}
    assert np.array(m["confusion_matrix"]["matrix"]).shape == (7, 7)
    assert m["per_node"]["Acute"]["n"] == m["per_node"]["Chronic"]["n"] == 15
    assert m["note"] in (out / "metrics.md").read_text()
    assert len(_predictions(out)) == 30


def test_missing_run_folder_exits_2_with_a_message(data7, tmp_path, capsys):
    code = main(["evaluate", str(tmp_path / "no-such-run"), str(data7), "--out",
                 str(tmp_path / "eval"), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "error" in err.lower() and "no-such-run" in err
    assert not (tmp_path / "eval" / "metrics.json").exists()


def test_missing_data_folder_exits_2(run7, tmp_path, capsys):
    code = main(["evaluate", str(run7), str(tmp_path / "no-data"), "--out",
                 str(tmp_path / "eval"), "--no-progress"])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


def test_real_cnmc_fixture_cells_give_the_binary_and_patient_blocks(run2, tmp_path):
    # The 8 real C-NMC cells (BMP, 450x450) shipped in tests/fixtures; patients from names.
    fixtures = Path(__file__).parents[1] / "fixtures" / "cnmc"
    out = tmp_path / "eval"
    assert main(["evaluate", str(run2), str(fixtures), "--out", str(out), "--no-progress"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    b = m["binary"]
    assert b["positive"] == "all" and b["tp"] + b["tn"] + b["fp"] + b["fn"] == 8
    assert b["tp"] + b["fn"] == 5  # five ALL cells, three healthy (hem) cells
    assert m["patient_level"]["n_patients"] == 4  # subjects 1, 67, 68, H6


def test_without_data_the_runs_validation_images_are_evaluated(run7, tmp_path):
    out = tmp_path / "eval"
    assert main(["evaluate", str(run7), "--out", str(out), "--no-progress"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    with (run7 / "split.csv").open() as handle:
        n_val = sum(r["split"] == "val" for r in csv.DictReader(handle))
    assert m["n_images"] == n_val > 0


def test_a_model_with_conformal_answers_gets_their_section_and_figure(run7, data7, tmp_path):
    from leukotree.inference.conformal import ConformalAnswers
    from leukotree.models.checkpoint import read_checkpoint, update_checkpoint

    plain = _evaluate(run7, data7, tmp_path / "plain")
    assert "conformal" not in plain and "coverage" not in plain["figures"]
    run = tmp_path / "run"
    shutil.copytree(run7, run)
    answers = ConformalAnswers(0.1, "marginal", dict.fromkeys(LEAVES7, 0.5), 15)
    update_checkpoint(run / "best.pt", conformal=answers.to_dict())
    m = _evaluate(run, data7, tmp_path / "eval")
    c = m["conformal"]
    assert c["n"] == N7 and c["fitted_on"] == 15 and c["mode"] == "marginal"
    assert c["ci_method"] == "patient bootstrap"
    assert c["coverage_ci95"][0] <= c["coverage"] <= c["coverage_ci95"][1]
    assert sum(r["n"] for r in c["per_class"].values()) == N7
    n_val = len([r for r in csv.DictReader((run / "split.csv").open())
                 if r["split"] == "val"])
    # one point per alpha the validation cells support (n >= 1 / alpha - 1)
    assert [p["alpha"] for p in c["curve"]] == [a for a in (0.01, 0.02, 0.05, 0.1, 0.15,
                                                            0.2, 0.3) if n_val >= 1 / a - 1]
    assert m["figures"]["coverage"] == "coverage.png"
    assert (tmp_path / "eval" / "coverage.png").stat().st_size > 0
    assert "Conformal answers (marginal" in (tmp_path / "eval" / "metrics.md").read_text()
    # every cell far from the training cells: the alarm, and the guarantee does not transfer
    ood = read_checkpoint(run)["ood"]
    ood["threshold"] = 1e-12
    update_checkpoint(run / "best.pt", ood=ood)
    shifted = _evaluate(run, data7, tmp_path / "shifted")
    assert shifted["ood"]["domain_shift"]
    assert "does not transfer" in shifted["conformal"]["note"]
