"""The patient-level pipeline from the command line: a cell-type head trained on a second
label column, a patient model fitted after training, patient rows from predict (PyTorch
and ONNX), patient metrics from evaluate and pooled out-of-fold patients from cv."""

import csv
import json
import random
import shutil

import pytest

from leukotree.cli import main
from leukotree.data.synth import generate
from leukotree.taxonomy import load_taxonomy

TYPES = ["blast-no-lineage-spec", "promyelocyte", "lymphocyte", "smudge-cells"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("apl-like")
    generate(root / "data", load_taxonomy("aml-apl"), patients_per_class=6,
             cells_per_patient=6, size=32, seed=0, progress=False)
    rng = random.Random(0)
    rows = []
    for path in sorted((root / "data").rglob("*.png")):
        label = path.parent.parent.name
        pool = TYPES[:2] if label == "APL" and rng.random() < 0.6 else TYPES
        rows.append({"path": str(path), "label": label, "patient": path.parent.name,
                     "cell_type": rng.choice(pool)})
    with (root / "m.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root / "m.csv"


COMMON = ["-t", "aml-apl", "--cell-taxonomy", "jhh-cells", "--cell-labels", "column:cell_type",
          "--preset", "tiny-test", "--epochs", "1", "--monitor", "last", "--threads", "1",
          "--no-progress"]


def test_train_fits_a_patient_model_that_predict_and_evaluate_use(manifest, tmp_path):
    run = tmp_path / "run"
    assert main(["train", str(manifest), "--out", str(run), "--patient-model", "differential",
                 "--val-fraction", "0.34", *COMMON]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["patient_level"]["model"] == "differential"
    assert 0 <= summary["patient_level"]["threshold"] <= 1
    rows = {}
    for engine in ("torch", "onnx"):
        out = tmp_path / f"{engine}.csv"
        assert main(["predict", str(run), str(manifest), "--by-patient", "--out", str(out),
                     "--engine", engine, "--no-progress"]) == 0
        rows[engine] = list(csv.DictReader((tmp_path / f"{engine}_patients.csv").open()))
    assert len(rows["torch"]) == 12
    for a, b in zip(rows["torch"], rows["onnx"], strict=True):
        assert a["diagnosis"] == b["diagnosis"] and a["referred"] == b["referred"]
        assert abs(float(a["p_APL"]) - float(b["p_APL"])) < 1e-3
        assert float(a["p_APL"]) + float(a["p_AML"]) == pytest.approx(1, abs=1e-3)
        shares = [float(v) for k, v in a.items() if k.startswith("cells_")]
        assert sum(shares) == pytest.approx(1, abs=1e-3)  # the differential count
    patient = manifest.parent / "data" / "APL" / "APL-p000"
    assert main(["report", str(run), str(patient), "--out", str(tmp_path / "r.html"),
                 "--no-heatmaps", "--no-progress"]) == 0
    page = (tmp_path / "r.html").read_text()
    assert "Differential count" in page and "patient model &#x27;differential&#x27;" in page
    assert "informative cells (blast, promyelocyte cells not flagged" in page  # the evidence
    assert main(["evaluate", str(run), "--out", str(tmp_path / "eval"), "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    pl = metrics["patient_level"]
    assert pl["method"] == "patient model 'differential'" and "patient_auroc" in pl


def test_the_diagnosis_can_be_trained_on_the_cells_that_carry_the_disease(manifest, tmp_path,
                                                                          capsys):
    from leukotree.engine.loop import make_split
    from leukotree.patients.models import focus_types
    from leukotree.taxonomy import load_taxonomy

    cells = load_taxonomy("jhh-cells")
    samples = [type("S", (), {"label": "APL", "cell_label": c})()
               for c in ("blast", "lymphocyte", None, "promyelocyte")]
    split = make_split(samples, None, load_taxonomy("aml-apl"), cells,
                       (focus_types(cells, None), 0.25))
    assert split.diagnosis_weight.tolist() == [1.0, 0.25, 1.0, 1.0]
    run = tmp_path / "run"
    assert main(["train", str(manifest), "--out", str(run), "--patient-model", "focused",
                 "--diagnosis-focus", "0", "--val-fraction", "0.34", *COMMON]) == 0
    assert "diagnosis loss is focused on the blast, promyelocyte cells" in capsys.readouterr().err
    assert json.loads((run / "summary.json").read_text())["patient_level"]["model"] == "focused"
    assert main(["train", str(manifest), "--out", str(tmp_path / "r2"), "-t", "aml-apl",
                 "--diagnosis-focus", "0.5", "--preset", "tiny-test"]) == 2
    assert "'diagnosis_focus' parameter (0.5) weighs cells" in capsys.readouterr().err


def test_cv_pools_out_of_fold_patients(manifest, tmp_path):
    out = tmp_path / "cv"
    # each fold validated on its test fold (6 training patients spare no validation part)
    assert main(["cv", str(manifest), "--out", str(out), "--folds", "2", "--repeats", "2",
                 "--patient-model", "fraction", "--fold-val-fraction", "0", *COMMON]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [p["n_patients"] for p in summary["patient_level"]] == [12, 12]
    spread = summary["repeat_spread"]["accuracy"]  # the spread across the two repeats
    accs = [p["accuracy"] for p in summary["patient_level"]]
    assert (spread["n"], spread["min"], spread["max"]) == (2, min(accs), max(accs))
    assert (out / "fold_1_r1" / "best.pt").exists()
    assert "Patient level (out-of-fold patients" in (out / "summary.md").read_text()


def test_a_cv_folder_predicts_as_one_ensemble(manifest, tmp_path):
    out = tmp_path / "cv"
    # 2 of each fold's 6 training patients validate (calibration, unclassifiable flag)
    assert main(["cv", str(manifest), "--out", str(out), "--folds", "2",
                 "--patient-model", "differential", "--fold-val-fraction", "0.34",
                 *COMMON]) == 0
    thresholds = [json.loads((out / f"fold_{k}" / "summary.json").read_text())
                  ["patient_level"]["threshold"] for k in (0, 1)]
    # every patient is pooled: diagnosed, or listed as not diagnosed (cells all flagged)
    pooled = json.loads((out / "summary.json").read_text())["patient_level"][0]
    assert pooled["n_patients"] + len(pooled["insufficient"]) == 12
    assert "not diagnosed" in (out / "summary.md").read_text()
    assert main(["predict", str(out), str(manifest), "--by-patient", "--out",
                 str(tmp_path / "p.csv"), "--engine", "torch", "--no-progress"]) == 0
    rows = list(csv.DictReader((tmp_path / "p_patients.csv").open()))
    assert len(rows) == 12 and rows[0]["model"] == "ensemble of 2 x differential"
    assert float(rows[0]["threshold"]) == pytest.approx(sum(thresholds) / 2, abs=1e-4)
    diagnosed = [row for row in rows if row["diagnosis"] != "insufficient"]
    assert len(diagnosed) >= 6
    for row in diagnosed:
        said = "APL" if float(row["p_APL"]) >= float(row["threshold"]) else "AML"
        assert row["diagnosis"] == said
    # the folds are calibrated and score each cell: the ensemble flags unclassifiable cells
    cells = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert all(row["unclassifiable"] in ("True", "False") and row["ood_score"]
               for row in cells)
    assert any(row["unclassifiable"] == "True" for row in cells)
    patient = diagnosed[0]["patient"]  # a patient with cells the ensemble classifies
    assert main(["report", str(out), str(manifest.parent / "data" / patient.split("-")[0]
                                         / patient),
                 "--out", str(tmp_path / "r.html"), "--no-heatmaps", "--no-progress"]) == 0
    assert "ensemble of 2 x differential" in (tmp_path / "r.html").read_text()


def test_a_run_with_a_cell_type_head_self_trains_on_another_lab(manifest, tmp_path,
                                                                monkeypatch, capsys):
    run, tuned = tmp_path / "run", tmp_path / "tuned"
    # the lab's own cell taxonomy, named relative to where it trains
    (tmp_path / "here").mkdir()
    (tmp_path / "here" / "cells.yaml").write_text(load_taxonomy("jhh-cells").to_yaml())
    monkeypatch.chdir(tmp_path / "here")
    common = [a if a != "jhh-cells" else "cells.yaml" for a in COMMON]
    assert main(["train", str(manifest), "--out", str(run), "--patient-model", "differential",
                 "--val-fraction", "0.34", *common]) == 0
    monkeypatch.chdir(tmp_path)  # self-trained from elsewhere
    with (run / "split.csv").open() as handle:
        source = {r["path"]: r for r in csv.DictReader(handle)}
    cells = load_taxonomy("jhh-cells")
    with manifest.open() as handle:
        given = {r["path"]: cells.resolve(r["cell_type"]) for r in csv.DictReader(handle)}
    # the run's split keeps each image's cell type (as the cell taxonomy names it)
    assert {p: r["cell_type"] for p, r in source.items()} == {p: given[p] for p in source}
    generate(tmp_path / "other-lab", load_taxonomy("aml-apl"), patients_per_class=2,
             cells_per_patient=6, size=40, seed=7, progress=False)
    assert main(["adapt", str(run), str(tmp_path / "other-lab"), "--out", str(tuned),
                 "--keep", "1", "--epochs", "1", "--no-progress"]) == 0
    with (tuned / "split.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    replayed = [r for r in rows if r["path"] in source]
    new = [r for r in rows if r["path"] not in source]
    assert replayed and new
    # replayed (and validation) images keep their cell types; the new cells have none
    assert all(r["cell_type"] == given[r["path"]] for r in replayed)
    assert all(r["cell_type"] == "" for r in new)
    with (tuned / "val.csv").open() as handle:
        assert all(r["cell_type"] == given[r["path"]] for r in csv.DictReader(handle))
    report = json.loads((tuned / "adapt.json").read_text())
    assert report["patient_model"].startswith("'differential', fitted again")
    assert main(["predict", str(tuned), str(tmp_path / "other-lab"), "--by-patient", "--out",
                 str(tmp_path / "p.csv"), "--no-progress"]) == 0
    # a run whose split.csv predates cell types cannot keep its cell-type head trained
    old = tmp_path / "old"
    shutil.copytree(run, old)
    with (old / "split.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    with (old / "split.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[k for k in rows[0] if k != "cell_type"],
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    assert main(["adapt", str(old), str(tmp_path / "other-lab"), "--out",
                 str(tmp_path / "never"), "--no-progress"]) == 2
    assert "lists no cell types" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_replaying_a_run_of_another_cell_taxonomy_trains_the_diagnosis_only(manifest,
                                                                           tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(manifest), "--out", str(run), "--val-fraction", "0.34",
                 *COMMON]) == 0
    # a second lab: other images and patients, its own cell taxonomy (other names)
    generate(tmp_path / "lab2", load_taxonomy("aml-apl"), patients_per_class=3,
             cells_per_patient=6, size=32, seed=3, progress=False)
    (tmp_path / "cells2.yaml").write_text(
        "name: cells2\ntree:\n  blast-no-lineage-spec:\n  promyelocyte:\n  lymphocyte:\n"
        "  smudge-cells:\n")
    rng = random.Random(1)
    rows = [{"path": str(p), "label": p.parent.parent.name, "patient": f"lab2-{p.parent.name}",
             "cell_type": rng.choice(TYPES)} for p in sorted((tmp_path / "lab2").rglob("*.png"))]
    with (tmp_path / "lab2.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    common = [a if a != "jhh-cells" else str(tmp_path / "cells2.yaml") for a in COMMON]
    capsys.readouterr()
    assert main(["train", str(tmp_path / "lab2.csv"), "--out", str(tmp_path / "two"),
                 "--val-fraction", "0.34", "--replay", str(run), *common]) == 0
    said = " ".join(capsys.readouterr().err.split())
    assert "are not of the cell taxonomy 'cells2': its images train the diagnosis only" in said
    with (tmp_path / "two" / "split.csv").open() as handle:
        replayed = [r for r in csv.DictReader(handle) if "lab2" not in r["path"]]
    assert replayed and all(r["cell_type"] == "" for r in replayed)


PLAIN = ["-t", "aml-apl", "--preset", "tiny-test", "--epochs", "1", "--monitor", "last",
         "--threads", "1", "--no-progress"]


def test_a_promised_miss_rate_travels_from_train_to_predict_evaluate_and_onnx(
        manifest, tmp_path, capsys):
    from leukotree.inference.loader import load

    run = tmp_path / "run"
    # 6 APL patients, 4 of them training ones: small cohorts can only promise large rates
    # (k misses among 4 at 50% while P(Binom(4, .5) <= k) <= .5: k <= 1, so t_miss is the
    # second lowest training APL score); a decision threshold of .99 leaves the training
    # APL patients above t_miss referred
    assert main(["train", str(manifest), "--out", str(run), "--patient-model", "mean",
                 "--patient-miss-rate", "0.5", "--confidence", "0.5", "--positive", "APL",
                 "--patient-threshold", "0.99", "--val-fraction", "0.34", "--coverage", "0.5",
                 *PLAIN]) == 0
    summary = json.loads((run / "summary.json").read_text())
    promise = summary["patient_level"]["miss_rate"]
    assert (promise["alpha"], promise["confidence"]) == (0.5, 0.5)
    assert 0 <= promise["miss_threshold"] <= 1
    rows = {}
    for engine in ("torch", "onnx"):
        out = tmp_path / f"{engine}.csv"
        assert main(["predict", str(run), str(manifest), "--by-patient", "--out", str(out),
                     "--engine", engine, "--no-progress"]) == 0
        rows[engine] = list(csv.DictReader((tmp_path / f"{engine}_patients.csv").open()))
    header = list(rows["torch"][0])
    assert header[:5] == ["patient", "n_cells", "n_unclassifiable", "diagnosis", "path"]
    assert {"referred", "call", "p_APL", "p_AML"} <= set(header)
    assert header[-1] == "call"  # added last: the columns before keep their places
    fitted = load(run).predictor("torch").patient_model
    low = fitted.negative_below()
    assert (fitted.miss_rate.n_positive, fitted.miss_rate.misses, fitted.threshold) == (4, 1, .99)
    calls = [row["call"] for row in rows["torch"]]
    assert calls.count("referred") >= 3 and "negative" in calls
    referred = next(row for row in rows["torch"] if row["call"] == "referred")
    assert referred["reason"].startswith("the evidence is too thin to rule out APL at the "
                                         "stated miss rate (at most 50% of APL patients")
    for a, b in zip(rows["torch"], rows["onnx"], strict=True):
        assert a["call"] == b["call"] and a["referred"] == b["referred"]
        if a["diagnosis"] == "insufficient":
            assert a["call"] == "referred"
            continue
        p = float(a["p_APL"])
        want = "positive" if p >= fitted.threshold else "negative" if p < low else "referred"
        if abs(p - fitted.threshold) > 1e-3 and abs(p - low) > 1e-3:  # rounded to 4 places
            assert a["call"] == want
        assert (a["call"] == "referred") == (a["referred"] == "True")
    # the ONNX file carries the promise in its metadata
    assert main(["export", str(run), "--onnx", str(tmp_path / "m.onnx")]) == 0
    onnx_model = load(tmp_path / "m.onnx").predictor("onnx").patient_model
    assert onnx_model.miss_rate == fitted.miss_rate and onnx_model.miss_rate.alpha == 0.5
    assert main(["evaluate", str(run), "--out", str(tmp_path / "eval"), "--no-progress"]) == 0
    pl = json.loads((tmp_path / "eval" / "metrics.json").read_text())["patient_level"]
    block = pl["miss_rate"]
    calls = [p["call"] for p in pl["patients"].values()]
    positives = [p for p in pl["patients"].values() if p["truth"] == "APL"]
    assert block["n_positive"] == len(positives) and block["referred"] == calls.count("referred")
    assert block["missed"] == sum(p["call"] == "negative" for p in positives)
    assert "observed miss rate" in (tmp_path / "eval" / "metrics.md").read_text()
    patient = manifest.parent / "data" / "APL" / "APL-p000"
    assert main(["report", str(run), str(patient), "--out", str(tmp_path / "r.html"),
                 "--no-heatmaps", "--no-progress"]) == 0
    page = (tmp_path / "r.html").read_text()
    assert "Stated miss rate: at most 50% of APL patients are called negative, with 50% " \
           "confidence" in page
    assert "answer: " in page  # each cell's conformal answer beside its probability
    # too few APL patients for 10% at 90%: the run says what they support, before training
    capsys.readouterr()
    assert main(["train", str(manifest), "--out", str(tmp_path / "strict"), "--patient-model",
                 "mean", "--patient-miss-rate", "0.1", "--confidence", "0.9",
                 "--val-fraction", "0.34", *PLAIN]) == 2
    err = capsys.readouterr().err
    # 4 training APL patients support 1 - .1 ** (1 / 4) = 43.8%
    assert "4 APL patient(s) cannot promise a miss rate of at most 10.0% with 90% " \
           "confidence: even with none missed, that needs 22 APL patients. These support a " \
           "miss rate of 43.8% or more" in err
    assert "epoch 1" not in err and not (tmp_path / "strict" / "best.pt").exists()
