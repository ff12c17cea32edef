"""Tree classifiers: flat, multi-head hierarchical, per-node and hybrid CNN.

Every model takes uint8-range images ``(B, 3, H, W)`` (normalisation is part of
the model, so exported models need no preprocessing beyond resizing) and
returns a dict of tensors:

- ``"leaf_logp"``: ``(B, n_leaves)`` log-probabilities of the leaves, always a
  consistent distribution over the tree (inner nodes are sums of their leaves);
- ``"head:<node>"``: conditional logits over the children of each inner node,
  for the hierarchical heads (multihead, per-node).

For the hierarchical heads, ``log P(leaf) = sum over the path of
log P(child | parent)``, computed as one matrix product with the taxonomy's
path matrix, so a child never gets more probability than its parent.

Heads are registered by name (:data:`HEADS`); :func:`build_model` builds any of
them from a :class:`ModelConfig`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from leukotree.backbones import create_backbone, create_feature_extractor, resolve_name
from leukotree.errors import LeukotreeError, did_you_mean
from leukotree.taxonomy import Taxonomy


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model's architecture."""

    head: str = "multihead"
    backbone: str = "resnet18"
    img_size: int = 224
    drop_rate: float = 0.0
    hybrid_backbones: list[str] = field(
        default_factory=lambda: ["vgg16", "inception_v3", "legacy_xception"])
    hybrid_pool: int = 4
    hybrid_channels: int = 256
    hybrid_hidden: int = 256
    crop_fraction: float = 1.0  # central fraction of each image seen at inference
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def feature_width(backbone: nn.Module) -> int:
    """Width of a backbone's pooled output (timm's pre-logits width where it has one)."""
    return int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)


class Normalize(nn.Module):
    """``(x / 255 - mean) / std`` with the training set's channel statistics."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


class TreeClassifier(nn.Module):
    """Base class: normalisation, the taxonomy's matrices and tree composition."""

    head_type = "base"

    def __init__(self, taxonomy: Taxonomy, config: ModelConfig) -> None:
        super().__init__()
        self.taxonomy = taxonomy
        self.config = config
        self.normalize = Normalize(config.mean, config.std)
        # Position of each head's children in taxonomy.nodes, and path matrix.
        order = [taxonomy.node_index[c] for n in taxonomy.inner_nodes
                 for c in taxonomy.children(n)]
        self.register_buffer("child_order", torch.tensor(order, dtype=torch.long),
                             persistent=False)
        path = torch.tensor(taxonomy.node_leaf_matrix(), dtype=torch.float32)
        self.register_buffer("path_matrix", path, persistent=False)

    def compose(self, head_logits: list[torch.Tensor]) -> torch.Tensor:
        """Leaf log-probabilities from conditional logits of every inner node."""
        cond = torch.cat([F.log_softmax(h.float(), dim=1) for h in head_logits], dim=1)
        node_cond = torch.empty_like(cond)
        node_cond[:, self.child_order] = cond
        return node_cond @ self.path_matrix

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError


HEADS: dict[str, Callable[[Taxonomy, ModelConfig], TreeClassifier]] = {}


def register_head(name: str) -> Callable[[type[TreeClassifier]], type[TreeClassifier]]:
    def deco(cls: type[TreeClassifier]) -> type[TreeClassifier]:
        cls.head_type = name
        HEADS[name] = cls
        return cls

    return deco


class SharedBackboneClassifier(TreeClassifier):
    """One timm backbone; subclasses add ``forward_head`` (timm's two-step interface)."""

    def __init__(self, taxonomy: Taxonomy, config: ModelConfig) -> None:
        super().__init__(taxonomy, config)
        self.backbone = create_backbone(config.backbone, img_size=config.img_size,
                                        drop_rate=config.drop_rate)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalize(x))

    def forward_head(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.forward_head(self.forward_features(x))


@register_head("flat")
class FlatClassifier(SharedBackboneClassifier):
    """One softmax over the leaves; inner nodes get the sums of their leaves."""

    def __init__(self, taxonomy: Taxonomy, config: ModelConfig) -> None:
        super().__init__(taxonomy, config)
        self.classifier = nn.Linear(feature_width(self.backbone), len(taxonomy.leaves))

    def forward_head(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"leaf_logp": F.log_softmax(self.classifier(features).float(), dim=1)}


@register_head("multihead")
class MultiHeadClassifier(SharedBackboneClassifier):
    """The proposed model: one shared backbone, one linear head per inner node."""

    def __init__(self, taxonomy: Taxonomy, config: ModelConfig) -> None:
        super().__init__(taxonomy, config)
        width = feature_width(self.backbone)
        self.heads = nn.ModuleList(
            nn.Linear(width, len(taxonomy.children(n))) for n in taxonomy.inner_nodes)

    def forward_head(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = [head(features) for head in self.heads]
        out = {f"head:{n}": lg for n, lg in zip(self.taxonomy.inner_nodes, logits, strict=True)}
        out["leaf_logp"] = self.compose(logits)
        return out


@register_head("per-node")
class PerNodeClassifier(TreeClassifier):
    """The base hierarchical model: a separate backbone and classifier per inner node.

    Each node model is trained only on the images under its node (see
    :meth:`forward_train`) and the models are merged at inference into one
    consistent tree of probabilities.
    """

    def __init__(self, taxonomy: Taxonomy, config: ModelConfig) -> None:
        super().__init__(taxonomy, config)
        self.node_models = nn.ModuleList()
        for node in taxonomy.inner_nodes:
            backbone = create_backbone(config.backbone, img_size=config.img_size,
                                       drop_rate=config.drop_rate)
            head = nn.Linear(feature_width(backbone), len(taxonomy.children(node)))
            self.node_models.append(nn.Sequential(backbone, head))

    def forward(self, x: torch.Tensor, head_targets: torch.Tensor | None = None,
                ) -> dict[str, torch.Tensor]:
        """All node models on all images; with ``head_targets`` (training), see
        :meth:`forward_train`."""
        if head_targets is not None:
            return self.forward_train(x, head_targets)
        x = self.normalize(x)
        logits = [m(x) for m in self.node_models]
        out = {f"head:{n}": lg for n, lg in zip(self.taxonomy.inner_nodes, logits, strict=True)}
        out["leaf_logp"] = self.compose(logits)
        return out

    def forward_train(self, x: torch.Tensor, head_targets: torch.Tensor,
                      ) -> dict[str, torch.Tensor]:
        """Run each node model only on the images whose label path passes its node.

        Returns ``head:<node>`` logits for those rows and ``rows:<node>`` their indices.
        """
        x = self.normalize(x)
        out: dict[str, torch.Tensor] = {}
        for k, (node, model) in enumerate(zip(self.taxonomy.inner_nodes, self.node_models,
                                               strict=True)):
            rows = torch.nonzero(head_targets[:, k] >= 0).flatten()
            if rows.numel() == 0:
                # Keep every parameter in the graph (needed by DDP) at zero cost.
                out[f"head:{node}"] = sum(p.sum() * 0 for p in model.parameters()).view(1, 1)
                out[f"rows:{node}"] = rows
                continue
            sub = x[rows]
            if sub.shape[0] == 1 and self.training:
                sub = torch.cat([sub, sub])  # batch norm needs two samples
                out[f"head:{node}"] = model(sub)[:1]
            else:
                out[f"head:{node}"] = model(sub)
            out[f"rows:{node}"] = rows
        return out


@register_head("hybrid")
class HybridCNN(TreeClassifier):
    """The B-ALL hybrid CNN: multi-level features of several backbones, fused.

    For each backbone, the last three feature stages are average-pooled to
    ``hybrid_pool x hybrid_pool`` and concatenated over stages and backbones; a
    1x1 convolution mixes them, a 2x2 max-pool and two fully connected layers
    follow. Two-leaf taxonomies get one sigmoid output (logit ``z``:
    ``P(leaf0) = sigmoid(z)``), others a softmax over the leaves.
    """

    def __init__(self, taxonomy: Taxonomy, config: ModelConfig) -> None:
        super().__init__(taxonomy, config)
        if not config.hybrid_backbones:
            raise LeukotreeError("The hybrid head needs at least one backbone in "
                                 "'hybrid_backbones'.")
        self.extractors = nn.ModuleList(
            create_feature_extractor(b, img_size=config.img_size)
            for b in config.hybrid_backbones)
        channels = sum(sum(e.feature_info.channels()) for e in self.extractors)
        p = config.hybrid_pool
        self.pool = nn.AdaptiveAvgPool2d(p)
        self.fuse = nn.Sequential(
            nn.Conv2d(channels, config.hybrid_channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(config.hybrid_channels),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2, ceil_mode=True),
        )
        pooled = (p + 1) // 2
        self.binary = len(taxonomy.leaves) == 2
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(config.hybrid_channels * pooled * pooled, config.hybrid_hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(config.drop_rate),
            nn.Linear(config.hybrid_hidden, 1 if self.binary else len(taxonomy.leaves)),
        )

    def _pool(self, fmap: torch.Tensor) -> torch.Tensor:
        """Average-pool to ``hybrid_pool`` squared; bilinear resize where sizes don't divide
        (maps smaller than the target, or odd sizes), which ONNX also supports."""
        p = self.config.hybrid_pool
        h, w = fmap.shape[-2:]
        if h % p == 0 and w % p == 0:
            return self.pool(fmap)
        return F.interpolate(fmap, size=(p, p), mode="bilinear", align_corners=False)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        maps = []
        for extractor in self.extractors:
            for fmap in extractor(x):
                if fmap.ndim == 3:  # token sequences from ViT-like models
                    fmap = fmap.transpose(1, 2).unsqueeze(-1)
                maps.append(self._pool(fmap))
        return self.fuse(torch.cat(maps, dim=1))

    def forward_head(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.classifier(features).float()
        if self.binary:
            logp = torch.cat([F.logsigmoid(logits), F.logsigmoid(-logits)], dim=1)
        else:
            logp = F.log_softmax(logits, dim=1)
        return {"leaf_logp": logp}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.forward_head(self.forward_features(x))


def build_model(taxonomy: Taxonomy, config: ModelConfig) -> TreeClassifier:
    """Build the classifier named by ``config.head`` (see :data:`HEADS`)."""
    if config.head not in HEADS:
        raise LeukotreeError(
            f"Unknown head '{config.head}': choose one of {', '.join(HEADS)}."
            + did_you_mean(config.head, HEADS)
        )
    if config.head != "hybrid":
        resolve_name(config.backbone)
    return HEADS[config.head](taxonomy, config)
