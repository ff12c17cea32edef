"""``leukotree explain``: class-activation heat maps for every level of the tree.

Built on pytorch-grad-cam (``pip install 'leukotree[explain]'``). The score
explained is ``log P(node)`` — the log of the sum of the node's leaf
probabilities — so the same code serves flat, multi-head, per-node and hybrid
models and any node of the tree. By default one map is drawn per level of the
predicted path (e.g. Leukemia, Acute, ALL), as in the seed paper.

The target layer is the last module of the backbone that outputs a spatial map
(found by a forward pass) or, for ViT-like backbones, the last block's first
norm, whose tokens are reshaped to a grid; ``--target-layer NAME`` picks any
module by its dotted name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from leukotree.checkpoint import load_model
from leukotree.errors import LeukotreeError, did_you_mean
from leukotree.images import load_rgb_array
from leukotree.models import TreeClassifier

METHODS = ("gradcam", "gradcam++", "xgradcam", "layercam", "eigencam", "hirescam")


def _cam_class(method: str) -> Any:
    try:
        import pytorch_grad_cam as pgc
    except ImportError:
        raise LeukotreeError("Heat maps need pytorch-grad-cam: pip install "
                             "'leukotree[explain]'.") from None
    table = {"gradcam": pgc.GradCAM, "gradcam++": pgc.GradCAMPlusPlus,
             "xgradcam": pgc.XGradCAM, "layercam": pgc.LayerCAM, "eigencam": pgc.EigenCAM,
             "hirescam": pgc.HiResCAM}
    if method not in table:
        raise LeukotreeError(f"Unknown --method '{method}'; choose one of {', '.join(METHODS)}."
                             + did_you_mean(method, METHODS))
    return table[method]


class NodeScores(nn.Module):
    """``log P(node)`` for every non-root node, ``(B, n_nodes)``."""

    def __init__(self, model: TreeClassifier) -> None:
        super().__init__()
        self.model = model
        matrix = torch.tensor(model.taxonomy.node_leaf_matrix().T, dtype=torch.float32)
        self.register_buffer("leaf_to_node", matrix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        leaf = self.model(x)["leaf_logp"].exp()
        return torch.log((leaf @ self.leaf_to_node).clamp_min(1e-12))


def _module_for(model: TreeClassifier, node: str) -> nn.Module:
    """The part of the model whose features decide ``node``."""
    if model.head_type == "per-node":
        tax = model.taxonomy
        parent = tax.parent(node)
        return model.node_models[tax.inner_nodes.index(parent)][0]
    if model.head_type == "hybrid":
        return model.extractors[-1]
    return model.backbone


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


def explain_images(
    run: str | Path,
    images: Sequence[str | Path],
    out: str | Path,
    *,
    nodes: Sequence[str] | None = None,
    method: str = "gradcam",
    target_layer: str | None = None,
) -> list[dict[str, Any]]:
    """Write a heat-map overlay per image and node, plus one strip per image.

    Without ``nodes``, the nodes of each image's predicted path are explained.
    """
    from pytorch_grad_cam.utils.image import show_cam_on_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam_class = _cam_class(method)
    model, _ = load_model(run)
    tax = model.taxonomy
    for node in nodes or ():
        tax.resolve(node, where="--node")
    size, crop = model.config.img_size, model.config.crop_fraction
    scorer = NodeScores(model).eval()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for image in map(Path, images):
        pixels = load_rgb_array(image, size, crop=crop)
        x = torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float()
        with torch.no_grad():
            node_logp = scorer(x)[0].exp().numpy()
            leaf = tax.leaves[int(np.argmax([node_logp[tax.node_index[lf]]
                                             for lf in tax.leaves]))]
        wanted = list(nodes) if nodes else list(tax.path(leaf))
        panels = [pixels]
        maps = {}
        for node in wanted:
            if target_layer:
                layer, reshape = named_layer(model, target_layer), None
                if getattr(layer, "__class__", None).__name__.startswith("LayerNorm"):
                    prefix = int(getattr(_module_for(model, node), "num_prefix_tokens", 1))
                    reshape = lambda t, p=prefix: _tokens_to_grid(t, p)  # noqa: E731
            else:
                layer, reshape = find_target_layer(model, _module_for(model, node))
            with cam_class(model=scorer, target_layers=[layer],
                           reshape_transform=reshape) as cam:
                heat = cam(input_tensor=x.clone().requires_grad_(True),
                           targets=[ClassifierOutputTarget(tax.node_index[node])])[0]
            overlay = show_cam_on_image(pixels.astype(np.float32) / 255, heat, use_rgb=True)
            path = out / f"{image.stem}_{node}.png"
            Image.fromarray(overlay).save(path)
            panels.append(overlay)
            maps[node] = {"file": path.name, "probability": float(node_logp[tax.node_index[node]])}
        strip = out / f"{image.stem}_levels.png"
        Image.fromarray(np.concatenate(panels, axis=1)).save(strip)
        written.append({"image": str(image), "predicted_leaf": leaf, "maps": maps,
                        "strip": strip.name})
    return written
