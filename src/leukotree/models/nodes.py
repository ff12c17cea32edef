"""Tree arithmetic as a module, for graphs that must stay in PyTorch (the ONNX export,
Grad-CAM targets): :class:`LeafToNode` computes ``P(node) = sum of P(leaf)`` over the
leaves below each node, as :func:`leukotree.tree.node_probabilities` does in NumPy."""

from __future__ import annotations

import torch
from torch import nn

from leukotree.taxonomy import Taxonomy


class LeafToNode(nn.Module):
    """Leaf probabilities ``(B, n_leaves)`` -> node probabilities ``(B, n_nodes)``."""

    def __init__(self, taxonomy: Taxonomy) -> None:
        super().__init__()
        matrix = torch.tensor(taxonomy.node_leaf_matrix().T, dtype=torch.float32)
        self.register_buffer("leaf_to_node", matrix)

    def forward(self, leaf_probs: torch.Tensor) -> torch.Tensor:
        return leaf_probs @ self.leaf_to_node
