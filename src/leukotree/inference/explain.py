"""``leukotree explain``: class-activation heat maps for every level of the tree.

Built on pytorch-grad-cam (``pip install 'leukotree[explain]'``). The score
explained is ``log P(node)`` — the log of the sum of the node's leaf
probabilities — so the same code serves every head and any node of the tree. By
default one map is drawn per level of the predicted path (e.g. Leukemia, Acute,
ALL), as in the seed paper.

The target layer is the last module of the part of the model that decides the node
(:meth:`~leukotree.models.TreeClassifier.feature_module`) that outputs a spatial map
(found by a forward pass) or, for ViT-like backbones, the last block's first norm,
whose tokens are reshaped to a grid; ``--target-layer NAME`` picks any module by its
dotted name. :class:`HeatMapper` holds the CAM objects and releases their hooks when
its block ends.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from leukotree.data.images import load_rgb_array, to_tensor
from leukotree.errors import LeukotreeError, did_you_mean
from leukotree.inference.loader import load
from leukotree.inference.options import InferenceOptions
from leukotree.models import TreeClassifier
from leukotree.models.nodes import LeafToNode
from leukotree.optional import require

METHODS = ("gradcam", "gradcam++", "xgradcam", "layercam", "eigencam", "hirescam")
_CLASSES = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "xgradcam": "XGradCAM",
            "layercam": "LayerCAM", "eigencam": "EigenCAM", "hirescam": "HiResCAM"}


def cam_class(method: str) -> Any:
    """The pytorch-grad-cam class of ``method``."""
    if method not in METHODS:
        raise LeukotreeError(f"Unknown --method '{method}'; choose one of {', '.join(METHODS)}."
                             + did_you_mean(method, METHODS))
    pgc = require("pytorch_grad_cam", extra="explain", purpose="Heat maps")
    return getattr(pgc, _CLASSES[method])


class NodeScores(nn.Module):
    """``log P(node)`` for every node, ``(B, n_nodes)``."""

    def __init__(self, model: TreeClassifier) -> None:
        super().__init__()
        self.model = model
        self.to_nodes = LeafToNode(model.taxonomy)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(self.to_nodes(self.model(x)["leaf_logp"].exp()).clamp_min(1e-12))


def find_target_layer(model: TreeClassifier, backbone: nn.Module,
                      ) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor] | None]:
    """The last module of ``backbone`` with a spatial output, and a reshape for tokens."""
    blocks = getattr(backbone, "blocks", None)
    if isinstance(blocks, nn.Sequential | nn.ModuleList) and len(blocks) and hasattr(
            blocks[-1], "norm1"):
        prefix = int(getattr(backbone, "num_prefix_tokens", 1))
        return blocks[-1].norm1, lambda t: _tokens_to_grid(t, prefix)
    seen: list[tuple[nn.Module, tuple[int, ...]]] = []
    hooks = [m.register_forward_hook(lambda mod, _i, out: seen.append(
        (mod, tuple(out.shape) if torch.is_tensor(out) else ())))
        for m in backbone.modules() if not list(m.children())]
    size = model.config.img_size
    try:
        model.eval()
        with torch.no_grad():
            model(torch.rand(1, 3, size, size) * 255)
    finally:
        for h in hooks:
            h.remove()
    for module, shape in reversed(seen):
        if len(shape) == 4 and shape[-1] > 1 and not isinstance(
                module, nn.Identity | nn.AdaptiveAvgPool2d | nn.Dropout):
            return module, None
    raise LeukotreeError("No spatial feature map found for heat maps; name one with "
                         "--target-layer.")


def _tokens_to_grid(tokens: torch.Tensor, prefix: int) -> torch.Tensor:
    patches = tokens[:, prefix:, :]
    side = math.isqrt(patches.shape[1])
    return patches.reshape(tokens.shape[0], side, side, tokens.shape[2]).permute(0, 3, 1, 2)


def named_layer(model: nn.Module, name: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name not in modules:
        raise LeukotreeError(f"No layer named '{name}' in the model." + did_you_mean(
            name, [n for n in modules if n]))
    return modules[name]


class HeatMapper:
    """Grad-CAM overlays of ``log P(node)`` for one model; a context manager that
    releases every hook it set."""

    def __init__(self, model: TreeClassifier, method: str = "gradcam",
                 target_layer: str | None = None) -> None:
        self._cam_class = cam_class(method)
        image = require("pytorch_grad_cam.utils.image", extra="explain", purpose="Heat maps")
        targets = require("pytorch_grad_cam.utils.model_targets", extra="explain",
                          purpose="Heat maps")
        self._overlay = image.show_cam_on_image
        self._target = targets.ClassifierOutputTarget
        self.model = model
        self.scorer = NodeScores(model).eval()
        self.target_layer = target_layer
        self._cams: dict[int, Any] = {}

    def __enter__(self) -> HeatMapper:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        for cam in self._cams.values():
            cam.__exit__(kind, value, tb)
        self._cams.clear()

    def _layer(self, node: str) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor] | None]:
        part = self.model.feature_module(node)
        if not self.target_layer:
            return find_target_layer(self.model, part)
        layer = named_layer(self.model, self.target_layer)
        if type(layer).__name__.startswith("LayerNorm"):
            prefix = int(getattr(part, "num_prefix_tokens", 1))
            return layer, lambda t: _tokens_to_grid(t, prefix)
        return layer, None

    def _cam(self, node: str) -> Any:
        layer, reshape = self._layer(node)
        key = id(layer)
        if key not in self._cams:
            self._cams[key] = self._cam_class(model=self.scorer, target_layers=[layer],
                                              reshape_transform=reshape)
        return self._cams[key]

    def overlay(self, pixels: np.ndarray, node: str) -> np.ndarray:
        """The heat map of ``node`` on one uint8 ``(S, S, 3)`` image, as RGB uint8."""
        x = to_tensor(pixels).requires_grad_(True)
        index = self.model.taxonomy.node_index[node]
        heat = self._cam(node)(input_tensor=x, targets=[self._target(index)])[0]
        return self._overlay(pixels.astype(np.float32) / 255, heat, use_rgb=True)

    @torch.no_grad()
    def node_probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """``P(node)`` for every node of one image."""
        return self.scorer(to_tensor(pixels))[0].exp().numpy()


def explain_images(
    run: str | Path,
    images: Sequence[str | Path],
    out: str | Path,
    *,
    nodes: Sequence[str] | None = None,
    method: str = "gradcam",
    target_layer: str | None = None,
    options: InferenceOptions | None = None,
) -> list[dict[str, Any]]:
    """Write a heat-map overlay per image and node, plus one strip per image.

    Without ``nodes``, the nodes of each image's predicted path are explained. The images
    are decoded as the model's own unless ``options`` say otherwise (their crop mode and
    pixel size: :meth:`~leukotree.inference.options.InferenceOptions.input_config`; the
    rest of them does not apply to heat maps).
    """
    options = options or InferenceOptions()
    model = load(run).torch_model()
    decode = options.input_config(model.config, source=run).decode_options()
    tax = model.taxonomy
    nodes = [tax.resolve(node, where="--node") for node in nodes or ()]
    size = model.config.img_size
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images = [Path(i) for i in images]
    stems = [i.stem for i in images]
    written = []
    with HeatMapper(model, method, target_layer) as mapper:
        for k, image in enumerate(images):
            # Two images with one name (p1/c.png, p2/c.png) get numbered files.
            stem = image.stem if stems.count(image.stem) == 1 else f"{k:03d}_{image.stem}"
            pixels = load_rgb_array(image, size, **decode)
            node_p = mapper.node_probabilities(pixels)
            leaf = tax.leaves[int(np.argmax([node_p[tax.node_index[lf]] for lf in tax.leaves]))]
            panels = [pixels]
            maps = {}
            for node in (list(nodes) if nodes else list(tax.path(leaf))):
                overlay = mapper.overlay(pixels, node)
                path = out / f"{stem}_{node}.png"
                Image.fromarray(overlay).save(path)
                panels.append(overlay)
                maps[node] = {"file": path.name, "probability": float(node_p[tax.node_index[node]])}
            strip = out / f"{stem}_levels.png"
            Image.fromarray(np.concatenate(panels, axis=1)).save(strip)
            written.append({"image": str(image), "predicted_leaf": leaf, "maps": maps,
                            "strip": strip.name})
    return written
