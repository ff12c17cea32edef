"""Colour normalisation inside the model, per image: white balance or Reinhard.

``white`` (white-patch colour constancy): each channel ``c`` of an image is scaled so
that its white point, the mean of its brightest :data:`WHITE_FRACTION` of pixels (the
plasma between the cells, on a smear), becomes the training images' average one:

    x'_c = x_c * clip(w_c(target) / w_c(image), *GAIN_RANGE).

A yellow stain or a camera's white balance (a gain per channel) is undone exactly; the
cell's own colours, shape and size are left as they are.
It assumes every image shows some background: a crop filled by the cell takes the
cytoplasm's colour for white.

``reinhard`` (Reinhard et al. 2001): each image is moved to CIE L*a*b* (sRGB, D65 white;
the formulas of :func:`skimage.color.rgb2lab`) and each channel is standardised to the
training set's colour statistics,

    lab'_c = (lab_c - m_c(image)) / s_c(image) * s_c(target) + m_c(target),

``m`` and ``s`` the mean and standard deviation over the image's pixels, the target the
average of the training images' ``m`` and ``s``. Stronger, but the statistics of a
single-cell image also move with its content (a large blast, dense red cells), which
it then "corrects" too (``benchmarks/bench_cross_lab.py``; CHANGELOG.md, 2026-11-27).

Both are modules of the model (:func:`stain_module`, called by
:class:`~leukotree.models.heads.Normalize`), in batched torch operations, so training,
``predict``, ``evaluate``, ``serve``, Grad-CAM and the exported ONNX graph normalise
alike; the target (:func:`fit_stain_target`, on the training images) travels in the
model's configuration (``stain_target``). There is no other lab's reference to
re-estimate: each image is normalised on its own. torchstain's Reinhard normaliser does
the same one image at a time, outside the graph.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from leukotree.data.images import STAIN_NORMS

#: Share of each channel's brightest pixels whose mean is an image's white point.
WHITE_FRACTION = 0.02

_RGB_TO_XYZ = torch.tensor([[0.412453, 0.357580, 0.180423],
                            [0.212671, 0.715160, 0.072169],
                            [0.019334, 0.119193, 0.950227]])
_XYZ_TO_RGB = torch.linalg.inv(_RGB_TO_XYZ)
_WHITE = torch.tensor([0.95047, 1.0, 1.08883])  # D65, 2 degree observer
#: Floor of an image's L*a*b* standard deviation (a nearly flat image is not blown up).
_MIN_STD = 1.0
#: Bounds of a white-balance gain (a blank or black image is not blown up).
GAIN_RANGE = (0.25, 4.0)


def rgb_to_lab(x: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` sRGB in [0, 255] -> L*a*b* (L in [0, 100])."""
    rgb = (x.float() / 255.0).clamp(0.0, 1.0)
    lin = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055).clamp(min=1e-8) ** 2.4,
                      rgb / 12.92)
    xyz = torch.einsum("ij,bjhw->bihw", _RGB_TO_XYZ.to(x.device), lin)
    t = xyz / _WHITE.to(x.device).view(1, 3, 1, 1)
    f = torch.where(t > 0.008856, t.clamp(min=1e-8) ** (1.0 / 3.0), 7.787 * t + 16.0 / 116.0)
    fx, fy, fz = f[:, 0], f[:, 1], f[:, 2]
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """L*a*b* ``(B, 3, H, W)`` -> sRGB in [0, 255] (out-of-gamut colours clipped)."""
    fy = (lab[:, 0] + 16.0) / 116.0
    f = torch.stack([lab[:, 1] / 500.0 + fy, fy, fy - lab[:, 2] / 200.0], dim=1)
    t = torch.where(f > 0.2068966, f ** 3, (f - 16.0 / 116.0) / 7.787)
    xyz = t * _WHITE.to(lab.device).view(1, 3, 1, 1)
    lin = torch.einsum("ij,bjhw->bihw", _XYZ_TO_RGB.to(lab.device), xyz)
    lin = lin.clamp(0.0, 1.0)
    rgb = torch.where(lin > 0.0031308, 1.055 * lin.clamp(min=1e-8) ** (1.0 / 2.4) - 0.055,
                      12.92 * lin)
    return rgb.clamp(0.0, 1.0) * 255.0


def _mean_std(lab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and channel, the mean and (population) standard deviation over the
    pixels: ``(B, 3, 1, 1)`` each."""
    mean = lab.mean(dim=(2, 3), keepdim=True)
    return mean, ((lab - mean) ** 2).mean(dim=(2, 3), keepdim=True).sqrt()


def white_point(x: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` pixels -> ``(B, 3)``: per channel, the mean of the brightest
    :data:`WHITE_FRACTION` of the image's pixels."""
    flat = x.float().flatten(2)
    k = max(1, int(WHITE_FRACTION * flat.shape[2]))
    return flat.topk(k, dim=2).values.mean(dim=2)


def _lab_stats(x: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` pixels -> ``(B, 6)``: each image's L a b means, then deviations."""
    mean, std = _mean_std(rgb_to_lab(x))
    return torch.cat([mean.flatten(1), std.flatten(1)], dim=1)


def _image_mean(pixels: np.ndarray, stat: Callable[[torch.Tensor], torch.Tensor],
                chunk: int) -> list[float]:
    """The mean over ``(N, H, W, 3)`` uint8 images of the per-image statistic ``stat``
    (computed ``chunk`` images at a time)."""
    if len(pixels) == 0:
        raise ValueError("no training pixels to fit the stain target on")
    per_image = [stat(torch.from_numpy(np.array(pixels[i:i + chunk])).permute(0, 3, 1, 2))
                 for i in range(0, len(pixels), chunk)]  # np.array: a writable copy
    return [float(v) for v in torch.cat(per_image).mean(0)]


def fit_stain_target(kind: str, pixels: np.ndarray, chunk: int = 512) -> list[float]:
    """The ``kind`` normalisation's target from ``(N, H, W, 3)`` uint8 training pixels:
    ``white``, the mean :func:`white_point` (3 values); ``reinhard``,
    :func:`fit_lab_target`."""
    if kind == "reinhard":
        return fit_lab_target(pixels, chunk)
    if kind != "white":
        raise ValueError(f"no target to fit for stain normalisation {kind!r}")
    target = _image_mean(pixels, white_point, chunk)
    if min(target) < 1.0:
        raise ValueError(f"the training images' white point {[round(v, 1) for v in target]} "
                         "has a black channel; white balance needs images with a bright "
                         "background (use stain_norm none)")
    return target


def stain_module(kind: str, target: Sequence[float]) -> nn.Module:
    """The model's colour normalisation ``kind`` (``white`` or ``reinhard``)."""
    if kind == "white":
        return WhiteBalance(target)
    if kind == "reinhard":
        return ReinhardNorm(target)
    raise ValueError(f"unknown stain normalisation {kind!r}; choose one of {STAIN_NORMS}")


class WhiteBalance(nn.Module):
    """``(B, 3, H, W)`` pixels in [0, 255] -> each channel scaled so that the image's
    :func:`white_point` becomes ``target`` (3 values; module docstring)."""

    def __init__(self, target: Sequence[float]) -> None:
        super().__init__()
        if len(target) != 3 or not all(np.isfinite(v) and 0 < v <= 255 for v in target):
            raise ValueError(f"a white-balance target holds 3 numbers in (0, 255] (R G B); "
                             f"got {list(target)}")
        self.register_buffer("target", torch.tensor([float(v) for v in target]).view(1, 3),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            gain = (self.target / white_point(x).clamp(min=1.0)).clamp(*GAIN_RANGE)
            return (x * gain[:, :, None, None]).clamp(0.0, 255.0)


def fit_lab_target(pixels: np.ndarray, chunk: int = 512) -> list[float]:
    """The Reinhard target of ``(N, H, W, 3)`` uint8 training pixels: the mean over images
    of each channel's per-image mean, then of its per-image standard deviation (6 values,
    L a b means then L a b deviations)."""
    return _image_mean(pixels, _lab_stats, chunk)


class ReinhardNorm(nn.Module):
    """``(B, 3, H, W)`` pixels in [0, 255] -> the same with each image's L*a*b* statistics
    moved to ``target`` (6 values, see :func:`fit_lab_target`; module docstring)."""

    def __init__(self, target: Sequence[float]) -> None:
        super().__init__()
        if len(target) != 6 or not all(np.isfinite(v) for v in target):
            raise ValueError(f"a stain target holds 6 finite numbers (L a b means, then "
                             f"deviations); got {list(target)}")
        if not all(v > 0 for v in target[3:]):
            raise ValueError(f"the stain target's deviations must be positive; got "
                             f"{list(target[3:])}")
        t = torch.tensor([float(v) for v in target])
        self.register_buffer("target_mean", t[:3].view(1, 3, 1, 1), persistent=False)
        self.register_buffer("target_std", t[3:].view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            lab = rgb_to_lab(x)
            mean, std = _mean_std(lab)
            return lab_to_rgb((lab - mean) / std.clamp(min=_MIN_STD) * self.target_std
                              + self.target_mean)
