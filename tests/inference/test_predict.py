"""Prediction: referral logic by hand, inputs, bad images, per-patient diagnoses."""

import csv
import json

import numpy as np
import pytest

from leukotree.cli import main
from leukotree.data.synth import generate
from leukotree.engine.config import resolve_config
from leukotree.engine.trainer import train
from leukotree.taxonomy import load_taxonomy

TAX = load_taxonomy("leukemia7")  # leaves: Normal Reactive ALL AML APML CLL CML


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pred")
    data = root / "data"
    generate(data, TAX, patients_per_class=3, cells_per_patient=4, size=32, seed=2,
             progress=False)
    train(data, root / "run", resolve_config(preset="tiny-test", overrides={
        "epochs": 1, "threads": 1, "val_fraction": 0.3}), progress=False)
    return root


def test_predict_cli_reports_a_bad_image_and_predicts_the_rest(run, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "preds.csv"
    code = main(["predict", str(run / "run"), str(run / "data" / "ALL"), str(bad),
                 "--patients", "folder", "--by-patient", "--out", str(out), "--no-progress",
                 "--confidence", "0.6"])
    assert code == 3  # finished, with one unreadable input named
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 3 * 4 + 1
    broken = [r for r in rows if r["path"].endswith("broken.png")]
    assert len(broken) == 1 and "broken.png" in broken[0]["error"]
    for r in rows:
        if r["error"]:
            continue
        p = {k[2:]: float(v) for k, v in r.items() if k.startswith("p_")}
        # children sum to their parent; a child never exceeds its parent
        assert p["Normal"] + p["Reactive"] + p["Leukemia"] == pytest.approx(1, abs=1e-4)
        assert p["ALL"] + p["AML"] + p["APML"] == pytest.approx(p["Acute"], abs=1e-4)
        assert p["Acute"] <= p["Leukemia"] + 1e-6
        assert r["decoded_path"].endswith(r["predicted_leaf"])
        assert (r["refer"] == "True") == (r["reported_node"] != r["predicted_leaf"])
    patients = list(csv.DictReader((tmp_path / "preds_patients.csv").open()))
    # the unreadable image's patient (its folder) is listed, with no cell to decide on
    by_id = {p["patient"]: p for p in patients}
    assert set(by_id) == {"ALL-p000", "ALL-p001", "ALL-p002", tmp_path.name}
    assert by_id.pop(tmp_path.name)["diagnosis"] == "insufficient"
    # unclassifiable cells (unlike the training cells) are named and left out
    assert all(int(p["n_cells"]) + int(p["n_unclassifiable"]) == 4 for p in by_id.values())
    assert "1 unreadable" in capsys.readouterr().err


def test_unclassifiable_cells_are_referred_left_out_and_raise_the_alarm(run, tmp_path, capsys):
    import shutil

    from leukotree.models.checkpoint import read_checkpoint, update_checkpoint

    strict = tmp_path / "strict"
    shutil.copytree(run / "run", strict)
    ood = read_checkpoint(strict)["ood"]
    ood["threshold"] = 1e-12  # every cell is far from the training cells
    update_checkpoint(strict, ood=ood)
    out = tmp_path / "p.csv"
    assert main(["predict", str(strict), str(run / "data" / "AML"), "--by-patient",
                 "--out", str(out), "--no-progress", "--engine", "torch"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert rows and all(r["unclassifiable"] == "True" and r["refer"] == "True"
                        and r["reported_node"] == "unclassifiable" for r in rows)
    assert all(float(r["ood_score"]) > 1 for r in rows)
    patients = list(csv.DictReader((tmp_path / "p_patients.csv").open()))
    assert {p["diagnosis"] for p in patients} == {"insufficient"}
    assert all(p["n_cells"] == "0" and p["n_unclassifiable"] == "4" for p in patients)
    err = capsys.readouterr().err
    assert "12 cell(s) unclassifiable" in err and "domain shift" in err


def test_predict_by_patient_without_ids_is_a_clear_error(run, capsys):
    code = main(["predict", str(run / "run"), str(run / "data" / "CLL"), "--by-patient",
                 "--patients", "none", "--no-progress"])
    assert code == 2
    assert "patient ids" in capsys.readouterr().err


def test_predict_finds_patients_of_a_labelled_folder_by_itself(run, tmp_path):
    # the contract of issue 12: DATA/<label>/<patient>/<cell>, no --patients given
    assert main(["predict", str(run / "run"), str(run / "data"), "--by-patient", "--out",
                 str(tmp_path / "p.csv"), "--no-progress"]) == 0
    rows = list(csv.DictReader((tmp_path / "p_patients.csv").open()))
    assert len(rows) == 7 * 3 and {"patient", "n_cells", "diagnosis", "referred"} <= set(rows[0])
    assert all(f"p_{leaf}" in rows[0] for leaf in TAX.leaves)


def test_dihedral_averaging_is_invariant_to_rotations_and_flips():
    from leukotree.inference.predictor import TorchPredictor, dihedral_mean
    from leukotree.models.heads import ModelConfig, build_model

    predictor = TorchPredictor(build_model(TAX, ModelConfig(
        head="multihead", backbone="test_resnet", img_size=32)))
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    base = dihedral_mean(predictor, x)
    turned = dihedral_mean(predictor, np.rot90(x, 1, axes=(1, 2))[:, :, ::-1])
    plain = predictor.predict(x)
    assert np.allclose(base, turned, atol=1e-5)
    assert np.allclose(base.sum(1), 1, atol=1e-5)
    assert not np.allclose(base, plain, atol=1e-4)  # averaging changes the answer


def test_predict_can_decode_with_another_crop_mode(run, tmp_path):
    out = tmp_path / "auto.csv"
    assert main(["predict", str(run / "run"), str(run / "data" / "CLL"), "--crop-mode", "auto",
                 "--out", str(out), "--no-progress", "--engine", "torch"]) == 0
    assert len(list(csv.DictReader(out.open()))) == 3 * 4
    from leukotree.errors import LeukotreeError
    from leukotree.inference.loader import load
    from leukotree.inference.options import input_config

    predictor = load(run / "run").predictor("torch")
    own = predictor.model_config
    assert input_config(own, crop_mode="auto").crop_mode == "auto"
    assert predictor.model_config is own and own.crop_mode == "centre"  # not mutated
    with pytest.raises(LeukotreeError, match="'crop_mode' parameter must be one of"):
        input_config(own, crop_mode="nucleus")
    with pytest.raises(LeukotreeError, match="trained without one"):
        input_config(own, pixel_size=0.3)


def test_an_ensemble_refuses_members_that_decode_images_differently():
    from dataclasses import replace

    from leukotree.errors import LeukotreeError
    from leukotree.inference.ensemble import EnsemblePredictor
    from leukotree.inference.predictor import TorchPredictor
    from leukotree.models.heads import ModelConfig, build_model

    def member(**view):
        model = build_model(TAX, ModelConfig(backbone="test_resnet", img_size=32,
                                             pixel_size=0.5, field_um=16.0))
        model.config = replace(model.config, **view)
        return TorchPredictor(model)

    assert EnsemblePredictor([member(), member()], "cv").model_config.field_um == 16.0
    for view in ({"input_pixel_size": 0.25}, {"field_um": 20.0}, {"crop_mode": "auto"}):
        with pytest.raises(LeukotreeError, match=r"differ in crop \(crop fraction, crop mode or "
                                                 r"pixel size\) \(.model 1. and .model 2.\)"):
            EnsemblePredictor([member(), member(**view)], "cv")


def test_a_manifest_pixel_size_column_decodes_each_image_at_its_own_scale(tmp_path, capsys):
    from PIL import Image

    from leukotree.errors import LeukotreeError
    from leukotree.inference.options import input_config
    from leukotree.inference.predictor import TorchPredictor, predict_paths
    from leukotree.models.checkpoint import save_model
    from leukotree.models.heads import ModelConfig, build_model

    torch_model = build_model(TAX, ModelConfig(backbone="test_resnet", img_size=32,
                                               pixel_size=0.5, field_um=16.0))
    save_model(tmp_path / "best.pt", torch_model)
    rng = np.random.default_rng(3)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"c{i}.png")
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), np.uint8)).save(paths[-1])
    (tmp_path / "m.csv").write_text("path,pixel_size\nc0.png,0.5\nc1.png,1.0\nc2.png,\n")
    out = tmp_path / "p.csv"
    assert main(["predict", str(tmp_path / "best.pt"), str(tmp_path / "m.csv"), "--out",
                 str(out), "--no-progress", "--engine", "torch", "--pixel-size", "0.25"]) == 0
    got = [[float(r[f"p_{leaf}"]) for leaf in TAX.leaves] for r in csv.DictReader(out.open())]
    # each row as predicted alone at its own pixel size (the empty cell: the flag's 0.25)
    for path, um, row in zip(paths, (0.5, 1.0, 0.25), got, strict=True):
        alone = predict_paths(TorchPredictor(torch_model), [path],
                              config=input_config(torch_model.config, pixel_size=um),
                              progress=False).leaf_probs[0]
        np.testing.assert_allclose(row, alone, atol=1e-5)
    (tmp_path / "bad.csv").write_text("path,pixel_size\nc0.png,fast\n")
    assert main(["predict", str(tmp_path / "best.pt"), str(tmp_path / "bad.csv"),
                 "--no-progress"]) == 2
    assert "bad.csv line 2: the 'pixel_size' cell" in capsys.readouterr().err
    plain = build_model(TAX, ModelConfig(backbone="test_resnet", img_size=32))
    with pytest.raises(LeukotreeError, match=r"pixel_size column.*trained without"):
        predict_paths(TorchPredictor(plain), paths[:2], pixel_sizes=[0.5, None],
                      progress=False)


# ----------------------------------------------------------------- conformal answers
@pytest.fixture(scope="module")
def conformal_run(run):
    """The same data trained with --coverage 0.9: best.pt keeps conformal answers."""
    train(run / "data", run / "conformal", resolve_config(preset="tiny-test", overrides={
        "epochs": 1, "threads": 1, "val_fraction": 0.3, "coverage": 0.9}), progress=False)
    return run / "conformal"


def _rows(path):
    return list(csv.DictReader(path.open()))


def test_a_run_without_coverage_predicts_without_answer_columns(run, tmp_path):
    out = tmp_path / "p.csv"
    assert main(["predict", str(run / "run"), str(run / "data" / "CLL"), "--out", str(out),
                 "--no-progress", "--engine", "torch"]) == 0
    assert "answer_node" not in _rows(out)[0]


def _check_answers(rows):
    for r in rows:
        node = r["answer_node"]
        # the answer lies on the predicted leaf's path and lists the leaves below it
        assert node in r["decoded_path"].split(" > ") or node == TAX.root
        assert r["answer_leaves"].split("|") == list(TAX.descendant_leaves(node))
        assert r["predicted_leaf"] in r["answer_leaves"].split("|")


def test_predict_gives_the_stored_answers_alike_in_pytorch_and_onnx(conformal_run, tmp_path):
    from leukotree.inference.conformal import ConformalAnswers, answer_nodes
    from leukotree.models.checkpoint import read_checkpoint

    section = read_checkpoint(conformal_run / "best.pt")["conformal"]
    n_val = sum(r["split"] == "val" for r in csv.DictReader((conformal_run / "split.csv").open()))
    assert section["alpha"] == pytest.approx(0.1) and section["n"] == n_val
    assert section["mode"] == "marginal" and n_val >= 9  # min_cells(0.1)
    summary = json.loads((conformal_run / "summary.json").read_text())
    assert summary["conformal"]["coverage"] >= 0.9
    data = str(conformal_run.parent / "data" / "AML")
    assert main(["export", str(conformal_run), "--onnx", str(tmp_path / "m.onnx")]) == 0
    got = {}
    for name, model, engine in (("torch", conformal_run, "torch"),
                                ("onnx", tmp_path / "m.onnx", "onnx")):
        out = tmp_path / f"{name}.csv"
        assert main(["predict", str(model), data, "--out", str(out), "--no-progress",
                     "--engine", engine]) == 0
        got[name] = _rows(out)
        _check_answers(got[name])
    assert [r["answer_node"] for r in got["torch"]] == [r["answer_node"] for r in got["onnx"]]
    # the rule applied to the printed probabilities gives the printed answers
    probs = np.array([[float(r[f"p_{leaf}"]) for leaf in TAX.leaves] for r in got["torch"]])
    assert answer_nodes(TAX, probs, ConformalAnswers.from_dict(section)) == [
        r["answer_node"] for r in got["torch"]]


def test_predict_coverage_refits_on_the_validation_split(run, tmp_path, capsys):
    from leukotree.inference.conformal import fit_conformal
    from leukotree.inference.loader import load
    from leukotree.inference.options import InferenceOptions
    from leukotree.inference.predict import run_predict, validation_probs

    inputs = [run / "data" / "CML"]
    result = run_predict(run / "run", inputs, InferenceOptions(engine="torch", coverage=0.8),
                         progress=False)
    loaded = load(run / "run")
    truth, probs = validation_probs(loaded, loaded.predictor("torch"))
    patients = [r["patient"] for r in loaded.run_dir("").read_split("val")]
    assert result.conformal == fit_conformal(TAX, truth, probs, 1 - 0.8, groups=patients)
    assert result.conformal.n == len(truth)
    assert result.conformal.patients == len(set(patients)) >= 4  # over the patients
    out = tmp_path / "p.csv"
    assert main(["predict", str(run / "run"), *map(str, inputs), "--out", str(out),
                 "--no-progress", "--engine", "torch", "--coverage", "0.8"]) == 0
    _check_answers(_rows(out))
    assert "conformal answers (marginal, coverage 0.8" in capsys.readouterr().err


def test_predict_coverage_is_refused_without_one_validation_split(run, conformal_run,
                                                                   tmp_path, capsys):
    assert main(["export", str(run / "run"), "--onnx", str(tmp_path / "m.onnx")]) == 0
    assert main(["ensemble", str(run / "run"), str(conformal_run), "--out",
                 str(tmp_path / "ens")]) == 0
    capsys.readouterr()
    for model in (tmp_path / "m.onnx", tmp_path / "ens"):
        assert main(["predict", str(model), str(run / "data" / "CML"), "--no-progress",
                     "--coverage", "0.9"]) == 2
        err = capsys.readouterr().err
        assert "no single validation split" in err or "no validation split" in err
        assert "give one run folder for --coverage" in err
    # an ensemble's members were fitted on their own outputs: it has no answers
    out = tmp_path / "e.csv"
    assert main(["predict", str(tmp_path / "ens"), str(run / "data" / "CML"), "--out",
                 str(out), "--no-progress"]) == 0
    assert "answer_node" not in _rows(out)[0]


def test_training_refuses_too_few_validation_cells_for_the_coverage(run, capsys):
    code = main(["train", str(run / "data"), "--preset", "tiny-test", "--epochs", "1",
                 "--val-fraction", "0.3", "--coverage", "0.99", "--out",
                 str(run / "too-few"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "--coverage" in err and "need at least 99 labelled validation" in err
    assert not (run / "too-few" / "best.pt").exists()


def test_mondrian_training_names_the_classes_short_and_the_number_needed(run, capsys):
    code = main(["train", str(run / "data"), "--preset", "tiny-test", "--epochs", "1",
                 "--val-fraction", "0.3", "--coverage", "0.9", "--conformal", "mondrian",
                 "--out", str(run / "mondrian"), "--no-progress"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "at least 9 labelled validation cells of every class" in err
    assert "too few of: Normal (" in err and "or use marginal answers" in err


def test_bad_confidence_or_too_few_cells_for_coverage_are_refused_before_any_image(
        run, tmp_path, capsys, monkeypatch):
    import leukotree.inference.predict as predict_module

    def never(*args, **kwargs):
        raise AssertionError("an image was read before the options were checked")

    monkeypatch.setattr(predict_module, "predict_paths", never)
    images = sorted((run / "data").rglob("*.png"))[:2] if (run / "data").exists() else []
    cells = [str(p) for p in images] or [str(tmp_path / "cell.png")]
    assert main(["predict", str(run / "run"), *cells, "--confidence", "2",
                 "--no-progress"]) == 2
    assert "--confidence values must be in [0, 1]" in capsys.readouterr().err
    assert main(["predict", str(run / "run"), *cells, "--coverage", "0.999",
                 "--no-progress"]) == 2
    assert "need at least 999 labelled validation cells" in " ".join(
        capsys.readouterr().err.split())
