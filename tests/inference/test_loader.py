"""The one loader: every kind of RUN path becomes a LoadedModel; what a command cannot take
is refused with what to give instead."""

import json
import shutil

import numpy as np
import pytest
import torch

from leukotree.errors import LeukotreeError
from leukotree.inference.ensemble import EnsemblePredictor
from leukotree.inference.export import export_onnx
from leukotree.inference.loader import (
    KINDS,
    load,
    make_ensemble,
    trained_checkpoint,
    trained_run,
)
from leukotree.inference.predictor import OnnxPredictor, TorchPredictor
from leukotree.models.checkpoint import FORMAT, save_model
from leukotree.models.heads import ModelConfig, TreeClassifier, build_model
from leukotree.rundir import CVDir, RunDir
from leukotree.taxonomy import load_taxonomy

TAX = load_taxonomy("leukemia7")


def _run(folder, seed):
    torch.manual_seed(seed)
    folder.mkdir(parents=True)
    save_model(folder / RunDir.BEST, build_model(TAX, ModelConfig(backbone="test_resnet",
                                                                  img_size=32)))
    return folder


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """A run folder, an ONNX export of it, a cv folder of two folds and an ensemble of two
    runs."""
    root = tmp_path_factory.mktemp("loader")
    run = _run(root / "run", 0)
    onnx = export_onnx(run, root / "model.onnx")
    cv = CVDir(root / "cv")
    for k in range(2):
        _run(cv.fold(k).path, 10 + k)
    cv.config.write_text("folds: 2\n")
    cv.summary.write_text(json.dumps({"folds": [{"fold": 0}, {"fold": 1}]}))
    other = _run(root / "other", 1)
    make_ensemble([run, other / RunDir.BEST], root / "ens")
    return {"run": run, "onnx": onnx, "cv": cv.path, "ensemble": root / "ens",
            "other": other, "root": root}


def test_each_kind_is_recognised_with_its_members(paths):
    assert KINDS == ("run", "onnx", "cv", "ensemble")
    for kind in KINDS:
        loaded = load(paths[kind])
        assert loaded.kind == kind and loaded.source == paths[kind]
    assert load(paths["run"] / RunDir.BEST).kind == "run"
    assert load(paths["run"]).is_single and load(paths["onnx"]).is_single
    cv = load(paths["cv"])
    assert not cv.is_single
    assert cv.member_paths == [paths["cv"] / "fold_0", paths["cv"] / "fold_1"]
    ens = load(paths["ensemble"])
    assert ens.member_paths == [paths["run"], paths["other"] / RunDir.BEST]  # as given, resolved
    assert all(m.kind == "run" for m in ens.members)


def test_a_run_gives_its_split_payload_predictor_and_torch_model(paths):
    loaded = load(paths["run"] / RunDir.BEST)
    assert loaded.run_dir("").path == paths["run"]  # the folder of its .pt
    assert loaded.checkpoint == paths["run"] / RunDir.BEST
    assert loaded.payload["format"] == FORMAT
    model = loaded.torch_model()
    assert isinstance(model, TreeClassifier) and not model.training
    assert model is not loaded.torch_model()  # a new copy each time (heat maps hook it)
    predictor = loaded.predictor("torch")
    assert isinstance(predictor, TorchPredictor) and predictor.engine == "torch"
    assert isinstance(loaded.predictor("onnx"), OnnxPredictor)
    pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    onnx = load(paths["onnx"]).predictor("auto")
    np.testing.assert_allclose(onnx.predict(pixels), predictor.predict(pixels), atol=1e-4)
    assert load(paths["onnx"]).payload == {}  # the file's metadata is its predictor's


def test_cv_and_ensemble_folders_average_their_members(paths):
    pixels = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    for kind in ("cv", "ensemble"):
        loaded = load(paths[kind])
        predictor = loaded.predictor("torch")
        assert isinstance(predictor, EnsemblePredictor)
        assert predictor.engine == "ensemble of 2 (torch)"
        each = [m.predictor("torch").predict(pixels) for m in loaded.members]
        np.testing.assert_allclose(predictor.predict(pixels), np.mean(each, axis=0),
                                   atol=1e-6)
        assert loaded.payload is loaded.members[0].payload  # the first member's
        assert loaded.first_run() is loaded.members[0]


@pytest.mark.parametrize(("kind", "call", "message"), [
    ("cv", lambda m: m.torch_model(), r"is a cv or ensemble folder of 2 models; .*fold_0"),
    ("ensemble", lambda m: m.checkpoint, r"is a cv or ensemble folder of 2 models; .*run'"),
    ("cv", lambda m: m.run_dir("; give the DATA."),
     r"no single validation split; give the DATA\."),
    ("onnx", lambda m: m.run_dir(". Give --confidence instead."),
     r"is an ONNX file: it has no validation split .*Give --confidence"),
    ("onnx", lambda m: m.torch_model(), r"exported ONNX file; .*give the run folder"),
    ("onnx", lambda m: m.first_run(), r"heat maps and reports need a PyTorch model"),
    ("onnx", lambda m: m.predictor("torch"), r"runs with --engine onnx or auto"),
    ("run", lambda m: m.predictor("tensorrt"),
     r"'engine' parameter must be one of auto, torch, onnx; got 'tensorrt'"),
])
def test_what_a_kind_cannot_give_is_refused_with_what_to_give(paths, kind, call, message):
    with pytest.raises(LeukotreeError, match=message):
        call(load(paths[kind]))


def test_paths_that_hold_no_model_are_refused(paths, tmp_path):
    with pytest.raises(LeukotreeError, match=r"best.pt' does not exist; give a run folder"):
        load(tmp_path)  # an empty folder
    with pytest.raises(LeukotreeError, match=r"'.*gone.pt' does not exist"):
        load(tmp_path / "gone.pt")
    with pytest.raises(LeukotreeError, match=r"ONNX file '.*gone.onnx' does not exist"):
        load(tmp_path / "gone.onnx")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(LeukotreeError, match="is not a readable leukotree model"):
        _ = load(tmp_path / "junk.pt").payload
    # an ensemble whose member is gone names it
    copy = tmp_path / "copy"
    shutil.copytree(paths["other"], copy)
    make_ensemble([paths["run"], copy], tmp_path / "ens")
    shutil.rmtree(copy)
    with pytest.raises(LeukotreeError, match=r"names 1 member run\(s\) that no longer exist"):
        load(tmp_path / "ens")


def test_an_option_naming_one_trained_run_gets_its_checkpoint_or_a_refusal(paths, tmp_path):
    best = paths["run"] / RunDir.BEST
    assert trained_checkpoint(paths["run"], "--init") == best
    assert trained_checkpoint(best, "--init") == best
    for missing in (tmp_path, tmp_path / "gone.pt", tmp_path / "gone.onnx"):
        with pytest.raises(LeukotreeError, match=r"^--init '.*' is not a trained model: give "
                                                 r"a run folder \(with best.pt\)"):
            trained_checkpoint(missing, "--init")
    with pytest.raises(LeukotreeError, match=r"cv or ensemble folder of 2 models; .*fold_0"):
        trained_checkpoint(paths["cv"], "--init")
    with pytest.raises(LeukotreeError, match=r"exported ONNX file; .*give the run folder"):
        trained_checkpoint(paths["onnx"], "--init")


def test_a_run_with_its_split_is_told_from_data(paths, tmp_path):
    run = RunDir(paths["run"])
    assert trained_run(run.path) is None  # no split.csv: its images are not known
    run.split.write_text("path,label,patient,split\n")
    try:
        assert trained_run(run.path).path == run.path
        assert trained_run(run.best).path == run.path  # the folder of its .pt
        (tmp_path / "manifest.csv").write_text("path,label\n")
        (tmp_path / RunDir.SPLIT).write_text("path,label,patient,split\n")
        assert trained_run(tmp_path / "manifest.csv") is None  # data beside a split
        assert trained_run(paths["onnx"]) is None
        assert trained_run(tmp_path / "data") is None  # a folder that is no run
    finally:
        run.split.unlink()


def test_make_ensemble_refuses_what_is_not_one_new_run(paths, tmp_path):
    run = paths["run"]
    for runs, message in (([run], "at least 2 runs; got 1"),
                          ([run, run / RunDir.BEST], "is given twice"),
                          ([run, paths["onnx"]], "has no trained model"),
                          ([run, paths["cv"]], "already a cv or ensemble folder")):
        with pytest.raises(LeukotreeError, match=message):
            make_ensemble(runs, tmp_path / "e")
        assert not (tmp_path / "e").exists()


def test_load_predictor_is_load_then_predictor(paths):
    from leukotree.inference import load_predictor

    predictor, info = load_predictor(paths["ensemble"], "torch")
    assert isinstance(predictor, EnsemblePredictor)
    assert info == {"engine": "ensemble of 2 (torch)", "engine_note": None,
                    "members": load(paths["ensemble"]).member_paths}


def test_the_loader_sits_above_the_predictors_ensemble_and_export():
    import ast
    from pathlib import Path

    import leukotree.inference as inference

    folder = Path(inference.__file__).parent

    def imported(name):  # every module a file imports, at its top or inside a function
        tree = ast.parse((folder / f"{name}.py").read_text(encoding="utf-8"))
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}

    below = {"predictor", "ensemble", "export"}
    for name in below:
        assert "leukotree.inference.loader" not in imported(name), name
    assert not {f"leukotree.inference.{m}" for m in ("ensemble", "export")} & imported(
        "predictor")
    assert "leukotree.inference.predictor" not in imported("export")
