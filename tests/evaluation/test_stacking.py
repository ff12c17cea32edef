"""A patient model stacked on a cross-validation's out-of-fold outputs (``train
--final-model folds``): fitted on every patient as the fold model that never saw it
describes it, estimated by cross-fitting, installed in every fold model."""

import csv
import json
import random

import numpy as np
import pytest

from leukotree.cli import main
from leukotree.data.synth import generate
from leukotree.errors import LeukotreeError
from leukotree.evaluation.stacking import out_of_fold_cells, stack
from leukotree.models.checkpoint import read_checkpoint
from leukotree.rundir import CVDir
from leukotree.taxonomy import load_taxonomy

TYPES = ["blast-no-lineage-spec", "promyelocyte", "lymphocyte", "smudge-cells"]
COMMON = ["-t", "aml-apl", "--cell-taxonomy", "jhh-cells", "--cell-labels",
          "column:cell_type", "--preset", "tiny-test", "--epochs", "1", "--threads", "1",
          "--no-progress", "--positive", "APL"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("apl-stack")
    generate(root / "data", load_taxonomy("aml-apl"), patients_per_class=5,
             cells_per_patient=5, size=32, seed=4, progress=False)
    rng = random.Random(1)
    rows = [{"path": str(p), "label": p.parent.parent.name, "patient": p.parent.name,
             "cell_type": rng.choice(TYPES)}
            for p in sorted((root / "data").rglob("*.png"))]
    with (root / "m.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root / "m.csv"


@pytest.fixture(scope="module")
def ensemble(manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("stacked") / "run"
    assert main(["train", str(manifest), "--out", str(out), "--final-model", "folds",
                 "--folds", "3", "--fold-val-fraction", "0", "--patient-model", "mean",
                 *COMMON]) == 0
    return out


def test_every_patient_is_scored_by_a_fold_model_that_never_saw_it(ensemble):
    folds = out_of_fold_cells(ensemble)
    assert len(folds) == 3
    seen = [{s.patient for s in f.cells.samples} for f in folds]
    assert sum(len(s) for s in seen) == 10 and set.union(*seen) == {
        f"{d}-p{k:03d}" for d in ("APL", "AML") for k in range(5)}
    for k, f in enumerate(folds):  # the cells a fold is scored on are its test part only
        trained = {r["patient"] for r in f.run.read_split("train")}
        assert trained.isdisjoint(seen[k])


def test_the_stacked_mean_is_the_mean_of_each_patients_out_of_fold_cells(ensemble):
    folds = out_of_fold_cells(ensemble)
    stacked = stack(folds, "mean", rule="0.5", positive="APL")
    tax = load_taxonomy("aml-apl")
    k = tax.leaf_index["APL"]
    for f in folds:
        probs = f.cells.outputs["leaf_probs"]
        for patient in {s.patient for s in f.cells.samples}:
            rows = [i for i, s in enumerate(f.cells.samples) if s.patient == patient]
            want = probs[rows, k].mean()  # no OOD score in a fold without validation part
            assert stacked.metrics["patients"][patient]["p_APL"] == pytest.approx(want, abs=1e-4)
            assert stacked.metrics["patients"][patient]["diagnosis"] == (
                "APL" if want >= 0.5 else "AML")
    assert stacked.metrics["n_patients"] == 10 and stacked.fitted.threshold == 0.5


def test_train_folds_installs_one_patient_model_that_predict_applies(ensemble, manifest,
                                                                     tmp_path):
    record = json.loads((ensemble / "stacked.json").read_text())
    assert record["patient_model"] == "mean"
    assert record["cross_fitted"]["n_patients"] == 10
    assert 0 <= record["cross_fitted"]["auroc"] <= 1
    sections = [read_checkpoint(CVDir(ensemble).fold(k).best)["patient_model"]
                for k in range(3)]
    assert sections[0] == sections[1] == sections[2]  # the same stacked model everywhere
    out = tmp_path / "p.csv"
    assert main(["predict", str(ensemble), str(manifest), "--by-patient", "--out", str(out),
                 "--no-progress"]) == 0
    rows = list(csv.DictReader((tmp_path / "p_patients.csv").open()))
    assert len(rows) == 10 and {r["diagnosis"] for r in rows} <= {"APL", "AML"}
    p = np.array([float(r["p_APL"]) for r in rows])
    assert ((p >= 0) & (p <= 1)).all()


def test_folds_need_a_patient_model(manifest, tmp_path, capsys):
    assert main(["train", str(manifest), "--out", str(tmp_path / "x"), "--final-model",
                 "folds", "--folds", "3", *COMMON]) == 2
    assert "final_model 'folds' stacks a patient model" in capsys.readouterr().err
    with pytest.raises(LeukotreeError, match="has no fold count"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "summary.json").write_text("{}")
        out_of_fold_cells(tmp_path / "empty")


def test_the_patient_models_bench_compares_stacked_and_in_sample_fits(ensemble):
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_patient_models.py"
    done = subprocess.run([sys.executable, str(bench), str(ensemble), "--models", "mean",
                           "cell-mix", "--stacked", "--workers", "1"], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout[done.stdout.index("{\n"):])
    (results,) = [part["models"] for part in report["protocols"].values()]
    stacked = {k: v for k, v in results.items() if "stacked" in k}
    assert set(stacked) == {"mean, stacked", "cell-mix, stacked"}
    assert all(v["patients"] == 10 and 0 <= v["auroc"] <= 1 for v in stacked.values())
