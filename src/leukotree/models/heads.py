"""Tree classifiers behind one interface: flat, multi-head hierarchical and per-node.

Every model takes uint8-range images ``(B, 3, H, W)`` (normalisation is part of
the model, so exported models need no preprocessing beyond resizing) and
returns a dict of tensors:

- ``"leaf_logp"``: ``(B, n_leaves)`` log-probabilities of the leaves, always a
  consistent distribution over the tree (inner nodes are sums of their leaves);
- ``"head:<node>"``: conditional logits over the children of each inner node,
  for the hierarchical heads (multihead, per-node);
- ``"features"``: ``(B, D)`` the pooled features the classifier reads (outside training
  for every head), which patient-level models pool over a patient's cells;
- ``"cell_logp"``: ``(B, n_cell_types)`` log-probabilities of a second, per-cell
  taxonomy (the cell type a technologist signed) when the model has a cell-type head
  (``ModelConfig.cell_taxonomy``); the cells of a patient give its differential count;
- ``"stage_features"``: ``(B, sum of widths)`` the pooled maps of the backbone's last
  stages, side by side, after :meth:`TreeClassifier.set_stage_features` (or a fitted
  multi-stage OOD score);
- ``"ood_score"``: ``(B,)`` the out-of-distribution score once fitted
  (:meth:`TreeClassifier.set_ood`; above 1: unclassifiable);
- ``"leaf_logp_raw"``: ``(B, n_leaves)`` the leaf log-probabilities before the fitted
  temperatures and softening (only when calibrated: otherwise ``leaf_logp`` is raw), so
  calibration can be fitted again or measured without changing the model.

For the hierarchical heads, ``log P(leaf) = sum over the path of
log P(child | parent)``, computed as one matrix product with the taxonomy's
path matrix, so a child never gets more probability than its parent.

The interface (:class:`TreeClassifier`) is all that code outside ``models/`` uses:
``forward(x, head_targets=None)``, ``is_hierarchical`` (trained by masked per-node
losses), ``backbones()``, ``feature_module(node)`` (for heat maps),
``load_backbone_weights``, ``supports_channels_last``, ``ddp_find_unused_parameters``
and :meth:`TreeClassifier.arch_name`. Heads are registered by name (:data:`HEADS`);
:func:`build_model` builds any of them from a :class:`ModelConfig`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from leukotree.errors import LeukotreeError, did_you_mean
from leukotree.models.backbones import create_backbone, load_weights, resolve_name
from leukotree.models.calibration import FeatureDistance, TreeTemperature
from leukotree.models.stain import STAIN_NORMS, stain_module
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
    crop_mode: str = "centre"  # of the image's central square, or of the cell's frame
    context_radius: float = 0.0  # flatten beyond this fraction of the side from the centre
    norm: str = "batch"  # the backbone's normalisation layers (models.backbones.NORMS)
    stain_norm: str = "none"  # per-image stain normalisation (models.stain.STAIN_NORMS)
    #: Its target, fitted on the training images: the R G B white point (``white``), or
    #: the L a b means then deviations (``reinhard``).
    stain_target: list[float] | None = None
    pixel_size: float | None = None  # micrometres per pixel of the training images
    field_um: float | None = None  # side of the centre crop in micrometres (with pixel_size)
    #: Micrometres per pixel of the images being decoded, set for another lab's images
    #: (:meth:`~leukotree.inference.options.InferenceOptions.input_config`; saved only by ``adapt
    #: --pixel-size``, for the lab it adapted to); None: the training scale.
    input_pixel_size: float | None = None
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    cell_taxonomy: dict[str, Any] | None = None  # a cell-type head over this tree

    def to_dict(self) -> dict[str, Any]:
        """The fields to save, without the newer options left at their defaults (among
        them ``input_pixel_size``, a setting of one prediction unless ``adapt`` set it),
        so a model that does not use them stays readable by older leukotree versions."""
        d = asdict(self)
        for key, default in _NEWER_DEFAULTS.items():
            if d[key] == default:
                del d[key]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "a model file") -> ModelConfig:
        """Rebuild from :meth:`to_dict`; unknown keys are refused (a newer leukotree's file)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise LeukotreeError(
                f"The model configuration in {source} has unknown key(s) {unknown}; it was "
                "probably written by a newer leukotree. Upgrade leukotree to read it.")
        return cls(**d)

    def decode_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`~leukotree.data.images.load_rgb_array` that give
        this model's view of an image: its crop, and, for images of a known pixel size
        (``input_pixel_size``), the centred window of the same physical field of view
        as in training, ``window = field_um / input_pixel_size`` pixels."""
        window = None
        if self.input_pixel_size is not None and self.field_um is not None:
            window = self.field_um / self.input_pixel_size
        return {"crop": float(self.crop_fraction), "crop_mode": self.crop_mode,
                "window": window}

    @property
    def arch_name(self) -> str:
        """The backbone(s) of this configuration, e.g. ``resnet18`` or ``vgg16+inception_v3``."""
        return head_class(self.head).arch_name(self)

    @property
    def description(self) -> str:
        """``<head>/<backbones>``, e.g. ``multihead/resnet18``."""
        return f"{self.head}/{self.arch_name}"


def feature_width(backbone: nn.Module) -> int:
    """Width of a backbone's pooled output (timm's pre-logits width where it has one)."""
    return int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)


#: Fields added after models were first shared, and their "not used" values.
_NEWER_DEFAULTS: dict[str, Any] = {"context_radius": 0.0, "pixel_size": None, "field_um": None,
                                   "input_pixel_size": None, "norm": "batch",
                                   "stain_norm": "none", "stain_target": None}

#: Width of the soft edge of :class:`Normalize`'s context mask, as a fraction of the side.
CONTEXT_EDGE = 0.03


def context_weight(size: int, radius: float) -> torch.Tensor:
    """``w = sigmoid((radius - d) / CONTEXT_EDGE)`` per pixel, ``d`` its distance from the
    centre as a fraction of the side ``size``: 1 on the cell, 0 on the far context."""
    c = (size - 1) / 2
    ys = torch.arange(size, dtype=torch.float32) - c
    d = (ys[:, None] ** 2 + ys[None, :] ** 2).sqrt() / size
    return torch.sigmoid((radius - d) / CONTEXT_EDGE).view(1, 1, size, size)


class Normalize(nn.Module):
    """``(x / 255 - mean) / std`` with the training set's channel statistics.

    With a ``stain`` normalisation each image's colours are first moved to the training
    images' (:mod:`~leukotree.models.stain`: white balance or Reinhard). With
    ``context_radius > 0`` the pixels then become ``w x + (1 - w) b``, ``w`` from
    :func:`context_weight` and ``b`` the image's mean colour weighted by ``1 - w``: the
    red cells and smear around the white cell, which differ from lab to lab (smear
    thickness, red-cell density), are flattened to one colour, so the model cannot learn
    them as a shortcut for the class.
    """

    def __init__(self, mean: list[float], std: list[float], context_radius: float = 0.0,
                 size: int = 224, stain: str = "none",
                 stain_target: Sequence[float] | None = None) -> None:
        super().__init__()
        self.stain = (stain_module(stain, stain_target) if stain != "none" else None)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255.0)
        self.context_radius = context_radius
        weight = context_weight(size, context_radius) if context_radius > 0 else None
        self.register_buffer("context", weight, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.stain is not None:
            x = self.stain(x)
        if self.context is not None:
            w = self.context
            if w.shape[-2:] != x.shape[-2:]:
                if x.shape[-1] != x.shape[-2]:
                    raise LeukotreeError(f"Model inputs must be square; got "
                                         f"{tuple(x.shape[-2:])}.")
                w = context_weight(x.shape[-1], self.context_radius).to(x.device)
            outer = 1 - w
            b = (x * outer).sum((2, 3), keepdim=True) / outer.sum()
            x = x * w + b * outer
        return (x - self.mean) / self.std


class TreeClassifier(nn.Module):
    """The interface of every head: normalisation, the taxonomy's matrices, composition."""

    head_type: ClassVar[str] = "base"
    #: Trained by the masked per-node loss (one conditional head per inner node).
    is_hierarchical: ClassVar[bool] = False
    #: Runs faster in channels_last memory format on CPUs.
    supports_channels_last: ClassVar[bool] = True
    #: DistributedDataParallel must look for parameters a step did not use.
    ddp_find_unused_parameters: ClassVar[bool] = False
    #: Can carry a cell-type head on its features (``ModelConfig.cell_taxonomy``).
    supports_cell_head: ClassVar[bool] = True
    #: Whether ``ModelConfig.norm`` other than batch is honoured (:mod:`.backbones`).
    supports_norm_choice: ClassVar[bool] = True

    def __init__(self, taxonomy: Taxonomy, config: ModelConfig) -> None:
        super().__init__()
        self.taxonomy = taxonomy
        self.config = config
        if config.stain_norm not in STAIN_NORMS:
            raise LeukotreeError(f"Unknown stain normalisation {config.stain_norm!r}; "
                                 f"choose one of {', '.join(STAIN_NORMS)}.")
        if (config.stain_norm != "none") != (config.stain_target is not None):
            raise LeukotreeError(
                f"stain_norm {config.stain_norm!r} with stain_target "
                f"{config.stain_target!r}: a stain normalisation needs the training "
                "images' target (fitted by train) and 'none' takes none.")
        self.normalize = Normalize(config.mean, config.std, config.context_radius,
                                   config.img_size, config.stain_norm, config.stain_target)
        self.cell_taxonomy = (Taxonomy.from_dict(config.cell_taxonomy, source="the model's "
                                                 "cell taxonomy")
                              if config.cell_taxonomy else None)
        if self.cell_taxonomy is not None and not self.supports_cell_head:
            raise LeukotreeError(
                f"The {self.head_type} head cannot carry a cell-type head; use flat, "
                "multihead or hybrid with a cell taxonomy.")
        self.cell_head: nn.Module | None = None
        # Fitted after training (models.calibration): applied in _finish when set.
        self.temperature: TreeTemperature | None = None
        self.ood: FeatureDistance | None = None
        # How many of the backbone's last stages feed the OOD score (set_stage_features).
        self.ood_stages = 1
        # Position of each head's children in taxonomy.nodes, and path matrix.
        order = [taxonomy.node_index[c] for n in taxonomy.inner_nodes
                 for c in taxonomy.children(n)]
        self.register_buffer("child_order", torch.tensor(order, dtype=torch.long),
                             persistent=False)
        path = torch.tensor(taxonomy.node_leaf_matrix(), dtype=torch.float32)
        self.register_buffer("path_matrix", path, persistent=False)

    @classmethod
    def arch_name(cls, config: ModelConfig) -> str:
        """The backbone(s) this head builds from ``config``."""
        return config.backbone

    def _init_cell_head(self, width: int) -> None:
        """Subclasses call this last in ``__init__`` with their feature width."""
        if self.cell_taxonomy is not None:
            self.cell_head = nn.Linear(width, len(self.cell_taxonomy.leaves))

    def set_calibration(self, temperatures: Mapping[str, float] | None,
                        distance_power: float = 0.0, distance_ref: float = 1.0) -> None:
        """Temper every inner node's choice by ``temperatures`` (None: no calibration),
        then, when the model scores its distance, soften each cell's leaf probabilities
        by ``(ood_score / distance_ref) ** distance_power``
        (:mod:`~leukotree.models.calibration`)."""
        self.temperature = (None if not temperatures
                            else TreeTemperature(self.taxonomy, temperatures,
                                                 distance_power, distance_ref).to(
                                self.path_matrix.device))

    def set_ood(self, means: Any | None, precision: Any | None = None,
                threshold: float = 1.0, scales: Sequence[float] | None = None,
                stages: int = 1) -> None:
        """Score each cell's distance to the training cells over ``threshold``
        (``ood_score``, above 1: unclassifiable) from the features of the backbone's last
        ``stages`` stages (:class:`~leukotree.models.calibration.FeatureDistance`);
        ``means`` None: off."""
        if means is None:
            self.ood = None
            self.set_stage_features(1)
            return
        self.set_stage_features(stages)
        self.ood = FeatureDistance(means, precision, threshold, scales).to(
            self.path_matrix.device)

    def max_stages(self) -> int:
        """How many backbone stages this model can give features of (1: the pooled
        features only)."""
        return 1

    def stage_widths(self) -> list[int]:
        """Widths of the ``stage_features`` the model outputs, stage by stage."""
        return []

    def set_stage_features(self, stages: int) -> None:
        """Output ``stage_features`` (the pooled maps of the backbone's last ``stages``
        stages, side by side) with every forward pass; 1: only ``features``."""
        if not 1 <= stages <= self.max_stages():
            raise ValueError(f"this {self.head_type} model gives features of 1.."
                             f"{self.max_stages()} backbone stages, not {stages}")
        self.ood_stages = int(stages)

    def _finish(self, out: dict[str, torch.Tensor], features: torch.Tensor,
                stage_features: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Add the pooled ``features`` (and ``stage_features`` when given), with a
        cell-type head ``cell_logp``; when fitted, add ``ood_score`` and apply the
        temperatures (distance-aware ones with that score) to ``leaf_logp``, keeping the
        untempered values as ``leaf_logp_raw``."""
        out["features"] = features
        if stage_features is not None:
            out["stage_features"] = stage_features
        if self.ood is not None:
            out["ood_score"] = self.ood(features if stage_features is None
                                        else stage_features)
        if self.temperature is not None:
            out["leaf_logp_raw"] = out["leaf_logp"]
            out["leaf_logp"] = self.temperature(out["leaf_logp"], out.get("ood_score"))
        if self.cell_head is not None:
            out["cell_logp"] = F.log_softmax(self.cell_head(features).float(), dim=1)
        return out

    def compose(self, head_logits: list[torch.Tensor]) -> torch.Tensor:
        """Leaf log-probabilities from conditional logits of every inner node."""
        cond = torch.cat([F.log_softmax(h.float(), dim=1) for h in head_logits], dim=1)
        node_cond = torch.empty_like(cond)
        node_cond[:, self.child_order] = cond
        return node_cond @ self.path_matrix

    def forward(self, x: torch.Tensor, head_targets: torch.Tensor | None = None,
                ) -> dict[str, torch.Tensor]:
        """Outputs for ``x``; ``head_targets`` (training only) lets a head skip work that
        the loss will not use (see :class:`PerNodeClassifier`)."""
        raise NotImplementedError

    def backbones(self) -> list[tuple[str, nn.Module]]:
        """``(backbone name, module)`` of every feature extractor, for loading weights."""
        raise NotImplementedError

    def feature_module(self, node: str) -> nn.Module:
        """The part of the model whose features decide ``node`` (for heat maps)."""
        return self.backbones()[-1][1]

    def load_backbone_weights(self, weights: str | None, pretrained: bool) -> list[str]:
        """Load a local weights file (or, with ``pretrained``, hub weights) into every
        backbone; returns one line per backbone saying what was loaded."""
        messages = []
        for name, module in self.backbones():
            if weights:
                missing, _ = load_weights(module, weights)
                messages.append(f"{name}: loaded {weights} ({len(missing)} backbone tensors "
                                "not in file)")
            elif pretrained:
                ref = create_backbone(name, img_size=self.config.img_size, pretrained=True)
                module.load_state_dict(ref.state_dict())
                messages.append(f"{name}: loaded hub weights")
        return messages


HEADS: dict[str, type[TreeClassifier]] = {}


def register_head(name: str) -> Callable[[type[TreeClassifier]], type[TreeClassifier]]:
    def deco(cls: type[TreeClassifier]) -> type[TreeClassifier]:
        cls.head_type = name
        HEADS[name] = cls
        return cls

    return deco


def head_class(name: str) -> type[TreeClassifier]:
    """The registered head ``name``, or an error listing the heads."""
    if name not in HEADS:
        raise LeukotreeError(f"Unknown head '{name}': choose one of {', '.join(HEADS)}."
                             + did_you_mean(name, HEADS))
    return HEADS[name]


class SharedBackboneClassifier(TreeClassifier):
    """One timm backbone; subclasses add ``forward_head`` (timm's two-step interface)."""

    def __init__(self, taxonomy: Taxonomy, config: ModelConfig) -> None:
        super().__init__(taxonomy, config)
        self.backbone = create_backbone(config.backbone, img_size=config.img_size,
                                        drop_rate=config.drop_rate, norm=config.norm)

    def backbones(self) -> list[tuple[str, nn.Module]]:
        return [(self.config.backbone, self.backbone)]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalize(x))

    def forward_head(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def max_stages(self) -> int:
        if not hasattr(self.backbone, "forward_intermediates"):  # torchvision's GoogLeNet
            return 1
        return len(self.backbone.feature_info)

    def stage_widths(self) -> list[int]:
        if self.ood_stages == 1:
            return []
        return [int(info["num_chs"]) for info in self.backbone.feature_info][-self.ood_stages:]

    def forward(self, x: torch.Tensor, head_targets: torch.Tensor | None = None,
                ) -> dict[str, torch.Tensor]:
        if self.ood_stages == 1:
            features = self.forward_features(x)
            return self._finish(self.forward_head(features), features)
        # timm's intermediates: the last stages' maps and the final one, whose pooled
        # head input equals forward_features'.
        final, maps = self.backbone.forward_intermediates(self.normalize(x),
                                                          indices=self.ood_stages)
        features = self.backbone.forward_head(final)
        stages = torch.cat([m.float().mean(dim=(2, 3)) for m in maps], dim=1)
        return self._finish(self.forward_head(features), features, stages)


@register_head("flat")
class FlatClassifier(SharedBackboneClassifier):
    """One softmax over the leaves; inner nodes get the sums of their leaves."""

    def __init__(self, taxonomy: Taxonomy, config: ModelConfig) -> None:
        super().__init__(taxonomy, config)
        self.classifier = nn.Linear(feature_width(self.backbone), len(taxonomy.leaves))
        self._init_cell_head(feature_width(self.backbone))

    def forward_head(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"leaf_logp": F.log_softmax(self.classifier(features).float(), dim=1)}


@register_head("multihead")
class MultiHeadClassifier(SharedBackboneClassifier):
    """The proposed model: one shared backbone, one linear head per inner node."""

    is_hierarchical = True

    def __init__(self, taxonomy: Taxonomy, config: ModelConfig) -> None:
        super().__init__(taxonomy, config)
        width = feature_width(self.backbone)
        self.heads = nn.ModuleList(
            nn.Linear(width, len(taxonomy.children(n))) for n in taxonomy.inner_nodes)
        self._init_cell_head(width)

    def forward_head(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = [head(features) for head in self.heads]
        out = {f"head:{n}": lg for n, lg in zip(self.taxonomy.inner_nodes, logits, strict=True)}
        out["leaf_logp"] = self.compose(logits)
        return out


@register_head("per-node")
class PerNodeClassifier(TreeClassifier):
    """The base hierarchical model: a separate backbone and classifier per inner node.

    Each node model is trained only on the images under its node (``forward`` with
    ``head_targets``) and the models are merged at inference into one consistent
    tree of probabilities.
    """

    is_hierarchical = True
    ddp_find_unused_parameters = True
    supports_cell_head = False

    def __init__(self, taxonomy: Taxonomy, config: ModelConfig) -> None:
        super().__init__(taxonomy, config)
        self.node_models = nn.ModuleList()
        for node in taxonomy.inner_nodes:
            backbone = create_backbone(config.backbone, img_size=config.img_size,
                                       drop_rate=config.drop_rate, norm=config.norm)
            head = nn.Linear(feature_width(backbone), len(taxonomy.children(node)))
            self.node_models.append(nn.Sequential(backbone, head))

    def backbones(self) -> list[tuple[str, nn.Module]]:
        return [(self.config.backbone, m[0]) for m in self.node_models]

    def feature_module(self, node: str) -> nn.Module:
        parent = self.taxonomy.parent(node) or self.taxonomy.root
        return self.node_models[self.taxonomy.inner_nodes.index(parent)][0]

    def forward(self, x: torch.Tensor, head_targets: torch.Tensor | None = None,
                ) -> dict[str, torch.Tensor]:
        """All node models on all images; with ``head_targets`` (training), each node
        model only on the images whose label path passes its node.

        In training, ``head:<node>`` holds the logits of those rows and ``rows:<node>``
        their indices.
        """
        x = self.normalize(x)
        if head_targets is None:
            features = [m[0](x) for m in self.node_models]
            logits = [m[1](f) for m, f in zip(self.node_models, features, strict=True)]
            out = {f"head:{n}": lg
                   for n, lg in zip(self.taxonomy.inner_nodes, logits, strict=True)}
            out["leaf_logp"] = self.compose(logits)
            return self._finish(out, torch.cat(features, dim=1))
        out = {}
        for k, (node, model) in enumerate(zip(self.taxonomy.inner_nodes, self.node_models,
                                               strict=True)):
            rows = torch.nonzero(head_targets[:, k] >= 0).flatten()
            out[f"rows:{node}"] = rows
            if rows.numel() == 0:
                # Keep every parameter in the graph (needed by DDP) at zero cost.
                out[f"head:{node}"] = sum(p.sum() * 0 for p in model.parameters()).view(1, 1)
            elif rows.numel() == 1 and self.training:
                out[f"head:{node}"] = model(x[rows].repeat(2, 1, 1, 1))[:1]  # BN needs two
            else:
                out[f"head:{node}"] = model(x[rows])
        return out


def build_model(taxonomy: Taxonomy, config: ModelConfig) -> TreeClassifier:
    """Build the classifier named by ``config.head`` (see :data:`HEADS`)."""
    cls = head_class(config.head)
    for name in cls.arch_name(config).split("+"):
        resolve_name(name)
    return cls(taxonomy, config)
