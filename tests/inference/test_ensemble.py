"""``leukotree ensemble``: several trained runs predicted as one, their outputs averaged."""

import csv
import shutil

import numpy as np
import pytest
from fastapi.testclient import TestClient

from leukotree.cli import main
from leukotree.data.synth import generate
from leukotree.engine.config import resolve_config
from leukotree.engine.trainer import train
from leukotree.inference.options import InferenceOptions
from leukotree.serve.app import ServeSettings, create_app
from leukotree.serve.store import Store
from leukotree.serve.worker import Models
from leukotree.taxonomy import load_taxonomy

TAX = load_taxonomy("leukemia7")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs of one recipe, seeds 0 and 1; one at another image size, one without an
    out-of-distribution score."""
    root = tmp_path_factory.mktemp("ensemble")
    generate(root / "data", TAX, patients_per_class=3, cells_per_patient=4, size=32, seed=2,
             progress=False)
    for name, extra in (("s0", {}), ("s1", {"seed": 1}), ("big", {"img_size": 48}),
                        ("no-ood", {"ood_quantile": 0}), ("mean", {"patient_model": "mean"})):
        train(root / "data", root / name, resolve_config(preset="tiny-test", overrides={
            "epochs": 1, "threads": 1, "val_fraction": 0.3, **extra}), progress=False)
    return root


def predicted(path):
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_an_ensemble_predicts_the_mean_of_its_runs(runs, tmp_path, capsys):
    ens = tmp_path / "ens"
    assert main(["ensemble", str(runs / "s0"), str(runs / "s1" / "best.pt"), "--out",
                 str(ens)]) == 0
    assert "ensemble of 2 runs of taxonomy 'leukemia7'" in " ".join(
        capsys.readouterr().err.split())
    cells = runs / "data" / "ALL"
    rows = {}
    for name, model in (("s0", runs / "s0"), ("s1", runs / "s1"), ("ens", ens)):
        out = tmp_path / f"{name}.csv"
        assert main(["predict", str(model), str(cells), "--out", str(out), "--engine",
                     "torch", "--no-progress"]) == 0
        rows[name] = predicted(out)
    assert len(rows["ens"]) == 12
    for a, b, e in zip(rows["s0"], rows["s1"], rows["ens"], strict=True):
        assert a["path"] == b["path"] == e["path"]
        for node in TAX.nodes:  # every node's probability: the members' mean
            assert float(e[f"p_{node}"]) == pytest.approx(
                (float(a[f"p_{node}"]) + float(b[f"p_{node}"])) / 2, abs=2e-6)
        mean_score = (float(a["ood_score"]) + float(b["ood_score"])) / 2
        assert float(e["ood_score"]) == pytest.approx(mean_score, abs=0.01)
        assert e["unclassifiable"] == str(float(e["ood_score"]) > 1)
    leaves = np.array([[float(r[f"p_{leaf}"]) for leaf in TAX.leaves] for r in rows["ens"]])
    np.testing.assert_allclose(leaves.sum(axis=1), 1, atol=1e-4)
    # served like a run folder; heat maps from its first member, named on the models page
    models = Models([ens], InferenceOptions(engine="torch"))
    assert models.get(None)[0] == "ens" and models.torch_model(None) is not None
    with TestClient(create_app(models, Store(tmp_path / "store"), ServeSettings()),
                    base_url="http://localhost") as api:
        page = api.get("/models").text
    assert "Averages 2 models" in page and str(runs / "s1") in page
    assert main(["evaluate", str(ens), str(runs / "data"), "--out", str(tmp_path / "ev"),
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(ens), "--out", str(tmp_path / "ev2"), "--no-progress"]) == 2
    assert "no single validation split; give the DATA" in capsys.readouterr().err
    assert main(["predict", str(ens), str(cells), "--target-error", "0.1", "--out",
                 str(tmp_path / "t.csv"), "--no-progress"]) == 2
    assert "no single validation split. Give --confidence" in capsys.readouterr().err
    # commands of one model name the ensemble's members
    assert main(["export", str(ens), "--onnx", str(tmp_path / "e.onnx")]) == 2
    said = " ".join(capsys.readouterr().err.split())
    assert "is a cv or ensemble folder of 2 models" in said and str(runs / "s0") in said
    for argv in (["adapt", str(ens), str(runs / "data"), "--out", str(tmp_path / "a")],
                 ["train", str(runs / "data"), "-t", "leukemia7", "--preset", "tiny-test",
                  "--init", str(ens), "--out", str(tmp_path / "t")]):
        assert main([*argv, "--no-progress"]) == 2
        assert "is a cv or ensemble folder of 2 models" in capsys.readouterr().err


def test_an_ensemble_refuses_what_it_cannot_average(runs, tmp_path, capsys):
    def refused(*argv: str) -> str:
        assert main(["ensemble", *argv]) == 2
        return " ".join(capsys.readouterr().err.split())

    s0, s1 = str(runs / "s0"), str(runs / "s1")
    assert "at least 2 runs; got 1" in refused(s0, "--out", str(tmp_path / "a"))
    assert "given twice" in refused(s0, str(runs / "s0" / "."), "--out", str(tmp_path / "b"))
    assert "given twice" in refused(s0, str(runs / "s0" / "best.pt"), "--out",
                                    str(tmp_path / "b"))
    said = refused(s0, str(runs / "big"), "--out", str(tmp_path / "c"))
    assert "differ in image size" in said and "big" in said
    said = refused(s0, str(runs / "mean"), "--out", str(tmp_path / "c"))
    assert "differ in patient model" in said
    said = refused(s0, str(runs / "no-ood"), "--out", str(tmp_path / "h"))
    assert "is scored for cells unlike its training cells" in said and "no-ood" in said
    assert "has no trained model" in refused(s0, str(runs / "data"), "--out",
                                             str(tmp_path / "d"))
    assert main(["ensemble", s0, s1, "--out", str(tmp_path / "e")]) == 0
    assert "already a cv or ensemble folder" in refused(str(tmp_path / "e"), s0, "--out",
                                                        str(tmp_path / "f"))
    assert "not an empty folder" in refused(s0, s1, "--out", str(tmp_path / "e"))
    for name in "abcdfh":  # nothing written by a refusal
        assert not (tmp_path / name).exists()
    # a member gone later: named, with what to do
    copy = tmp_path / "s1-copy"
    shutil.copytree(runs / "s1", copy)
    assert main(["ensemble", s0, str(copy), "--out", str(tmp_path / "g")]) == 0
    shutil.rmtree(copy)
    assert main(["predict", str(tmp_path / "g"), str(runs / "data" / "ALL"), "--out",
                 str(tmp_path / "p.csv"), "--no-progress"]) == 2
    said = " ".join(capsys.readouterr().err.split())
    assert "names 1 member run(s) that no longer exist" in said and str(copy) in said


def test_an_ensemble_of_patient_models_promises_no_miss_rate():
    from leukotree.inference.ensemble import EnsemblePatientModel
    from leukotree.patients.fit import FittedPatientModel
    from leukotree.patients.guarantee import MissRateThreshold
    from leukotree.patients.models import build_patient_model
    from leukotree.taxonomy import load_taxonomy

    two = load_taxonomy("aml-apl")
    promise = MissRateThreshold(0.2, 0.1, 0.9, 22, 0, 0.9 ** 22)
    members = [FittedPatientModel(build_patient_model("mean", two, None), "APL", t, "youden",
                                  {}, promise) for t in (0.4, 0.6)]
    ensemble = EnsemblePatientModel(members, [{"leaf_probs": 2}] * 2)
    # each member's threshold was tested on its own scores, not on the averaged ones
    assert ensemble.miss_rate is None and ensemble.negative_below() is None
    assert ensemble.calls(np.array([[0.3, 0.7], [0.5, 0.5]])) == ["negative", "positive"]
