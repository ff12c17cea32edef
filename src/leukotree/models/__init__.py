"""Models: timm backbones, the tree-classifier heads behind one interface, the losses,
and self-describing checkpoints.

Importing this package registers every head (``flat``, ``multihead``, ``per-node``,
``hybrid``) in :data:`~leukotree.models.heads.HEADS`.
"""

from leukotree.models import hybrid as _hybrid  # noqa: F401  (registers the hybrid head)
from leukotree.models.heads import (
    HEADS,
    ModelConfig,
    TreeClassifier,
    build_model,
    head_class,
    register_head,
)

__all__ = ["HEADS", "ModelConfig", "TreeClassifier", "build_model", "head_class",
           "register_head"]
