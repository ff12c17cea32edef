"""ONNX export: ONNX Runtime agrees with PyTorch; predict accepts the ONNX file."""

import csv
import os
import warnings

import numpy as np
import pytest
import torch

from leukotree.cli import main
from leukotree.data.synth import generate
from leukotree.errors import LeukotreeError
from leukotree.inference.export import export_onnx
from leukotree.inference.loader import load
from leukotree.inference.predictor import OnnxPredictor, TorchPredictor
from leukotree.models.checkpoint import load_model, save_model
from leukotree.models.heads import ModelConfig, build_model
from leukotree.taxonomy import load_taxonomy

TAX = load_taxonomy("leukemia7")


@pytest.mark.parametrize(("head", "context", "stain", "target"), [
    ("flat", 0.0, "none", None), ("multihead", 0.0, "none", None),
    ("per-node", 0.0, "none", None), ("hybrid", 0.0, "none", None),
    ("multihead", 0.3, "none", None),
    ("multihead", 0.3, "reinhard", [62.0, 14.0, -3.0, 18.0, 11.0, 14.0]),
    ("flat", 0.0, "white", [250.0, 230.0, 200.0])])
def test_onnx_runtime_matches_pytorch(head, context, stain, target, tmp_path):
    torch.manual_seed(0)
    model = build_model(TAX, ModelConfig(head=head, backbone="test_resnet", img_size=32,
                                         hybrid_backbones=["test_resnet", "test_efficientnet"],
                                         mean=[0.7, 0.6, 0.65], std=[0.2, 0.25, 0.2],
                                         context_radius=context, stain_norm=stain,
                                         stain_target=target))
    # move batch-norm statistics away from their initial values
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(8, 3, 32, 32) * 255)
    save_model(tmp_path / "best.pt", model)
    onnx_path = export_onnx(tmp_path / "best.pt", tmp_path / "m.onnx")
    ort_model = OnnxPredictor(onnx_path)
    assert ort_model.taxonomy == TAX and ort_model.model_config.img_size == 32
    torch_model, _ = load_model(tmp_path / "best.pt")
    pixels = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    expected = TorchPredictor(torch_model).predict(pixels)
    got = ort_model.predict(pixels)
    assert np.abs(got - expected).max() < 1e-4
    x = pixels.transpose(0, 3, 1, 2).astype(np.float32)
    leaf, node, features = ort_model.session.run(None, {"images": x})
    assert features.shape[0] == 5
    assert node.shape == (5, len(TAX.nodes))
    assert np.allclose(node, leaf @ TAX.node_leaf_matrix().T, atol=1e-5)


def test_onnx_runtime_gives_the_stage_ood_score_and_distance_temperatures_of_pytorch(
        tmp_path):
    from leukotree.models.calibration import ood_section
    from leukotree.models.checkpoint import update_checkpoint

    torch.manual_seed(0)
    model = build_model(TAX, ModelConfig(head="multihead", backbone="test_resnet",
                                         img_size=32)).eval()
    model.set_stage_features(3)
    save_model(tmp_path / "best.pt", model)
    rng = np.random.default_rng(0)
    widths = model.stage_widths()
    means = [rng.normal(0, 1, (2, w)).astype(np.float32) for w in widths]
    update_checkpoint(tmp_path / "best.pt", ood=ood_section(
        means, [np.eye(w, dtype=np.float32) for w in widths], ["ALL", "AML"], 2.0, 0.95,
        0.05, scales=[1.0, 3.0, 5.0], stages=3), calibration={
        "temperatures": dict.fromkeys(TAX.inner_nodes, 0.7), "distance_power": 1.5,
        "distance_ref": 40.0})
    pixels = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    torch_model, _ = load_model(tmp_path / "best.pt")
    assert torch_model.temperature.distance_power == 1.5
    expected = TorchPredictor(torch_model).outputs(pixels)
    got = OnnxPredictor(export_onnx(tmp_path / "best.pt", tmp_path / "m.onnx")).outputs(pixels)
    assert np.allclose(got["ood_score"], expected["ood_score"], rtol=1e-4)
    assert np.abs(got["leaf_probs"] - expected["leaf_probs"]).max() < 1e-4
    torch_model.temperature.distance_power = 0.0  # the per-cell factor is in the graph
    plain = TorchPredictor(torch_model).outputs(pixels)["leaf_probs"]
    assert np.abs(got["leaf_probs"] - plain).max() > 1e-3


def test_predict_accepts_the_onnx_file(tmp_path):
    data = tmp_path / "data"
    generate(data, TAX, patients_per_class=1, cells_per_patient=2, size=32, seed=5,
             progress=False)
    model = build_model(TAX, ModelConfig(head="multihead", backbone="test_resnet", img_size=32))
    save_model(tmp_path / "best.pt", model)
    assert main(["export", str(tmp_path / "best.pt"), "--onnx", str(tmp_path / "m.onnx")]) == 0
    for run, name in ((tmp_path / "best.pt", "pt.csv"), (tmp_path / "m.onnx", "onnx.csv")):
        assert main(["predict", str(run), str(data), "--out", str(tmp_path / name),
                     "--engine", "torch" if name == "pt.csv" else "auto",
                     "--no-progress"]) == 0
    a = list(csv.DictReader((tmp_path / "pt.csv").open()))
    b = list(csv.DictReader((tmp_path / "onnx.csv").open()))
    assert len(a) == len(b) == 14
    for x, y in zip(a, b, strict=True):
        assert x["predicted_leaf"] == y["predicted_leaf"]
        for k in x:
            if k.startswith("p_"):
                assert abs(float(x[k]) - float(y[k])) < 1e-4


def test_a_foreign_onnx_file_is_refused(tmp_path):
    path = tmp_path / "other.onnx"
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice
        warnings.simplefilter("ignore")
        torch.onnx.export(torch.nn.Linear(2, 2), (torch.rand(1, 2),), str(path), dynamo=False)
    with pytest.raises(LeukotreeError, match="not an ONNX file exported by leukotree"):
        OnnxPredictor(path)


def test_default_engine_is_onnx_runtime_exported_once_beside_the_checkpoint(tmp_path):
    model = build_model(TAX, ModelConfig(head="multihead", backbone="test_resnet", img_size=32))
    save_model(tmp_path / "best.pt", model)
    ort_model = load(tmp_path).predictor()
    assert ort_model.engine == "onnxruntime" and isinstance(ort_model, OnnxPredictor)
    exported = tmp_path / "best.onnx"
    first = exported.stat().st_mtime_ns
    load(tmp_path / "best.pt").predictor()
    assert exported.stat().st_mtime_ns == first  # reused, not exported again
    torch_model = load(tmp_path).predictor("torch")
    assert torch_model.engine == "torch" and isinstance(torch_model, TorchPredictor)
    pixels = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    assert np.allclose(ort_model.predict(pixels), torch_model.predict(pixels), atol=1e-4)
    # a newer checkpoint is exported again
    torch.nn.init.zeros_(model.heads[0].weight)
    save_model(tmp_path / "best.pt", model)
    os.utime(tmp_path / "best.pt", ns=(first + 10**9, first + 10**9))
    load(tmp_path).predictor()
    assert exported.stat().st_mtime_ns > first


def test_engine_errors_name_the_fix(tmp_path):
    model = build_model(TAX, ModelConfig(head="flat", backbone="test_resnet", img_size=32))
    save_model(tmp_path / "best.pt", model)
    onnx_path = export_onnx(tmp_path / "best.pt", tmp_path / "m.onnx")
    with pytest.raises(LeukotreeError, match="--engine torch"):
        load(onnx_path).predictor("torch")
    with pytest.raises(LeukotreeError, match="'engine'"):
        load(tmp_path).predictor("tensorrt")
