"""The B-ALL hybrid CNN head (VGG16 + InceptionV3 + Xception multi-level features).

Registered as head ``hybrid``; see :class:`HybridCNN`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from leukotree.errors import LeukotreeError
from leukotree.models.backbones import create_feature_extractor, hybrid_weight_files
from leukotree.models.heads import ModelConfig, TreeClassifier, register_head
from leukotree.taxonomy import Taxonomy


@register_head("hybrid")
class HybridCNN(TreeClassifier):
    """The B-ALL hybrid CNN: multi-level features of several backbones, fused.

    For each backbone, the last three feature stages are average-pooled to
    ``hybrid_pool x hybrid_pool`` and concatenated over stages and backbones; a
    1x1 convolution mixes them, a 2x2 max-pool and two fully connected layers
    follow. Two-leaf taxonomies get one sigmoid output (logit ``z``:
    ``P(leaf0) = sigmoid(z)``), others a softmax over the leaves.
    """

    supports_channels_last = False
    supports_norm_choice = False

    @classmethod
    def arch_name(cls, config: ModelConfig) -> str:
        return "+".join(config.hybrid_backbones)

    def __init__(self, taxonomy: Taxonomy, config: ModelConfig) -> None:
        super().__init__(taxonomy, config)
        if not config.hybrid_backbones:
            raise LeukotreeError("The hybrid head needs at least one backbone in "
                                 "'hybrid_backbones'.")
        if config.norm != "batch":
            raise LeukotreeError(f"The hybrid head keeps its backbones' own normalisation; "
                                 f"the 'norm' parameter '{config.norm}' needs the flat, "
                                 "multihead or per-node head.")
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
        self._init_cell_head(config.hybrid_hidden)

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
        hidden = self.classifier[:-1](features)
        logits = self.classifier[-1](hidden).float()
        if self.binary:
            logp = torch.cat([F.logsigmoid(logits), F.logsigmoid(-logits)], dim=1)
        else:
            logp = F.log_softmax(logits, dim=1)
        return self._finish({"leaf_logp": logp}, hidden)

    def forward(self, x: torch.Tensor, head_targets: torch.Tensor | None = None,
                ) -> dict[str, torch.Tensor]:
        return self.forward_head(self.forward_features(x))

    def backbones(self) -> list[tuple[str, nn.Module]]:
        return list(zip(self.config.hybrid_backbones, self.extractors, strict=True))

    def load_backbone_weights(self, weights: str | None, pretrained: bool) -> list[str]:
        """``weights``: ``NAME=PATH,...``, one file per backbone (see
        :func:`~leukotree.models.backbones.hybrid_weight_files`); backbones without a
        file keep their random initialisation."""
        names = list(self.config.hybrid_backbones)
        files = hybrid_weight_files(weights, names) if weights else {}
        messages = []
        for name, extractor in self.backbones():
            if weights and name not in files:
                messages.append(f"{name}: no weights file given, random initialisation")
                continue
            if not weights and not pretrained:
                continue
            ref = create_feature_extractor(name, img_size=self.config.img_size,
                                           pretrained=pretrained and not weights,
                                           weights=files.get(name))
            extractor.load_state_dict(ref.state_dict())
            messages.append(f"{name}: loaded {files.get(name, 'hub weights')}")
        return messages
