"""Heat maps for every level, for CNN and ViT backbones and every head."""

import itertools

import numpy as np
import pytest
from PIL import Image

from leukotree.cli import main
from leukotree.errors import LeukotreeError
from leukotree.inference.explain import explain_images
from leukotree.inference.options import InferenceOptions
from leukotree.models.checkpoint import save_model
from leukotree.models.heads import ModelConfig, build_model
from leukotree.taxonomy import load_taxonomy

TAX = load_taxonomy("leukemia7")


@pytest.fixture
def image(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "cell.png"
    Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize(("head", "backbone"), [
    ("flat", "test_resnet"), ("multihead", "test_resnet"), ("multihead", "test_vit"),
    ("multihead", "test_convnext"), ("per-node", "test_resnet"), ("hybrid", "test_resnet"),
])
def test_one_map_per_level_of_the_predicted_path(head, backbone, image, tmp_path):
    model = build_model(TAX, ModelConfig(head=head, backbone=backbone, img_size=32,
                                         hybrid_backbones=["test_resnet", backbone]))
    save_model(tmp_path / "best.pt", model)
    out = tmp_path / "maps"
    [result] = explain_images(tmp_path / "best.pt", [image], out)
    path = TAX.path(result["predicted_leaf"])
    assert list(result["maps"]) == list(path)
    for node, entry in result["maps"].items():
        overlay = np.asarray(Image.open(out / entry["file"]))
        assert overlay.shape == (32, 32, 3), node
    strip = np.asarray(Image.open(out / result["strip"]))
    assert strip.shape == (32, 32 * (1 + len(path)), 3)
    probs = [result["maps"][n]["probability"] for n in path]
    assert all(a >= b - 1e-6 for a, b in itertools.pairwise(probs))


def test_named_node_layer_and_method_from_the_cli(image, tmp_path, capsys):
    model = build_model(TAX, ModelConfig(head="multihead", backbone="test_resnet", img_size=32))
    save_model(tmp_path / "best.pt", model)
    out = tmp_path / "maps"
    assert main(["explain", str(tmp_path / "best.pt"), str(image), "--out", str(out),
                 "--node", "Acute,CML", "--method", "gradcam++",
                 "--target-layer", "backbone.layer3"]) == 0
    assert (out / "cell_Acute.png").exists() and (out / "cell_CML.png").exists()
    assert main(["explain", str(tmp_path / "best.pt"), str(image), "--out", str(out),
                 "--target-layer", "backbone.layer9"]) == 2
    assert "No layer named" in capsys.readouterr().err
    with pytest.raises(LeukotreeError, match="Did you mean 'AML'"):
        explain_images(tmp_path / "best.pt", [image], out, nodes=["AMl"])
    with pytest.raises(LeukotreeError, match="method"):
        explain_images(tmp_path / "best.pt", [image], out, method="gradcamm")


def test_explain_decodes_another_camera_to_the_trained_field_of_view(image, tmp_path, capsys):
    from leukotree.data.images import load_rgb_array

    # trained on 0.5 um pixels seeing the whole 48 px side: a 24 um field of view
    model = build_model(TAX, ModelConfig(head="flat", backbone="test_resnet", img_size=32,
                                         pixel_size=0.5, field_um=24.0))
    save_model(tmp_path / "best.pt", model)
    out = tmp_path / "maps"
    [own] = explain_images(tmp_path / "best.pt", [image], out / "own")
    [other] = explain_images(tmp_path / "best.pt", [image], out / "other",
                              options=InferenceOptions(pixel_size=1.0))
    strip = np.asarray(Image.open(out / "other" / other["strip"]))
    # at 1 um per pixel the 24 um field is the central 24 px of the image
    np.testing.assert_array_equal(strip[:, :32], load_rgb_array(image, 32, window=24.0))
    assert not np.array_equal(strip[:, :32],
                              np.asarray(Image.open(out / "own" / own["strip"]))[:, :32])
    plain = tmp_path / "plain.pt"
    save_model(plain, build_model(TAX, ModelConfig(head="flat", backbone="test_resnet",
                                                   img_size=32)))
    assert main(["explain", str(plain), str(image), "--out", str(out), "--pixel-size",
                 "0.3"]) == 2
    assert "was trained without" in capsys.readouterr().err
    assert main(["explain", str(plain), str(image), "--out", str(out / "auto"),
                 "--crop-mode", "auto"]) == 0
