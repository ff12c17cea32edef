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
