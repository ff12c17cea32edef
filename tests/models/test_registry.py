"""A fifth head, registered from outside the package, goes through the whole pipeline
(train, evaluate, predict with PyTorch and ONNX, explain, report) without any edit to
leukotree: the TreeClassifier interface is all the other subpackages use."""

import csv

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from leukotree.cli import main
from leukotree.data.synth import generate
from leukotree.models import HEADS, ModelConfig, TreeClassifier, head_class
from leukotree.models.backbones import create_backbone
from leukotree.models.heads import feature_width
from leukotree.taxonomy import load_taxonomy

TAX = load_taxonomy("leukemia7")


class TwoLayerHead(TreeClassifier):
    """A hidden layer between one backbone and the leaves (what a lab might add)."""

    def __init__(self, taxonomy, config: ModelConfig) -> None:
        super().__init__(taxonomy, config)
        self.backbone = create_backbone(config.backbone, img_size=config.img_size)
        self.mlp = nn.Sequential(nn.Linear(feature_width(self.backbone), 16), nn.ReLU(),
                                 nn.Linear(16, len(taxonomy.leaves)))

    def backbones(self):
        return [(self.config.backbone, self.backbone)]

    def forward(self, x, head_targets=None):
        logits = self.mlp(self.backbone(self.normalize(x)))
        return {"leaf_logp": F.log_softmax(logits.float(), dim=1)}


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(HEADS, "two-layer", TwoLayerHead)
    TwoLayerHead.head_type = "two-layer"
    return "two-layer"


def test_unknown_head_names_the_registered_ones():
    with pytest.raises(Exception, match="flat, multihead, per-node, hybrid"):
        head_class("fith")


def test_a_registered_head_runs_every_command(registered, tmp_path, capsys):
    data = tmp_path / "data"
    generate(data, TAX, patients_per_class=3, cells_per_patient=2, size=32, seed=1,
             progress=False)
    run = tmp_path / "run"
    assert main(["train", str(data), "-t", "leukemia7", "--preset", "tiny-test", "--head",
                 registered, "--epochs", "1", "--val-fraction", "0.34", "--out", str(run),
                 "--no-progress"]) == 0
    assert main(["evaluate", str(run), "--out", str(tmp_path / "eval"), "--no-progress"]) == 0
    for engine in ("torch", "onnx"):
        out = tmp_path / f"{engine}.csv"
        assert main(["predict", str(run), str(data / "ALL"), "--engine", engine, "--out",
                     str(out), "--no-progress"]) == 0
        assert len(list(csv.DictReader(out.open()))) == 3 * 2
    cell = next((data / "AML").rglob("*.png"))
    assert main(["explain", str(run), str(cell), "--out", str(tmp_path / "maps")]) == 0
    assert len(list((tmp_path / "maps").glob("*_levels.png"))) == 1
    assert main(["report", str(run), str(data / "AML"), "--out", str(tmp_path / "r.html"),
                 "--no-progress"]) == 0
    assert "two-layer" in (tmp_path / "r.html").read_text()
    model_file = torch.load(run / "best.pt", weights_only=True)
    assert model_file["model_config"]["head"] == registered


def test_group_norm_backbones_have_no_batch_statistics_and_save_their_norm(tmp_path, capsys):
    from leukotree.errors import LeukotreeError
    from leukotree.models import build_model
    from leukotree.models.backbones import NORMS
    from leukotree.models.checkpoint import load_model, save_model

    assert NORMS == ("batch", "group")
    tax = load_taxonomy("leukemia7")
    model = build_model(tax, ModelConfig(head="multihead", backbone="test_resnet",
                                         img_size=32, norm="group")).eval()
    layers = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert layers and not any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                              for m in model.modules())
    assert all(m.num_channels % m.num_groups == 0 for m in layers)  # 48 channels: 16 groups
    # per image: a cell's output does not depend on the other cells of its batch
    x = torch.rand(4, 3, 32, 32) * 255
    with torch.no_grad():
        torch.testing.assert_close(model(x)["leaf_logp"][:1], model(x[:1])["leaf_logp"])
    save_model(tmp_path / "best.pt", model)
    assert load_model(tmp_path / "best.pt")[0].config.norm == "group"
    assert "norm" not in ModelConfig(backbone="test_resnet").to_dict()  # old files unchanged
    with pytest.raises(LeukotreeError, match="hybrid head keeps"):
        build_model(tax, ModelConfig(head="hybrid", norm="group",
                                     hybrid_backbones=["test_resnet"], img_size=32))
    # timm's fused norm + activation layers keep their activation; no batch norm: refused
    relus = [sum(isinstance(m, nn.SiLU | nn.ReLU) for m in create_backbone(
        "test_efficientnet", img_size=32, norm=norm).modules()) for norm in ("batch", "group")]
    assert relus[0] == relus[1] > 0
    with pytest.raises(LeukotreeError, match="no 2-d batch-normalisation"):
        create_backbone("test_convnext", img_size=32, norm="group")
    with pytest.raises(LeukotreeError, match="from scratch"):
        create_backbone("test_resnet", img_size=32, norm="group", weights=tmp_path / "w.pt")
    # no batch statistics: adapt says so instead of doing nothing
    from PIL import Image

    (tmp_path / "cells").mkdir()
    for i in range(2):
        Image.new("RGB", (40, 40), (200, 120 + i, 150)).save(tmp_path / "cells" / f"c{i}.png")
    assert main(["adapt", str(tmp_path / "best.pt"), str(tmp_path / "cells"), "--out",
                 str(tmp_path / "adapted"), "--method", "batch-norm", "--no-progress"]) == 2
    assert "no batch-normalisation layer" in capsys.readouterr().err
