"""Per-image colour normalisation inside the model: white balance and Reinhard."""

import numpy as np
import pytest
import torch
from skimage.color import lab2rgb, rgb2lab

from leukotree.errors import LeukotreeError
from leukotree.models import ModelConfig, build_model
from leukotree.models.stain import (
    GAIN_RANGE,
    WHITE_FRACTION,
    ReinhardNorm,
    WhiteBalance,
    fit_lab_target,
    fit_stain_target,
    lab_to_rgb,
    rgb_to_lab,
    white_point,
)


def _pixels(seed: int, n: int = 4, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _nchw(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float()


def test_lab_conversions_agree_with_scikit_image():
    px = _pixels(0)
    lab = rgb_to_lab(_nchw(px)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(lab, np.stack([rgb2lab(p) for p in px]), atol=1e-3)
    back = lab_to_rgb(torch.from_numpy(lab).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(back, px, atol=0.01)
    # a colour beyond sRGB is clipped as scikit-image clips it
    out = np.array([[[60.0, 90.0, -100.0]]])
    np.testing.assert_allclose(
        lab_to_rgb(torch.tensor(out).permute(2, 0, 1)[None].float())[0, :, 0, 0].numpy(),
        np.clip(lab2rgb(out)[0, 0], 0, 1) * 255, atol=0.5)


def test_the_target_is_the_mean_of_the_images_statistics():
    # two flat images: per-image deviations 0, means their L a b
    px = np.zeros((2, 4, 4, 3), np.uint8)
    px[0] = (255, 255, 255)  # white: L 100, a 0, b 0
    px[1] = (0, 0, 0)  # black: L 0
    target = fit_lab_target(px)
    np.testing.assert_allclose(target, [50, 0, 0, 0, 0, 0], atol=1e-2)
    with pytest.raises(ValueError, match="no training pixels"):
        fit_lab_target(px[:0])


def test_reinhard_gives_every_image_the_target_statistics():
    px = _pixels(1, size=24).astype(np.float64)
    px = px * np.array([0.9, 0.8, 0.3]) + np.array([20, 20, 0])  # a yellow cast
    target = [65.0, 12.0, -5.0, 15.0, 10.0, 12.0]
    out = ReinhardNorm(target)(_nchw(px.round().astype(np.uint8)))
    lab = rgb_to_lab(out)
    # close, not exact: colours pushed out of sRGB are clipped on the way back
    np.testing.assert_allclose(lab.mean((2, 3)).numpy(), [target[:3]] * 4, atol=1.5)
    np.testing.assert_allclose(lab.std((2, 3), correction=0).numpy(), [target[3:]] * 4,
                               rtol=0.1)


def test_two_stainings_of_one_image_reach_the_network_alike():
    px = _pixels(2, n=1, size=24).astype(np.float64)
    pale = (px * 0.7 + 70).round().astype(np.uint8)  # washed-out, higher background
    norm = ReinhardNorm([60.0, 10.0, -5.0, 20.0, 12.0, 15.0])
    before = (_nchw(pale) - _nchw(px.astype(np.uint8))).abs().mean()
    after = (norm(_nchw(pale)) - norm(_nchw(px.astype(np.uint8)))).abs().mean()
    # not exact: an affine change of RGB is not one of L*a*b* (the sRGB curve)
    assert after < 0.2 * before


def test_the_white_point_is_the_mean_of_each_channels_brightest_pixels():
    x = torch.zeros(1, 3, 10, 10)  # 100 pixels: the brightest 2% are 2 pixels
    assert WHITE_FRACTION == 0.02
    x[0, 0, 0, :3] = torch.tensor([200.0, 100.0, 50.0])
    x[0, 1] = 30.0
    x[0, 2, 5, 5] = 250.0
    np.testing.assert_allclose(white_point(x).numpy(), [[150.0, 30.0, 125.0]])


def test_white_balance_undoes_a_colour_cast_exactly():
    px = _pixels(4, size=20)
    px[:, :2, :2] = 255  # a background patch, kept below 255 after the cast
    cast = (px.astype(np.float64) * np.array([1.0, 0.93, 0.7])).round().astype(np.uint8)
    target = fit_stain_target("white", px)
    np.testing.assert_allclose(target, white_point(_nchw(px)).mean(0).numpy(), atol=1e-4)
    norm = WhiteBalance(target)
    np.testing.assert_allclose(norm(_nchw(cast)).numpy(), norm(_nchw(px)).numpy(), atol=2.0)
    assert (norm(_nchw(cast)) - _nchw(cast)).abs().mean() > 10  # the cast was large


def test_bad_targets_and_configurations_are_refused(leukemia7):
    with pytest.raises(ValueError, match="3 numbers in"):
        WhiteBalance([255.0, 0.0, 200.0])
    with pytest.raises(ValueError, match="no target to fit"):
        fit_stain_target("none", _pixels(0))
    with pytest.raises(ValueError, match="6 finite numbers"):
        ReinhardNorm([1.0, 2.0])
    with pytest.raises(ValueError, match="deviations must be positive"):
        ReinhardNorm([60.0, 0.0, 0.0, 10.0, 0.0, 5.0])
    with pytest.raises(LeukotreeError, match="needs the training images' target"):
        build_model(leukemia7, ModelConfig(backbone="test_resnet", img_size=32,
                                           stain_norm="reinhard"))
    with pytest.raises(LeukotreeError, match="Unknown stain normalisation 'macenko'"):
        build_model(leukemia7, ModelConfig(backbone="test_resnet", img_size=32,
                                           stain_norm="macenko"))


def test_a_model_with_reinhard_normalises_before_its_backbone(leukemia7):
    target = [65.0, 12.0, -5.0, 15.0, 10.0, 12.0]
    model = build_model(leukemia7, ModelConfig(
        head="multihead", backbone="test_resnet", img_size=32, stain_norm="reinhard",
        stain_target=target)).eval()
    x = _nchw(_pixels(3, size=32))
    expected = (ReinhardNorm(target)(x) - model.normalize.mean) / model.normalize.std
    torch.testing.assert_close(model.normalize(x), expected)
    # the configuration round-trips; a model without it writes neither key
    cfg = model.config.to_dict()
    assert cfg["stain_norm"] == "reinhard" and cfg["stain_target"] == target
    assert ModelConfig.from_dict(cfg).stain_target == target
    assert "stain_norm" not in ModelConfig().to_dict()


def test_blank_and_nearly_flat_images_are_not_blown_up():
    dark = torch.full((1, 3, 8, 8), 5.0)
    dark[0, 2] = 1.0
    out = WhiteBalance([250.0, 230.0, 200.0])(dark)
    assert out.max() <= GAIN_RANGE[1] * 5.0 + 1e-4  # the gain is capped
    grey = torch.full((1, 3, 16, 16), 128.0) + torch.randn(1, 3, 16, 16).clamp(-1, 1)
    out = ReinhardNorm([60.0, 10.0, -5.0, 20.0, 12.0, 15.0])(grey)
    assert rgb_to_lab(out).std((2, 3)).max() < 25  # not 39: the deviation is floored
    with pytest.raises(ValueError, match="has a black channel"):
        fit_stain_target("white", np.zeros((2, 8, 8, 3), np.uint8))


def test_a_damaged_stain_target_in_a_model_file_is_named(tmp_path, leukemia7):
    from leukotree.models.checkpoint import load_model, save_model

    model = build_model(leukemia7, ModelConfig(backbone="test_resnet", img_size=32,
                                               stain_norm="white",
                                               stain_target=[250.0, 230.0, 200.0]))
    save_model(tmp_path / "best.pt", model)
    payload = torch.load(tmp_path / "best.pt", weights_only=False)
    payload["model_config"]["stain_target"] = [250.0, 230.0]
    torch.save(payload, tmp_path / "best.pt")
    with pytest.raises(LeukotreeError, match=r"cannot build a model .*3 numbers"):
        load_model(tmp_path / "best.pt")
